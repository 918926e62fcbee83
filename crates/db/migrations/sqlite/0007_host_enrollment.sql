-- Issue 8, hosts: hosts an admin creates and an agent enrolls (mutual TLS with
-- certificates the control plane issues), their status and last heartbeat.
-- Keep ../postgres/0007_host_enrollment.sql in step.
ALTER TABLE hosts ADD COLUMN name TEXT;
-- pending (created, not enrolled), active, draining, unreachable, revoked.
-- Hosts recorded before this migration were static (--agent-url): active.
ALTER TABLE hosts ADD COLUMN status TEXT NOT NULL DEFAULT 'active';
-- Admin intent, kept across unreachable spells: 1 = no new sandboxes.
ALTER TABLE hosts ADD COLUMN drain INTEGER NOT NULL DEFAULT 0;
-- SHA-256 (hex) of the one-time enrollment token; NULL once used.
ALTER TABLE hosts ADD COLUMN enroll_token_hash TEXT;
ALTER TABLE hosts ADD COLUMN enroll_expires_at BIGINT;
-- SHA-256 (hex) of the DER of the certificate issued at enrollment: the control
-- plane accepts this certificate only.
ALTER TABLE hosts ADD COLUMN cert_fingerprint TEXT;
ALTER TABLE hosts ADD COLUMN created_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN enrolled_at BIGINT;
ALTER TABLE hosts ADD COLUMN last_heartbeat_at BIGINT;
-- Last reported capacity and load (the agent's Info).
ALTER TABLE hosts ADD COLUMN memory_capacity_mb BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN memory_used_mb BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN vcpu_capacity BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN vcpus_used BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN disk_free_mb BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN running BIGINT NOT NULL DEFAULT 0;
CREATE UNIQUE INDEX hosts_name ON hosts(name);
CREATE UNIQUE INDEX hosts_enroll_token ON hosts(enroll_token_hash);
