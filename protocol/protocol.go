// Package protocol frames the host↔guest protocol of dimension: a byte
// stream (vsock, a serial port, a pipe) carrying Envelopes, each prefixed by
// its encoded length as an unsigned LEB128 varint (ARCHITECTURE.md §3.2).
//
// The guest is untrusted and the host is remote, so a Reader bounds every
// frame (MaxFrameSize by default) and refuses an oversized length before
// allocating anything for it; a frame that declares a large length but
// does not deliver it costs no more memory than the bytes that arrived.
package protocol

//go:generate sh ../proto/gen.sh

import (
	"bufio"
	"encoding/binary"
	"errors"
	"io"
	"sync"

	"google.golang.org/protobuf/proto"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/protocol/pb"
)

// MaxFrameSize is the largest encoded Envelope either side accepts.
const MaxFrameSize = 4 << 20

// AgentVsockPort is the AF_VSOCK port the guest agent listens on.
const AgentVsockPort = 1024

// EmptyFrame is the frame of an Envelope without payload. It carries
// nothing and receivers skip it (IsEmpty). The agent writes one when it
// opens a serial channel: bytes sent to a serial port before the guest
// opens it are lost, so the host waits for it before sending the Request.
const EmptyFrame = "\x00"

// IsEmpty reports whether env carries no message (a readiness or
// keepalive frame), which receivers skip.
func IsEmpty(env *pb.Envelope) bool { return env.GetPayload() == nil }

// maxVarintLen is the longest unsigned LEB128 encoding of a uint64.
const maxVarintLen = binary.MaxVarintLen64

// growStep is how much of a large frame's body is allocated ahead of the
// bytes that actually arrive, and the largest buffer kept between frames.
const growStep = 64 << 10

// Reader reads length-prefixed Envelopes. It is not safe for concurrent
// use; one goroutine owns the read side of a channel.
type Reader struct {
	br  *bufio.Reader
	max int
	buf []byte
}

// NewReader returns a Reader of frames up to MaxFrameSize.
func NewReader(r io.Reader) *Reader { return NewReaderSize(r, MaxFrameSize) }

// NewReaderSize returns a Reader of frames up to max bytes (clamped to
// 1..MaxFrameSize).
func NewReaderSize(r io.Reader, max int) *Reader {
	if max <= 0 || max > MaxFrameSize {
		max = MaxFrameSize
	}
	return &Reader{br: bufio.NewReader(r), max: max}
}

// ReadEnvelope reads the next frame. It returns io.EOF, unwrapped, when the
// stream ends cleanly between frames. A truncated or undecodable frame is
// an errcode.MalformedFrame error, an oversized one errcode.FrameTooLarge,
// and a failing transport errcode.ChannelFailed wrapping the cause.
func (r *Reader) ReadEnvelope() (*pb.Envelope, error) {
	n, err := r.readLength()
	if err != nil {
		return nil, err
	}
	body, err := r.readBody(int(n))
	if err != nil {
		return nil, err
	}
	env := &pb.Envelope{}
	if err := proto.Unmarshal(body, env); err != nil {
		return nil, errcode.Wrap(errcode.MalformedFrame, err, "decoding a %d-byte envelope", n)
	}
	return env, nil
}

// readLength reads the varint length prefix byte by byte, so that a
// hostile prefix is refused as soon as it exceeds the cap.
func (r *Reader) readLength() (uint64, error) {
	var n uint64
	for i := 0; i < maxVarintLen; i++ {
		c, err := r.br.ReadByte()
		if err != nil {
			if i == 0 && errors.Is(err, io.EOF) {
				return 0, io.EOF
			}
			return 0, readErr(err, "reading a frame length")
		}
		n |= uint64(c&0x7f) << (7 * i)
		if n > uint64(r.max) {
			return 0, errcode.New(errcode.FrameTooLarge, "frame length exceeds the %d-byte cap", r.max)
		}
		if c < 0x80 {
			return n, nil
		}
	}
	return 0, errcode.New(errcode.MalformedFrame, "frame length varint is longer than %d bytes", maxVarintLen)
}

// readBody reads n bytes. Small frames reuse one buffer; a large frame's
// buffer grows with the bytes that arrive, never past n.
func (r *Reader) readBody(n int) ([]byte, error) {
	if n <= growStep {
		if cap(r.buf) < n {
			r.buf = make([]byte, growStep)
		}
		b := r.buf[:n]
		if _, err := io.ReadFull(r.br, b); err != nil {
			return nil, readErr(err, "reading a %d-byte frame", n)
		}
		return b, nil
	}
	b := make([]byte, 0, growStep)
	for len(b) < n {
		if len(b) == cap(b) {
			nb := make([]byte, len(b), min(2*cap(b), n))
			copy(nb, b)
			b = nb
		}
		m, err := r.br.Read(b[len(b):cap(b)])
		b = b[:len(b)+m]
		if err != nil && len(b) < n {
			return nil, readErr(err, "reading a %d-byte frame (got %d)", n, len(b))
		}
	}
	return b, nil
}

// readErr classifies a failed read: the stream ending inside a frame is a
// malformed frame; anything else is the transport failing.
func readErr(err error, format string, args ...any) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return errcode.Wrap(errcode.MalformedFrame, io.ErrUnexpectedEOF, "truncated frame: "+format, args...)
	}
	return errcode.Wrap(errcode.ChannelFailed, err, format, args...)
}

// Writer writes length-prefixed Envelopes. It is safe for concurrent use:
// each frame goes out in one Write call under a lock, so frames from
// different goroutines never interleave.
type Writer struct {
	mu sync.Mutex
	w  io.Writer
}

// NewWriter returns a Writer on w.
func NewWriter(w io.Writer) *Writer { return &Writer{w: w} }

// WriteEnvelope encodes env and writes it as one frame. An envelope over
// MaxFrameSize is refused (errcode.FrameTooLarge) and nothing is written.
func (w *Writer) WriteEnvelope(env *pb.Envelope) error {
	frame, err := AppendFrame(nil, env)
	if err != nil {
		return err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if _, err := w.w.Write(frame); err != nil {
		return errcode.Wrap(errcode.ChannelFailed, err, "writing a %d-byte frame", len(frame))
	}
	return nil
}

// AppendFrame appends env's frame (length prefix and encoding) to dst.
func AppendFrame(dst []byte, env *pb.Envelope) ([]byte, error) {
	size := proto.Size(env)
	if size > MaxFrameSize {
		return dst, errcode.New(errcode.FrameTooLarge, "envelope of %d bytes exceeds the %d-byte cap", size, MaxFrameSize)
	}
	dst = binary.AppendUvarint(dst, uint64(size))
	out, err := proto.MarshalOptions{UseCachedSize: true}.MarshalAppend(dst, env)
	if err != nil {
		return dst, errcode.Wrap(errcode.MalformedFrame, err, "encoding an envelope")
	}
	return out, nil
}
