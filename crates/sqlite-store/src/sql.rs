//! Named SQL statements. Every state-changing UPDATE names the states it
//! expects in its WHERE clause and uses RETURNING, so a lost race shows up
//! as "no row" rather than as a silent overwrite.
//!
//! The WHERE clauses that must use a partial index repeat that index's
//! predicate word for word, because SQLite only uses a partial index when
//! the query's terms contain the index's terms literally.

pub(crate) const INSERT_BATCH: &str = "
INSERT INTO batches (id, owner, kind, status, accepted, priority, max_attempts, run_at,
                     config, metadata, correlation_id, idempotency_key, request_digest,
                     created_at, updated_at, traceparent)
VALUES (?1, ?2, ?3, 'pending', 0, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12, ?13)";

pub(crate) const FIND_BY_IDEMPOTENCY_KEY: &str = "
SELECT id, accepted, request_digest FROM batches WHERE owner = ?1 AND idempotency_key = ?2";

pub(crate) const INSERT_BATCH_DEPENDENCY: &str =
    "INSERT OR IGNORE INTO batch_dependencies (batch_id, depends_on) VALUES (?1, ?2)";

pub(crate) const STAGING_BATCH: &str = "
SELECT item_count, priority, max_attempts, run_at, kind FROM batches WHERE id = ?1 AND accepted = 0";

/// Items of a staging batch carry one extra blocker until the batch is
/// accepted and released.
pub(crate) const INSERT_JOB: &str = "
INSERT INTO jobs (batch_id, seq, kind, payload, status, priority, max_attempts, blockers,
                  run_at, created_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";

pub(crate) const JOB_ID_BY_SEQ: &str = "SELECT id FROM jobs WHERE batch_id = ?1 AND seq = ?2";

pub(crate) const JOB_FOR_DEPENDENCY: &str = "
SELECT j.status, b.owner FROM jobs j JOIN batches b ON b.id = j.batch_id WHERE j.id = ?1";

pub(crate) const INSERT_JOB_DEPENDENCY: &str =
    "INSERT OR IGNORE INTO job_dependencies (job_id, depends_on) VALUES (?1, ?2)";

pub(crate) const ADD_ITEM_COUNT: &str =
    "UPDATE batches SET item_count = item_count + ?2 WHERE id = ?1 AND accepted = 0";

pub(crate) const BATCH_DEPENDENCY_STATES: &str = "
SELECT d.depends_on, b.status FROM batch_dependencies d JOIN batches b ON b.id = d.depends_on
WHERE d.batch_id = ?1";

pub(crate) const ACCEPT_BATCH: &str = "
UPDATE batches SET accepted = 1, waiting_on = ?2, updated_at = ?3
WHERE id = ?1 AND accepted = 0";

/// Lifts the staging blocker from a range of items and adds one blocker per
/// unmet batch dependency instead.
pub(crate) const RELEASE_ITEMS: &str = "
UPDATE jobs SET blockers = blockers - 1 + ?4
WHERE batch_id = ?1 AND seq >= ?2 AND seq < ?3";

pub(crate) const SET_RELEASED_COUNT: &str = "UPDATE batches SET released_count = ?2 WHERE id = ?1";

pub(crate) const RELEASE_STATE: &str = "SELECT released_count, item_count, waiting_on, kind FROM batches WHERE id = ?1 AND accepted = 1";

pub(crate) const UNRELEASED_BATCHES: &str =
    "SELECT id FROM batches WHERE accepted = 1 AND released_count < item_count";

pub(crate) const ABANDONED_BATCHES: &str = "SELECT id FROM batches WHERE accepted = 0";

pub(crate) const DELETE_JOB_CHUNK: &str = "
DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE batch_id = ?1 LIMIT ?2)";

pub(crate) const DELETE_BATCH: &str = "DELETE FROM batches WHERE id = ?1";

pub(crate) const HIDE_BATCH: &str = "UPDATE batches SET accepted = 0 WHERE id = ?1";

/// Claims the oldest runnable jobs of one kind. The subquery walks the
/// `jobs_claim` partial index, which holds nothing but runnable rows.
pub(crate) const CLAIM: &str = "
UPDATE jobs
SET status = 'processing', lease_owner = ?1, lease_expires_at = ?2,
    attempts = attempts + 1, attempted_at = ?3, progress = 0
WHERE id IN (
    SELECT id FROM jobs
    WHERE status = 'queued' AND blockers = 0 AND kind = ?4
    ORDER BY priority DESC, id
    LIMIT ?5)
RETURNING id, batch_id, seq, payload, attempts, max_attempts, priority, created_at";

pub(crate) const BATCH_CLAIM_INFO: &str =
    "SELECT owner, correlation_id, started_at, traceparent FROM batches WHERE id = ?1";

pub(crate) const MARK_BATCH_STARTED: &str = "
UPDATE batches SET started_at = ?2, updated_at = ?2,
    status = CASE WHEN status = 'pending' THEN 'processing' ELSE status END
WHERE id = ?1 AND started_at IS NULL";

pub(crate) const HEARTBEAT: &str = "
UPDATE jobs SET lease_expires_at = ?4
WHERE id = ?1 AND status = 'processing' AND lease_owner = ?2 AND attempts = ?3";

pub(crate) const PROGRESS: &str = "
UPDATE jobs SET progress = ?4
WHERE id = ?1 AND status = 'processing' AND lease_owner = ?2 AND attempts = ?3";

pub(crate) const SUCCEED: &str = "
UPDATE jobs
SET status = 'succeeded', finished_at = ?4, result = ?5, progress = 100, last_error = NULL,
    lease_owner = NULL, lease_expires_at = NULL
WHERE id = ?1 AND status = 'processing' AND lease_owner = ?2 AND attempts = ?3
RETURNING batch_id, seq, kind";

/// Appends one record to a job's error history, dropping the oldest once
/// the history is full.
macro_rules! append_error {
    ($record:literal) => {
        concat!(
            "CASE WHEN json_array_length(coalesce(errors, '[]')) >= ",
            "25",
            " THEN json_insert(json_remove(errors, '$[0]'), '$[#]', json(",
            $record,
            ")) ELSE json_insert(coalesce(errors, '[]'), '$[#]', json(",
            $record,
            ")) END"
        )
    };
}

pub(crate) const RETRY: &str = concat!(
    "UPDATE jobs SET status = 'retrying', run_at = ?4, last_error = ?5, errors = ",
    append_error!("?6"),
    ", attempts = attempts - ?7, lease_owner = NULL, lease_expires_at = NULL
WHERE id = ?1 AND status = 'processing' AND lease_owner = ?2 AND attempts = ?3
RETURNING batch_id, seq, kind"
);

pub(crate) const DIE: &str = concat!(
    "UPDATE jobs SET status = 'dead', finished_at = ?4, last_error = ?5, errors = ",
    append_error!("?6"),
    ", lease_owner = NULL, lease_expires_at = NULL
WHERE id = ?1 AND status = 'processing' AND lease_owner = ?2 AND attempts = ?3
RETURNING batch_id, seq, kind"
);

pub(crate) const CANCEL_RUNNING: &str = "
UPDATE jobs SET status = 'cancelled', finished_at = ?4, last_error = ?5,
    lease_owner = NULL, lease_expires_at = NULL
WHERE id = ?1 AND status = 'processing' AND lease_owner = ?2 AND attempts = ?3
RETURNING batch_id, seq, kind";

pub(crate) const DEFER: &str = "
UPDATE jobs SET status = 'scheduled', run_at = ?4, attempts = attempts - 1,
    lease_owner = NULL, lease_expires_at = NULL
WHERE id = ?1 AND status = 'processing' AND lease_owner = ?2 AND attempts = ?3
RETURNING batch_id, seq, kind";

pub(crate) const RELEASE: &str = "
UPDATE jobs SET status = 'queued', attempts = attempts - 1,
    lease_owner = NULL, lease_expires_at = NULL
WHERE id = ?1 AND status = 'processing' AND lease_owner = ?2 AND attempts = ?3
RETURNING batch_id, seq, kind";

pub(crate) const CANCEL_REQUESTED: &str = "SELECT cancel_requested FROM batches WHERE id = ?1";

pub(crate) const DEPENDENTS: &str = "SELECT job_id FROM job_dependencies WHERE depends_on = ?1";

pub(crate) const UNBLOCK_JOB: &str = "
UPDATE jobs SET blockers = blockers - 1
WHERE id = ?1 AND status IN ('scheduled', 'queued', 'retrying') AND blockers > 0
RETURNING kind, blockers";

pub(crate) const CANCEL_WAITING_JOB: &str = "
UPDATE jobs SET status = 'cancelled', finished_at = ?2, last_error = ?3
WHERE id = ?1 AND status IN ('scheduled', 'queued', 'retrying')
RETURNING batch_id, seq, kind, attempts";

pub(crate) const CANCEL_WAITING_IN_BATCH: &str = "
UPDATE jobs SET status = 'cancelled', finished_at = ?2, last_error = ?3
WHERE batch_id = ?1 AND status IN ('scheduled', 'queued', 'retrying')
RETURNING id, seq, kind, attempts";

pub(crate) const RUNNING_IN_BATCH: &str =
    "SELECT id FROM jobs WHERE batch_id = ?1 AND status = 'processing'";

pub(crate) const APPLY_COUNTERS: &str = "
UPDATE batches
SET succeeded = succeeded + ?2, failed = failed + ?3, cancelled = cancelled + ?4, updated_at = ?5,
    revision = revision + 1
WHERE id = ?1
RETURNING owner, kind, item_count, succeeded, failed, cancelled, started_at IS NOT NULL,
          status, generation, correlation_id, accepted, revision";

pub(crate) const SET_BATCH_STATUS: &str = "
UPDATE batches SET status = ?2, finished_at = ?3, generation = ?4, updated_at = ?5 WHERE id = ?1";

pub(crate) const INSERT_OUTBOX: &str = "
INSERT INTO batch_outbox (batch_id, generation, event, created_at) VALUES (?1, ?2, ?3, ?4)
ON CONFLICT (batch_id, generation) DO NOTHING";

pub(crate) const BATCH_DEPENDENTS: &str = "
SELECT d.batch_id, b.released_count FROM batch_dependencies d JOIN batches b ON b.id = d.batch_id
WHERE d.depends_on = ?1 AND b.accepted = 1";

pub(crate) const DECREMENT_WAITING: &str =
    "UPDATE batches SET waiting_on = waiting_on - 1 WHERE id = ?1 AND waiting_on > 0";

pub(crate) const UNBLOCK_RELEASED_ITEMS: &str = "
UPDATE jobs SET blockers = blockers - 1
WHERE batch_id = ?1 AND seq < ?2 AND status IN ('scheduled', 'queued', 'retrying') AND blockers > 0";

pub(crate) const BATCH_KIND: &str = "SELECT kind FROM batches WHERE id = ?1";

pub(crate) const PROMOTE_DUE: &str = "
UPDATE jobs SET status = 'queued'
WHERE id IN (
    SELECT id FROM jobs WHERE status IN ('scheduled', 'retrying') AND run_at <= ?1
    ORDER BY run_at LIMIT ?2)
RETURNING kind";

pub(crate) const NEXT_DUE: &str =
    "SELECT min(run_at) FROM jobs WHERE status IN ('scheduled', 'retrying')";

pub(crate) const EXPIRED_LEASES: &str = "
SELECT id, batch_id, attempts, max_attempts, lease_owner, attempted_at FROM jobs
WHERE status = 'processing' AND lease_expires_at < ?1
ORDER BY lease_expires_at LIMIT ?2";

pub(crate) const REQUEUE_EXPIRED: &str = concat!(
    "UPDATE jobs SET status = 'queued', run_at = ?3, last_error = ?4, errors = ",
    append_error!("?5"),
    ", lease_owner = NULL, lease_expires_at = NULL
WHERE id = ?1 AND status = 'processing' AND lease_expires_at < ?2
RETURNING batch_id, seq, kind"
);

pub(crate) const KILL_EXPIRED: &str = concat!(
    "UPDATE jobs SET status = 'dead', finished_at = ?3, last_error = ?4, errors = ",
    append_error!("?5"),
    ", lease_owner = NULL, lease_expires_at = NULL
WHERE id = ?1 AND status = 'processing' AND lease_expires_at < ?2
RETURNING batch_id, seq, kind"
);

pub(crate) const CANCEL_EXPIRED: &str = "
UPDATE jobs SET status = 'cancelled', finished_at = ?3, last_error = ?4,
    lease_owner = NULL, lease_expires_at = NULL
WHERE id = ?1 AND status = 'processing' AND lease_expires_at < ?2
RETURNING batch_id, seq, kind";

pub(crate) const PENDING_FINISHES: &str = "SELECT id, event FROM batch_outbox ORDER BY id LIMIT ?1";

pub(crate) const ACK_FINISH: &str = "DELETE FROM batch_outbox WHERE id = ?1";

pub(crate) const KIND_CONTROLS: &str =
    "SELECT kind, paused, updated_at FROM kind_controls ORDER BY kind";

pub(crate) const SET_KIND_PAUSED: &str = "
INSERT INTO kind_controls (kind, paused, updated_at) VALUES (?1, ?2, ?3)
ON CONFLICT (kind) DO UPDATE SET paused = excluded.paused, updated_at = excluded.updated_at";

pub(crate) const REQUEST_CANCEL: &str =
    "UPDATE batches SET cancel_requested = 1, updated_at = ?2 WHERE id = ?1";

pub(crate) const REDRIVE_JOB: &str = "
UPDATE jobs SET status = 'queued', attempts = 0, run_at = ?2, finished_at = NULL, progress = 0
WHERE id = ?1 AND status = 'dead'
RETURNING batch_id, seq, kind, blockers";

pub(crate) const CLEAR_CANCEL_REQUEST: &str =
    "UPDATE batches SET cancel_requested = 0 WHERE id = ?1";

pub(crate) const PRUNABLE_BATCHES: &str = "
SELECT id FROM batches
WHERE finished_at IS NOT NULL AND accepted = 1 AND (
    (status = 'completed' AND finished_at < ?1) OR
    (status IN ('failed', 'cancelled') AND finished_at < ?2))
ORDER BY finished_at LIMIT ?3";

/// Columns of the batch read model, in the order `read::batch_from_row`
/// expects.
pub(crate) const BATCH_COLUMNS: &str = "
id, owner, kind, status, item_count, succeeded, failed, cancelled, priority, max_attempts,
config, metadata, correlation_id, idempotency_key, cancel_requested, generation,
created_at, updated_at, started_at, finished_at";

/// Columns of the job read model, in the order `read::job_from_row` expects.
pub(crate) const JOB_COLUMNS: &str = "
id, batch_id, seq, kind, payload, status, priority, attempts, max_attempts, blockers, run_at,
lease_owner, lease_expires_at, progress, last_error, errors, result, created_at,
attempted_at, finished_at";

#[cfg(test)]
mod tests {
    use super::*;

    /// `concat!` cannot read a constant, so the history cap is written into
    /// the SQL by hand; this keeps it equal to the domain's.
    #[test]
    fn history_cap_matches_the_domain() {
        let cap = format!(">= {} THEN", domain::MAX_ATTEMPT_HISTORY);
        for query in [RETRY, DIE, REQUEUE_EXPIRED, KILL_EXPIRED] {
            assert!(query.contains(&cap), "{query}");
        }
    }
}
