package agent

import (
	"context"
	"errors"
	"io"
	"os"
	"strconv"
	"strings"
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
// "serial:<device>" opens a serial port (or virtio-serial port) in raw
// mode and writes protocol.EmptyFrame to tell the host it is listening;
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
	case "fd":
		n, err := strconv.Atoi(arg)
		if err != nil || n < 3 {
			return nil, errcode.New(errcode.InvalidArgument, "channel %q: want fd:<n> with n ≥ 3 (0-2 are stdio)", spec)
		}
		return openFD(n)
	default:
		return nil, errcode.New(errcode.InvalidArgument, "channel %q: want vsock:<port>, serial:<device> or fd:<n>", spec)
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
	return &streamFile{File: os.NewFile(uintptr(nfd), "vsock"), socket: true}, nil
}

// openSerial opens dev and puts it in raw mode: no echo, no line
// discipline, no output processing, 8-bit characters. A device that is not
// a tty (a virtio-serial port) is a byte stream already.
func openSerial(dev string) (io.ReadWriteCloser, error) {
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_NOCTTY|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, errcode.Wrap(errcode.ChannelFailed, err, "opening %s", dev)
	}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, errcode.Wrap(errcode.ChannelFailed, err, "opening %s", dev)
	}
	var terr error
	if err := rc.Control(func(fd uintptr) { terr = makeRaw(int(fd)) }); err != nil {
		terr = err
	}
	if terr != nil && !errors.Is(terr, unix.ENOTTY) {
		f.Close()
		return nil, errcode.Wrap(errcode.ChannelFailed, terr, "putting %s in raw mode", dev)
	}
	// Bytes the host sends before the port is open are lost, so the host
	// waits for this empty envelope before it sends the Request.
	if _, err := f.WriteString(protocol.EmptyFrame); err != nil {
		f.Close()
		return nil, errcode.Wrap(errcode.ChannelFailed, err, "announcing readiness on %s", dev)
	}
	return &streamFile{File: f, tty: terr == nil}, nil
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
	return &streamFile{File: os.NewFile(uintptr(n), "channel"), socket: true}, nil
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
	if s.socket {
		// Wait for the host to close its side: it has then read Done.
		_ = s.SetReadDeadline(time.Now().Add(closeLinger))
		_, _ = io.Copy(io.Discard, io.LimitReader(s.File, protocol.MaxFrameSize))
	}
	return s.File.Close()
}
