package archive

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/hyphae-run/hyphae/archive/archivetest"
)

// These carry the archive path and the destination to the re-executed test
// binary that does the Unpack whose memory is measured.
const (
	rssArchiveEnv = "HYPHAE_ARCHIVE_RSS_ARCHIVE"
	rssDestEnv    = "HYPHAE_ARCHIVE_RSS_DEST"
)

// TestUnpackRSS unpacks a ~200 MB multi-layer archive in a child process
// and asserts the child's peak RSS stays under 100 MB: a memory bound, not
// a timing one. The archive uses gzip'd layers of incompressible data so
// that the decompression path is measured too.
func TestUnpackRSS(t *testing.T) {
	if p := os.Getenv(rssArchiveEnv); p != "" {
		im, err := Open(context.Background(), p, Options{})
		if err != nil {
			t.Fatal(err)
		}
		if err := im.Unpack(context.Background(), os.Getenv(rssDestEnv), nil); err != nil {
			t.Fatal(err)
		}
		return
	}
	if testing.Short() {
		t.Skip("builds and unpacks a 200 MB archive")
	}
	const fileSize, filesPerLayer, layerCount = 5 << 20, 10, 4
	var layers [][]archivetest.Entry
	for l := range layerCount {
		var es []archivetest.Entry
		for i := range filesPerLayer {
			es = append(es, archivetest.Entry{Name: fmt.Sprintf("data/l%d/f%d", l, i), RandomSize: fileSize})
		}
		for i := range 500 {
			es = append(es, archivetest.Entry{Name: fmt.Sprintf("small/l%d/%d", l, i), Body: "small file"})
		}
		layers = append(layers, es)
	}
	dir := t.TempDir()
	p := filepath.Join(dir, "big.tar")
	if err := archivetest.Write(p, archivetest.Spec{Layout: archivetest.OCI, Gzip: true, Layers: layers}); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	dest := filepath.Join(dir, "dest")
	if err := os.Mkdir(dest, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestUnpackRSS$")
	cmd.Env = append(os.Environ(), rssArchiveEnv+"="+p, rssDestEnv+"="+dest)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	peak := cmd.ProcessState.SysUsage().(*syscall.Rusage).Maxrss << 10 // kilobytes on Linux
	t.Logf("peak RSS of the child unpacking a %.0f MiB archive (%d layers): %.1f MiB",
		float64(fi.Size())/(1<<20), layerCount, float64(peak)/(1<<20))
	if peak >= 100<<20 {
		t.Errorf("peak RSS %d bytes, want < 100 MiB", peak)
	}
	// The child really unpacked it: spot-check one large file's content.
	name := "data/l3/f9"
	got, want := sha256.New(), sha256.New()
	f, err := os.Open(filepath.Join(dest, name))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := io.Copy(got, f); err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(want, archivetest.RandomBytes(name, fileSize)); err != nil {
		t.Fatal(err)
	}
	if string(got.Sum(nil)) != string(want.Sum(nil)) {
		t.Errorf("%s differs from what was packed", name)
	}
}
