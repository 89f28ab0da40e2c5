-- The durable queue: batches, their jobs, dependencies, the batch-finished
-- outbox and per-kind controls. Times are milliseconds since the Unix epoch,
-- as in the SQLite store, so both stores share one row model.

CREATE TABLE batches (
    id               TEXT PRIMARY KEY,
    owner            TEXT NOT NULL,
    kind             TEXT NOT NULL,
    status           TEXT NOT NULL
        CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')),
    -- False while items are still being inserted: such a batch is invisible
    -- to every read, and is deleted once its writer has gone quiet for too
    -- long. Accepting a batch releases all its items in the same
    -- transaction.
    accepted         BOOLEAN NOT NULL DEFAULT FALSE,
    item_count       INTEGER NOT NULL DEFAULT 0,
    succeeded        INTEGER NOT NULL DEFAULT 0,
    failed           INTEGER NOT NULL DEFAULT 0,
    cancelled        INTEGER NOT NULL DEFAULT 0,
    priority         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL CHECK (max_attempts >= 1),
    run_at           BIGINT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    generation       INTEGER NOT NULL DEFAULT 0,
    -- Counts the counter updates; every event about the batch carries it,
    -- so a consumer hearing of the batch from several processes can tell
    -- an older update from a newer one.
    revision         BIGINT NOT NULL DEFAULT 0,
    -- Unmet batch dependencies; the batch's items are held while non-zero.
    waiting_on       INTEGER NOT NULL DEFAULT 0,
    config           TEXT NOT NULL DEFAULT '{}',
    metadata         TEXT NOT NULL DEFAULT '{}',
    correlation_id   TEXT,
    -- The W3C trace context of the request that created the batch.
    traceparent      TEXT,
    idempotency_key  TEXT,
    request_digest   TEXT,
    created_at       BIGINT NOT NULL,
    -- For an unaccepted batch, when its writer last appended items: one
    -- whose writer went quiet for too long was abandoned, and is deleted.
    updated_at       BIGINT NOT NULL,
    started_at       BIGINT,
    finished_at      BIGINT
);

CREATE UNIQUE INDEX batches_idempotency ON batches (owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Listing a user's batches newest first; ids are UUID v7, so they sort by time.
CREATE INDEX batches_owner ON batches (owner, id);
CREATE INDEX batches_finished ON batches (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX batches_unaccepted ON batches (updated_at) WHERE NOT accepted;

CREATE TABLE jobs (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch_id         TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    seq              INTEGER NOT NULL,
    kind             TEXT NOT NULL,
    -- The payload exactly as submitted; TEXT rather than JSONB keeps its
    -- key order and number formatting.
    payload          TEXT NOT NULL,
    status           TEXT NOT NULL
        CHECK (status IN ('scheduled', 'queued', 'processing', 'retrying', 'succeeded', 'dead', 'cancelled')),
    priority         INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    -- Reasons the job may not run yet: unmet dependencies, plus one while
    -- its batch is still being inserted. Claimable only at 0.
    blockers         INTEGER NOT NULL DEFAULT 0 CHECK (blockers >= 0),
    run_at           BIGINT NOT NULL,
    lease_owner      TEXT,
    lease_expires_at BIGINT,
    progress         SMALLINT NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    last_error       TEXT,
    -- Array of failed attempts, NULL until the first failure.
    errors           JSONB,
    result           TEXT,
    created_at       BIGINT NOT NULL,
    attempted_at     BIGINT,
    finished_at      BIGINT
);

-- The claim index holds only runnable rows, so a job enters it once and
-- leaves it once.
CREATE INDEX jobs_claim ON jobs (kind, priority DESC, id)
    WHERE status = 'queued' AND blockers = 0;
CREATE INDEX jobs_due ON jobs (run_at) WHERE status IN ('scheduled', 'retrying');
CREATE INDEX jobs_lease ON jobs (lease_expires_at) WHERE status = 'processing';
CREATE UNIQUE INDEX jobs_batch_seq ON jobs (batch_id, seq);
CREATE INDEX jobs_dead ON jobs (kind, id) WHERE status = 'dead';

CREATE TABLE job_dependencies (
    job_id     BIGINT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    depends_on BIGINT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    PRIMARY KEY (depends_on, job_id)
);
CREATE INDEX job_dependencies_job ON job_dependencies (job_id);

CREATE TABLE batch_dependencies (
    batch_id   TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    depends_on TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    PRIMARY KEY (depends_on, batch_id)
);
CREATE INDEX batch_dependencies_batch ON batch_dependencies (batch_id);

-- A batch reaching a terminal state writes one row here in the same
-- transaction; the row is deleted once the event has been delivered.
CREATE TABLE batch_outbox (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch_id    TEXT NOT NULL,
    generation  INTEGER NOT NULL,
    event       TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    UNIQUE (batch_id, generation)
);

CREATE TABLE kind_controls (
    kind       TEXT PRIMARY KEY,
    paused     BOOLEAN NOT NULL DEFAULT FALSE,
    updated_at BIGINT NOT NULL
);
