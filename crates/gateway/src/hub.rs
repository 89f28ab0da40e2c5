//! Rooms, subscriptions and routing, independent of any web framework.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use domain::{BatchId, UserId};
use queue::QueueEvent;
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, HubConfig};
use crate::messages::{BatchUpdate, ClientMessage, ErrorCode, ServerMessage, Topic};
use crate::outbox::{FlowLimits, Outbox, Pop};
use crate::snapshot::SnapshotSource;

/// The reason the server closes a connection, with its WebSocket close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCause {
    /// The client closed, or the transport ended.
    Normal,
    /// The server is shutting down.
    GoingAway,
    /// The client read too slowly: its buffer stayed full past the grace
    /// period, or a must-deliver message found no room.
    ClientTooSlow,
    /// Nothing arrived from the client within the heartbeat timeout.
    HeartbeatTimeout,
    /// The client broke the WebSocket protocol, such as with an unmasked
    /// frame.
    ProtocolError,
}

impl CloseCause {
    /// Returns the WebSocket close code: 1000 to 1002 as RFC 6455 defines
    /// them, 4000 and up for this service.
    pub fn code(self) -> u16 {
        match self {
            CloseCause::Normal => 1000,
            CloseCause::GoingAway => 1001,
            CloseCause::ProtocolError => 1002,
            CloseCause::HeartbeatTimeout => 4000,
            CloseCause::ClientTooSlow => 4008,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            CloseCause::Normal => "closed",
            CloseCause::GoingAway => "server shutting down",
            CloseCause::ClientTooSlow => "client too slow",
            CloseCause::HeartbeatTimeout => "heartbeat timed out",
            CloseCause::ProtocolError => "websocket protocol error",
        }
    }
}

/// The next frame a connection's writer sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// A JSON text frame.
    Text(Arc<str>),
    /// Send a close frame with this cause, then stop.
    Close(CloseCause),
}

/// The batches one connection listens to.
#[derive(Debug, Default)]
struct Subscriptions {
    all: bool,
    batches: HashSet<BatchId>,
}

impl Subscriptions {
    fn covers(&self, batch_id: &BatchId) -> bool {
        self.all || self.batches.contains(batch_id)
    }
}

/// Maximum number of batches per connection whose finished generation is
/// remembered for ordering and duplicate checks. Past it an arbitrary entry
/// is forgotten, which at worst lets a repeated `batch.finished` through.
const MAX_FINISHED_MARKS: usize = 1024;

#[derive(Debug)]
struct ConnectionState {
    subscriptions: Subscriptions,
    outbox: Outbox,
    /// The latest finished generation sent for each batch, so no progress
    /// or snapshot of that generation follows it and a repeated delivery of
    /// the same finish is dropped.
    finished: HashMap<BatchId, u32>,
    /// The highest batch revision seen for each batch. Events of one batch
    /// can come from several processes and arrive out of order. An event
    /// older than one already seen is dropped, so progress never goes back
    /// and nothing stale follows the final state.
    revisions: HashMap<BatchId, u64>,
}

impl ConnectionState {
    fn mark_finished(&mut self, batch_id: BatchId, generation: u32) {
        if self.finished.len() >= MAX_FINISHED_MARKS
            && !self.finished.contains_key(&batch_id)
            && let Some(forgotten) = self.finished.keys().next().copied()
        {
            self.finished.remove(&forgotten);
        }
        self.finished.insert(batch_id, generation);
    }

    /// Records `revision` for a batch; returns false when a later event,
    /// or with `strict` the same one, was already seen. Revision 0
    /// (unknown) always passes.
    fn advance_revision(&mut self, batch_id: BatchId, revision: u64, strict: bool) -> bool {
        if revision == 0 {
            return true;
        }
        if let Some(seen) = self.revisions.get_mut(&batch_id) {
            if *seen > revision || (strict && *seen == revision) {
                return false;
            }
            *seen = revision;
            return true;
        }
        if self.revisions.len() >= MAX_FINISHED_MARKS
            && let Some(forgotten) = self.revisions.keys().next().copied()
        {
            self.revisions.remove(&forgotten);
        }
        self.revisions.insert(batch_id, revision);
        true
    }
}

#[derive(Debug)]
struct ConnectionShared {
    id: u64,
    user: UserId,
    state: Mutex<ConnectionState>,
    /// Wakes the writer when something was queued or the connection closed.
    wake: Notify,
    /// Cancelled once the connection is closing, so the reader stops too.
    closed: CancellationToken,
}

impl ConnectionShared {
    fn lock(&self) -> MutexGuard<'_, ConnectionState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wakes the writer, and the reader too when the buffer closed the
    /// connection.
    fn wake_after(&self, state: &ConnectionState) {
        if let Some(cause) = state.outbox.close_cause()
            && !self.closed.is_cancelled()
        {
            let dropped = state.outbox.dropped();
            match cause {
                CloseCause::ClientTooSlow
                | CloseCause::HeartbeatTimeout
                | CloseCause::ProtocolError => tracing::warn!(
                    user_id = %self.user,
                    connection_id = self.id,
                    close_code = cause.code(),
                    dropped,
                    "closing websocket connection: {}",
                    cause.reason()
                ),
                CloseCause::Normal | CloseCause::GoingAway => tracing::debug!(
                    user_id = %self.user,
                    connection_id = self.id,
                    close_code = cause.code(),
                    dropped,
                    "closing websocket connection: {}",
                    cause.reason()
                ),
            }
            self.closed.cancel();
        }
        self.wake.notify_one();
    }

    /// Routes one event to this connection if it subscribed to its batch.
    fn deliver(&self, event: &QueueEvent, text: &Arc<str>, now: Instant) {
        let batch_id = event.batch_id();
        let mut state = self.lock();
        if !state.subscriptions.covers(&batch_id) {
            return;
        }

        match event {
            QueueEvent::BatchProgress(progress) => {
                if !state.advance_revision(batch_id, progress.revision, true) {
                    return;
                }
                if state.finished.contains_key(&batch_id) {
                    if progress.status.is_terminal() {
                        // The finished message of this generation is already out.
                        return;
                    }
                    // A retry or re-drive reopened the batch.
                    state.finished.remove(&batch_id);
                }
                state.outbox.push_progress(batch_id, text.clone(), now);
            }
            QueueEvent::BatchFinished(finished) => {
                let seen = state.finished.get(&batch_id).copied();
                if seen.is_some_and(|generation| generation >= finished.generation) {
                    return;
                }
                // The finishing commit's own progress has the same revision.
                if !state.advance_revision(batch_id, finished.revision, false) {
                    return;
                }
                state.outbox.discard_progress(batch_id);
                state.mark_finished(batch_id, finished.generation);
                state.outbox.push(text.clone(), true, now);
            }
            // A job's final state that arrives after its batch's finish was
            // relayed from a slower process: the finish already covers it,
            // and nothing may follow the final state.
            QueueEvent::JobCompleted(_)
            | QueueEvent::JobFailed(_)
            | QueueEvent::JobCancelled(_)
                if state.finished.contains_key(&batch_id) =>
            {
                return;
            }
            _ => state.outbox.push(text.clone(), false, now),
        }
        self.wake_after(&state);
    }

    fn send(&self, message: &ServerMessage, must_deliver: bool) {
        let mut state = self.lock();
        state
            .outbox
            .push(Arc::from(message.to_json()), must_deliver, Instant::now());
        self.wake_after(&state);
    }

    fn close(&self, cause: CloseCause) {
        let mut state = self.lock();
        state.outbox.close(cause);
        self.wake_after(&state);
    }
}

type Room = HashMap<u64, Arc<ConnectionShared>>;

/// The WebSocket hub: one room per user, holding that user's connections.
///
/// [`Hub::publish`] is synchronous and takes only short-lived locks. It
/// serializes the event once and appends it to the buffer of each
/// connection of the event's owner that subscribed to the batch, and never
/// looks at the connections of other users.
pub struct Hub {
    config: HubConfig,
    source: Arc<dyn SnapshotSource>,
    rooms: Mutex<HashMap<UserId, Room>>,
    next_connection_id: AtomicU64,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("config", &self.config)
            .field("rooms", &self.room_count())
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// Creates a hub that reads snapshots from `source`.
    pub fn new(config: HubConfig, source: Arc<dyn SnapshotSource>) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            config,
            source,
            rooms: Mutex::new(HashMap::new()),
            next_connection_id: AtomicU64::new(1),
        })
    }

    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    fn rooms(&self) -> MutexGuard<'_, HashMap<UserId, Room>> {
        self.rooms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a connection of an authenticated user to the user's room. The
    /// connection leaves the room when the returned handle is dropped.
    pub fn connect(self: &Arc<Self>, user: UserId) -> Connection {
        let id = self.next_connection_id.fetch_add(1, Ordering::Relaxed);
        let limits = FlowLimits {
            capacity: self.config.buffer_capacity,
            progress_interval: self.config.progress_interval(),
            slow_client_grace: self.config.slow_client_grace,
        };
        let shared = Arc::new(ConnectionShared {
            id,
            user: user.clone(),
            state: Mutex::new(ConnectionState {
                subscriptions: Subscriptions::default(),
                outbox: Outbox::new(limits),
                finished: HashMap::new(),
                revisions: HashMap::new(),
            }),
            wake: Notify::new(),
            closed: CancellationToken::new(),
        });
        self.rooms()
            .entry(user.clone())
            .or_default()
            .insert(id, shared.clone());
        tracing::debug!(user_id = %user, connection_id = id, "websocket connection joined");
        Connection {
            hub: self.clone(),
            shared,
        }
    }

    fn leave(&self, user: &UserId, id: u64) {
        let mut rooms = self.rooms();
        if let Some(room) = rooms.get_mut(user) {
            room.remove(&id);
            if room.is_empty() {
                rooms.remove(user);
            }
        }
        tracing::debug!(user_id = %user, connection_id = id, "websocket connection left");
    }

    /// Routes an event to the owner's connections that subscribed to its
    /// batch or to all batches. It is synchronous, so it cannot wait for a
    /// client: a full buffer drops or closes instead.
    pub fn publish(&self, event: &QueueEvent) {
        let owner = event.owner();
        let connections: Vec<Arc<ConnectionShared>> = match self.rooms().get(owner) {
            Some(room) => room.values().cloned().collect(),
            None => return,
        };
        let text: Arc<str> = Arc::from(ServerMessage::from_event(event).to_json());
        let now = Instant::now();
        for connection in connections {
            // The room is keyed by owner; this check keeps the isolation
            // even if that ever changes.
            if connection.user == *owner {
                connection.deliver(event, &text, now);
            }
        }
    }

    /// Publishes every event from a queue's broadcast channel until it
    /// closes. Spawn it once per hub.
    pub async fn forward(self: Arc<Self>, mut events: broadcast::Receiver<QueueEvent>) {
        loop {
            match events.recv().await {
                Ok(event) => self.publish(&event),
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    // NOTE: subscribers miss these events until the next
                    // progress of each batch; nothing resends them.
                    tracing::warn!(
                        skipped,
                        "websocket hub fell behind the queue's events; some updates were lost"
                    );
                }
                Err(broadcast::error::RecvError::Closed) => {
                    tracing::info!("queue event channel closed; websocket hub stops forwarding");
                    return;
                }
            }
        }
    }

    /// Closes every connection with 1001 (going away), for shutdown.
    pub fn close_all(&self) {
        let connections: Vec<Arc<ConnectionShared>> = self
            .rooms()
            .values()
            .flat_map(|room| room.values().cloned())
            .collect();
        for connection in connections {
            connection.close(CloseCause::GoingAway);
        }
    }

    /// Number of users with at least one open connection.
    pub fn room_count(&self) -> usize {
        self.rooms().len()
    }

    /// Number of open connections of every user.
    pub fn total_connections(&self) -> usize {
        self.rooms().values().map(Room::len).sum()
    }

    /// Number of open connections of one user.
    pub fn connection_count(&self, user: &UserId) -> usize {
        self.rooms().get(user).map_or(0, Room::len)
    }
}

/// One client connection in the hub. The transport feeds it the client's
/// text frames with [`Connection::handle_text`] and sends what
/// [`Connection::next_outgoing`] returns.
#[derive(Debug)]
pub struct Connection {
    hub: Arc<Hub>,
    shared: Arc<ConnectionShared>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared.closed.cancel();
        self.hub.leave(&self.shared.user, self.shared.id);
    }
}

impl Connection {
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    pub fn user(&self) -> &UserId {
        &self.shared.user
    }

    /// Number of droppable messages dropped because the buffer was full.
    pub fn dropped_messages(&self) -> u64 {
        self.shared.lock().outbox.dropped()
    }

    /// Number of messages waiting to be sent.
    pub fn buffered_messages(&self) -> usize {
        self.shared.lock().outbox.len()
    }

    /// Handles one text frame from the client. Errors go back to the client
    /// as `error` messages; the connection stays open.
    pub async fn handle_text(&self, text: &str) {
        let limit = self.hub.config.max_message_bytes;
        if text.len() > limit {
            self.reject_oversized();
            return;
        }
        match ClientMessage::parse(text) {
            Ok(ClientMessage::Ping) => self.shared.send(&ServerMessage::Pong, false),
            Ok(ClientMessage::Subscribe(Topic::All)) => {
                self.shared.lock().subscriptions.all = true;
            }
            Ok(ClientMessage::Subscribe(Topic::Batch(batch_id))) => {
                self.subscribe_batch(batch_id).await;
            }
            Ok(ClientMessage::Unsubscribe(topic)) => self.unsubscribe(topic),
            Err(error) => {
                tracing::debug!(
                    user_id = %self.shared.user,
                    connection_id = self.shared.id,
                    code = ?error.code,
                    "rejected websocket client message"
                );
                self.shared
                    .send(&ServerMessage::error(error.code, error.message, None), true);
            }
        }
    }

    /// Sends MESSAGE_TOO_LARGE for a frame the transport rejected by size.
    pub fn reject_oversized(&self) {
        let limit = self.hub.config.max_message_bytes;
        let message = ServerMessage::error(
            ErrorCode::MessageTooLarge,
            format!("message is larger than the limit of {limit} bytes and was ignored"),
            None,
        );
        self.shared.send(&message, true);
    }

    /// Sends INVALID_MESSAGE for a binary frame.
    pub fn reject_binary(&self) {
        let message = ServerMessage::error(
            ErrorCode::InvalidMessage,
            "binary frames are not accepted; send JSON text frames",
            None,
        );
        self.shared.send(&message, true);
    }

    async fn subscribe_batch(&self, batch_id: BatchId) {
        let (slot, finished_before) = {
            let mut state = self.shared.lock();
            let subscriptions = &state.subscriptions;
            if !subscriptions.batches.contains(&batch_id)
                && subscriptions.batches.len() >= self.hub.config.max_subscriptions
            {
                let limit = self.hub.config.max_subscriptions;
                let message = ServerMessage::error(
                    ErrorCode::TooManySubscriptions,
                    format!(
                        "a connection may subscribe to at most {limit} batches; unsubscribe from one or subscribe to all"
                    ),
                    Some(batch_id),
                );
                state
                    .outbox
                    .push(Arc::from(message.to_json()), true, Instant::now());
                self.shared.wake_after(&state);
                return;
            }
            let Some(slot) = state.outbox.reserve_snapshot(Instant::now()) else {
                self.shared.wake_after(&state);
                return;
            };
            state.subscriptions.batches.insert(batch_id);
            (slot, state.finished.get(&batch_id).copied())
        };

        let read = tokio::time::timeout(
            self.hub.config.snapshot_timeout,
            self.hub.source.batch(&self.shared.user, batch_id),
        )
        .await;

        let reply = match read {
            Ok(Ok(Some(batch))) if batch.owner == self.shared.user => {
                if finished_before.is_some_and(|generation| generation >= batch.generation) {
                    None
                } else {
                    Some(ServerMessage::BatchSnapshot(BatchUpdate::from_batch(
                        &batch,
                    )))
                }
            }
            Ok(Ok(_)) => Some(self.subscribe_failed(
                batch_id,
                ErrorCode::BatchNotFound,
                format!("batch {batch_id} not found"),
            )),
            Ok(Err(error)) => {
                tracing::warn!(
                    user_id = %self.shared.user,
                    batch_id = %batch_id,
                    %error,
                    "reading a batch snapshot for a websocket subscriber failed"
                );
                Some(self.subscribe_failed(
                    batch_id,
                    ErrorCode::SnapshotFailed,
                    format!("reading batch {batch_id} failed; subscribe again later"),
                ))
            }
            Err(_elapsed) => {
                tracing::warn!(
                    user_id = %self.shared.user,
                    batch_id = %batch_id,
                    timeout = ?self.hub.config.snapshot_timeout,
                    "reading a batch snapshot for a websocket subscriber timed out"
                );
                Some(self.subscribe_failed(
                    batch_id,
                    ErrorCode::SnapshotFailed,
                    format!("reading batch {batch_id} timed out; subscribe again later"),
                ))
            }
        };

        let mut state = self.shared.lock();
        if reply
            .as_ref()
            .is_some_and(|message| matches!(message, ServerMessage::Error(_)))
        {
            state.subscriptions.batches.remove(&batch_id);
            if !state.subscriptions.all {
                state.outbox.discard_progress(batch_id);
            }
        }
        let text = reply.map(|message| Arc::from(message.to_json()));
        state.outbox.fill_snapshot(slot, text);
        self.shared.wake_after(&state);
    }

    fn subscribe_failed(
        &self,
        batch_id: BatchId,
        code: ErrorCode,
        message: String,
    ) -> ServerMessage {
        ServerMessage::error(code, message, Some(batch_id))
    }

    fn unsubscribe(&self, topic: Topic) {
        let mut state = self.shared.lock();
        match topic {
            Topic::Batch(batch_id) => {
                state.subscriptions.batches.remove(&batch_id);
                if !state.subscriptions.all {
                    state.outbox.discard_progress(batch_id);
                }
            }
            Topic::All => {
                state.subscriptions.all = false;
                let ConnectionState {
                    subscriptions,
                    outbox,
                    ..
                } = &mut *state;
                outbox.retain_progress(|batch_id| subscriptions.batches.contains(batch_id));
            }
        }
    }

    /// Waits for the next frame to send. Returns `None` after the close was
    /// handed out. Cancel-safe: nothing is taken from the buffer until the
    /// future returns.
    pub async fn next_outgoing(&self) -> Option<Outgoing> {
        loop {
            let due = {
                let mut state = self.shared.lock();
                match state.outbox.pop(Instant::now()) {
                    Pop::Send(text) => return Some(Outgoing::Text(text)),
                    Pop::Close(cause) => return Some(Outgoing::Close(cause)),
                    Pop::Finished => return None,
                    Pop::Wait(due) => due,
                }
            };
            match due {
                Some(due) => {
                    tokio::select! {
                        () = self.shared.wake.notified() => {}
                        () = tokio::time::sleep_until(due) => {}
                    }
                }
                None => self.shared.wake.notified().await,
            }
        }
    }

    /// Closes the connection: the writer's next frame is the close frame.
    pub fn close(&self, cause: CloseCause) {
        self.shared.close(cause);
    }

    /// Completes once the connection is closing, for whatever reason.
    pub async fn closed(&self) {
        self.shared.closed.cancelled().await;
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.is_cancelled()
    }
}

#[cfg(test)]
mod tests;
