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
