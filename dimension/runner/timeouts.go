package runner

import (
	"time"

	"github.com/hyphae-run/hyphae/dimension/store"
)

// Server defaults and maxima of the run timeouts (the DIMENSION_*_SECS
// settings' defaults).
const (
	DefaultBootTimeout          = 30 * time.Second
	DefaultProcessingTimeout    = 300 * time.Second
	DefaultMaxBootTimeout       = 60 * time.Second
	DefaultMaxProcessingTimeout = 600 * time.Second
)

// Limits are the server's timeout defaults and maxima
// (DIMENSION_BOOT_TIMEOUT_SECS, DIMENSION_PROCESSING_TIMEOUT_SECS,
// DIMENSION_MAX_BOOT_TIMEOUT_SECS, DIMENSION_MAX_PROCESSING_TIMEOUT_SECS).
// Zero fields take the package defaults.
type Limits struct {
	BootTimeout, ProcessingTimeout       time.Duration
	MaxBootTimeout, MaxProcessingTimeout time.Duration
}

// withDefaults fills zero fields and keeps each default within its
// maximum.
func (l Limits) withDefaults() Limits {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&l.BootTimeout, DefaultBootTimeout)
	def(&l.ProcessingTimeout, DefaultProcessingTimeout)
	def(&l.MaxBootTimeout, DefaultMaxBootTimeout)
	def(&l.MaxProcessingTimeout, DefaultMaxProcessingTimeout)
	l.BootTimeout = min(l.BootTimeout, l.MaxBootTimeout)
	l.ProcessingTimeout = min(l.ProcessingTimeout, l.MaxProcessingTimeout)
	return l
}

// Requested are the timeouts a run's request asks for, in whole seconds
// (POST /run's boot_timeout_secs and timeout_secs); 0 asks for nothing.
type Requested struct {
	BootSecs, ProcessingSecs int
}

// ResolveTimeouts picks a run's boot and processing timeouts: each is the
// request's (when > 0), else the bundle manifest's, else the server
// default, and is clamped to the server's maximum.
func ResolveTimeouts(req Requested, m store.Manifest, l Limits) (boot, processing time.Duration) {
	l = l.withDefaults()
	pick := func(def, max time.Duration, secs ...int) time.Duration {
		for _, s := range secs {
			if s > 0 {
				// Compared in seconds: a huge request must not overflow
				// into a negative duration.
				if int64(s) > int64(max/time.Second) {
					return max
				}
				return time.Duration(s) * time.Second
			}
		}
		return def
	}
	boot = pick(l.BootTimeout, l.MaxBootTimeout, req.BootSecs, m.BootTimeoutSecs)
	processing = pick(l.ProcessingTimeout, l.MaxProcessingTimeout, req.ProcessingSecs, m.ProcessingTimeoutSecs)
	return boot, processing
}
