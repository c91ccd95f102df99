-- Timestamps are INTEGER Unix microseconds (the driver's
-- _time_integer_format=unix_micro), so they sort and compare as numbers.
CREATE TABLE users (
	id TEXT PRIMARY KEY,
	name TEXT NOT NULL UNIQUE,
	role TEXT NOT NULL CHECK (role IN ('admin', 'user')),
	disabled INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1)),
	created_at INTEGER NOT NULL
);

CREATE TABLE api_keys (
	id TEXT PRIMARY KEY,
	user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
	prefix TEXT NOT NULL,
	hash TEXT NOT NULL UNIQUE,
	created_at INTEGER NOT NULL,
	revoked_at INTEGER,
	last_used_at INTEGER
);
CREATE INDEX api_keys_user ON api_keys (user_id);

CREATE TABLE bundles (
	id TEXT PRIMARY KEY,
	owner TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
	name TEXT NOT NULL,
	tag TEXT NOT NULL,
	image_digest TEXT NOT NULL,
	manifest TEXT NOT NULL CHECK (json_valid(manifest)),
	size_bytes INTEGER NOT NULL CHECK (size_bytes >= 0),
	created_at INTEGER NOT NULL,
	updated_at INTEGER NOT NULL,
	UNIQUE (owner, name, tag)
);

-- bundle_id is not a foreign key: an invocation outlives its bundle.
CREATE TABLE invocations (
	id TEXT PRIMARY KEY,
	owner TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
	bundle_id TEXT NOT NULL,
	bundle_ref TEXT NOT NULL,
	mode TEXT NOT NULL CHECK (mode IN ('sync', 'async')),
	status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'completed', 'failed', 'stopped', 'timed_out')),
	exit_code INTEGER,
	worker_id TEXT NOT NULL DEFAULT '',
	error TEXT NOT NULL DEFAULT '',
	created_at INTEGER NOT NULL,
	started_at INTEGER,
	completed_at INTEGER,
	duration_ms INTEGER CHECK (duration_ms >= 0)
);
CREATE INDEX invocations_owner ON invocations (owner);
CREATE INDEX invocations_unfinished ON invocations (status) WHERE status IN ('pending', 'running');

CREATE TABLE bundle_jobs (
	id TEXT PRIMARY KEY,
	owner TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
	status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
	stage TEXT NOT NULL DEFAULT '',
	error TEXT NOT NULL DEFAULT '',
	bundle_id TEXT NOT NULL DEFAULT '',
	created_at INTEGER NOT NULL,
	updated_at INTEGER NOT NULL
);
CREATE INDEX bundle_jobs_unfinished ON bundle_jobs (status) WHERE status IN ('queued', 'running');
