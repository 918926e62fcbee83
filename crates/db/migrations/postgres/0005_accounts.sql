-- Issue 8, accounts: API keys that can be listed by a visible prefix, expire and be
-- revoked (a revoked key stays listed, for the record, and never authenticates
-- again); team names unique so that operators can name teams on the command line.

-- "hk_" + the first 8 characters of the secret's random part (NULL for keys made
-- before this migration: their secrets are not stored, so it cannot be derived).
ALTER TABLE api_keys ADD COLUMN prefix TEXT;
-- Unix ms after which the key no longer authenticates; NULL: never expires.
ALTER TABLE api_keys ADD COLUMN expires_at BIGINT;
-- Unix ms of its revocation; NULL: not revoked.
ALTER TABLE api_keys ADD COLUMN revoked_at BIGINT;
-- The key that made it (NULL: made at bootstrap or by a migration).
ALTER TABLE api_keys ADD COLUMN created_by TEXT;

CREATE UNIQUE INDEX teams_name ON teams(name);
