package firecracker

import (
	"context"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
)

func TestParseConnectReply(t *testing.T) {
	cases := []struct {
		in   string
		port uint32
		ok   bool
	}{
		{"OK 1073741824\n", 1073741824, true},
		{"OK 0\n", 0, true},
		{"OK 4294967295\n", 4294967295, true},
		{"OK 4294967296\n", 0, false},
		{"OK 012\n", 0, false},
		{"OK -1\n", 0, false},
		{"OK +1\n", 0, false},
		{"OK 12", 0, false},
		{"OK 12\r\n", 0, false},
		{"OK  12\n", 0, false},
		{"OK \n", 0, false},
		{"ok 12\n", 0, false},
		{"ERR 12\n", 0, false},
		{"", 0, false},
	}
	for _, c := range cases {
		port, err := ParseConnectReply(c.in)
		if (err == nil) != c.ok || port != c.port {
			t.Errorf("ParseConnectReply(%q) = %d, %v", c.in, port, err)
		}
		if err != nil && !errcode.HasCode(err, errcode.ChannelFailed) {
			t.Errorf("ParseConnectReply(%q): error %v lacks a code", c.in, err)
		}
	}
}

func FuzzParseConnectReply(f *testing.F) {
	for _, s := range []string{"OK 1\n", "OK 1073741824\n", "OK 01\n", "OK 99999999999\n", "NO\n", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		port, err := ParseConnectReply(s)
		if err != nil {
			return
		}
		// Accepted replies are exactly the canonical rendering.
		if want := fmt.Sprintf("OK %d\n", port); s != want {
			t.Fatalf("accepted %q as port %d (canonical %q)", s, port, want)
		}
	})
}

// fakeVsock is a Firecracker-like hybrid vsock socket: it refuses (closes)
// the first refuse connections, then answers OK followed at once by
// greeting, in the same write, to check the dialer consumes only the line.
func fakeVsock(t *testing.T, refuse int32, greeting string) (string, *atomic.Int32) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "v.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var seen atomic.Int32
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			n := seen.Add(1)
			go func() {
				defer conn.Close()
				buf := make([]byte, 64)
				k, err := conn.Read(buf)
				// One read must hold the whole request.
				if err != nil || string(buf[:k]) != "CONNECT 1024\n" || n <= refuse {
					return
				}
				conn.Write([]byte("OK 77\n" + greeting))
				io.Copy(io.Discard, conn)
			}()
		}
	}()
	return path, &seen
}

func TestDialVsockRetries(t *testing.T) {
	path, seen := fakeVsock(t, 3, "hello")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := DialVsock(ctx, path, 1024, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if n := seen.Load(); n != 4 {
		t.Errorf("%d connections, want 3 refused and 1 accepted", n)
	}
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, 5)
	if _, err := io.ReadFull(conn, got); err != nil || string(got) != "hello" {
		t.Errorf("bytes after the reply: %q, %v", got, err)
	}
}

func TestDialVsockFailures(t *testing.T) {
	// A peer that answers garbage, one that never answers, and no socket.
	garbage := filepath.Join(t.TempDir(), "g.sock")
	silent := filepath.Join(t.TempDir(), "s.sock")
	for path, reply := range map[string]string{garbage: "OK nope\n", silent: ""} {
		ln, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				conn, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer conn.Close()
					conn.Read(make([]byte, 64))
					if reply != "" {
						conn.Write([]byte(reply))
					} else {
						time.Sleep(time.Second)
					}
				}()
			}
		}()
	}
	for name, path := range map[string]string{"garbage": garbage, "silent": silent, "missing": filepath.Join(t.TempDir(), "none")} {
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		_, err := DialVsock(ctx, path, 1024, nil)
		cancel()
		if !errcode.HasCode(err, errcode.ChannelFailed) {
			t.Errorf("%s: %v", name, err)
		}
	}
}
