package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
)

// TestRequestShutdown serves a QMP socket the way QEMU does (greeting,
// capabilities negotiation, then one command) and checks that
// RequestShutdown sends Ctrl-Alt-Del through it.
func TestRequestShutdown(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := RequestShutdown(ctx, dir); !errcode.HasCode(err, errcode.APIError) {
		t.Fatalf("without a QMP socket: %v, want APIError", err)
	}

	l, err := net.Listen("unix", filepath.Join(dir, QMPSocket))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := make(chan []string, 1)
	go func() {
		conn, err := l.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		conn.Write([]byte(`{"QMP": {"version": {}, "capabilities": []}}` + "\n"))
		sc := bufio.NewScanner(conn)
		var cmds []string
		for sc.Scan() {
			var req struct {
				Execute   string `json:"execute"`
				Arguments struct {
					Keys []struct{ Data string } `json:"keys"`
				} `json:"arguments"`
			}
			if json.Unmarshal(sc.Bytes(), &req) != nil {
				break
			}
			cmd := req.Execute
			for _, k := range req.Arguments.Keys {
				cmd += " " + k.Data
			}
			cmds = append(cmds, cmd)
			// An event may come before a reply; the client skips it.
			conn.Write([]byte(`{"event": "X", "timestamp": {}}` + "\n" + `{"return": {}}` + "\n"))
			if len(cmds) == 2 {
				break
			}
		}
		got <- cmds
	}()
	if err := RequestShutdown(ctx, dir); err != nil {
		t.Fatal(err)
	}
	cmds := <-got
	if len(cmds) != 2 || cmds[0] != "qmp_capabilities" || cmds[1] != "send-key ctrl alt delete" {
		t.Errorf("QMP commands %q", cmds)
	}
}
