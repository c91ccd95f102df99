package store_test

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/errcode"
)

func TestNewAPIKey(t *testing.T) {
	seen := map[string]bool{}
	for range 100 {
		k := store.NewAPIKey()
		if !store.WellFormedKey(k) {
			t.Fatalf("NewAPIKey() = %q is not well formed", k)
		}
		if seen[k] {
			t.Fatalf("NewAPIKey repeated %q", k)
		}
		seen[k] = true
		if p := store.DisplayPrefix(k); p != k[:store.KeyPrefixLen] || !strings.HasPrefix(p, store.KeyPrefix) {
			t.Fatalf("DisplayPrefix(%q) = %q", k, p)
		}
	}
}

func TestWellFormedKey(t *testing.T) {
	good := "dim_sk_" + strings.Repeat("0123456789abcdef", 4)
	tests := []struct {
		key  string
		want bool
	}{
		{good, true},
		{"", false},
		{"dim_sk_", false},
		{good[:len(good)-1], false},
		{good + "0", false},
		{strings.Replace(good, "a", "A", 1), false},
		{strings.Replace(good, "a", "g", 1), false},
		{"dim_pk_" + good[7:], false},
		{good + "\n", false},
	}
	for _, tc := range tests {
		if got := store.WellFormedKey(tc.key); got != tc.want {
			t.Errorf("WellFormedKey(%q) = %v, want %v", tc.key, got, tc.want)
		}
	}
}

func TestHashKey(t *testing.T) {
	// SHA-256 of "abc", a published test vector.
	if got, want := store.HashKey("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"; got != want {
		t.Fatalf("HashKey(abc) = %s, want %s", got, want)
	}
}

func TestValidateID(t *testing.T) {
	tests := []struct {
		id string
		ok bool
	}{
		{"inv_0123", true},
		{"a", true},
		{"A-b_C9", true},
		{strings.Repeat("x", 128), true},
		{"", false},
		{"_a", false},
		{"-a", false},
		{"a.b", false},
		{"a b", false},
		{"a/b", false},
		{"a*", false},
		{"a>", false},
		{strings.Repeat("x", 129), false},
	}
	for _, tc := range tests {
		err := store.ValidateID(tc.id)
		if (err == nil) != tc.ok || (err != nil && !errcode.HasCode(err, errcode.InvalidArgument)) {
			t.Errorf("ValidateID(%q) = %v, want ok=%v", tc.id, err, tc.ok)
		}
	}
}

func TestValidateUserName(t *testing.T) {
	tests := []struct {
		name string
		ok   bool
	}{
		{"bootstrap-admin", true},
		{"a.b_c-9", true},
		{"0", true},
		{strings.Repeat("a", 64), true},
		{"", false},
		{"Alice", false},
		{".a", false},
		{"a b", false},
		{"a@b", false},
		{strings.Repeat("a", 65), false},
	}
	for _, tc := range tests {
		if err := store.ValidateUserName(tc.name); (err == nil) != tc.ok {
			t.Errorf("ValidateUserName(%q) = %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}

func TestStatuses(t *testing.T) {
	tests := []struct {
		s            store.Status
		valid, final bool
	}{
		{store.StatusPending, true, false},
		{store.StatusRunning, true, false},
		{store.StatusCompleted, true, true},
		{store.StatusFailed, true, true},
		{store.StatusStopped, true, true},
		{store.StatusTimedOut, true, true},
		{"", false, false},
		{"done", false, false},
	}
	for _, tc := range tests {
		if tc.s.Valid() != tc.valid || tc.s.Final() != tc.final {
			t.Errorf("%q: Valid=%v Final=%v, want %v %v", tc.s, tc.s.Valid(), tc.s.Final(), tc.valid, tc.final)
		}
	}
	for _, tc := range []struct {
		s            store.JobStatus
		valid, final bool
	}{
		{store.JobQueued, true, false},
		{store.JobRunning, true, false},
		{store.JobSucceeded, true, true},
		{store.JobFailed, true, true},
		{"paused", false, false},
	} {
		if tc.s.Valid() != tc.valid || tc.s.Final() != tc.final {
			t.Errorf("%q: Valid=%v Final=%v, want %v %v", tc.s, tc.s.Valid(), tc.s.Final(), tc.valid, tc.final)
		}
	}
}

func TestParseManifest(t *testing.T) {
	tests := []struct {
		doc  string
		want store.Manifest
		ok   bool
	}{
		{`{}`, store.Manifest{}, true},
		{`{"boot_timeout_secs":10,"processing_timeout_secs":60,"vcpus":2,"memory_mib":256,"entrypoint":["/bin/app","-v"]}`,
			store.Manifest{BootTimeoutSecs: 10, ProcessingTimeoutSecs: 60, VCPUs: 2, MemoryMiB: 256, Entrypoint: []string{"/bin/app", "-v"}}, true},
		{`{"vcpu":2}`, store.Manifest{}, false},
		{`{"vcpus":-1}`, store.Manifest{}, false},
		{`{"vcpus":65}`, store.Manifest{}, false},
		{`{"memory_mib":1048577}`, store.Manifest{}, false},
		{`{"processing_timeout_secs":86401}`, store.Manifest{}, false},
		{`{"entrypoint":[""]}`, store.Manifest{}, false},
		{`{"vcpus":"2"}`, store.Manifest{}, false},
		{`{"vcpus":1} {}`, store.Manifest{}, false},
		{`[]`, store.Manifest{}, false},
		{``, store.Manifest{}, false},
		{`{"vcpus":1e100}`, store.Manifest{}, false},
	}
	for _, tc := range tests {
		got, err := store.ParseManifest([]byte(tc.doc))
		if tc.ok {
			if err != nil || !reflect.DeepEqual(got, tc.want) {
				t.Errorf("ParseManifest(%s) = %+v, %v; want %+v", tc.doc, got, err, tc.want)
			}
			continue
		}
		if !errcode.HasCode(err, errcode.InvalidManifest) {
			t.Errorf("ParseManifest(%s) = %+v, %v; want %s", tc.doc, got, err, errcode.InvalidManifest)
		}
	}
}

// FuzzParseManifest: a manifest from an upload either parses into a valid
// manifest that survives a JSON round trip, or is refused with a code.
func FuzzParseManifest(f *testing.F) {
	for _, s := range []string{`{}`, `{"vcpus":2,"entrypoint":["/a","b"]}`, `{"memory_mib":-1}`, `{"x":1}`, `null`, `{"entrypoint":null}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := store.ParseManifest(data)
		if err != nil {
			if !errcode.HasCode(err, errcode.InvalidManifest) {
				t.Fatalf("error without code: %v", err)
			}
			return
		}
		if err := m.Validate(); err != nil {
			t.Fatalf("parsed manifest does not validate: %v", err)
		}
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		again, err := store.ParseManifest(b)
		if err != nil || !reflect.DeepEqual(again, m) {
			t.Fatalf("round trip of %s: %+v, %v; want %+v", b, again, err, m)
		}
	})
}
