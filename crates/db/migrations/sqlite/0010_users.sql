-- Issue 8, accounts: users, people who sign in (the dashboard) with an email and a
-- password, each a member of one team, some of them admins. A signed-in session is an
-- API key of kind 'session' that belongs to its user: short-lived, revoked at logout
-- or when the user is disabled, and never listed among the team's keys.
CREATE TABLE users (
    id             TEXT PRIMARY KEY,             -- usr-xxxxxxxxxxxx
    team_id        TEXT NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    email          TEXT NOT NULL,                -- lowercase
    password_hash  TEXT NOT NULL,                -- argon2id, PHC string (salt inside)
    is_admin       BOOLEAN NOT NULL DEFAULT FALSE,
    created_at     BIGINT NOT NULL,
    disabled_at    BIGINT                        -- NULL: may sign in
);
CREATE UNIQUE INDEX users_email ON users(email);
CREATE INDEX users_team ON users(team_id);

ALTER TABLE api_keys ADD COLUMN kind TEXT NOT NULL DEFAULT 'api';  -- 'api' | 'session'
ALTER TABLE api_keys ADD COLUMN user_id TEXT REFERENCES users(id) ON DELETE CASCADE;
CREATE INDEX api_keys_user ON api_keys(user_id);
