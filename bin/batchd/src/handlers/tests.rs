//! The `webhook` and `fetch` handlers against mock endpoints. Every mock
//! is a raw HTTP/1.1 server on 127.0.0.1 started by the test, and the
//! mocks are the only addresses ever contacted. Tests of blocked targets
//! assert that the mock saw no connection at all.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use domain::{BatchId, JobId};
use queue::HandlerError;
use serde_json::Value;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::guard::AddressPolicy;
use super::host_limit::HostRateLimit;
use super::http::{build_client, request_failure};
use super::{Attempt, FetchHandler, FetchSettings, WebhookHandler, WebhookSettings, verify};

// ---------------------------------------------------------------------------
// Mock endpoint

/// One request as the mock received it; header names are lowercase.
#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Recorded {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// What the mock sends back.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Wait this long before sending anything.
    delay: Duration,
    /// Send a Content-Length header; without it the body ends when the
    /// connection closes.
    content_length: bool,
    /// Announce `stall_length` bytes, send the body, then keep the
    /// connection open without sending more.
    stall_length: Option<usize>,
}

impl Reply {
    fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            delay: Duration::ZERO,
            content_length: true,
            stall_length: None,
        }
    }

    fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    fn without_length(mut self) -> Self {
        self.content_length = false;
        self
    }

    fn stall(mut self, announced: usize) -> Self {
        self.stall_length = Some(announced);
        self
    }

    fn redirect(status: u16, location: &str) -> Self {
        Self::status(status).header("Location", location)
    }
}

type Responder = dyn Fn(&Recorded, usize) -> Reply + Send + Sync;

/// A raw HTTP/1.1 server on 127.0.0.1 that records requests, sends the
/// responder's reply to each, then closes the connection.
struct MockServer {
    port: u16,
    requests: Arc<Mutex<Vec<Recorded>>>,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl MockServer {
    async fn start(respond: impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let respond: Arc<Responder> = Arc::new(respond);

        let task = {
            let requests = requests.clone();
            let connections = connections.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let requests = requests.clone();
                    let respond = respond.clone();
                    tokio::spawn(async move {
                        serve_connection(stream, requests, respond).await;
                    });
                }
            })
        };
        Self {
            port,
            requests,
            connections,
            task,
        }
    }

    /// Starts a server that sends the same reply to every request.
    async fn always(reply: Reply) -> Self {
        Self::start(move |_, _| reply.clone()).await
    }

    fn url(&self, path: &str) -> Url {
        Url::parse(&format!("http://127.0.0.1:{}{path}", self.port)).unwrap()
    }

    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    requests: Arc<Mutex<Vec<Recorded>>>,
    respond: Arc<Responder>,
) {
    let Some(request) = read_request(&mut stream).await else {
        return;
    };
    let index = {
        let mut requests = requests.lock().unwrap();
        requests.push(request.clone());
        requests.len() - 1
    };
    let reply = respond(&request, index);
    tokio::time::sleep(reply.delay).await;

    let mut head = format!("HTTP/1.1 {} Mock\r\n", reply.status);
    for (name, value) in &reply.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(announced) = reply.stall_length {
        head.push_str(&format!("Content-Length: {announced}\r\n"));
    } else if reply.content_length {
        head.push_str(&format!("Content-Length: {}\r\n", reply.body.len()));
    }
    head.push_str("Connection: close\r\n\r\n");

    // Write errors mean the client gave up, which some tests expect.
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    if stream.write_all(&reply.body).await.is_err() {
        return;
    }
    if reply.stall_length.is_some() {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    let _ = stream.shutdown().await;
}

async fn read_request(stream: &mut TcpStream) -> Option<Recorded> {
    let mut buffer = Vec::new();
    let mut chunk = [0_u8; 4096];
    let head_end = loop {
        if let Some(position) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break position;
        }
        if buffer.len() > 64 * 1024 {
            return None;
        }
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
    };

    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_owned();
    let path = request_line.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0);

    let mut body = buffer[head_end + 4..].to_vec();
    while body.len() < length {
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..read]);
    }
    body.truncate(length);
    Some(Recorded {
        method,
        path,
        headers,
        body,
    })
}

// ---------------------------------------------------------------------------
// Attempt inputs

const LOOPBACK_ONLY: AddressPolicy = AddressPolicy {
    allow_loopback: true,
    allow_private: false,
};
const NOTHING_LOCAL: AddressPolicy = AddressPolicy {
    allow_loopback: false,
    allow_private: false,
};
const SECRET: &str = "receiver-signing-secret";

/// The ids and payload of one test attempt.
struct Inputs {
    job_id: JobId,
    batch_id: BatchId,
    seq: u32,
    attempt: u32,
    correlation_id: Option<String>,
    traceparent: Option<String>,
    payload: String,
    cancel: CancellationToken,
    progress: Arc<Mutex<Vec<u8>>>,
}

impl Inputs {
    fn new(payload: impl Into<String>) -> Self {
        Self {
            job_id: JobId(41),
            batch_id: BatchId::new(),
            seq: 7,
            attempt: 2,
            correlation_id: None,
            traceparent: None,
            payload: payload.into(),
            cancel: CancellationToken::new(),
            progress: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn fetch_url(url: &Url) -> Self {
        Self::new(serde_json::json!({ "url": url.as_str() }).to_string())
    }

    fn progress(&self) -> Vec<u8> {
        self.progress.lock().unwrap().clone()
    }

    /// Cancels the attempt after `delay`.
    fn cancel_after(&self, delay: Duration) {
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            cancel.cancel();
        });
    }
}

type Outcome = Result<Option<Box<RawValue>>, HandlerError>;

async fn deliver(handler: &WebhookHandler, inputs: &Inputs) -> Outcome {
    let sink = inputs.progress.clone();
    let progress = move |percent| sink.lock().unwrap().push(percent);
    let attempt = Attempt {
        job_id: inputs.job_id,
        batch_id: inputs.batch_id,
        seq: inputs.seq,
        attempt: inputs.attempt,
        correlation_id: inputs.correlation_id.as_deref(),
        traceparent: inputs.traceparent.as_deref(),
        payload: &inputs.payload,
        cancel: &inputs.cancel,
        progress: &progress,
    };
    handler.deliver(&attempt).await
}

async fn fetch(handler: &FetchHandler, inputs: &Inputs) -> Outcome {
    let sink = inputs.progress.clone();
    let progress = move |percent| sink.lock().unwrap().push(percent);
    let attempt = Attempt {
        job_id: inputs.job_id,
        batch_id: inputs.batch_id,
        seq: inputs.seq,
        attempt: inputs.attempt,
        correlation_id: inputs.correlation_id.as_deref(),
        traceparent: inputs.traceparent.as_deref(),
        payload: &inputs.payload,
        cancel: &inputs.cancel,
        progress: &progress,
    };
    handler.fetch(&attempt).await
}

fn result_json(outcome: Outcome) -> Value {
    let raw = outcome.unwrap().unwrap();
    serde_json::from_str(raw.get()).unwrap()
}

fn permanent_message(outcome: Outcome) -> String {
    match outcome {
        Err(HandlerError::Permanent(message)) => message,
        other => panic!("expected a permanent failure, got {other:?}"),
    }
}

fn retryable_message(outcome: Outcome) -> String {
    match outcome {
        Err(HandlerError::Retryable(message)) => message,
        other => panic!("expected a retryable failure, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Webhook

fn webhook(url: Url) -> WebhookHandler {
    let mut settings = WebhookSettings::new(url, SECRET);
    settings.policy = LOOPBACK_ONLY;
    WebhookHandler::new(settings).unwrap()
}

#[tokio::test]
async fn webhook_delivers_signed_request() {
    let server = MockServer::always(Reply::status(200).body("ok")).await;
    let handler = webhook(server.url("/hooks/in?source=test"));
    let mut inputs = Inputs::new(r#"{"order":42,"total":"12.50"}"#);
    inputs.correlation_id = Some("req-abc-123".into());

    let result = result_json(deliver(&handler, &inputs).await);
    assert_eq!(result, serde_json::json!({ "status": 200 }));

    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/hooks/in?source=test");
    assert_eq!(request.body, inputs.payload.as_bytes());
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(request.header("x-batchd-job-id"), Some("41"));
    assert_eq!(
        request.header("x-batchd-batch-id"),
        Some(inputs.batch_id.to_string().as_str())
    );
    assert_eq!(request.header("x-batchd-attempt"), Some("2"));
    assert_eq!(
        request.header("idempotency-key"),
        Some(format!("{}:7", inputs.batch_id).as_str())
    );
    assert_eq!(request.header("x-correlation-id"), Some("req-abc-123"));
    assert!(request.header("user-agent").unwrap().starts_with("batchd/"));

    let timestamp = request.header("x-batchd-timestamp").unwrap();
    let signature = request.header("x-batchd-signature").unwrap();
    assert!(signature.starts_with("v1="), "{signature}");
    let now = chrono::Utc::now().timestamp();
    let checked = verify(
        SECRET.as_bytes(),
        timestamp,
        &request.body,
        signature,
        now,
        Duration::from_secs(300),
    );
    assert_eq!(checked, Ok(()));
    let forged = verify(
        b"wrong-secret",
        timestamp,
        &request.body,
        signature,
        now,
        Duration::from_secs(300),
    );
    assert!(forged.is_err());
}

#[tokio::test]
async fn webhook_skips_invalid_correlation_id() {
    let server = MockServer::always(Reply::status(204)).await;
    let handler = webhook(server.url("/"));
    let mut inputs = Inputs::new("{}");
    inputs.correlation_id = Some("bad\nvalue".into());

    let result = result_json(deliver(&handler, &inputs).await);
    assert_eq!(result["status"], 204);
    assert_eq!(server.requests()[0].header("x-correlation-id"), None);
}

#[tokio::test]
async fn webhook_503_then_success() {
    let server = MockServer::start(|_, index| {
        if index == 0 {
            Reply::status(503).body("maintenance")
        } else {
            Reply::status(200)
        }
    })
    .await;
    let handler = webhook(server.url("/"));
    let inputs = Inputs::new("{}");

    let first = retryable_message(deliver(&handler, &inputs).await);
    assert!(first.contains("503"), "{first}");
    assert!(first.contains("maintenance"), "{first}");

    let second = result_json(deliver(&handler, &inputs).await);
    assert_eq!(second["status"], 200);
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn webhook_429_with_retry_after() {
    let server = MockServer::always(Reply::status(429).header("Retry-After", "2")).await;
    let handler = webhook(server.url("/"));

    match deliver(&handler, &Inputs::new("{}")).await {
        Err(HandlerError::RetryAfter { delay, reason }) => {
            assert_eq!(delay, Duration::from_secs(2));
            assert!(reason.contains("429"), "{reason}");
        }
        other => panic!("expected RetryAfter, got {other:?}"),
    }
}

#[tokio::test]
async fn webhook_503_with_http_date() {
    let later = chrono::Utc::now() + chrono::Duration::seconds(120);
    let date = later.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    let server = MockServer::always(Reply::status(503).header("Retry-After", &date)).await;
    let handler = webhook(server.url("/"));

    match deliver(&handler, &Inputs::new("{}")).await {
        Err(HandlerError::RetryAfter { delay, .. }) => {
            assert!(delay > Duration::from_secs(100), "{delay:?}");
            assert!(delay <= Duration::from_secs(120), "{delay:?}");
        }
        other => panic!("expected RetryAfter, got {other:?}"),
    }
}

#[tokio::test]
async fn webhook_429_without_retry_after() {
    let server = MockServer::always(Reply::status(429)).await;
    let handler = webhook(server.url("/"));
    let message = retryable_message(deliver(&handler, &Inputs::new("{}")).await);
    assert!(message.contains("429"), "{message}");
}

#[tokio::test]
async fn webhook_400_is_permanent_with_bounded_excerpt() {
    // 3-byte characters, so a 64-byte cut lands inside one.
    let body = "€".repeat(10_000);
    let server = MockServer::always(Reply::status(400).body(body)).await;
    let mut settings = WebhookSettings::new(server.url("/"), SECRET);
    settings.policy = LOOPBACK_ONLY;
    settings.max_error_body = 64;
    let handler = WebhookHandler::new(settings).unwrap();

    let message = permanent_message(deliver(&handler, &Inputs::new("{}")).await);
    assert!(message.contains("400"), "{message}");
    let excerpt = message.split_once("Bad Request: ").unwrap().1;
    assert!(excerpt.ends_with('…'), "{excerpt}");
    let quoted = excerpt.trim_end_matches('…');
    assert!(quoted.len() <= 64, "excerpt has {} bytes", quoted.len());
    assert_eq!(quoted, "€".repeat(21));
    assert!(!message.contains(SECRET));
}

#[tokio::test]
async fn webhook_redirect_is_permanent() {
    let server = MockServer::always(Reply::redirect(302, "/elsewhere")).await;
    let handler = webhook(server.url("/"));
    let message = permanent_message(deliver(&handler, &Inputs::new("{}")).await);
    assert!(message.contains("302"), "{message}");
    assert_eq!(
        server.requests().len(),
        1,
        "the redirect must not be followed"
    );
}

#[tokio::test]
async fn webhook_timeout_is_retryable() {
    let server = MockServer::always(Reply::status(200).delay(Duration::from_secs(5))).await;
    let mut settings = WebhookSettings::new(server.url("/"), SECRET);
    settings.policy = LOOPBACK_ONLY;
    settings.timeout = Duration::from_millis(300);
    let handler = WebhookHandler::new(settings).unwrap();

    let message = retryable_message(deliver(&handler, &Inputs::new("{}")).await);
    assert!(message.contains("timed out after 300 ms"), "{message}");
}

#[tokio::test]
async fn webhook_connection_refused_is_retryable() {
    // Bind a port on loopback and close it again, so nothing listens there.
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = Url::parse(&format!("http://127.0.0.1:{port}/")).unwrap();
    let message = retryable_message(deliver(&webhook(url), &Inputs::new("{}")).await);
    assert!(
        message.starts_with("webhook to 127.0.0.1 failed"),
        "{message}"
    );
}

#[tokio::test]
async fn webhook_cancelled() {
    let server = MockServer::always(Reply::status(200).delay(Duration::from_secs(10))).await;
    let handler = webhook(server.url("/"));
    let inputs = Inputs::new("{}");
    inputs.cancel_after(Duration::from_millis(100));

    let started = std::time::Instant::now();
    let outcome = deliver(&handler, &inputs).await;
    assert_eq!(outcome.unwrap_err(), HandlerError::Cancelled);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn webhook_loopback_rejected_before_connecting() {
    let server = MockServer::always(Reply::status(200)).await;
    for host in ["127.0.0.1", "localhost"] {
        let url = Url::parse(&format!("http://{host}:{}/", server.port)).unwrap();
        let mut settings = WebhookSettings::new(url, SECRET);
        settings.policy = NOTHING_LOCAL;
        // An IP literal is rejected by the constructor already.
        let handler = match WebhookHandler::new(settings) {
            Ok(handler) => handler,
            Err(error) => {
                assert_eq!(host, "127.0.0.1", "{error}");
                assert!(error.to_string().contains("loopback"), "{error}");
                continue;
            }
        };
        let message = permanent_message(deliver(&handler, &Inputs::new("{}")).await);
        assert!(message.contains("loopback"), "{host}: {message}");
        assert!(message.contains("allow_loopback"), "{host}: {message}");
    }
    assert_eq!(server.connections(), 0);
}

#[tokio::test]
async fn guarded_client_rejects_name_at_connect() {
    // The resolver is the second line of defence: with no check before the
    // request, it must still refuse to connect.
    let server = MockServer::always(Reply::status(200)).await;
    let client = build_client(NOTHING_LOCAL, Duration::from_secs(5), "batchd-test").unwrap();
    let url = format!("http://localhost:{}/", server.port);

    let error = client.get(&url).send().await.unwrap_err();
    let failure = request_failure(&error, "request to localhost", Duration::from_secs(5));
    match failure {
        HandlerError::Permanent(message) => {
            assert!(message.contains("loopback"), "{message}")
        }
        other => panic!("expected a permanent failure, got {other:?}"),
    }
    assert_eq!(server.connections(), 0);
}

// ---------------------------------------------------------------------------
// Fetch

const PDF: &[u8] =
    b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n";

fn fetch_settings(data_dir: &Path) -> FetchSettings {
    let mut settings = FetchSettings::new(data_dir);
    settings.policy = LOOPBACK_ONLY;
    // The mocks run on one host, so the per-host limit must not interfere
    // except in the test about it.
    settings.per_host_rate = HostRateLimit {
        per_second: 1_000.0,
        burst: 100,
    };
    settings
}

fn pdf_reply(body: &[u8]) -> Reply {
    Reply::status(200)
        .header("Content-Type", "application/pdf; charset=binary")
        .body(body)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Files left in the temporary download directory.
fn temp_files(data_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(data_dir.join("documents").join("tmp"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect()
}

/// Lists every file under `documents/` outside the temporary directory.
fn stored_documents(data_dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for shard in std::fs::read_dir(data_dir.join("documents")).unwrap() {
        let shard = shard.unwrap().path();
        if shard.file_name().unwrap() == "tmp" {
            continue;
        }
        for file in std::fs::read_dir(&shard).unwrap() {
            found.push(file.unwrap().path());
        }
    }
    found
}

#[tokio::test]
async fn fetch_stores_document_by_hash() {
    let server = MockServer::always(pdf_reply(PDF)).await;
    let dir = tempfile::tempdir().unwrap();
    let handler = FetchHandler::new(fetch_settings(dir.path())).unwrap();
    let url = server.url("/files/report.pdf?v=1");
    let inputs = Inputs::fetch_url(&url);

    let result = result_json(fetch(&handler, &inputs).await);
    let hash = sha256_hex(PDF);
    let relative = format!("documents/{}/{hash}", &hash[..2]);
    assert_eq!(result["path"], relative.as_str());
    assert_eq!(result["bytes"], PDF.len());
    assert_eq!(result["sha256"], hash.as_str());
    assert_eq!(result["contentType"], "application/pdf");
    assert_eq!(result["url"], url.as_str());
    assert_eq!(result["finalUrl"], url.as_str());

    assert_eq!(std::fs::read(dir.path().join(&relative)).unwrap(), PDF);
    assert!(temp_files(dir.path()).is_empty());

    let request = &server.requests()[0];
    assert_eq!(request.method, "GET");
    assert_eq!(request.header("accept"), Some("application/pdf"));
    assert!(!inputs.progress().is_empty(), "progress should be reported");
}

#[tokio::test]
async fn fetch_keeps_existing_document() {
    let server = MockServer::always(pdf_reply(PDF)).await;
    let dir = tempfile::tempdir().unwrap();
    let handler = FetchHandler::new(fetch_settings(dir.path())).unwrap();
    let inputs = Inputs::fetch_url(&server.url("/a.pdf"));

    let first = result_json(fetch(&handler, &inputs).await);
    let path = dir.path().join(first["path"].as_str().unwrap());
    let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;

    let second = result_json(fetch(&handler, &inputs).await);
    assert_eq!(first["path"], second["path"]);
    assert_eq!(
        std::fs::metadata(&path).unwrap().modified().unwrap(),
        modified
    );
    assert_eq!(stored_documents(dir.path()).len(), 1);
    assert!(temp_files(dir.path()).is_empty());
}

#[tokio::test]
async fn fetch_rejects_large_content_length() {
    let server = MockServer::always(pdf_reply(&[b'x'; 2_000])).await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = fetch_settings(dir.path());
    settings.max_bytes = 1_000;
    let handler = FetchHandler::new(settings).unwrap();

    let outcome = fetch(&handler, &Inputs::fetch_url(&server.url("/big.pdf"))).await;
    let message = permanent_message(outcome);
    assert!(
        message.contains("Content-Length 2000 exceeds max_bytes 1000"),
        "{message}"
    );
    assert!(temp_files(dir.path()).is_empty());
    assert!(stored_documents(dir.path()).is_empty());
}

#[tokio::test]
async fn fetch_stops_large_body_without_length() {
    let server = MockServer::always(pdf_reply(&[b'x'; 200_000]).without_length()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = fetch_settings(dir.path());
    settings.max_bytes = 1_000;
    let handler = FetchHandler::new(settings).unwrap();

    let outcome = fetch(&handler, &Inputs::fetch_url(&server.url("/big.pdf"))).await;
    let message = permanent_message(outcome);
    assert!(message.contains("exceeds max_bytes 1000"), "{message}");
    assert!(temp_files(dir.path()).is_empty());
    assert!(stored_documents(dir.path()).is_empty());
}

#[tokio::test]
async fn fetch_accepts_body_at_exact_limit_without_length() {
    let body = vec![b'y'; 1_000];
    let server = MockServer::always(pdf_reply(&body).without_length()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = fetch_settings(dir.path());
    settings.max_bytes = 1_000;
    let handler = FetchHandler::new(settings).unwrap();

    let result = result_json(fetch(&handler, &Inputs::fetch_url(&server.url("/x.pdf"))).await);
    assert_eq!(result["bytes"], 1_000);
    assert_eq!(result["sha256"], sha256_hex(&body).as_str());
}

#[tokio::test]
async fn fetch_rejects_wrong_content_type() {
    let server = MockServer::always(
        Reply::status(200)
            .header("Content-Type", "text/html; charset=utf-8")
            .body("<html></html>"),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let handler = FetchHandler::new(fetch_settings(dir.path())).unwrap();

    let outcome = fetch(&handler, &Inputs::fetch_url(&server.url("/page"))).await;
    let message = permanent_message(outcome);
    assert!(message.contains("text/html"), "{message}");
    assert!(message.contains("application/pdf"), "{message}");
    assert!(temp_files(dir.path()).is_empty());
    assert!(stored_documents(dir.path()).is_empty());
}

#[tokio::test]
async fn fetch_rejects_missing_content_type() {
    let server = MockServer::always(Reply::status(200).body(PDF)).await;
    let dir = tempfile::tempdir().unwrap();
    let handler = FetchHandler::new(fetch_settings(dir.path())).unwrap();

    let outcome = fetch(&handler, &Inputs::fetch_url(&server.url("/doc"))).await;
    let message = permanent_message(outcome);
    assert!(message.contains("no Content-Type"), "{message}");
}

#[tokio::test]
async fn fetch_accepts_wildcard_subtype() {
    let server = MockServer::always(
        Reply::status(200)
            .header("Content-Type", "text/plain")
            .body("hello"),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = fetch_settings(dir.path());
    settings.allowed_content_types = vec!["application/pdf".into(), "text/*".into()];
    let handler = FetchHandler::new(settings).unwrap();

    let result = result_json(fetch(&handler, &Inputs::fetch_url(&server.url("/t"))).await);
    assert_eq!(result["contentType"], "text/plain");
    assert_eq!(
        server.requests()[0].header("accept"),
        Some("application/pdf, text/*")
    );
}

#[tokio::test]
async fn fetch_follows_redirect_chain() {
    let server = MockServer::start(|request, _| match request.path.as_str() {
        "/start" => Reply::redirect(301, "/step/one"),
        // A relative reference, resolved against /step/one.
        "/step/one" => Reply::redirect(302, "two"),
        "/step/two" => Reply::redirect(307, "/final.pdf"),
        "/final.pdf" => pdf_reply(PDF),
        _ => Reply::status(404),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let handler = FetchHandler::new(fetch_settings(dir.path())).unwrap();
    let start = server.url("/start");

    let result = result_json(fetch(&handler, &Inputs::fetch_url(&start)).await);
    assert_eq!(result["url"], start.as_str());
    assert_eq!(result["finalUrl"], server.url("/final.pdf").as_str());
    let paths: Vec<String> = server.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/start", "/step/one", "/step/two", "/final.pdf"]);
}

#[tokio::test]
async fn fetch_redirect_limit_exceeded() {
    let server = MockServer::start(|request, _| {
        let hop: u32 = request
            .path
            .trim_start_matches("/hop/")
            .parse()
            .unwrap_or(0);
        Reply::redirect(302, &format!("/hop/{}", hop + 1))
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = fetch_settings(dir.path());
    settings.max_redirects = 2;
    let handler = FetchHandler::new(settings).unwrap();

    let outcome = fetch(&handler, &Inputs::fetch_url(&server.url("/hop/0"))).await;
    let message = permanent_message(outcome);
    assert!(message.contains("after 2 redirects"), "{message}");
    assert!(message.contains("max_redirects"), "{message}");
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn fetch_redirect_to_file_scheme_rejected() {
    let server = MockServer::always(Reply::redirect(302, "file:///etc/passwd")).await;
    let dir = tempfile::tempdir().unwrap();
    let handler = FetchHandler::new(fetch_settings(dir.path())).unwrap();

    let outcome = fetch(&handler, &Inputs::fetch_url(&server.url("/doc"))).await;
    let message = permanent_message(outcome);
    assert!(
        message.contains("unsupported URL scheme \"file\""),
        "{message}"
    );
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn fetch_redirect_without_location() {
    let server = MockServer::always(Reply::status(302)).await;
    let dir = tempfile::tempdir().unwrap();
    let handler = FetchHandler::new(fetch_settings(dir.path())).unwrap();

    let outcome = fetch(&handler, &Inputs::fetch_url(&server.url("/doc"))).await;
    let message = permanent_message(outcome);
    assert!(message.contains("without a Location header"), "{message}");
}

#[tokio::test]
async fn fetch_per_host_rate_limit() {
    let server = MockServer::always(pdf_reply(PDF)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = fetch_settings(dir.path());
    settings.per_host_rate = HostRateLimit {
        per_second: 1.0,
        burst: 0,
    };
    let handler = FetchHandler::new(settings).unwrap();
    let inputs = Inputs::fetch_url(&server.url("/doc.pdf"));

    result_json(fetch(&handler, &inputs).await);
    match fetch(&handler, &inputs).await {
        Err(HandlerError::RetryAfter { delay, reason }) => {
            assert!(delay > Duration::ZERO, "{delay:?}");
            assert!(delay <= Duration::from_secs(1), "{delay:?}");
            assert!(reason.contains("127.0.0.1"), "{reason}");
        }
        other => panic!("expected RetryAfter, got {other:?}"),
    }
    assert_eq!(
        server.requests().len(),
        1,
        "the limited request must not be sent"
    );
}

#[tokio::test]
async fn fetch_redirect_hops_wait_for_rate() {
    // Three requests to one host at 10 per second with no burst: the later
    // hops wait for their slots instead of failing the attempt.
    let server = MockServer::start(|request, _| match request.path.as_str() {
        "/a" => Reply::redirect(302, "/b"),
        "/b" => Reply::redirect(302, "/c.pdf"),
        _ => pdf_reply(PDF),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = fetch_settings(dir.path());
    settings.per_host_rate = HostRateLimit {
        per_second: 10.0,
        burst: 0,
    };
    let handler = FetchHandler::new(settings).unwrap();

    let started = std::time::Instant::now();
    result_json(fetch(&handler, &Inputs::fetch_url(&server.url("/a"))).await);
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn fetch_invalid_payloads_are_permanent() {
    let dir = tempfile::tempdir().unwrap();
    let handler = FetchHandler::new(fetch_settings(dir.path())).unwrap();
    let cases = [
        (
            r#"{"link": "https://example.com/a.pdf"}"#,
            "invalid fetch payload",
        ),
        (r#"{"url": 5}"#, "invalid fetch payload"),
        (r#"{"url": "not a url"}"#, "invalid url"),
        (r#"{"url": "/relative.pdf"}"#, "invalid url"),
        (
            r#"{"url": "ftp://example.com/a.pdf"}"#,
            "unsupported URL scheme",
        ),
    ];
    for (payload, expected) in cases {
        let message = permanent_message(fetch(&handler, &Inputs::new(payload)).await);
        assert!(message.contains(expected), "{payload}: {message}");
    }
}

#[tokio::test]
async fn fetch_status_mapping() {
    let server = MockServer::start(|request, _| match request.path.as_str() {
        "/missing" => Reply::status(404).body("no such document"),
        "/busy" => Reply::status(503).header("Retry-After", "7"),
        "/broken" => Reply::status(500),
        "/slow-down" => Reply::status(429),
        _ => Reply::status(408),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let handler = FetchHandler::new(fetch_settings(dir.path())).unwrap();
    let run = |path: &str| Inputs::fetch_url(&server.url(path));

    let message = permanent_message(fetch(&handler, &run("/missing")).await);
    assert!(message.contains("404"), "{message}");
    assert!(message.contains("no such document"), "{message}");

    match fetch(&handler, &run("/busy")).await {
        Err(HandlerError::RetryAfter { delay, .. }) => assert_eq!(delay, Duration::from_secs(7)),
        other => panic!("expected RetryAfter, got {other:?}"),
    }
    for path in ["/broken", "/slow-down", "/timeout"] {
        retryable_message(fetch(&handler, &run(path)).await);
    }
    assert!(temp_files(dir.path()).is_empty());
}

#[tokio::test]
async fn fetch_loopback_rejected_before_connecting() {
    let server = MockServer::always(pdf_reply(PDF)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = fetch_settings(dir.path());
    settings.policy = NOTHING_LOCAL;
    let handler = FetchHandler::new(settings).unwrap();

    for host in ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"] {
        let url = Url::parse(&format!("http://{host}:{}/doc.pdf", server.port)).unwrap();
        let message = permanent_message(fetch(&handler, &Inputs::fetch_url(&url)).await);
        assert!(message.contains("loopback"), "{host}: {message}");
    }
    assert_eq!(server.connections(), 0);
}

#[tokio::test]
async fn fetch_timeout_is_retryable() {
    let server = MockServer::always(pdf_reply(PDF).delay(Duration::from_secs(5))).await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = fetch_settings(dir.path());
    settings.timeout = Duration::from_millis(300);
    let handler = FetchHandler::new(settings).unwrap();

    let outcome = fetch(&handler, &Inputs::fetch_url(&server.url("/doc.pdf"))).await;
    let message = retryable_message(outcome);
    assert!(message.contains("timed out"), "{message}");
}

#[tokio::test]
async fn fetch_body_stall_times_out_and_cleans_up() {
    let server = MockServer::always(pdf_reply(&PDF[..10]).stall(PDF.len())).await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = fetch_settings(dir.path());
    settings.timeout = Duration::from_millis(500);
    let handler = FetchHandler::new(settings).unwrap();

    let outcome = fetch(&handler, &Inputs::fetch_url(&server.url("/doc.pdf"))).await;
    let message = retryable_message(outcome);
    assert!(message.contains("timed out"), "{message}");
    assert!(temp_files(dir.path()).is_empty());
    assert!(stored_documents(dir.path()).is_empty());
}

#[tokio::test]
async fn fetch_cancelled_mid_body_cleans_up() {
    let server = MockServer::always(pdf_reply(&PDF[..10]).stall(PDF.len())).await;
    let dir = tempfile::tempdir().unwrap();
    let handler = FetchHandler::new(fetch_settings(dir.path())).unwrap();
    let inputs = Inputs::fetch_url(&server.url("/doc.pdf"));
    inputs.cancel_after(Duration::from_millis(300));

    let outcome = fetch(&handler, &inputs).await;
    assert_eq!(outcome.unwrap_err(), HandlerError::Cancelled);
    assert!(temp_files(dir.path()).is_empty());
    assert!(stored_documents(dir.path()).is_empty());
    assert_eq!(server.requests().len(), 1);
}
