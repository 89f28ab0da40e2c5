use thiserror::Error;

use crate::job::{JobEvent, JobStatus};

/// A state change that the job state machine does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("a job in state {from} cannot take event {event:?}")]
pub struct TransitionError {
    pub from: JobStatus,
    pub event: JobEvent,
}

/// Errors of the store traits. Every backend maps its own failures into
/// these, so callers above the store never see a driver type.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The entity does not exist, or exists but belongs to another owner.
    #[error("{entity} {id} not found")]
    NotFound { entity: &'static str, id: String },

    /// The request asks for a state change the entity's state forbids.
    #[error("{entity} {id} is {state}, so it cannot be {action}")]
    IllegalState {
        entity: &'static str,
        id: String,
        state: String,
        action: &'static str,
    },

    /// An idempotency key was reused with a different request body.
    #[error(
        "idempotency key {key:?} was already used for a different request; send a new key for a new batch"
    )]
    IdempotencyMismatch { key: String },

    /// The first request with this idempotency key is still inserting items.
    #[error(
        "a batch with idempotency key {key:?} is still being created by an earlier request; retry shortly, or, if that request was cut off, once its partial batch is discarded"
    )]
    IdempotencyInProgress { key: String },

    /// The caller passed a value the store cannot accept.
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },

    /// A dependency names a job or batch that does not exist.
    #[error("dependency {id} not found")]
    DependencyNotFound { id: String },

    /// The store's writer has stopped, for example during shutdown.
    #[error("store is shutting down and accepts no more writes")]
    Closed,

    /// A stored value could not be read back.
    #[error("stored {what} is corrupt: {value:?}")]
    Corrupt { what: &'static str, value: String },

    /// The database cannot be reached right now: no connection could be
    /// had in time, or the one in use was lost. The same request may
    /// succeed shortly; a write whose connection was lost during commit
    /// may or may not have been applied.
    #[error("database operation {operation} failed: the database is unreachable; retry shortly")]
    Unavailable {
        operation: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The database failed.
    #[error("database operation {operation} failed")]
    Backend {
        operation: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StoreError {
    pub fn not_found(entity: &'static str, id: impl ToString) -> Self {
        StoreError::NotFound {
            entity,
            id: id.to_string(),
        }
    }

    pub fn unavailable(
        operation: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StoreError::Unavailable {
            operation,
            source: Box::new(source),
        }
    }

    pub fn backend(
        operation: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StoreError::Backend {
            operation,
            source: Box::new(source),
        }
    }
}
