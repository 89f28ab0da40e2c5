//! `batchd bench --cluster`: throughput of several `batchd serve`
//! processes that share one PostgreSQL schema.
//!
//! For each workload and each process count, on a fresh schema: start the
//! processes, submit one batch as an NDJSON body to the first of them, and
//! time from the accepted response until the batch is terminal. Then read
//! from each process's `/metrics` how many of the jobs it ran. Two
//! workloads at concurrency 16 per process: `noop` jobs, which cost only
//! their database work, and 10 ms `sleep` jobs, which keep the workers
//! busy.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use postgres_store::testing;
use serde::Serialize;

use crate::bench::{Machine, ServerChild, machine, random_secret, remove_directories};
use crate::config::DatabaseTarget;

/// Handlers of one kind running at once in each process. 16 is the
/// default `concurrency` of a kind, so the `noop` runs measure the default
/// configuration.
const CONCURRENCY: usize = 16;

/// Length of each `sleep` job, in milliseconds.
const SLEEP_MS: u64 = 10;

/// Interval between polls of the batch's status. It bounds the error of
/// each measured time.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A batch whose finished-job count does not move for this long is
/// reported as stuck rather than waited for.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the per-process counters on `/metrics` may take to catch up
/// with the batch after it is terminal.
const METRICS_SETTLE: Duration = Duration::from_secs(5);

/// The counter of jobs a process ran to success, summed over its kinds.
const SUCCEEDED_METRIC: &str = "batchd_jobs_succeeded_total";

/// Settings of one cluster benchmark run.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// PostgreSQL URL. Each run creates a schema on it and drops it.
    pub database_url: String,
    /// Process counts to measure, in order. The first is the baseline of
    /// the ratios.
    pub processes: Vec<usize>,
    /// Items in each batch.
    pub items: usize,
    pub json: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ClusterReport {
    machine: Machine,
    /// The database URL without its password.
    database: String,
    items: usize,
    workloads: Vec<WorkloadReport>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct WorkloadReport {
    kind: &'static str,
    description: String,
    concurrency_per_process: usize,
    runs: Vec<RunReport>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct RunReport {
    processes: usize,
    /// From sending the request until the accepted response.
    submit_seconds: f64,
    /// From the accepted response until the batch is terminal.
    drain_seconds: f64,
    jobs_per_second: f64,
    /// `jobs_per_second` divided by that of the workload's first run.
    ratio_to_baseline: f64,
    /// `batchd_jobs_succeeded_total` of each process, in start order.
    succeeded_per_process: Vec<u64>,
}

#[derive(Debug, Clone, Copy)]
enum Workload {
    Noop,
    Sleep,
}

impl Workload {
    fn kind(self) -> &'static str {
        match self {
            Workload::Noop => "noop",
            Workload::Sleep => "sleep",
        }
    }

    fn description(self) -> String {
        match self {
            Workload::Noop => "no-op jobs, only their database work".to_owned(),
            Workload::Sleep => format!("{SLEEP_MS} ms sleep jobs"),
        }
    }

    /// Returns the NDJSON line of item `n`, newline included.
    fn item(self, n: usize) -> String {
        match self {
            Workload::Noop => format!("{{\"n\":{n}}}\n"),
            Workload::Sleep => format!("{{\"ms\":{SLEEP_MS}}}\n"),
        }
    }
}

/// Returns the TOML configuration that every process of one run shares.
/// Request rate limits are off, so neither the upload nor the polling is
/// throttled.
fn server_config(database_url: &str, schema: &str) -> String {
    let url = toml::Value::String(database_url.to_owned());
    let schema = toml::Value::String(schema.to_owned());
    format!(
        "database = {url}\n\n\
         [postgres]\nschema = {schema}\n\n\
         [rate_limits]\ndisabled = true\n\n\
         [kinds.noop]\nhandler = \"noop\"\nconcurrency = {CONCURRENCY}\n\n\
         [kinds.sleep]\nhandler = \"sleep\"\nconcurrency = {CONCURRENCY}\n"
    )
}

fn log(json: bool, line: impl AsRef<str>) {
    if !json {
        eprintln!("{}", line.as_ref());
    }
}

/// Runs every workload at every process count and prints a table, or JSON
/// with `--json`.
pub async fn run(options: ClusterOptions) -> anyhow::Result<()> {
    let result = run_all(&options).await;
    remove_directories();
    result
}

async fn run_all(options: &ClusterOptions) -> anyhow::Result<()> {
    if options.processes.is_empty() || options.processes.contains(&0) {
        bail!(
            "--processes must list process counts of at least 1, such as 1,2,3; got {:?}",
            options.processes
        );
    }
    if options.items == 0 {
        bail!("--items must be at least 1");
    }

    let mut report = ClusterReport {
        machine: machine(),
        database: DatabaseTarget::Postgres(options.database_url.clone()).describe(),
        items: options.items,
        workloads: Vec::new(),
    };
    for workload in [Workload::Noop, Workload::Sleep] {
        let mut runs: Vec<RunReport> = Vec::new();
        for &processes in &options.processes {
            log(
                options.json,
                format!(
                    "{}: {} items on {processes} process(es)",
                    workload.kind(),
                    options.items
                ),
            );
            let mut run = run_on_fresh_schema(options, workload, processes).await?;
            let baseline = runs
                .first()
                .map_or(run.jobs_per_second, |first| first.jobs_per_second);
            run.ratio_to_baseline = run.jobs_per_second / baseline;
            runs.push(run);
        }
        report.workloads.push(WorkloadReport {
            kind: workload.kind(),
            description: workload.description(),
            concurrency_per_process: CONCURRENCY,
            runs,
        });
    }

    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Measures one run on a new schema and drops the schema afterwards,
/// whether the run succeeded or not.
async fn run_on_fresh_schema(
    options: &ClusterOptions,
    workload: Workload,
    processes: usize,
) -> anyhow::Result<RunReport> {
    // A schema named like the tests' ones, so the test suite's clean-up of
    // stale schemas also removes one left behind by an interrupted run.
    let schema = testing::unique_schema();
    let measured = measure(options, workload, processes, &schema).await;
    let dropped = drop_schema(&options.database_url, &schema).await;
    match (measured, dropped) {
        (Ok(run), Ok(())) => Ok(run),
        (Ok(_), Err(error)) | (Err(error), Ok(())) => Err(error),
        (Err(error), Err(drop_error)) => {
            // The run's error is returned, so the second one is logged.
            tracing::error!(
                %schema,
                error = format!("{drop_error:#}"),
                "the schema of a failed run was not dropped"
            );
            Err(error)
        }
    }
}

async fn measure(
    options: &ClusterOptions,
    workload: Workload,
    processes: usize,
    schema: &str,
) -> anyhow::Result<RunReport> {
    let servers = start_servers(&server_config(&options.database_url, schema), processes).await?;
    let first = servers.first().context("no server process started")?;
    let token = first.token()?;
    let client = reqwest::Client::builder().no_proxy().build()?;

    let body: String = (0..options.items).map(|n| workload.item(n)).collect();
    let submitted = Instant::now();
    let response = client
        .post(format!(
            "http://{}/api/batches?kind={}",
            first.addr,
            workload.kind()
        ))
        .bearer_auth(&token)
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .context("submitting the batch failed")?;
    let status = response.status();
    let batch: serde_json::Value = response
        .json()
        .await
        .context("reading the response to the batch submission failed")?;
    if !status.is_success() {
        bail!("the batch was rejected with {status}: {batch}");
    }
    // Workers may start on the batch as soon as it commits, a moment before
    // this response arrives. The drain time starts here anyway, so the
    // measured time can only be slightly short.
    let accepted = Instant::now();
    let id = batch["id"]
        .as_str()
        .context("no batch id in the response")?
        .to_owned();

    let finished = wait_terminal(first, &client, &token, &id).await?;
    let drain = accepted.elapsed();
    if finished["status"] != "completed" || finished["succeeded"] != options.items {
        bail!(
            "the batch should complete with {} succeeded jobs, but ended as {finished}",
            options.items
        );
    }

    let succeeded_per_process = succeeded_per_process(&servers, &client, options.items).await?;
    Ok(RunReport {
        processes,
        submit_seconds: accepted.duration_since(submitted).as_secs_f64(),
        drain_seconds: drain.as_secs_f64(),
        jobs_per_second: options.items as f64 / drain.as_secs_f64(),
        ratio_to_baseline: 1.0,
        succeeded_per_process,
    })
}

/// Starts `count` server processes with `config`, one after the other. The
/// first applies the migrations to the new schema. Their errors go to this
/// process's standard error.
async fn start_servers(config: &str, count: usize) -> anyhow::Result<Vec<ServerChild>> {
    let secret = random_secret();
    let mut servers = Vec::with_capacity(count);
    for _ in 0..count {
        let config = config.to_owned();
        let secret = secret.clone();
        // Starting blocks on the child's standard output until it prints
        // its address.
        let server = tokio::task::spawn_blocking(move || {
            ServerChild::spawn(&config, &secret, Stdio::inherit())
        })
        .await
        .context("the task starting a server process failed")??;
        servers.push(server);
    }
    Ok(servers)
}

/// Polls the batch until it is terminal and returns its last state.
async fn wait_terminal(
    server: &ServerChild,
    client: &reqwest::Client,
    token: &str,
    id: &str,
) -> anyhow::Result<serde_json::Value> {
    let finished_jobs = |batch: &serde_json::Value| {
        ["succeeded", "failed", "cancelled"]
            .iter()
            .filter_map(|field| batch[*field].as_u64())
            .sum::<u64>()
    };
    let mut last_finished = 0;
    let mut last_change = Instant::now();
    loop {
        let batch = server
            .batch_status(client, token, id)
            .await
            .with_context(|| format!("reading batch {id} failed"))?;
        if matches!(
            batch["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ) {
            return Ok(batch);
        }
        let finished = finished_jobs(&batch);
        if finished != last_finished {
            last_finished = finished;
            last_change = Instant::now();
        } else if last_change.elapsed() > STALL_TIMEOUT {
            bail!(
                "batch {id} finished no job for {} s: {batch}",
                STALL_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Reads how many jobs each server ran to success. The counters follow
/// the queue's events, so they may trail the batch's own counters briefly.
/// This waits up to [`METRICS_SETTLE`] for them to add up to `items`, then
/// returns what they show.
async fn succeeded_per_process(
    servers: &[ServerChild],
    client: &reqwest::Client,
    items: usize,
) -> anyhow::Result<Vec<u64>> {
    let deadline = Instant::now() + METRICS_SETTLE;
    loop {
        let mut counts = Vec::with_capacity(servers.len());
        for server in servers {
            let text = client
                .get(format!("http://{}/metrics", server.addr))
                .send()
                .await
                .with_context(|| format!("reading /metrics of {} failed", server.addr))?
                .text()
                .await
                .with_context(|| format!("reading /metrics of {} failed", server.addr))?;
            counts.push(sum_counter(&text, SUCCEEDED_METRIC));
        }
        if counts.iter().sum::<u64>() >= items as u64 || Instant::now() > deadline {
            return Ok(counts);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sums the samples of the counter `name` over all its label sets in a
/// Prometheus or OpenMetrics text exposition.
fn sum_counter(exposition: &str, name: &str) -> u64 {
    exposition
        .lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Drops `schema` on the database at `database_url`.
async fn drop_schema(database_url: &str, schema: &str) -> anyhow::Result<()> {
    testing::drop_schema_on(database_url, schema)
        .await
        .with_context(|| format!("dropping schema {schema} failed"))
}

fn print_table(report: &ClusterReport) {
    let m = &report.machine;
    println!(
        "machine: {} cores, {} MiB, batchd {} ({})",
        m.cores, m.memory_mib, m.batchd_version, m.git_commit
    );
    println!("database: {}, a fresh schema per run", report.database);
    println!("items per batch: {}", report.items);
    for workload in &report.workloads {
        let baseline = workload.runs.first().map_or(0, |run| run.processes);
        println!();
        println!(
            "{}: {}, concurrency {} per process; ratio to the {baseline}-process run",
            workload.kind, workload.description, workload.concurrency_per_process
        );
        println!(
            "{:>9} {:>10} {:>12} {:>7}   succeeded per process",
            "processes", "drain s", "jobs/s", "ratio"
        );
        for run in &workload.runs {
            let total: u64 = run.succeeded_per_process.iter().sum();
            let shares: Vec<String> = run
                .succeeded_per_process
                .iter()
                .map(|count| {
                    let percent = if total == 0 {
                        0.0
                    } else {
                        *count as f64 * 100.0 / total as f64
                    };
                    format!("{count} ({percent:.0}%)")
                })
                .collect();
            println!(
                "{:>9} {:>10.2} {:>12.0} {:>7.2}   {}",
                run.processes,
                run.drain_seconds,
                run.jobs_per_second,
                run.ratio_to_baseline,
                shares.join(", ")
            );
            if total != report.items as u64 {
                println!(
                    "{:>9} the counters add up to {total}, not {}",
                    "", report.items
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_counter_adds_label_sets() {
        let exposition = "# TYPE batchd_jobs_succeeded counter\n\
             batchd_jobs_succeeded_total{kind=\"noop\"} 12\n\
             batchd_jobs_succeeded_total{kind=\"sleep\"} 30\n\
             batchd_jobs_succeeded_created{kind=\"noop\"} 1700000000.0\n\
             batchd_jobs_started_total{kind=\"noop\"} 99\n";
        assert_eq!(sum_counter(exposition, SUCCEEDED_METRIC), 42);
    }

    #[test]
    fn sum_counter_missing_is_zero() {
        assert_eq!(sum_counter("# EOF\n", SUCCEEDED_METRIC), 0);
    }

    #[test]
    fn server_config_parses() {
        let text = server_config("postgres://user@127.0.0.1:5432/test", "batchd_test_1_abc");
        let config: crate::config::Config = toml::from_str(&text).unwrap_or_else(|error| {
            panic!("invalid configuration: {error}\n{text}");
        });
        assert_eq!(
            config.database.as_deref(),
            Some("postgres://user@127.0.0.1:5432/test")
        );
        assert_eq!(config.postgres.schema.as_deref(), Some("batchd_test_1_abc"));
        assert!(config.rate_limits.disabled);
        assert_eq!(config.kinds.len(), 2);
        for kind in ["noop", "sleep"] {
            assert_eq!(config.kinds[kind].concurrency, CONCURRENCY, "kind {kind}");
        }
    }
}
