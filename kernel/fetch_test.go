package kernel

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
)

// kernelServer serves body at /k on 127.0.0.1; fail decides per request
// (numbered from 1) whether to answer 503 or to cut the body short.
type kernelServer struct {
	body     []byte
	requests atomic.Int32
	fail     func(n int32) string // "", "503", "404", "short", "stall"
}

func (s *kernelServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	n := s.requests.Add(1)
	switch s.fail(n) {
	case "503":
		http.Error(w, "busy", http.StatusServiceUnavailable)
	case "404":
		http.NotFound(w, r)
	case "stall":
		// Headers and half the body, then nothing until the client
		// gives up.
		w.Header().Set("Content-Length", strconv.Itoa(len(s.body)))
		w.Write(s.body[:len(s.body)/2])
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	case "short":
		w.Header().Set("Content-Length", strconv.Itoa(len(s.body)))
		w.Write(s.body[:len(s.body)/2])
		// Drop the connection with the body half sent.
		panic(http.ErrAbortHandler)
	default:
		w.Write(s.body)
	}
}

func serve(t *testing.T, fail func(n int32) string) (*kernelServer, string) {
	t.Helper()
	body := make([]byte, 256<<10)
	for i := range body {
		body[i] = byte(i * 7)
	}
	ks := &kernelServer{body: body, fail: fail}
	srv := httptest.NewServer(ks) // listens on 127.0.0.1
	t.Cleanup(srv.Close)
	return ks, srv.URL + "/k"
}

func digest(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func TestFetch(t *testing.T) {
	never := func(int32) string { return "" }
	tests := []struct {
		name         string
		fail         func(n int32) string
		wrongHash    bool
		wantCode     errcode.Code
		wantRequests int32
	}{
		{"first try", never, false, "", 1},
		{"fails twice then succeeds", func(n int32) string {
			if n <= 2 {
				return "503"
			}
			return ""
		}, false, "", 3},
		{"body cut short once", func(n int32) string {
			if n == 1 {
				return "short"
			}
			return ""
		}, false, "", 2},
		{"body always cut short", func(int32) string { return "short" }, false, errcode.FetchFailed, 3},
		{"always unavailable", func(int32) string { return "503" }, false, errcode.FetchFailed, 3},
		{"stalls once then succeeds", func(n int32) string {
			if n == 1 {
				return "stall"
			}
			return ""
		}, false, "", 2},
		{"always stalls", func(int32) string { return "stall" }, false, errcode.FetchFailed, 3},
		{"not found is not retried", func(int32) string { return "404" }, false, errcode.FetchFailed, 1},
		{"wrong hash is not retried", never, true, errcode.ChecksumMismatch, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ks, url := serve(t, tt.fail)
			want := digest(ks.body)
			if tt.wrongHash {
				want = digest([]byte("something else"))
			}
			dir := filepath.Join(t.TempDir(), "kernels")
			f := Fetcher{Attempts: 3, Backoff: time.Millisecond, StallTimeout: 200 * time.Millisecond}
			path, err := f.Fetch(context.Background(), url, want, dir)
			if got := ks.requests.Load(); got != tt.wantRequests {
				t.Errorf("%d requests, want %d", got, tt.wantRequests)
			}
			entries, _ := os.ReadDir(dir)
			if tt.wantCode != "" {
				if !errcode.HasCode(err, tt.wantCode) {
					t.Fatalf("Fetch = %q, %v; want %s", path, err, tt.wantCode)
				}
				if len(entries) != 0 {
					t.Errorf("failed fetch left %d files (first %s)", len(entries), entries[0].Name())
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if path != filepath.Join(dir, "sha256-"+want) {
				t.Errorf("path %s", path)
			}
			got, err := os.ReadFile(path)
			if err != nil || digest(got) != want {
				t.Errorf("stored file differs from the served body (%v)", err)
			}
			if len(entries) != 1 {
				t.Errorf("%d files in dest dir, want 1", len(entries))
			}
		})
	}
}

func TestFetchAlreadyPresent(t *testing.T) {
	ks, url := serve(t, func(int32) string { return "" })
	dir := t.TempDir()
	want := digest(ks.body)
	if _, err := Fetch(context.Background(), url, want, dir); err != nil {
		t.Fatal(err)
	}
	if _, err := Fetch(context.Background(), url, want, dir); err != nil {
		t.Fatal(err)
	}
	if n := ks.requests.Load(); n != 1 {
		t.Errorf("%d requests, want 1 (second fetch should reuse the file)", n)
	}
}

func TestFetchBadInput(t *testing.T) {
	for _, sum := range []string{"", "abc", digest(nil)[:63] + "g"} {
		if _, err := Fetch(context.Background(), "http://127.0.0.1:1/k", sum, t.TempDir()); !errcode.HasCode(err, errcode.InvalidArgument) {
			t.Errorf("Fetch(sha %q) = %v, want InvalidArgument", sum, err)
		}
	}
}

func TestFetchCancelledDuringBackoff(t *testing.T) {
	_, url := serve(t, func(int32) string { return "503" })
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	dir := t.TempDir()
	f := Fetcher{Attempts: 10, Backoff: time.Hour}
	if _, err := f.Fetch(ctx, url, digest(nil), dir); !errcode.HasCode(err, errcode.FetchFailed) {
		t.Errorf("Fetch = %v, want FetchFailed", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("cancelled fetch left %d files", len(entries))
	}
}
