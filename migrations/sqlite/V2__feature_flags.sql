-- Feature flags, their audit log and the revision counter that caches poll.
-- Times are milliseconds since the Unix epoch.

CREATE TABLE feature_flags (
    name       TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 64),
    enabled    INTEGER NOT NULL CHECK (enabled IN (0, 1)),
    rollout    INTEGER NOT NULL CHECK (rollout BETWEEN 0 AND 100),
    -- JSON arrays of user ids, sorted and without duplicates.
    allow_list TEXT NOT NULL DEFAULT '[]',
    deny_list  TEXT NOT NULL DEFAULT '[]',
    metadata   TEXT NOT NULL DEFAULT '{}',
    version    INTEGER NOT NULL CHECK (version >= 1),
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

-- No foreign key to feature_flags: the history of a deleted flag stays.
CREATE TABLE feature_flag_audit (
    id       INTEGER PRIMARY KEY,
    flag     TEXT NOT NULL,
    action   TEXT NOT NULL CHECK (action IN ('created', 'updated', 'deleted')),
    actor    TEXT NOT NULL,
    -- The flag revision right after this change.
    revision INTEGER NOT NULL,
    at       INTEGER NOT NULL,
    -- The flag as JSON before and after the change; NULL before a creation
    -- and after a deletion.
    before   TEXT,
    after    TEXT
);

CREATE INDEX feature_flag_audit_flag ON feature_flag_audit (flag, id);

-- One row. Every flag change adds 1 in the same transaction, so a cache
-- can tell whether anything changed by reading this single value.
CREATE TABLE feature_flag_revision (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL CHECK (revision >= 0)
);

-- A fresh install starts with batch operations switched on for everyone.
INSERT INTO feature_flag_revision (id, revision) VALUES (1, 1);

INSERT INTO feature_flags (name, enabled, rollout, version, created_at, updated_at)
VALUES (
    'batch_operations', 1, 100, 1,
    CAST(unixepoch('subsec') * 1000 AS INTEGER),
    CAST(unixepoch('subsec') * 1000 AS INTEGER)
);

-- The "after" JSON has the shape the store writes for every other change,
-- with times as RFC 3339 strings in UTC.
INSERT INTO feature_flag_audit (flag, action, actor, revision, at, before, after)
SELECT name, 'created', 'system:migration', 1, created_at, NULL,
       json_object(
           'name', name,
           'enabled', json('true'),
           'rollout', rollout,
           'allowList', json(allow_list),
           'denyList', json(deny_list),
           'metadata', json(metadata),
           'createdAt', strftime('%Y-%m-%dT%H:%M:%fZ', created_at / 1000.0, 'unixepoch'),
           'updatedAt', strftime('%Y-%m-%dT%H:%M:%fZ', updated_at / 1000.0, 'unixepoch'),
           'version', version
       )
FROM feature_flags
WHERE name = 'batch_operations';
