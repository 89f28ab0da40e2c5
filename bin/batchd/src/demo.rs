//! `batchd demo`: the main job, end to end, on one machine.
//!
//! It starts a small document server on loopback (standing in for the
//! sites a real batch downloads from), starts batchd on a temporary
//! embedded SQLite database, submits a `fetch` batch over HTTP with a
//! bearer token, prints progress until the batch finishes, and prints
//! where the documents went. Nothing leaves the machine.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use actix_web::{App, HttpResponse, HttpServer, web};
use anyhow::{Context, bail};
use serde_json::Value;

use crate::app;
use crate::auth::Auth;
use crate::config::{Config, HandlerName, KindSettings};

/// Maximum time the demo waits for its batch.
const DEADLINE: Duration = Duration::from_secs(300);

/// Builds a small, valid one-page PDF naming the document number.
fn pdf(number: u32) -> Vec<u8> {
    let text = format!("BT /F1 24 Tf 72 720 Td (batchd demo document {number}) Tj ET");
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_owned(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_owned(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>".to_owned(),
        format!("<< /Length {} >>\nstream\n{text}\nendstream", text.len()),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_owned(),
    ];
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (index, object) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n{object}\nendobj\n", index + 1).as_bytes());
    }
    let xref = out.len();
    out.extend_from_slice(
        format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
    );
    for offset in offsets {
        out.extend_from_slice(format!("{offset:010} 00000 n \n").as_bytes());
    }
    out.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .as_bytes(),
    );
    out
}

async fn document(number: web::Path<u32>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/pdf")
        .body(pdf(*number))
}

/// Starts the loopback document server; returns its address and handle.
fn start_document_server() -> anyhow::Result<(SocketAddr, actix_web::dev::ServerHandle)> {
    let server =
        HttpServer::new(|| App::new().route("/documents/{number}.pdf", web::get().to(document)))
            .workers(1)
            .disable_signals()
            .bind(("127.0.0.1", 0))
            .context("cannot start the demo document server on loopback")?;
    let addr = server
        .addrs()
        .first()
        .copied()
        .context("the document server bound no address")?;
    let server = server.run();
    let handle = server.handle();
    tokio::spawn(server);
    Ok((addr, handle))
}

fn demo_config(data_dir: std::path::PathBuf, secret: String) -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".into(),
        data_dir,
        jwt_secret: Some(secret),
        ..Config::default()
    };
    // The documents are served on loopback, which outbound handlers
    // reject unless configured otherwise.
    config.outbound.allow_loopback = true;
    // One demo user submits every item at once; the default item budget
    // would pace them at 500 a minute.
    config.rate_limits.disabled = true;
    let mut fetch = KindSettings::for_handler(HandlerName::Fetch);
    fetch.per_host_per_second = Some(1_000);
    config.kinds.insert("fetch".into(), fetch);
    config
}

/// Runs the demo and prints what happened.
pub async fn run(items: u32, keep: bool) -> anyhow::Result<()> {
    if items == 0 {
        bail!("--items must be at least 1");
    }
    let dir = tempfile::Builder::new()
        .prefix("batchd-demo-")
        .tempdir()
        .context("cannot create a temporary directory for the demo")?;
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );

    let (documents, document_server) = start_document_server()?;
    let running = app::start(
        demo_config(dir.path().to_path_buf(), secret.clone()),
        std::sync::Arc::default(),
    )
    .await?;
    let base = format!("http://{}", running.addr);
    println!(
        "batchd is listening on {base} with its database in {}",
        dir.path().display()
    );
    println!("a document server is serving PDFs on http://{documents}");

    let result = submit_and_watch(&base, documents, items, &secret).await;

    running.stop().await;
    document_server.stop(true).await;
    if keep {
        let path = dir.keep();
        println!("kept the data directory: {}", path.display());
    }
    result
}

async fn submit_and_watch(
    base: &str,
    documents: SocketAddr,
    items: u32,
    secret: &str,
) -> anyhow::Result<()> {
    let token = Auth::new(secret).mint("demo-user", false, 3_600)?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    let urls: Vec<Value> = (0..items)
        .map(|n| serde_json::json!({ "url": format!("http://{documents}/documents/{n}.pdf") }))
        .collect();
    let body = serde_json::json!({
        "kind": "fetch",
        "items": urls,
        "metadata": { "source": "batchd demo" },
    });

    let started = Instant::now();
    let response = client
        .post(format!("{base}/api/batches"))
        .bearer_auth(&token)
        .header("Idempotency-Key", "demo-batch-1")
        .json(&body)
        .send()
        .await
        .context("submitting the batch failed")?;
    let status = response.status();
    let created: Value = response
        .json()
        .await
        .context("the create response is not JSON")?;
    if !status.is_success() {
        bail!("the server rejected the batch with {status}: {created}");
    }
    let id = created["id"]
        .as_str()
        .context("the create response has no batch id")?
        .to_owned();
    println!("submitted batch {id} with {items} documents to fetch");

    let batch = loop {
        let batch: Value = client
            .get(format!("{base}/api/batches/{id}"))
            .bearer_auth(&token)
            .send()
            .await?
            .json()
            .await?;
        let done = batch["succeeded"].as_u64().unwrap_or(0)
            + batch["failed"].as_u64().unwrap_or(0)
            + batch["cancelled"].as_u64().unwrap_or(0);
        let percent = done * 100 / u64::from(items);
        println!(
            "  {:>10}  {done:>6}/{items} items finished ({percent:>3}%), {} failed",
            batch["status"].as_str().unwrap_or("?"),
            batch["failed"].as_u64().unwrap_or(0)
        );
        if matches!(
            batch["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ) {
            break batch;
        }
        if started.elapsed() > DEADLINE {
            bail!("the batch did not finish within {DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let elapsed = started.elapsed();

    let page: Value = client
        .get(format!("{base}/api/batches/{id}/items?limit=1"))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    println!();
    println!(
        "batch {id} {} in {:.2} s ({:.0} documents/s): {} succeeded, {} failed",
        batch["status"].as_str().unwrap_or("?"),
        elapsed.as_secs_f64(),
        f64::from(items) / elapsed.as_secs_f64(),
        batch["succeeded"],
        batch["failed"]
    );
    if let Some(first) = page["items"].get(0) {
        println!("item 0 result: {}", first["result"]);
    }
    if batch["status"] != "completed" {
        bail!("the demo batch did not complete: {batch}");
    }
    Ok(())
}
