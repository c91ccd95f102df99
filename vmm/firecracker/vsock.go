package firecracker

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
)

// Hybrid vsock: Firecracker listens on a Unix socket; a host program that
// wants guest port P connects, writes "CONNECT P\n" and reads back
// "OK <host port>\n", after which the socket is a byte stream to the guest.
// When nothing in the guest listens on P yet, Firecracker closes the
// connection instead, so the dialer retries with a fresh one.
const (
	// maxReplyLine bounds the handshake reply: "OK " plus a u32 and "\n".
	maxReplyLine = 32
	// handshakeTimeout bounds one attempt's write and read, so that a
	// Firecracker that accepts but never answers cannot eat the whole
	// deadline in one go.
	handshakeTimeout = 2 * time.Second
	// First and largest pause between attempts.
	minRetryPause = 10 * time.Millisecond
	maxRetryPause = 250 * time.Millisecond
)

// DialVsock opens a host-initiated connection to guest port over the hybrid
// vsock socket at udsPath, retrying until ctx ends. The returned connection
// has no deadline set and no bytes of the stream consumed.
func DialVsock(ctx context.Context, udsPath string, port uint32, logger *slog.Logger) (net.Conn, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	pause := minRetryPause
	attempts := 0
	for {
		attempts++
		conn, err := connectOnce(ctx, udsPath, port)
		if err == nil {
			logger.Debug("vsock channel open", "uds", udsPath, "port", port, "attempts", attempts)
			return conn, nil
		}
		logger.Debug("vsock connect attempt failed", "uds", udsPath, "port", port, "attempt", attempts, "err", err)
		t := time.NewTimer(pause)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, errcode.Wrap(errcode.ChannelFailed, err,
				"no answer from guest vsock port %d through %s after %d attempts (%v)", port, udsPath, attempts, ctx.Err())
		case <-t.C:
		}
		pause = min(2*pause, maxRetryPause)
	}
}

// connectOnce makes one handshake attempt on a fresh connection.
func connectOnce(ctx context.Context, udsPath string, port uint32) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", udsPath)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(handshakeTimeout)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	if err := conn.SetDeadline(deadline); err != nil {
		conn.Close()
		return nil, err
	}
	// One write: Firecracker parses the request from the first read it
	// makes, and a split request may be taken as a malformed one.
	if _, err := conn.Write([]byte(fmt.Sprintf("CONNECT %d\n", port))); err != nil {
		conn.Close()
		return nil, fmt.Errorf("sending CONNECT: %w", err)
	}
	line, err := readLine(conn, maxReplyLine)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("reading the CONNECT reply: %w", err)
	}
	if _, err := ParseConnectReply(line); err != nil {
		conn.Close()
		return nil, err
	}
	if err := conn.SetDeadline(time.Time{}); err != nil {
		conn.Close()
		return nil, err
	}
	return conn, nil
}

// readLine reads up to and including the first '\n', one byte at a time so
// that nothing after the line (the guest's first bytes) is consumed.
func readLine(conn net.Conn, limit int) (string, error) {
	buf := make([]byte, 0, limit)
	b := make([]byte, 1)
	for len(buf) < limit {
		n, err := conn.Read(b)
		if n == 1 {
			buf = append(buf, b[0])
			if b[0] == '\n' {
				return string(buf), nil
			}
		}
		if err != nil {
			return "", err
		}
	}
	return "", fmt.Errorf("reply longer than %d bytes without a newline", limit)
}

// ParseConnectReply parses Firecracker's answer to CONNECT: exactly
// "OK <n>\n" with n a canonical decimal u32 (the host-side port Firecracker
// assigned). Anything else is an error.
func ParseConnectReply(line string) (uint32, error) {
	rest, ok := strings.CutPrefix(line, "OK ")
	if !ok {
		return 0, errcode.New(errcode.ChannelFailed, "vsock handshake: reply %q does not start with \"OK \"", line)
	}
	digits, ok := strings.CutSuffix(rest, "\n")
	if !ok {
		return 0, errcode.New(errcode.ChannelFailed, "vsock handshake: reply %q does not end with a newline", line)
	}
	n, err := strconv.ParseUint(digits, 10, 32)
	if err != nil || strconv.FormatUint(n, 10) != digits {
		return 0, errcode.New(errcode.ChannelFailed, "vsock handshake: %q in reply %q is not a port number", digits, line)
	}
	return uint32(n), nil
}
