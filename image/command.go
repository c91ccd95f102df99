package image

import (
	"strings"

	"github.com/hyphae-run/hyphae/errcode"
)

// SplitCommand splits a command line such as the value of
// `--entrypoint "node server.js --port 8080"` into argv the way a POSIX
// shell splits words, without expanding anything: whitespace separates
// words; 'single quotes' keep everything literally; "double quotes" keep
// everything but a backslash before $, `, ", \ or a newline; outside quotes
// a backslash keeps the next character; a backslash-newline is removed.
// Empty quotes (a pair of double or of single quotes) give an empty
// argument. An unterminated quote or a trailing backslash is an E201 error, as is a
// command with no words.
func SplitCommand(s string) ([]string, error) {
	var (
		argv    []string
		word    strings.Builder
		inWord  bool // word holds an argument, possibly empty ("")
		quote   byte // 0, '\'' or '"'
		escaped bool
	)
	for i := 0; i < len(s); i++ { // bytes: every special character is ASCII
		c := s[i]
		switch {
		case escaped:
			escaped = false
			switch {
			case c == '\n': // a line continuation, removed
			case quote == '"' && strings.IndexByte("$`\"\\", c) < 0:
				word.WriteByte('\\')
				word.WriteByte(c)
			default:
				word.WriteByte(c)
				inWord = true
			}
		case quote == '\'':
			if c == '\'' {
				quote = 0
			} else {
				word.WriteByte(c)
			}
		case c == '\\':
			escaped = true
		case quote == '"':
			if c == '"' {
				quote = 0
			} else {
				word.WriteByte(c)
			}
		case c == '\'' || c == '"':
			quote, inWord = c, true
		case c == ' ' || c == '\t' || c == '\n':
			if inWord {
				argv = append(argv, word.String())
				word.Reset()
				inWord = false
			}
		default:
			word.WriteByte(c)
			inWord = true
		}
	}
	if quote != 0 {
		return nil, errcode.New(errcode.InvalidArgument, "command %q has an unterminated %c quote", s, quote)
	}
	if escaped {
		return nil, errcode.New(errcode.InvalidArgument, "command %q ends in a backslash", s)
	}
	if inWord {
		argv = append(argv, word.String())
	}
	if len(argv) == 0 || argv[0] == "" {
		return nil, errcode.New(errcode.NoEntrypoint, "command %q names no program", s)
	}
	return argv, nil
}
