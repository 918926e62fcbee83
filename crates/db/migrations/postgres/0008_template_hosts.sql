-- Issue 8, templates catalogue: which hosts hold each template, under which
-- host-level name. A platform template: every host that lists it (host_name = its
-- name); a team's snapshot: the host that made it and every host it was copied to
-- (all under its one `snap-*` name). Keep ../sqlite/ in step.
CREATE TABLE template_hosts (
    team_id     TEXT NOT NULL,
    name        TEXT NOT NULL,
    host_id     TEXT NOT NULL REFERENCES hosts(id),
    host_name   TEXT NOT NULL,
    added_at    BIGINT NOT NULL,                   -- Unix ms
    PRIMARY KEY (team_id, name, host_id),
    FOREIGN KEY (team_id, name) REFERENCES templates(team_id, name) ON DELETE CASCADE
);
CREATE INDEX template_hosts_host ON template_hosts(host_id, host_name);

-- Teams' snapshots made before: held by the host that made them.
INSERT INTO template_hosts (team_id, name, host_id, host_name, added_at)
SELECT team_id, name, host_id, host_name, created_at FROM templates
WHERE host_id IS NOT NULL AND host_name IS NOT NULL;
