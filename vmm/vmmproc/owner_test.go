package vmmproc

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
)

type testOwner struct {
	Who string   `json:"who"`
	VMM Identity `json:"vmm"`
}

func TestOwnerFileRoundTrip(t *testing.T) {
	dir := t.TempDir()
	want := testOwner{Who: "gw", VMM: Identity{PID: 42, StartTicks: 7, Binary: "qemu-system-x86_64"}}
	if err := WriteOwnerFile(dir, "o.json", want); err != nil {
		t.Fatal(err)
	}
	// Rewriting replaces the record and leaves no temporary file.
	want.VMM.PID = 43
	if err := WriteOwnerFile(dir, "o.json", want); err != nil {
		t.Fatal(err)
	}
	var got testOwner
	if err := ReadOwnerFile(dir, "o.json", &got); err != nil || got != want {
		t.Fatalf("ReadOwnerFile = %+v, %v; want %+v", got, err, want)
	}
	if names, _ := filepath.Glob(filepath.Join(dir, "*")); len(names) != 1 {
		t.Errorf("dir holds %v, want only the owner file", names)
	}
	if st, _ := os.Stat(filepath.Join(dir, "o.json")); st.Mode().Perm() != 0o600 {
		t.Errorf("owner file mode %v, want 0600", st.Mode().Perm())
	}
	if err := WriteOwnerFile(filepath.Join(dir, "absent"), "o.json", want); !errcode.HasCode(err, errcode.SpawnFailed) {
		t.Errorf("WriteOwnerFile into a missing dir = %v, want SpawnFailed", err)
	}
}

// Records that are missing, malformed, too large, behind a symlink or not
// this user's are refused, so that nothing is killed or removed for them.
func TestReadOwnerFileRefuses(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T, dir string) string // returns the dir to read
		root  bool
	}{
		{"missing", func(t *testing.T, dir string) string { return dir }, false},
		{"malformed", func(t *testing.T, dir string) string {
			write(t, filepath.Join(dir, "o.json"), "{not json")
			return dir
		}, false},
		{"too large", func(t *testing.T, dir string) string {
			write(t, filepath.Join(dir, "o.json"), `{"who":"`+strings.Repeat("x", maxOwnerFile)+`"}`)
			return dir
		}, false},
		{"file is a symlink", func(t *testing.T, dir string) string {
			real := filepath.Join(t.TempDir(), "real.json")
			write(t, real, `{"who":"gw"}`)
			if err := os.Symlink(real, filepath.Join(dir, "o.json")); err != nil {
				t.Fatal(err)
			}
			return dir
		}, false},
		{"dir is a symlink", func(t *testing.T, dir string) string {
			write(t, filepath.Join(dir, "o.json"), `{"who":"gw"}`)
			link := filepath.Join(t.TempDir(), "link")
			if err := os.Symlink(dir, link); err != nil {
				t.Fatal(err)
			}
			return link
		}, false},
		{"file is a directory", func(t *testing.T, dir string) string {
			if err := os.Mkdir(filepath.Join(dir, "o.json"), 0o700); err != nil {
				t.Fatal(err)
			}
			return dir
		}, false},
		{"another user's file", func(t *testing.T, dir string) string {
			write(t, filepath.Join(dir, "o.json"), `{"who":"gw"}`)
			if err := os.Chown(filepath.Join(dir, "o.json"), 65534, 65534); err != nil {
				t.Fatal(err)
			}
			return dir
		}, true},
		{"another user's dir", func(t *testing.T, dir string) string {
			write(t, filepath.Join(dir, "o.json"), `{"who":"gw"}`)
			if err := os.Chown(dir, 65534, 65534); err != nil {
				t.Fatal(err)
			}
			return dir
		}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.root && os.Geteuid() != 0 {
				t.Skip("chown needs root")
			}
			dir := tt.setup(t, t.TempDir())
			var got testOwner
			if err := ReadOwnerFile(dir, "o.json", &got); !errcode.HasCode(err, errcode.NotFound) {
				t.Errorf("ReadOwnerFile = %+v, %v; want NotFound", got, err)
			}
		})
	}
}

func write(t *testing.T, path, s string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

// FuzzReadOwnerFile: whatever a runtime dir's owner file holds, reading it
// returns a record or an error, never a crash.
func FuzzReadOwnerFile(f *testing.F) {
	f.Add([]byte(`{"who":"gw","vmm":{"pid":1,"start_ticks":2,"binary":"qemu"}}`))
	f.Add([]byte(`{"vmm":{"pid":-1,"start_ticks":-2}}`))
	f.Add([]byte(`[]`))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, b []byte) {
		if err := os.WriteFile(filepath.Join(dir, "o.json"), b, 0o600); err != nil {
			t.Fatal(err)
		}
		var o testOwner
		_ = ReadOwnerFile(dir, "o.json", &o)
	})
}

// KillVerified kills the recorded process, and never a live PID whose
// start time or binary differ from the record.
func TestKillVerified(t *testing.T) {
	p, _ := startProgram(t, "sleep", "30")
	id := p.Identity()
	for _, wrong := range []Identity{
		{PID: id.PID, StartTicks: id.StartTicks + 1, Binary: id.Binary},
		{PID: id.PID, StartTicks: id.StartTicks, Binary: "qemu-system-x86_64"},
		{PID: 0, Binary: id.Binary},
	} {
		if killed, err := KillVerified(wrong, time.Second, nil); killed || err != nil {
			t.Errorf("KillVerified(%+v) = %v, %v; want false, nil", wrong, killed, err)
		}
	}
	if p.Exited() {
		t.Fatal("a mismatched identity killed the process")
	}
	killed, err := KillVerified(id, 5*time.Second, nil)
	if err != nil || !killed {
		t.Fatalf("KillVerified(own) = %v, %v", killed, err)
	}
	<-p.Done()
	if killed, err := KillVerified(id, time.Second, nil); killed || err != nil {
		t.Errorf("KillVerified(dead) = %v, %v; want false, nil", killed, err)
	}
}
