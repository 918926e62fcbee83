-- Issue 6: pause/resume, snapshots to templates, fork. Keep ../sqlite/ in step.

-- What happens when a sandbox's time is up: 'destroy' (as before) or 'pause'.
ALTER TABLE sandboxes ADD COLUMN on_timeout TEXT NOT NULL DEFAULT 'destroy';

-- The templates catalogue. Platform templates (team = nil UUID) live on every host
-- that lists them (host_id NULL, host_name NULL). A team's snapshot lives on one host
-- under a host-level name ('snap-' + 16 random characters) that the agent knows.
ALTER TABLE templates ADD COLUMN host_id TEXT REFERENCES hosts(id);
ALTER TABLE templates ADD COLUMN host_name TEXT;
ALTER TABLE templates ADD COLUMN has_memory BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE templates ADD COLUMN allocated_bytes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE templates ADD COLUMN source_sandbox_id TEXT;
ALTER TABLE templates ADD COLUMN vcpus BIGINT NOT NULL DEFAULT 0;
ALTER TABLE templates ADD COLUMN memory_mb BIGINT NOT NULL DEFAULT 0;
ALTER TABLE templates ADD COLUMN disk_size_mb BIGINT NOT NULL DEFAULT 0;
CREATE UNIQUE INDEX templates_host_name ON templates(host_id, host_name);
-- Deleting a template checks the team's active sandboxes that use it.
CREATE INDEX sandboxes_team_template ON sandboxes(team_id, template, state);
