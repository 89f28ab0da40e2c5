//! Several batchd processes on one PostgreSQL database, through the real
//! binary: a 20,000-item batch shared by three processes, a process killed
//! with SIGKILL mid-batch, progress relayed between processes over
//! WebSocket, and feature flags and rate limits that hold across them.
//!
//! Each test uses a schema of its own on the server named by
//! BATCHD_TEST_DATABASE_URL (default: the local `test` database).

#![allow(clippy::unwrap_used, reason = "tests")]

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use awc::ws;
use futures_util::{SinkExt, StreamExt};
use postgres_store::testing;
use serde_json::{Value, json};
use support::*;

/// The three-process tests each keep both cores busy; running them one
/// at a time keeps their timings meaningful.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ITEMS: usize = 20_000;

/// Builds a process's config on `schema`, with `kinds` as its `[kinds]` part.
fn config(schema: &str, kinds: &str) -> String {
    format!(
        r#"
database = "{url}"

[postgres]
schema = "{schema}"
pool_size = 8

[queue]
lease_seconds = 2

{kinds}
"#,
        url = testing::database_url(),
    )
}

const SLEEP_KIND: &str = r#"
[kinds.sleep]
handler = "sleep"
concurrency = 16
"#;

/// Starts one process on `schema`, in a data directory of its own.
fn start_process(schema: &str, kinds: &str) -> Server {
    let dir = tempfile::tempdir().unwrap().keep();
    Server::start_in(&dir, &config(schema, kinds))
}

fn start_three(schema: &str, kinds: &str) -> Vec<Server> {
    (0..3).map(|_| start_process(schema, kinds)).collect()
}

async fn create_sleep_batch(server: &Server, token: &str, items: usize, ms: u64) -> String {
    let body: String = (0..items).map(|_| format!("{{\"ms\":{ms}}}\n")).collect();
    let (status, batch) = call(
        client()
            .post(server.url("/api/batches?kind=sleep"))
            .bearer_auth(token)
            .header("content-type", "application/x-ndjson")
            .body(body),
    )
    .await;
    assert_eq!(status, 201, "{batch}");
    batch["id"].as_str().unwrap().to_owned()
}

/// Reads one counter of a process's /metrics, summed over its labels.
async fn metric(server: &Server, name: &str) -> u64 {
    let text = client()
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn counters(server: &Server, token: &str, id: &str) -> Value {
    let (status, batch) = call(
        client()
            .get(server.url(&format!("/api/batches/{id}")))
            .bearer_auth(token),
    )
    .await;
    assert_eq!(status, 200, "{batch}");
    batch
}

fn attempts_histogram(items: &[Value]) -> HashMap<u64, usize> {
    let mut histogram = HashMap::new();
    for item in items {
        *histogram
            .entry(item["attempts"].as_u64().unwrap())
            .or_default() += 1;
    }
    histogram
}

#[tokio::test]
async fn three_processes_run_each_item_once() {
    let _heavy = HEAVY.lock().await;
    let schema = testing::unique_schema();
    let servers = start_three(&schema, SLEEP_KIND);
    let alice = token("alice", false);

    let id = create_sleep_batch(&servers[0], &alice, ITEMS, 2).await;
    let batch = wait_terminal(&servers[1], &alice, &id, Duration::from_secs(300)).await;

    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(batch["itemCount"], ITEMS);
    assert_eq!(batch["succeeded"], ITEMS);
    assert_eq!(batch["failed"], 0);
    assert_eq!(batch["cancelled"], 0);

    let items = all_items(&servers[2], &alice, &id).await;
    assert_eq!(items.len(), ITEMS);
    assert!(items.iter().all(|item| item["status"] == "succeeded"));
    assert_eq!(
        attempts_histogram(&items),
        HashMap::from([(1, ITEMS)]),
        "with every process up, each item ran exactly once"
    );

    let mut started = Vec::new();
    for server in &servers {
        started.push(metric(server, "batchd_jobs_started_total").await);
    }
    assert_eq!(
        started.iter().sum::<u64>(),
        ITEMS as u64,
        "handlers started across the processes: {started:?}"
    );
    for (process, count) in started.iter().enumerate() {
        assert!(
            *count >= ITEMS as u64 / 10,
            "process {process} ran only {count} of {ITEMS} items: {started:?}"
        );
    }
    eprintln!("items run per process: {started:?}");
}

#[tokio::test]
async fn killed_process_loses_nothing() {
    let _heavy = HEAVY.lock().await;
    let schema = testing::unique_schema();
    let mut servers = start_three(&schema, SLEEP_KIND);
    let alice = token("alice", false);

    let id = create_sleep_batch(&servers[0], &alice, ITEMS, 5).await;

    // Kill the third process once a quarter of the batch is done, while it
    // holds leases on jobs it is running.
    let started = Instant::now();
    loop {
        let batch = counters(&servers[0], &alice, &id).await;
        if batch["succeeded"].as_u64().unwrap() >= ITEMS as u64 / 4 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "a quarter of the batch did not finish within 120 s: {batch}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let victim = servers.pop().unwrap();
    let in_flight_before = metric(&victim, "batchd_jobs_started_total").await;
    assert!(in_flight_before > 0, "the victim had started work");
    victim.kill();

    let batch = wait_terminal(&servers[0], &alice, &id, Duration::from_secs(300)).await;
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(batch["succeeded"], ITEMS);
    assert_eq!(batch["failed"], 0);

    let items = all_items(&servers[1], &alice, &id).await;
    assert!(items.iter().all(|item| item["status"] == "succeeded"));
    let histogram = attempts_histogram(&items);
    let repeated = histogram.get(&2).copied().unwrap_or(0);
    assert!(
        histogram.keys().all(|attempts| *attempts <= 2),
        "only the killed process's leases were taken over, once: {histogram:?}"
    );
    assert!(
        repeated <= 16,
        "at most the victim's 16 running jobs ran again, not {repeated}"
    );
    assert!(
        repeated > 0,
        "the victim died holding leases, so some items ran twice: {histogram:?}"
    );
    eprintln!("items taken over from the killed process: {repeated}");
}

type Socket = actix_codec::Framed<awc::BoxedSocket, ws::Codec>;

async fn next_json(socket: &mut Socket, wait: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let frame = tokio::time::timeout_at(deadline, socket.next())
            .await
            .ok()??;
        match frame.unwrap() {
            ws::Frame::Text(text) => return Some(serde_json::from_slice(&text).unwrap()),
            ws::Frame::Ping(bytes) => socket.send(ws::Message::Pong(bytes)).await.unwrap(),
            ws::Frame::Close(reason) => panic!("socket closed: {reason:?}"),
            _ => {}
        }
    }
}

#[actix_web::test]
async fn client_sees_progress_from_other_process() {
    let schema = testing::unique_schema();
    // The watcher runs the kind at one job a minute, so the worker does
    // nearly all of the batch.
    let watcher = start_process(
        &schema,
        r#"
[kinds.sleep]
handler = "sleep"
concurrency = 1
rate_per_minute = 1
"#,
    );
    let worker = start_process(&schema, SLEEP_KIND);
    let alice = token("alice", false);

    let (_, mut socket) = awc::Client::new()
        .ws(format!("ws://{}/ws", watcher.addr))
        .bearer_auth(&alice)
        .connect()
        .await
        .unwrap();
    let id = create_sleep_batch(&worker, &alice, 400, 20).await;
    socket
        .send(ws::Message::Text(
            json!({ "type": "subscribe", "batchId": id })
                .to_string()
                .into(),
        ))
        .await
        .unwrap();

    let mut progress_seen = 0;
    let finished = loop {
        let message = next_json(&mut socket, Duration::from_secs(60))
            .await
            .expect("the batch finished within 60 s, as seen from the watcher");
        match message["type"].as_str().unwrap() {
            "batch.progress" => progress_seen += 1,
            "batch.finished" => break message,
            _ => {}
        }
    };
    assert_eq!(finished["status"], "completed", "{finished}");
    assert_eq!(finished["stats"]["succeeded"], 400);
    assert!(progress_seen >= 1, "progress arrived before the end");

    let ran_on_watcher = metric(&watcher, "batchd_jobs_succeeded_total").await;
    assert!(
        ran_on_watcher <= 2,
        "the watcher ran {ran_on_watcher} items itself; the rest ran on the worker"
    );
    assert_eq!(
        metric(&watcher, "batchd_batches_finished_total").await,
        0,
        "the batch finished on the worker, so the watcher only relayed it"
    );
}

#[tokio::test]
async fn flag_change_reaches_other_process() {
    let schema = testing::unique_schema();
    // A refresh interval far longer than the test: only the notification
    // can carry the change in time.
    let kinds = "[flags]\nrefresh_interval_ms = 600000\n\n[kinds.noop]\nhandler = \"noop\"\n";
    let first = start_process(&schema, kinds);
    let second = start_process(&schema, kinds);
    let admin = token("root", true);
    let alice = token("alice", false);
    let client = client();

    let (status, body) = call(
        client
            .post(second.url("/api/batches"))
            .bearer_auth(&alice)
            .json(&json!({ "kind": "noop", "items": [1] })),
    )
    .await;
    assert_eq!(status, 201, "{body}");

    let (status, body) = call(
        client
            .patch(first.url("/api/admin/flags/batch_operations"))
            .bearer_auth(&admin)
            .json(&json!({ "denyList": ["alice"] })),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let started = Instant::now();
    loop {
        let (status, body) = call(
            client
                .post(second.url("/api/batches"))
                .bearer_auth(&alice)
                .json(&json!({ "kind": "noop", "items": [1] })),
        )
        .await;
        if status == 403 {
            assert_eq!(body["code"], "FEATURE_DISABLED");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the second process still allowed alice 5 s after the change"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn rate_limit_spans_processes() {
    let schema = testing::unique_schema();
    let kinds = r#"
[kinds.noop]
handler = "noop"

[rate_limits]
backend = "store"

[rate_limits.policies.tiny]
limit = 3
period = "1m"
burst = 2
message = "slow down"

[rate_limits.routes]
"GET /api/batches" = "tiny"
"#;
    let first = start_process(&schema, kinds);
    let second = start_process(&schema, kinds);
    let alice = token("alice", false);
    let client = client();

    let mut statuses = Vec::new();
    for server in [&first, &second, &first, &second] {
        let response = client
            .get(server.url("/api/batches"))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(
        statuses,
        vec![200, 200, 200, 429],
        "three requests per minute across both processes"
    );
}

#[tokio::test]
async fn cancel_stops_jobs_on_other_process() {
    let schema = testing::unique_schema();
    let kinds = "[kinds.sleep]\nhandler = \"sleep\"\nconcurrency = 4\n";
    let first = start_process(&schema, kinds);
    let second = start_process(&schema, kinds);
    let alice = token("alice", false);

    // Eight long jobs: each process runs four of them.
    let id = create_sleep_batch(&first, &alice, 8, 30_000).await;
    let started = Instant::now();
    loop {
        let running = metric(&first, "batchd_jobs_started_total").await
            + metric(&second, "batchd_jobs_started_total").await;
        if running == 8 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "only {running} of 8 jobs started within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(metric(&first, "batchd_jobs_started_total").await > 0);
    assert!(metric(&second, "batchd_jobs_started_total").await > 0);

    let (status, body) = call(
        client()
            .post(second.url(&format!("/api/batches/{id}/cancel")))
            .bearer_auth(&alice),
    )
    .await;
    assert!(status == 200 || status == 202, "{status} {body}");

    // The handlers sleep for 30 s; only a cancellation ends them sooner.
    let batch = wait_terminal(&first, &alice, &id, Duration::from_secs(15)).await;
    assert_eq!(batch["status"], "cancelled", "{batch}");
    assert_eq!(batch["cancelled"], 8, "{batch}");
    assert_eq!(batch["succeeded"], 0, "{batch}");
}

#[actix_web::test]
async fn ticket_opens_other_process_socket_once() {
    let schema = testing::unique_schema();
    let kinds = "[kinds.noop]\nhandler = \"noop\"\n";
    let issuer = start_process(&schema, kinds);
    let other = start_process(&schema, kinds);
    let alice = token("alice", false);

    let (status, body) = call(
        client()
            .post(issuer.url("/api/ws/tickets"))
            .bearer_auth(&alice),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let ticket = body["ticket"].as_str().unwrap().to_owned();

    let url = format!("ws://{}/ws?ticket={ticket}", other.addr);
    let first = awc::Client::new().ws(&url).connect().await;
    assert!(first.is_ok(), "the other process accepts the ticket");

    let again = format!("ws://{}/ws?ticket={ticket}", issuer.addr);
    match awc::Client::new().ws(&again).connect().await {
        Err(awc::error::WsClientError::InvalidResponseStatus(status)) => {
            assert_eq!(status.as_u16(), 401, "a used ticket is refused everywhere");
        }
        Err(error) => panic!("unexpected error: {error}"),
        Ok(_) => panic!("a used ticket opened a second socket"),
    }
}
