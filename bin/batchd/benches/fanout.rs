//! WebSocket fan-out: a server process with thousands of idle connected
//! clients and a few subscribers. Reports the server's memory per idle
//! connection and the time from submitting a one-item batch to its
//! `batch.finished` reaching every subscriber, against the same
//! measurement with no idle clients (the baseline) in the same run.
//!
//! Run with `cargo bench -p batchd --bench fanout`; `BATCHD_BENCH_IDLE`
//! sets the idle clients (default 2,000). All traffic stays on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark harness")]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use awc::ws;
use futures_util::{SinkExt, StreamExt};

const SECRET: &str = "benchmark-secret-0123456789abcdef0123456789";
const SUBSCRIBERS: usize = 5;
const ROUNDS: usize = 20;

type Socket = actix_codec::Framed<awc::BoxedSocket, ws::Codec>;

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

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap().keep();
        let config = dir.join("batchd.toml");
        std::fs::write(
            &config,
            "[rate_limits]\ndisabled = true\n\n[kinds.noop]\nhandler = \"noop\"\n",
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
            .unwrap();
        Server { child, addr }
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

fn token(user: &str) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(["token", "--user", user])
        .env("BATCHD_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

async fn connect(addr: &str, token: &str) -> Socket {
    let (_, socket) = awc::Client::new()
        .ws(format!("ws://{addr}/ws"))
        .bearer_auth(token)
        .connect()
        .await
        .unwrap();
    socket
}

async fn wait_finished(socket: &mut Socket, batch: &str) {
    loop {
        match socket.next().await.unwrap().unwrap() {
            ws::Frame::Text(text) => {
                let message: serde_json::Value = serde_json::from_slice(&text).unwrap();
                if message["type"] == "batch.finished" && message["batchId"] == batch {
                    return;
                }
            }
            ws::Frame::Ping(bytes) => socket.send(ws::Message::Pong(bytes)).await.unwrap(),
            _ => {}
        }
    }
}

/// Median time from submitting a one-item batch to its batch.finished
/// reaching the last of the subscribers, in milliseconds.
async fn fan_out(server: &Server, subscribers: &mut [Socket], token: &str) -> f64 {
    let client = awc::Client::new();
    let mut samples = Vec::new();
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let mut response = client
            .post(format!("http://{}/api/batches", server.addr))
            .bearer_auth(token)
            .send_json(&serde_json::json!({ "kind": "noop", "items": [1] }))
            .await
            .unwrap();
        let batch: serde_json::Value = response.json().await.unwrap();
        let id = batch["id"].as_str().unwrap().to_owned();
        for socket in subscribers.iter_mut() {
            tokio::time::timeout(Duration::from_secs(10), wait_finished(socket, &id))
                .await
                .unwrap();
        }
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

#[actix_web::main]
async fn main() {
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    let idle: usize = std::env::var("BATCHD_BENCH_IDLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let server = Server::start();
    let alice = token("alice");

    let mut subscribers = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let mut socket = connect(&server.addr, &alice).await;
        socket
            .send(ws::Message::Text(
                r#"{"type":"subscribe","all":true}"#.into(),
            ))
            .await
            .unwrap();
        subscribers.push(socket);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = fan_out(&server, &mut subscribers, &alice).await;
    let rss_before = server.rss_kib();

    let mut idle_sockets = Vec::with_capacity(idle);
    for n in 0..idle {
        // Idle clients belong to other users and subscribe to nothing.
        idle_sockets.push(connect(&server.addr, &token_for(n)).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = server.rss_kib();
    let loaded = fan_out(&server, &mut subscribers, &alice).await;

    println!("idle clients: {idle}, subscribers: {SUBSCRIBERS}, rounds: {ROUNDS}");
    println!(
        "submit-to-finished at every subscriber, no idle clients (baseline): {baseline:.2} ms (median)"
    );
    println!(
        "submit-to-finished at every subscriber, {idle} idle clients: {loaded:.2} ms (median), ratio {:.2}",
        loaded / baseline
    );
    println!(
        "server RSS: {:.1} MiB before, {:.1} MiB with the idle clients, {:.1} KiB per connection",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        rss_after.saturating_sub(rss_before) as f64 / idle as f64
    );
    drop(idle_sockets);
}

/// Tokens are minted in-process here: starting `batchd token` thousands of
/// times would dominate the run.
fn token_for(n: usize) -> String {
    use std::sync::OnceLock;
    static KEY: OnceLock<jsonwebtoken::EncodingKey> = OnceLock::new();
    let key = KEY.get_or_init(|| jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()));
    let claims =
        serde_json::json!({ "sub": format!("idle-{n}"), "exp": 4_000_000_000u64, "iat": 0 });
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, key).unwrap()
}
