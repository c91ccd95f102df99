package e2e

import (
	"os"
	"path/filepath"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/hyphae-run/hyphae/archive/archivetest"
)

// archive writes an OCI docker-save archive whose one layer holds prog as
// /app/prog, imports it as name and returns nothing: failures end the test.
func archive(t *testing.T, e *env, prog, name string, entrypoint []string) {
	t.Helper()
	body, err := os.ReadFile(prog)
	if err != nil {
		t.Fatal(err)
	}
	tarPath := filepath.Join(t.TempDir(), name+".tar")
	err = archivetest.Write(tarPath, archivetest.Spec{
		Layout: archivetest.OCI,
		Gzip:   true,
		Layers: [][]archivetest.Entry{{
			{Name: "app/"},
			{Name: "app/prog", Mode: 0o755, Body: string(body)},
		}},
		Config: v1.Config{Entrypoint: entrypoint[:1], Cmd: entrypoint[1:], WorkingDir: "/app"},
	})
	if err != nil {
		t.Fatal(err)
	}
	if r := e.hyphae(t, "import", tarPath, "--name", name, "-q"); r.code != 0 {
		t.Fatalf("import %s: exit %d\n%s%s", name, r.code, r.stdout, r.stderr)
	}
}
