// Package bundle lets a bundle written in Go send events to the
// dimension-agent that runs it (ARCHITECTURE.md §3.3). Events travel over
// the Unix socket named by DIMENSION_EVENTS_SOCK and reach the run's event
// stream in the order they were sent.
//
// The package-level functions use one client shared by the whole program,
// the way net/http has DefaultClient; NewClient gives a separate one.
// Outside dimension (no DIMENSION_EVENTS_SOCK) every Send reports
// ErrNotConnected, so a bundle can still run on its own.
package bundle

import (
	"encoding/binary"
	"encoding/json"
	"net"
	"os"
	"sync"

	"github.com/hyphae-run/hyphae/errcode"
)

// EnvEventsSocket names the events socket in the bundle's environment.
const EnvEventsSocket = "DIMENSION_EVENTS_SOCK"

// MaxFrame is the largest JSON document one event may encode to.
const MaxFrame = 262144

// ErrNotConnected is returned when there is no agent to send to.
var ErrNotConnected = errcode.New(errcode.ChannelFailed, "not connected to the dimension events socket")

// Event is one event.
type Event struct {
	// Kind names the event ("" = "bundle").
	Kind string
	// ContentType describes Body ("" = "application/json").
	ContentType string
	// Body is the event body. A string (or []byte) is delivered as its raw
	// bytes; json.RawMessage as that JSON; anything else as its JSON
	// encoding.
	Body any
	// Attrs are free-form string attributes.
	Attrs map[string]string
}

// wireEvent is the frame's JSON shape.
type wireEvent struct {
	Kind        string            `json:"kind,omitempty"`
	ContentType string            `json:"contentType,omitempty"`
	Body        any               `json:"body"`
	Attrs       map[string]string `json:"attrs,omitempty"`
}

// Client sends events over one connection, reused across calls and
// redialled once after a failure. It is safe for concurrent use.
type Client struct {
	path string

	mu   sync.Mutex
	conn net.Conn
}

// NewClient returns a client of the socket at path ("" = not connected).
// It dials lazily.
func NewClient(path string) *Client { return &Client{path: path} }

var defaultClient = sync.OnceValue(func() *Client { return NewClient(os.Getenv(EnvEventsSocket)) })

// Send sends an event of kind with body and attrs on the shared client.
func Send(kind string, body any, attrs map[string]string) error {
	return defaultClient().SendEvent(Event{Kind: kind, Body: body, Attrs: attrs})
}

// SendMessage sends body as an event of the default kind ("bundle").
func SendMessage(body any) error { return defaultClient().SendEvent(Event{Body: body}) }

// SendEvent sends ev on the shared client.
func SendEvent(ev Event) error { return defaultClient().SendEvent(ev) }

// IsConnected reports whether the shared client can reach the agent.
func IsConnected() bool { return defaultClient().IsConnected() }

// Send sends an event of kind with body and attrs.
func (c *Client) Send(kind string, body any, attrs map[string]string) error {
	return c.SendEvent(Event{Kind: kind, Body: body, Attrs: attrs})
}

// SendEvent encodes ev as one frame and writes it. It blocks while the
// agent applies backpressure.
func (c *Client) SendEvent(ev Event) error {
	frame, err := encode(ev)
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.path == "" {
		return ErrNotConnected
	}
	// A connection the agent closed (after a frame it refused) fails on
	// write: redial once and resend.
	for attempt := 0; ; attempt++ {
		if err := c.dialLocked(); err != nil {
			return err
		}
		_, err := c.conn.Write(frame)
		if err == nil {
			return nil
		}
		c.conn.Close()
		c.conn = nil
		if attempt > 0 {
			return errcode.Wrap(errcode.ChannelFailed, err, "sending an event")
		}
	}
}

// IsConnected reports whether the client holds, or can open, a connection
// to the agent.
func (c *Client) IsConnected() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.path != "" && c.dialLocked() == nil
}

// Close closes the connection; a later Send dials again.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn == nil {
		return nil
	}
	err := c.conn.Close()
	c.conn = nil
	return err
}

func (c *Client) dialLocked() error {
	if c.conn != nil {
		return nil
	}
	conn, err := net.Dial("unix", c.path)
	if err != nil {
		return errcode.Wrap(errcode.ChannelFailed, err, "connecting to the events socket %s", c.path)
	}
	c.conn = conn
	return nil
}

// encode renders ev as a frame: little-endian u32 length, then JSON.
func encode(ev Event) ([]byte, error) {
	w := wireEvent{Kind: ev.Kind, ContentType: ev.ContentType, Body: ev.Body, Attrs: ev.Attrs}
	switch b := ev.Body.(type) {
	case nil:
		return nil, errcode.New(errcode.InvalidArgument, "an event needs a body")
	case []byte:
		w.Body = string(b)
	case json.RawMessage:
		if !json.Valid(b) {
			return nil, errcode.New(errcode.InvalidArgument, "event body is not valid JSON")
		}
	}
	doc, err := json.Marshal(w)
	if err != nil {
		return nil, errcode.Wrap(errcode.InvalidArgument, err, "event body cannot be encoded as JSON")
	}
	if len(doc) > MaxFrame {
		return nil, errcode.New(errcode.SizeLimit, "event encodes to %d bytes, over the %d-byte frame limit", len(doc), MaxFrame)
	}
	frame := make([]byte, 4, 4+len(doc))
	binary.LittleEndian.PutUint32(frame, uint32(len(doc)))
	return append(frame, doc...), nil
}
