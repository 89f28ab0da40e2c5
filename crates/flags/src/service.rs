//! [`FlagService`]: the in-memory snapshot, the admin operations that keep
//! it current, and the background task that polls the store.

use std::sync::{Arc, OnceLock, PoisonError, RwLock, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::{
    AuditFilter, FeatureFlag, FlagAuditEntry, FlagChange, FlagName, FlagPatch, FlagStore,
    FlagStoreError, NewFlag, Page, UserId,
};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::error::FlagError;
use crate::evaluate::Evaluation;
use crate::snapshot::FlagSnapshot;
use crate::unknown::UnknownFlags;

/// Consecutive refresh failures between two warnings, after the first.
const FAILURES_PER_WARNING: u64 = 30;

/// Settings of the flag service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagConfig {
    /// How often the background task reads the store's flag revision. A
    /// change made by another process becomes visible here within about
    /// this interval plus one reload.
    pub refresh_interval: Duration,
    /// Result for a flag name that does not exist.
    pub unknown_flag_default: bool,
    /// How many distinct unknown flag names are logged. Further names are
    /// only counted, so a caller passing arbitrary names cannot grow memory
    /// without bound.
    pub max_logged_unknown_flags: usize,
}

impl Default for FlagConfig {
    fn default() -> Self {
        Self {
            refresh_interval: Duration::from_secs(2),
            unknown_flag_default: false,
            max_logged_unknown_flags: 1_024,
        }
    }
}

/// Feature flags for one process: evaluation from an in-memory snapshot,
/// and admin operations that write through to the store.
///
/// Cheap to clone; clones share the snapshot and the refresh task. The task
/// stops when the cancellation token passed to [`start`](Self::start) is
/// cancelled or when the last clone is dropped.
#[derive(Clone)]
pub struct FlagService {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn FlagStore>,
    config: FlagConfig,
    snapshot: RwLock<Arc<FlagSnapshot>>,
    /// Held while replacing the snapshot after a reload or an admin write,
    /// so replacements happen one at a time and each builds on the last.
    /// Evaluation never takes it.
    replace: tokio::sync::Mutex<()>,
    unknown: UnknownFlags,
    refresh_task: OnceLock<JoinHandle<()>>,
    /// Cancels the refresh task when the last clone of the service is gone.
    _stop_refresh: DropGuard,
}

impl std::fmt::Debug for FlagService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlagService")
            .field("config", &self.shared.config)
            .field("revision", &self.revision())
            .field("flags", &self.snapshot().len())
            .finish_non_exhaustive()
    }
}

impl FlagService {
    /// Loads every flag from the store and starts the refresh task on the
    /// current tokio runtime.
    pub async fn start(
        store: Arc<dyn FlagStore>,
        config: FlagConfig,
        cancel: CancellationToken,
    ) -> Result<Self, FlagError> {
        if config.refresh_interval.is_zero() {
            return Err(FlagError::ZeroRefreshInterval);
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| FlagError::NoRuntime)?;

        let listing = store.list_flags().await.map_err(FlagError::Load)?;
        let snapshot = FlagSnapshot::from_listing(listing);
        tracing::info!(
            revision = snapshot.revision(),
            flags = snapshot.len(),
            refresh_interval_ms = config.refresh_interval.as_millis() as u64,
            "loaded feature flags"
        );

        let stop = cancel.child_token();
        let shared = Arc::new(Shared {
            store,
            unknown: UnknownFlags::new(
                config.max_logged_unknown_flags,
                config.unknown_flag_default,
            ),
            config,
            snapshot: RwLock::new(Arc::new(snapshot)),
            replace: tokio::sync::Mutex::new(()),
            refresh_task: OnceLock::new(),
            _stop_refresh: stop.clone().drop_guard(),
        });

        let task = runtime.spawn(refresh_loop(
            Arc::downgrade(&shared),
            stop,
            shared.config.refresh_interval,
        ));
        // The cell was created empty just above, so this set cannot fail.
        let _ = shared.refresh_task.set(task);
        Ok(Self { shared })
    }

    /// Evaluates `flag` for `user` from the snapshot. Never touches the
    /// store. A name with no flag evaluates to the configured default and
    /// is logged the first time it is seen.
    pub fn evaluate(&self, flag: &str, user: &str) -> Evaluation {
        let evaluation = {
            let snapshot = self
                .shared
                .snapshot
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            snapshot.evaluate(flag, user)
        };
        evaluation.unwrap_or_else(|| {
            self.shared.unknown.record(flag);
            Evaluation::unknown(self.shared.config.unknown_flag_default)
        })
    }

    /// Returns whether `flag` is on for `user`; see [`evaluate`](Self::evaluate).
    pub fn is_enabled(&self, flag: &str, user: &str) -> bool {
        self.evaluate(flag, user).enabled
    }

    /// Returns the current snapshot, for evaluating many flags against one
    /// consistent view or for listing the flags without a store read.
    pub fn snapshot(&self) -> Arc<FlagSnapshot> {
        self.shared.current()
    }

    /// Returns the store revision the snapshot fully reflects.
    pub fn revision(&self) -> u64 {
        self.shared.current().revision()
    }

    pub fn config(&self) -> &FlagConfig {
        &self.shared.config
    }

    /// Returns the number of evaluations of flag names that do not exist.
    pub fn unknown_evaluations(&self) -> u64 {
        self.shared.unknown.evaluations()
    }

    /// Returns whether the background refresh task is still running.
    pub fn is_refreshing(&self) -> bool {
        self.shared
            .refresh_task
            .get()
            .is_some_and(|task| !task.is_finished())
    }

    /// Reads the store's revision and reloads every flag if it differs from
    /// the snapshot's. Returns whether it reloaded. The background task
    /// calls this on every tick.
    pub async fn refresh(&self) -> Result<bool, FlagStoreError> {
        self.shared.refresh().await
    }

    /// Reads one flag from the store, with the version to pass as the
    /// expected version of a later update.
    pub async fn get_flag(&self, name: &FlagName) -> Result<FeatureFlag, FlagStoreError> {
        self.shared.store.get_flag(name).await
    }

    /// Creates a flag and puts it into the snapshot at once.
    pub async fn create_flag(
        &self,
        flag: NewFlag,
        actor: &UserId,
        now: DateTime<Utc>,
    ) -> Result<FlagChange, FlagStoreError> {
        let store = &self.shared.store;
        self.shared
            .write_through(store.create_flag(flag, actor, now))
            .await
    }

    /// Applies a patch and puts the result into the snapshot at once.
    pub async fn update_flag(
        &self,
        name: &FlagName,
        patch: FlagPatch,
        actor: &UserId,
        now: DateTime<Utc>,
    ) -> Result<FlagChange, FlagStoreError> {
        let store = &self.shared.store;
        self.shared
            .write_through(store.update_flag(name, patch, actor, now))
            .await
    }

    /// Deletes a flag and removes it from the snapshot at once.
    pub async fn delete_flag(
        &self,
        name: &FlagName,
        expected_version: Option<u64>,
        actor: &UserId,
        now: DateTime<Utc>,
    ) -> Result<FlagChange, FlagStoreError> {
        let store = &self.shared.store;
        self.shared
            .write_through(store.delete_flag(name, expected_version, actor, now))
            .await
    }

    /// Lists a flag's audit entries from the store, newest first.
    pub async fn list_flag_audit(
        &self,
        name: &FlagName,
        filter: AuditFilter,
    ) -> Result<Page<FlagAuditEntry>, FlagStoreError> {
        self.shared.store.list_flag_audit(name, filter).await
    }
}

impl Shared {
    fn current(&self) -> Arc<FlagSnapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn install(&self, snapshot: FlagSnapshot) {
        *self
            .snapshot
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(snapshot);
    }

    async fn refresh(&self) -> Result<bool, FlagStoreError> {
        let marker = self.store.flag_revision().await?;
        if marker == self.current().revision() {
            return Ok(false);
        }

        let _replacing = self.replace.lock().await;
        let listing = self.store.list_flags().await?;
        let snapshot = FlagSnapshot::from_listing(listing);
        tracing::debug!(
            previous_revision = self.current().revision(),
            revision = snapshot.revision(),
            flags = snapshot.len(),
            "reloaded feature flags"
        );
        self.install(snapshot);
        Ok(true)
    }

    /// Runs an admin write and applies its committed change to the
    /// snapshot. If the caller drops this future after the store has
    /// committed, the snapshot misses the change until the next refresh.
    async fn write_through(
        &self,
        write: impl Future<Output = Result<FlagChange, FlagStoreError>>,
    ) -> Result<FlagChange, FlagStoreError> {
        let _replacing = self.replace.lock().await;
        let change = write.await?;
        if change.action.is_some() {
            let next = self.current().with_change(&change);
            self.install(next);
        }
        Ok(change)
    }
}

/// Polls the store's revision every `interval` and reloads when it moved.
/// Holds the service only weakly, so it never keeps a dropped service alive.
async fn refresh_loop(shared: Weak<Shared>, stop: CancellationToken, interval: Duration) {
    tracing::info!(
        interval_ms = interval.as_millis() as u64,
        "feature flag refresh started"
    );
    let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failures: u64 = 0;

    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let Some(service) = shared.upgrade() else {
            break;
        };
        let result = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            result = service.refresh() => result,
        };
        match result {
            Ok(_) => {
                if failures > 0 {
                    tracing::info!(
                        failures,
                        revision = service.current().revision(),
                        "feature flag refresh recovered"
                    );
                }
                failures = 0;
            }
            Err(error) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(FAILURES_PER_WARNING) {
                    tracing::warn!(
                        %error,
                        consecutive_failures = failures,
                        revision = service.current().revision(),
                        "refreshing feature flags failed; evaluating with the last loaded flags"
                    );
                }
            }
        }
    }
    tracing::info!("feature flag refresh stopped");
}
