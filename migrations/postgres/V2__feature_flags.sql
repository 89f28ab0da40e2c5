-- Feature flags, their audit log and the revision counter that caches poll.
-- Times are milliseconds since the Unix epoch.

CREATE TABLE feature_flags (
    -- Byte order whatever the database's collation, so listings sort as
    -- the SQLite store and the flag name type do.
    name       TEXT COLLATE "C" PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 64),
    enabled    BOOLEAN NOT NULL,
    rollout    SMALLINT NOT NULL CHECK (rollout BETWEEN 0 AND 100),
    -- JSON arrays of user ids, sorted and without duplicates.
    allow_list TEXT NOT NULL DEFAULT '[]',
    deny_list  TEXT NOT NULL DEFAULT '[]',
    metadata   TEXT NOT NULL DEFAULT '{}',
    version    BIGINT NOT NULL CHECK (version >= 1),
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- No foreign key to feature_flags: the history of a deleted flag stays.
CREATE TABLE feature_flag_audit (
    id       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    flag     TEXT NOT NULL,
    action   TEXT NOT NULL CHECK (action IN ('created', 'updated', 'deleted')),
    actor    TEXT NOT NULL,
    -- The flag revision right after this change.
    revision BIGINT NOT NULL,
    at       BIGINT NOT NULL,
    -- The flag as JSON before and after the change; NULL before a creation
    -- and after a deletion.
    before   TEXT,
    after    TEXT
);

CREATE INDEX feature_flag_audit_flag ON feature_flag_audit (flag, id);

-- One row. Every flag change adds 1 in the same transaction (and locks the
-- row, so concurrent changes from several processes are serialized), and a
-- cache can tell whether anything changed by reading this single value.
CREATE TABLE feature_flag_revision (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    revision BIGINT NOT NULL CHECK (revision >= 0)
);

-- A fresh install starts with batch operations switched on for everyone.
INSERT INTO feature_flag_revision (id, revision) VALUES (1, 1);

INSERT INTO feature_flags (name, enabled, rollout, version, created_at, updated_at)
VALUES (
    'batch_operations', TRUE, 100, 1,
    (extract(epoch FROM now()) * 1000)::BIGINT,
    (extract(epoch FROM now()) * 1000)::BIGINT
);

-- The "after" JSON has the shape the store writes for every other change,
-- with times as RFC 3339 strings in UTC.
INSERT INTO feature_flag_audit (flag, action, actor, revision, at, before, after)
SELECT name, 'created', 'system:migration', 1, created_at, NULL,
       json_build_object(
           'name', name,
           'enabled', enabled,
           'rollout', rollout,
           'allowList', allow_list::json,
           'denyList', deny_list::json,
           'metadata', metadata::json,
           'createdAt', to_char(to_timestamp(created_at / 1000.0) AT TIME ZONE 'UTC',
                                'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
           'updatedAt', to_char(to_timestamp(updated_at / 1000.0) AT TIME ZONE 'UTC',
                                'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
           'version', version
       )::TEXT
FROM feature_flags
WHERE name = 'batch_operations';
