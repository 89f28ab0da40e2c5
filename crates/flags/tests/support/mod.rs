//! Helpers shared by the integration tests: a SQLite store in a temporary
//! directory, and a wrapper store that counts reads and can be made to fail.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::{
    AuditFilter, FeatureFlag, FlagAuditEntry, FlagChange, FlagListing, FlagName, FlagPatch,
    FlagStore, FlagStoreError, NewFlag, Page, StoreError, UserId,
};
use sqlite_store::{SqliteConfig, SqliteStore};

pub async fn open_store(path: &Path) -> SqliteStore {
    SqliteStore::open(SqliteConfig::new(path)).await.unwrap()
}

pub fn name(text: &str) -> FlagName {
    FlagName::parse(text).unwrap()
}

pub fn admin() -> UserId {
    UserId::new("admin-1")
}

/// Polls `condition` every 10 ms until it is true or `limit` passes; returns
/// how long it took, or `None` on timeout.
pub async fn wait_for(limit: Duration, mut condition: impl FnMut() -> bool) -> Option<Duration> {
    let started = tokio::time::Instant::now();
    loop {
        if condition() {
            return Some(started.elapsed());
        }
        if started.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A [`FlagStore`] that forwards to SQLite, counts the reads a cache makes,
/// and fails those reads while `failing` is set.
#[derive(Debug)]
pub struct Instrumented {
    pub inner: SqliteStore,
    pub failing: AtomicBool,
    pub revision_reads: AtomicU64,
    pub listings: AtomicU64,
}

impl Instrumented {
    pub fn new(inner: SqliteStore) -> Arc<Self> {
        Arc::new(Self {
            inner,
            failing: AtomicBool::new(false),
            revision_reads: AtomicU64::new(0),
            listings: AtomicU64::new(0),
        })
    }

    pub fn revision_reads(&self) -> u64 {
        self.revision_reads.load(Ordering::SeqCst)
    }

    pub fn listings(&self) -> u64 {
        self.listings.load(Ordering::SeqCst)
    }

    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    fn check(&self, operation: &'static str) -> Result<(), FlagStoreError> {
        if self.failing.load(Ordering::SeqCst) {
            let source = std::io::Error::other("injected failure");
            return Err(FlagStoreError::Store(StoreError::backend(
                operation, source,
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl FlagStore for Instrumented {
    async fn list_flags(&self) -> Result<FlagListing, FlagStoreError> {
        self.listings.fetch_add(1, Ordering::SeqCst);
        self.check("list feature flags")?;
        self.inner.list_flags().await
    }

    async fn get_flag(&self, name: &FlagName) -> Result<FeatureFlag, FlagStoreError> {
        self.inner.get_flag(name).await
    }

    async fn create_flag(
        &self,
        flag: NewFlag,
        actor: &UserId,
        now: DateTime<Utc>,
    ) -> Result<FlagChange, FlagStoreError> {
        self.inner.create_flag(flag, actor, now).await
    }

    async fn update_flag(
        &self,
        name: &FlagName,
        patch: FlagPatch,
        actor: &UserId,
        now: DateTime<Utc>,
    ) -> Result<FlagChange, FlagStoreError> {
        self.inner.update_flag(name, patch, actor, now).await
    }

    async fn delete_flag(
        &self,
        name: &FlagName,
        expected_version: Option<u64>,
        actor: &UserId,
        now: DateTime<Utc>,
    ) -> Result<FlagChange, FlagStoreError> {
        self.inner
            .delete_flag(name, expected_version, actor, now)
            .await
    }

    async fn list_flag_audit(
        &self,
        name: &FlagName,
        filter: AuditFilter,
    ) -> Result<Page<FlagAuditEntry>, FlagStoreError> {
        self.inner.list_flag_audit(name, filter).await
    }

    async fn flag_revision(&self) -> Result<u64, FlagStoreError> {
        self.revision_reads.fetch_add(1, Ordering::SeqCst);
        self.check("read feature flag revision")?;
        self.inner.flag_revision().await
    }
}
