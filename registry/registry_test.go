package registry

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
)

func openTest(t *testing.T, home string) *Registry {
	t.Helper()
	r, err := Open(context.Background(), home, nil)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func digestOf(s string) string {
	sum := sha256.Sum256([]byte(s))
	return "sha256:" + hex.EncodeToString(sum[:])
}

// addImage writes an image file for content and registers it as ref
// ("name:tag", or "" for untagged).
func addImage(t *testing.T, r *Registry, content, name, tag string) Image {
	t.Helper()
	img := Image{Digest: digestOf(content), Name: name, Tag: tag, SizeBytes: int64(len(content)),
		Source: "test", Entrypoint: []string{"/app/run", ""}, VCPUs: 1, MemoryMiB: 128}
	if err := os.WriteFile(r.ImagePath(img.Digest), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := r.PutImage(context.Background(), img); err != nil {
		t.Fatalf("PutImage(%s:%s): %v", name, tag, err)
	}
	img.Path = r.ImagePath(img.Digest)
	return img
}

func TestOpenLayoutAndMigrations(t *testing.T) {
	home := filepath.Join(t.TempDir(), "nested", "home")
	r := openTest(t, home)
	for _, d := range []string{r.ImagesDir(), r.KernelsDir()} {
		if st, err := os.Stat(d); err != nil || !st.IsDir() {
			t.Fatalf("%s not created: %v", d, err)
		}
	}
	d := "sha256:" + strings.Repeat("0f", 32)
	if got, want := r.ImagePath(d), filepath.Join(home, "images", "sha256-"+strings.Repeat("0f", 32)+".ext4"); got != want {
		t.Fatalf("ImagePath = %s, want %s", got, want)
	}
	ms, err := migrations()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var mode string
	if err := r.db.QueryRow("PRAGMA user_version").Scan(&v); err != nil || v != len(ms) {
		t.Fatalf("user_version = %d (%v), want %d", v, err, len(ms))
	}
	if err := r.db.QueryRow("PRAGMA journal_mode").Scan(&mode); err != nil || mode != "wal" {
		t.Fatalf("journal_mode = %q (%v), want wal", mode, err)
	}
	addImage(t, r, "one", "one", "")
	r.Close()
	// Reopening applies nothing twice and keeps the data.
	r2 := openTest(t, home)
	if _, err := r2.LookupImage(context.Background(), "one"); err != nil {
		t.Fatalf("after reopen: %v", err)
	}
}

func TestOpenRefusesNewerSchema(t *testing.T) {
	home := t.TempDir()
	r := openTest(t, home)
	if _, err := r.db.Exec("PRAGMA user_version = 999"); err != nil {
		t.Fatal(err)
	}
	r.Close()
	_, err := Open(context.Background(), home, nil)
	if !errcode.HasCode(err, errcode.RegistryError) || !strings.Contains(err.Error(), "newer") {
		t.Fatalf("Open of a newer schema: %v", err)
	}
}

func TestPutImageMovesTag(t *testing.T) {
	ctx := context.Background()
	r := openTest(t, t.TempDir())
	v1 := addImage(t, r, "build one", "app", "")
	got, err := r.LookupImage(ctx, "app:latest")
	if err != nil || got.Digest != v1.Digest {
		t.Fatalf("app:latest = %v, %v; want %s", got.Digest, err, v1.Digest)
	}
	v2 := addImage(t, r, "build two", "app", "latest")
	got, err = r.LookupImage(ctx, "app")
	if err != nil || got.Digest != v2.Digest {
		t.Fatalf("after rebuild app = %v, %v; want %s", got.Digest, err, v2.Digest)
	}
	// The old digest stays, untagged, until GC or rm.
	old, err := r.ImageByDigest(ctx, v1.Digest)
	if err != nil || old.Name != "" {
		t.Fatalf("old digest = %+v, %v; want untagged", old, err)
	}
	list, err := r.ListImages(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 2 || list[0].Ref() != "app:latest" || list[1].Ref() != v1.Digest {
		t.Fatalf("ListImages = %+v", list)
	}
	// The same digest under a second tag is one image row.
	addImage(t, r, "build two", "app", "v2")
	var n int
	if err := r.db.QueryRow("SELECT count(*) FROM images").Scan(&n); err != nil || n != 2 {
		t.Fatalf("images rows = %d, %v; want 2", n, err)
	}
	if got.Entrypoint[0] != "/app/run" || got.Entrypoint[1] != "" || got.VCPUs != 1 || got.MemoryMiB != 128 || got.Path != r.ImagePath(v2.Digest) {
		t.Fatalf("stored fields lost: %+v", got)
	}
}

func TestPutImageValidationAndFiles(t *testing.T) {
	ctx := context.Background()
	r := openTest(t, t.TempDir())
	d := digestOf("x")
	tests := []struct {
		name string
		img  Image
		code errcode.Code
	}{
		{"bad digest", Image{Digest: "sha256:xyz"}, errcode.InvalidName},
		{"bad name", Image{Digest: d, Name: "Bad Name"}, errcode.InvalidName},
		{"bad tag", Image{Digest: d, Name: "ok", Tag: "-x"}, errcode.InvalidName},
		{"negative size", Image{Digest: d, SizeBytes: -1}, errcode.InvalidArgument},
		{"missing file", Image{Digest: d, Name: "ok"}, errcode.NotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := r.PutImage(ctx, tt.img); !errcode.HasCode(err, tt.code) {
				t.Fatalf("PutImage = %v, want %s", err, tt.code)
			}
		})
	}
	if list, _ := r.ListImages(ctx); len(list) != 0 {
		t.Fatalf("failed puts registered %+v", list)
	}

	// A temp file is moved into place.
	tmp, err := os.CreateTemp(r.ImagesDir(), TempPrefix+"*")
	if err != nil {
		t.Fatal(err)
	}
	tmp.WriteString("x")
	tmp.Close()
	if err := r.PutImage(ctx, Image{Digest: d, Name: "moved", Path: tmp.Name()}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(tmp.Name()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("temp file still there: %v", err)
	}
	if b, err := os.ReadFile(r.ImagePath(d)); err != nil || string(b) != "x" {
		t.Fatalf("image file = %q, %v", b, err)
	}
	// A second temp file of the same digest is dropped, the file kept.
	tmp2, _ := os.CreateTemp(r.ImagesDir(), TempPrefix+"*")
	tmp2.WriteString("x")
	tmp2.Close()
	if err := r.PutImage(ctx, Image{Digest: d, Name: "moved", Tag: "again", Path: tmp2.Name()}); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(r.ImagesDir())
	if len(entries) != 1 {
		t.Fatalf("images/ holds %d files, want 1", len(entries))
	}
}

func TestLookupImage(t *testing.T) {
	ctx := context.Background()
	r := openTest(t, t.TempDir())
	a := addImage(t, r, "alpha", "alpha", "v1")
	b := addImage(t, r, "beta", "beta", "")
	// Find two digests sharing a 12-character prefix is impractical; make
	// an ambiguous prefix by registering digests we choose.
	amb1 := "sha256:" + "cafecafecafe" + strings.Repeat("1", 52)
	amb2 := "sha256:" + "cafecafecafe" + strings.Repeat("2", 52)
	for _, d := range []string{amb1, amb2} {
		os.WriteFile(r.ImagePath(d), nil, 0o644)
		if err := r.PutImage(ctx, Image{Digest: d}); err != nil {
			t.Fatal(err)
		}
	}
	// A tag spelled like b's digest prefix wins over the prefix.
	bPrefix := strings.TrimPrefix(b.Digest, "sha256:")[:12]
	tests := []struct {
		ref        string
		wantDigest string
		wantName   string
		code       errcode.Code
	}{
		{ref: "alpha:v1", wantDigest: a.Digest, wantName: "alpha"},
		{ref: "alpha", code: errcode.NotFound}, // alpha:latest does not exist
		{ref: "beta", wantDigest: b.Digest, wantName: "beta"},
		{ref: "beta:latest", wantDigest: b.Digest, wantName: "beta"},
		{ref: a.Digest, wantDigest: a.Digest, wantName: "alpha"},
		{ref: strings.TrimPrefix(a.Digest, "sha256:")[:12], wantDigest: a.Digest},
		{ref: strings.TrimPrefix(a.Digest, "sha256:"), wantDigest: a.Digest},
		{ref: bPrefix, wantDigest: b.Digest},
		{ref: "cafecafecafe", code: errcode.InvalidArgument},
		{ref: "cafecafecafe1", wantDigest: amb1},
		{ref: "sha256:" + strings.Repeat("9", 64), code: errcode.NotFound},
		{ref: "nope", code: errcode.NotFound},
		{ref: "NOPE", code: errcode.InvalidName},
	}
	for _, tt := range tests {
		t.Run(tt.ref, func(t *testing.T) {
			got, err := r.LookupImage(ctx, tt.ref)
			if tt.code != "" {
				if !errcode.HasCode(err, tt.code) {
					t.Fatalf("LookupImage(%q) = %+v, %v; want %s", tt.ref, got, err, tt.code)
				}
				return
			}
			if err != nil || got.Digest != tt.wantDigest || (tt.wantName != "" && got.Name != tt.wantName) {
				t.Fatalf("LookupImage(%q) = %s %s, %v; want %s %s", tt.ref, got.Digest, got.Name, err, tt.wantDigest, tt.wantName)
			}
		})
	}
	// Now tag something with b's prefix spelling: the tag wins.
	c := addImage(t, r, "gamma", bPrefix, "")
	if got, err := r.LookupImage(ctx, bPrefix); err != nil || got.Digest != c.Digest {
		t.Fatalf("tag %s should win over the digest prefix: %s, %v", bPrefix, got.Digest, err)
	}
}

func TestRemoveImage(t *testing.T) {
	ctx := context.Background()
	r := openTest(t, t.TempDir())
	img := addImage(t, r, "content", "app", "v1")
	addImage(t, r, "content", "app", "v2")
	other := addImage(t, r, "other", "other", "")

	vm := VM{ID: "vm1", ImageDigest: img.Digest, ImageRef: "app:v1", Driver: "qemu", State: VMRunning}
	if err := r.PutVM(ctx, vm); err != nil {
		t.Fatal(err)
	}
	for _, ref := range []string{"app:v1", "app:v2", img.Digest} {
		err := r.RemoveImage(ctx, ref)
		if !errcode.HasCode(err, errcode.InUse) || !strings.Contains(err.Error(), "vm1") {
			t.Fatalf("RemoveImage(%s) while running = %v, want E502 naming vm1", ref, err)
		}
	}
	if _, err := r.LookupImage(ctx, "app:v1"); err != nil {
		t.Fatalf("refused remove still changed something: %v", err)
	}
	// Once the VM exited the tag can go; the file stays while v2 names it.
	if err := r.UpdateVM(ctx, "vm1", func(v *VM) error { v.State = VMExited; return nil }); err != nil {
		t.Fatal(err)
	}
	if err := r.RemoveImage(ctx, "app:v1"); err != nil {
		t.Fatal(err)
	}
	if _, err := r.LookupImage(ctx, "app:v1"); !errcode.HasCode(err, errcode.NotFound) {
		t.Fatalf("app:v1 still there: %v", err)
	}
	if _, err := os.Stat(img.Path); err != nil {
		t.Fatalf("file removed while app:v2 names it: %v", err)
	}
	if err := r.RemoveImage(ctx, "app:v2"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(img.Path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("file kept after the last tag went: %v", err)
	}
	if _, err := r.ImageByDigest(ctx, img.Digest); !errcode.HasCode(err, errcode.NotFound) {
		t.Fatalf("digest row kept: %v", err)
	}
	// By digest: every tag goes.
	addImage(t, r, "other", "other", "v9")
	if err := r.RemoveImage(ctx, other.Digest); err != nil {
		t.Fatal(err)
	}
	if list, _ := r.ListImages(ctx); len(list) != 0 {
		t.Fatalf("left after removing by digest: %+v", list)
	}
	if err := r.RemoveImage(ctx, "other"); !errcode.HasCode(err, errcode.NotFound) {
		t.Fatalf("removing a missing image: %v", err)
	}
}

func TestGC(t *testing.T) {
	ctx := context.Background()
	r := openTest(t, t.TempDir())
	kept := addImage(t, r, "kept", "kept", "")
	orphan := filepath.Join(r.ImagesDir(), "sha256-"+strings.Repeat("e", 64)+".ext4")
	stray := filepath.Join(r.ImagesDir(), "leftover.bin")
	freshTmp := filepath.Join(r.ImagesDir(), TempPrefix+"fresh")
	staleTmp := filepath.Join(r.ImagesDir(), TempPrefix+"stale")
	kernel := filepath.Join(r.KernelsDir(), "vmlinux-test")
	orphanKernel := filepath.Join(r.KernelsDir(), "vmlinux-orphan")
	for _, p := range []string{orphan, stray, freshTmp, staleTmp, kernel, orphanKernel} {
		if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	old := time.Now().Add(-2 * TempMaxAge)
	if err := os.Chtimes(staleTmp, old, old); err != nil {
		t.Fatal(err)
	}
	if err := r.PutKernel(ctx, Kernel{Name: "test", Path: kernel, SHA256: "00", Format: KernelELF, Arch: "x86_64", VMMs: []string{"qemu"}}); err != nil {
		t.Fatal(err)
	}
	subdir := filepath.Join(r.ImagesDir(), "somedir")
	os.Mkdir(subdir, 0o755)

	removed, err := r.GC(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(removed)
	want := []string{orphan, stray, staleTmp, orphanKernel}
	sort.Strings(want)
	if !slices.Equal(removed, want) {
		t.Fatalf("GC removed %v, want %v", removed, want)
	}
	for _, p := range []string{kept.Path, freshTmp, kernel, subdir} {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("GC removed %s: %v", p, err)
		}
	}
	for _, p := range want {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("%s survived GC", p)
		}
	}
	if again, err := r.GC(ctx); err != nil || len(again) != 0 {
		t.Fatalf("second GC = %v, %v", again, err)
	}
}

func TestKernels(t *testing.T) {
	ctx := context.Background()
	r := openTest(t, t.TempDir())
	inHome := filepath.Join(r.KernelsDir(), "vmlinux")
	outside := filepath.Join(t.TempDir(), "bzImage")
	for _, p := range []string{inHome, outside} {
		os.WriteFile(p, []byte("k"), 0o644)
	}
	k := Kernel{Name: "fc", Path: inHome, SHA256: "ab", Format: KernelELF, Arch: "x86_64", SizeBytes: 1, VMMs: []string{"firecracker", "qemu"}}
	if err := r.PutKernel(ctx, k); err != nil {
		t.Fatal(err)
	}
	if err := r.PutKernel(ctx, Kernel{Name: "debian", Path: outside, Format: KernelBzImage, VMMs: []string{"qemu"}}); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []Kernel{{Name: "../x", Path: inHome}, {Name: "rel", Path: "vmlinux"}} {
		if err := r.PutKernel(ctx, bad); err == nil {
			t.Fatalf("PutKernel(%+v) accepted", bad)
		}
	}
	got, err := r.LookupKernel(ctx, "fc")
	if err != nil || got.Path != inHome || !slices.Equal(got.VMMs, k.VMMs) || got.Format != KernelELF {
		t.Fatalf("LookupKernel = %+v, %v", got, err)
	}
	if ks, err := r.ListKernels(ctx); err != nil || len(ks) != 2 || ks[0].Name != "debian" {
		t.Fatalf("ListKernels = %+v, %v", ks, err)
	}
	for _, name := range []string{"fc", "debian"} {
		if err := r.RemoveKernel(ctx, name); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Stat(inHome); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("kernel file in the home kept after RemoveKernel")
	}
	if _, err := os.Stat(outside); err != nil {
		t.Fatal("RemoveKernel deleted a file outside the home")
	}
	if _, err := r.LookupKernel(ctx, "fc"); !errcode.HasCode(err, errcode.NotFound) {
		t.Fatalf("removed kernel still found: %v", err)
	}
}

func TestVMs(t *testing.T) {
	ctx := context.Background()
	r := openTest(t, t.TempDir())
	d := digestOf("img")
	vm := VM{ID: "a1", ImageDigest: d, ImageRef: "img", Driver: "qemu", PID: 4242, ProcStartTicks: 1 << 40,
		State: VMCreated, RuntimeDir: "/run/x", ConsolePath: "/run/x/console.log", Spec: json.RawMessage(`{"vcpus":1}`)}
	if err := r.PutVM(ctx, vm); err != nil {
		t.Fatal(err)
	}
	if err := r.PutVM(ctx, vm); !errcode.HasCode(err, errcode.Conflict) {
		t.Fatalf("duplicate PutVM = %v", err)
	}
	if err := r.PutVM(ctx, VM{ID: "b", ImageDigest: d, State: VMCreated, Spec: json.RawMessage("{")}); !errcode.HasCode(err, errcode.InvalidArgument) {
		t.Fatalf("bad spec PutVM = %v", err)
	}
	started := time.Now().Add(-time.Second)
	if err := r.UpdateVM(ctx, "a1", func(v *VM) error {
		v.State, v.StartedAt = VMRunning, &started
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	boom := errcode.New(errcode.StopFailed, "boom")
	if err := r.UpdateVM(ctx, "a1", func(v *VM) error { v.State = "garbage"; return boom }); !errors.Is(err, boom) {
		t.Fatalf("UpdateVM error = %v", err)
	}
	got, err := r.GetVM(ctx, "a1")
	if err != nil || got.State != VMRunning || got.StartedAt == nil || !got.StartedAt.Equal(started) ||
		got.ProcStartTicks != 1<<40 || got.PID != 4242 || string(got.Spec) != `{"vcpus":1}` || got.ExitCode != nil {
		t.Fatalf("GetVM = %+v, %v", got, err)
	}
	code := 137
	stopped := time.Now()
	r.UpdateVM(ctx, "a1", func(v *VM) error { v.State, v.ExitCode, v.StoppedAt = VMExited, &code, &stopped; return nil })
	if err := r.UpdateVM(ctx, "a1", func(v *VM) error { v.ID = "other"; return nil }); !errcode.HasCode(err, errcode.InvalidArgument) {
		t.Fatalf("UpdateVM changing the id = %v", err)
	}
	vms, err := r.ListVMs(ctx)
	if err != nil || len(vms) != 1 || *vms[0].ExitCode != 137 || vms[0].StoppedAt == nil {
		t.Fatalf("ListVMs = %+v, %v", vms, err)
	}
	if err := r.DeleteVM(ctx, "a1"); err != nil {
		t.Fatal(err)
	}
	for _, err := range []error{r.DeleteVM(ctx, "a1"), r.UpdateVM(ctx, "a1", func(*VM) error { return nil })} {
		if !errcode.HasCode(err, errcode.NotFound) {
			t.Fatalf("on a deleted VM: %v", err)
		}
	}
	if _, err := r.GetVM(ctx, "a1"); !errcode.HasCode(err, errcode.NotFound) {
		t.Fatalf("GetVM deleted = %v", err)
	}
}

func TestRecoverFromCorruption(t *testing.T) {
	ctx := context.Background()
	home := t.TempDir()
	r, err := Open(ctx, home, nil)
	if err != nil {
		t.Fatal(err)
	}
	a := addImage(t, r, "first", "first", "")
	b := addImage(t, r, "second", "second", "v1")
	kfile := filepath.Join(r.KernelsDir(), "vmlinux-6.1")
	os.WriteFile(kfile, []byte("kernel bytes"), 0o644)
	if err := r.PutKernel(ctx, Kernel{Name: "k", Path: kfile, Format: KernelELF}); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	garbage := []byte(strings.Repeat("this is not an sqlite database\n", 512))
	if err := os.WriteFile(filepath.Join(home, DBFile), garbage, 0o644); err != nil {
		t.Fatal(err)
	}

	r2 := openTest(t, home)
	list, err := r2.ListImages(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, img := range list {
		if img.Name != "" || img.Source != "recovered" {
			t.Fatalf("recovered image should be untagged: %+v", img)
		}
		got = append(got, img.Digest)
	}
	want := []string{a.Digest, b.Digest}
	sort.Strings(want)
	if !slices.Equal(got, want) {
		t.Fatalf("recovered digests %v, want %v", got, want)
	}
	if img, err := r2.ImageByDigest(ctx, b.Digest); err != nil || img.SizeBytes != int64(len("second")) {
		t.Fatalf("recovered %+v, %v", img, err)
	}
	k, err := r2.LookupKernel(ctx, "vmlinux-6.1")
	if err != nil || k.Path != kfile || k.SizeBytes != int64(len("kernel bytes")) {
		t.Fatalf("recovered kernel = %+v, %v", k, err)
	}
	if h, _, _ := hashFile(kfile); k.SHA256 != h {
		t.Fatalf("kernel hash %s, want %s", k.SHA256, h)
	}
	// Nothing is lost to a GC after recovery, and the damaged db is kept.
	if removed, err := r2.GC(ctx); err != nil || len(removed) != 0 {
		t.Fatalf("GC after recovery removed %v, %v", removed, err)
	}
	aside, _ := filepath.Glob(filepath.Join(home, DBFile+".corrupt-*"))
	if len(aside) != 1 {
		t.Fatalf("damaged db not kept aside: %v", aside)
	}
	if b, _ := os.ReadFile(aside[0]); string(b) != string(garbage) {
		t.Fatal("the file moved aside is not the damaged db")
	}
}

// A damaged page inside an otherwise valid database is caught by
// quick_check rather than by the header.
func TestRecoverFromDamagedPage(t *testing.T) {
	ctx := context.Background()
	home := t.TempDir()
	r, err := Open(ctx, home, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 50 {
		addImage(t, r, fmt.Sprint("content ", i), fmt.Sprint("img", i), "")
	}
	r.Close()
	p := filepath.Join(home, DBFile)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	// Keep the 100-byte header and page 1 intact; scribble over the rest.
	const pageSize = 4096
	for i := pageSize; i < len(b); i++ {
		b[i] = byte(i * 7)
	}
	os.WriteFile(p, b, 0o644)
	r2 := openTest(t, home)
	list, err := r2.ListImages(ctx)
	if err != nil || len(list) != 50 || list[0].Source != "recovered" {
		t.Fatalf("after page damage: %d images, %v", len(list), err)
	}
	if aside, _ := filepath.Glob(p + ".corrupt-*"); len(aside) != 1 {
		t.Fatalf("damaged db not moved aside: %v", aside)
	}
}

// helperEnv makes the test binary act as a registry client process.
const helperEnv = "HYPHAE_REGISTRY_TEST_WORKER"

func TestMain(m *testing.M) {
	if spec := os.Getenv(helperEnv); spec != "" {
		if err := worker(spec); err != nil {
			fmt.Fprintln(os.Stderr, "worker:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

const workerOps = 200

// worker opens the registry at home and registers workerOps images, each
// through a temp file, moving a shared tag each time and reading back.
func worker(spec string) error {
	home, id, _ := strings.Cut(spec, ",")
	ctx := context.Background()
	r, err := Open(ctx, home, nil)
	if err != nil {
		return err
	}
	defer r.Close()
	for i := range workerOps {
		content := fmt.Sprintf("worker %s image %d", id, i)
		f, err := os.CreateTemp(r.ImagesDir(), TempPrefix+"*")
		if err != nil {
			return err
		}
		f.WriteString(content)
		f.Close()
		img := Image{Digest: digestOf(content), Name: "w" + id, Tag: fmt.Sprint("t", i), SizeBytes: int64(len(content)), Path: f.Name()}
		if err := r.PutImage(ctx, img); err != nil {
			return fmt.Errorf("put %d: %w", i, err)
		}
		shared := img
		shared.Name, shared.Tag, shared.Path = "shared", "latest", ""
		if err := r.PutImage(ctx, shared); err != nil {
			return fmt.Errorf("put shared %d: %w", i, err)
		}
		got, err := r.LookupImage(ctx, img.Ref())
		if err != nil || got.Digest != img.Digest {
			return fmt.Errorf("lookup %d: %v, %v", i, got.Digest, err)
		}
		if _, err := r.LookupImage(ctx, "shared"); err != nil {
			return fmt.Errorf("lookup shared %d: %w", i, err)
		}
	}
	return nil
}

func TestConcurrentProcesses(t *testing.T) {
	home := t.TempDir()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	var cmds []*exec.Cmd
	outs := make([]*strings.Builder, 2)
	for i := range 2 {
		cmd := exec.Command(exe, "-test.run=^$")
		cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s,%d", helperEnv, home, i))
		outs[i] = &strings.Builder{}
		cmd.Stdout, cmd.Stderr = outs[i], outs[i]
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds = append(cmds, cmd)
	}
	for i, cmd := range cmds {
		if err := cmd.Wait(); err != nil {
			t.Fatalf("worker %d: %v\n%s", i, err, outs[i])
		}
	}
	r := openTest(t, home)
	ctx := context.Background()
	if err := quickCheck(ctx, r.db); err != nil {
		t.Fatal(err)
	}
	count := func(q string) int {
		var n int
		if err := r.db.QueryRow(q).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	if n := count("SELECT count(*) FROM images"); n != 2*workerOps {
		t.Fatalf("%d image rows, want %d", n, 2*workerOps)
	}
	if n := count("SELECT count(*) FROM tags"); n != 2*workerOps+1 {
		t.Fatalf("%d tag rows, want %d", n, 2*workerOps+1)
	}
	for w := range 2 {
		for i := range workerOps {
			img, err := r.LookupImage(ctx, fmt.Sprintf("w%d:t%d", w, i))
			if err != nil || img.Digest != digestOf(fmt.Sprintf("worker %d image %d", w, i)) {
				t.Fatalf("w%d:t%d = %v, %v", w, i, img.Digest, err)
			}
			if _, err := os.Stat(img.Path); err != nil {
				t.Fatal(err)
			}
		}
	}
	if entries, _ := os.ReadDir(r.ImagesDir()); len(entries) != 2*workerOps {
		t.Fatalf("images/ holds %d files, want %d", len(entries), 2*workerOps)
	}
}
