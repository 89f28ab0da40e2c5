//! The source of a batch's current state when a client subscribes.

use async_trait::async_trait;
use domain::{AdminStore, Batch, BatchId, Scope, StoreError, UserId};

/// Reads a batch as its owner sees it.
#[async_trait]
pub trait SnapshotSource: Send + Sync + 'static {
    /// Returns the batch if it exists and belongs to `owner`, `None` if it
    /// does not exist or belongs to someone else.
    async fn batch(&self, owner: &UserId, id: BatchId) -> Result<Option<Batch>, StoreError>;
}

/// Every admin store is a snapshot source, read with the owner's scope so a
/// foreign batch looks exactly like a missing one.
#[async_trait]
impl<S: AdminStore> SnapshotSource for S {
    async fn batch(&self, owner: &UserId, id: BatchId) -> Result<Option<Batch>, StoreError> {
        match self.get_batch(&Scope::Owner(owner.clone()), id).await {
            Ok(batch) => Ok(Some(batch)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }
}
