// Command standin is a Firecracker stand-in for tests, built as
// "firecracker-standin". It is not a VMM: it boots nothing. It accepts
// Firecracker's command line (--api-sock, --id, --config-file and the
// jailer's --start-time-us, --start-time-cpu-us, --parent-cpu-time-us; values
// as separate arguments), serves the API socket per Firecracker's own API
// description (request bodies validated against it, 400 with a
// fault_message on bad input), binds the vsock socket when the vsock device
// is configured, answers "CONNECT <port>\n" with "OK <n>\n" once the
// "guest" has started and listens on the channel port named by
// hyphae.channel= in the boot arguments (then echoes bytes back), writes a
// console to its stdout (or to the file PUT /serial names), and exits when
// sent SendCtrlAltDel, as Firecracker does for a guest booted with reboot=k.
//
// Misbehaviour for tests of deadlines and stop escalation, from the
// environment (the driver passes its environment on):
//
//	FIRECRACKER_STANDIN_SPEC=v1.16.1      validate against the v1.16.1 description
//	FIRECRACKER_STANDIN_SOCKET_DELAY=D    wait D before binding the API socket
//	FIRECRACKER_STANDIN_LISTEN_DELAY=D    the guest listens D after InstanceStart
//	FIRECRACKER_STANDIN_IGNORE_CTRLALTDEL=1  accept SendCtrlAltDel, do nothing
//	FIRECRACKER_STANDIN_IGNORE_SIGTERM=1  ignore SIGTERM
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hyphae-run/hyphae/vmm/firecracker/internal/fcspec"
)

const name = "firecracker-standin"

// args is the parsed command line.
type args struct {
	apiSock, id, configFile string
}

// parseArgs accepts Firecracker's flags the way Firecracker does: each
// value a separate argument. "--flag=value" is refused, as Firecracker
// refuses it, so that a driver passing it is caught here.
func parseArgs(argv []string) (args, error) {
	a := args{id: "anonymous-instance"}
	for i := 0; i < len(argv); i++ {
		flag := argv[i]
		var dst *string
		switch flag {
		case "--api-sock":
			dst = &a.apiSock
		case "--id":
			dst = &a.id
		case "--config-file":
			dst = &a.configFile
		case "--start-time-us", "--start-time-cpu-us", "--parent-cpu-time-us":
			// Passed by the jailer; only used for Firecracker's metrics.
			var ignored string
			dst = &ignored
		default:
			if strings.Contains(flag, "=") {
				return a, fmt.Errorf("found argument %q which wasn't expected (values must be separate arguments)", flag)
			}
			return a, fmt.Errorf("found argument %q which wasn't expected", flag)
		}
		if i+1 >= len(argv) || strings.HasPrefix(argv[i+1], "--") {
			return a, fmt.Errorf("argument %q requires a value", flag)
		}
		i++
		*dst = argv[i]
	}
	if a.apiSock == "" {
		return a, errors.New("--api-sock is required by this stand-in")
	}
	if a.id == "" || len(a.id) > 64 || strings.IndexFunc(a.id, func(r rune) bool {
		return !(r == '-' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9')
	}) >= 0 {
		return a, fmt.Errorf("invalid instance id %q", a.id)
	}
	return a, nil
}

func main() {
	a, err := parseArgs(os.Args[1:])
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
		os.Exit(1)
	}
	if os.Getenv("FIRECRACKER_STANDIN_IGNORE_SIGTERM") == "1" {
		signal.Ignore(syscall.SIGTERM)
	}
	specName := fcspec.Head
	if os.Getenv("FIRECRACKER_STANDIN_SPEC") == "v1.16.1" {
		specName = fcspec.V1_16_1
	}
	spec, err := fcspec.Load(specName)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
		os.Exit(1)
	}
	vm := &machine{
		spec:         spec,
		id:           a.id,
		console:      os.Stdout,
		drives:       map[string]drive{},
		exit:         make(chan struct{}),
		listenDelay:  envDuration("FIRECRACKER_STANDIN_LISTEN_DELAY"),
		ignoreCAD:    os.Getenv("FIRECRACKER_STANDIN_IGNORE_CTRLALTDEL") == "1",
		nextHostPort: 1 << 30,
	}
	vm.say("Firecracker stand-in for tests (API description %s), instance %s", spec.Version, a.id)

	if a.configFile != "" {
		if err := vm.loadConfigFile(a.configFile); err != nil {
			fmt.Fprintf(os.Stderr, "%s: config file %s: %v\n", name, a.configFile, err)
			os.Exit(1)
		}
	}

	time.Sleep(envDuration("FIRECRACKER_STANDIN_SOCKET_DELAY"))
	// Like Firecracker, refuse to take over a path that exists: the
	// caller must remove stale sockets.
	ln, err := net.Listen("unix", a.apiSock)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: failed to open the API socket: %v\n", name, err)
		os.Exit(1)
	}
	srv := &http.Server{Handler: vm, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(ln) }()

	<-vm.exit
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = srv.Shutdown(ctx)
	vm.closeVsock()
	vm.say("reboot: Restarting system")
	os.Exit(0)
}

func envDuration(key string) time.Duration {
	d, err := time.ParseDuration(os.Getenv(key))
	if err != nil {
		return 0
	}
	return d
}

type drive struct {
	DriveID      string `json:"drive_id"`
	PathOnHost   string `json:"path_on_host"`
	IsRootDevice bool   `json:"is_root_device"`
	IsReadOnly   bool   `json:"is_read_only"`
}

type bootSource struct {
	KernelImagePath string `json:"kernel_image_path"`
	BootArgs        string `json:"boot_args"`
}

type vsockDevice struct {
	GuestCID uint32 `json:"guest_cid"`
	UDSPath  string `json:"uds_path"`
}

type machineConfig struct {
	VCPUCount  int `json:"vcpu_count"`
	MemSizeMiB int `json:"mem_size_mib"`
}

type nic struct {
	IfaceID     string `json:"iface_id"`
	HostDevName string `json:"host_dev_name"`
}

// machine is the stand-in's pretend microVM.
type machine struct {
	spec    *fcspec.Spec
	id      string
	console io.Writer

	mu           sync.Mutex
	boot         *bootSource
	mc           machineConfig
	drives       map[string]drive
	nics         []nic
	vsock        *vsockDevice
	vsockLn      net.Listener
	started      bool
	listenAt     time.Time
	nextHostPort uint32
	listenDelay  time.Duration
	ignoreCAD    bool
	exitOnce     sync.Once
	exit         chan struct{}
}

func (m *machine) say(format string, args ...any) {
	fmt.Fprintf(m.console, "[%s] %s\n", name, fmt.Sprintf(format, args...))
}

// apiError is a refusal, answered with 400 and a fault_message.
type apiError string

func (e apiError) Error() string { return string(e) }

func fault(format string, args ...any) error { return apiError(fmt.Sprintf(format, args...)) }

func (m *machine) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodGet && r.URL.Path == "/" {
		m.mu.Lock()
		state := "Not started"
		if m.started {
			state = "Running"
		}
		m.mu.Unlock()
		writeJSON(w, http.StatusOK, map[string]string{
			"app_name": "Firecracker", "id": m.id, "state": state, "vmm_version": m.spec.Version + "-standin",
		})
		return
	}
	if r.Method != http.MethodPut {
		writeFault(w, fmt.Sprintf("Invalid request method and/or path: %s %s.", r.Method, r.URL.Path))
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		writeFault(w, "reading the body: "+err.Error())
		return
	}
	if _, err := m.spec.RequestSchema(r.Method, r.URL.Path); err != nil {
		writeFault(w, fmt.Sprintf("Invalid request method and/or path: %s %s.", r.Method, r.URL.Path))
		return
	}
	if err := m.spec.ValidateRequest(r.Method, r.URL.Path, body); err != nil {
		writeFault(w, "An error occurred when deserializing the json body of a request: "+err.Error())
		return
	}
	if err := m.apply(r.URL.Path, body); err != nil {
		writeFault(w, err.Error())
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// apply performs one validated PUT.
func (m *machine) apply(path string, body []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if path == "/actions" {
		var a struct {
			ActionType string `json:"action_type"`
		}
		_ = json.Unmarshal(body, &a)
		return m.action(a.ActionType)
	}
	if m.started {
		return fault("The requested operation is not supported after starting the microVM.")
	}
	seg := strings.Split(strings.TrimPrefix(path, "/"), "/")
	switch seg[0] {
	case "boot-source":
		var b bootSource
		_ = json.Unmarshal(body, &b)
		if err := checkFile(b.KernelImagePath, false); err != nil {
			return fault("Cannot open the kernel image: %v", err)
		}
		m.boot = &b
	case "machine-config":
		_ = json.Unmarshal(body, &m.mc)
	case "drives":
		var d drive
		_ = json.Unmarshal(body, &d)
		if d.DriveID != seg[1] {
			return fault("The id from the path [%s] does not match the id from the body [%s]!", seg[1], d.DriveID)
		}
		if d.IsRootDevice {
			for id, o := range m.drives {
				if o.IsRootDevice && id != d.DriveID {
					return fault("A root block device already exists!")
				}
			}
		}
		if err := checkFile(d.PathOnHost, !d.IsReadOnly); err != nil {
			return fault("Unable to create the block device: %v", err)
		}
		m.drives[d.DriveID] = d
	case "network-interfaces":
		// No TAP is opened: the stand-in has no data path.
		var n nic
		_ = json.Unmarshal(body, &n)
		if n.IfaceID != seg[1] {
			return fault("The id from the path [%s] does not match the id from the body [%s]!", seg[1], n.IfaceID)
		}
		m.nics = append(m.nics, n)
	case "vsock":
		var v vsockDevice
		_ = json.Unmarshal(body, &v)
		if m.vsockLn != nil {
			m.vsockLn.Close()
			m.vsockLn = nil
		}
		// Firecracker binds the socket now and fails when the path is
		// taken.
		ln, err := net.Listen("unix", v.UDSPath)
		if err != nil {
			return fault("Cannot create vsock device: %v", err)
		}
		m.vsock, m.vsockLn = &v, ln
		go m.serveVsock(ln)
	case "serial":
		// Firecracker (v1.14+) writes the guest console to this file
		// instead of its stdout, which the jailer's --daemonize points
		// at /dev/null.
		var sd struct {
			SerialOutPath string `json:"serial_out_path"`
		}
		_ = json.Unmarshal(body, &sd)
		f, err := os.OpenFile(sd.SerialOutPath, os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			return fault("Failed to open the serial output file: %v", err)
		}
		m.console = f
	case "logger":
		var l struct {
			LogPath string `json:"log_path"`
		}
		_ = json.Unmarshal(body, &l)
		// Firecracker opens the log without creating it.
		if l.LogPath != "" {
			if err := checkFile(l.LogPath, true); err != nil {
				return fault("Failed to open the log file: %v", err)
			}
		}
	default:
		return fault("The stand-in does not implement PUT %s.", path)
	}
	return nil
}

// checkFile opens path the way Firecracker would (read-write when
// writable), failing as it would when that is not possible.
func checkFile(path string, writable bool) error {
	flag := os.O_RDONLY
	if writable {
		flag = os.O_RDWR
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return err
	}
	return f.Close()
}

// action runs an InstanceActionInfo; m.mu is held.
func (m *machine) action(kind string) error {
	switch kind {
	case "InstanceStart":
		if m.started {
			return fault("The requested operation is not supported after starting the microVM.")
		}
		if m.boot == nil {
			return fault("Cannot start microvm without kernel configuration.")
		}
		m.started = true
		m.listenAt = time.Now().Add(m.listenDelay)
		m.say("booting %s (%d vCPUs, %d MiB) with %q", m.boot.KernelImagePath, m.mc.VCPUCount, m.mc.MemSizeMiB, m.boot.BootArgs)
		for _, d := range m.drives {
			m.say("drive %s: %s (root=%v read_only=%v)", d.DriveID, d.PathOnHost, d.IsRootDevice, d.IsReadOnly)
		}
		return nil
	case "SendCtrlAltDel":
		if !m.started {
			return fault("The requested operation is not supported before starting the microVM.")
		}
		if m.ignoreCAD {
			m.say("Ctrl+Alt+Del ignored")
			return nil
		}
		m.say("Ctrl+Alt+Del: rebooting")
		m.exitOnce.Do(func() { close(m.exit) })
		return nil
	case "FlushMetrics":
		return fault("The metrics system is not initialized.")
	}
	return fault("unknown action %q", kind)
}

// loadConfigFile applies a --config-file document and starts the VM, as
// Firecracker does. Unknown top-level keys are ignored, as Firecracker
// ignores them; the sections it knows are validated.
func (m *machine) loadConfigFile(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var doc map[string]json.RawMessage
	if err := json.Unmarshal(data, &doc); err != nil {
		return err
	}
	if err := m.spec.ValidateConfigFile(data); err != nil {
		return err
	}
	put := func(path string, raw json.RawMessage) error {
		if raw == nil {
			return nil
		}
		return m.apply(path, raw)
	}
	for _, step := range []struct {
		path string
		key  string
	}{{"/logger", "logger"}, {"/boot-source", "boot-source"}, {"/machine-config", "machine-config"}} {
		if err := put(step.path, doc[step.key]); err != nil {
			return err
		}
	}
	var drives, nics []json.RawMessage
	_ = json.Unmarshal(doc["drives"], &drives)
	_ = json.Unmarshal(doc["network-interfaces"], &nics)
	for _, d := range drives {
		var id struct {
			DriveID string `json:"drive_id"`
		}
		_ = json.Unmarshal(d, &id)
		if err := put("/drives/"+id.DriveID, d); err != nil {
			return err
		}
	}
	for _, n := range nics {
		var id struct {
			IfaceID string `json:"iface_id"`
		}
		_ = json.Unmarshal(n, &id)
		if err := put("/network-interfaces/"+id.IfaceID, n); err != nil {
			return err
		}
	}
	if err := put("/vsock", doc["vsock"]); err != nil {
		return err
	}
	return m.apply("/actions", json.RawMessage(`{"action_type":"InstanceStart"}`))
}

func (m *machine) closeVsock() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.vsockLn != nil {
		m.vsockLn.Close()
	}
}

// channelPort is the guest port the "guest" listens on: hyphae.channel=
// vsock:<port> from the boot arguments. m.mu is held.
func (m *machine) channelPort() (uint32, bool) {
	if m.boot == nil {
		return 0, false
	}
	for _, tok := range strings.Fields(m.boot.BootArgs) {
		if v, ok := strings.CutPrefix(tok, "hyphae.channel=vsock:"); ok {
			p, err := strconv.ParseUint(v, 10, 32)
			return uint32(p), err == nil
		}
	}
	return 0, false
}

func (m *machine) serveVsock(ln net.Listener) {
	for {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		go m.handleVsock(conn)
	}
}

// handleVsock runs Firecracker's side of a host-initiated connection: the
// request line, then either "OK <n>\n" and a byte stream (here an echo),
// or a closed connection when no guest socket listens on that port.
func (m *machine) handleVsock(conn net.Conn) {
	defer conn.Close()
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 64)
	n, err := conn.Read(buf)
	if err != nil {
		return
	}
	line := string(buf[:n])
	req, ok := strings.CutSuffix(line, "\n")
	if !ok {
		// Firecracker takes the request from one read: a request split
		// over several writes is malformed.
		m.say("vsock: malformed request %q", line)
		return
	}
	portStr, ok := strings.CutPrefix(req, "CONNECT ")
	port, err := strconv.ParseUint(portStr, 10, 32)
	if !ok || err != nil {
		m.say("vsock: malformed request %q", line)
		return
	}
	m.mu.Lock()
	listening, ok := m.channelPort()
	ready := m.started && ok && uint32(port) == listening && !time.Now().Before(m.listenAt)
	hostPort := m.nextHostPort
	m.nextHostPort++
	m.mu.Unlock()
	if !ready {
		// The guest reset the connection: Firecracker just closes ours.
		return
	}
	_ = conn.SetReadDeadline(time.Time{})
	if _, err := fmt.Fprintf(conn, "OK %d\n", hostPort); err != nil {
		return
	}
	_, _ = io.Copy(conn, conn)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeFault(w http.ResponseWriter, msg string) {
	writeJSON(w, http.StatusBadRequest, map[string]string{"fault_message": msg})
}
