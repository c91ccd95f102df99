package archive

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/hyphae-run/hyphae/archive/archivetest"
	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/internal/testenv"
)

var (
	t1 = time.Date(2021, 3, 4, 5, 6, 7, 0, time.UTC)
	t2 = time.Date(2022, 6, 7, 8, 9, 10, 0, time.UTC)
	t3 = time.Date(2019, 1, 1, 0, 0, 0, 0, time.UTC)
)

// treeLayers exercises every entry kind and whiteout form over four layers;
// the last two are identical, which classic docker save stores as a member
// symlink.
func treeLayers() [][]archivetest.Entry {
	return [][]archivetest.Entry{
		{
			{Name: "./", Mode: 0o711, ModTime: t2},
			{Name: "etc/", ModTime: t1},
			{Name: "etc/passwd", Body: "root:x:0:0\n", ModTime: t1},
			{Name: "etc/gone", Body: "old"},
			{Name: "etc/link", Type: '2', Linkname: "passwd", ModTime: t2},
			{Name: "abs", Type: '2', Linkname: "/etc/passwd"},
			{Name: "bin/sh", Body: "#!shell", Mode: 0o4755, UID: 1000, GID: 1000, ModTime: t2},
			{Name: "lib/file1", Body: "shared"},
			{Name: "deldir/sub/f", Body: "x"},
			{Name: "opq/", Mode: 0o750},
			{Name: "opq/a", Body: "lower"},
			{Name: "opq/sub/x", Body: "lower"},
			{Name: "ro/", Mode: 0o555, ModTime: t3},
			{Name: "ro/f", Body: "in read-only dir", Mode: 0o400},
			{Name: "was-link", Type: '2', Linkname: "etc"},
			{Name: "owned/", UID: 1001, GID: 1002},
			{Name: "owned/l", Type: '2', Linkname: "nowhere", UID: 1003, GID: 1004},
		},
		{
			{Name: "etc/.wh.gone"},
			{Name: ".wh.deldir"},
			{Name: "opq/new", Body: "upper"},
			{Name: "opq/sub/", Mode: 0o700},
			{Name: "opq/.wh..wh..opq"},
			{Name: "opq/sub/y", Body: "upper"},
			{Name: "bin/hl", Type: '1', Linkname: "lib/file1"},
			{Name: "./x/a", Body: "same inode", ModTime: t1},
			{Name: "x/b", Type: '1', Linkname: "./x/a"},
			{Name: "etc/passwd", Body: "root:x:0:0:replaced\n", ModTime: t1},
			{Name: "was-link", Body: "now a file"},
			{Name: ".wh..wh.plnk"},
			{Name: "ro/g", Body: "second layer in read-only dir"},
		},
		{{Name: "dup", Body: "repeated layer"}},
		{{Name: "dup", Body: "repeated layer"}},
	}
}

var testConfig = v1.Config{
	Entrypoint: []string{"/bin/sh", "-c"},
	Cmd:        []string{"echo hi", ""},
	Env:        []string{"PATH=/bin", "A=b=c"},
	WorkingDir: "/srv",
	User:       "1000:1000",
}

// variants are the archive layouts Unpack must read.
var variants = []struct {
	name string
	spec archivetest.Spec
}{
	{"classic", archivetest.Spec{Layout: archivetest.Classic}},
	{"classic-gzip", archivetest.Spec{Layout: archivetest.Classic, Gzip: true}},
	{"oci", archivetest.Spec{Layout: archivetest.OCI}},
	{"oci-gzip", archivetest.Spec{Layout: archivetest.OCI, Gzip: true}},
	{"docker25", archivetest.Spec{Layout: archivetest.OCI, DockerManifest: true}},
	{"oci-nested", archivetest.Spec{Layout: archivetest.OCI, Nested: true, Gzip: true}},
}

func writeArchive(t *testing.T, spec archivetest.Spec) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "image.tar")
	if err := archivetest.Write(p, spec); err != nil {
		t.Fatalf("writing archive: %v", err)
	}
	return p
}

func TestUnpackTree(t *testing.T) {
	var digest string
	for _, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			spec := v.spec
			spec.Layers = treeLayers()
			spec.Config = testConfig
			im, err := Open(context.Background(), writeArchive(t, spec), Options{})
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			if im.Layers() != 4 {
				t.Errorf("Layers() = %d, want 4", im.Layers())
			}
			checkConfig(t, im.Config())
			// Compression and layout do not change the config, so the digest
			// is the same for every variant.
			if !strings.HasPrefix(im.Digest(), "sha256:") || len(im.Digest()) != 71 {
				t.Errorf("Digest() = %q", im.Digest())
			}
			if digest == "" {
				digest = im.Digest()
			} else if im.Digest() != digest {
				t.Errorf("Digest() = %s, other layouts gave %s", im.Digest(), digest)
			}
			dest := t.TempDir()
			if err := im.Unpack(context.Background(), dest, nil); err != nil {
				t.Fatalf("Unpack: %v", err)
			}
			checkTree(t, dest)
		})
	}
}

func checkConfig(t *testing.T, c Config) {
	t.Helper()
	want := Config{Entrypoint: testConfig.Entrypoint, Cmd: testConfig.Cmd, Env: testConfig.Env, WorkingDir: "/srv", User: "1000:1000"}
	if !slices.Equal(c.Entrypoint, want.Entrypoint) || !slices.Equal(c.Cmd, want.Cmd) || !slices.Equal(c.Env, want.Env) ||
		c.WorkingDir != want.WorkingDir || c.User != want.User {
		t.Errorf("Config() = %+v, want %+v", c, want)
	}
}

func checkTree(t *testing.T, dest string) {
	t.Helper()
	files := map[string]string{
		"etc/passwd": "root:x:0:0:replaced\n",
		"bin/sh":     "#!shell",
		"bin/hl":     "shared",
		"lib/file1":  "shared",
		"opq/new":    "upper",
		"opq/sub/y":  "upper",
		"x/a":        "same inode",
		"x/b":        "same inode",
		"was-link":   "now a file",
		"ro/f":       "in read-only dir",
		"ro/g":       "second layer in read-only dir",
		"dup":        "repeated layer",
	}
	for name, body := range files {
		b, err := os.ReadFile(filepath.Join(dest, name))
		if err != nil || string(b) != body {
			t.Errorf("%s = %q, %v; want %q", name, b, err, body)
		}
	}
	for _, gone := range []string{"etc/gone", "deldir", "opq/a", "opq/sub/x", ".wh..wh.plnk", "opq/.wh..wh..opq", "etc/.wh.gone"} {
		if _, err := os.Lstat(filepath.Join(dest, gone)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s should not exist (err %v)", gone, err)
		}
	}
	links := map[string]string{"etc/link": "passwd", "abs": "/etc/passwd", "owned/l": "nowhere"}
	for name, target := range links {
		if got, err := os.Readlink(filepath.Join(dest, name)); err != nil || got != target {
			t.Errorf("readlink %s = %q, %v; want %q", name, got, err, target)
		}
	}
	modes := map[string]fs.FileMode{
		".":         0o711 | fs.ModeDir,
		"bin/sh":    0o755 | fs.ModeSetuid,
		"etc":       0o755 | fs.ModeDir,
		"opq":       0o750 | fs.ModeDir,
		"opq/sub":   0o700 | fs.ModeDir,
		"ro":        0o555 | fs.ModeDir,
		"ro/f":      0o400,
		"etc/link":  0o777 | fs.ModeSymlink,
		"lib/file1": 0o644,
	}
	for name, mode := range modes {
		if fi, err := os.Lstat(filepath.Join(dest, name)); err != nil || fi.Mode() != mode {
			t.Errorf("mode of %s = %v, %v; want %v", name, modeOf(fi), err, mode)
		}
	}
	mtimes := map[string]time.Time{
		".":          t2,
		"etc":        t1, // a directory keeps its time although later entries went in
		"etc/passwd": t1,
		"etc/link":   t2, // a symlink's own time
		"bin/sh":     t2,
		"ro":         t3,
		"x/a":        t1,
		"lib/file1":  archivetest.Epoch,
	}
	for name, mt := range mtimes {
		if fi, err := os.Lstat(filepath.Join(dest, name)); err != nil || !fi.ModTime().Equal(mt) {
			t.Errorf("mtime of %s = %v, %v; want %v", name, timeOf(fi), err, mt)
		}
	}
	nlinks := map[string]uint64{"bin/hl": 2, "lib/file1": 2, "x/a": 2, "x/b": 2, "etc/passwd": 1}
	for name, n := range nlinks {
		if st := statT(t, filepath.Join(dest, name)); st == nil || st.Nlink != n {
			t.Errorf("link count of %s = %v, want %d", name, st, n)
		}
	}
	if sameInode(t, filepath.Join(dest, "x/a"), filepath.Join(dest, "x/b")) == false {
		t.Errorf("x/a and x/b are not one inode")
	}
	if os.Geteuid() == 0 {
		owners := map[string][2]uint32{"bin/sh": {1000, 1000}, "owned": {1001, 1002}, "owned/l": {1003, 1004}, "etc/passwd": {0, 0}}
		for name, o := range owners {
			if st := statT(t, filepath.Join(dest, name)); st == nil || st.Uid != o[0] || st.Gid != o[1] {
				t.Errorf("owner of %s = %+v, want %v", name, st, o)
			}
		}
	}
}

func modeOf(fi fs.FileInfo) any {
	if fi == nil {
		return nil
	}
	return fi.Mode()
}

func timeOf(fi fs.FileInfo) any {
	if fi == nil {
		return nil
	}
	return fi.ModTime()
}

func statT(t *testing.T, p string) *syscall.Stat_t {
	t.Helper()
	fi, err := os.Lstat(p)
	if err != nil {
		return nil
	}
	return fi.Sys().(*syscall.Stat_t)
}

func sameInode(t *testing.T, a, b string) bool {
	sa, sb := statT(t, a), statT(t, b)
	return sa != nil && sb != nil && sa.Ino == sb.Ino && sa.Dev == sb.Dev
}

// TestSpecialFiles: FIFOs are created; device nodes never are.
func TestSpecialFiles(t *testing.T) {
	layers := [][]archivetest.Entry{{
		{Name: "dev/null", Type: '3', Mode: 0o666, Devmajor: 1, Devminor: 3},
		{Name: "dev/vda", Type: '4', Mode: 0o666, Devmajor: 253, Devminor: 0},
		{Name: "run/fifo", Type: '6', Mode: 0o640, ModTime: t1},
	}}
	im, err := Open(context.Background(), writeArchive(t, archivetest.Spec{Layers: layers}), Options{})
	if err != nil {
		t.Fatal(err)
	}
	dest := t.TempDir()
	if err := im.Unpack(context.Background(), dest, nil); err != nil {
		t.Fatalf("Unpack: %v", err)
	}
	for _, dev := range []string{"dev/null", "dev/vda"} {
		if _, err := os.Lstat(filepath.Join(dest, dev)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("device node %s should be skipped, got %v", dev, err)
		}
	}
	fi, err := os.Lstat(filepath.Join(dest, "run/fifo"))
	if err != nil || fi.Mode() != fs.ModeNamedPipe|0o640 || !fi.ModTime().Equal(t1) {
		t.Errorf("run/fifo = %v %v, %v", modeOf(fi), timeOf(fi), err)
	}
}

// TestRemoveAll: the unpacked tree, read-only directories included, can be
// removed again.
func TestRemoveAll(t *testing.T) {
	p := writeArchive(t, archivetest.Spec{Layers: [][]archivetest.Entry{{
		{Name: "ro/", Mode: 0o500}, {Name: "ro/sub/", Mode: 0o500}, {Name: "ro/sub/f", Body: "x", Mode: 0o400},
		{Name: "ro/link", Type: '2', Linkname: "/"},
	}}})
	dest := filepath.Join(t.TempDir(), "tree")
	if err := os.Mkdir(dest, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := openAndUnpack(p, dest, Limits{}); err != nil {
		t.Fatal(err)
	}
	if err := RemoveAll(dest); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(dest); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("tree still there: %v", err)
	}
	if err := RemoveAll(dest); err != nil {
		t.Errorf("RemoveAll of a missing tree: %v", err)
	}
}

// sandbox is a staging dir next to a sentinel dir holding one file: after a
// hostile unpack the sentinel must be untouched and nothing else may appear
// beside them.
type sandbox struct {
	base, dest, sentinel string
}

func newSandbox(t *testing.T) sandbox {
	t.Helper()
	base := t.TempDir()
	s := sandbox{base: base, dest: filepath.Join(base, "dest"), sentinel: filepath.Join(base, "sentinel")}
	for _, d := range []string{s.dest, s.sentinel} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(s.sentinel, "keep"), []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	return s
}

func (s sandbox) check(t testing.TB, ignore ...string) {
	t.Helper()
	names, err := os.ReadDir(s.base)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range names {
		if n := e.Name(); n != "dest" && n != "sentinel" && !slices.Contains(ignore, n) {
			t.Errorf("unexpected %s beside the staging dir", n)
		}
	}
	inside, err := os.ReadDir(s.sentinel)
	if err != nil || len(inside) != 1 || inside[0].Name() != "keep" {
		t.Fatalf("sentinel dir changed: %v, %v", inside, err)
	}
	keep := filepath.Join(s.sentinel, "keep")
	b, err := os.ReadFile(keep)
	fi, _ := os.Lstat(keep)
	if err != nil || string(b) != "keep" || fi.Mode() != 0o644 || fi.Sys().(*syscall.Stat_t).Nlink != 1 {
		t.Fatalf("sentinel file changed: %q, %v, %v", b, err, modeOf(fi))
	}
}

func TestHostile(t *testing.T) {
	type tc struct {
		name   string
		layers func(sentinel string) [][]archivetest.Entry
		limits Limits
		code   errcode.Code
	}
	one := func(es ...archivetest.Entry) func(string) [][]archivetest.Entry {
		return func(string) [][]archivetest.Entry { return [][]archivetest.Entry{es} }
	}
	cases := []tc{
		{"dotdot", one(archivetest.Entry{Name: "../escape", Body: "x"}), Limits{}, errcode.UnsafeArchiveEntry},
		{"dotdot-sentinel", one(archivetest.Entry{Name: "../sentinel/pwn", Body: "x"}), Limits{}, errcode.UnsafeArchiveEntry},
		{"inner-dotdot", one(archivetest.Entry{Name: "a/../../escape", Body: "x"}), Limits{}, errcode.UnsafeArchiveEntry},
		{"absolute", func(s string) [][]archivetest.Entry {
			return [][]archivetest.Entry{{{Name: s + "/pwn", Body: "x"}}}
		}, Limits{}, errcode.UnsafeArchiveEntry},
		{"write-through-symlink", func(s string) [][]archivetest.Entry {
			return [][]archivetest.Entry{{{Name: "a", Type: '2', Linkname: s}, {Name: "a/file", Body: "x"}}}
		}, Limits{}, errcode.UnsafeArchiveEntry},
		{"write-through-symlink-next-layer", func(s string) [][]archivetest.Entry {
			return [][]archivetest.Entry{{{Name: "a", Type: '2', Linkname: s}}, {{Name: "a/keep", Body: "overwritten"}}}
		}, Limits{}, errcode.UnsafeArchiveEntry},
		{"dir-through-symlink", func(s string) [][]archivetest.Entry {
			return [][]archivetest.Entry{{{Name: "a", Type: '2', Linkname: s}, {Name: "a/d/"}}}
		}, Limits{}, errcode.UnsafeArchiveEntry},
		{"symlink-dotdot-chain", one(
			archivetest.Entry{Name: "d/"},
			archivetest.Entry{Name: "d/up", Type: '2', Linkname: "../.."},
			archivetest.Entry{Name: "up2", Type: '2', Linkname: "d/up/.."},
			archivetest.Entry{Name: "up2/sentinel/pwn", Body: "x"},
		), Limits{}, errcode.UnsafeArchiveEntry},
		{"symlink-dotdot-nested", one(
			archivetest.Entry{Name: "d/"},
			archivetest.Entry{Name: "d/up", Type: '2', Linkname: "../.."},
			archivetest.Entry{Name: "d/up/sentinel/pwn", Body: "x"},
		), Limits{}, errcode.UnsafeArchiveEntry},
		{"hardlink-outside", one(archivetest.Entry{Name: "h", Type: '1', Linkname: "../sentinel/keep"}), Limits{}, errcode.UnsafeArchiveEntry},
		{"hardlink-absolute", func(s string) [][]archivetest.Entry {
			return [][]archivetest.Entry{{{Name: "h", Type: '1', Linkname: s + "/keep"}}}
		}, Limits{}, errcode.UnsafeArchiveEntry},
		{"hardlink-via-symlink", one(
			archivetest.Entry{Name: "d/f", Body: "x"},
			archivetest.Entry{Name: "s", Type: '2', Linkname: "d"},
			archivetest.Entry{Name: "h", Type: '1', Linkname: "s/f"},
		), Limits{}, errcode.UnsafeArchiveEntry},
		{"hardlink-via-symlink-outside", func(s string) [][]archivetest.Entry {
			return [][]archivetest.Entry{{{Name: "s", Type: '2', Linkname: s}, {Name: "h", Type: '1', Linkname: "s/keep"}}}
		}, Limits{}, errcode.UnsafeArchiveEntry},
		{"hardlink-missing", one(archivetest.Entry{Name: "h", Type: '1', Linkname: "nothing"}), Limits{}, errcode.MalformedArchive},
		{"whiteout-dotdot", one(archivetest.Entry{Name: "a/.wh..."}), Limits{}, errcode.UnsafeArchiveEntry},
		{"whiteout-dot", one(archivetest.Entry{Name: ".wh.."}), Limits{}, errcode.UnsafeArchiveEntry},
		{"whiteout-through-symlink", func(s string) [][]archivetest.Entry {
			return [][]archivetest.Entry{{{Name: "s", Type: '2', Linkname: s}}, {{Name: "s/.wh.keep"}}}
		}, Limits{}, errcode.UnsafeArchiveEntry},
		{"opaque-through-symlink", func(s string) [][]archivetest.Entry {
			return [][]archivetest.Entry{{{Name: "s", Type: '2', Linkname: s}}, {{Name: "s/.wh..wh..opq"}}}
		}, Limits{}, errcode.UnsafeArchiveEntry},
		{"huge-declared-size", one(archivetest.Entry{Name: "big", DeclaredSize: 1 << 50}), Limits{}, errcode.SizeLimit},
		{"entry-size", one(archivetest.Entry{Name: "f", Body: strings.Repeat("x", 100)}), Limits{MaxEntrySize: 99}, errcode.SizeLimit},
		{"total-size", one(
			archivetest.Entry{Name: "f", Body: strings.Repeat("x", 60)},
			archivetest.Entry{Name: "g", Body: strings.Repeat("x", 60)},
		), Limits{MaxTotalSize: 100}, errcode.SizeLimit},
		{"too-many-entries", one(
			archivetest.Entry{Name: "a"}, archivetest.Entry{Name: "b"}, archivetest.Entry{Name: "c"}, archivetest.Entry{Name: "d"},
		), Limits{MaxEntries: 3}, errcode.SizeLimit},
		{"too-many-layers", func(string) [][]archivetest.Entry {
			return [][]archivetest.Entry{{{Name: "a"}}, {{Name: "b"}}, {{Name: "c"}}}
		}, Limits{MaxLayers: 2}, errcode.SizeLimit},
		{"truncated", one(archivetest.Entry{Name: "f", Body: "short", DeclaredSize: 4096}), Limits{}, errcode.MalformedArchive},
		{"root-not-dir", one(archivetest.Entry{Name: ".", Type: '0'}), Limits{}, errcode.UnsafeArchiveEntry},
	}
	for _, c := range cases {
		for _, layout := range []archivetest.Layout{archivetest.Classic, archivetest.OCI} {
			t.Run(c.name+map[archivetest.Layout]string{archivetest.Classic: "/classic", archivetest.OCI: "/oci"}[layout], func(t *testing.T) {
				s := newSandbox(t)
				p := filepath.Join(s.base, "image.tar")
				if err := archivetest.Write(p, archivetest.Spec{Layout: layout, Layers: c.layers(s.sentinel)}); err != nil {
					t.Fatal(err)
				}
				err := openAndUnpack(p, s.dest, c.limits)
				if !errcode.HasCode(err, c.code) {
					t.Errorf("got %v, want code %s", err, c.code)
				}
				t.Log(err)
				s.check(t, "image.tar")
			})
		}
	}
}

func openAndUnpack(archive, dest string, limits Limits) error {
	im, err := Open(context.Background(), archive, Options{Limits: limits})
	if err != nil {
		return err
	}
	return im.Unpack(context.Background(), dest, nil)
}

// TestTampered: a layer whose bytes differ from the config's diff ID is
// refused, so Digest() can be trusted as a cache key.
func TestTampered(t *testing.T) {
	for _, layout := range []archivetest.Layout{archivetest.Classic, archivetest.OCI} {
		p := writeArchive(t, archivetest.Spec{Layout: layout, Layers: [][]archivetest.Entry{{{Name: "f", Body: "original-content"}}}})
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		b = bytes.Replace(b, []byte("original-content"), []byte("tampered-content"), 1)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		err = openAndUnpack(p, t.TempDir(), Limits{})
		if !errcode.HasCode(err, errcode.MalformedArchive) {
			t.Errorf("layout %d: got %v, want E405", layout, err)
		}
	}
}

func TestOpenMalformed(t *testing.T) {
	dir := t.TempDir()
	notTar := filepath.Join(dir, "not.tar")
	if err := os.WriteFile(notTar, bytes.Repeat([]byte("garbage!"), 200), 0o644); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(dir, "empty.tar")
	if err := os.WriteFile(empty, make([]byte, 1024), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{notTar, empty, filepath.Join(dir, "missing.tar"), dir} {
		if _, err := Open(context.Background(), p, Options{}); !errcode.HasCode(err, errcode.MalformedArchive) {
			t.Errorf("Open(%s) = %v, want E405", filepath.Base(p), err)
		}
	}
}

func TestUnpackProgressAndChange(t *testing.T) {
	p := writeArchive(t, archivetest.Spec{Layers: [][]archivetest.Entry{
		{{Name: "a", RandomSize: 3 << 20}}, {{Name: "b", RandomSize: 2 << 20}},
	}})
	im, err := Open(context.Background(), p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	var calls [][2]int64
	if err := im.Unpack(context.Background(), t.TempDir(), func(d, tot int64) { calls = append(calls, [2]int64{d, tot}) }); err != nil {
		t.Fatal(err)
	}
	if len(calls) < 2 {
		t.Fatalf("progress called %d times", len(calls))
	}
	last := calls[len(calls)-1]
	if last[0] != last[1] || last[1] < 5<<20 {
		t.Errorf("last progress = %v, want done == total ≥ 5 MiB", last)
	}
	for i := 1; i < len(calls); i++ {
		if calls[i][0] < calls[i-1][0] {
			t.Errorf("progress went backwards: %v", calls)
		}
	}
	// The archive changing between Open and Unpack is detected.
	later := time.Now().Add(time.Hour)
	if err := os.Chtimes(p, later, later); err != nil {
		t.Fatal(err)
	}
	if err := im.Unpack(context.Background(), t.TempDir(), nil); !errcode.HasCode(err, errcode.MalformedArchive) {
		t.Errorf("Unpack of a changed archive = %v, want E405", err)
	}
}

func TestUnpackCancelled(t *testing.T) {
	p := writeArchive(t, archivetest.Spec{Layers: [][]archivetest.Entry{{{Name: "a"}}}})
	im, err := Open(context.Background(), p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err = im.Unpack(ctx, t.TempDir(), nil)
	if !errors.Is(err, context.Canceled) || errcode.CodeOf(err) == "" {
		t.Errorf("got %v, want a coded error wrapping context.Canceled", err)
	}
}

func TestSpool(t *testing.T) {
	dir := t.TempDir()
	data := strings.Repeat("archive bytes ", 10000)
	tests := []struct {
		name    string
		max     int64
		ctx     func() context.Context
		code    errcode.Code
		wantErr bool
	}{
		{"fits", int64(len(data)), context.Background, "", false},
		{"default-limit", 0, context.Background, "", false},
		{"too-big", int64(len(data)) - 1, context.Background, errcode.SizeLimit, true},
		{"cancelled", 0, func() context.Context {
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			return ctx
		}, errcode.StagingFailed, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := Spool(tt.ctx(), strings.NewReader(data), dir, tt.max)
			if tt.wantErr {
				if !errcode.HasCode(err, tt.code) {
					t.Errorf("got %v, want %s", err, tt.code)
				}
				if left, _ := os.ReadDir(dir); len(left) != 0 {
					t.Errorf("spool left %v behind", left)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer os.Remove(p)
			if b, err := os.ReadFile(p); err != nil || string(b) != data {
				t.Errorf("spooled %d bytes, %v", len(b), err)
			}
		})
	}
}

// TestMultipleImages: an archive with two images in manifest.json is
// refused with a hint rather than guessed at.
func TestMultipleImages(t *testing.T) {
	p := writeArchive(t, archivetest.Spec{Layers: [][]archivetest.Entry{{{Name: "a"}}}})
	members := readMembers(t, p)
	var man []map[string]any
	if err := jsonUnmarshal(members["manifest.json"], &man); err != nil {
		t.Fatal(err)
	}
	members["manifest.json"] = jsonMarshal(t, append(man, man[0]))
	q := filepath.Join(t.TempDir(), "two.tar")
	writeMembers(t, q, members)
	_, err := Open(context.Background(), q, Options{})
	if !errcode.HasCode(err, errcode.MalformedArchive) || errcode.HintOf(err) == "" {
		t.Errorf("got %v, want E405 with a hint", err)
	}
}

// TestLayerCompression: compression is detected by magic bytes, whatever the
// member is called; formats without a decoder are refused by name.
func TestLayerCompression(t *testing.T) {
	tests := []struct {
		tool string
		code errcode.Code // "" → unpacks
	}{
		{"bzip2", ""},
		{"xz", errcode.MalformedArchive},
		{"zstd", errcode.MalformedArchive},
	}
	for _, tt := range tests {
		t.Run(tt.tool, func(t *testing.T) {
			bin := testenv.RequiresTool(t, tt.tool)
			p := writeArchive(t, archivetest.Spec{Layers: [][]archivetest.Entry{{{Name: "etc/os-release", Body: "ID=test\n"}}}})
			members := readMembers(t, p)
			for name, b := range members {
				if strings.HasSuffix(name, "/layer.tar") {
					cmd := exec.Command(bin, "-c")
					cmd.Stdin = bytes.NewReader(b)
					out, err := cmd.Output()
					if err != nil {
						t.Fatalf("%s: %v", tt.tool, err)
					}
					members[name] = out
				}
			}
			q := filepath.Join(t.TempDir(), "compressed.tar")
			writeMembers(t, q, members)
			dest := t.TempDir()
			err := openAndUnpack(q, dest, Limits{})
			if tt.code != "" {
				if !errcode.HasCode(err, tt.code) || !strings.Contains(err.Error(), tt.tool) {
					t.Errorf("got %v, want %s naming %s", err, tt.code, tt.tool)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if b, err := os.ReadFile(filepath.Join(dest, "etc/os-release")); err != nil || string(b) != "ID=test\n" {
				t.Errorf("etc/os-release = %q, %v", b, err)
			}
		})
	}
}
