//! The bounded outgoing buffer of one connection, with per-batch progress
//! coalescing. It is plain data: the hub locks it, and every method takes
//! the current time so that tests control it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use domain::BatchId;
use tokio::time::Instant;

use crate::hub::CloseCause;

/// Limits of one connection's buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FlowLimits {
    /// Maximum number of buffered messages, counting queued messages,
    /// snapshots being read and coalesced progress waiting to be sent.
    pub capacity: usize,
    /// Minimum time between two progress messages of one batch.
    pub progress_interval: Duration,
    /// How long the buffer may stay full before the client is disconnected.
    pub slow_client_grace: Duration,
}

#[derive(Debug)]
enum SnapshotState {
    Loading,
    Ready(Arc<str>),
    /// The client already has the finished message of this generation.
    Skip,
}

#[derive(Debug)]
enum Entry {
    Message {
        text: Arc<str>,
        must_deliver: bool,
    },
    /// A snapshot's place in the order. Everything behind it waits until it
    /// is filled, so no update of its batch overtakes it.
    Snapshot {
        slot: u64,
        state: SnapshotState,
    },
}

/// The latest progress of one batch and when its last progress was sent.
#[derive(Debug, Default)]
struct ProgressSlot {
    latest: Option<Arc<str>>,
    last_sent: Option<Instant>,
}

/// The writer's next step.
#[derive(Debug, PartialEq)]
pub(crate) enum Pop {
    Send(Arc<str>),
    Close(CloseCause),
    /// Nothing to send yet: wait for a notification, or until the given
    /// time when a coalesced progress becomes due.
    Wait(Option<Instant>),
    /// The close was already handed out.
    Finished,
}

#[derive(Debug)]
pub(crate) struct Outbox {
    limits: FlowLimits,
    queue: VecDeque<Entry>,
    progress: HashMap<BatchId, ProgressSlot>,
    /// Progress slots whose `latest` is set.
    pending_progress: usize,
    next_slot: u64,
    full_since: Option<Instant>,
    dropped: u64,
    close: Option<CloseCause>,
    close_taken: bool,
}

impl Outbox {
    pub fn new(limits: FlowLimits) -> Self {
        Self {
            limits,
            queue: VecDeque::new(),
            progress: HashMap::new(),
            pending_progress: 0,
            next_slot: 0,
            full_since: None,
            dropped: 0,
            close: None,
            close_taken: false,
        }
    }

    /// Number of buffered messages, bounded by the capacity.
    pub fn len(&self) -> usize {
        self.queue.len() + self.pending_progress
    }

    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    pub fn close_cause(&self) -> Option<CloseCause> {
        self.close
    }

    /// Requests a close; the first cause wins.
    pub fn close(&mut self, cause: CloseCause) {
        if self.close.is_none() {
            self.close = Some(cause);
            self.queue.clear();
            self.progress.clear();
            self.pending_progress = 0;
        }
    }

    fn is_full(&self) -> bool {
        self.len() >= self.limits.capacity
    }

    /// Records that the buffer is full and closes the connection once it
    /// has been full for longer than the grace period.
    fn note_full(&mut self, now: Instant) {
        let since = *self.full_since.get_or_insert(now);
        if now.duration_since(since) > self.limits.slow_client_grace {
            self.close(CloseCause::ClientTooSlow);
        }
    }

    /// Frees one place by dropping a droppable message: the oldest queued
    /// one, or else a coalesced progress. Returns false when every buffered
    /// message must be delivered.
    fn evict_droppable(&mut self) -> bool {
        let position = self.queue.iter().position(|entry| {
            matches!(
                entry,
                Entry::Message {
                    must_deliver: false,
                    ..
                }
            )
        });
        if let Some(position) = position {
            self.queue.remove(position);
            self.dropped += 1;
            return true;
        }
        if let Some(slot) = self
            .progress
            .values_mut()
            .find(|slot| slot.latest.is_some())
        {
            slot.latest = None;
            self.pending_progress -= 1;
            self.dropped += 1;
            return true;
        }
        false
    }

    /// Makes room for a message that must be delivered. Returns false, after
    /// closing the connection, when there is none to make.
    fn reserve_must_deliver(&mut self, now: Instant) -> bool {
        if self.close.is_some() {
            return false;
        }
        if !self.is_full() {
            return true;
        }
        if self.evict_droppable() {
            self.note_full(now);
            return self.close.is_none();
        }
        self.close(CloseCause::ClientTooSlow);
        false
    }

    /// Queues a message. When the buffer is full, a droppable message is
    /// dropped and counted. A must-deliver message then replaces a droppable
    /// one, or closes the connection when there is none.
    pub fn push(&mut self, text: Arc<str>, must_deliver: bool, now: Instant) {
        if self.close.is_some() {
            return;
        }
        if must_deliver {
            if self.reserve_must_deliver(now) {
                self.queue.push_back(Entry::Message { text, must_deliver });
            }
            return;
        }
        if self.is_full() {
            self.dropped += 1;
            self.note_full(now);
            return;
        }
        self.queue.push_back(Entry::Message { text, must_deliver });
    }

    /// Stores the latest progress of a batch. It replaces a progress of the
    /// same batch that is still waiting, so only the newest state is sent.
    pub fn push_progress(&mut self, batch_id: BatchId, text: Arc<str>, now: Instant) {
        if self.close.is_some() {
            return;
        }
        let waiting = self
            .progress
            .get(&batch_id)
            .is_some_and(|slot| slot.latest.is_some());
        if !waiting && self.is_full() {
            self.dropped += 1;
            self.note_full(now);
            return;
        }
        let slot = self.progress.entry(batch_id).or_default();
        if slot.latest.replace(text).is_none() {
            self.pending_progress += 1;
        }
    }

    /// Drops the waiting progress of a batch, if any.
    pub fn discard_progress(&mut self, batch_id: BatchId) {
        if let Some(slot) = self.progress.get_mut(&batch_id)
            && slot.latest.take().is_some()
        {
            self.pending_progress -= 1;
        }
    }

    /// Drops the waiting progress of every batch for which `keep` is false.
    pub fn retain_progress(&mut self, keep: impl Fn(&BatchId) -> bool) {
        for (batch_id, slot) in &mut self.progress {
            if !keep(batch_id) && slot.latest.take().is_some() {
                self.pending_progress -= 1;
            }
        }
    }

    /// Reserves the place of a snapshot that is being read. Returns `None`
    /// when the connection is closed or was closed for lack of room.
    pub fn reserve_snapshot(&mut self, now: Instant) -> Option<u64> {
        if !self.reserve_must_deliver(now) {
            return None;
        }
        let slot = self.next_slot;
        self.next_slot += 1;
        self.queue.push_back(Entry::Snapshot {
            slot,
            state: SnapshotState::Loading,
        });
        Some(slot)
    }

    /// Fills a reserved snapshot place with its message, or with `None`
    /// to skip it.
    pub fn fill_snapshot(&mut self, slot: u64, text: Option<Arc<str>>) {
        let entry = self.queue.iter_mut().find(
            |entry| matches!(entry, Entry::Snapshot { slot: candidate, .. } if *candidate == slot),
        );
        if let Some(Entry::Snapshot { state, .. }) = entry {
            *state = match text {
                Some(text) => SnapshotState::Ready(text),
                None => SnapshotState::Skip,
            };
        }
    }

    /// Takes the next message to send: queued messages in order first, then
    /// coalesced progress whose batch is past its minimum interval.
    pub fn pop(&mut self, now: Instant) -> Pop {
        if let Some(cause) = self.close {
            if self.close_taken {
                return Pop::Finished;
            }
            self.close_taken = true;
            return Pop::Close(cause);
        }

        let popped = self.pop_queued().or_else(|| self.pop_progress(now));
        match popped {
            Some(text) => {
                if !self.is_full() {
                    self.full_since = None;
                }
                Pop::Send(text)
            }
            None if self.is_front_loading() => Pop::Wait(None),
            None => Pop::Wait(self.next_progress_due()),
        }
    }

    fn is_front_loading(&self) -> bool {
        matches!(
            self.queue.front(),
            Some(Entry::Snapshot {
                state: SnapshotState::Loading,
                ..
            })
        )
    }

    fn pop_queued(&mut self) -> Option<Arc<str>> {
        loop {
            match self.queue.front() {
                None => return None,
                Some(Entry::Snapshot {
                    state: SnapshotState::Loading,
                    ..
                }) => return None,
                Some(_) => {}
            }
            match self.queue.pop_front() {
                Some(Entry::Message { text, .. })
                | Some(Entry::Snapshot {
                    state: SnapshotState::Ready(text),
                    ..
                }) => return Some(text),
                _ => continue,
            }
        }
    }

    fn pop_progress(&mut self, now: Instant) -> Option<Arc<str>> {
        if !self.queue.is_empty() {
            return None;
        }
        let interval = self.limits.progress_interval;
        // Slots with nothing waiting are kept only while their interval
        // runs, so the map stays bounded by the buffer and recent batches.
        self.progress.retain(|_, slot| {
            slot.latest.is_some()
                || slot
                    .last_sent
                    .is_some_and(|sent| now.duration_since(sent) < interval)
        });
        let slot = self.progress.values_mut().find(|slot| {
            slot.latest.is_some()
                && slot
                    .last_sent
                    .is_none_or(|sent| now.duration_since(sent) >= interval)
        })?;
        let text = slot.latest.take()?;
        slot.last_sent = Some(now);
        self.pending_progress -= 1;
        Some(text)
    }

    fn next_progress_due(&self) -> Option<Instant> {
        self.progress
            .values()
            .filter(|slot| slot.latest.is_some())
            .filter_map(|slot| slot.last_sent)
            .map(|sent| sent + self.limits.progress_interval)
            .min()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn limits(capacity: usize) -> FlowLimits {
        FlowLimits {
            capacity,
            progress_interval: Duration::from_millis(250),
            slow_client_grace: Duration::from_secs(5),
        }
    }

    fn text(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn progress_keeps_latest_and_waits_interval() {
        let mut outbox = Outbox::new(limits(8));
        let batch = BatchId::new();
        let start = Instant::now();

        outbox.push_progress(batch, text("p1"), start);
        outbox.push_progress(batch, text("p2"), start);
        assert_eq!(outbox.len(), 1);
        assert_eq!(outbox.pop(start), Pop::Send(text("p2")));

        outbox.push_progress(batch, text("p3"), start);
        let due = start + Duration::from_millis(250);
        assert_eq!(outbox.pop(start), Pop::Wait(Some(due)));
        assert_eq!(outbox.pop(due), Pop::Send(text("p3")));
        assert_eq!(outbox.pop(due), Pop::Wait(None));
    }

    #[test]
    fn full_buffer_drops_droppable_and_keeps_must_deliver() {
        let mut outbox = Outbox::new(limits(2));
        let now = Instant::now();

        outbox.push(text("job1"), false, now);
        outbox.push(text("job2"), false, now);
        outbox.push(text("job3"), false, now);
        assert_eq!(outbox.dropped(), 1);

        outbox.push(text("finished"), true, now);
        assert_eq!(outbox.len(), 2);
        assert_eq!(outbox.dropped(), 2);
        assert_eq!(outbox.pop(now), Pop::Send(text("job2")));
        assert_eq!(outbox.pop(now), Pop::Send(text("finished")));
    }

    #[test]
    fn must_deliver_without_room_closes() {
        let mut outbox = Outbox::new(limits(1));
        let now = Instant::now();

        outbox.push(text("finished1"), true, now);
        outbox.push(text("finished2"), true, now);
        assert_eq!(outbox.close_cause(), Some(CloseCause::ClientTooSlow));
        assert_eq!(outbox.pop(now), Pop::Close(CloseCause::ClientTooSlow));
        assert_eq!(outbox.pop(now), Pop::Finished);
    }

    #[test]
    fn full_past_grace_closes() {
        let mut outbox = Outbox::new(limits(1));
        let start = Instant::now();

        outbox.push(text("job1"), false, start);
        outbox.push(text("job2"), false, start);
        assert_eq!(outbox.close_cause(), None);

        outbox.push(text("job3"), false, start + Duration::from_secs(6));
        assert_eq!(outbox.close_cause(), Some(CloseCause::ClientTooSlow));
    }

    #[test]
    fn loading_snapshot_holds_later_messages() {
        let mut outbox = Outbox::new(limits(8));
        let now = Instant::now();
        let batch = BatchId::new();

        let slot = outbox.reserve_snapshot(now).unwrap();
        outbox.push(text("job"), false, now);
        outbox.push_progress(batch, text("progress"), now);
        assert_eq!(outbox.pop(now), Pop::Wait(None));

        outbox.fill_snapshot(slot, Some(text("snapshot")));
        assert_eq!(outbox.pop(now), Pop::Send(text("snapshot")));
        assert_eq!(outbox.pop(now), Pop::Send(text("job")));
        assert_eq!(outbox.pop(now), Pop::Send(text("progress")));
    }

    #[test]
    fn skipped_snapshot_is_not_sent() {
        let mut outbox = Outbox::new(limits(8));
        let now = Instant::now();

        let slot = outbox.reserve_snapshot(now).unwrap();
        outbox.push(text("after"), true, now);
        outbox.fill_snapshot(slot, None);
        assert_eq!(outbox.pop(now), Pop::Send(text("after")));
        assert_eq!(outbox.len(), 0);
    }
}
