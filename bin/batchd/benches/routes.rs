//! Cost of the rate-limit middleware: requests per second to one route
//! with limits off (the baseline) and on (a policy whose burst covers
//! every request of the run, so nothing is denied), measured in the same
//! run against the real binary on loopback.
//!
//! Run with `cargo bench -p batchd --bench routes`; `BATCHD_BENCH_REQUESTS`
//! sets the requests per run (default 20,000), sent by 16 concurrent
//! connections.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark harness")]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

const SECRET: &str = "benchmark-secret-0123456789abcdef0123456789";
const CONCURRENCY: usize = 16;

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(rate_limits: &str) -> Server {
    let dir = tempfile::tempdir().unwrap().keep();
    let config = dir.join("batchd.toml");
    std::fs::write(
        &config,
        format!("[kinds.noop]\nhandler = \"noop\"\n\n[rate_limits]\n{rate_limits}\n"),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&dir)
        .env("BATCHD_JWT_SECRET", SECRET)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let addr = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            line.strip_prefix("batchd listening on http://")
                .map(str::to_owned)
        })
        .expect("batchd printed its address");
    Server { child, addr }
}

fn token() -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(["token", "--user", "bench", "--admin"])
        .env("BATCHD_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

async fn run(server: &Server, token: &str, requests: usize) -> f64 {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://{}/api/admin/kinds", server.addr);
    let started = Instant::now();
    let per_task = requests / CONCURRENCY;
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let client = client.clone();
            let url = url.clone();
            let token = token.to_owned();
            tokio::spawn(async move {
                for _ in 0..per_task {
                    let response = client.get(&url).bearer_auth(&token).send().await.unwrap();
                    assert_eq!(response.status(), 200);
                    response.bytes().await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    (per_task * CONCURRENCY) as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    let requests: usize = std::env::var("BATCHD_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let token = token();
    let unlimited = start("disabled = true");
    let limited =
        start("[rate_limits.policies.general]\nlimit = 60000\nperiod = \"1m\"\nburst = 60000\n");

    // Warm both up, then alternate so drift on the machine hits both.
    run(&unlimited, &token, 2_000).await;
    run(&limited, &token, 2_000).await;
    let mut baseline = Vec::new();
    let mut measured = Vec::new();
    for _ in 0..3 {
        baseline.push(run(&unlimited, &token, requests).await);
        measured.push(run(&limited, &token, requests).await);
    }
    baseline.sort_by(f64::total_cmp);
    measured.sort_by(f64::total_cmp);
    let (base, with) = (baseline[1], measured[1]);
    println!("unlimited route (baseline): {base:>9.0} requests/s (median of 3)");
    println!("limited route:              {with:>9.0} requests/s (median of 3)");
    println!("ratio limited / unlimited:  {:.3}", with / base);
}
