//! The WebSocket gateway through the real binary: live progress of a
//! 1,000-item batch, isolation between users, the snapshot a late client
//! gets first, and the credentials and origins that are refused.

#![allow(clippy::unwrap_used, reason = "tests")]

mod support;

use std::time::{Duration, Instant};

use awc::ws;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::*;

const CONFIG: &str = r#"
[gateway]
allowed_origins = ["https://app.example"]

[kinds.sleep]
handler = "sleep"
concurrency = 8
"#;

type Socket = actix_codec::Framed<awc::BoxedSocket, ws::Codec>;

async fn connect(server: &Server, token: &str) -> Socket {
    let (_, socket) = awc::Client::new()
        .ws(format!("ws://{}/ws", server.addr))
        .bearer_auth(token)
        .connect()
        .await
        .unwrap();
    socket
}

async fn send(socket: &mut Socket, message: Value) {
    socket
        .send(ws::Message::Text(message.to_string().into()))
        .await
        .unwrap();
}

/// Reads the next JSON text message, or `None` when `wait` passes first.
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

async fn create(server: &Server, token: &str, items: usize, ms: u64) -> String {
    let items: Vec<Value> = (0..items).map(|_| json!({ "ms": ms })).collect();
    let (status, batch) = call(
        client()
            .post(server.url("/api/batches"))
            .bearer_auth(token)
            .json(&json!({ "kind": "sleep", "items": items })),
    )
    .await;
    assert_eq!(status, 201, "{batch}");
    batch["id"].as_str().unwrap().to_owned()
}

#[actix_web::test]
async fn progress_of_a_large_batch_arrives_in_order_and_only_to_its_owner() {
    let server = Server::start(CONFIG);
    let alice = token("alice", false);
    let mut alice_socket = connect(&server, &alice).await;
    let mut bob_socket = connect(&server, &token("bob", false)).await;
    send(&mut bob_socket, json!({ "type": "subscribe", "all": true })).await;

    let id = create(&server, &alice, 1_000, 5).await;
    send(
        &mut alice_socket,
        json!({ "type": "subscribe", "batchId": id }),
    )
    .await;

    let first = next_json(&mut alice_socket, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(first["type"], "batch.snapshot", "{first}");
    let mut last_percentage = first["percentage"].as_u64().unwrap();
    let mut progress_messages = 0;
    let finished = loop {
        let message = next_json(&mut alice_socket, Duration::from_secs(60))
            .await
            .expect("the batch finished within 60 s");
        match message["type"].as_str().unwrap() {
            "batch.progress" => {
                let percentage = message["percentage"].as_u64().unwrap();
                assert!(
                    percentage >= last_percentage,
                    "progress went back from {last_percentage} to {percentage}"
                );
                assert_eq!(message["batchId"], id.as_str());
                last_percentage = percentage;
                progress_messages += 1;
            }
            "batch.finished" => break message,
            _ => {}
        }
    };
    assert_eq!(finished["status"], "completed", "{finished}");
    assert_eq!(finished["percentage"], 100);
    assert_eq!(finished["stats"]["succeeded"], 1_000);
    assert_eq!(finished["stats"]["total"], 1_000);
    assert!(
        progress_messages >= 1,
        "progress was reported while the batch ran"
    );
    assert!(
        next_json(&mut alice_socket, Duration::from_millis(300))
            .await
            .is_none(),
        "nothing follows the final state"
    );

    // Bob subscribed to everything of his own and saw nothing of Alice's.
    send(&mut bob_socket, json!({ "type": "ping" })).await;
    let only = next_json(&mut bob_socket, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(only["type"], "pong", "bob received {only}");
    // Subscribing to Alice's batch by id gives him an error, not her data.
    send(
        &mut bob_socket,
        json!({ "type": "subscribe", "batchId": id }),
    )
    .await;
    let refused = next_json(&mut bob_socket, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        (refused["type"].as_str(), refused["code"].as_str()),
        (Some("error"), Some("BATCH_NOT_FOUND")),
        "{refused}"
    );
}

#[actix_web::test]
async fn late_client_gets_the_current_snapshot_first() {
    let server = Server::start(CONFIG);
    let alice = token("alice", false);
    let id = create(&server, &alice, 400, 20).await;
    tokio::time::sleep(Duration::from_millis(400)).await;

    let mut socket = connect(&server, &alice).await;
    send(&mut socket, json!({ "type": "subscribe", "batchId": id })).await;
    let snapshot = next_json(&mut socket, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(snapshot["type"], "batch.snapshot", "{snapshot}");
    let done = snapshot["details"]["liveStats"]["processed"]
        .as_u64()
        .unwrap();
    assert!(
        done > 0 && done < 400,
        "the snapshot shows the batch mid-way: {snapshot}"
    );
    assert_eq!(snapshot["details"]["liveStats"]["total"], 400);

    send(&mut socket, json!({ "type": "subscribe", "batchId": 5 })).await;
    let error = next_json(&mut socket, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        error["type"], "error",
        "a malformed message gets an error: {error}"
    );
}

#[actix_web::test]
async fn refused_credentials_and_origins_never_upgrade() {
    let server = Server::start(CONFIG);
    let alice = token("alice", false);
    let url = format!("ws://{}/ws", server.addr);

    let status = |result: Result<_, awc::error::WsClientError>| match result {
        Err(awc::error::WsClientError::InvalidResponseStatus(status)) => status.as_u16(),
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => 101,
    };
    let no_token = awc::Client::new().ws(&url).connect().await.map(|_| ());
    assert_eq!(status(no_token), 401);
    let bad_token = awc::Client::new()
        .ws(&url)
        .bearer_auth("not.a.token")
        .connect()
        .await
        .map(|_| ());
    assert_eq!(status(bad_token), 401);
    let wrong_origin = awc::Client::new()
        .ws(&url)
        .origin("https://evil.example")
        .bearer_auth(&alice)
        .connect()
        .await
        .map(|_| ());
    assert_eq!(status(wrong_origin), 403);
    let in_query = awc::Client::new()
        .ws(format!("{url}?token={alice}"))
        .connect()
        .await
        .map(|_| ());
    assert_eq!(status(in_query), 400);

    // A browser: the right origin and a single-use ticket.
    let (_, ticket) = call(
        client()
            .post(server.url("/api/ws/tickets"))
            .bearer_auth(&alice),
    )
    .await;
    let ticket = ticket["ticket"].as_str().unwrap().to_owned();
    let first = awc::Client::new()
        .ws(format!("{url}?ticket={ticket}"))
        .origin("https://app.example")
        .connect()
        .await
        .map(|_| ());
    assert_eq!(status(first), 101);
    let again = awc::Client::new()
        .ws(format!("{url}?ticket={ticket}"))
        .origin("https://app.example")
        .connect()
        .await
        .map(|_| ());
    assert_eq!(status(again), 401, "a ticket works once");

    // A browser offering the token as a subprotocol.
    let (response, _) = awc::Client::new()
        .ws(&url)
        .origin("https://app.example")
        .protocols(["batchd", &format!("bearer.{alice}")])
        .connect()
        .await
        .unwrap();
    assert_eq!(
        response.headers().get("sec-websocket-protocol").unwrap(),
        "batchd"
    );
}

#[actix_web::test]
async fn a_client_that_never_reads_does_not_delay_the_batch() {
    let server = Server::start(CONFIG);
    let alice = token("alice", false);
    let mut idle = connect(&server, &alice).await;
    send(&mut idle, json!({ "type": "subscribe", "all": true })).await;
    // `idle` is never read from again.

    let started = Instant::now();
    let id = create(&server, &alice, 2_000, 1).await;
    let done = wait_terminal(&server, &alice, &id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "completed");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    drop(idle);
}
