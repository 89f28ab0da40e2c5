//! The batchd binary: `serve` runs the HTTP API and the workers, `token`
//! mints a bearer token, and `demo` runs a real batch end to end on a
//! temporary embedded database.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

mod api;
mod app;
mod auth;
mod bench;
mod bench_cluster;
mod cluster;
mod config;
mod correlation;
mod demo;
mod error;
mod handlers;
mod limits;
mod tickets;

use config::{Config, Overrides};

#[derive(Debug, Parser)]
#[command(
    name = "batchd",
    version,
    about = "Durable batch jobs: submit N items, get N jobs that survive restarts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP API and the workers until SIGINT or SIGTERM.
    Serve(ServerArgs),
    /// Print a bearer token signed with the configured secret.
    Token(TokenArgs),
    /// Run a real batch end to end on a temporary embedded database: a
    /// loopback document server, a fetch batch over HTTP, live progress,
    /// and the result.
    Demo(DemoArgs),
    /// Run the benchmark protocol on fresh SQLite files, or with --cluster
    /// the throughput of several processes on one PostgreSQL database, and
    /// print the results, as a table or as JSON.
    Bench(BenchArgs),
    /// Worker process of the crash benchmark; not for direct use.
    #[command(hide = true)]
    BenchWorker {
        #[arg(long)]
        database: PathBuf,
    },
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Print the results as JSON on standard output.
    #[arg(long)]
    json: bool,
    /// Items per enqueue and drain run [default: 100000], or per batch
    /// with --cluster [default: 20000].
    #[arg(long, value_name = "COUNT")]
    items: Option<usize>,
    /// Offered load of the mixed run, in jobs per second.
    #[arg(
        long,
        default_value_t = 200,
        value_name = "PER_SECOND",
        conflicts_with = "cluster"
    )]
    mixed_rate: u32,
    /// Length of the mixed run, in seconds; 0 skips it.
    #[arg(
        long,
        default_value_t = 10,
        value_name = "SECONDS",
        conflicts_with = "cluster"
    )]
    mixed_seconds: u64,
    /// Jobs enqueued one at a time for the pickup latency run.
    #[arg(
        long,
        default_value_t = 1_000,
        value_name = "COUNT",
        conflicts_with = "cluster"
    )]
    pickup_samples: usize,
    /// Skip the 1,000,000-item NDJSON memory run.
    #[arg(long, conflicts_with = "cluster")]
    skip_million: bool,
    /// Skip the crash-recovery run, which starts worker processes.
    #[arg(long, conflicts_with = "cluster")]
    skip_crash: bool,
    /// Instead of the protocol, measure `batchd serve` processes sharing
    /// one PostgreSQL database: no-op and 10 ms sleep batches at each
    /// process count, each run on a new schema that is dropped afterwards.
    #[arg(long)]
    cluster: bool,
    /// PostgreSQL URL for --cluster. Its user needs the right to create
    /// and drop schemas.
    #[arg(
        long,
        env = postgres_store::testing::DATABASE_URL_VAR,
        default_value = postgres_store::testing::DEFAULT_DATABASE_URL,
        value_name = "URL",
        hide_env_values = true
    )]
    database_url: String,
    /// Process counts for --cluster, comma-separated. The first is the
    /// baseline of the ratios.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,3",
        value_name = "COUNTS",
        requires = "cluster"
    )]
    processes: Vec<usize>,
}

/// Settings shared by every command that reads the configuration.
#[derive(Debug, Args)]
struct ServerArgs {
    /// TOML configuration file; flags and BATCHD_* variables override it.
    #[arg(long, env = "BATCHD_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on, as host:port [default: 127.0.0.1:8080].
    #[arg(long, env = "BATCHD_LISTEN", value_name = "HOST:PORT")]
    listen: Option<String>,
    /// SQLite database file, relative paths under the data directory
    /// [default: batchd.db]; or a postgres:// URL, shared by several
    /// processes.
    #[arg(long, env = "BATCHD_DATABASE", value_name = "PATH|URL")]
    database: Option<String>,
    /// Directory for the database and downloaded documents
    /// [default: batchd-data].
    #[arg(long, env = "BATCHD_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Directory for daily log files (application log kept 14 days,
    /// security log 30); without it, logs go to standard error only.
    #[arg(long, env = "BATCHD_LOG_DIR", value_name = "DIR")]
    log_dir: Option<PathBuf>,
    /// HS256 secret for bearer tokens, at least 32 bytes.
    #[arg(
        long,
        env = "BATCHD_JWT_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    jwt_secret: Option<String>,
    /// Development mode: without a configured secret, use a public one.
    /// Never use this in production.
    #[arg(long)]
    dev: bool,
}

impl ServerArgs {
    fn load(self) -> anyhow::Result<Config> {
        let overrides = Overrides {
            listen: self.listen,
            database: self.database,
            data_dir: self.data_dir,
            log_dir: self.log_dir,
            jwt_secret: self.jwt_secret,
            dev_mode: self.dev,
        };
        Config::load(self.config.as_deref(), overrides)
    }
}

#[derive(Debug, Args)]
struct TokenArgs {
    /// User id to put in the token's `sub` claim.
    #[arg(long, value_name = "ID")]
    user: String,
    /// Give the token the admin role.
    #[arg(long)]
    admin: bool,
    /// Lifetime of the token, in seconds.
    #[arg(long, default_value_t = 3600, value_name = "SECONDS")]
    ttl: u64,
    /// TOML configuration file holding jwt_secret.
    #[arg(long, env = "BATCHD_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// HS256 secret to sign with, the server's BATCHD_JWT_SECRET.
    #[arg(
        long,
        env = "BATCHD_JWT_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    jwt_secret: Option<String>,
    /// Sign with the public development secret of `serve --dev`.
    #[arg(long)]
    dev: bool,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Number of documents in the demo batch.
    #[arg(long, default_value_t = 200, value_name = "COUNT")]
    items: u32,
    /// Keep the temporary data directory and print its path.
    #[arg(long)]
    keep: bool,
}

/// Installs logging for the commands other than `serve`: human-readable,
/// to standard error only.
fn init_console_logging(default_level: &str) -> anyhow::Result<telemetry::TelemetryGuard> {
    let config = telemetry::TelemetryConfig {
        format: telemetry::LogFormat::Pretty,
        default_level: default_level.to_owned(),
        ..telemetry::TelemetryConfig::default()
    };
    Ok(telemetry::init(config)?)
}

async fn serve(args: ServerArgs) -> anyhow::Result<()> {
    let config = args.load()?;
    let metrics = Arc::new(telemetry::Metrics::new(config.telemetry.slow_thresholds()));
    let _logging = telemetry::init(
        config
            .telemetry
            .logging(config.log_dir.clone(), metrics.clone()),
    )?;
    let running = app::start(config, metrics).await?;
    // Scripts and tests read the bound address from this line, which
    // matters when the configured port is 0.
    println!("batchd listening on http://{}", running.addr);
    wait_for_signal().await;
    tracing::info!("shutting down: no new requests; running jobs get the grace period");
    running.stop().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    if args.user.is_empty() || args.user.len() > 128 {
        anyhow::bail!(
            "--user must be a user id of 1 to 128 bytes, got {:?}",
            args.user
        );
    }
    let overrides = Overrides {
        jwt_secret: args.jwt_secret,
        dev_mode: args.dev,
        ..Overrides::default()
    };
    let config = Config::load(args.config.as_deref(), overrides)?;
    let secret = config.signing_secret()?;
    let token = auth::Auth::new(&secret).mint(&args.user, args.admin, args.ttl)?;
    println!("{token}");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };

    let result = match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Token(args) => token(args),
        Command::Demo(args) => init_console_logging("warn")
            .and_then(|_logging| runtime.block_on(demo::run(args.items, args.keep))),
        Command::Bench(args) if args.cluster => {
            let _logging = match init_console_logging("error") {
                Ok(guard) => guard,
                Err(error) => {
                    eprintln!("error: {error:#}");
                    return ExitCode::FAILURE;
                }
            };
            let options = bench_cluster::ClusterOptions {
                database_url: args.database_url,
                processes: args.processes,
                items: args.items.unwrap_or(20_000),
                json: args.json,
            };
            runtime.block_on(bench_cluster::run(options))
        }
        Command::Bench(args) => {
            let _logging = match init_console_logging("error") {
                Ok(guard) => guard,
                Err(error) => {
                    eprintln!("error: {error:#}");
                    return ExitCode::FAILURE;
                }
            };
            let options = bench::BenchOptions {
                items: args.items.unwrap_or(100_000),
                json: args.json,
                mixed_rate: args.mixed_rate,
                mixed_seconds: args.mixed_seconds,
                pickup_samples: args.pickup_samples,
                million: !args.skip_million,
                crash: !args.skip_crash,
            };
            runtime.block_on(bench::run(options))
        }
        Command::BenchWorker { database } => init_console_logging("error")
            .and_then(|_logging| runtime.block_on(bench::worker(database))),
    };

    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
