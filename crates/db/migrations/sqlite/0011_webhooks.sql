-- Issue 8, events: a team's webhooks. Each gets the team's audit entries (the same
-- ones as GET /v1/events) POSTed in order, signed with its secret (HMAC-SHA256); the
-- cursor is the last entry delivered (at least once: a failed POST is retried).
CREATE TABLE webhooks (
    id               TEXT PRIMARY KEY,       -- wh-xxxxxxxxxxxx
    team_id          TEXT NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    url              TEXT NOT NULL,
    secret           TEXT NOT NULL,          -- signs deliveries; shown once at creation
    events           TEXT NOT NULL,          -- comma-separated action patterns (`sandbox.*`, `*`)
    created_at       BIGINT NOT NULL,
    cursor_id        BIGINT NOT NULL,        -- audit_log.id delivered last
    failures         BIGINT NOT NULL DEFAULT 0,  -- consecutive failed attempts
    last_error       TEXT,
    last_delivery_at BIGINT,
    disabled_at      BIGINT                  -- set after too many failures in a row
);
CREATE INDEX webhooks_team ON webhooks(team_id);
