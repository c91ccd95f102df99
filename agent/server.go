package agent

import (
	"errors"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/protocol/pb"
)

// eventServer serves the events socket: several connections at once, each
// read frame by frame in order.
type eventServer struct {
	s    *session
	path string
	ln   *net.UnixListener
	sem  chan struct{} // bounds concurrent connections

	mu    sync.Mutex
	conns map[net.Conn]*connProgress
	wg    sync.WaitGroup // accept loop and connection handlers
}

// connProgress counts one connection's bytes: taken from the socket, and
// relayed (whole frames, good or bad). Together with the socket's queue
// length they tell whether everything the bundle has written so far has
// been relayed (see settle).
type connProgress struct {
	net.Conn
	read, relayed atomic.Int64
	closed        atomic.Bool // its handler has returned: nothing more will be relayed
}

func (c *connProgress) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.read.Add(int64(n))
	return n, err
}

// settleTimeout bounds how long a stderr line waits for event frames the
// bundle wrote before it. Under backpressure from a slow host relaying
// those frames takes a while, so the bound is generous; only a bundle that
// stalls mid-frame makes its own stderr wait that long.
const settleTimeout = 2 * time.Second

// settle waits, up to settleTimeout, until the event bytes the bundle had
// written when settle was called have been relayed. The events socket and
// the stderr pipe are separate streams that the agent reads concurrently; a
// bundle that sends an event and then writes to stderr has put the event's
// bytes in the socket before the stderr line exists, so settling before
// relaying a line keeps such an event ahead of it. Events written later do
// not hold the line back.
func (srv *eventServer) settle() {
	deadline := time.Now().Add(settleTimeout)
	targets, backlog := srv.written()
	for backlog && time.Now().Before(deadline) {
		time.Sleep(500 * time.Microsecond) // a connection not yet accepted may hold frames
		targets, backlog = srv.written()
	}
	for time.Now().Before(deadline) {
		done := true
		for c, n := range targets {
			if c.relayed.Load() < n && !c.closed.Load() {
				done = false
				break
			}
		}
		if done {
			return
		}
		time.Sleep(500 * time.Microsecond)
	}
}

// written returns, per connection, how many bytes the bundle has written
// to it so far: those taken from the socket plus those still queued. The
// queue is read first, so a byte moving from the queue to the reader in
// between is counted twice rather than missed: settle then waits too long,
// never too little. It reports backlog instead while a connection waits to
// be accepted; accepting and tracking happen under the same lock, so no
// connection is ever in neither place.
func (srv *eventServer) written() (map[*connProgress]int64, bool) {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if srv.backlogged() {
		return nil, true
	}
	out := make(map[*connProgress]int64, len(srv.conns))
	for _, c := range srv.conns {
		q := int64(queued(c.Conn))
		out[c] = q + c.read.Load()
	}
	return out, false
}

// backlogged reports whether a connection waits in the listen backlog
// (the listening socket polls readable).
func (srv *eventServer) backlogged() bool {
	rc, err := srv.ln.SyscallConn()
	if err != nil {
		return false
	}
	ready := false
	_ = rc.Control(func(fd uintptr) {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, 0)
		ready = err == nil && n > 0 && fds[0].Revents&unix.POLLIN != 0
	})
	return ready
}

// queued returns the bytes waiting in conn's receive queue (FIONREAD), or 0
// when that cannot be told.
func queued(conn net.Conn) int {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return 0
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return 0
	}
	n := 0
	_ = rc.Control(func(fd uintptr) {
		n, _ = unix.IoctlGetInt(int(fd), unix.SIOCINQ)
	})
	return n
}

// listenEvents creates the socket (mode 0666, so that a bundle running as
// any user can connect) and starts accepting.
func listenEvents(path string, maxConns int, s *session) (*eventServer, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, errcode.Wrap(errcode.StagingFailed, err, "creating the directory of %s", path)
	}
	// A socket left by an earlier run would make bind fail; anything else
	// at that path is not ours to remove.
	if st, err := os.Lstat(path); err == nil {
		if st.Mode().Type() != fs.ModeSocket {
			return nil, errcode.New(errcode.InvalidArgument, "%s exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, errcode.Wrap(errcode.StagingFailed, err, "removing the stale socket %s", path)
		}
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, errcode.Wrap(errcode.StagingFailed, err, "listening on %s", path)
	}
	if err := os.Chmod(path, 0o666); err != nil {
		ln.Close()
		return nil, errcode.Wrap(errcode.StagingFailed, err, "making %s world-writable", path)
	}
	srv := &eventServer{s: s, path: path, ln: ln, sem: make(chan struct{}, maxConns), conns: map[net.Conn]*connProgress{}}
	srv.wg.Go(srv.acceptLoop)
	return srv, nil
}

// acceptPoll bounds one wait for a connection, and so how long the accept
// loop takes to notice that the listener was closed.
const acceptPoll = 50 * time.Millisecond

// acceptLoop accepts connections until the listener is closed.
func (srv *eventServer) acceptLoop() {
	for {
		srv.sem <- struct{}{}
		cp, err := srv.acceptOne()
		if err != nil {
			<-srv.sem
			if transientAccept(err) {
				// Out of descriptors, or a client gone before it was
				// accepted: later connections may well succeed.
				srv.s.log.Warn("events socket accept failed; retrying", "err", err)
				time.Sleep(acceptPoll)
				continue
			}
			if !errors.Is(err, net.ErrClosed) {
				srv.s.log.Warn("events socket accept failed", "err", err)
			}
			return
		}
		srv.wg.Go(func() {
			defer func() { <-srv.sem }()
			srv.handle(cp)
		})
	}
}

// transientAccept reports accept errors after which accepting again can
// succeed.
func transientAccept(err error) bool {
	for _, e := range []error{unix.EMFILE, unix.ENFILE, unix.ENOBUFS, unix.ENOMEM, unix.ECONNABORTED, unix.EPROTO} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// acceptOne waits for a connection and accepts it with accept4 under
// srv.mu, tracking it before the lock is released, so that written never
// sees a connection that is neither in the backlog nor tracked. (A
// listener's RawConn cannot wait for readiness, hence poll(2) with a short
// timeout inside Control, which keeps the descriptor open meanwhile.)
func (srv *eventServer) acceptOne() (*connProgress, error) {
	rc, err := srv.ln.SyscallConn()
	if err != nil {
		return nil, err
	}
	for {
		var (
			cp    *connProgress
			aerr  error
			again bool
		)
		cerr := rc.Control(func(fd uintptr) {
			fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			if _, err := unix.Poll(fds, int(acceptPoll/time.Millisecond)); err != nil && !errors.Is(err, unix.EINTR) {
				aerr = err
				return
			}
			if fds[0].Revents&unix.POLLIN == 0 {
				again = true
				return
			}
			srv.mu.Lock()
			defer srv.mu.Unlock()
			conn, err := acceptConn(fd)
			switch {
			case errors.Is(err, unix.EAGAIN):
				again = true
			case err != nil:
				aerr = err
			default:
				cp = srv.trackLocked(conn)
			}
		})
		switch {
		case cerr != nil:
			return nil, cerr
		case aerr != nil:
			return nil, aerr
		case !again:
			return cp, nil
		}
	}
}

// acceptConn accepts one connection from the listening socket fd.
func acceptConn(fd uintptr) (net.Conn, error) {
	nfd, _, err := unix.Accept4(int(fd), unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(nfd), "events-conn")
	defer f.Close()
	return net.FileConn(f)
}

func (srv *eventServer) trackLocked(conn net.Conn) *connProgress {
	cp := &connProgress{Conn: conn}
	srv.conns[conn] = cp
	return cp
}

// handle relays one connection's frames until EOF or a bad frame, which
// closes this connection only.
func (srv *eventServer) handle(conn *connProgress) {
	defer func() {
		conn.closed.Store(true)
		conn.Close()
		srv.mu.Lock()
		delete(srv.conns, conn.Conn)
		srv.mu.Unlock()
	}()
	fr := &frameReader{r: conn}
	for {
		doc, err := fr.next()
		if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
			return
		}
		var ev Event
		if err == nil {
			ev, err = ParseEvent(doc)
		}
		if err != nil {
			srv.s.report(pb.ErrorCode_ERROR_CODE_EVENT_REJECTED, false, "closed an events connection after a bad frame", err.Error())
			return
		}
		srv.s.emit(ev.Kind, ev.ContentType, ev.Body, ev.Attrs)
		conn.relayed.Add(int64(4 + len(doc)))
	}
}

// drain takes the connections still waiting in the listen backlog (a
// bundle that connected, wrote and exited before they were accepted) and
// relays them one after another, then stops accepting.
func (srv *eventServer) drain() {
	var tracked []*connProgress
	if rc, err := srv.ln.SyscallConn(); err == nil {
		_ = rc.Control(func(fd uintptr) {
			srv.mu.Lock()
			defer srv.mu.Unlock()
			for {
				c, err := acceptConn(fd)
				if err != nil {
					return // EAGAIN: the backlog is empty
				}
				tracked = append(tracked, srv.trackLocked(c))
			}
		})
	}
	srv.ln.Close()
	if len(tracked) == 0 {
		return
	}
	srv.wg.Go(func() {
		for _, c := range tracked {
			srv.handle(c)
		}
	})
}

// shutdown waits up to d for the connections to reach EOF, then closes
// whatever is left (held open by an escaped descendant) and waits for the
// handlers to return.
func (srv *eventServer) shutdown(d time.Duration) {
	if !waitTimeout(&srv.wg, d) {
		srv.mu.Lock()
		for c := range srv.conns {
			c.Close()
		}
		srv.mu.Unlock()
	}
	srv.wg.Wait()
}

// close removes the socket; safe after drain and shutdown.
func (srv *eventServer) close() {
	srv.ln.Close()
	_ = os.Remove(srv.path)
}
