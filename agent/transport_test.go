package agent

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/protocol"
	"github.com/hyphae-run/hyphae/protocol/pb"
)

// openPTY returns the master side and the path of a fresh pseudo-terminal,
// which stands in for the guest's serial port.
func openPTY(t *testing.T) (*os.File, string) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		testenv.Unavailable(t, "no /dev/ptmx: "+err.Error())
	}
	t.Cleanup(func() { m.Close() })
	rc, _ := m.SyscallConn()
	var n int
	var perr error
	rc.Control(func(fd uintptr) {
		if perr = unix.IoctlSetPointerInt(int(fd), unix.TIOCSPTLCK, 0); perr == nil {
			n, perr = unix.IoctlGetInt(int(fd), unix.TIOCGPTN)
		}
	})
	if perr != nil {
		t.Fatal(perr)
	}
	return m, "/dev/pts/" + strconv.Itoa(n)
}

// Over a serial line in raw mode every byte value survives both ways: no
// CR/NL mapping, no signals from ^C, no flow control, no echo.
func TestSerialChannelIsRaw(t *testing.T) {
	master, dev := openPTY(t)
	ch, err := Open(context.Background(), "serial:"+dev)
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	sf := ch.(*streamFile)
	rc, _ := sf.SyscallConn()
	rc.Control(func(fd uintptr) {
		tio, err := unix.IoctlGetTermios(int(fd), unix.TCGETS)
		if err != nil {
			t.Fatal(err)
		}
		if tio.Lflag&(unix.ECHO|unix.ICANON|unix.ISIG) != 0 || tio.Oflag&unix.OPOST != 0 || tio.Iflag&(unix.ICRNL|unix.IXON) != 0 || tio.Cflag&unix.CSIZE != unix.CS8 {
			t.Fatalf("termios not raw: %+v", tio)
		}
	})

	payload := make([]byte, 0, 512)
	for range 2 {
		for b := range 256 {
			payload = append(payload, byte(b))
		}
	}
	res := make(chan runResult, 1)
	go func() {
		code, err := Run(context.Background(), ch, Config{Program: selfProgram(t, "echo"), EventsSocket: socketPath(t), Logger: testLogger(t)})
		res <- runResult{code, err}
	}()
	w, r := protocol.NewWriter(master), protocol.NewReader(master)
	if ready, err := r.ReadEnvelope(); err != nil || !protocol.IsEmpty(ready) {
		t.Fatalf("first frame %v, %v; want the empty readiness frame", ready, err)
	}
	if err := w.WriteEnvelope(&pb.Envelope{RequestId: "s", Payload: &pb.Envelope_Request{Request: &pb.Request{Payload: payload}}}); err != nil {
		t.Fatal(err)
	}
	var stdout []byte
	for {
		env, err := r.ReadEnvelope()
		if err != nil {
			t.Fatal(err)
		}
		if o := env.GetOutbound(); o.GetKind() == KindStdoutFinal {
			stdout = o.GetBody()
		}
		if env.GetDone() != nil {
			break
		}
	}
	if string(stdout) != string(payload) {
		t.Fatalf("payload came back as %d bytes, want all 512 byte values unchanged", len(stdout))
	}
	if rr := <-res; rr.code != 0 || rr.err != nil {
		t.Fatalf("Run = %d, %v", rr.code, rr.err)
	}
}

func TestOpenRejectsBadSpecs(t *testing.T) {
	for _, spec := range []string{"", "tcp:1", "vsock:", "vsock:x", "serial:ttyS1", "serial:/nonexistent/tty"} {
		t.Run(spec, func(t *testing.T) {
			ch, err := Open(context.Background(), spec)
			if err == nil {
				ch.Close()
				t.Fatal("accepted")
			}
			if errcode.CodeOf(err) == "" {
				t.Fatalf("uncoded error %v", err)
			}
		})
	}
}

// The vsock listener is interruptible: cancelling the context ends the
// wait for the host (no vsock transport is needed for that).
func TestVsockAcceptHonoursContext(t *testing.T) {
	if fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM, 0); err != nil {
		testenv.Optional(t, "AF_VSOCK unavailable on this host: "+err.Error())
	} else {
		unix.Close(fd)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := Open(ctx, "vsock:40123"); !errcode.HasCode(err, errcode.ChannelFailed) {
		t.Fatalf("err = %v, want ChannelFailed", err)
	}
}

// An inherited socket (fd:<n>) carries a whole run; the descriptor is made
// close-on-exec so that the bundle cannot hold the host channel.
func TestFDChannel(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	host := os.NewFile(uintptr(fds[0]), "host")
	defer host.Close()
	// Clear CLOEXEC as an inherited descriptor would have it.
	if _, err := unix.FcntlInt(uintptr(fds[1]), unix.F_SETFD, 0); err != nil {
		t.Fatal(err)
	}
	ch, err := Open(context.Background(), "fd:"+strconv.Itoa(fds[1]))
	if err != nil {
		t.Fatal(err)
	}
	if flags, err := unix.FcntlInt(uintptr(fds[1]), unix.F_GETFD, 0); err != nil || flags&unix.FD_CLOEXEC == 0 {
		t.Fatalf("fd flags %#x, %v: want FD_CLOEXEC", flags, err)
	}
	res := make(chan runResult, 1)
	go func() {
		code, err := Run(context.Background(), ch, Config{Program: selfProgram(t, "echo"), EventsSocket: socketPath(t), Logger: testLogger(t)})
		ch.Close()
		res <- runResult{code, err}
	}()
	w, r := protocol.NewWriter(host), protocol.NewReader(host)
	if err := w.WriteEnvelope(&pb.Envelope{RequestId: "f", Payload: &pb.Envelope_Request{Request: &pb.Request{Payload: []byte("over fd")}}}); err != nil {
		t.Fatal(err)
	}
	var stdout string
	for {
		env, err := r.ReadEnvelope()
		if err != nil {
			t.Fatalf("reading: %v", err)
		}
		if o := env.GetOutbound(); o.GetKind() == KindStdoutFinal {
			stdout = string(o.GetBody())
		}
		if d := env.GetDone(); d != nil {
			if d.GetExitCode() != 0 || stdout != "over fd" {
				t.Fatalf("done %v, stdout %q", d, stdout)
			}
			break
		}
	}
	host.Close()
	if rr := <-res; rr.err != nil || rr.code != 0 {
		t.Fatalf("Run = %d, %v", rr.code, rr.err)
	}
}

func TestFDChannelRefusals(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "notsock")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, spec := range []string{"fd:", "fd:x", "fd:1", "fd:99999", "fd:" + strconv.Itoa(int(f.Fd()))} {
		if _, err := Open(context.Background(), spec); err == nil {
			t.Errorf("Open(%q) succeeded", spec)
		} else if !errcode.HasCode(err, errcode.InvalidArgument) && !errcode.HasCode(err, errcode.ChannelFailed) {
			t.Errorf("Open(%q) = %v, want a coded error", spec, err)
		}
	}
}

// TestFindVirtioPort finds a port by the name the host gave it, waiting
// for the name to arrive, as it does in a guest where the name comes in a
// control message after the port appears.
func TestFindVirtioPort(t *testing.T) {
	dir := t.TempDir()
	for port, name := range map[string]string{"vport0p1": "org.qemu.guest_agent.0", "vport1p1": ""} {
		if err := os.MkdirAll(filepath.Join(dir, port), 0o755); err != nil {
			t.Fatal(err)
		}
		if name != "" {
			if err := os.WriteFile(filepath.Join(dir, port, "name"), []byte(name+"\n"), 0o444); err != nil {
				t.Fatal(err)
			}
		}
	}
	go func() {
		time.Sleep(50 * time.Millisecond)
		_ = os.WriteFile(filepath.Join(dir, "vport1p1", "name"), []byte("org.hyphae.channel\n"), 0o444)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if got, err := findVirtioPort(ctx, dir, "org.hyphae.channel"); err != nil || got != "/dev/vport1p1" {
		t.Errorf("findVirtioPort = %q, %v", got, err)
	}
	short, cancel2 := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel2()
	if _, err := findVirtioPort(short, dir, "absent"); !errcode.HasCode(err, errcode.ChannelFailed) {
		t.Errorf("absent port: %v", err)
	}
	for _, bad := range []string{"", "../x", "a\nb"} {
		if _, err := findVirtioPort(ctx, dir, bad); !errcode.HasCode(err, errcode.InvalidArgument) {
			t.Errorf("name %q: %v", bad, err)
		}
	}
}
