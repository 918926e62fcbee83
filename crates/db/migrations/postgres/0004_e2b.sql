-- Issue 7: the E2B-compatible API and sandbox proxy.

-- Whether the sandbox's guest agent port needs its envd access token through the
-- proxy (E2B's `secure`, default on), and whether traffic to it while paused
-- resumes it (E2B's auto-resume).
ALTER TABLE sandboxes ADD COLUMN secure BOOLEAN NOT NULL DEFAULT TRUE;
ALTER TABLE sandboxes ADD COLUMN auto_resume BOOLEAN NOT NULL DEFAULT FALSE;

-- Server-side secrets made once per deployment (e.g. the key that derives
-- sandboxes' envd access tokens), shared by every control plane on this database.
CREATE TABLE secrets (
    name TEXT PRIMARY KEY,
    value BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);
