-- The durable queue: batches, their jobs, dependencies, the batch-finished
-- outbox and per-kind controls. Times are milliseconds since the Unix epoch.

CREATE TABLE batches (
    id               TEXT PRIMARY KEY,
    owner            TEXT NOT NULL,
    kind             TEXT NOT NULL,
    status           TEXT NOT NULL
        CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')),
    -- 0 while items are still being inserted: such a batch is invisible to
    -- every read, and is deleted on start-up if its writer died.
    accepted         INTEGER NOT NULL DEFAULT 0 CHECK (accepted IN (0, 1)),
    -- Items whose staging hold has been lifted; equals item_count once every
    -- item of an accepted batch is claimable.
    released_count   INTEGER NOT NULL DEFAULT 0,
    item_count       INTEGER NOT NULL DEFAULT 0,
    succeeded        INTEGER NOT NULL DEFAULT 0,
    failed           INTEGER NOT NULL DEFAULT 0,
    cancelled        INTEGER NOT NULL DEFAULT 0,
    priority         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL CHECK (max_attempts >= 1),
    run_at           INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0 CHECK (cancel_requested IN (0, 1)),
    generation       INTEGER NOT NULL DEFAULT 0,
    -- Unmet batch dependencies; the batch's items are held while non-zero.
    waiting_on       INTEGER NOT NULL DEFAULT 0,
    config           TEXT NOT NULL DEFAULT '{}',
    metadata         TEXT NOT NULL DEFAULT '{}',
    correlation_id   TEXT,
    idempotency_key  TEXT,
    request_digest   TEXT,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER
);

CREATE UNIQUE INDEX batches_idempotency ON batches (owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Listing a user's batches newest first; ids are UUID v7, so they sort by time.
CREATE INDEX batches_owner ON batches (owner, id);
CREATE INDEX batches_finished ON batches (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE jobs (
    id               INTEGER PRIMARY KEY,
    batch_id         TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    seq              INTEGER NOT NULL,
    kind             TEXT NOT NULL,
    payload          TEXT NOT NULL,
    status           TEXT NOT NULL
        CHECK (status IN ('scheduled', 'queued', 'processing', 'retrying', 'succeeded', 'dead', 'cancelled')),
    priority         INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    -- Reasons the job may not run yet: unmet dependencies, plus one while
    -- its batch is still being inserted. Claimable only at 0.
    blockers         INTEGER NOT NULL DEFAULT 0 CHECK (blockers >= 0),
    run_at           INTEGER NOT NULL,
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    progress         INTEGER NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    last_error       TEXT,
    -- JSON array of failed attempts, NULL until the first failure.
    errors           TEXT,
    result           TEXT,
    created_at       INTEGER NOT NULL,
    attempted_at     INTEGER,
    finished_at      INTEGER
);

-- The claim index holds only runnable rows, so a job enters it once and
-- leaves it once; every other status change touches no index that mentions
-- status.
CREATE INDEX jobs_claim ON jobs (kind, priority DESC, id)
    WHERE status = 'queued' AND blockers = 0;
CREATE INDEX jobs_due ON jobs (run_at) WHERE status IN ('scheduled', 'retrying');
CREATE INDEX jobs_lease ON jobs (lease_expires_at) WHERE status = 'processing';
CREATE UNIQUE INDEX jobs_batch_seq ON jobs (batch_id, seq);
CREATE INDEX jobs_dead ON jobs (kind, id) WHERE status = 'dead';

CREATE TABLE job_dependencies (
    job_id     INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    depends_on INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    PRIMARY KEY (depends_on, job_id)
) WITHOUT ROWID;
CREATE INDEX job_dependencies_job ON job_dependencies (job_id);

CREATE TABLE batch_dependencies (
    batch_id   TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    depends_on TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    PRIMARY KEY (depends_on, batch_id)
) WITHOUT ROWID;
CREATE INDEX batch_dependencies_batch ON batch_dependencies (batch_id);

-- A batch reaching a terminal state writes one row here in the same
-- transaction; the row is deleted once the event has been delivered.
CREATE TABLE batch_outbox (
    id          INTEGER PRIMARY KEY,
    batch_id    TEXT NOT NULL,
    generation  INTEGER NOT NULL,
    event       TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    UNIQUE (batch_id, generation)
);

CREATE TABLE kind_controls (
    kind       TEXT PRIMARY KEY,
    paused     INTEGER NOT NULL DEFAULT 0 CHECK (paused IN (0, 1)),
    updated_at INTEGER NOT NULL
);
