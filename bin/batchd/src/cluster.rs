//! Coordination between batchd processes that share one PostgreSQL
//! database.
//!
//! Each process listens for the store's signals and acts on them:
//! - `wake`: another process made jobs runnable; idle workers of those
//!   kinds claim at once instead of at their next poll.
//! - `kindControls` and `flagsChanged`: re-read pauses or feature flags.
//! - `cancelRunning`: a batch was cancelled; stop the handlers of its jobs
//!   that run here.
//! - `relay`: queue events of another process, handed to this process's
//!   WebSocket hub, so a client sees progress of work done anywhere.
//! - a resync (the listener reconnected, or this process fell behind):
//!   any of the above may have been missed, so everything is re-read.
//!
//! Each process also relays its own queue events, a few per notification.
//! A relayed event is a view, like every queue event: the tables stay the
//! record, and a client that reconnects reads a fresh snapshot.

use std::sync::Arc;
use std::time::Duration;

use flags::FlagService;
use postgres_store::{MAX_SIGNAL_BYTES, PgStore, Signal};
use queue::{Queue, QueueEvent};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

/// How long outgoing events wait for company before they are sent.
const RELAY_WINDOW: Duration = Duration::from_millis(20);

/// Room kept in a notification for the envelope around the events.
const ENVELOPE_BYTES: usize = 256;

/// Starts the listening and relaying tasks; both end when `stop` is
/// cancelled.
pub fn start(
    store: Arc<PgStore>,
    queue: Queue,
    hub: Arc<gateway::Hub>,
    flags: FlagService,
    stop: CancellationToken,
) {
    let origin = queue.lease_owner().to_string();
    // Subscribing first means no signal sent after start is missed.
    let signals = store.signals();
    tokio::spawn(listen(
        signals,
        origin.clone(),
        queue.clone(),
        hub,
        flags,
        stop.clone(),
    ));
    tokio::spawn(relay(store, queue.subscribe(), origin, stop));
}

async fn listen(
    mut signals: tokio::sync::broadcast::Receiver<Signal>,
    origin: String,
    queue: Queue,
    hub: Arc<gateway::Hub>,
    flags: FlagService,
    stop: CancellationToken,
) {
    loop {
        let signal = tokio::select! {
            () = stop.cancelled() => return,
            signal = signals.recv() => signal,
        };
        match signal {
            Ok(Signal::Wake { kinds }) => queue.wake(&kinds),
            Ok(Signal::KindControls) => queue.refresh_controls().await,
            Ok(Signal::CancelRunning { jobs }) => {
                let jobs: Vec<domain::JobId> = jobs.into_iter().map(domain::JobId).collect();
                let stopped = queue.cancel_running(&jobs);
                if stopped > 0 {
                    tracing::info!(
                        stopped,
                        "stopped handlers of jobs whose batch was cancelled elsewhere"
                    );
                }
            }
            Ok(Signal::FlagsChanged { revision }) => {
                if flags.revision() < revision {
                    refresh_flags(&flags).await;
                }
            }
            Ok(Signal::Relay {
                origin: sender,
                payload,
            }) => {
                if sender != origin {
                    deliver(&hub, &sender, payload);
                }
            }
            Ok(Signal::Resync) => resync(&queue, &flags).await,
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "fell behind on cluster signals; re-reading state");
                resync(&queue, &flags).await;
            }
            Err(RecvError::Closed) => return,
        }
    }
}

async fn resync(queue: &Queue, flags: &FlagService) {
    queue.wake_all();
    queue.refresh_controls().await;
    refresh_flags(flags).await;
}

async fn refresh_flags(flags: &FlagService) {
    if let Err(error) = flags.refresh().await {
        // The periodic refresh tries again on its own schedule.
        tracing::warn!(%error, "refreshing feature flags after a change elsewhere failed");
    }
}

/// Hands relayed events to this process's WebSocket subscribers.
fn deliver(hub: &gateway::Hub, sender: &str, payload: serde_json::Value) {
    match serde_json::from_value::<Vec<QueueEvent>>(payload) {
        Ok(events) => {
            for event in &events {
                hub.publish(event);
            }
        }
        Err(error) => tracing::warn!(
            %error,
            origin = sender,
            "ignored relayed events this version cannot read"
        ),
    }
}

/// Sends this process's queue events to the others, batched into
/// notifications below PostgreSQL's payload limit.
async fn relay(
    store: Arc<PgStore>,
    mut events: tokio::sync::broadcast::Receiver<QueueEvent>,
    origin: String,
    stop: CancellationToken,
) {
    let budget = MAX_SIGNAL_BYTES.saturating_sub(ENVELOPE_BYTES + origin.len());
    let mut pending = Pending::default();
    loop {
        let first = tokio::select! {
            () = stop.cancelled() => return,
            event = events.recv() => event,
        };
        match first {
            Ok(event) => pending.push(event, budget),
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "queue events were produced faster than they could be relayed; some were not relayed"
                );
                continue;
            }
            Err(RecvError::Closed) => return,
        }

        // Gather what else arrives within the window, then send it all.
        let window = tokio::time::sleep(RELAY_WINDOW);
        tokio::pin!(window);
        loop {
            tokio::select! {
                () = &mut window => break,
                event = events.recv() => match event {
                    Ok(event) => pending.push(event, budget),
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "queue events were produced faster than they could be relayed; some were not relayed");
                    }
                    Err(RecvError::Closed) => break,
                },
            }
        }
        for chunk in pending.take() {
            let signal = Signal::Relay {
                origin: origin.clone(),
                payload: serde_json::Value::Array(chunk),
            };
            if let Err(error) = store.publish(&signal).await {
                tracing::warn!(%error, "relaying queue events to other processes failed");
            }
        }
    }
}

/// Events waiting to be relayed, already split into chunks that fit one
/// notification. Batch progress is cumulative, so only the latest per
/// batch within a chunk is kept.
#[derive(Debug, Default)]
struct Pending {
    chunks: Vec<Chunk>,
}

#[derive(Debug, Default)]
struct Chunk {
    events: Vec<serde_json::Value>,
    bytes: usize,
    /// Index in `events` of the latest progress of each batch.
    progress: Vec<(domain::BatchId, usize, usize)>,
}

impl Pending {
    fn push(&mut self, event: QueueEvent, budget: usize) {
        let value = match serde_json::to_value(&event) {
            Ok(value) => value,
            Err(error) => {
                tracing::warn!(%error, "a queue event could not be encoded for relaying");
                return;
            }
        };
        let size = value.to_string().len() + 1;
        if size > budget {
            tracing::warn!(
                batch_id = %event.batch_id(),
                bytes = size,
                "a queue event is too large to relay to other processes"
            );
            return;
        }

        if let QueueEvent::BatchProgress(progress) = &event
            && let Some(chunk) = self.chunks.last_mut()
            && let Some(entry) = chunk
                .progress
                .iter_mut()
                .find(|(batch, _, _)| *batch == progress.batch_id)
        {
            let (_, index, old_size) = *entry;
            if chunk.bytes - old_size + size <= budget {
                chunk.events[index] = value;
                chunk.bytes = chunk.bytes - old_size + size;
                entry.2 = size;
                return;
            }
        }

        let needs_new = self
            .chunks
            .last()
            .is_none_or(|chunk| chunk.bytes + size > budget);
        if needs_new {
            self.chunks.push(Chunk::default());
        }
        if let Some(chunk) = self.chunks.last_mut() {
            if let QueueEvent::BatchProgress(progress) = &event {
                chunk
                    .progress
                    .push((progress.batch_id, chunk.events.len(), size));
            }
            chunk.events.push(value);
            chunk.bytes += size;
        }
    }

    fn take(&mut self) -> Vec<Vec<serde_json::Value>> {
        std::mem::take(&mut self.chunks)
            .into_iter()
            .map(|chunk| chunk.events)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use domain::{BatchCounters, BatchId, BatchProgress, BatchStatus, UserId};

    use super::*;

    fn progress(batch: BatchId, succeeded: u64) -> QueueEvent {
        QueueEvent::BatchProgress(BatchProgress {
            batch_id: batch,
            owner: UserId::new("alice"),
            kind: "noop".to_owned(),
            status: BatchStatus::Processing,
            counters: BatchCounters {
                item_count: 100,
                succeeded,
                ..BatchCounters::default()
            },
            correlation_id: None,
            revision: succeeded,
        })
    }

    #[test]
    fn chunks_fit_budget_and_keep_events() {
        let mut pending = Pending::default();
        let budget = 1_000;
        let batches: Vec<BatchId> = (0..40).map(|_| BatchId::new()).collect();
        for batch in &batches {
            pending.push(progress(*batch, 1), budget);
        }
        let chunks = pending.take();
        assert!(chunks.len() > 1, "40 events need several chunks");
        let mut total = 0;
        for chunk in &chunks {
            let bytes = serde_json::Value::Array(chunk.clone()).to_string().len();
            assert!(bytes <= budget, "a chunk of {bytes} bytes");
            total += chunk.len();
        }
        assert_eq!(total, batches.len());
    }

    #[test]
    fn latest_batch_progress_is_kept() {
        let mut pending = Pending::default();
        let batch = BatchId::new();
        for succeeded in 1..=10 {
            pending.push(progress(batch, succeeded), 7_000);
        }
        let chunks = pending.take();
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].len(), 1);
        let events: Vec<QueueEvent> =
            serde_json::from_value(serde_json::Value::Array(chunks[0].clone())).unwrap();
        assert_eq!(events, vec![progress(batch, 10)]);
    }

    #[test]
    fn oversized_event_is_dropped() {
        let mut pending = Pending::default();
        pending.push(progress(BatchId::new(), 1), 10);
        assert!(pending.take().is_empty());
    }
}
