package project

import (
	"path"
	"slices"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
)

// fakeFiles is a project given as a map from relative path to content.
type fakeFiles map[string]string

func (f fakeFiles) isFile(rel string) bool { _, ok := f[rel]; return ok }

func (f fakeFiles) firstLine(rel string) string {
	line, _, _ := strings.Cut(f[rel], "\n")
	return line
}

// sampleProject is the file set the table and the fuzz target resolve
// against.
var sampleProject = fakeFiles{
	"index.js":                  "console.log(1)",
	"server.js":                 "",
	"lib/main.js":               "",
	"dist/index.js":             "",
	"node_modules/.bin/next":    "#!/usr/bin/env node\nrequire('next')",
	"node_modules/.bin/flagged": "#!/usr/bin/env -S node --enable-source-maps\n",
	"node_modules/.bin/sh-tool": "#!/bin/sh\necho hi",
	"bin/cli":                   "#!/usr/local/bin/node\n",
}

func TestParsePackageJSON(t *testing.T) {
	tests := []struct {
		name     string
		pkg      string
		files    fakeFiles
		argv     []string
		env      []guest.EnvVar
		wantCode errcode.Code
	}{
		{name: "start node index.js", pkg: `{"scripts":{"start":"node index.js"}}`,
			argv: []string{"/usr/bin/node", "/app/index.js"}},
		{name: "start with options and args", pkg: `{"scripts":{"start":"node --max-old-space-size=64 -r dotenv/config server.js --port 3000"}}`,
			argv: []string{"/usr/bin/node", "--max-old-space-size=64", "-r", "dotenv/config", "/app/server.js", "--port", "3000"}},
		{name: "start without extension", pkg: `{"scripts":{"start":"node server"}}`,
			argv: []string{"/usr/bin/node", "/app/server"}},
		{name: "start ./ path and quoted arg", pkg: `{"scripts":{"start":"node ./lib/main.js 'hello world' \"a\\\"b\""}}`,
			argv: []string{"/usr/bin/node", "/app/lib/main.js", "hello world", `a"b`}},
		{name: "start absolute under /app", pkg: `{"scripts":{"start":"node /app/dist/index.js"}}`,
			argv: []string{"/usr/bin/node", "/app/dist/index.js"}},
		{name: "start directory with index.js", pkg: `{"scripts":{"start":"node dist"}}`,
			argv: []string{"/usr/bin/node", "/app/dist"}},
		{name: "env assignments become env", pkg: `{"scripts":{"start":"NODE_ENV=staging PORT=8080 node server.js"}}`,
			argv: []string{"/usr/bin/node", "/app/server.js"},
			env:  []guest.EnvVar{{Key: "NODE_ENV", Value: "staging"}, {Key: "PORT", Value: "8080"}}},
		{name: "node -e", pkg: `{"scripts":{"start":"node -e 'console.log(1)'"}}`,
			argv: []string{"/usr/bin/node", "-e", "console.log(1)"}},
		{name: "bin with node shebang", pkg: `{"scripts":{"start":"next start -p 3000"}}`,
			argv: []string{"/usr/bin/node", "/app/node_modules/.bin/next", "start", "-p", "3000"}},
		{name: "shebang options kept", pkg: `{"scripts":{"start":"flagged"}}`,
			argv: []string{"/usr/bin/node", "--enable-source-maps", "/app/node_modules/.bin/flagged"}},
		{name: "project script with node shebang", pkg: `{"scripts":{"start":"./bin/cli serve"}}`,
			argv: []string{"/usr/bin/node", "/app/bin/cli", "serve"}},
		{name: "main", pkg: `{"main":"lib/main.js"}`,
			argv: []string{"/usr/bin/node", "/app/lib/main.js"}},
		{name: "empty start falls back to main", pkg: `{"main":"server.js","scripts":{"start":"  "}}`,
			argv: []string{"/usr/bin/node", "/app/server.js"}},
		{name: "index.js fallback", pkg: `{"name":"x"}`,
			argv: []string{"/usr/bin/node", "/app/index.js"}},
		{name: "nothing", pkg: `{"name":"x"}`, files: fakeFiles{"other.js": ""}, wantCode: errcode.NoEntrypoint},
		{name: "missing main", pkg: `{"main":"gone.js"}`, wantCode: errcode.NoEntrypoint},
		{name: "missing start script", pkg: `{"scripts":{"start":"node dist/server.js"}}`, wantCode: errcode.NoEntrypoint},
		{name: "needs a shell: &&", pkg: `{"scripts":{"start":"npm run build && node index.js"}}`, wantCode: errcode.NoEntrypoint},
		{name: "needs a shell: expansion", pkg: `{"scripts":{"start":"node index.js $PORT"}}`, wantCode: errcode.NoEntrypoint},
		{name: "needs a shell: expansion in double quotes", pkg: `{"scripts":{"start":"node index.js \"$PORT\""}}`, wantCode: errcode.NoEntrypoint},
		{name: "needs a shell: redirection", pkg: `{"scripts":{"start":"node index.js > log"}}`, wantCode: errcode.NoEntrypoint},
		{name: "needs a shell: glob", pkg: `{"scripts":{"start":"node *.js"}}`, wantCode: errcode.NoEntrypoint},
		{name: "non-node program", pkg: `{"scripts":{"start":"python3 app.py"}}`, wantCode: errcode.NoEntrypoint},
		{name: "shell-script bin", pkg: `{"scripts":{"start":"sh-tool"}}`, wantCode: errcode.NoEntrypoint},
		{name: "script outside the project", pkg: `{"scripts":{"start":"node ../index.js"}}`, wantCode: errcode.NoEntrypoint},
		{name: "absolute script outside /app", pkg: `{"scripts":{"start":"node /etc/passwd"}}`, wantCode: errcode.NoEntrypoint},
		{name: "node without script", pkg: `{"scripts":{"start":"node --inspect"}}`, wantCode: errcode.NoEntrypoint},
		{name: "only assignments", pkg: `{"scripts":{"start":"A=1"}}`, wantCode: errcode.NoEntrypoint},
		{name: "unterminated quote", pkg: `{"scripts":{"start":"node 'index.js"}}`, wantCode: errcode.NoEntrypoint},
		{name: "start not a string", pkg: `{"scripts":{"start":["node","x"]}}`, wantCode: errcode.InvalidManifest},
		{name: "main not a string", pkg: `{"main":42}`, wantCode: errcode.InvalidManifest},
		{name: "not JSON", pkg: `{"scripts":`, wantCode: errcode.InvalidManifest},
		{name: "not an object", pkg: `[1,2]`, wantCode: errcode.InvalidManifest},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			files := tt.files
			if files == nil {
				files = sampleProject
			}
			e, err := parsePackageJSON([]byte(tt.pkg), files)
			if tt.wantCode != "" {
				if !errcode.HasCode(err, tt.wantCode) {
					t.Fatalf("err = %v, want code %s", err, tt.wantCode)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(e.argv, tt.argv) {
				t.Errorf("argv = %q, want %q", e.argv, tt.argv)
			}
			if !slices.Equal(e.env, tt.env) {
				t.Errorf("env = %v, want %v", e.env, tt.env)
			}
		})
	}
}

func TestShellNeedHintsAtEntrypoint(t *testing.T) {
	_, err := parsePackageJSON([]byte(`{"scripts":{"start":"node a.js | tee log"}}`), sampleProject)
	if hint := errcode.HintOf(err); !strings.Contains(hint, "--entrypoint") || !strings.Contains(hint, "no shell") {
		t.Fatalf("hint = %q, want one naming the missing shell and --entrypoint", hint)
	}
}

func TestShellWords(t *testing.T) {
	tests := []struct {
		in   string
		want []string
		bad  bool
	}{
		{in: "node  index.js\targ", want: []string{"node", "index.js", "arg"}},
		{in: `node 'a b' "c d" e\ f`, want: []string{"node", "a b", "c d", "e f"}},
		{in: `node '' x`, want: []string{"node", "", "x"}},
		{in: `node "a\"b\\c\d"`, want: []string{"node", `a"b\c\d`}},
		{in: `node a#b`, want: []string{"node", "a#b"}},
		{in: `node '$HOME' '*'`, want: []string{"node", "$HOME", "*"}},
		{in: `node a; rm x`, bad: true},
		{in: `node a # comment`, bad: true},
		{in: `node ~/x`, bad: true},
		{in: "node a\nnode b", bad: true},
		{in: "node `id`", bad: true},
		{in: "node (a)", bad: true},
		{in: `node a\`, bad: true},
		{in: `node "a`, bad: true},
	}
	for _, tt := range tests {
		got, err := shellWords(tt.in)
		if tt.bad {
			if err == nil {
				t.Errorf("shellWords(%q) = %q, want an error", tt.in, got)
			}
			continue
		}
		if err != nil || !slices.Equal(got, tt.want) {
			t.Errorf("shellWords(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
		}
	}
}

func TestNodeShebang(t *testing.T) {
	tests := []struct {
		line  string
		flags []string
		ok    bool
	}{
		{"#!/usr/bin/env node", []string{}, true},
		{"#!/usr/bin/node --harmony", []string{"--harmony"}, true},
		{"#! /usr/bin/env -S node --a --b", []string{"--a", "--b"}, true},
		{"#!/usr/bin/env nodejs", []string{}, true},
		{"#!/bin/sh", nil, false},
		{"#!/usr/bin/env", nil, false},
		{"console.log(1)", nil, false},
	}
	for _, tt := range tests {
		flags, ok := nodeShebang(tt.line)
		if ok != tt.ok || (ok && !slices.Equal(flags, tt.flags)) {
			t.Errorf("nodeShebang(%q) = %q, %v; want %q, %v", tt.line, flags, ok, tt.flags, tt.ok)
		}
	}
}

// FuzzParsePackageJSON checks, for any package.json, that the derivation
// either fails with a coded error or yields a command that node can run
// in the image: node first, a script that is a clean path under /app and
// exists in the project, environment keys that are identifiers.
func FuzzParsePackageJSON(f *testing.F) {
	for _, s := range []string{
		`{"scripts":{"start":"node index.js"}}`,
		`{"scripts":{"start":"PORT=1 node -r x server.js --a 'b c'"}}`,
		`{"scripts":{"start":"next start"}}`,
		`{"scripts":{"start":"node -- ../x"}}`,
		`{"scripts":{"start":"node /app/./lib/../server.js"}}`,
		`{"main":"lib/main"}`,
		`{"main":"/app/../etc"}`,
		`{}`,
		`null`,
		`{"scripts":{"start":"node \"a\\\\\" b"}}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		e, err := parsePackageJSON(data, sampleProject)
		if err != nil {
			if errcode.CodeOf(err) == "" {
				t.Fatalf("error without a code: %v", err)
			}
			return
		}
		if len(e.argv) < 2 || e.argv[0] != NodePath {
			t.Fatalf("argv %q does not run node with something", e.argv)
		}
		if e.script != "" {
			if !slices.Contains(e.argv, e.script) {
				t.Fatalf("script %q not in argv %q", e.script, e.argv)
			}
			rel, ok := strings.CutPrefix(e.script, AppDir+"/")
			if !ok || path.Clean(rel) != rel || rel == ".." || strings.HasPrefix(rel, "../") {
				t.Fatalf("script %q is not a clean path under %s", e.script, AppDir)
			}
			found := false
			for _, c := range []string{rel, rel + ".js", rel + ".json", rel + ".node", rel + ".mjs", rel + ".cjs", rel + "/index.js", rel + "/package.json"} {
				found = found || sampleProject.isFile(c)
			}
			if !found {
				t.Fatalf("script %q is not in the project", e.script)
			}
		} else if !slices.ContainsFunc(e.argv, func(a string) bool { return a == "-e" || a == "--eval" || a == "-p" || a == "--print" }) {
			t.Fatalf("argv %q has neither a script nor -e/-p", e.argv)
		}
		for _, v := range e.env {
			if !envAssignment.MatchString(v.String()) {
				t.Fatalf("env key %q is not an identifier", v.Key)
			}
		}
	})
}
