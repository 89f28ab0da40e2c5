//! Wiring: the store, the queue with its handlers, feature flags and the
//! HTTP server, started together and stopped in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ::flags::{FlagConfig, FlagService};
use actix_web::dev::ServerHandle;
use actix_web::{App, HttpServer, web};
use anyhow::Context;
use domain::SystemClock;
use domain::{AdminStore, FlagStore, JobStore, RateLimitStore};
use postgres_store::{PgConfig, PgStore};
use queue::{KindConfig, Queue, QueueBuilder, QueueConfig, Rate, RetentionConfig, RetryPolicy};
use sqlite_store::{SqliteConfig, SqliteStore};
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::auth::Auth;
use crate::cluster;
use crate::config::{Config, DatabaseTarget, HandlerName, KindSettings};
use crate::correlation::Correlation;
use crate::handlers;
use crate::limits::{Limits, RateLimit};
use crate::tickets::{SharedTickets, Tickets};

/// A running server: its address and what is needed to stop it.
pub struct Running {
    pub addr: SocketAddr,
    hub: Arc<gateway::Hub>,
    pub queue: Queue,
    store: Backend,
    server: ServerHandle,
    serving: tokio::task::JoinHandle<std::io::Result<()>>,
    background: CancellationToken,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// Stops accepting requests, lets in-flight requests finish, then shuts
    /// the queue down gracefully.
    pub async fn stop(self) {
        self.hub.close_all();
        self.server.stop(true).await;
        if let Err(error) = self.serving.await {
            tracing::warn!(%error, "HTTP server task ended abnormally");
        }
        let report = self.queue.shutdown().await;
        self.background.cancel();
        if let Backend::Sqlite(store) = &self.store
            && let Err(error) = store.checkpoint().await
        {
            tracing::warn!(%error, "final WAL checkpoint failed; the next start replays the WAL");
        }
        tracing::info!(released = report.released, "batchd stopped");
    }
}

/// The store a server runs on, for what only one backend does: SQLite
/// checkpoints on stop, PostgreSQL coordinates with other processes.
#[derive(Debug, Clone)]
enum Backend {
    Sqlite(Arc<SqliteStore>),
    Postgres(Arc<PgStore>),
}

fn kind_config(settings: &KindSettings) -> KindConfig {
    let per_minute = |max: u32| Rate {
        max,
        per: Duration::from_secs(60),
        burst: None,
    };
    KindConfig {
        concurrency: settings.concurrency,
        timeout: settings.timeout(),
        retry: RetryPolicy {
            max_attempts: settings.max_attempts,
            base: Duration::from_millis(settings.backoff_base_ms),
            max_delay: Duration::from_secs(settings.backoff_max_seconds),
            jitter: 0.1,
        },
        rate: settings.rate_per_minute.map(per_minute),
        per_user_rate: settings.per_user_rate_per_minute.map(per_minute),
    }
}

fn register(
    builder: QueueBuilder,
    config: &Config,
    item_pace: Option<Rate>,
) -> anyhow::Result<QueueBuilder> {
    let policy = handlers::AddressPolicy {
        allow_loopback: config.outbound.allow_loopback,
        allow_private: config.outbound.allow_private,
    };
    let mut builder = builder;
    for (kind, settings) in &config.kinds {
        let mut kind_config = kind_config(settings);
        // In pace mode every kind runs one owner's items no faster than
        // the item budget, unless the kind sets its own per-user rate.
        if kind_config.per_user_rate.is_none() {
            kind_config.per_user_rate = item_pace;
        }
        builder = match settings.handler {
            HandlerName::Noop => builder.register(kind.clone(), handlers::NoopHandler, kind_config),
            HandlerName::Sleep => {
                builder.register(kind.clone(), handlers::SleepHandler::default(), kind_config)
            }
            HandlerName::Webhook => {
                let url = settings
                    .url
                    .as_deref()
                    .with_context(|| format!("config key kinds.{kind}.url is missing"))?;
                let mut webhook = handlers::WebhookSettings::new(
                    url::Url::parse(url)
                        .with_context(|| format!("config key kinds.{kind}.url is invalid"))?,
                    settings.secret.clone().unwrap_or_default(),
                );
                webhook.timeout = settings.timeout().min(Duration::from_secs(30));
                webhook.policy = policy;
                let handler = handlers::WebhookHandler::new(webhook)
                    .with_context(|| format!("cannot build the webhook handler of kind {kind}"))?;
                builder.register(kind.clone(), handler, kind_config)
            }
            HandlerName::Fetch => {
                let mut fetch = handlers::FetchSettings::new(config.data_dir.clone());
                if let Some(max_bytes) = settings.max_bytes {
                    fetch.max_bytes = max_bytes;
                }
                if let Some(types) = &settings.content_types {
                    fetch.allowed_content_types = types.clone();
                }
                if let Some(rate) = settings.per_host_per_second {
                    fetch.per_host_rate.per_second = f64::from(rate);
                }
                fetch.timeout = settings.timeout().min(Duration::from_secs(120));
                fetch.policy = policy;
                let handler = handlers::FetchHandler::new(fetch)
                    .with_context(|| format!("cannot build the fetch handler of kind {kind}"))?;
                builder.register(kind.clone(), handler, kind_config)
            }
        };
    }
    Ok(builder)
}

/// Opens the store, binds the HTTP server, then starts the queue, flags
/// and metrics, and serves. A port that is taken fails before any job
/// runs.
pub async fn start(config: Config, metrics: Arc<telemetry::Metrics>) -> anyhow::Result<Running> {
    let secret = config.signing_secret()?;
    if config.jwt_secret.is_none() {
        tracing::warn!(
            "running in development mode with the public development secret: anyone can mint tokens for this server"
        );
    }
    // The fetch handler stores documents here whatever the database is.
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            config.data_dir.display()
        )
    })?;

    let target = config.database_target();
    match &target {
        DatabaseTarget::Sqlite(path) => {
            let mut sqlite = SqliteConfig::new(path);
            sqlite.insert_chunk_rows = config.queue.insert_chunk_rows.max(1);
            let store = Arc::new(
                SqliteStore::open(sqlite)
                    .await
                    .with_context(|| format!("cannot open the database {}", path.display()))?,
            );
            let backend = Backend::Sqlite(store.clone());
            start_on(config, metrics, secret, store, backend, &target).await
        }
        DatabaseTarget::Postgres(url) => {
            let settings = &config.postgres;
            let mut postgres = PgConfig::new(url.clone());
            postgres.schema = settings.schema.clone();
            postgres.pool_size = settings.pool_size;
            postgres.statement_timeout = Duration::from_secs(settings.statement_timeout_seconds);
            postgres.abandon_staging_after =
                Duration::from_secs(settings.abandon_staging_minutes.saturating_mul(60));
            let store = Arc::new(PgStore::connect(postgres).await.with_context(|| {
                format!("cannot open the PostgreSQL database {}", target.describe())
            })?);
            let backend = Backend::Postgres(store.clone());
            start_on(config, metrics, secret, store, backend, &target).await
        }
    }
}

/// Starts everything on an opened store.
async fn start_on<S>(
    config: Config,
    metrics: Arc<telemetry::Metrics>,
    secret: String,
    store: Arc<S>,
    backend: Backend,
    target: &DatabaseTarget,
) -> anyhow::Result<Running>
where
    S: JobStore + AdminStore + FlagStore + RateLimitStore,
{
    let queue_config = QueueConfig {
        lease_duration: Duration::from_secs(config.queue.lease_seconds.max(1)),
        heartbeat_interval: Duration::from_millis(config.queue.lease_seconds.max(1) * 1000 / 3),
        shutdown_grace: Duration::from_secs(config.queue.shutdown_grace_seconds),
        retention: RetentionConfig {
            completed: Duration::from_secs(config.queue.retention_completed_days * 86_400),
            failed: Duration::from_secs(config.queue.retention_failed_days * 86_400),
            ..RetentionConfig::default()
        },
        node_label: hostname(),
        ..QueueConfig::default()
    };
    let limits = Limits::build(&config.rate_limits, store.clone(), Arc::new(SystemClock))?
        .with_metrics(metrics.clone());
    let mut builder = Queue::builder(store.clone()).config(queue_config);
    if let Backend::Postgres(_) = &backend {
        // Several processes may share this database, and a kind's rate
        // protects whatever its handler calls: one budget for all of them.
        builder = builder.shared_rates(store.clone());
    }
    let queue = register(builder, &config, limits.item_pace())?.build();

    let background = CancellationToken::new();
    let flag_config = FlagConfig {
        refresh_interval: Duration::from_millis(config.flags.refresh_interval_ms),
        unknown_flag_default: config.flags.unknown_flag_default,
        ..FlagConfig::default()
    };
    let flags = FlagService::start(store.clone(), flag_config, background.clone())
        .await
        .context("cannot load feature flags")?;

    let hub_config = gateway::HubConfig {
        buffer_capacity: config.gateway.buffer_messages,
        progress_per_second: config.gateway.progress_per_second,
        slow_client_grace: Duration::from_secs(config.gateway.slow_client_seconds),
        ..gateway::HubConfig::default()
    };
    let hub =
        Arc::new(gateway::Hub::new(hub_config, store.clone()).context("config section gateway")?);
    let origins = gateway::OriginPolicy::new(
        &config.gateway.allowed_origins,
        config.gateway.allow_missing_origin,
    )
    .context("config key gateway.allowed_origins")?;

    // Behind a load balancer a ticket is often redeemed by another process
    // than the one that issued it.
    let tickets = match &backend {
        Backend::Postgres(_) => Tickets::Shared(SharedTickets::new(
            &secret,
            chrono::Duration::seconds(30),
            store.clone(),
            Arc::new(SystemClock),
        )),
        Backend::Sqlite(_) => Tickets::Local(gateway::TicketStore::default()),
    };

    let config = Arc::new(config);
    let state = web::Data::new(AppState {
        queue: queue.clone(),
        flags: flags.clone(),
        flag_store: store.clone(),
        config: config.clone(),
        limits: limits.clone(),
        metrics: metrics.clone(),
        hub: hub.clone(),
        tickets,
        origins,
    });
    let limits = web::Data::new(limits);
    let auth = web::Data::new(Auth::new(&secret));
    let json_limit = config.limits.max_json_body_bytes;
    let request_metrics = metrics.clone();

    let listen = config.listen_addr()?;
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(2);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(auth.clone())
            .app_data(limits.clone())
            .app_data(api::json_config(json_limit))
            .app_data(api::query_config())
            .app_data(api::path_config())
            .wrap(RateLimit)
            .wrap(Correlation::new(request_metrics.clone()))
            .configure(api::configure)
            .default_service(web::to(api::not_found))
    })
    .workers(workers)
    .disable_signals()
    .shutdown_timeout(config.queue.shutdown_grace_seconds.max(1))
    .bind(listen)
    .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = server
        .addrs()
        .first()
        .copied()
        .context("the server bound no address")?;
    tokio::spawn(hub.clone().forward(queue.subscribe()));
    queue.start().await.context("cannot start the queue")?;
    if let Backend::Postgres(postgres) = &backend {
        cluster::start(
            postgres.clone(),
            queue.clone(),
            hub.clone(),
            flags.clone(),
            background.clone(),
        );
    }
    start_metrics(
        &metrics,
        &queue,
        store.clone(),
        hub.clone(),
        background.clone(),
    );
    let server = server.run();
    let handle = server.handle();
    let serving = tokio::spawn(server);

    let schema = match &backend {
        Backend::Postgres(store) => store.config().schema.clone(),
        Backend::Sqlite(_) => None,
    };
    tracing::info!(
        %addr,
        database = %target.describe(),
        schema = schema.as_deref().unwrap_or(""),
        kinds = ?queue.kinds(),
        "batchd listening"
    );
    Ok(Running {
        addr,
        hub,
        queue,
        store: backend,
        server: handle,
        serving,
        background,
    })
}

/// Feeds queue events into the metrics and refreshes the queue-depth
/// gauges every few seconds from the store.
fn start_metrics(
    metrics: &Arc<telemetry::Metrics>,
    queue: &Queue,
    store: Arc<dyn AdminStore>,
    hub: Arc<gateway::Hub>,
    stop: CancellationToken,
) {
    tokio::spawn(telemetry::record_queue_events(
        metrics.clone(),
        queue.subscribe(),
    ));

    let depth: Arc<std::sync::Mutex<Vec<domain::QueueDepth>>> = Arc::default();
    let source = depth.clone();
    let gauges = metrics.clone();
    let mut websockets: usize = 0;
    // Every (kind, status) ever reported, so one that drops to zero is
    // reported as 0 instead of keeping its last value.
    let mut seen: std::collections::HashSet<(String, domain::JobStatus)> = Default::default();
    metrics.set_depth_source(move || {
        source
            .lock()
            .map(|depth| {
                depth
                    .iter()
                    .map(|d| telemetry::QueueDepth {
                        kind: d.kind.clone(),
                        status: d.status,
                        depth: i64::try_from(d.count).unwrap_or(i64::MAX),
                    })
                    .collect()
            })
            .unwrap_or_default()
    });
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.cancelled() => return,
            }
            // The hub knows how many connections are open; the gauge
            // follows it by the difference since the last look.
            let open = hub.total_connections();
            for _ in websockets..open {
                gauges.websocket_opened();
            }
            for _ in open..websockets {
                gauges.websocket_closed();
            }
            websockets = open;

            match domain::AdminStore::queue_depth(store.as_ref()).await {
                Ok(mut current) => {
                    for entry in &current {
                        seen.insert((entry.kind.clone(), entry.status));
                    }
                    for (kind, status) in &seen {
                        if !current
                            .iter()
                            .any(|d| &d.kind == kind && d.status == *status)
                        {
                            current.push(domain::QueueDepth {
                                kind: kind.clone(),
                                status: *status,
                                count: 0,
                            });
                        }
                    }
                    if let Ok(mut shared) = depth.lock() {
                        *shared = current;
                    }
                }
                Err(error) => tracing::warn!(%error, "reading queue depth for metrics failed"),
            }
        }
    });
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "batchd".to_owned())
}
