package store

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"regexp"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
)

// Role is a user's role.
type Role string

// Roles.
const (
	RoleAdmin Role = "admin"
	RoleUser  Role = "user"
)

// Valid reports whether r is a known role.
func (r Role) Valid() bool { return r == RoleAdmin || r == RoleUser }

// User is an account.
type User struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Role      Role      `json:"role"`
	Disabled  bool      `json:"disabled"`
	CreatedAt time.Time `json:"created_at"`
}

// APIKey is a key's record; the key itself is never stored.
type APIKey struct {
	ID     string `json:"id"`
	UserID string `json:"user_id"`
	// Prefix is the key's first KeyPrefixLen characters, shown so that a
	// person can tell keys apart.
	Prefix     string     `json:"prefix"`
	CreatedAt  time.Time  `json:"created_at"`
	RevokedAt  *time.Time `json:"revoked_at,omitempty"`
	LastUsedAt *time.Time `json:"last_used_at,omitempty"`
}

// Principal is who an API key authenticates.
type Principal struct {
	User User
	Key  APIKey
}

// Bundle is an owner's name:tag pointing at a registry image.
type Bundle struct {
	ID    string `json:"id"`
	Owner string `json:"owner"`
	Name  string `json:"name"`
	Tag   string `json:"tag"`
	// ImageDigest is the registry image, "sha256:<64 hex>".
	ImageDigest string    `json:"image_digest"`
	Manifest    Manifest  `json:"manifest"`
	SizeBytes   int64     `json:"size_bytes"`
	CreatedAt   time.Time `json:"created_at"`
	UpdatedAt   time.Time `json:"updated_at"`
}

// Ref returns "name:tag".
func (b Bundle) Ref() string { return b.Name + ":" + b.Tag }

// Manifest is a bundle's run settings. Zero fields mean "server default";
// the runner clamps timeouts to the server's maxima.
type Manifest struct {
	BootTimeoutSecs       int `json:"boot_timeout_secs,omitempty"`
	ProcessingTimeoutSecs int `json:"processing_timeout_secs,omitempty"`
	VCPUs                 int `json:"vcpus,omitempty"`
	MemoryMiB             int `json:"memory_mib,omitempty"`
	// Entrypoint overrides the image's entrypoint when not empty.
	Entrypoint []string `json:"entrypoint,omitempty"`
}

// Manifest bounds: generous, but small enough that a typo is caught.
const (
	maxManifestTimeoutSecs = 24 * 60 * 60
	maxManifestVCPUs       = 64
	maxManifestMemoryMiB   = 1 << 20
	maxEntrypointArgs      = 256
)

// Validate checks m's bounds.
func (m Manifest) Validate() error {
	bad := func(format string, args ...any) error { return errcode.New(errcode.InvalidManifest, format, args...) }
	switch {
	case m.BootTimeoutSecs < 0 || m.BootTimeoutSecs > maxManifestTimeoutSecs:
		return bad("manifest boot_timeout_secs %d is out of range 0..%d", m.BootTimeoutSecs, maxManifestTimeoutSecs)
	case m.ProcessingTimeoutSecs < 0 || m.ProcessingTimeoutSecs > maxManifestTimeoutSecs:
		return bad("manifest processing_timeout_secs %d is out of range 0..%d", m.ProcessingTimeoutSecs, maxManifestTimeoutSecs)
	case m.VCPUs < 0 || m.VCPUs > maxManifestVCPUs:
		return bad("manifest vcpus %d is out of range 0..%d", m.VCPUs, maxManifestVCPUs)
	case m.MemoryMiB < 0 || m.MemoryMiB > maxManifestMemoryMiB:
		return bad("manifest memory_mib %d is out of range 0..%d", m.MemoryMiB, maxManifestMemoryMiB)
	case len(m.Entrypoint) > maxEntrypointArgs:
		return bad("manifest entrypoint has %d arguments (at most %d)", len(m.Entrypoint), maxEntrypointArgs)
	case len(m.Entrypoint) > 0 && m.Entrypoint[0] == "":
		return bad("manifest entrypoint's program is empty")
	}
	return nil
}

// ParseManifest decodes and validates a manifest document. Unknown fields
// are refused, so that a misspelt setting is not silently ignored.
func ParseManifest(data []byte) (Manifest, error) {
	var m Manifest
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return Manifest{}, errcode.Wrap(errcode.InvalidManifest, err, "bad bundle manifest")
	}
	if dec.More() {
		return Manifest{}, errcode.New(errcode.InvalidManifest, "bad bundle manifest: trailing data after the JSON object")
	}
	if len(m.Entrypoint) == 0 {
		m.Entrypoint = nil // "[]" and absent both mean "the image's own"
	}
	if err := m.Validate(); err != nil {
		return Manifest{}, err
	}
	return m, nil
}

// Mode is how a run was asked for.
type Mode string

// Modes.
const (
	ModeSync  Mode = "sync"
	ModeAsync Mode = "async"
)

// Valid reports whether m is a known mode.
func (m Mode) Valid() bool { return m == ModeSync || m == ModeAsync }

// Status is an invocation's status.
type Status string

// Statuses. Completed, Failed, Stopped and TimedOut are final.
const (
	StatusPending   Status = "pending"
	StatusRunning   Status = "running"
	StatusCompleted Status = "completed"
	StatusFailed    Status = "failed"
	StatusStopped   Status = "stopped"
	StatusTimedOut  Status = "timed_out"
)

// Valid reports whether s is a known status.
func (s Status) Valid() bool {
	switch s {
	case StatusPending, StatusRunning, StatusCompleted, StatusFailed, StatusStopped, StatusTimedOut:
		return true
	}
	return false
}

// Final reports whether s can never change again.
func (s Status) Final() bool { return s.Valid() && s != StatusPending && s != StatusRunning }

// Invocation is one run.
type Invocation struct {
	ID    string `json:"id"`
	Owner string `json:"owner"`
	// BundleID is the bundle's id when the run started; BundleRef is the
	// name:tag it was asked for by, kept for history after the bundle moves
	// or goes.
	BundleID    string     `json:"bundle_id"`
	BundleRef   string     `json:"bundle_ref"`
	Mode        Mode       `json:"mode"`
	Status      Status     `json:"status"`
	ExitCode    *int       `json:"exit_code,omitempty"`
	WorkerID    string     `json:"worker_id,omitempty"`
	Error       string     `json:"error,omitempty"`
	CreatedAt   time.Time  `json:"created_at"`
	StartedAt   *time.Time `json:"started_at,omitempty"`
	CompletedAt *time.Time `json:"completed_at,omitempty"`
	DurationMS  *int64     `json:"duration_ms,omitempty"`
}

// InvocationUpdate changes a run. Status is required; nil and empty fields
// keep what is stored. Entering running without StartedAt stamps the
// current time, and so does entering a final status without CompletedAt.
type InvocationUpdate struct {
	Status      Status
	ExitCode    *int
	WorkerID    string
	Error       string
	StartedAt   *time.Time
	CompletedAt *time.Time
	DurationMS  *int64
}

// JobStatus is a bundle upload job's status.
type JobStatus string

// Job statuses. Succeeded and Failed are final.
const (
	JobQueued    JobStatus = "queued"
	JobRunning   JobStatus = "running"
	JobSucceeded JobStatus = "succeeded"
	JobFailed    JobStatus = "failed"
)

// Valid reports whether s is a known job status.
func (s JobStatus) Valid() bool {
	return s == JobQueued || s == JobRunning || s == JobSucceeded || s == JobFailed
}

// Final reports whether s can never change again.
func (s JobStatus) Final() bool { return s == JobSucceeded || s == JobFailed }

// BundleJob is an asynchronous bundle upload.
type BundleJob struct {
	ID     string    `json:"id"`
	Owner  string    `json:"owner"`
	Status JobStatus `json:"status"`
	// Stage names the step in progress (free text for people, such as
	// "unpacking" or "mkfs").
	Stage string `json:"stage,omitempty"`
	Error string `json:"error,omitempty"`
	// BundleID is set once the job has produced a bundle.
	BundleID string `json:"bundle_id,omitempty"`
	// WorkerID names the gateway that accepted the upload and runs its
	// import (its archive is spooled on that host), so that a restarting
	// gateway fails only its own unfinished jobs. Jobs recorded before
	// worker ids existed have none.
	WorkerID  string    `json:"worker_id,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
}

// BundleJobUpdate changes a job. Status is required; empty fields keep what
// is stored.
type BundleJobUpdate struct {
	Status   JobStatus
	Stage    string
	Error    string
	BundleID string
}

// ID prefixes name what an id refers to, which helps people reading logs.
const (
	UserIDPrefix       = "usr_"
	KeyIDPrefix        = "key_"
	BundleIDPrefix     = "bnd_"
	InvocationIDPrefix = "inv_"
	JobIDPrefix        = "job_"
)

// NewID returns prefix followed by 32 random hex digits.
func NewID(prefix string) string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails on Linux
	return prefix + hex.EncodeToString(b[:])
}

var idRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$`)

// ValidateID checks a caller-chosen id: letters, digits, '_' and '-',
// starting with a letter or digit, at most 128 characters. Such ids are safe
// in URLs and NATS subjects.
func ValidateID(id string) error {
	if !idRE.MatchString(id) {
		return errcode.New(errcode.InvalidArgument, "invalid id %q", id).
			WithHint("use letters, digits, '_' and '-', starting with a letter or digit (at most 128 characters)")
	}
	return nil
}

var userNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,63}$`)

// ValidateUserName checks a user name: lowercase letters, digits, '.', '_'
// and '-', starting with a letter or digit, at most 64 characters.
func ValidateUserName(name string) error {
	if !userNameRE.MatchString(name) {
		return errcode.New(errcode.InvalidArgument, "invalid user name %q", name).
			WithHint("use lowercase letters, digits, '.', '_' and '-', starting with a letter or digit (at most 64 characters)")
	}
	return nil
}
