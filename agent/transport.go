package agent

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/protocol"
)

// DefaultChannel is the transport used when the kernel command line names
// none: Firecracker's vsock on the agent port (protocol.AgentVsockPort).
const DefaultChannel = "vsock:1024"

// closeLinger bounds how long Close waits for the host to read the last
// bytes before the guest reboots.
const closeLinger = 2 * time.Second

// Open opens the host channel described by spec, the value of the
// hyphae.channel kernel command-line token (guest.CmdlineChannel):
// "vsock:<port>" listens on AF_VSOCK and accepts one host connection;
// "serial:<device>" opens a serial port in raw mode and writes
// protocol.EmptyFrame to tell the host it is listening;
// "virtio-port:<name>" opens the virtio-serial port of that name (see
// VirtioPortDevice), waits for the host to connect to it and writes the
// same readiness frame;
// "fd:<n>" uses the stream socket inherited as file descriptor n (the
// gateway's mock mode, which runs the agent as a host process over a
// socketpair: the host's end exists before the agent starts, so nothing is
// lost and no readiness frame is sent). It blocks until the channel is
// usable or ctx ends.
func Open(ctx context.Context, spec string) (io.ReadWriteCloser, error) {
	kind, arg, _ := strings.Cut(spec, ":")
	switch kind {
	case "vsock":
		port, err := strconv.ParseUint(arg, 10, 32)
		if err != nil {
			return nil, errcode.New(errcode.InvalidArgument, "channel %q: vsock port must be a number", spec)
		}
		return acceptVsock(ctx, uint32(port))
	case "serial":
		if !strings.HasPrefix(arg, "/") {
			return nil, errcode.New(errcode.InvalidArgument, "channel %q: serial device must be an absolute path", spec)
		}
		return openSerial(arg)
	case "virtio-port":
		dev, err := VirtioPortDevice(ctx, arg)
		if err != nil {
			return nil, err
		}
		return openVirtioPort(ctx, dev)
	case "fd":
		n, err := strconv.Atoi(arg)
		if err != nil || n < 3 {
			return nil, errcode.New(errcode.InvalidArgument, "channel %q: want fd:<n> with n ≥ 3 (0-2 are stdio)", spec)
		}
		return openFD(n)
	default:
		return nil, errcode.New(errcode.InvalidArgument, "channel %q: want vsock:<port>, serial:<device>, virtio-port:<name> or fd:<n>", spec)
	}
}

// acceptVsock listens on the port for any CID and accepts one connection.
// The listening socket goes through the runtime poller so that ctx can
// interrupt the wait.
func acceptVsock(ctx context.Context, port uint32) (io.ReadWriteCloser, error) {
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, (&errcode.Error{Code: errcode.ChannelFailed, Message: "creating an AF_VSOCK socket", Err: err}).
			WithHint("the guest kernel needs CONFIG_VIRTIO_VSOCKETS")
	}
	lf := os.NewFile(uintptr(fd), "vsock-listener")
	defer lf.Close()
	if err := unix.Bind(fd, &unix.SockaddrVM{CID: unix.VMADDR_CID_ANY, Port: port}); err != nil {
		return nil, errcode.Wrap(errcode.ChannelFailed, err, "binding vsock port %d", port)
	}
	if err := unix.Listen(fd, 1); err != nil {
		return nil, errcode.Wrap(errcode.ChannelFailed, err, "listening on vsock port %d", port)
	}
	stop := context.AfterFunc(ctx, func() { lf.Close() })
	defer stop()
	rc, err := lf.SyscallConn()
	if err != nil {
		return nil, errcode.Wrap(errcode.ChannelFailed, err, "vsock listener")
	}
	var nfd int
	var aerr error
	err = rc.Read(func(fd uintptr) bool {
		nfd, _, aerr = unix.Accept4(int(fd), unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
		return aerr != unix.EAGAIN
	})
	if err == nil {
		err = aerr
	}
	if err != nil {
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return nil, errcode.Wrap(errcode.ChannelFailed, err, "waiting for the host on vsock port %d", port)
	}
	return &streamFile{File: os.NewFile(uintptr(nfd), "vsock"), socket: true, lingers: true}, nil
}

// openSerial opens a serial port in raw mode: no echo, no line
// discipline, no output processing, 8-bit characters.
func openSerial(dev string) (io.ReadWriteCloser, error) {
	f, rc, err := openDevice(dev)
	if err != nil {
		return nil, err
	}
	var terr error
	if err := rc.Control(func(fd uintptr) { terr = makeRaw(int(fd)) }); err != nil {
		terr = err
	}
	if terr != nil {
		f.Close()
		return nil, errcode.Wrap(errcode.ChannelFailed, terr, "putting %s in raw mode", dev)
	}
	// Bytes the host sends before the port is open are lost, so the host
	// waits for this empty envelope before it sends the Request.
	if err := announce(f); err != nil {
		return nil, err
	}
	return &streamFile{File: f, tty: true}, nil
}

// openDevice opens a channel device non-blocking (so that deadlines work
// on it) and without making it the controlling terminal.
func openDevice(dev string) (*os.File, syscall.RawConn, error) {
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_NOCTTY|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, nil, errcode.Wrap(errcode.ChannelFailed, err, "opening %s", dev)
	}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, nil, errcode.Wrap(errcode.ChannelFailed, err, "opening %s", dev)
	}
	return f, rc, nil
}

// announce writes the readiness frame (protocol.EmptyFrame) the host waits
// for on a device channel; on failure it closes f.
func announce(f *os.File) error {
	if _, err := f.WriteString(protocol.EmptyFrame); err != nil {
		f.Close()
		return errcode.Wrap(errcode.ChannelFailed, err, "announcing readiness on %s", f.Name())
	}
	return nil
}

// virtioPortsDir lists the guest's virtio-serial ports, each with its
// name as the host gave it.
const virtioPortsDir = "/sys/class/virtio-ports"

// portPollInterval paces the waits for a virtio port to be named and for
// the host to connect to it, both of which the guest learns from control
// messages it cannot block on.
const portPollInterval = 10 * time.Millisecond

// VirtioPortDevice returns the device node (/dev/vportNpM) of the
// virtio-serial port the host named name. The node's numbers depend on
// probe order, the name does not. The name arrives in a control message
// after the port appears, so it waits for it until ctx ends.
func VirtioPortDevice(ctx context.Context, name string) (string, error) {
	return findVirtioPort(ctx, virtioPortsDir, name)
}

// findVirtioPort is VirtioPortDevice over a sysfs directory laid out like
// virtioPortsDir.
func findVirtioPort(ctx context.Context, dir, name string) (string, error) {
	if name == "" || strings.ContainsAny(name, "/\n") {
		return "", errcode.New(errcode.InvalidArgument, "virtio port name %q", name)
	}
	for {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			b, err := os.ReadFile(filepath.Join(dir, e.Name(), "name"))
			if err == nil && strings.TrimSpace(string(b)) == name {
				return "/dev/" + e.Name(), nil
			}
		}
		select {
		case <-ctx.Done():
			return "", (&errcode.Error{Code: errcode.ChannelFailed, Message: "no virtio-serial port named " + name + " in " + dir, Err: ctx.Err()}).
				WithHint("the guest kernel needs CONFIG_VIRTIO_CONSOLE and the VMM a virtserialport of that name")
		case <-time.After(portPollInterval):
		}
	}
}

// openVirtioPort opens a virtio-serial port once the host is connected to
// it. Until then the port reads as end-of-file and polls as hung up, so
// the readiness frame, written after, cannot be mistaken for a closed
// channel.
func openVirtioPort(ctx context.Context, dev string) (io.ReadWriteCloser, error) {
	f, rc, err := openDevice(dev)
	if err != nil {
		return nil, err
	}
	for {
		var revents int16
		var perr error
		if err := rc.Control(func(fd uintptr) {
			pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
			_, perr = unix.Poll(pfd, 0)
			revents = pfd[0].Revents
		}); err != nil {
			perr = err
		}
		if perr != nil && !errors.Is(perr, unix.EINTR) {
			f.Close()
			return nil, errcode.Wrap(errcode.ChannelFailed, perr, "polling %s", dev)
		}
		if revents&unix.POLLOUT != 0 && revents&unix.POLLHUP == 0 {
			break
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, errcode.Wrap(errcode.ChannelFailed, ctx.Err(), "waiting for the host to connect to %s", dev)
		case <-time.After(portPollInterval):
		}
	}
	if err := announce(f); err != nil {
		return nil, err
	}
	// Like a socket, the port shows the host's close as end-of-file, so
	// Close can wait for the host to have read Done.
	return &streamFile{File: f, lingers: true}, nil
}

// openFD adopts an inherited stream socket. It is marked close-on-exec
// first, so that the bundle (a child of the agent) never holds the host
// channel, and made non-blocking so that deadlines work on it.
func openFD(n int) (io.ReadWriteCloser, error) {
	st := unix.Stat_t{}
	if err := unix.Fstat(n, &st); err != nil {
		return nil, errcode.Wrap(errcode.ChannelFailed, err, "channel fd %d", n)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return nil, errcode.New(errcode.ChannelFailed, "channel fd %d is not a socket", n)
	}
	unix.CloseOnExec(n)
	if err := unix.SetNonblock(n, true); err != nil {
		return nil, errcode.Wrap(errcode.ChannelFailed, err, "channel fd %d", n)
	}
	return &streamFile{File: os.NewFile(uintptr(n), "channel"), socket: true, lingers: true}, nil
}

// makeRaw is cfmakeraw(3).
func makeRaw(fd int) error {
	t, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return err
	}
	t.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON | unix.IXOFF
	t.Oflag &^= unix.OPOST
	t.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	t.Cflag &^= unix.CSIZE | unix.PARENB
	t.Cflag |= unix.CS8 | unix.CREAD | unix.CLOCAL
	t.Cc[unix.VMIN] = 1
	t.Cc[unix.VTIME] = 0
	if err := unix.IoctlSetTermios(fd, unix.TCSETS, t); err != nil {
		return err
	}
	// Drop whatever arrived before raw mode took effect.
	return unix.IoctlSetInt(fd, unix.TCFLSH, unix.TCIOFLUSH)
}

// streamFile is an open channel. Close makes sure the last bytes written
// (Done) leave the guest before it reboots.
type streamFile struct {
	*os.File
	socket, tty bool
	// lingers: the host's close reads as end-of-file (sockets, virtio
	// ports; a UART has no such signal).
	lingers bool
}

func (s *streamFile) Close() error {
	if rc, err := s.SyscallConn(); err == nil {
		_ = rc.Control(func(fd uintptr) {
			switch {
			case s.tty:
				_ = unix.IoctlSetInt(int(fd), unix.TCSBRK, 1) // tcdrain
			case s.socket:
				_ = unix.Shutdown(int(fd), unix.SHUT_WR)
			}
		})
	}
	if s.lingers {
		// Wait for the host to close its side: it has then read Done.
		_ = s.SetReadDeadline(time.Now().Add(closeLinger))
		_, _ = io.Copy(io.Discard, io.LimitReader(s.File, protocol.MaxFrameSize))
	}
	return s.File.Close()
}
