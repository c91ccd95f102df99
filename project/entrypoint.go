package project

import (
	"encoding/json"
	"path"
	"regexp"
	"strings"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
)

// projectFiles answers the questions the entrypoint derivation asks about
// a project. Paths are slash-separated and relative to the project root.
type projectFiles interface {
	// isFile reports whether rel is a regular file, following symlinks
	// only while they stay inside the project.
	isFile(rel string) bool
	// firstLine returns the first line of the file rel, or "" when it
	// cannot be read.
	firstLine(rel string) string
}

// jsEntry is what package.json says about how to start the program.
type jsEntry struct {
	argv   []string
	script string         // the script node runs, under /app; "" for node -e/-p
	env    []guest.EnvVar // from VAR=value words in front of scripts.start
}

// startHint is shown whenever scripts.start cannot be turned into a
// command line.
const startHint = "the image has no shell: make scripts.start `node FILE [ARGS...]` (VAR=value prefixes are fine), or pass --entrypoint"

// parsePackageJSON derives the entrypoint of a JavaScript project from its
// package.json: scripts.start, then main, then index.js.
//
// The image has no shell and no npm, so scripts.start is interpreted here,
// not run through sh: it must be one simple command — `node [OPTIONS] FILE
// [ARGS...]`, or a program whose shebang names node (a file in the project
// or a node_modules/.bin entry such as `next start`), which is then run by
// node directly. VAR=value words in front become environment variables.
// Anything needing a shell (pipes, &&, redirections, $ expansions, globs)
// is an errcode.NoEntrypoint error with a hint, because the alternative —
// an image that fails at boot — is worse.
func parsePackageJSON(data []byte, files projectFiles) (jsEntry, error) {
	var pkg struct {
		Main    json.RawMessage            `json:"main"`
		Scripts map[string]json.RawMessage `json:"scripts"`
	}
	if err := json.Unmarshal(data, &pkg); err != nil {
		return jsEntry{}, errcode.Wrap(errcode.InvalidManifest, err, "package.json is not a valid JSON object")
	}
	if raw, ok := pkg.Scripts["start"]; ok {
		var start string
		if err := json.Unmarshal(raw, &start); err != nil {
			return jsEntry{}, errcode.New(errcode.InvalidManifest, "package.json scripts.start is not a string")
		}
		if strings.TrimSpace(start) != "" {
			return entryFromStart(start, files)
		}
	}
	if len(pkg.Main) > 0 && string(pkg.Main) != "null" {
		var main string
		if err := json.Unmarshal(pkg.Main, &main); err != nil {
			return jsEntry{}, errcode.New(errcode.InvalidManifest, "package.json main is not a string")
		}
		if main != "" {
			script, err := appScript(main, files, "package.json main")
			if err != nil {
				return jsEntry{}, err
			}
			return jsEntry{argv: []string{NodePath, script}, script: script}, nil
		}
	}
	if files.isFile("index.js") {
		return jsEntry{argv: []string{NodePath, AppDir + "/index.js"}, script: AppDir + "/index.js"}, nil
	}
	return jsEntry{}, errcode.New(errcode.NoEntrypoint, "package.json has no scripts.start or main, and there is no index.js").
		WithHint("add scripts.start (`node FILE`), main, or an index.js, or pass --entrypoint")
}

var envAssignment = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*=`)

// entryFromStart turns scripts.start into a command line; see
// parsePackageJSON.
func entryFromStart(start string, files projectFiles) (jsEntry, error) {
	words, err := shellWords(start)
	if err != nil {
		return jsEntry{}, wrapHint(errcode.NoEntrypoint, err, startHint, "scripts.start %q cannot run without a shell", start)
	}
	var e jsEntry
	for len(words) > 0 && envAssignment.MatchString(words[0]) {
		k, v, _ := strings.Cut(words[0], "=")
		e.env = append(e.env, guest.EnvVar{Key: k, Value: v})
		words = words[1:]
	}
	if len(words) == 0 {
		return jsEntry{}, errcode.New(errcode.NoEntrypoint, "scripts.start %q runs no program", start).WithHint(startHint)
	}
	cmd, args := words[0], words[1:]
	if b := path.Base(cmd); b == "node" || b == "nodejs" {
		e.argv, e.script, err = nodeCommand(args, files)
		if err != nil {
			return jsEntry{}, err
		}
		return e, nil
	}
	// A program with a node shebang: run it with node, as the shell would.
	rel := "node_modules/.bin/" + cmd
	if strings.Contains(cmd, "/") {
		rel = path.Clean(cmd)
	}
	if path.IsAbs(rel) || !files.isFile(rel) {
		return jsEntry{}, errcode.New(errcode.NoEntrypoint, "scripts.start runs %q, which is neither node nor a script of the project", cmd).WithHint(startHint)
	}
	flags, ok := nodeShebang(files.firstLine(rel))
	if !ok {
		return jsEntry{}, errcode.New(errcode.NoEntrypoint, "scripts.start runs %s, which is not a node script (its first line is not a node shebang)", rel).WithHint(startHint)
	}
	e.script = AppDir + "/" + rel
	e.argv = append(append(append([]string{NodePath}, flags...), e.script), args...)
	return e, nil
}

// nodeValueFlags are node options whose value is the next word.
var nodeValueFlags = map[string]bool{
	"-r": true, "--require": true, "--import": true, "--loader": true, "--experimental-loader": true,
	"-C": true, "--conditions": true, "--env-file": true, "--input-type": true, "--title": true,
	"--inspect-port": true, "--redirect-warnings": true, "--diagnostic-dir": true, "--report-dir": true,
	"--cpu-prof-dir": true, "--heap-prof-dir": true, "--max-http-header-size": true, "--stack-trace-limit": true,
}

// nodeCommand builds the argv for `node ARGS`: options kept as they are,
// the script made absolute under /app, its arguments kept. It returns the
// argv and the script.
func nodeCommand(args []string, files projectFiles) ([]string, string, error) {
	argv := []string{NodePath}
	eval := false
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			if i+1 < len(args) {
				return nodeScript(argv, args[i+1:], files)
			}
		case a == "-e" || a == "--eval" || a == "-p" || a == "--print":
			eval = true
		case a == "-":
			return nil, "", errcode.New(errcode.NoEntrypoint, "scripts.start runs node on stdin, which is /dev/null in the image").WithHint(startHint)
		case strings.HasPrefix(a, "-"):
			if nodeValueFlags[a] && i+1 < len(args) {
				argv = append(argv, a)
				i++
				a = args[i]
			}
		default:
			if !eval {
				return nodeScript(argv, args[i:], files)
			}
		}
		argv = append(argv, a)
	}
	if !eval {
		return nil, "", errcode.New(errcode.NoEntrypoint, "scripts.start runs node without a script").WithHint(startHint)
	}
	return argv, "", nil
}

// nodeScript appends the script rest[0], made absolute, and its
// arguments, and returns the argv and the script.
func nodeScript(argv, rest []string, files projectFiles) ([]string, string, error) {
	script, err := appScript(rest[0], files, "scripts.start")
	if err != nil {
		return nil, "", err
	}
	return append(append(argv, script), rest[1:]...), script, nil
}

// appScript checks that the script p (relative to the project, or absolute
// under /app) exists the way node would resolve it — as given, with .js,
// .json, .node, .mjs or .cjs added, or as a directory with index.js or
// package.json — and returns its absolute path under /app.
func appScript(p string, files projectFiles, what string) (string, error) {
	rel := p
	if path.IsAbs(p) {
		r, ok := strings.CutPrefix(path.Clean(p), AppDir+"/")
		if !ok {
			return "", errcode.New(errcode.NoEntrypoint, "%s names %s, which is outside %s", what, p, AppDir).WithHint(startHint)
		}
		rel = r
	}
	rel = path.Clean(rel)
	if rel == "." || rel == ".." || strings.HasPrefix(rel, "../") {
		return "", errcode.New(errcode.NoEntrypoint, "%s names %s, which is outside the project", what, p).WithHint(startHint)
	}
	for _, c := range []string{rel, rel + ".js", rel + ".json", rel + ".node", rel + ".mjs", rel + ".cjs", rel + "/index.js", rel + "/package.json"} {
		if files.isFile(c) {
			return AppDir + "/" + rel, nil
		}
	}
	return "", errcode.New(errcode.NoEntrypoint, "%s names %s, which is not in the project", what, p).
		WithHint("build the project first (files the start script needs must exist before `hyphae build`), or fix " + what)
}

// nodeShebang parses a "#!" line and reports whether it runs node, with
// the options it passes to node: "#!/usr/bin/env node",
// "#!/usr/bin/env -S node --flag", "#!/usr/local/bin/node --flag".
func nodeShebang(line string) ([]string, bool) {
	rest, ok := strings.CutPrefix(line, "#!")
	if !ok {
		return nil, false
	}
	f := strings.Fields(rest)
	if len(f) > 0 && path.Base(f[0]) == "env" {
		f = f[1:]
		if len(f) > 0 && f[0] == "-S" {
			f = f[1:]
		}
	}
	if len(f) == 0 || (path.Base(f[0]) != "node" && path.Base(f[0]) != "nodejs") {
		return nil, false
	}
	return f[1:], true
}

// shellWords splits a command the way sh splits a simple command: words
// separated by blanks, with '…' and "…" quoting and backslash escapes. It
// refuses everything that needs a shell to mean something — operators,
// redirections, expansions, globs, comments, subshells — rather than
// guessing.
func shellWords(s string) ([]string, error) {
	var words []string
	var cur strings.Builder
	inWord := false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == ' ' || c == '\t':
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		case c == '\'':
			end := strings.IndexByte(s[i+1:], '\'')
			if end < 0 {
				return nil, errcode.New(errcode.NoEntrypoint, "unterminated ' quote")
			}
			cur.WriteString(s[i+1 : i+1+end])
			i += end + 1
			inWord = true
		case c == '"':
			i++
			for ; i < len(s) && s[i] != '"'; i++ {
				switch s[i] {
				case '$', '`':
					return nil, errcode.New(errcode.NoEntrypoint, "%q expansion inside double quotes", s[i])
				case '\\':
					if i+1 < len(s) && strings.IndexByte("$`\"\\", s[i+1]) >= 0 {
						i++
					}
				}
				cur.WriteByte(s[i])
			}
			if i >= len(s) {
				return nil, errcode.New(errcode.NoEntrypoint, "unterminated \" quote")
			}
			inWord = true
		case c == '\\':
			if i+1 >= len(s) || s[i+1] == '\n' {
				return nil, errcode.New(errcode.NoEntrypoint, "line continuation")
			}
			i++
			cur.WriteByte(s[i])
			inWord = true
		case strings.IndexByte("|&;<>()$`*?[\n\r", c) >= 0:
			return nil, errcode.New(errcode.NoEntrypoint, "shell syntax %q", c)
		case !inWord && (c == '#' || c == '~'):
			return nil, errcode.New(errcode.NoEntrypoint, "shell syntax %q at the start of a word", c)
		default:
			cur.WriteByte(c)
			inWord = true
		}
	}
	if inWord {
		words = append(words, cur.String())
	}
	return words, nil
}
