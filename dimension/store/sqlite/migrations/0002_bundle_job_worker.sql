-- Upload jobs record the gateway that runs them, so that a gateway
-- restarting on a shared database fails only its own unfinished jobs.
-- Rows from before this migration get '' (no worker known).
ALTER TABLE bundle_jobs ADD COLUMN worker_id TEXT NOT NULL DEFAULT '';
