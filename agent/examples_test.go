package agent

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/internal/testenv"
)

// The example bundles, through the real agent: the Go bundle package and
// the JavaScript module speak the events socket the agent serves.
func TestExampleBundles(t *testing.T) {
	root := testenv.ModuleRoot(t)
	bin := filepath.Join(t.TempDir(), "echo-go")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Dir = filepath.Join(root, "examples", "echo-go")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building examples/echo-go: %v\n%s", err, out)
	}

	// NODE_PATH stands in for `npm install`: it resolves the SDK from
	// this checkout.
	nodePath := t.TempDir()
	os.MkdirAll(filepath.Join(nodePath, "@hyphae-run"), 0o755)
	if err := os.Symlink(filepath.Join(root, "sdk", "js"), filepath.Join(nodePath, "@hyphae-run", "dimension")); err != nil {
		t.Fatal(err)
	}
	env := []guest.EnvVar{{Key: "PATH", Value: os.Getenv("PATH")}, {Key: "NODE_PATH", Value: nodePath}}

	tests := []struct {
		name string
		argv []string
		lang string
		node bool
	}{
		{"go", []string{bin}, "go", false},
		{"js", []string{"node", filepath.Join(root, "examples", "echo-js", "index.js")}, "js", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.node {
				testenv.RequiresTool(t, "node")
			}
			payload := `{"msg":"hi","exit_code":3}`
			o := run(t, Config{Program: &Program{Argv: tt.argv, Env: env}}, payload)
			if o.code != 3 {
				t.Fatalf("exit code %d (stderr %v)", o.code, o.kinds(KindStderr))
			}
			if n := len(o.kinds("progress")); n != 3 {
				t.Fatalf("%d progress events, want 3", n)
			}
			res := o.kinds("result")
			if len(res) != 1 || res[0].GetAttributes()["lang"] != tt.lang {
				t.Fatalf("result events %v", res)
			}
			var body struct{ Echo map[string]any }
			if err := json.Unmarshal(res[0].GetBody(), &body); err != nil || body.Echo["msg"] != "hi" {
				t.Fatalf("result body %s (%v)", res[0].GetBody(), err)
			}
			if len(o.kinds(KindStderr)) != 1 {
				t.Fatalf("stderr lines %v, want one", o.kinds(KindStderr))
			}
			if got := string(o.stdout(t).GetBody()); got != payload {
				t.Fatalf("stdout %q, want the payload", got)
			}
		})
	}
}
