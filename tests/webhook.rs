//! The `webhook` handler through the real binary: a 10,000-item batch
//! delivered to a real HTTP server on loopback, retries on 503, dead
//! letters on 400.

#![allow(clippy::unwrap_used, reason = "tests")]

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

#[tokio::test]
async fn ten_thousand_items_reach_a_real_server() {
    let receiver = HttpReceiver::start();
    let config = format!(
        r#"
[outbound]
allow_loopback = true

[kinds.notify]
handler = "webhook"
url = "http://127.0.0.1:{port}{path}"
secret = "receiver-signing-secret"
concurrency = 32
"#,
        port = receiver.port,
        path = receiver.path
    );
    let server = Server::start(&config);
    let alice = token("alice", false);
    let items: Vec<_> = (0..10_000)
        .map(|n| json!({ "order": n, "total": n * 3 }))
        .collect();

    let started = Instant::now();
    let (status, batch) = call(
        client()
            .post(server.url("/api/batches"))
            .bearer_auth(&alice)
            .json(&json!({ "kind": "notify", "items": items })),
    )
    .await;
    assert_eq!(status, 201, "{batch}");
    let id = batch["id"].as_str().unwrap().to_owned();
    let done = wait_terminal(&server, &alice, &id, Duration::from_secs(300)).await;
    let elapsed = started.elapsed();

    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["succeeded"], 10_000);
    assert_eq!(done["failed"], 0);
    assert_eq!(done["cancelled"], 0);
    let items = all_items(&server, &alice, &id).await;
    assert_eq!(items.len(), 10_000);
    assert!(
        items
            .iter()
            .all(|item| item["status"] == "succeeded" && item["attempts"] == 1)
    );
    eprintln!(
        "10,000 webhook items to {} end to end in {:.2} s; server peak RSS {} KiB",
        receiver.program,
        elapsed.as_secs_f64(),
        server.peak_rss_kib().unwrap_or(0)
    );
}

#[tokio::test]
async fn flaky_endpoint_succeeds_on_the_third_attempt() {
    let receiver = Receiver::start().await;
    let config = format!(
        r#"
[outbound]
allow_loopback = true

[kinds.flaky]
handler = "webhook"
url = "http://{addr}/flaky"
secret = "receiver-signing-secret"
backoff_base_ms = 100
"#,
        addr = receiver.addr
    );
    let server = Server::start(&config);
    let alice = token("alice", false);
    let (status, batch) = call(
        client()
            .post(server.url("/api/batches"))
            .bearer_auth(&alice)
            .json(&json!({ "kind": "flaky", "items": [{"a": 1}, {"a": 2}, {"a": 3}] })),
    )
    .await;
    assert_eq!(status, 201, "{batch}");
    let id = batch["id"].as_str().unwrap().to_owned();
    let done = wait_terminal(&server, &alice, &id, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "completed", "{done}");

    for item in all_items(&server, &alice, &id).await {
        assert_eq!(item["attempts"], 3, "{item}");
        let errors = item["errors"].as_array().unwrap();
        assert_eq!(errors.len(), 2);
        assert!(
            errors
                .iter()
                .all(|e| e["error"].as_str().unwrap().contains("503")),
            "{item}"
        );
    }
    assert_eq!(receiver.count("/flaky"), 9);
}

#[tokio::test]
async fn client_error_goes_straight_to_dead_letters() {
    let receiver = Receiver::start().await;
    let config = format!(
        r#"
[outbound]
allow_loopback = true

[kinds.strict]
handler = "webhook"
url = "http://{addr}/bad"
secret = "receiver-signing-secret"
"#,
        addr = receiver.addr
    );
    let server = Server::start(&config);
    let alice = token("alice", false);
    let (_, batch) = call(
        client()
            .post(server.url("/api/batches"))
            .bearer_auth(&alice)
            .json(&json!({ "kind": "strict", "items": [{"a": 1}] })),
    )
    .await;
    let id = batch["id"].as_str().unwrap().to_owned();
    let done = wait_terminal(&server, &alice, &id, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "failed");
    assert_eq!(receiver.count("/bad"), 1);
    let item = &all_items(&server, &alice, &id).await[0];
    assert_eq!(item["status"], "dead");
    assert_eq!(item["attempts"], 1);
}

#[tokio::test]
async fn loopback_endpoint_is_refused_unless_allowed() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("batchd.toml");
    let config = format!(
        r#"
[kinds.notify]
handler = "webhook"
url = "http://{addr}/ok"
secret = "receiver-signing-secret"
"#,
        addr = receiver.addr
    );
    std::fs::write(&config_path, config).unwrap();

    // A literal loopback endpoint is refused when the server starts, so a
    // misconfiguration shows at once instead of as a batch of dead items.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config_path)
        .arg("--data-dir")
        .arg(dir.path())
        .env("BATCHD_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr).to_lowercase();
    assert!(stderr.contains("notify"), "{stderr}");
    assert!(stderr.contains("loopback"), "{stderr}");
    assert_eq!(
        receiver.count("/ok"),
        0,
        "no request may reach a refused address"
    );
}

#[tokio::test]
async fn delivery_continues_the_request_trace() {
    let receiver = Receiver::start().await;
    let config = format!(
        r#"
[outbound]
allow_loopback = true

[kinds.notify]
handler = "webhook"
url = "http://{addr}/ok"
secret = "receiver-signing-secret"
"#,
        addr = receiver.addr
    );
    let server = Server::start(&config);
    let alice = token("alice", false);
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (_, batch) = call(
        client()
            .post(server.url("/api/batches"))
            .bearer_auth(&alice)
            .header("traceparent", incoming)
            .header("X-Correlation-ID", "follow-me-7")
            .json(&json!({ "kind": "notify", "items": [{"a": 1}] })),
    )
    .await;
    let id = batch["id"].as_str().unwrap().to_owned();
    wait_terminal(&server, &alice, &id, Duration::from_secs(30)).await;

    let hits = receiver.hits.lock().unwrap().clone();
    let traceparent = hits
        .keys()
        .find_map(|k| k.strip_prefix("traceparent="))
        .unwrap()
        .to_owned();
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(
        parts[1], "4bf92f3577b34da6a3ce929d0e0e4736",
        "same trace id"
    );
    assert_ne!(
        parts[2], "00f067aa0ba902b7",
        "a new span id for the delivery"
    );
    assert!(hits.contains_key("correlation=follow-me-7"), "{hits:?}");
}
