package agent

import (
	"errors"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"sync"
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
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup // accept loop and connection handlers
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
	srv := &eventServer{s: s, path: path, ln: ln, sem: make(chan struct{}, maxConns), conns: map[net.Conn]struct{}{}}
	srv.wg.Go(srv.acceptLoop)
	return srv, nil
}

func (srv *eventServer) acceptLoop() {
	for {
		srv.sem <- struct{}{}
		conn, err := srv.ln.Accept()
		if err != nil {
			<-srv.sem
			if !errors.Is(err, net.ErrClosed) {
				srv.s.log.Warn("events socket accept failed", "err", err)
			}
			return
		}
		srv.track(conn)
		srv.wg.Go(func() {
			defer func() { <-srv.sem }()
			srv.handle(conn)
		})
	}
}

func (srv *eventServer) track(conn net.Conn) {
	srv.mu.Lock()
	srv.conns[conn] = struct{}{}
	srv.mu.Unlock()
}

// handle relays one connection's frames until EOF or a bad frame, which
// closes this connection only.
func (srv *eventServer) handle(conn net.Conn) {
	defer func() {
		conn.Close()
		srv.mu.Lock()
		delete(srv.conns, conn)
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
	}
}

// drain takes the connections still waiting in the listen backlog (a
// bundle that connected, wrote and exited before they were accepted) and
// relays them one after another, then stops accepting.
func (srv *eventServer) drain() {
	var pending []net.Conn
	if rc, err := srv.ln.SyscallConn(); err == nil {
		_ = rc.Control(func(fd uintptr) {
			for {
				nfd, _, err := unix.Accept4(int(fd), unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
				if err != nil {
					return
				}
				f := os.NewFile(uintptr(nfd), "events-conn")
				c, err := net.FileConn(f)
				f.Close()
				if err == nil {
					pending = append(pending, c)
				}
			}
		})
	}
	srv.ln.Close()
	if len(pending) == 0 {
		return
	}
	for _, c := range pending {
		srv.track(c)
	}
	srv.wg.Go(func() {
		for _, c := range pending {
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
