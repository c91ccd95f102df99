// Package store is dimension's persistent state: users and their API keys,
// bundles (an owner's name:tag pointing at an image digest and a manifest),
// invocations (one run each) and bundle upload jobs.
//
// Store is implemented by dimension/store/sqlite (the embedded default) and
// dimension/store/postgres (for production and several gateways on one
// database); both pass the same conformance suite, dimension/store/storetest.
//
// Every error carries an errcode code, so that the gateway can map it to an
// HTTP status without knowing the backend: errcode.NotFound (E501) for a
// missing or another owner's record, errcode.AlreadyExists (E507) for a
// taken user name, errcode.LastAdmin (E508) for a change that would leave no
// enabled admin, errcode.Conflict (E504) for an update of a finished
// invocation or job, errcode.Unauthenticated (E509) for a refused key,
// errcode.InvalidArgument, InvalidName and InvalidManifest for bad input, and
// errcode.StoreError (E506) when the database itself fails.
package store

import (
	"context"
	"time"
)

// Store is the whole of dimension's persistent state. Implementations are
// safe for concurrent use, also by several processes sharing one database.
type Store interface {
	Users
	APIKeys
	Bundles
	Invocations
	BundleJobs
	// Close releases the database.
	Close() error
}

// Users manages accounts. Every change that could remove the last enabled
// admin (delete, demote, disable) runs its check and its write in one
// serialized transaction and fails with errcode.LastAdmin instead.
type Users interface {
	// CreateUser adds a user; a taken name is errcode.AlreadyExists.
	CreateUser(ctx context.Context, name string, role Role) (User, error)
	// GetUser returns the user with id.
	GetUser(ctx context.Context, id string) (User, error)
	// GetUserByName returns the user called name.
	GetUserByName(ctx context.Context, name string) (User, error)
	// ListUsers returns every user, oldest first.
	ListUsers(ctx context.Context) ([]User, error)
	// DeleteUser removes a user with its keys, bundles, jobs and invocations.
	DeleteUser(ctx context.Context, id string) error
	// SetUserRole promotes or demotes a user.
	SetUserRole(ctx context.Context, id string, role Role) (User, error)
	// SetUserDisabled disables (every key refused) or re-enables a user.
	SetUserDisabled(ctx context.Context, id string, disabled bool) (User, error)
	// CountAdmins counts enabled admins.
	CountAdmins(ctx context.Context) (int, error)
	// EnsureBootstrapAdmin creates the admin BootstrapAdminName with one API
	// key when the store has no users at all, and returns that key's
	// plaintext with created set. Otherwise it changes nothing and returns
	// "", false. Concurrent calls, also from other processes, create at most
	// one admin.
	EnsureBootstrapAdmin(ctx context.Context) (key string, created bool, err error)
}

// APIKeys manages the bearer keys of users. Only a key's SHA-256 is stored.
type APIKeys interface {
	// CreateAPIKey makes a new key for the user and returns its record and
	// its plaintext, which is never available again.
	CreateAPIKey(ctx context.Context, userID string) (APIKey, string, error)
	// ListAPIKeys returns the user's keys, revoked ones included, oldest
	// first.
	ListAPIKeys(ctx context.Context, userID string) ([]APIKey, error)
	// RevokeAPIKey revokes one of the user's keys. Revoking a revoked key
	// keeps its first revocation time.
	RevokeAPIKey(ctx context.Context, userID, keyID string) (APIKey, error)
	// Authenticate resolves a plaintext key to its user. A malformed,
	// unknown or revoked key, or a disabled user, is errcode.Unauthenticated.
	// The key's last use is recorded (at LastUsedGranularity).
	Authenticate(ctx context.Context, plaintext string) (Principal, error)
}

// Bundles manages bundles. Names are namespaced per owner: every method
// takes the owner, and another owner's bundle reads as not found.
type Bundles interface {
	// PutBundle stores b under (b.Owner, b.Name, b.Tag). When that tag exists
	// it is moved: the record keeps its id and takes b's digest, manifest and
	// size. The ID, CreatedAt and UpdatedAt of b are ignored.
	PutBundle(ctx context.Context, b Bundle) (Bundle, error)
	// GetBundle resolves ref, a bundle id or "name[:tag]" (tag defaults to
	// latest), among the owner's bundles.
	GetBundle(ctx context.Context, owner, ref string) (Bundle, error)
	// ListBundles returns the owner's bundles ordered by name and tag.
	ListBundles(ctx context.Context, owner string) ([]Bundle, error)
	// DeleteBundle removes the owner's bundle named by ref (as in GetBundle)
	// and returns what it removed.
	DeleteBundle(ctx context.Context, owner, ref string) (Bundle, error)
}

// Invocations records runs. A run moves pending → running → one final
// status (completed, failed, stopped, timed_out); a final status is never
// overwritten, and a running run never goes back to pending.
type Invocations interface {
	// CreateInvocation records a new pending run. inv.ID may be given (it
	// must be valid per ValidateID) or left empty to have one made; Owner,
	// BundleID, BundleRef and Mode are required, WorkerID is optional, and
	// the remaining fields are ignored.
	CreateInvocation(ctx context.Context, inv Invocation) (Invocation, error)
	// UpdateInvocation applies u to the run with id. Updating a run in a
	// final status is errcode.Conflict.
	UpdateInvocation(ctx context.Context, id string, u InvocationUpdate) (Invocation, error)
	// GetInvocation returns the owner's run with id.
	GetInvocation(ctx context.Context, owner, id string) (Invocation, error)
	// ListRunningInvocations returns every run not yet in a final status
	// (pending or running), oldest first: after a restart these are orphans
	// to reap.
	ListRunningInvocations(ctx context.Context) ([]Invocation, error)
}

// BundleJobs records asynchronous bundle uploads. A job moves queued →
// running → succeeded or failed; a final status is never overwritten.
type BundleJobs interface {
	// CreateBundleJob records a queued job for owner, run by the gateway
	// workerID (optional, as for invocations).
	CreateBundleJob(ctx context.Context, owner, workerID string) (BundleJob, error)
	// UpdateBundleJob applies u to the job with id. Updating a finished job
	// is errcode.Conflict.
	UpdateBundleJob(ctx context.Context, id string, u BundleJobUpdate) (BundleJob, error)
	// GetBundleJob returns the owner's job with id.
	GetBundleJob(ctx context.Context, owner, id string) (BundleJob, error)
	// ListUnfinishedBundleJobs returns every queued or running job of every
	// worker, oldest first: after a restart a gateway fails its own.
	ListUnfinishedBundleJobs(ctx context.Context) ([]BundleJob, error)
}

// LastUsedGranularity is how stale an API key's LastUsedAt may be before
// Authenticate writes it again, so that a busy key does not turn every
// request into a database write.
const LastUsedGranularity = time.Minute

// BootstrapAdminName is the user EnsureBootstrapAdmin creates.
const BootstrapAdminName = "bootstrap-admin"
