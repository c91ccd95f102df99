-- Images are content-addressed: one row per digest, whatever its names.
CREATE TABLE images (
    digest      TEXT PRIMARY KEY CHECK (length(digest) = 71 AND substr(digest, 1, 7) = 'sha256:'),
    size_bytes  INTEGER NOT NULL CHECK (size_bytes >= 0),
    source      TEXT NOT NULL DEFAULT '',
    entrypoint  TEXT NOT NULL DEFAULT '[]', -- JSON array of strings
    vcpus       INTEGER NOT NULL DEFAULT 0,  -- default for runs; 0 = the runtime's default
    memory_mib  INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT NOT NULL                -- fixed-width UTC timestamp, sorts as text
);

-- A tag is a movable name for a digest. Owner is NULL for the CLI's own
-- namespace and a user id for Dimension's per-owner namespaces.
CREATE TABLE tags (
    owner       TEXT,
    name        TEXT NOT NULL,
    tag         TEXT NOT NULL,
    digest      TEXT NOT NULL REFERENCES images (digest) ON DELETE CASCADE,
    updated_at  TEXT NOT NULL
);
CREATE UNIQUE INDEX tags_ref ON tags (coalesce(owner, ''), name, tag);
CREATE INDEX tags_digest ON tags (digest);

CREATE TABLE kernels (
    name        TEXT PRIMARY KEY,
    path        TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    format      TEXT NOT NULL DEFAULT '', -- "elf" | "bzimage"; '' = not yet validated
    arch        TEXT NOT NULL DEFAULT '',
    size_bytes  INTEGER NOT NULL DEFAULT 0,
    vmms        TEXT NOT NULL DEFAULT '[]', -- JSON array of driver names that can boot it
    created_at  TEXT NOT NULL
);

-- VM rows outlive their images' tags on purpose (history of exited VMs), so
-- image_digest carries no foreign key; RemoveImage checks active VMs itself.
CREATE TABLE vms (
    id                TEXT PRIMARY KEY,
    image_digest      TEXT NOT NULL,
    image_ref         TEXT NOT NULL DEFAULT '',
    driver            TEXT NOT NULL DEFAULT '',
    pid               INTEGER NOT NULL DEFAULT 0,
    proc_start_ticks  INTEGER NOT NULL DEFAULT 0,
    state             TEXT NOT NULL,
    runtime_dir       TEXT NOT NULL DEFAULT '',
    console_path      TEXT NOT NULL DEFAULT '',
    spec              TEXT NOT NULL DEFAULT '{}',
    created_at        TEXT NOT NULL,
    started_at        TEXT,
    stopped_at        TEXT,
    exit_code         INTEGER
);
CREATE INDEX vms_image_state ON vms (image_digest, state);
