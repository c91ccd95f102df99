package firecracker

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestRequestShutdown checks that RequestShutdown sends SendCtrlAltDel to
// the API socket in a VM's runtime directory.
func TestRequestShutdown(t *testing.T) {
	dir := t.TempDir()
	l, err := net.Listen("unix", filepath.Join(dir, apiSocketName))
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 1)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var a InstanceAction
		_ = json.NewDecoder(r.Body).Decode(&a)
		got <- r.Method + " " + r.URL.Path + " " + a.ActionType
		w.WriteHeader(http.StatusNoContent)
	})}
	go srv.Serve(l)
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := RequestShutdown(ctx, dir); err != nil {
		t.Fatal(err)
	}
	if req := <-got; req != "PUT /actions SendCtrlAltDel" {
		t.Errorf("request %q", req)
	}
}

// TestProbeKVM runs the HLT-guest probe: whatever the host has, it must
// answer, with a reason, and agree with whether /dev/kvm can be opened.
func TestProbeKVM(t *testing.T) {
	ok, reason := ProbeKVM(context.Background())
	t.Logf("KVM works: %v (%s)", ok, reason)
	if reason == "" {
		t.Error("no reason given")
	}
	if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err != nil {
		if ok {
			t.Errorf("probe succeeded without a usable /dev/kvm (%v)", err)
		}
	} else {
		f.Close()
	}
}
