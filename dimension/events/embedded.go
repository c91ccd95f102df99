package events

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/hyphae-run/hyphae/errcode"
)

// embeddedMaxPayload is the embedded server's message size limit. NATS's
// default (1 MiB) is below what one event may carry: a protocol envelope
// may be 4 MiB, and a bundle's final stdout is one event.
const embeddedMaxPayload = 8 << 20

// startEmbedded starts a JetStream-enabled nats-server inside the process,
// storing under storeDir. It opens no network listener: the Log reaches it
// through an in-process connection, so nothing else on the host can.
func startEmbedded(storeDir string, readyTimeout time.Duration, log *slog.Logger) (*server.Server, error) {
	if storeDir == "" {
		return nil, errcode.New(errcode.InvalidArgument, "the embedded event log needs a store directory")
	}
	abs, err := filepath.Abs(storeDir)
	if err != nil {
		return nil, errcode.Wrap(errcode.InvalidArgument, err, "event log store directory %s", storeDir)
	}
	if err := os.MkdirAll(abs, 0o700); err != nil {
		return nil, errcode.Wrap(errcode.EventLogFailed, err, "creating event log store directory %s", abs)
	}
	ns, err := server.NewServer(&server.Options{
		ServerName: "dimension-embedded",
		JetStream:  true,
		StoreDir:   abs,
		DontListen: true,
		NoSigs:     true,
		MaxPayload: embeddedMaxPayload,
	})
	if err != nil {
		return nil, errcode.Wrap(errcode.EventLogFailed, err, "configuring the embedded NATS server")
	}
	ns.SetLoggerV2(slogAdapter{log.With("component", "nats-server")}, false, false, false)
	ns.Start()
	if !ns.ReadyForConnections(readyTimeout) {
		ns.Shutdown()
		ns.WaitForShutdown()
		return nil, errcode.New(errcode.Timeout, "the embedded NATS server was not ready within %s", readyTimeout).
			WithHint("check that " + abs + " is writable and not used by another process")
	}
	return ns, nil
}

// slogAdapter sends nats-server's log lines to slog. Its notices (a long
// start banner among them) go to debug so that the gateway's own start
// lines stay readable.
type slogAdapter struct{ l *slog.Logger }

func (a slogAdapter) Noticef(f string, v ...any) { a.l.Debug(fmt.Sprintf(f, v...)) }
func (a slogAdapter) Warnf(f string, v ...any)   { a.l.Warn(fmt.Sprintf(f, v...)) }
func (a slogAdapter) Fatalf(f string, v ...any)  { a.l.Error(fmt.Sprintf(f, v...)) }
func (a slogAdapter) Errorf(f string, v ...any)  { a.l.Error(fmt.Sprintf(f, v...)) }
func (a slogAdapter) Debugf(f string, v ...any)  { a.l.Debug(fmt.Sprintf(f, v...)) }
func (a slogAdapter) Tracef(f string, v ...any)  { a.l.Debug(fmt.Sprintf(f, v...)) }
