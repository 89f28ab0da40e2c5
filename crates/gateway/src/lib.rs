//! The WebSocket hub of batchd: it pushes live batch progress and job
//! events to the users who own them.
//!
//! Main types:
//! - [`Hub`], with one room per user. [`Hub::connect`] adds a connection
//!   and returns its [`Connection`]; [`Hub::publish`] routes a
//!   [`queue::QueueEvent`] to the owner's connections that subscribed to
//!   its batch or to all batches; [`Hub::forward`] does that for a queue's
//!   broadcast channel.
//! - [`ServerMessage`] and [`ClientMessage`], the JSON protocol.
//! - [`SnapshotSource`], where a subscribe reads the batch's current state,
//!   implemented for every [`domain::AdminStore`].
//! - [`OriginPolicy`], [`HeartbeatConfig`] and [`TicketStore`] for the
//!   server's `/ws` route, and [`actix::upgrade`], which runs a connection
//!   over actix-web.
//!
//! Protocol: the client sends `{"type":"subscribe","batchId":ID}`,
//! `{"type":"subscribe","all":true}`, the same shapes with `unsubscribe`,
//! or `{"type":"ping"}`. The server replies to a subscribe to one batch
//! with `batch.snapshot` (or an `error` with code BATCH_NOT_FOUND) before any
//! update of that batch. Invalid or oversized client messages get an
//! `error` message and the connection stays open.
//!
//! Flow control, per connection: `batch.progress` is coalesced per batch
//! (the latest state wins, at most [`HubConfig::progress_per_second`]), and
//! the outgoing buffer contains at most [`HubConfig::buffer_capacity`]
//! messages. When it is full, progress and job events are dropped and
//! counted; `batch.finished`, snapshots and errors replace a droppable
//! message. A client whose buffer holds only such messages, or stays full
//! past [`HubConfig::slow_client_grace`], is closed with code 4008.
//!
//! Invariants:
//! - A connection receives events of its own user only, whatever it
//!   subscribes to, and a snapshot only of a batch its user owns.
//! - No `batch.progress` or `batch.snapshot` of a batch follows the
//!   `batch.finished` of the same generation on a connection.
//! - Publishing never waits for a client, and memory per connection is
//!   bounded by its buffer.
//!
//! What it never does: authenticate users (the server does, then calls
//! [`actix::upgrade`] with the user id), write to a store, or read the
//! events of the queue on its own.

pub mod actix;
mod config;
mod hub;
mod messages;
mod origin;
mod outbox;
mod snapshot;
mod ticket;

pub use config::{ConfigError, HeartbeatConfig, HubConfig};
pub use hub::{CloseCause, Connection, Hub, Outgoing};
pub use messages::{
    BatchUpdate, ClientMessage, ClientMessageError, ErrorBody, ErrorCode, FinishedUpdate,
    JobUpdate, LiveStats, ServerMessage, StageDetails, Topic,
};
pub use origin::{Origin, OriginError, OriginPolicy};
pub use snapshot::SnapshotSource;
pub use ticket::{Ticket, TicketError, TicketStore};
