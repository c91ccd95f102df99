package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
)

// maxQMPLine bounds one QMP message read from QEMU.
const maxQMPLine = 1 << 20

// qmpExecute connects to QEMU's QMP socket, negotiates capabilities and runs
// one command, all bounded by ctx. One connection per command keeps the
// driver free of long-lived state; QMP is only used to stop a VM.
func qmpExecute(ctx context.Context, path, command string, args any) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return errcode.Wrap(errcode.APIError, err, "connect to QMP")
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	} else {
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	}
	sc := bufio.NewScanner(conn)
	sc.Buffer(make([]byte, 4096), maxQMPLine)
	// The greeting comes first.
	if !sc.Scan() {
		return errcode.Wrap(errcode.APIError, sc.Err(), "no QMP greeting")
	}
	for _, req := range []qmpRequest{{Execute: "qmp_capabilities"}, {Execute: command, Arguments: args}} {
		b, _ := json.Marshal(req)
		if _, err := conn.Write(append(b, '\n')); err != nil {
			return errcode.Wrap(errcode.APIError, err, "send QMP %s", req.Execute)
		}
		if err := qmpReply(sc, req.Execute); err != nil {
			return err
		}
	}
	return nil
}

type qmpRequest struct {
	Execute   string `json:"execute"`
	Arguments any    `json:"arguments,omitempty"`
}

// qmpReply reads until the reply to a command, skipping asynchronous
// events (which carry "event" instead of "return"/"error").
func qmpReply(sc *bufio.Scanner, command string) error {
	for sc.Scan() {
		var msg struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
		}
		if err := json.Unmarshal(sc.Bytes(), &msg); err != nil {
			return errcode.Wrap(errcode.APIError, err, "QMP %s: malformed reply", command)
		}
		if msg.Error != nil {
			return errcode.New(errcode.APIError, "QMP %s: %s: %s", command, msg.Error.Class, msg.Error.Desc)
		}
		if msg.Return != nil {
			return nil
		}
	}
	return errcode.Wrap(errcode.APIError, fmt.Errorf("connection closed: %v", sc.Err()), "QMP %s: no reply", command)
}

// ctrlAltDel returns the QMP send-key arguments for Ctrl-Alt-Del.
func ctrlAltDel() any {
	return map[string]any{"keys": []map[string]string{
		{"type": "qcode", "data": "ctrl"},
		{"type": "qcode", "data": "alt"},
		{"type": "qcode", "data": "delete"},
	}}
}
