-- Issue 8, audit: an append-only record of who did what to which of a team's things.
-- The store has no UPDATE or DELETE of these rows.
CREATE TABLE audit_log (
    id            BIGSERIAL PRIMARY KEY,             -- increasing: the page cursor
    at            BIGINT NOT NULL,                    -- Unix ms
    team_id       TEXT NOT NULL,                      -- whose thing it is
    actor_key_id  TEXT,                               -- the API key; NULL: hearth itself (timeouts)
    action        TEXT NOT NULL,                      -- e.g. sandbox.create, key.revoke
    target        TEXT NOT NULL,                      -- sb-…, key-…, a template name, a team ID
    detail_json   TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_team ON audit_log(team_id, id);
