-- Per-team quotas (issue 5): a NULL column means "the control plane's configured
-- default". Admin endpoints to set them come later; the table exists so that teams can
-- differ without another migration. Keep ../sqlite/ in step.
CREATE TABLE team_quotas (
    team_id        TEXT PRIMARY KEY REFERENCES teams(id) ON DELETE CASCADE,
    max_sandboxes  BIGINT,
    max_vcpus      BIGINT,
    max_memory_mb  BIGINT,
    max_disk_mb    BIGINT
);

-- Admission counts a team's active rows; listing filters by state and pages by
-- (created_at, id); pruning looks for old finished rows.
CREATE INDEX sandboxes_team_state ON sandboxes(team_id, state);
CREATE INDEX sandboxes_state_updated ON sandboxes(state, updated_at);
