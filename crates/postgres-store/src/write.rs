//! Write transactions. Each write runs in one transaction, which is run
//! again when PostgreSQL aborts it for a deadlock or a serialization
//! failure. Its signals are sent inside the transaction just before
//! commit, so other processes receive them exactly when its rows become
//! visible.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use domain::{
    Batch, ChangeSet, ClaimedJob, CreatedBatch, JobId, KindControl, OutcomeResult, PromoteReport,
    ReapReport, RedriveReport, StoreError,
};
use tokio_postgres::IsolationLevel;
use tokio_postgres::error::SqlState;

use crate::{PgStore, Signal, db_error, notify};

/// A transaction of the pool's connection.
pub(crate) type Tx<'t> = deadpool_postgres::Transaction<'t>;

/// The future of one attempt at a write's work.
pub(crate) type TxFuture<'t, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 't>>;

/// A write's work: runs inside the transaction on the write's input, and
/// may run more than once when the transaction is retried.
pub(crate) type TxWork<I, T> = for<'t> fn(&'t Tx<'t>, &'t I) -> TxFuture<'t, T>;

/// Attempts per write before a deadlock or serialization failure is
/// returned to the caller.
const MAX_WRITE_ATTEMPTS: u32 = 5;

/// Backoff before the second attempt. It doubles with each further attempt
/// and gets up to as much again in random jitter, so two transactions that
/// deadlocked do not collide again in step.
const FIRST_BACKOFF: Duration = Duration::from_millis(5);

/// A write's output that the other processes on the schema may need to
/// hear of.
pub(crate) trait Announce {
    /// Returns the signals to send just before the write commits.
    fn signals(&self) -> Vec<Signal> {
        Vec::new()
    }
}

impl Announce for ChangeSet {
    fn signals(&self) -> Vec<Signal> {
        let mut signals = wake_signals(&self.runnable_kinds);
        signals.extend(cancel_signals(&self.cancel_running));
        signals
    }
}

impl Announce for CreatedBatch {
    fn signals(&self) -> Vec<Signal> {
        self.changes.signals()
    }
}

impl Announce for (Vec<OutcomeResult>, ChangeSet) {
    fn signals(&self) -> Vec<Signal> {
        self.1.signals()
    }
}

impl Announce for PromoteReport {
    fn signals(&self) -> Vec<Signal> {
        wake_signals(&self.runnable_kinds)
    }
}

impl Announce for ReapReport {
    fn signals(&self) -> Vec<Signal> {
        self.changes.signals()
    }
}

impl Announce for RedriveReport {
    fn signals(&self) -> Vec<Signal> {
        self.changes.signals()
    }
}

impl Announce for (Batch, ChangeSet) {
    fn signals(&self) -> Vec<Signal> {
        self.1.signals()
    }
}

impl Announce for (Batch, RedriveReport) {
    fn signals(&self) -> Vec<Signal> {
        self.1.signals()
    }
}

impl Announce for KindControl {
    fn signals(&self) -> Vec<Signal> {
        vec![Signal::KindControls]
    }
}

impl Announce for () {}
impl Announce for u64 {}
impl Announce for Option<u64> {}
impl Announce for Vec<JobId> {}
impl Announce for Vec<ClaimedJob> {}
impl Announce for crate::create::Begun {}

/// Job ids per cancellation signal: 20 bytes each at most, with a comma,
/// keeps a signal well under PostgreSQL's notification payload limit.
const CANCEL_IDS_PER_SIGNAL: usize = 350;

/// Tells every process which running jobs lost their batch.
pub(crate) fn cancel_signals(jobs: &[JobId]) -> Vec<Signal> {
    jobs.chunks(CANCEL_IDS_PER_SIGNAL)
        .map(|chunk| Signal::CancelRunning {
            jobs: chunk.iter().map(|job| job.0).collect(),
        })
        .collect()
}

/// Splits woken kinds into as few wake signals as fit PostgreSQL's
/// notification payload limit.
pub(crate) fn wake_signals(kinds: &[String]) -> Vec<Signal> {
    // The encoded signal without kinds, `{"signal":"wake","kinds":[]}`,
    // plus a margin.
    const OVERHEAD: usize = 64;

    let mut signals = Vec::new();
    let mut part: Vec<String> = Vec::new();
    let mut part_bytes = OVERHEAD;
    for kind in kinds {
        // The kind as a JSON string, and its comma.
        let kind_bytes = serde_json::to_string(kind).map_or(kind.len() * 6 + 2, |s| s.len()) + 1;
        if !part.is_empty() && part_bytes + kind_bytes > notify::MAX_SIGNAL_BYTES {
            signals.push(Signal::Wake {
                kinds: std::mem::take(&mut part),
            });
            part_bytes = OVERHEAD;
        }
        part.push(kind.clone());
        part_bytes += kind_bytes;
    }
    if !part.is_empty() {
        signals.push(Signal::Wake { kinds: part });
    }
    signals
}

/// Returns the SQLSTATE of an error after which running the transaction
/// again can succeed: a deadlock or a serialization failure.
fn retryable(error: &StoreError) -> Option<&'static str> {
    let StoreError::Backend { source, .. } = error else {
        return None;
    };
    let code = source.downcast_ref::<tokio_postgres::Error>()?.code()?;
    if *code == SqlState::T_R_DEADLOCK_DETECTED {
        Some("40P01")
    } else if *code == SqlState::T_R_SERIALIZATION_FAILURE {
        Some("40001")
    } else {
        None
    }
}

/// Runs `attempt`, each call a whole transaction of its own, again after
/// a deadlock or serialization failure, up to [`MAX_WRITE_ATTEMPTS`] times
/// in all. For operations that manage their transaction themselves; the
/// others use [`PgStore::write`].
pub(crate) async fn retry_transaction<T, F, Fut>(
    operation: &'static str,
    mut attempt: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut attempts = 1;
    loop {
        let error = match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let Some(sqlstate) = retryable(&error) else {
            return Err(error);
        };
        if attempts >= MAX_WRITE_ATTEMPTS {
            tracing::warn!(
                operation,
                sqlstate,
                attempts,
                "PostgreSQL aborted every attempt of a transaction, so its error is returned"
            );
            return Err(error);
        }

        let delay = backoff(attempts);
        tracing::warn!(
            operation,
            sqlstate,
            attempt = attempts,
            retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "PostgreSQL aborted a transaction, retrying it"
        );
        tokio::time::sleep(delay).await;
        attempts += 1;
    }
}

/// Starts a READ COMMITTED transaction whatever the server's default
/// isolation: the revision lock relies on each statement seeing the
/// changes committed before it.
pub(crate) async fn begin_read_committed<'a>(
    client: &'a mut deadpool_postgres::Object,
    operation: &'static str,
) -> Result<Tx<'a>, StoreError> {
    client
        .build_transaction()
        .isolation_level(IsolationLevel::ReadCommitted)
        .start()
        .await
        .map_err(db_error(operation))
}

fn backoff(attempt: u32) -> Duration {
    let base = FIRST_BACKOFF * 2u32.saturating_pow(attempt.saturating_sub(1));
    let jitter_ms = fastrand::u64(0..=u64::try_from(base.as_millis()).unwrap_or(u64::MAX));
    base + Duration::from_millis(jitter_ms)
}

impl PgStore {
    /// Runs `work` on `input` in one transaction on a pooled connection,
    /// sends the output's signals and commits. A deadlock or serialization
    /// failure rolls back and runs `work` again, up to
    /// [`MAX_WRITE_ATTEMPTS`] times in all.
    pub(crate) async fn write<I, T>(
        &self,
        operation: &'static str,
        input: &I,
        work: TxWork<I, T>,
    ) -> Result<T, StoreError>
    where
        I: Sync + ?Sized,
        T: Announce + Send,
    {
        let mut client = self.client(operation).await?;
        let mut attempt = 1;
        loop {
            let error = match self.attempt(&mut client, operation, input, work).await {
                Ok(output) => return Ok(output),
                Err(error) => error,
            };
            let Some(sqlstate) = retryable(&error) else {
                return Err(error);
            };
            if attempt >= MAX_WRITE_ATTEMPTS {
                tracing::warn!(
                    operation,
                    sqlstate,
                    attempts = attempt,
                    "PostgreSQL aborted every attempt of a write transaction, so its error is returned"
                );
                return Err(error);
            }

            let delay = backoff(attempt);
            tracing::warn!(
                operation,
                sqlstate,
                attempt,
                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "PostgreSQL aborted a write transaction, retrying it"
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    async fn attempt<I, T>(
        &self,
        client: &mut deadpool_postgres::Object,
        operation: &'static str,
        input: &I,
        work: TxWork<I, T>,
    ) -> Result<T, StoreError>
    where
        I: Sync + ?Sized,
        T: Announce + Send,
    {
        let tx = client
            .transaction()
            .await
            .map_err(db_error("begin transaction"))?;

        // PostgreSQL queues each notification with the transaction and
        // delivers it on commit, or never if the transaction rolls back.
        let prepared = async {
            let output = work(&tx, input).await?;
            for signal in output.signals() {
                notify::send(&*tx, self.channel(), &signal).await?;
            }
            Ok::<T, StoreError>(output)
        }
        .await;
        let output = match prepared {
            Ok(output) => output,
            Err(error) => {
                // Dropping the transaction would roll it back too; rolling
                // back here leaves the connection idle before a retry.
                if let Err(rollback_error) = tx.rollback().await {
                    tracing::debug!(
                        operation,
                        error = %rollback_error,
                        "rolling back a failed write transaction failed"
                    );
                }
                return Err(error);
            }
        };
        tx.commit().await.map_err(db_error(operation))?;
        Ok(output)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use tokio::sync::Notify;

    use super::*;
    use crate::testing;

    #[test]
    fn cancellations_fit_the_payload_limit() {
        let jobs: Vec<JobId> = (0..1_000).map(|n| JobId(i64::MAX - n)).collect();
        let signals = cancel_signals(&jobs);
        assert_eq!(signals.len(), 3);
        let mut sent = 0;
        for signal in &signals {
            let encoded = serde_json::to_string(signal).unwrap();
            assert!(
                encoded.len() <= notify::MAX_SIGNAL_BYTES,
                "{} bytes",
                encoded.len()
            );
            if let Signal::CancelRunning { jobs } = signal {
                sent += jobs.len();
            }
        }
        assert_eq!(sent, jobs.len());
    }

    #[test]
    fn only_deadlocks_and_serialization_failures_are_retried() {
        let error = StoreError::Invalid {
            field: "cost",
            reason: "must be at least 1".to_owned(),
        };
        assert_eq!(retryable(&error), None);
        let error = StoreError::backend("test", std::io::Error::other("not a database error"));
        assert_eq!(retryable(&error), None);
    }

    #[test]
    fn backoff_doubles_with_jitter() {
        for attempt in 1..MAX_WRITE_ATTEMPTS {
            let base = FIRST_BACKOFF * 2u32.pow(attempt - 1);
            for _ in 0..100 {
                let delay = backoff(attempt);
                assert!(delay >= base, "attempt {attempt}: {delay:?}");
                assert!(delay <= base * 2, "attempt {attempt}: {delay:?}");
            }
        }
    }

    #[test]
    fn many_kinds_wake_in_signals_that_fit() {
        let kinds: Vec<String> = (0..200).map(|i| format!("{i:0>120}")).collect();
        let signals = wake_signals(&kinds);
        assert!(signals.len() > 1, "{} signals", signals.len());

        let mut woken = Vec::new();
        for signal in &signals {
            let encoded = serde_json::to_string(signal).unwrap();
            assert!(
                encoded.len() <= notify::MAX_SIGNAL_BYTES,
                "{}",
                encoded.len()
            );
            let Signal::Wake { kinds } = signal else {
                panic!("expected a wake signal, got {signal:?}");
            };
            woken.extend(kinds.iter().cloned());
        }
        assert_eq!(woken, kinds);
    }

    #[test]
    fn no_kinds_send_no_signal() {
        assert!(wake_signals(&[]).is_empty());
    }

    #[test]
    fn backoff_grows_and_stays_bounded() {
        for attempt in 1..MAX_WRITE_ATTEMPTS {
            let base = FIRST_BACKOFF * 2u32.pow(attempt - 1);
            let delay = backoff(attempt);
            assert!(delay >= base, "attempt {attempt}: {delay:?}");
            assert!(delay <= base * 2, "attempt {attempt}: {delay:?}");
        }
    }

    /// Hand-offs between the write under test and a second session that
    /// locks the same two rows in the opposite order.
    #[derive(Default)]
    struct Crossing {
        attempts: AtomicU32,
        write_holds_a: Notify,
        other_holds_b: Notify,
    }

    const LOCK_CONTROL: &str = "SELECT kind FROM kind_controls WHERE kind = $1 FOR UPDATE";

    /// Locks row `a`, then row `b`. On the first attempt it waits in
    /// between until the other session holds `b`, so the two deadlock.
    async fn lock_a_then_b(tx: &Tx<'_>, crossing: &Crossing) -> Result<u32, StoreError> {
        let attempt = crossing.attempts.fetch_add(1, Ordering::SeqCst) + 1;
        tx.query(LOCK_CONTROL, &[&"a"])
            .await
            .map_err(db_error("lock a"))?;
        if attempt == 1 {
            crossing.write_holds_a.notify_one();
            crossing.other_holds_b.notified().await;
        }
        tx.query(LOCK_CONTROL, &[&"b"])
            .await
            .map_err(db_error("lock b"))?;
        Ok(attempt)
    }

    impl Announce for u32 {}

    #[tokio::test]
    async fn deadlocked_write_is_retried() {
        let store = PgStore::connect(testing::isolated_config()).await.unwrap();
        let setup = store.client("test setup").await.unwrap();
        setup
            .batch_execute(
                "INSERT INTO kind_controls (kind, paused, updated_at) VALUES ('a', FALSE, 0), ('b', FALSE, 0)",
            )
            .await
            .unwrap();

        let crossing = Crossing::default();
        let other = async {
            let mut client = store.client("test other session").await.unwrap();
            let tx = client.transaction().await.unwrap();
            crossing.write_holds_a.notified().await;
            tx.query(LOCK_CONTROL, &[&"b"]).await.unwrap();
            crossing.other_holds_b.notify_one();
            // The write starts waiting for `b` first, so its deadlock check
            // runs first and aborts it rather than this session.
            tokio::time::sleep(Duration::from_millis(200)).await;
            tx.query(LOCK_CONTROL, &[&"a"]).await.unwrap();
            tx.commit().await.unwrap();
        };
        let write = store.write("cross locks", &crossing, |tx, crossing| {
            Box::pin(lock_a_then_b(tx, crossing))
        });

        let (written, ()) = tokio::join!(write, other);
        assert_eq!(written.unwrap(), 2, "the second attempt succeeds");
    }
}
