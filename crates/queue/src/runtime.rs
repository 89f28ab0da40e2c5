//! The worker runtime: dispatchers that claim, tasks that run handlers, and
//! the background loops that keep leases, schedules and retention going.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use domain::{
    AdminStore, AttemptOutcome, Batch, BatchId, BeginOutcome, ChangeSet, ClaimRequest, ClaimedJob,
    Clock, CreatedBatch, FailureKind, GcraParams, JobChange, JobId, JobStatus, JobStore,
    LeaseOwner, LeaseRef, NewBatch, NewJob, OutcomeKind, OutcomeResult, ProgressUpdate,
    PruneRequest, RateLimitStore, RedriveReport, RedriveSelection, Scope, StagingBatch, StoreError,
    SystemClock, UserId,
};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{KindConfig, QueueConfig, Rate};
use crate::events::{JobEvent, QueueEvent};
use crate::handler::{HandlerError, JobContext, JobHandler, ProgressReporter, SharedHandler};
use crate::shared_rate::{self, SharedRates};
use crate::throttle::Throttle;

/// A store the queue can run on: the hot path and the admin side together.
pub trait Store: JobStore + AdminStore {}
impl<T: JobStore + AdminStore> Store for T {}

/// Errors of the queue's own API.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("no handler is registered for job kind {kind:?}; register one or use a known kind")]
    UnknownKind { kind: String },
    #[error("the queue is already running")]
    AlreadyStarted,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Cause of a running job's cancellation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum CancelReason {
    None = 0,
    Batch = 1,
    LeaseLost = 2,
    Shutdown = 3,
    Timeout = 4,
}

impl CancelReason {
    fn from_u8(value: u8) -> Self {
        match value {
            1 => CancelReason::Batch,
            2 => CancelReason::LeaseLost,
            3 => CancelReason::Shutdown,
            4 => CancelReason::Timeout,
            _ => CancelReason::None,
        }
    }
}

/// A job this process holds a lease on.
struct InFlight {
    lease: LeaseRef,
    cancel: CancellationToken,
    reason: Arc<AtomicU8>,
    batch_id: BatchId,
    owner: UserId,
    kind: String,
    seq: u32,
    correlation_id: Option<String>,
    /// Set once the outcome is handed to the recorder: a heartbeat that
    /// finds the lease gone then just saw the outcome commit first.
    finishing: AtomicBool,
}

impl InFlight {
    fn cancel(&self, reason: CancelReason) {
        // The first reason wins: a timeout that fires after a batch
        // cancellation does not turn the outcome into a retry.
        let _ = self.reason.compare_exchange(
            CancelReason::None as u8,
            reason as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.cancel.cancel();
    }
}

/// Channel ends the background tasks take over at start.
type Receivers = (
    mpsc::UnboundedReceiver<Finished>,
    mpsc::Receiver<(JobId, u8)>,
);

/// An attempt whose outcome waits to be recorded.
struct Finished {
    outcome: AttemptOutcome,
    /// The kind's concurrency slot the attempt ran in, held until the
    /// outcome is committed. A job whose outcome is not yet durable still
    /// counts against the kind's concurrency, so a crash repeats at most
    /// `concurrency` jobs per kind, however far the recorder falls behind.
    /// Only its drop matters.
    _slot: Option<OwnedSemaphorePermit>,
}

struct KindState {
    handler: SharedHandler,
    config: KindConfig,
    wake: Notify,
    paused: AtomicBool,
    slots: Arc<Semaphore>,
    throttle: Option<Mutex<Throttle>>,
    user_throttle: Option<Mutex<Throttle>>,
    /// The kind's and each owner's rate, kept in the store instead of
    /// `throttle` and `user_throttle` when rates are shared.
    shared_rate: Option<GcraParams>,
    shared_user_rate: Option<GcraParams>,
}

struct Inner {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: QueueConfig,
    shared_rates: Option<SharedRates>,
    owner: LeaseOwner,
    kinds: HashMap<String, KindState>,
    events: broadcast::Sender<QueueEvent>,
    inflight: Mutex<HashMap<JobId, InFlight>>,
    idle: Notify,
    finished_tx: mpsc::UnboundedSender<Finished>,
    progress_tx: mpsc::Sender<(JobId, u8)>,
    receivers: Mutex<Option<Receivers>>,
    rng: Mutex<fastrand::Rng>,
    /// Stops claiming and the background loops.
    stopping: CancellationToken,
    /// Cancels running handlers once the grace period is over.
    hard_stop: CancellationToken,
    promoter_wake: Notify,
    started: AtomicBool,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    recorder: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind,
    // which stays usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Builds a [`Queue`]: the store, a clock, settings and one handler per kind.
pub struct QueueBuilder {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: QueueConfig,
    shared_rates: Option<SharedRates>,
    kinds: HashMap<String, (SharedHandler, KindConfig)>,
}

impl std::fmt::Debug for QueueBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueBuilder")
            .field("config", &self.config)
            .field("kinds", &self.kinds.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl QueueBuilder {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            clock: Arc::new(SystemClock),
            config: QueueConfig::default(),
            shared_rates: None,
            kinds: HashMap::new(),
        }
    }

    /// Keeps the processing rates of every kind (`rate` and
    /// `per_user_rate`) in `store`, so that all processes sharing it share
    /// each budget. Without it each process enforces the rates for itself,
    /// which is exact, and cheaper, for a single process.
    pub fn shared_rates(mut self, store: Arc<dyn RateLimitStore>) -> Self {
        self.shared_rates = Some(SharedRates::new(store));
        self
    }

    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub fn config(mut self, config: QueueConfig) -> Self {
        self.config = config;
        self
    }

    /// Registers the handler of a job kind; a second call for the same kind
    /// replaces the first.
    pub fn register(
        mut self,
        kind: impl Into<String>,
        handler: impl JobHandler,
        config: KindConfig,
    ) -> Self {
        self.kinds.insert(kind.into(), (Arc::new(handler), config));
        self
    }

    pub fn build(self) -> Queue {
        let (events, _) = broadcast::channel(self.config.event_capacity.max(16));
        let (finished_tx, finished_rx) = mpsc::unbounded_channel();
        let (progress_tx, progress_rx) = mpsc::channel(4_096);
        let rng = match self.config.jitter_seed {
            Some(seed) => fastrand::Rng::with_seed(seed),
            None => fastrand::Rng::new(),
        };
        let kinds = self
            .kinds
            .into_iter()
            .map(|(name, (handler, config))| {
                let shared = self.shared_rates.is_some();
                let local = |rate: Option<Rate>| {
                    rate.filter(|_| !shared)
                        .map(|rate| Mutex::new(Throttle::new(rate)))
                };
                let state = KindState {
                    handler,
                    slots: Arc::new(Semaphore::new(config.concurrency.max(1))),
                    throttle: local(config.rate),
                    user_throttle: local(config.per_user_rate),
                    shared_rate: config.rate.filter(|_| shared).map(shared_rate::params),
                    shared_user_rate: config
                        .per_user_rate
                        .filter(|_| shared)
                        .map(shared_rate::params),
                    config,
                    wake: Notify::new(),
                    paused: AtomicBool::new(false),
                };
                (name, state)
            })
            .collect();

        Queue {
            inner: Arc::new(Inner {
                store: self.store,
                clock: self.clock,
                shared_rates: self.shared_rates,
                owner: LeaseOwner::unique(&self.config.node_label),
                config: self.config,
                kinds,
                events,
                inflight: Mutex::new(HashMap::new()),
                idle: Notify::new(),
                finished_tx,
                progress_tx,
                receivers: Mutex::new(Some((finished_rx, progress_rx))),
                rng: Mutex::new(rng),
                stopping: CancellationToken::new(),
                hard_stop: CancellationToken::new(),
                promoter_wake: Notify::new(),
                started: AtomicBool::new(false),
                tasks: Mutex::new(Vec::new()),
                recorder: Mutex::new(None),
            }),
        }
    }
}

/// Summary of a graceful shutdown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Jobs still running when the grace period ended, given back unrun.
    pub released: usize,
}

/// The durable queue with its worker runtime. Cheap to clone.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("owner", &self.inner.owner)
            .field("kinds", &self.inner.kinds.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Queue {
    pub fn builder(store: Arc<dyn Store>) -> QueueBuilder {
        QueueBuilder::new(store)
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    /// Name under which this process takes leases.
    pub fn lease_owner(&self) -> &LeaseOwner {
        &self.inner.owner
    }

    /// Registered kinds, sorted.
    pub fn kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self.inner.kinds.keys().cloned().collect();
        kinds.sort();
        kinds
    }

    pub fn is_known_kind(&self, kind: &str) -> bool {
        self.inner.kinds.contains_key(kind)
    }

    /// Events published after each commit. A receiver that falls behind by
    /// more than the channel's capacity gets `Lagged` and should re-read
    /// the state it cares about.
    pub fn subscribe(&self) -> broadcast::Receiver<QueueEvent> {
        self.inner.events.subscribe()
    }

    /// Jobs this process is running now.
    pub fn in_flight(&self) -> usize {
        lock(&self.inner.inflight).len()
    }

    /// Builds a batch description with the kind's retry settings filled in.
    pub fn new_batch(&self, owner: UserId, kind: &str) -> Result<NewBatch, QueueError> {
        let state = self.kind(kind)?;
        let mut batch = NewBatch::new(owner, kind);
        batch.max_attempts = state.config.retry.max_attempts.max(1);
        Ok(batch)
    }

    fn kind(&self, kind: &str) -> Result<&KindState, QueueError> {
        self.inner
            .kinds
            .get(kind)
            .ok_or_else(|| QueueError::UnknownKind {
                kind: kind.to_owned(),
            })
    }

    /// Creates a batch and wakes workers once it is committed.
    pub async fn create_batch(
        &self,
        batch: NewBatch,
        items: Vec<NewJob>,
    ) -> Result<CreatedBatch, QueueError> {
        self.kind(&batch.kind)?;
        let created = self
            .inner
            .store
            .create_batch(batch, items, self.inner.clock.now())
            .await?;
        if created.created {
            tracing::info!(
                batch_id = %created.batch.id,
                kind = %created.batch.kind,
                items = created.batch.counters.item_count,
                correlation_id = created.batch.correlation_id.as_deref().unwrap_or(""),
                "batch accepted"
            );
        }
        self.inner.publish(created.changes.clone());
        Ok(created)
    }

    /// Starts a batch whose items arrive in parts (a streamed body).
    pub async fn begin_batch(&self, batch: NewBatch) -> Result<BeginOutcome, QueueError> {
        self.kind(&batch.kind)?;
        Ok(self
            .inner
            .store
            .begin_batch(batch, self.inner.clock.now())
            .await?)
    }

    pub async fn append_items(
        &self,
        staging: &mut StagingBatch,
        items: Vec<NewJob>,
    ) -> Result<(), QueueError> {
        Ok(self
            .inner
            .store
            .append_items(staging, items, self.inner.clock.now())
            .await?)
    }

    pub async fn commit_batch(&self, staging: StagingBatch) -> Result<CreatedBatch, QueueError> {
        let created = self
            .inner
            .store
            .commit_batch(staging, self.inner.clock.now())
            .await?;
        tracing::info!(
            batch_id = %created.batch.id,
            kind = %created.batch.kind,
            items = created.batch.counters.item_count,
            correlation_id = created.batch.correlation_id.as_deref().unwrap_or(""),
            "batch accepted"
        );
        self.inner.publish(created.changes.clone());
        Ok(created)
    }

    pub async fn abort_batch(&self, staging: StagingBatch) -> Result<(), QueueError> {
        Ok(self.inner.store.abort_batch(staging).await?)
    }

    /// Cancels a batch: waiting items at once, running handlers signalled.
    pub async fn cancel_batch(
        &self,
        scope: &Scope,
        id: BatchId,
        reason: &str,
    ) -> Result<Batch, QueueError> {
        let (batch, changes) = self
            .inner
            .store
            .cancel_batch(scope, id, reason, self.inner.clock.now())
            .await?;
        tracing::info!(batch_id = %id, running = changes.cancel_running.len(), "batch cancelled");
        self.inner.publish(changes);
        Ok(batch)
    }

    /// Sends a batch's dead items back to the queue.
    pub async fn retry_batch(
        &self,
        scope: &Scope,
        id: BatchId,
    ) -> Result<(Batch, RedriveReport), QueueError> {
        let (batch, report) = self
            .inner
            .store
            .retry_batch(scope, id, self.inner.clock.now())
            .await?;
        tracing::info!(batch_id = %id, redriven = report.redriven.len(), "batch dead items re-queued");
        self.inner.publish(report.changes.clone());
        Ok((batch, report))
    }

    /// Sends selected dead jobs back to the queue.
    pub async fn redrive(
        &self,
        scope: &Scope,
        selection: RedriveSelection,
    ) -> Result<RedriveReport, QueueError> {
        let report = self
            .inner
            .store
            .redrive(scope, selection, self.inner.clock.now())
            .await?;
        tracing::info!(redriven = report.redriven.len(), "dead letters re-driven");
        self.inner.publish(report.changes.clone());
        Ok(report)
    }

    /// Stops claiming jobs of a kind, in every process on this store.
    pub async fn pause_kind(&self, kind: &str) -> Result<(), QueueError> {
        let state = self.kind(kind)?;
        self.inner
            .store
            .set_kind_paused(kind, true, self.inner.clock.now())
            .await?;
        state.paused.store(true, Ordering::Release);
        tracing::info!(kind, "kind paused");
        Ok(())
    }

    pub async fn resume_kind(&self, kind: &str) -> Result<(), QueueError> {
        let state = self.kind(kind)?;
        self.inner
            .store
            .set_kind_paused(kind, false, self.inner.clock.now())
            .await?;
        state.paused.store(false, Ordering::Release);
        state.wake.notify_one();
        tracing::info!(kind, "kind resumed");
        Ok(())
    }

    /// Wakes the idle workers of these kinds, for jobs another process
    /// made runnable. Unknown kinds are ignored.
    pub fn wake(&self, kinds: &[String]) {
        for kind in kinds {
            self.inner.wake(kind);
        }
    }

    /// Wakes every kind's workers and the promoter, after signals from
    /// other processes may have been missed.
    pub fn wake_all(&self) {
        for state in self.inner.kinds.values() {
            state.wake.notify_one();
        }
        self.inner.promoter_wake.notify_one();
    }

    /// Stops the handlers of these jobs, if they run here, because their
    /// batch was cancelled (by another process: this one's own cancels
    /// signal their handlers already). Returns how many were running here.
    pub fn cancel_running(&self, jobs: &[JobId]) -> usize {
        let inflight = lock(&self.inner.inflight);
        let mut signalled = 0;
        for job_id in jobs {
            if let Some(job) = inflight.get(job_id) {
                job.cancel(CancelReason::Batch);
                signalled += 1;
            }
        }
        signalled
    }

    /// Re-reads which kinds are paused, after another process changed it.
    pub async fn refresh_controls(&self) {
        self.inner.refresh_controls().await;
    }

    pub fn is_paused(&self, kind: &str) -> bool {
        self.inner
            .kinds
            .get(kind)
            .is_some_and(|state| state.paused.load(Ordering::Acquire))
    }

    /// Starts the workers and background loops on the current tokio
    /// runtime, after delivering batch-finished events a crash left behind.
    pub async fn start(&self) -> Result<(), QueueError> {
        if self.inner.started.swap(true, Ordering::AcqRel) {
            return Err(QueueError::AlreadyStarted);
        }
        let Some((finished_rx, progress_rx)) = lock(&self.inner.receivers).take() else {
            return Err(QueueError::AlreadyStarted);
        };

        self.inner.refresh_controls().await;
        self.inner.deliver_pending_finishes().await;

        let mut tasks = Vec::new();
        for kind in self.inner.kinds.keys() {
            let inner = self.inner.clone();
            let kind = kind.clone();
            tasks.push(tokio::spawn(async move { inner.dispatch(kind).await }));
        }
        let inner = self.inner.clone();
        tasks.push(tokio::spawn(async move { inner.heartbeat_loop().await }));
        let inner = self.inner.clone();
        tasks.push(tokio::spawn(async move { inner.reap_loop().await }));
        let inner = self.inner.clone();
        tasks.push(tokio::spawn(async move { inner.promote_loop().await }));
        let inner = self.inner.clone();
        tasks.push(tokio::spawn(async move { inner.controls_loop().await }));
        let inner = self.inner.clone();
        tasks.push(tokio::spawn(async move {
            inner.progress_loop(progress_rx).await
        }));
        if let Some(interval) = self.inner.config.retention.interval {
            let inner = self.inner.clone();
            tasks.push(tokio::spawn(
                async move { inner.prune_loop(interval).await },
            ));
        }
        *lock(&self.inner.tasks) = tasks;

        let inner = self.inner.clone();
        *lock(&self.inner.recorder) =
            Some(tokio::spawn(
                async move { inner.record_loop(finished_rx).await },
            ));

        tracing::info!(owner = %self.inner.owner, kinds = self.inner.kinds.len(), "queue started");
        Ok(())
    }

    /// Stops claiming, lets running handlers finish within the grace
    /// period, then cancels the rest and gives their jobs back to the queue
    /// without counting the attempt. Returns once every outcome is recorded.
    pub async fn shutdown(&self) -> ShutdownReport {
        let inner = &self.inner;
        inner.stopping.cancel();

        let deadline = tokio::time::Instant::now() + inner.config.shutdown_grace;
        loop {
            let idle = inner.idle.notified();
            if lock(&inner.inflight).is_empty() {
                break;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                break;
            }
        }

        let released = {
            let inflight = lock(&inner.inflight);
            for job in inflight.values() {
                job.cancel(CancelReason::Shutdown);
            }
            inflight.len()
        };
        inner.hard_stop.cancel();
        loop {
            let idle = inner.idle.notified();
            if lock(&inner.inflight).is_empty() {
                break;
            }
            // Handlers that ignore cancellation still hold their lease; it
            // expires and another process takes the job.
            if tokio::time::timeout(inner.config.shutdown_grace, idle)
                .await
                .is_err()
            {
                tracing::warn!(
                    running = lock(&inner.inflight).len(),
                    "handlers ignored cancellation; their leases will expire"
                );
                break;
            }
        }

        let tasks: Vec<JoinHandle<()>> = lock(&inner.tasks).drain(..).collect();
        for task in tasks {
            task.abort();
        }
        let recorder = lock(&inner.recorder).take();
        if let Some(recorder) = recorder {
            recorder.abort();
        }
        tracing::info!(released, "queue stopped");
        ShutdownReport { released }
    }
}

impl Inner {
    fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    fn lease_until(&self) -> DateTime<Utc> {
        let lease = chrono::Duration::from_std(self.config.lease_duration)
            .unwrap_or(chrono::Duration::seconds(30));
        self.now() + lease
    }

    fn emit(&self, event: QueueEvent) {
        // No subscriber is not an error: events are a view, not the record.
        let _ = self.events.send(event);
    }

    fn has_subscribers(&self) -> bool {
        self.events.receiver_count() > 0
    }

    fn wake(&self, kind: &str) {
        if let Some(state) = self.kinds.get(kind) {
            state.wake.notify_one();
        }
    }

    /// Publishes what a commit changed: job and batch events, wake-ups,
    /// cancellation signals, and batch-finished events (acknowledged in the
    /// outbox once published).
    fn publish(self: &Arc<Self>, changes: ChangeSet) {
        if changes.is_empty() {
            return;
        }
        for kind in &changes.runnable_kinds {
            self.wake(kind);
        }
        if !changes.cancel_running.is_empty() {
            let inflight = lock(&self.inflight);
            for job_id in &changes.cancel_running {
                if let Some(job) = inflight.get(job_id) {
                    job.cancel(CancelReason::Batch);
                }
            }
        }

        if self.has_subscribers() {
            let correlation: HashMap<JobId, Option<String>> = {
                let inflight = lock(&self.inflight);
                changes
                    .jobs
                    .iter()
                    .filter_map(|c| {
                        inflight
                            .get(&c.job_id)
                            .map(|j| (c.job_id, j.correlation_id.clone()))
                    })
                    .collect()
            };
            for change in &changes.jobs {
                let correlation_id = correlation.get(&change.job_id).cloned().flatten();
                if let Some(event) = job_event(change, correlation_id) {
                    self.emit(event);
                }
            }
            for progress in &changes.batches {
                self.emit(QueueEvent::BatchProgress(progress.clone()));
            }
        }

        if !changes.finished.is_empty() {
            let ids: Vec<i64> = changes.finished.iter().map(|f| f.outbox_id).collect();
            for finished in changes.finished {
                tracing::info!(
                    batch_id = %finished.batch_id,
                    status = %finished.status,
                    succeeded = finished.counters.succeeded,
                    failed = finished.counters.failed,
                    cancelled = finished.counters.cancelled,
                    correlation_id = finished.correlation_id.as_deref().unwrap_or(""),
                    "batch finished"
                );
                self.emit(QueueEvent::BatchFinished(finished));
            }
            let inner = self.clone();
            tokio::spawn(async move {
                if let Err(error) = inner.store.ack_finishes(&ids).await {
                    // Left in the outbox: delivered again on the next start.
                    tracing::warn!(%error, outbox_ids = ?ids, "acknowledging batch-finished events failed");
                }
            });
        }
    }

    async fn deliver_pending_finishes(self: &Arc<Self>) {
        loop {
            let pending = match self.store.pending_finishes(100).await {
                Ok(pending) => pending,
                Err(error) => {
                    tracing::warn!(%error, "reading undelivered batch-finished events failed");
                    return;
                }
            };
            if pending.is_empty() {
                return;
            }
            let ids: Vec<i64> = pending.iter().map(|f| f.outbox_id).collect();
            tracing::info!(
                count = ids.len(),
                "delivering batch-finished events left by an earlier run"
            );
            for finished in pending {
                self.emit(QueueEvent::BatchFinished(finished));
            }
            if let Err(error) = self.store.ack_finishes(&ids).await {
                tracing::warn!(%error, "acknowledging batch-finished events failed");
                return;
            }
        }
    }

    async fn refresh_controls(&self) {
        match self.store.kind_controls().await {
            Ok(controls) => {
                for state in self.kinds.values() {
                    state.paused.store(false, Ordering::Release);
                }
                for control in controls {
                    if let Some(state) = self.kinds.get(&control.kind) {
                        let was_paused = state.paused.swap(control.paused, Ordering::AcqRel);
                        if was_paused && !control.paused {
                            state.wake.notify_one();
                        }
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "reading kind controls failed"),
        }
    }

    /// Waits for `duration`, a wake-up of `kind`, or shutdown.
    async fn idle_wait(&self, kind: &KindState, duration: Duration) {
        tokio::select! {
            _ = kind.wake.notified() => {}
            _ = tokio::time::sleep(duration) => {}
            _ = self.stopping.cancelled() => {}
        }
    }

    /// Claims and starts jobs of one kind while capacity allows.
    async fn dispatch(self: Arc<Self>, kind_name: String) {
        let Some(kind) = self.kinds.get(&kind_name) else {
            return;
        };
        let mut failures: u32 = 0;

        while !self.stopping.is_cancelled() {
            if kind.paused.load(Ordering::Acquire) {
                self.idle_wait(kind, self.config.poll_interval).await;
                continue;
            }

            let first = tokio::select! {
                permit = kind.slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                _ = self.stopping.cancelled() => return,
            };
            let mut slots: Vec<OwnedSemaphorePermit> = vec![first];
            while slots.len() < self.config.claim_batch.max(1) as usize {
                match kind.slots.clone().try_acquire_owned() {
                    Ok(permit) => slots.push(permit),
                    Err(_) => break,
                }
            }

            let mut wanted = slots.len() as u32;
            if kind.throttle.is_some() || kind.shared_rate.is_some() {
                let (granted, wait) = self.take_kind_rate(kind, &kind_name, wanted).await;
                if granted == 0 {
                    drop(slots);
                    let wait = wait.unwrap_or(self.config.poll_interval);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.stopping.cancelled() => {}
                    }
                    continue;
                }
                wanted = granted;
                slots.truncate(granted as usize);
            }

            let request = ClaimRequest {
                kind: kind_name.clone(),
                owner: self.owner.clone(),
                limit: wanted,
                lease_until: self.lease_until(),
            };
            let jobs = match self.store.claim(request, self.now()).await {
                Ok(jobs) => {
                    failures = 0;
                    jobs
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(kind = %kind_name, %error, failures, "claiming jobs failed");
                    self.refund_kind_rate(kind, &kind_name, wanted).await;
                    drop(slots);
                    let backoff = Duration::from_millis(50u64 << failures.min(6));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.stopping.cancelled() => {}
                    }
                    continue;
                }
            };

            let unused = wanted - jobs.len() as u32;
            self.refund_kind_rate(kind, &kind_name, unused).await;
            slots.truncate(jobs.len());
            let drained = jobs.len() < wanted as usize;

            let jobs = self.charge_owner_rates(kind, &kind_name, jobs).await;
            for (job, slot) in jobs.into_iter().zip(slots) {
                self.start_job(kind, job, slot);
            }

            if drained {
                self.idle_wait(kind, self.config.poll_interval).await;
            }
        }
    }

    /// Grants up to `wanted` starts under the kind's rate, in memory or in
    /// the store. Returns the grant and, when short, how long until the
    /// next start fits. When the store check fails, nothing is granted,
    /// because running past a limit that protects someone else is worse
    /// than a short delay.
    async fn take_kind_rate(
        &self,
        kind: &KindState,
        kind_name: &str,
        wanted: u32,
    ) -> (u32, Option<Duration>) {
        if let Some(throttle) = &kind.throttle {
            return lock(throttle).take_up_to(kind_name, wanted, self.now());
        }
        let (Some(shared), Some(params)) = (&self.shared_rates, kind.shared_rate) else {
            return (wanted, None);
        };
        match shared
            .take_up_to(
                shared_rate::KIND_POLICY,
                kind_name,
                wanted,
                params,
                self.now(),
            )
            .await
        {
            Ok(grant) => grant,
            Err(error) => {
                tracing::warn!(kind = kind_name, %error, "checking the kind's shared processing rate failed; waiting");
                (0, Some(self.config.poll_interval))
            }
        }
    }

    /// Gives back starts the kind's rate granted that no claimed job used.
    async fn refund_kind_rate(&self, kind: &KindState, kind_name: &str, unused: u32) {
        if unused == 0 {
            return;
        }
        if let Some(throttle) = &kind.throttle {
            lock(throttle).refund(kind_name, unused, self.now());
            return;
        }
        if let (Some(shared), Some(params)) = (&self.shared_rates, kind.shared_rate)
            && let Err(error) = shared
                .refund(
                    shared_rate::KIND_POLICY,
                    kind_name,
                    unused,
                    params,
                    self.now(),
                )
                .await
        {
            // The budget stays spent until it refills; no job is lost.
            tracing::warn!(kind = kind_name, %error, unused, "refunding the kind's shared processing rate failed");
        }
    }

    /// Charges claimed jobs to their owners' shared rates and defers those
    /// that find no budget. Returns the jobs to run.
    async fn charge_owner_rates(
        self: &Arc<Self>,
        kind: &KindState,
        kind_name: &str,
        mut jobs: Vec<ClaimedJob>,
    ) -> Vec<ClaimedJob> {
        let Some(shared) = &self.shared_rates else {
            return jobs;
        };
        let now = self.now();

        if let Some(params) = kind.shared_user_rate {
            let mut by_owner: Vec<(UserId, Vec<ClaimedJob>)> = Vec::new();
            for job in jobs.drain(..) {
                match by_owner.iter_mut().find(|(owner, _)| *owner == job.owner) {
                    Some((_, group)) => group.push(job),
                    None => by_owner.push((job.owner.clone(), vec![job])),
                }
            }
            for (owner, mut group) in by_owner {
                let key = format!("{kind_name}:{owner}");
                let wanted = group.len() as u32;
                let checked = shared
                    .take_up_to(shared_rate::USER_POLICY, &key, wanted, params, now)
                    .await;
                let (granted, wait) = self.granted_or_deferred(checked, &key, wanted);
                let over = group.split_off((granted as usize).min(group.len()));
                self.defer_all(over, now, wait);
                jobs.extend(group);
            }
        }
        jobs
    }

    /// Reads the result of a shared-rate check. When the check failed,
    /// nothing is granted, as for the kind's rate.
    fn granted_or_deferred(
        &self,
        checked: Result<(u32, Option<Duration>), StoreError>,
        key: &str,
        wanted: u32,
    ) -> (u32, Duration) {
        match checked {
            Ok((granted, wait)) => (granted, wait.unwrap_or(self.config.poll_interval)),
            Err(error) => {
                tracing::warn!(%error, key, jobs = wanted, "checking a shared processing rate failed; deferring the jobs");
                (0, self.config.poll_interval)
            }
        }
    }

    /// Gives claimed jobs back until `wait` has passed, without counting
    /// the attempt.
    fn defer_all(self: &Arc<Self>, jobs: Vec<ClaimedJob>, now: DateTime<Utc>, wait: Duration) {
        let run_at = now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::seconds(1));
        for job in jobs {
            tracing::debug!(job_id = %job.id, owner = %job.owner, ?wait, "job deferred by a shared processing rate");
            self.track(&job);
            self.finish(AttemptOutcome {
                lease: job.lease.clone(),
                started_at: now,
                duration_ms: 0,
                kind: OutcomeKind::Deferred { run_at },
            });
        }
    }

    /// Registers a claimed job and runs it on its own task, unless the
    /// owner's processing rate defers it.
    fn start_job(self: &Arc<Self>, kind: &KindState, job: ClaimedJob, slot: OwnedSemaphorePermit) {
        let now = self.now();
        if let Some(throttle) = &kind.user_throttle {
            let key = format!("{}:{}", job.kind, job.owner);
            let (granted, wait) = lock(throttle).take_up_to(&key, 1, now);
            if granted == 0 {
                let wait = wait.unwrap_or(self.config.poll_interval);
                let run_at =
                    now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::seconds(1));
                tracing::debug!(job_id = %job.id, owner = %job.owner, ?wait, "job deferred by the owner's processing rate");
                self.track(&job);
                self.finish(AttemptOutcome {
                    lease: job.lease.clone(),
                    started_at: now,
                    duration_ms: 0,
                    kind: OutcomeKind::Deferred { run_at },
                });
                return;
            }
        }

        let (cancel, reason) = self.track(&job);
        let handler = kind.handler.clone();
        let timeout = kind.config.timeout;
        let retry = kind.config.retry;
        let inner = self.clone();

        let span = tracing::info_span!(
            "job",
            job_id = %job.id,
            batch_id = %job.batch_id,
            kind = %job.kind,
            attempt = job.attempt,
            correlation_id = job.correlation_id.as_deref().unwrap_or(""),
        );
        tokio::spawn(
            async move {
                if inner.has_subscribers() {
                    inner.emit(QueueEvent::JobProcessing(JobEvent {
                        job_id: job.id,
                        batch_id: job.batch_id,
                        owner: job.owner.clone(),
                        kind: job.kind.clone(),
                        seq: job.seq,
                        attempt: job.attempt,
                        progress: None,
                        error: None,
                        run_at: None,
                        correlation_id: job.correlation_id.clone(),
                    }));
                }
                let lease = job.lease.clone();
                let attempt = job.attempt;
                let max_attempts = job.max_attempts;
                let started_at = inner.now();
                let clock = Instant::now();

                let context = JobContext::new(job, cancel.clone(), ProgressReporter::new(inner.progress_tx.clone()));
                let mut run = tokio::spawn(async move { handler.run(context).await });
                let result = tokio::select! {
                    joined = &mut run => match joined {
                        Ok(result) => result,
                        Err(error) if error.is_panic() => Err(HandlerError::Retryable(format!("handler panicked: {}", panic_message(error)))),
                        Err(_) => Err(HandlerError::Cancelled),
                    },
                    _ = tokio::time::sleep(timeout) => {
                        reason.compare_exchange(CancelReason::None as u8, CancelReason::Timeout as u8, Ordering::AcqRel, Ordering::Acquire).ok();
                        cancel.cancel();
                        run.abort();
                        Err(HandlerError::Retryable(format!("attempt timed out after {timeout:?}")))
                    }
                };

                let duration_ms = clock.elapsed().as_millis() as u64;
                let cancel_reason = CancelReason::from_u8(reason.load(Ordering::Acquire));
                let outcome = inner.decide(result, cancel_reason, attempt, max_attempts, &retry);
                match &outcome {
                    Some(OutcomeKind::Succeeded { .. }) => tracing::debug!(duration_ms, "attempt succeeded"),
                    Some(other) => tracing::info!(duration_ms, outcome = ?OutcomeName(other), "attempt did not succeed"),
                    None => tracing::warn!("lease lost while the attempt ran; its outcome is dropped"),
                }
                match outcome {
                    Some(kind) => inner.finish_in_slot(
                        AttemptOutcome {
                            lease,
                            started_at,
                            duration_ms,
                            kind,
                        },
                        Some(slot),
                    ),
                    None => inner.untrack(lease.job_id),
                }
            }
            .instrument(span),
        );
    }

    /// Turns a handler's result into the outcome to record, following the
    /// retry policy; `None` when the lease was lost and nothing may be
    /// recorded.
    fn decide(
        &self,
        result: Result<Option<Box<serde_json::value::RawValue>>, HandlerError>,
        cancel_reason: CancelReason,
        attempt: u32,
        max_attempts: u32,
        retry: &crate::config::RetryPolicy,
    ) -> Option<OutcomeKind> {
        let now = self.now();
        let later = |delay: Duration| {
            now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::seconds(1))
        };
        let failed = |error: String, failure: FailureKind| {
            if retry.has_attempts_left(attempt, max_attempts) {
                let unit = lock(&self.rng).f64();
                OutcomeKind::Retry {
                    error,
                    failure,
                    run_at: later(retry.delay(attempt, unit)),
                    counts_attempt: true,
                }
            } else {
                OutcomeKind::Dead { error, failure }
            }
        };

        match (result, cancel_reason) {
            (_, CancelReason::LeaseLost) => None,
            (Ok(result), _) => Some(OutcomeKind::Succeeded { result }),
            (Err(_), CancelReason::Batch) => Some(OutcomeKind::Cancelled {
                reason: "batch was cancelled".into(),
            }),
            (Err(_), CancelReason::Shutdown) => Some(OutcomeKind::Released),
            (Err(HandlerError::Retryable(error)), CancelReason::Timeout) => {
                Some(failed(error, FailureKind::Timeout))
            }
            (Err(HandlerError::Retryable(error)), _) => Some(failed(error, FailureKind::Error)),
            (Err(HandlerError::Permanent(error)), _) => Some(OutcomeKind::Dead {
                error,
                failure: FailureKind::Permanent,
            }),
            (Err(HandlerError::RetryAfter { delay, reason }), _) => Some(OutcomeKind::Retry {
                error: reason,
                failure: FailureKind::RetryAfter,
                run_at: later(delay),
                counts_attempt: false,
            }),
            (Err(HandlerError::Cancelled), _) => Some(failed(
                "handler stopped without a cancellation".into(),
                FailureKind::Error,
            )),
        }
    }

    fn track(&self, job: &ClaimedJob) -> (CancellationToken, Arc<AtomicU8>) {
        let cancel = self.hard_stop.child_token();
        let reason = Arc::new(AtomicU8::new(CancelReason::None as u8));
        lock(&self.inflight).insert(
            job.id,
            InFlight {
                lease: job.lease.clone(),
                cancel: cancel.clone(),
                reason: reason.clone(),
                batch_id: job.batch_id,
                owner: job.owner.clone(),
                kind: job.kind.clone(),
                seq: job.seq,
                correlation_id: job.correlation_id.clone(),
                finishing: AtomicBool::new(false),
            },
        );
        (cancel, reason)
    }

    fn untrack(&self, job_id: JobId) {
        let mut inflight = lock(&self.inflight);
        inflight.remove(&job_id);
        if inflight.is_empty() {
            self.idle.notify_waiters();
        }
    }

    fn finish(&self, outcome: AttemptOutcome) {
        self.finish_in_slot(outcome, None);
    }

    /// Queues an outcome for recording; `slot` is released once it is
    /// committed.
    fn finish_in_slot(&self, outcome: AttemptOutcome, slot: Option<OwnedSemaphorePermit>) {
        let job_id = outcome.lease.job_id;
        if let Some(job) = lock(&self.inflight).get(&job_id) {
            job.finishing.store(true, Ordering::Release);
        }
        if self
            .finished_tx
            .send(Finished {
                outcome,
                _slot: slot,
            })
            .is_err()
        {
            // The recorder is gone (shutdown); the lease expires and the
            // job runs again elsewhere.
            tracing::warn!(job_id = %job_id, "outcome dropped: the queue is stopped");
            self.untrack(job_id);
        }
    }

    /// Records finished attempts in groups, then publishes what changed.
    async fn record_loop(self: Arc<Self>, mut receiver: mpsc::UnboundedReceiver<Finished>) {
        let mut group: Vec<Finished> = Vec::new();
        while let Some(first) = receiver.recv().await {
            group.push(first);
            while group.len() < 1_024 {
                match receiver.try_recv() {
                    Ok(next) => group.push(next),
                    Err(_) => break,
                }
            }

            let outcomes: Vec<AttemptOutcome> = group.iter().map(|f| f.outcome.clone()).collect();
            let reschedules = outcomes.iter().any(|o| {
                matches!(
                    o.kind,
                    OutcomeKind::Retry { .. } | OutcomeKind::Deferred { .. }
                )
            });
            let mut tries: u32 = 0;
            let recorded = loop {
                match self
                    .store
                    .record_outcomes(outcomes.clone(), self.now())
                    .await
                {
                    Ok(recorded) => break Some(recorded),
                    Err(StoreError::Closed) => break None,
                    Err(error) => {
                        tries += 1;
                        tracing::warn!(%error, outcomes = outcomes.len(), tries, "recording outcomes failed; retrying");
                        // Leases keep being extended meanwhile, so waiting
                        // does not hand the jobs to another worker.
                        tokio::time::sleep(Duration::from_millis(100u64 << tries.min(6))).await;
                    }
                }
            };

            if let Some((results, changes)) = recorded {
                for (finished, result) in group.iter().zip(&results) {
                    if *result == OutcomeResult::LeaseLost {
                        tracing::warn!(job_id = %finished.outcome.lease.job_id, attempt = finished.outcome.lease.attempt, "outcome not recorded: the lease was lost");
                    }
                }
                self.publish(changes);
                if reschedules {
                    self.promoter_wake.notify_one();
                }
            }
            for finished in group.drain(..) {
                self.untrack(finished.outcome.lease.job_id);
            }
        }
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(self.config.heartbeat_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Heartbeats go on during shutdown, so jobs finishing within the
            // grace period keep their leases.
            ticker.tick().await;
            let leases: Vec<LeaseRef> = lock(&self.inflight)
                .values()
                .map(|j| j.lease.clone())
                .collect();
            if leases.is_empty() {
                continue;
            }
            match self.store.heartbeat(&leases, self.lease_until()).await {
                Ok(lost) => {
                    let inflight = lock(&self.inflight);
                    let lost: Vec<JobId> = lost
                        .into_iter()
                        .filter(|job_id| {
                            inflight
                                .get(job_id)
                                .is_some_and(|job| !job.finishing.load(Ordering::Acquire))
                        })
                        .collect();
                    if !lost.is_empty() {
                        tracing::warn!(jobs = ?lost, "leases lost; stopping their handlers");
                        for job_id in lost {
                            if let Some(job) = inflight.get(&job_id) {
                                job.cancel(CancelReason::LeaseLost);
                            }
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, leases = leases.len(), "extending leases failed")
                }
            }
        }
    }

    async fn reap_loop(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(self.config.reap_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.stopping.is_cancelled() {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = self.stopping.cancelled() => return,
            }
            match self.store.reap_expired_leases(self.now()).await {
                Ok(report) => {
                    if report.requeued + report.dead > 0 {
                        tracing::info!(
                            requeued = report.requeued,
                            dead = report.dead,
                            "took back jobs with expired leases"
                        );
                    }
                    self.publish(report.changes);
                }
                Err(error) => tracing::warn!(%error, "reaping expired leases failed"),
            }
        }
    }

    async fn promote_loop(self: Arc<Self>) {
        while !self.stopping.is_cancelled() {
            let now = self.now();
            let mut sleep_for = self.config.poll_interval;
            match self.store.promote_due(now).await {
                Ok(report) => {
                    for kind in &report.runnable_kinds {
                        self.wake(kind);
                    }
                    if report.promoted > 0 {
                        tracing::debug!(promoted = report.promoted, "due jobs promoted");
                    }
                    if let Some(next) = report.next_due {
                        let until = (next - now).to_std().unwrap_or(Duration::ZERO);
                        sleep_for = sleep_for.min(until).max(Duration::from_millis(5));
                    }
                }
                Err(error) => tracing::warn!(%error, "promoting due jobs failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(sleep_for) => {}
                _ = self.promoter_wake.notified() => {}
                _ = self.stopping.cancelled() => return,
            }
        }
    }

    async fn controls_loop(self: Arc<Self>) {
        let period = self.config.poll_interval.max(Duration::from_millis(200)) * 2;
        while !self.stopping.is_cancelled() {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = self.stopping.cancelled() => return,
            }
            self.refresh_controls().await;
        }
    }

    /// Stores progress reports, at most about five per second per job, and
    /// publishes them once stored.
    async fn progress_loop(self: Arc<Self>, mut receiver: mpsc::Receiver<(JobId, u8)>) {
        let mut latest: HashMap<JobId, u8> = HashMap::new();
        loop {
            let Some((job_id, percent)) = receiver.recv().await else {
                return;
            };
            latest.insert(job_id, percent);
            tokio::time::sleep(Duration::from_millis(200)).await;
            while let Ok((job_id, percent)) = receiver.try_recv() {
                latest.insert(job_id, percent);
            }

            let (updates, events): (Vec<ProgressUpdate>, Vec<JobEvent>) = {
                let inflight = lock(&self.inflight);
                latest
                    .drain()
                    .filter_map(|(job_id, progress)| {
                        let job = inflight.get(&job_id)?;
                        let update = ProgressUpdate {
                            lease: job.lease.clone(),
                            progress,
                        };
                        let event = JobEvent {
                            job_id,
                            batch_id: job.batch_id,
                            owner: job.owner.clone(),
                            kind: job.kind.clone(),
                            seq: job.seq,
                            attempt: job.lease.attempt,
                            progress: Some(progress),
                            error: None,
                            run_at: None,
                            correlation_id: job.correlation_id.clone(),
                        };
                        Some((update, event))
                    })
                    .unzip()
            };
            if updates.is_empty() {
                continue;
            }
            if let Err(error) = self.store.record_progress(updates).await {
                tracing::warn!(%error, "recording job progress failed");
                continue;
            }
            if self.has_subscribers() {
                for event in events {
                    self.emit(QueueEvent::JobProgress(event));
                }
            }
        }
    }

    async fn prune_loop(self: Arc<Self>, interval: Duration) {
        let retention = &self.config.retention;
        while !self.stopping.is_cancelled() {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.stopping.cancelled() => return,
            }
            let now = self.now();
            let request = PruneRequest {
                completed_before: now
                    - chrono::Duration::from_std(retention.completed)
                        .unwrap_or(chrono::Duration::days(7)),
                failed_before: now
                    - chrono::Duration::from_std(retention.failed)
                        .unwrap_or(chrono::Duration::days(30)),
                max_batches: retention.max_batches_per_pass.max(1),
            };
            match self.store.prune(request).await {
                Ok(report) if report.batches > 0 => {
                    tracing::info!(
                        batches = report.batches,
                        jobs = report.jobs,
                        "pruned finished batches"
                    )
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "pruning finished batches failed"),
            }

            if let Some(shared) = &self.shared_rates {
                match shared.prune(now).await {
                    Ok(deleted) if deleted > 0 => {
                        tracing::debug!(deleted, "pruned idle processing-rate keys")
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "pruning idle processing-rate keys failed")
                    }
                }
            }
        }
    }
}

/// Outcome name for logs, without the payload of its fields.
struct OutcomeName<'a>(&'a OutcomeKind);

impl std::fmt::Debug for OutcomeName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            OutcomeKind::Succeeded { .. } => f.write_str("succeeded"),
            OutcomeKind::Retry { error, .. } => write!(f, "retry ({error})"),
            OutcomeKind::Dead { error, .. } => write!(f, "dead ({error})"),
            OutcomeKind::Cancelled { .. } => f.write_str("cancelled"),
            OutcomeKind::Deferred { .. } => f.write_str("deferred"),
            OutcomeKind::Released => f.write_str("released"),
        }
    }
}

fn panic_message(error: tokio::task::JoinError) -> String {
    match error.try_into_panic() {
        Ok(payload) => {
            if let Some(text) = payload.downcast_ref::<&str>() {
                (*text).to_owned()
            } else if let Some(text) = payload.downcast_ref::<String>() {
                text.clone()
            } else {
                "non-text panic payload".to_owned()
            }
        }
        Err(_) => "unknown".to_owned(),
    }
}

/// Maps a committed job change to its event.
fn job_event(change: &JobChange, correlation_id: Option<String>) -> Option<QueueEvent> {
    let event = JobEvent {
        job_id: change.job_id,
        batch_id: change.batch_id,
        owner: change.owner.clone(),
        kind: change.kind.clone(),
        seq: change.seq,
        attempt: change.attempt,
        progress: None,
        error: change.error.clone(),
        run_at: change.run_at,
        correlation_id,
    };
    Some(match change.status {
        JobStatus::Queued => QueueEvent::JobQueued(event),
        JobStatus::Retrying => QueueEvent::JobRetry(event),
        JobStatus::Succeeded => QueueEvent::JobCompleted(event),
        JobStatus::Dead => QueueEvent::JobFailed(event),
        JobStatus::Cancelled => QueueEvent::JobCancelled(event),
        // A deferral or a start is not news: processing has its own event.
        JobStatus::Scheduled | JobStatus::Processing => return None,
    })
}
