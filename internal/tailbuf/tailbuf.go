// Package tailbuf keeps the last bytes written to a writer: the bounded
// diagnostic output (a build tool's or a VMM's stderr) that error messages
// quote, which must not grow with what a process prints.
package tailbuf

import (
	"bytes"
	"strings"
	"sync"
)

// Buffer is an io.Writer that keeps the last max bytes written to it. It is
// safe for concurrent use.
type Buffer struct {
	mu  sync.Mutex
	max int
	buf []byte
	cut bool // something was dropped from the front
}

// New returns a Buffer keeping at most max bytes.
func New(max int) *Buffer { return &Buffer{max: max} }

// Write keeps the tail of what has been written; it never fails.
func (t *Buffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if over := len(t.buf) - t.max; over > 0 {
		t.buf = append(t.buf[:0], t.buf[over:]...)
		t.cut = true
	}
	return len(p), nil
}

// String returns the kept bytes as they are.
func (t *Buffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.buf)
}

// Lines returns the kept output for a message: from the first whole line
// when the front was cut off, without surrounding white space.
func (t *Buffer) Lines() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	b := t.buf
	if t.cut {
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			b = b[i+1:]
		}
	}
	return strings.TrimSpace(string(b))
}
