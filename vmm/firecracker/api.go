package firecracker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
)

// DefaultRequestTimeout bounds one API call when the caller's context has
// no earlier deadline. Firecracker answers configuration calls in
// milliseconds; a call that takes seconds means the VMM is stuck.
const DefaultRequestTimeout = 5 * time.Second

// maxResponse bounds how much of a response body is read: Firecracker's
// bodies are small JSON objects, and a runaway peer must not fill memory.
const maxResponse = 1 << 20

// Action types of PUT /actions.
const (
	ActionInstanceStart  = "InstanceStart"
	ActionSendCtrlAltDel = "SendCtrlAltDel"
	ActionFlushMetrics   = "FlushMetrics"
)

// InstanceInfo is the body of GET /.
type InstanceInfo struct {
	AppName    string `json:"app_name"`
	ID         string `json:"id"`
	State      string `json:"state"`
	VMMVersion string `json:"vmm_version"`
}

// InstanceAction is the body of PUT /actions.
type InstanceAction struct {
	ActionType string `json:"action_type"`
}

// FaultError is a call Firecracker refused, with its fault_message. The
// client returns it wrapped in an errcode.APIError error.
type FaultError struct {
	Method, Path string
	Status       int
	Fault        string
}

// Error renders the call, the HTTP status and Firecracker's message.
func (e *FaultError) Error() string {
	if e.Fault == "" {
		return fmt.Sprintf("%s %s: HTTP %d", e.Method, e.Path, e.Status)
	}
	return fmt.Sprintf("%s %s: HTTP %d: %s", e.Method, e.Path, e.Status, e.Fault)
}

// Client calls the Firecracker API over its Unix socket.
type Client struct {
	socket  string
	timeout time.Duration
	http    *http.Client
}

// NewClient returns a client for the API socket at path. timeout bounds
// each call (DefaultRequestTimeout when zero).
func NewClient(path string, timeout time.Duration) *Client {
	if timeout <= 0 {
		timeout = DefaultRequestTimeout
	}
	var d net.Dialer
	tr := &http.Transport{
		// Every request goes to the one socket, whatever the URL says.
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "unix", path)
		},
		MaxIdleConns:       1,
		IdleConnTimeout:    30 * time.Second,
		DisableCompression: true,
	}
	return &Client{socket: path, timeout: timeout, http: &http.Client{Transport: tr}}
}

// Close drops idle connections to the socket.
func (c *Client) Close() { c.http.CloseIdleConnections() }

// Describe calls GET /.
func (c *Client) Describe(ctx context.Context) (InstanceInfo, error) {
	var info InstanceInfo
	err := c.do(ctx, http.MethodGet, "/", nil, &info)
	return info, err
}

// Put sends body as JSON with PUT to path.
func (c *Client) Put(ctx context.Context, path string, body any) error {
	return c.do(ctx, http.MethodPut, path, body, nil)
}

// PutBootSource calls PUT /boot-source.
func (c *Client) PutBootSource(ctx context.Context, b BootSource) error {
	return c.Put(ctx, "/boot-source", b)
}

// PutMachineConfig calls PUT /machine-config.
func (c *Client) PutMachineConfig(ctx context.Context, m MachineConfig) error {
	return c.Put(ctx, "/machine-config", m)
}

// PutDrive calls PUT /drives/{drive_id}.
func (c *Client) PutDrive(ctx context.Context, d Drive) error {
	return c.Put(ctx, "/drives/"+d.DriveID, d)
}

// PutNetworkInterface calls PUT /network-interfaces/{iface_id}.
func (c *Client) PutNetworkInterface(ctx context.Context, n NetworkInterface) error {
	return c.Put(ctx, "/network-interfaces/"+n.IfaceID, n)
}

// PutVsock calls PUT /vsock. Firecracker binds the vsock socket now.
func (c *Client) PutVsock(ctx context.Context, v Vsock) error {
	return c.Put(ctx, "/vsock", v)
}

// PutLogger calls PUT /logger.
func (c *Client) PutLogger(ctx context.Context, l Logger) error {
	return c.Put(ctx, "/logger", l)
}

// Action calls PUT /actions with actionType.
func (c *Client) Action(ctx context.Context, actionType string) error {
	return c.Put(ctx, "/actions", InstanceAction{ActionType: actionType})
}

// InstanceStart boots the configured guest.
func (c *Client) InstanceStart(ctx context.Context) error {
	return c.Action(ctx, ActionInstanceStart)
}

// SendCtrlAltDel presses Ctrl+Alt+Del on the guest's keyboard; a guest
// booted with reboot=k then reboots, which makes Firecracker exit.
func (c *Client) SendCtrlAltDel(ctx context.Context) error {
	return c.Action(ctx, ActionSendCtrlAltDel)
}

// Configure sends every request of cfg in order, stopping at the first
// that fails.
func (c *Client) Configure(ctx context.Context, cfg Config) error {
	for _, r := range cfg.Requests() {
		if err := c.do(ctx, r.Method, r.Path, r.Body, nil); err != nil {
			return err
		}
	}
	return nil
}

// do performs one bounded call. A non-2xx answer becomes a FaultError
// carrying Firecracker's fault_message; everything else (the socket is
// gone, the call timed out) is an APIError too, with the cause kept.
func (c *Client) do(ctx context.Context, method, path string, body, out any) error {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()

	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return errcode.Wrap(errcode.APIError, err, "encoding %s %s", method, path)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://localhost"+path, rd)
	if err != nil {
		return errcode.Wrap(errcode.APIError, err, "building %s %s", method, path)
	}
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		code := errcode.APIError
		if errors.Is(err, context.DeadlineExceeded) {
			code = errcode.Timeout
		}
		return errcode.Wrap(code, err, "Firecracker API %s %s on %s", method, path, c.socket)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse))
	if err != nil {
		return errcode.Wrap(errcode.APIError, err, "reading the answer to %s %s", method, path)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return errcode.Wrap(errcode.APIError, &FaultError{Method: method, Path: path, Status: resp.StatusCode, Fault: faultMessage(data)},
			"Firecracker refused a request")
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return errcode.Wrap(errcode.APIError, err, "decoding the answer to %s %s", method, path)
	}
	return nil
}

// faultMessage extracts fault_message from an error body, falling back to
// the (trimmed, bounded) raw body when it is not the JSON Firecracker
// documents.
func faultMessage(data []byte) string {
	var e struct {
		FaultMessage string `json:"fault_message"`
	}
	if json.Unmarshal(data, &e) == nil && e.FaultMessage != "" {
		return e.FaultMessage
	}
	s := strings.TrimSpace(string(data))
	if len(s) > 512 {
		s = s[:512] + "…"
	}
	return s
}
