package agent

import (
	"bufio"
	"bytes"
	"errors"
	"io"
)

// lineReader splits a stream into lines of at most max bytes.
type lineReader struct {
	br *bufio.Reader
}

func newLineReader(r io.Reader, max int) *lineReader {
	return &lineReader{br: bufio.NewReaderSize(r, max)}
}

// next returns the next line without its "\n" (or "\r\n"). partial is true
// when the line was cut at the size bound or the stream ended without a
// newline. The slice is valid until the next call. err is io.EOF (or the
// read error) once the stream is exhausted; a final unterminated piece
// comes with it.
func (l *lineReader) next() (line []byte, partial bool, err error) {
	line, err = l.br.ReadSlice('\n')
	switch {
	case err == nil:
		line = bytes.TrimSuffix(line[:len(line)-1], []byte{'\r'})
		return line, false, nil
	case errors.Is(err, bufio.ErrBufferFull):
		return line, true, nil
	default:
		return line, len(line) > 0, err
	}
}
