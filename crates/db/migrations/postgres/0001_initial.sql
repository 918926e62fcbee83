-- hearth initial schema (PostgreSQL). Keep the SQLite set under ../sqlite/ in step:
-- same tables, columns and meanings. Times are Unix milliseconds (BIGINT) so that
-- comparisons and ordering behave the same on both backends.

CREATE TABLE teams (
    id          TEXT PRIMARY KEY,            -- UUID; the platform team is the nil UUID
    name        TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

-- The platform team owns built-in templates; it always exists.
INSERT INTO teams (id, name, created_at)
VALUES ('00000000-0000-0000-0000-000000000000', 'platform', 0);

CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,          -- key-xxxxxxxxxxxx (public half)
    team_id       TEXT NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL UNIQUE,      -- hex SHA-256 of the plaintext; plaintext is never stored
    is_admin      BOOLEAN NOT NULL DEFAULT FALSE,
    created_at    BIGINT NOT NULL,
    last_used_at  BIGINT
);
CREATE INDEX api_keys_team ON api_keys(team_id);

CREATE TABLE hosts (
    id            TEXT PRIMARY KEY,          -- host-xxxxxxxxxxxx
    url           TEXT NOT NULL,
    vmm           TEXT NOT NULL,
    accel         TEXT NOT NULL,
    last_seen_at  BIGINT NOT NULL
);

CREATE TABLE templates (
    name        TEXT NOT NULL,
    team_id     TEXT NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    size_bytes  BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (team_id, name)
);

CREATE TABLE sandboxes (
    id             TEXT PRIMARY KEY,         -- sb-xxxxxxxxxxxxxxxx
    team_id        TEXT NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    template       TEXT NOT NULL,
    state          TEXT NOT NULL,            -- pending|starting|running|paused|stopped|error
    vcpus          BIGINT NOT NULL,
    memory_mb      BIGINT NOT NULL,
    disk_size_mb   BIGINT NOT NULL,
    timeout_s      BIGINT NOT NULL,
    env_json       TEXT NOT NULL,
    metadata_json  TEXT NOT NULL,
    host_id        TEXT REFERENCES hosts(id),
    created_at     BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL,
    error          TEXT,
    updated_at     BIGINT NOT NULL
);
CREATE INDEX sandboxes_team ON sandboxes(team_id, created_at);
CREATE INDEX sandboxes_state ON sandboxes(state);
