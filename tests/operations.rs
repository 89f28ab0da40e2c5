//! Operations through the real binary: log files and the security log,
//! Prometheus metrics, stalled request bodies, and the error shape of
//! routes that take no such method.

#![allow(clippy::unwrap_used, reason = "tests")]

mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

const CONFIG: &str = r#"
[limits]
body_idle_timeout_seconds = 1

[kinds.noop]
handler = "noop"
"#;

#[tokio::test]
async fn log_dir_gets_application_and_security_logs_without_secrets() {
    let data_dir = tempfile::tempdir().unwrap().keep();
    let log_dir = data_dir.join("logs");
    let server = Server::start_with_env(
        &data_dir,
        CONFIG,
        &[
            ("BATCHD_LOG_DIR", log_dir.to_str().unwrap()),
            ("RUST_LOG", "info"),
        ],
    );
    let alice = token("alice", false);
    let client = client();

    let (status, _) = call(
        client
            .get(server.url("/api/batches"))
            .bearer_auth("not-a-valid-token"),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = call(
        client
            .post(server.url("/api/batches"))
            .bearer_auth(&alice)
            .header("X-Correlation-ID", "trace-me-42")
            .json(&json!({ "kind": "noop", "items": [1] })),
    )
    .await;
    assert_eq!(status, 201);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let app_log = std::fs::read_to_string(log_dir.join(format!("batchd.{today}.log"))).unwrap();
    let security_log =
        std::fs::read_to_string(log_dir.join(format!("security.{today}.log"))).unwrap();
    for line in app_log.lines().chain(security_log.lines()) {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(!line.contains(&alice), "a token reached the log: {line}");
        assert!(!line.contains(SECRET), "the secret reached the log: {line}");
    }
    assert!(
        security_log.contains("authentication failed"),
        "{security_log}"
    );
    assert!(
        !security_log.contains("not-a-valid-token"),
        "{security_log}"
    );
    assert!(
        app_log.contains("trace-me-42"),
        "the request's correlation id is in the application log"
    );
}

#[tokio::test]
async fn metrics_count_the_work_done() {
    let server = Server::start(CONFIG);
    let alice = token("alice", false);
    let (_, batch) = call(
        client()
            .post(server.url("/api/batches"))
            .bearer_auth(&alice)
            .json(&json!({ "kind": "noop", "items": [1, 2, 3, 4, 5] })),
    )
    .await;
    let id = batch["id"].as_str().unwrap().to_owned();
    wait_terminal(&server, &alice, &id, Duration::from_secs(20)).await;

    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let response = client().get(server.url("/metrics")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        if text.contains("kind=\"noop\"")
            && text.lines().any(|l| {
                l.starts_with("batchd_jobs_succeeded_total") && l.trim_end().ends_with(" 5")
            })
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never counted 5 succeeded jobs:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let value = line.rsplit(' ').next().unwrap();
        assert!(
            value.parse::<f64>().is_ok(),
            "a sample line must end with a number: {line}"
        );
        assert!(!line.contains("alice"), "no user ids as labels: {line}");
        assert!(!line.contains(&id), "no batch ids as labels: {line}");
    }
    assert!(text.contains("batchd_http_requests"), "{text}");
}

#[test]
fn stalled_body_gets_408_instead_of_a_hang() {
    let server = Server::start(CONFIG);
    let alice = token("alice", false);
    let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let request = format!(
        "POST /api/batches HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {alice}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"kind\":",
        server.addr
    );
    stream.write_all(request.as_bytes()).unwrap();

    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&response).contains("REQUEST_TIMEOUT") {
        let read = stream
            .read(&mut buffer)
            .expect("the server answered before the read timeout");
        assert!(
            read > 0,
            "connection closed without an answer: {}",
            String::from_utf8_lossy(&response)
        );
        response.extend_from_slice(&buffer[..read]);
    }
    assert!(
        String::from_utf8_lossy(&response).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&response)
    );
}

#[tokio::test]
async fn wrong_method_on_probes_gets_the_error_shape() {
    let server = Server::start(CONFIG);
    for path in ["/health", "/ready", "/metrics", "/openapi.json"] {
        let (status, body) = call(client().post(server.url(path))).await;
        assert_eq!(status, 405, "{path}");
        assert_eq!(body["code"], "METHOD_NOT_ALLOWED", "{path}: {body}");
        assert!(
            body["correlationId"]
                .as_str()
                .is_some_and(|c| !c.is_empty()),
            "{path}: {body}"
        );
    }
}

#[test]
fn token_refuses_an_empty_user() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(["token", "--user", ""])
        .env("BATCHD_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--user"));
}

#[tokio::test]
async fn correlation_id_follows_every_attempt_across_a_restart() {
    let receiver = Receiver::start().await;
    let data_dir = tempfile::tempdir().unwrap().keep();
    let log_dir = data_dir.join("logs");
    let config = format!(
        r#"
[queue]
lease_seconds = 2

[outbound]
allow_loopback = true

[kinds.flaky]
handler = "webhook"
url = "http://{addr}/flaky"
secret = "receiver-signing-secret"
backoff_base_ms = 1500
"#,
        addr = receiver.addr
    );
    let env = [
        ("BATCHD_LOG_DIR", log_dir.to_str().unwrap()),
        ("RUST_LOG", "info,queue=debug"),
    ];
    let server = Server::start_with_env(&data_dir, &config, &env);
    let alice = token("alice", false);
    let (status, batch) = call(
        client()
            .post(server.url("/api/batches"))
            .bearer_auth(&alice)
            .header("X-Correlation-ID", "follow-me-9")
            .json(&json!({ "kind": "flaky", "items": [{"order": 1}] })),
    )
    .await;
    assert_eq!(status, 201, "{batch}");
    let id = batch["id"].as_str().unwrap().to_owned();

    // Kill the server once the first attempt has failed, while the job
    // waits out its backoff, and continue on a new process.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let items = all_items(&server, &alice, &id).await;
        if items[0]["errors"].as_array().unwrap().len() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the first attempt never failed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let data_dir = server.kill();
    let restarted = Server::start_with_env(&data_dir, &config, &env);
    let done = wait_terminal(&restarted, &alice, &id, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "completed", "{done}");
    let job_id = all_items(&restarted, &alice, &id).await[0]["id"]
        .as_i64()
        .unwrap()
        .to_string();
    drop(restarted);

    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let log = std::fs::read_to_string(log_dir.join(format!("batchd.{today}.log"))).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .filter(|line: &serde_json::Value| line["correlation_id"] == "follow-me-9")
        .collect();
    assert!(
        lines.iter().any(|line| line["message"] == "batch accepted"),
        "the request that created the batch is in the log"
    );
    for attempt in 1..=3 {
        assert!(
            lines.iter().any(|line| line["attempt"] == attempt
                && line["job_id"].as_str() == Some(job_id.as_str())),
            "attempt {attempt} of job {job_id} logs the batch's correlation id"
        );
    }
    let starts: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("batchd listening") || line.contains("queue started"))
        .collect();
    assert!(
        starts.len() >= 2,
        "the log spans both processes: {starts:?}"
    );
}

#[tokio::test]
async fn unsafe_correlation_id_is_replaced() {
    let server = Server::start(CONFIG);
    for unsafe_id in ["has spaces", "quote\"and<tag>", &"x".repeat(200)] {
        let response = client()
            .get(server.url("/health"))
            .header("X-Correlation-ID", unsafe_id)
            .send()
            .await
            .unwrap();
        let echoed = response.headers()["x-correlation-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_ne!(echoed, unsafe_id);
        assert!(
            uuid::Uuid::parse_str(&echoed).is_ok(),
            "a new UUID replaces {unsafe_id:?}: {echoed}"
        );
    }
    let response = client()
        .get(server.url("/health"))
        .header("X-Correlation-ID", "req-1.a:b_c")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-correlation-id"], "req-1.a:b_c");
}
