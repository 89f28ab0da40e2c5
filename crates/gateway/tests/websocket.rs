//! Runs the actix adapter in a real actix-web server on 127.0.0.1 and talks
//! to it with a WebSocket client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use async_trait::async_trait;
use awc::ws::{Frame, Message};
use chrono::Utc;
use domain::{
    Batch, BatchCounters, BatchFinished, BatchId, BatchProgress, BatchStatus, JobId, StoreError,
    UserId,
};
use futures_util::{SinkExt, StreamExt};
use gateway::{HeartbeatConfig, Hub, HubConfig, SnapshotSource};
use queue::{JobEvent, QueueEvent};
use serde_json::Value;

#[derive(Default)]
struct Batches(Mutex<HashMap<BatchId, Batch>>);

#[async_trait]
impl SnapshotSource for Batches {
    async fn batch(&self, owner: &UserId, id: BatchId) -> Result<Option<Batch>, StoreError> {
        let batch = self.0.lock().unwrap().get(&id).cloned();
        Ok(batch.filter(|batch| batch.owner == *owner))
    }
}

fn batch(owner: &UserId, item_count: u64) -> Batch {
    let now = Utc::now();
    Batch {
        id: BatchId::new(),
        owner: owner.clone(),
        kind: "email".into(),
        status: BatchStatus::Processing,
        counters: BatchCounters {
            item_count,
            succeeded: 1,
            ..BatchCounters::default()
        },
        priority: 0,
        max_attempts: 3,
        config: Value::Null,
        metadata: Value::Null,
        correlation_id: None,
        idempotency_key: None,
        cancel_requested: false,
        generation: 0,
        created_at: now,
        updated_at: now,
        started_at: Some(now),
        finished_at: None,
    }
}

/// Stands in for the server's authenticated route: the user id comes from
/// the path instead of a token.
async fn connect_as(
    hub: web::Data<Arc<Hub>>,
    user: web::Path<String>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    gateway::actix::upgrade(
        hub.get_ref().clone(),
        UserId::new(user.into_inner()),
        &req,
        body,
    )
}

/// Starts an actix-web server on an ephemeral port of 127.0.0.1.
fn start_server(hub: Arc<Hub>) -> (std::net::SocketAddr, actix_web::dev::ServerHandle) {
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(hub.clone()))
            .route("/ws/{user}", web::get().to(connect_as))
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .unwrap();
    let address = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    (address, handle)
}

type Socket = actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>;

async fn open(address: std::net::SocketAddr, user: &str) -> Socket {
    let (_response, socket) = awc::Client::new()
        .ws(format!("http://{address}/ws/{user}"))
        .connect()
        .await
        .expect("websocket handshake failed");
    socket
}

async fn send(socket: &mut Socket, text: &str) {
    socket
        .send(Message::Text(text.to_owned().into()))
        .await
        .unwrap();
}

/// Reads the next text frame as JSON, skipping pings.
async fn receive(socket: &mut Socket) -> Value {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("no frame within 5 s")
            .expect("connection ended")
            .unwrap();
        match frame {
            Frame::Text(bytes) => return serde_json::from_slice(&bytes).unwrap(),
            Frame::Ping(_) | Frame::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

fn job_completed(owner: &UserId, batch_id: BatchId) -> QueueEvent {
    QueueEvent::JobCompleted(JobEvent {
        job_id: JobId(1),
        batch_id,
        owner: owner.clone(),
        kind: "email".into(),
        seq: 1,
        attempt: 1,
        progress: None,
        error: None,
        run_at: None,
        correlation_id: None,
    })
}

#[actix_web::test]
async fn websocket_delivers_own_batch_updates() {
    let alice = UserId::new("alice");
    let batches = Arc::new(Batches::default());
    let alices_batch = batch(&alice, 3);
    batches
        .0
        .lock()
        .unwrap()
        .insert(alices_batch.id, alices_batch.clone());
    let hub = Arc::new(Hub::new(HubConfig::default(), batches).unwrap());

    let (address, server_handle) = start_server(hub.clone());

    let mut alice_socket = open(address, "alice").await;
    let mut bob_socket = open(address, "bob").await;

    // Bob listens to everything he may see; the pong shows the subscribe
    // was handled.
    send(&mut bob_socket, r#"{"type":"subscribe","all":true}"#).await;
    send(&mut bob_socket, r#"{"type":"ping"}"#).await;
    assert_eq!(receive(&mut bob_socket).await["type"], "pong");

    // Alice subscribes to her batch and gets its snapshot first.
    send(
        &mut alice_socket,
        &format!(r#"{{"type":"subscribe","batchId":"{}"}}"#, alices_batch.id),
    )
    .await;
    let snapshot = receive(&mut alice_socket).await;
    assert_eq!(snapshot["type"], "batch.snapshot");
    assert_eq!(snapshot["userId"], "alice");
    assert_eq!(snapshot["batchId"], alices_batch.id.to_string());
    assert_eq!(snapshot["percentage"], 33);
    assert_eq!(snapshot["details"]["liveStats"]["currentItem"], 2);

    hub.publish(&job_completed(&alice, alices_batch.id));
    hub.publish(&QueueEvent::BatchProgress(BatchProgress {
        batch_id: alices_batch.id,
        owner: alice.clone(),
        kind: "email".into(),
        status: BatchStatus::Processing,
        counters: BatchCounters {
            item_count: 3,
            succeeded: 2,
            ..BatchCounters::default()
        },
        correlation_id: None,
        revision: 2,
    }));
    assert_eq!(receive(&mut alice_socket).await["type"], "job.completed");
    let progress = receive(&mut alice_socket).await;
    assert_eq!(progress["type"], "batch.progress");
    assert_eq!(progress["percentage"], 66);

    hub.publish(&QueueEvent::BatchFinished(BatchFinished {
        outbox_id: 7,
        batch_id: alices_batch.id,
        owner: alice.clone(),
        kind: "email".into(),
        status: BatchStatus::Completed,
        counters: BatchCounters {
            item_count: 3,
            succeeded: 3,
            ..BatchCounters::default()
        },
        generation: 0,
        correlation_id: None,
        finished_at: Utc::now(),
        revision: 3,
    }));
    let finished = receive(&mut alice_socket).await;
    assert_eq!(finished["type"], "batch.finished");
    assert_eq!(finished["status"], "completed");
    assert_eq!(finished["percentage"], 100);

    // Nothing of Alice's reached Bob: his next frame is the pong to his ping.
    send(&mut bob_socket, r#"{"type":"ping"}"#).await;
    assert_eq!(receive(&mut bob_socket).await["type"], "pong");

    // An oversized and a malformed message get errors; the connection stays.
    send(&mut alice_socket, &"x".repeat(20 * 1024)).await;
    let error = receive(&mut alice_socket).await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "MESSAGE_TOO_LARGE");
    send(&mut alice_socket, "{").await;
    assert_eq!(receive(&mut alice_socket).await["code"], "INVALID_MESSAGE");
    send(&mut alice_socket, r#"{"type":"ping"}"#).await;
    assert_eq!(receive(&mut alice_socket).await["type"], "pong");

    // The server replies to a client close, and the connection leaves the
    // hub.
    alice_socket.send(Message::Close(None)).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), alice_socket.next())
        .await
        .expect("no close reply within 5 s");
    assert!(matches!(reply, Some(Ok(Frame::Close(_)))), "got {reply:?}");
    let mut left = false;
    for _ in 0..100 {
        if hub.connection_count(&alice) == 0 {
            left = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(left, "alice's connection is still in the hub");
    assert_eq!(hub.connection_count(&UserId::new("bob")), 1);

    // Shutdown closes the remaining connections with 1001 (going away).
    hub.close_all();
    let reply = tokio::time::timeout(Duration::from_secs(5), bob_socket.next())
        .await
        .expect("no close frame within 5 s");
    match reply {
        Some(Ok(Frame::Close(Some(reason)))) => assert_eq!(u16::from(reason.code), 1001),
        other => panic!("expected a close frame, got {other:?}"),
    }

    server_handle.stop(true).await;
}

#[actix_web::test]
async fn silent_client_times_out() {
    let config = HubConfig {
        heartbeat: HeartbeatConfig {
            ping_interval: Duration::from_millis(50),
            timeout: Duration::from_millis(300),
        },
        ..HubConfig::default()
    };
    let hub = Arc::new(Hub::new(config, Arc::new(Batches::default())).unwrap());
    let (address, server_handle) = start_server(hub.clone());

    // The client reads but never sends a pong to the server's pings.
    let mut socket = open(address, "alice").await;
    let mut pings = 0;
    let close = loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("no frame within 5 s");
        match frame {
            Some(Ok(Frame::Ping(_))) => pings += 1,
            Some(Ok(Frame::Close(reason))) => break reason,
            other => panic!("expected a ping or a close frame, got {other:?}"),
        }
    };

    assert!(pings >= 1, "the server sent no ping before closing");
    let reason = close.expect("close frame without a code");
    assert_eq!(u16::from(reason.code), 4000);
    assert_eq!(reason.description.as_deref(), Some("heartbeat timed out"));
    server_handle.stop(true).await;
}
