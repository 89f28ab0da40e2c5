//! Named SQL statements. Every state-changing UPDATE names the states it
//! expects in its WHERE clause and uses RETURNING, so a lost race shows up
//! as "no row" rather than as a silent overwrite.
//!
//! Lock order, so that concurrent writers rarely deadlock: a transaction
//! locks job rows first and batch rows after them, in ascending id order
//! where one statement locks many (the `ORDER BY id FOR NO KEY UPDATE`
//! CTEs). `FOR NO KEY UPDATE` is the lock an UPDATE of non-key columns
//! takes anyway, so it does not block the `FOR KEY SHARE` locks of foreign
//! key checks.
//!
//! A few writes lock a batch before its jobs, because they must decide on
//! the batch first. They are cancelling a batch (its cancel flag must be
//! set before the waiting jobs are collected), committing a staging batch,
//! pruning, and releasing the items of a batch whose dependency completed.
//! The write retry resolves the rare deadlock this allows.

/// Columns of a job row that a state change reports: batch id, position,
/// kind and the batch's owner.
macro_rules! touched {
    () => {
        "jobs.batch_id, jobs.seq, jobs.kind, \
         (SELECT batches.owner FROM batches WHERE batches.id = jobs.batch_id)"
    };
}

/// Appends the attempt record in parameter `$record` (JSONB) to a job's
/// error history, dropping the oldest record once the history contains
/// `$cap` records. The cap is a parameter, bound to
/// `domain::MAX_ATTEMPT_HISTORY`, so it cannot drift from the domain.
macro_rules! append_error {
    ($record:literal, $cap:literal) => {
        concat!(
            "CASE WHEN jsonb_array_length(coalesce(errors, '[]'::jsonb)) >= ",
            $cap,
            " THEN (errors - 0) || jsonb_build_array(",
            $record,
            "::jsonb) ELSE coalesce(errors, '[]'::jsonb) || jsonb_build_array(",
            $record,
            "::jsonb) END"
        )
    };
}

/// Columns of the batch read model, in the order `read::batch_from_row`
/// expects.
macro_rules! batch_columns {
    () => {
        "id, owner, kind, status, item_count, succeeded, failed, cancelled, priority, \
         max_attempts, config, metadata, correlation_id, idempotency_key, cancel_requested, \
         generation, created_at, updated_at, started_at, finished_at"
    };
}

/// Columns of the job read model, in the order `read::job_from_row`
/// expects, qualified with the table alias `j`.
macro_rules! job_columns {
    () => {
        "j.id, j.batch_id, j.seq, j.kind, j.payload, j.status, j.priority, j.attempts, \
         j.max_attempts, j.blockers, j.run_at, j.lease_owner, j.lease_expires_at, j.progress, \
         j.last_error, j.errors, j.result, j.created_at, j.attempted_at, j.finished_at"
    };
}

pub(crate) use job_columns;

// ---- Creating batches -------------------------------------------------------

/// Inserts a staging batch. A concurrent insert with the same idempotency
/// key makes this one wait for it and then insert nothing.
pub(crate) const INSERT_BATCH: &str = "
INSERT INTO batches (id, owner, kind, status, accepted, priority, max_attempts, run_at,
                     config, metadata, correlation_id, idempotency_key, request_digest,
                     created_at, updated_at, traceparent)
VALUES ($1, $2, $3, 'pending', FALSE, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12, $13)
ON CONFLICT (owner, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id";

pub(crate) const FIND_BY_IDEMPOTENCY_KEY: &str = "
SELECT id, accepted, request_digest FROM batches WHERE owner = $1 AND idempotency_key = $2";

pub(crate) const BATCHES_FOR_DEPENDENCY: &str =
    "SELECT id, owner, accepted FROM batches WHERE id = ANY($1::text[])";

pub(crate) const INSERT_BATCH_DEPENDENCIES: &str = "
INSERT INTO batch_dependencies (batch_id, depends_on)
SELECT $1, depends_on FROM unnest($2::text[]) AS dependency(depends_on)
ON CONFLICT DO NOTHING";

/// Reads a staging batch and locks it, so appends, the commit and the
/// deletion of abandoned batches never interleave on it.
pub(crate) const STAGING_BATCH: &str = "
SELECT item_count, priority, max_attempts, run_at, kind FROM batches
WHERE id = $1 AND NOT accepted
FOR NO KEY UPDATE";

/// Takes job ids from the identity sequence ahead of the insert, so the
/// rows of one chunk can name each other as dependencies.
pub(crate) const RESERVE_JOB_IDS: &str = "
SELECT nextval(sequence)
FROM (SELECT pg_get_serial_sequence('jobs', 'id')::regclass AS sequence) AS identity,
     generate_series(1, $1::int)";

pub(crate) const INSERT_JOBS: &str = "
INSERT INTO jobs (id, batch_id, seq, kind, payload, status, priority, max_attempts, blockers,
                  run_at, created_at, finished_at, last_error)
OVERRIDING SYSTEM VALUE
SELECT item.id, $1, item.seq, $2, item.payload, item.status, $3, $4, item.blockers,
       $5, $6, item.finished_at, item.last_error
FROM unnest($7::bigint[], $8::int[], $9::text[], $10::text[], $11::int[], $12::bigint[],
            $13::text[])
    AS item(id, seq, payload, status, blockers, finished_at, last_error)";

pub(crate) const JOB_IDS_BY_SEQ: &str =
    "SELECT seq, id FROM jobs WHERE batch_id = $1 AND seq = ANY($2::int[])";

/// Reads the jobs that new items depend on and share-locks them until
/// commit. A dependency that finishes concurrently then either finished
/// before this read, or its transaction waits for this one and reads the
/// new dependency rows afterwards.
pub(crate) const DEPENDENCY_JOBS: &str = "
SELECT j.id, j.status, b.owner FROM jobs j JOIN batches b ON b.id = j.batch_id
WHERE j.id = ANY($1::bigint[])
ORDER BY j.id
FOR SHARE OF j";

pub(crate) const INSERT_JOB_DEPENDENCIES: &str = "
INSERT INTO job_dependencies (job_id, depends_on)
SELECT * FROM unnest($1::bigint[], $2::bigint[])
ON CONFLICT DO NOTHING";

/// Counts appended items and marks the staging batch as still being
/// written, which keeps it from counting as abandoned.
pub(crate) const ADD_ITEMS: &str = "
UPDATE batches SET item_count = item_count + $2, updated_at = $3 WHERE id = $1 AND NOT accepted";

/// The batches a new batch depends on, share-locked for the same reason
/// as [`DEPENDENCY_JOBS`].
pub(crate) const BATCH_DEPENDENCY_STATES: &str = "
SELECT d.depends_on, b.status FROM batch_dependencies d JOIN batches b ON b.id = d.depends_on
WHERE d.batch_id = $1
ORDER BY d.depends_on
FOR SHARE OF b";

pub(crate) const ACCEPT_BATCH: &str = "
UPDATE batches SET accepted = TRUE, waiting_on = $2, updated_at = $3
WHERE id = $1 AND NOT accepted";

/// Lifts the staging blocker from every item of a batch and adds one
/// blocker per unmet batch dependency instead. Returns how many items
/// became claimable.
pub(crate) const RELEASE_ITEMS: &str = "
WITH item AS (SELECT id FROM jobs WHERE batch_id = $1 ORDER BY id FOR NO KEY UPDATE),
released AS (
    UPDATE jobs SET blockers = jobs.blockers - 1 + $2
    FROM item WHERE jobs.id = item.id
    RETURNING jobs.status, jobs.blockers)
SELECT count(*) FILTER (WHERE status = 'queued' AND blockers = 0) FROM released";

pub(crate) const DELETE_STAGING_BATCH: &str = "DELETE FROM batches WHERE id = $1 AND NOT accepted";

// ---- The worker's hot path -------------------------------------------------

/// Claims the first runnable jobs of one kind in `jobs_claim` index order.
/// Rows locked by another transaction are skipped rather than waited for, so
/// claimers in any number of processes never take the same job or block
/// each other. Returns each job with its batch's details.
pub(crate) const CLAIM: &str = "
WITH picked AS (
    SELECT id FROM jobs
    WHERE status = 'queued' AND blockers = 0 AND kind = $4
    ORDER BY priority DESC, id
    LIMIT $5
    FOR NO KEY UPDATE SKIP LOCKED),
claimed AS (
    UPDATE jobs
    SET status = 'processing', lease_owner = $1, lease_expires_at = $2,
        attempts = jobs.attempts + 1, attempted_at = $3, progress = 0
    FROM picked WHERE jobs.id = picked.id
    RETURNING jobs.id, jobs.batch_id, jobs.seq, jobs.payload, jobs.attempts,
              jobs.max_attempts, jobs.priority, jobs.created_at)
SELECT c.id, c.batch_id, c.seq, c.payload, c.attempts, c.max_attempts, c.priority,
       c.created_at, b.owner, b.correlation_id, b.traceparent, b.started_at IS NULL
FROM claimed c JOIN batches b ON b.id = c.batch_id";

pub(crate) const MARK_BATCHES_STARTED: &str = "
WITH target AS (
    SELECT id FROM batches WHERE id = ANY($1::text[]) AND started_at IS NULL
    ORDER BY id FOR NO KEY UPDATE)
UPDATE batches SET started_at = $2, updated_at = $2,
    status = CASE WHEN batches.status = 'pending' THEN 'processing' ELSE batches.status END
FROM target WHERE batches.id = target.id";

/// Extends the leases still held, given as parallel arrays of job id,
/// owner and attempt. Returns the ids it extended.
pub(crate) const HEARTBEAT: &str = "
WITH held AS (
    SELECT jobs.id FROM jobs
    JOIN unnest($1::bigint[], $2::text[], $3::int[]) AS lease(id, owner, attempt)
        ON lease.id = jobs.id
    WHERE jobs.status = 'processing' AND jobs.lease_owner = lease.owner
      AND jobs.attempts = lease.attempt
    ORDER BY jobs.id FOR NO KEY UPDATE OF jobs)
UPDATE jobs SET lease_expires_at = $4 FROM held WHERE jobs.id = held.id
RETURNING jobs.id";

pub(crate) const PROGRESS: &str = "
WITH held AS (
    SELECT jobs.id, report.progress FROM jobs
    JOIN unnest($1::bigint[], $2::text[], $3::int[], $4::smallint[])
        AS report(id, owner, attempt, progress)
        ON report.id = jobs.id
    WHERE jobs.status = 'processing' AND jobs.lease_owner = report.owner
      AND jobs.attempts = report.attempt
    ORDER BY jobs.id FOR NO KEY UPDATE OF jobs)
UPDATE jobs SET progress = held.progress FROM held WHERE jobs.id = held.id";

/// Locks the jobs of a group of outcomes in id order and returns their
/// batches, so the batches can be locked next in the same order.
pub(crate) const LOCK_JOBS: &str = "
SELECT id, batch_id FROM jobs WHERE id = ANY($1::bigint[]) ORDER BY id FOR NO KEY UPDATE";

/// Locks batches in id order and returns whether each one's cancellation
/// was requested. Under the lock the flag cannot change before commit.
pub(crate) const LOCK_BATCHES: &str = "
SELECT id, cancel_requested FROM batches WHERE id = ANY($1::text[])
ORDER BY id FOR NO KEY UPDATE";

pub(crate) const SUCCEED: &str = concat!(
    "UPDATE jobs
SET status = 'succeeded', finished_at = $4, result = $5, progress = 100, last_error = NULL,
    lease_owner = NULL, lease_expires_at = NULL
WHERE id = $1 AND status = 'processing' AND lease_owner = $2 AND attempts = $3
RETURNING ",
    touched!()
);

pub(crate) const RETRY: &str = concat!(
    "UPDATE jobs SET status = 'retrying', run_at = $4, last_error = $5, errors = ",
    append_error!("$6", "$8"),
    ", attempts = attempts - $7, lease_owner = NULL, lease_expires_at = NULL
WHERE id = $1 AND status = 'processing' AND lease_owner = $2 AND attempts = $3
RETURNING ",
    touched!()
);

pub(crate) const DIE: &str = concat!(
    "UPDATE jobs SET status = 'dead', finished_at = $4, last_error = $5, errors = ",
    append_error!("$6", "$7"),
    ", lease_owner = NULL, lease_expires_at = NULL
WHERE id = $1 AND status = 'processing' AND lease_owner = $2 AND attempts = $3
RETURNING ",
    touched!()
);

pub(crate) const CANCEL_RUNNING: &str = concat!(
    "UPDATE jobs SET status = 'cancelled', finished_at = $4, last_error = $5,
    lease_owner = NULL, lease_expires_at = NULL
WHERE id = $1 AND status = 'processing' AND lease_owner = $2 AND attempts = $3
RETURNING ",
    touched!()
);

pub(crate) const DEFER: &str = concat!(
    "UPDATE jobs SET status = 'scheduled', run_at = $4, attempts = attempts - 1,
    lease_owner = NULL, lease_expires_at = NULL
WHERE id = $1 AND status = 'processing' AND lease_owner = $2 AND attempts = $3
RETURNING ",
    touched!()
);

pub(crate) const RELEASE: &str = concat!(
    "UPDATE jobs SET status = 'queued', attempts = attempts - 1,
    lease_owner = NULL, lease_expires_at = NULL
WHERE id = $1 AND status = 'processing' AND lease_owner = $2 AND attempts = $3
RETURNING ",
    touched!()
);

pub(crate) const CANCEL_WAITING_JOB: &str = concat!(
    "UPDATE jobs SET status = 'cancelled', finished_at = $2, last_error = $3
WHERE id = $1 AND status IN ('scheduled', 'queued', 'retrying')
RETURNING ",
    touched!()
);

// ---- Follow-up work inside a write -------------------------------------------

/// Removes one blocker per met dependency from the waiting jobs that
/// depend on any of the jobs in `$1`, which just succeeded. Returns the
/// kind and remaining blockers of each.
///
/// It runs as a statement of its own, after the UPDATE that finished the
/// jobs. That UPDATE may have waited for a transaction adding dependencies
/// on them, and only a later statement's snapshot contains those rows.
pub(crate) const RELEASE_DEPENDENTS: &str = "
WITH met AS (
    SELECT job_id, count(*) AS dependencies FROM job_dependencies
    WHERE depends_on = ANY($1::bigint[])
    GROUP BY job_id),
target AS (
    SELECT jobs.id, met.dependencies FROM jobs JOIN met ON met.job_id = jobs.id
    WHERE jobs.status IN ('scheduled', 'queued', 'retrying') AND jobs.blockers > 0
    ORDER BY jobs.id FOR NO KEY UPDATE OF jobs)
UPDATE jobs SET blockers = greatest(jobs.blockers - target.dependencies, 0)
FROM target WHERE jobs.id = target.id
RETURNING jobs.kind, jobs.blockers";

/// Cancels the waiting jobs that depend on any of the jobs in `$1`, each
/// with the reason at the same position in `$2` (the reason of its
/// dependency with the lowest id). Returns the id, attempts, stored reason
/// and [`touched!`] columns of each, so the caller can cancel their
/// dependents in turn. A statement of its own for the same reason as
/// [`RELEASE_DEPENDENTS`].
pub(crate) const CANCEL_DEPENDENTS: &str = concat!(
    "WITH cause AS (
    SELECT * FROM unnest($1::bigint[], $2::text[]) AS cause(job_id, reason)),
target AS (
    SELECT id FROM jobs
    WHERE id IN (
        SELECT d.job_id FROM job_dependencies d JOIN cause ON cause.job_id = d.depends_on)
      AND status IN ('scheduled', 'queued', 'retrying')
    ORDER BY id FOR NO KEY UPDATE)
UPDATE jobs SET status = 'cancelled', finished_at = $3,
    last_error = (
        SELECT cause.reason FROM cause JOIN job_dependencies d ON d.depends_on = cause.job_id
        WHERE d.job_id = jobs.id
        ORDER BY cause.job_id LIMIT 1)
FROM target WHERE jobs.id = target.id
RETURNING jobs.id, jobs.attempts, jobs.last_error, ",
    touched!()
);

pub(crate) const CANCEL_WAITING_IN_BATCH: &str = concat!(
    "WITH target AS (
    SELECT id FROM jobs WHERE batch_id = $1 AND status IN ('scheduled', 'queued', 'retrying')
    ORDER BY id FOR NO KEY UPDATE)
UPDATE jobs SET status = 'cancelled', finished_at = $2, last_error = $3
FROM target WHERE jobs.id = target.id
RETURNING jobs.id, jobs.attempts, ",
    touched!()
);

pub(crate) const RUNNING_IN_BATCH: &str =
    "SELECT id FROM jobs WHERE batch_id = $1 AND status = 'processing' ORDER BY id";

pub(crate) const APPLY_COUNTERS: &str = "
UPDATE batches
SET succeeded = succeeded + $2, failed = failed + $3, cancelled = cancelled + $4, updated_at = $5,
    revision = revision + 1
WHERE id = $1
RETURNING owner, kind, item_count, succeeded, failed, cancelled, started_at IS NOT NULL,
          status, generation, correlation_id, accepted, revision";

pub(crate) const SET_BATCH_STATUS: &str = "
UPDATE batches SET status = $2, finished_at = $3, generation = $4, updated_at = $5 WHERE id = $1";

pub(crate) const INSERT_OUTBOX: &str = "
INSERT INTO batch_outbox (batch_id, generation, event, created_at) VALUES ($1, $2, $3, $4)
ON CONFLICT (batch_id, generation) DO NOTHING
RETURNING id";

pub(crate) const BATCH_DEPENDENTS: &str = "
SELECT d.batch_id FROM batch_dependencies d JOIN batches b ON b.id = d.batch_id
WHERE d.depends_on = $1 AND b.accepted
ORDER BY d.batch_id";

pub(crate) const DECREMENT_WAITING: &str =
    "UPDATE batches SET waiting_on = waiting_on - 1 WHERE id = $1 AND waiting_on > 0";

/// Removes the blocker of a met batch dependency from a batch's waiting
/// items. Returns the kind and remaining blockers of each.
pub(crate) const UNBLOCK_BATCH_ITEMS: &str = "
WITH target AS (
    SELECT id FROM jobs
    WHERE batch_id = $1 AND status IN ('scheduled', 'queued', 'retrying') AND blockers > 0
    ORDER BY id FOR NO KEY UPDATE)
UPDATE jobs SET blockers = jobs.blockers - 1 FROM target WHERE jobs.id = target.id
RETURNING jobs.kind, jobs.blockers";

// ---- Sweeps -----------------------------------------------------------------

/// Moves due jobs to `queued`. Rows locked by another transaction are left
/// for the next sweep, so promoters in several processes never wait on
/// each other.
pub(crate) const PROMOTE_DUE: &str = "
WITH due AS (
    SELECT id FROM jobs WHERE status IN ('scheduled', 'retrying') AND run_at <= $1
    ORDER BY run_at LIMIT $2
    FOR NO KEY UPDATE SKIP LOCKED)
UPDATE jobs SET status = 'queued' FROM due WHERE jobs.id = due.id
RETURNING jobs.kind";

pub(crate) const NEXT_DUE: &str =
    "SELECT min(run_at) FROM jobs WHERE status IN ('scheduled', 'retrying')";

/// Locks expired leases, oldest expiry first. A job whose row is locked
/// (its worker is recording an outcome right now, or another reaper took
/// it) is skipped, so the outcome wins or the next sweep takes it.
pub(crate) const EXPIRED_LEASES: &str = "
SELECT id, batch_id, attempts, max_attempts, lease_owner, attempted_at FROM jobs
WHERE status = 'processing' AND lease_expires_at < $1
ORDER BY lease_expires_at LIMIT $2
FOR NO KEY UPDATE SKIP LOCKED";

pub(crate) const REQUEUE_EXPIRED: &str = concat!(
    "UPDATE jobs SET status = 'queued', run_at = $3, last_error = $4, errors = ",
    append_error!("$5", "$6"),
    ", lease_owner = NULL, lease_expires_at = NULL
WHERE id = $1 AND status = 'processing' AND lease_expires_at < $2
RETURNING ",
    touched!()
);

pub(crate) const KILL_EXPIRED: &str = concat!(
    "UPDATE jobs SET status = 'dead', finished_at = $3, last_error = $4, errors = ",
    append_error!("$5", "$6"),
    ", lease_owner = NULL, lease_expires_at = NULL
WHERE id = $1 AND status = 'processing' AND lease_expires_at < $2
RETURNING ",
    touched!()
);

pub(crate) const CANCEL_EXPIRED: &str = concat!(
    "UPDATE jobs SET status = 'cancelled', finished_at = $3, last_error = $4,
    lease_owner = NULL, lease_expires_at = NULL
WHERE id = $1 AND status = 'processing' AND lease_expires_at < $2
RETURNING ",
    touched!()
);

// ---- Outbox and kind controls -------------------------------------------------

pub(crate) const PENDING_FINISHES: &str = "SELECT id, event FROM batch_outbox ORDER BY id LIMIT $1";

pub(crate) const ACK_FINISHES: &str = "DELETE FROM batch_outbox WHERE id = ANY($1::bigint[])";

pub(crate) const KIND_CONTROLS: &str =
    "SELECT kind, paused, updated_at FROM kind_controls ORDER BY kind";

pub(crate) const SET_KIND_PAUSED: &str = "
INSERT INTO kind_controls (kind, paused, updated_at) VALUES ($1, $2, $3)
ON CONFLICT (kind) DO UPDATE SET paused = EXCLUDED.paused, updated_at = EXCLUDED.updated_at";

// ---- Operator actions and reads ------------------------------------------------

pub(crate) const BATCH_BY_ID: &str = concat!(
    "SELECT ",
    batch_columns!(),
    " FROM batches WHERE id = $1 AND accepted"
);

/// [`BATCH_BY_ID`] with the row locked until commit.
pub(crate) const BATCH_BY_ID_LOCKED: &str = concat!(
    "SELECT ",
    batch_columns!(),
    " FROM batches WHERE id = $1 AND accepted FOR NO KEY UPDATE"
);

/// Prefix of the batch listing, to which the caller appends filters and
/// the order.
pub(crate) const LIST_BATCHES: &str =
    concat!("SELECT ", batch_columns!(), " FROM batches WHERE accepted");

/// A visible job with its batch's owner in the last column.
pub(crate) const JOB_WITH_OWNER: &str = concat!(
    "SELECT ",
    job_columns!(),
    ", b.owner FROM jobs j JOIN batches b ON b.id = j.batch_id WHERE j.id = $1 AND b.accepted"
);

pub(crate) const REQUEST_CANCEL: &str =
    "UPDATE batches SET cancel_requested = TRUE, updated_at = $2 WHERE id = $1";

pub(crate) const DEAD_IN_BATCH: &str =
    "SELECT id FROM jobs WHERE batch_id = $1 AND status = 'dead' ORDER BY seq";

/// The given jobs that belong to an accepted batch, of any owner when `$2`
/// is NULL.
pub(crate) const VISIBLE_JOBS: &str = "
SELECT j.id FROM jobs j JOIN batches b ON b.id = j.batch_id
WHERE j.id = ANY($1::bigint[]) AND b.accepted AND ($2::text IS NULL OR b.owner = $2)";

pub(crate) const REDRIVE_JOBS: &str = concat!(
    "WITH target AS (
    SELECT id FROM jobs WHERE id = ANY($1::bigint[]) AND status = 'dead'
    ORDER BY id FOR NO KEY UPDATE)
UPDATE jobs SET status = 'queued', attempts = 0, run_at = $2, finished_at = NULL, progress = 0
FROM target WHERE jobs.id = target.id
RETURNING jobs.id, jobs.blockers, ",
    touched!()
);

pub(crate) const CLEAR_CANCEL_REQUEST: &str =
    "UPDATE batches SET cancel_requested = FALSE WHERE id = $1 AND cancel_requested";

/// Condition of a batch that retention may delete: `$n` is the cut-off for
/// completed batches and `$n+1` the one for failed and cancelled batches.
macro_rules! prunable {
    ($completed:literal, $failed:literal) => {
        concat!(
            "accepted AND finished_at IS NOT NULL AND (
    (status = 'completed' AND finished_at < ",
            $completed,
            ") OR
    (status IN ('failed', 'cancelled') AND finished_at < ",
            $failed,
            "))"
        )
    };
}

pub(crate) const PRUNABLE_BATCHES: &str = concat!(
    "SELECT id FROM batches WHERE ",
    prunable!("$1", "$2"),
    " ORDER BY finished_at LIMIT $3"
);

/// Locks a batch that is still prunable. A batch re-driven since it was
/// selected no longer matches and is kept.
pub(crate) const LOCK_PRUNABLE_BATCH: &str = concat!(
    "SELECT id FROM batches WHERE id = $1 AND ",
    prunable!("$2", "$3"),
    " FOR UPDATE"
);

pub(crate) const DELETE_BATCH_JOBS: &str = "DELETE FROM jobs WHERE batch_id = $1";

pub(crate) const DELETE_BATCH: &str = "DELETE FROM batches WHERE id = $1";

/// Live jobs per kind and state. Each branch repeats the predicate of one
/// partial index, so the count follows the live work and not the history.
pub(crate) const QUEUE_DEPTH: &str = "
SELECT kind, 'queued', count(*) FROM jobs WHERE status = 'queued' AND blockers = 0 GROUP BY kind
UNION ALL
SELECT kind, 'processing', count(*) FROM jobs WHERE status = 'processing' GROUP BY kind
UNION ALL
SELECT kind, status, count(*) FROM jobs WHERE status IN ('scheduled', 'retrying')
GROUP BY kind, status
UNION ALL
SELECT kind, 'dead', count(*) FROM jobs WHERE status = 'dead' GROUP BY kind";
