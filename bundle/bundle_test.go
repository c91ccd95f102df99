package bundle

import (
	"encoding/binary"
	"encoding/json"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/agent"
	"github.com/hyphae-run/hyphae/errcode"
)

// server is a real Unix socket that decodes frames the way the agent does.
type server struct {
	path   string
	mu     sync.Mutex
	events []agent.Event
	conns  int
}

func listen(t *testing.T, closeAfterFirst bool) *server {
	t.Helper()
	dir, err := os.MkdirTemp("", "bnd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	s := &server{path: filepath.Join(dir, "ev.sock")}
	ln, err := net.Listen("unix", s.path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns++
			s.mu.Unlock()
			go func() {
				defer c.Close()
				for {
					var hdr [4]byte
					if _, err := io.ReadFull(c, hdr[:]); err != nil {
						return
					}
					doc := make([]byte, binary.LittleEndian.Uint32(hdr[:]))
					if _, err := io.ReadFull(c, doc); err != nil {
						return
					}
					ev, err := agent.ParseEvent(doc)
					if err != nil {
						t.Errorf("agent refuses frame %s: %v", doc, err)
						return
					}
					s.mu.Lock()
					s.events = append(s.events, ev)
					s.mu.Unlock()
					if closeAfterFirst {
						return
					}
				}
			}()
		}
	}()
	return s
}

func (s *server) snapshot() ([]agent.Event, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]agent.Event(nil), s.events...), s.conns
}

// waitEvents polls until the server has decoded n events (the test's own
// deadline bounds it).
func (s *server) waitEvents(n int) {
	for {
		if evs, _ := s.snapshot(); len(evs) >= n {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

func TestSendEncodesTheContract(t *testing.T) {
	s := listen(t, false)
	c := NewClient(s.path)
	defer c.Close()
	sends := []struct {
		ev       Event
		kind, ct string
		body     string
	}{
		{Event{Kind: "progress", Body: map[string]int{"pct": 50}}, "progress", "application/json", `{"pct":50}`},
		{Event{Body: "plain text"}, "bundle", "application/json", "plain text"},
		{Event{Kind: "raw", Body: []byte("bytes")}, "raw", "application/json", "bytes"},
		{Event{Kind: "j", Body: json.RawMessage(`[1, 2]`)}, "j", "application/json", `[1,2]`},
		{Event{Kind: "t", ContentType: "text/csv", Body: "a,b", Attrs: map[string]string{"k": "v"}}, "t", "text/csv", "a,b"},
	}
	for _, tt := range sends {
		if err := c.SendEvent(tt.ev); err != nil {
			t.Fatal(err)
		}
	}
	s.waitEvents(len(sends))
	evs, conns := s.snapshot()
	for i, tt := range sends {
		if evs[i].Kind != tt.kind || evs[i].ContentType != tt.ct || string(evs[i].Body) != tt.body {
			t.Errorf("event %d = %+v (body %q), want %s %s %q", i, evs[i], evs[i].Body, tt.kind, tt.ct, tt.body)
		}
	}
	if evs[4].Attrs["k"] != "v" {
		t.Errorf("attrs lost: %v", evs[4].Attrs)
	}
	if conns < 1 {
		t.Fatal("no connection")
	}
}

func TestConnectionReusedAndConcurrent(t *testing.T) {
	s := listen(t, false)
	c := NewClient(s.path)
	defer c.Close()
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 100 {
				if err := c.Send("k", i, map[string]string{"g": strconv.Itoa(g)}); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	s.waitEvents(800)
	if _, conns := s.snapshot(); conns != 1 {
		t.Fatalf("%d connections for one client, want 1", conns)
	}
}

func TestRedialAfterTheAgentClosed(t *testing.T) {
	s := listen(t, true) // closes each connection after one frame
	c := NewClient(s.path)
	defer c.Close()
	c.Send("a", 1, nil)
	s.waitEvents(1)
	// The first write after the close may still succeed into the socket
	// buffer and be lost; sending until a new connection is made proves
	// that the client recovers rather than failing forever.
	for {
		if err := c.Send("b", 2, nil); err != nil {
			t.Fatal(err)
		}
		if _, conns := s.snapshot(); conns > 1 {
			break
		}
	}
}

func TestSendErrors(t *testing.T) {
	s := listen(t, false)
	c := NewClient(s.path)
	defer c.Close()
	tests := []struct {
		name string
		ev   Event
		code errcode.Code
	}{
		{"no body", Event{Kind: "x"}, errcode.InvalidArgument},
		{"invalid raw JSON", Event{Body: json.RawMessage(`{`)}, errcode.InvalidArgument},
		{"unencodable", Event{Body: make(chan int)}, errcode.InvalidArgument},
		{"too large", Event{Body: strings.Repeat("x", MaxFrame)}, errcode.SizeLimit},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := c.SendEvent(tt.ev); !errcode.HasCode(err, tt.code) {
				t.Fatalf("err = %v, want %s", err, tt.code)
			}
		})
	}
}

func TestNotConnected(t *testing.T) {
	for _, path := range []string{"", filepath.Join(t.TempDir(), "absent.sock")} {
		c := NewClient(path)
		if c.IsConnected() {
			t.Fatalf("%q: IsConnected = true", path)
		}
		if err := c.Send("k", 1, nil); !errcode.HasCode(err, errcode.ChannelFailed) {
			t.Fatalf("%q: err = %v, want ChannelFailed", path, err)
		}
	}
}
