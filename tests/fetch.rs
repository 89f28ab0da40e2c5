//! The `fetch` handler through the real binary: documents served on
//! loopback are downloaded into content-addressed storage when loopback is
//! allowed, and refused item by item, without a single request, when not.

#![allow(clippy::unwrap_used, reason = "tests")]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use serde_json::json;
use sha2::{Digest, Sha256};
use support::*;

fn document(n: u32) -> Vec<u8> {
    format!("%PDF-1.4\n% test document {n}\n%%EOF\n").into_bytes()
}

/// Serves `/doc/{n}.pdf` on loopback and counts requests.
async fn document_server() -> (
    std::net::SocketAddr,
    Arc<AtomicU32>,
    actix_web::dev::ServerHandle,
) {
    let hits = Arc::new(AtomicU32::new(0));
    let counter = web::Data::new(hits.clone());
    let server = HttpServer::new(move || {
        App::new().app_data(counter.clone()).route(
            "/doc/{n}.pdf",
            web::get().to(
                |n: web::Path<u32>, hits: web::Data<Arc<AtomicU32>>| async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    HttpResponse::Ok()
                        .content_type("application/pdf")
                        .body(document(*n))
                },
            ),
        )
    })
    .workers(1)
    .disable_signals()
    .bind(("127.0.0.1", 0))
    .unwrap();
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    tokio::spawn(server);
    (addr, hits, handle)
}

fn config(allow_loopback: bool) -> String {
    format!(
        r#"
[outbound]
allow_loopback = {allow_loopback}

[kinds.fetch]
handler = "fetch"
max_attempts = 1
per_host_per_second = 1000
"#
    )
}

async fn submit(server: &Server, token: &str, addr: std::net::SocketAddr, n: u32) -> String {
    let items: Vec<_> = (0..n)
        .map(|i| json!({ "url": format!("http://{addr}/doc/{i}.pdf") }))
        .collect();
    let (status, batch) = call(
        client()
            .post(server.url("/api/batches"))
            .bearer_auth(token)
            .json(&json!({ "kind": "fetch", "items": items })),
    )
    .await;
    assert_eq!(status, 201, "{batch}");
    batch["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn documents_are_stored_by_content_hash() {
    let (addr, hits, handle) = document_server().await;
    let server = Server::start(&config(true));
    let alice = token("alice", false);
    let id = submit(&server, &alice, addr, 20).await;

    let done = wait_terminal(&server, &alice, &id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(hits.load(Ordering::SeqCst), 20);

    for item in all_items(&server, &alice, &id).await {
        let n = item["seq"].as_u64().unwrap() as u32;
        let expected = hex::encode(Sha256::digest(document(n)));
        let result = &item["result"];
        assert_eq!(result["sha256"], expected.as_str(), "{item}");
        assert_eq!(result["bytes"], document(n).len());
        assert_eq!(result["contentType"], "application/pdf");
        let path = std::path::Path::new(result["path"].as_str().unwrap());
        let path = if path.is_absolute() {
            path.to_path_buf()
        } else {
            server.data_dir.join(path)
        };
        assert_eq!(
            std::fs::read(&path).unwrap(),
            document(n),
            "{}",
            path.display()
        );
        assert!(path.to_string_lossy().contains(&expected));
    }
    handle.stop(false).await;
}

#[tokio::test]
async fn loopback_documents_are_refused_when_not_allowed() {
    let (addr, hits, handle) = document_server().await;
    let server = Server::start(&config(false));
    let alice = token("alice", false);
    let id = submit(&server, &alice, addr, 5).await;

    let done = wait_terminal(&server, &alice, &id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["failed"], 5);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "no request may reach a refused address"
    );
    for item in all_items(&server, &alice, &id).await {
        let error = item["lastError"].as_str().unwrap().to_lowercase();
        assert!(error.contains("loopback"), "{error}");
    }
    handle.stop(false).await;
}
