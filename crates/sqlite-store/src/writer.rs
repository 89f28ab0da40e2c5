//! The single writer: one thread owns the only write connection and runs
//! every write of this process, grouping whatever is waiting into one
//! transaction (group commit).
//!
//! SQLite allows one writer at a time, so a second writing connection only
//! adds lock waits. Grouping many small operations into one transaction
//! pays the commit cost once for all of them. Each operation runs inside
//! its own savepoint, so one failing operation rolls back alone and the
//! others in its group still commit. Replies are sent only after COMMIT
//! returns, so no caller ever sees a write that could still be lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Instant;

use domain::StoreError;
use rusqlite::Connection;
use tokio::sync::oneshot;

/// Sends one operation's reply once its transaction has committed, or
/// turns a commit failure into the operation's error.
type Reply = Box<dyn FnOnce(Option<&str>) + Send>;

/// Result of running one operation inside the group's transaction.
struct Ran {
    ok: bool,
    reply: Reply,
}

/// Runs the operation on the connection, or, when the group could not get a
/// transaction, returns a reply that reports why.
type Run = Box<dyn FnOnce(Result<&Connection, &str>) -> Ran + Send>;

pub(crate) struct WriteOp {
    run: Run,
    /// Bulk operations (a chunk of inserted items, a chunk of deletions)
    /// close their group, so no transaction carries more than one chunk.
    bulk: bool,
}

/// Handle for sending operations to the writer thread.
#[derive(Clone)]
pub(crate) struct Writer {
    sender: mpsc::Sender<WriteOp>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

impl Writer {
    /// Starts the writer thread on `conn`; it stops when every handle is
    /// dropped.
    /// `truncate_wal` is raised by the checkpointer when the WAL has grown
    /// too large; the writer then truncates it between two groups.
    pub(crate) fn spawn(
        conn: Connection,
        max_group_ops: usize,
        truncate_wal: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        let (sender, receiver) = mpsc::channel::<WriteOp>();
        thread::Builder::new()
            .name("batchd-sqlite-writer".into())
            .spawn(move || run_writer(conn, receiver, max_group_ops.max(1), &truncate_wal))?;
        Ok(Self { sender })
    }

    /// Runs `work` in the next group transaction and returns its result
    /// once that transaction has committed.
    pub(crate) async fn write<T, F>(
        &self,
        operation: &'static str,
        bulk: bool,
        work: F,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (sender, receiver) = oneshot::channel::<Result<T, StoreError>>();
        let run: Run = Box::new(move |conn| {
            let result = match conn {
                Ok(conn) => work(conn),
                Err(message) => Err(StoreError::backend(
                    operation,
                    CommitFailed(message.to_owned()),
                )),
            };
            let ok = result.is_ok();
            let reply: Reply = Box::new(move |commit_error| {
                let outcome = match commit_error {
                    None => result,
                    Some(message) => Err(StoreError::backend(
                        operation,
                        CommitFailed(message.to_owned()),
                    )),
                };
                // The caller may have gone away (a dropped request); the
                // write is committed either way.
                let _ = sender.send(outcome);
            });
            Ran { ok, reply }
        });

        self.sender
            .send(WriteOp { run, bulk })
            .map_err(|_| StoreError::Closed)?;
        receiver.await.map_err(|_| StoreError::Closed)?
    }
}

#[derive(Debug, thiserror::Error)]
#[error("write transaction failed: {0}")]
struct CommitFailed(String);

fn run_writer(
    conn: Connection,
    receiver: mpsc::Receiver<WriteOp>,
    max_group_ops: usize,
    truncate_wal: &AtomicBool,
) {
    let mut group: Vec<WriteOp> = Vec::with_capacity(max_group_ops);

    while let Ok(first) = receiver.recv() {
        if truncate_wal.swap(false, Ordering::AcqRel) {
            truncate(&conn);
        }
        let mut closed_by_bulk = first.bulk;
        group.push(first);
        while group.len() < max_group_ops && !closed_by_bulk {
            match receiver.try_recv() {
                Ok(op) => {
                    closed_by_bulk = op.bulk;
                    group.push(op);
                }
                Err(_) => break,
            }
        }

        let started = Instant::now();
        let size = group.len();
        commit_group(&conn, group.drain(..));
        tracing::trace!(
            ops = size,
            elapsed_us = started.elapsed().as_micros() as u64,
            "group committed"
        );
    }

    truncate(&conn);
    tracing::debug!("sqlite writer stopped: every store handle was dropped");
}

/// Copies the whole WAL into the database and truncates it.
///
/// A passive checkpoint from another connection cannot reset the WAL
/// while this thread keeps appending to it, so under steady load the WAL
/// would only grow. Here, between two groups, no write is in progress;
/// the checkpoint waits (up to the busy timeout) only for readers.
fn truncate(conn: &Connection) {
    let started = Instant::now();
    match conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
        Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?))
    }) {
        Ok((0, frames)) => tracing::debug!(
            frames,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "WAL truncated"
        ),
        Ok((_, frames)) => {
            tracing::warn!(
                frames,
                "WAL truncation was blocked by a reader; it is retried when the WAL grows again"
            )
        }
        Err(error) => tracing::warn!(%error, "WAL truncation failed"),
    }
}

fn commit_group(conn: &Connection, ops: impl Iterator<Item = WriteOp>) {
    let mut replies: Vec<Reply> = Vec::new();

    if let Err(error) = conn.execute_batch("BEGIN IMMEDIATE") {
        let message = error.to_string();
        tracing::error!(error = %message, "sqlite writer could not begin a transaction");
        for op in ops {
            ((op.run)(Err(&message)).reply)(None);
        }
        return;
    }

    for op in ops {
        if let Err(error) = conn.execute_batch("SAVEPOINT op") {
            let message = error.to_string();
            replies.push((op.run)(Err(&message)).reply);
            continue;
        }
        let ran = (op.run)(Ok(conn));
        let end = if ran.ok {
            "RELEASE op"
        } else {
            "ROLLBACK TO op; RELEASE op"
        };
        if let Err(error) = conn.execute_batch(end) {
            tracing::error!(%error, "sqlite writer could not close a savepoint");
        }
        replies.push(ran.reply);
    }

    match conn.execute_batch("COMMIT") {
        Ok(()) => {
            for reply in replies {
                reply(None);
            }
        }
        Err(error) => {
            let message = error.to_string();
            tracing::error!(error = %message, ops = replies.len(), "sqlite group commit failed");
            if let Err(rollback_error) = conn.execute_batch("ROLLBACK") {
                tracing::error!(error = %rollback_error, "rollback after a failed commit failed");
            }
            for reply in replies {
                reply(Some(&message));
            }
        }
    }
}
