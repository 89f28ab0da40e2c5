#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use domain::{
    Batch, BatchCounters, BatchFinished, BatchId, BatchProgress, BatchStatus, JobId, StoreError,
    UserId,
};
use queue::{JobEvent, QueueEvent};
use serde_json::Value;
use tokio::sync::Semaphore;

use super::*;

/// Batches by id; reads wait for a permit when gated.
#[derive(Default)]
struct FakeSource {
    batches: Mutex<HashMap<BatchId, Batch>>,
    gate: Option<Arc<Semaphore>>,
    /// Returns every batch whatever its owner, like a broken store would.
    ignore_owner: bool,
}

impl FakeSource {
    fn insert(&self, batch: Batch) {
        self.batches.lock().unwrap().insert(batch.id, batch);
    }
}

#[async_trait]
impl SnapshotSource for FakeSource {
    async fn batch(&self, owner: &UserId, id: BatchId) -> Result<Option<Batch>, StoreError> {
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        let batch = self.batches.lock().unwrap().get(&id).cloned();
        Ok(batch.filter(|batch| self.ignore_owner || batch.owner == *owner))
    }
}

fn user(name: &str) -> UserId {
    UserId::new(name)
}

fn batch(owner: &UserId, item_count: u64) -> Batch {
    let now = Utc::now();
    Batch {
        id: BatchId::new(),
        owner: owner.clone(),
        kind: "email".into(),
        status: BatchStatus::Pending,
        counters: BatchCounters {
            item_count,
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
        started_at: None,
        finished_at: None,
    }
}

fn progress(owner: &UserId, batch_id: BatchId, succeeded: u64, item_count: u64) -> QueueEvent {
    progress_at(owner, batch_id, succeeded, item_count, 0)
}

/// Progress carrying a batch revision, as stores since revisions send it.
fn progress_at(
    owner: &UserId,
    batch_id: BatchId,
    succeeded: u64,
    item_count: u64,
    revision: u64,
) -> QueueEvent {
    let counters = BatchCounters {
        item_count,
        succeeded,
        ..BatchCounters::default()
    };
    QueueEvent::BatchProgress(BatchProgress {
        batch_id,
        owner: owner.clone(),
        kind: "email".into(),
        status: counters.status(true),
        counters,
        correlation_id: None,
        revision,
    })
}

fn finished(owner: &UserId, batch_id: BatchId, item_count: u64, generation: u32) -> QueueEvent {
    QueueEvent::BatchFinished(BatchFinished {
        outbox_id: 1,
        batch_id,
        owner: owner.clone(),
        kind: "email".into(),
        status: BatchStatus::Completed,
        counters: BatchCounters {
            item_count,
            succeeded: item_count,
            ..BatchCounters::default()
        },
        generation,
        correlation_id: None,
        finished_at: Utc::now(),
        revision: 0,
    })
}

fn job_completed(owner: &UserId, batch_id: BatchId, seq: u32) -> QueueEvent {
    QueueEvent::JobCompleted(JobEvent {
        job_id: JobId(i64::from(seq) + 1),
        batch_id,
        owner: owner.clone(),
        kind: "email".into(),
        seq,
        attempt: 1,
        progress: None,
        error: None,
        run_at: None,
        correlation_id: None,
    })
}

fn hub_with(config: HubConfig, source: FakeSource) -> (Arc<Hub>, Arc<FakeSource>) {
    let source = Arc::new(source);
    let hub = Arc::new(Hub::new(config, source.clone()).unwrap());
    (hub, source)
}

fn hub() -> (Arc<Hub>, Arc<FakeSource>) {
    hub_with(HubConfig::default(), FakeSource::default())
}

/// Collects every frame that is ready within a short wait, as JSON.
async fn drain(connection: &Connection) -> Vec<Value> {
    let mut frames = Vec::new();
    while let Ok(Some(outgoing)) =
        tokio::time::timeout(Duration::from_millis(5), connection.next_outgoing()).await
    {
        match outgoing {
            Outgoing::Text(text) => frames.push(serde_json::from_str(&text).unwrap()),
            Outgoing::Close(cause) => frames.push(serde_json::json!({ "close": cause.code() })),
        }
    }
    frames
}

fn types(frames: &[Value]) -> Vec<&str> {
    frames
        .iter()
        .map(|frame| frame["type"].as_str().unwrap_or("close"))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn other_users_events_never_arrive() {
    let (hub, source) = hub();
    let alice = user("alice");
    let bob = user("bob");
    let bobs_batch = batch(&bob, 3);
    source.insert(bobs_batch.clone());

    let alice_connection = hub.connect(alice.clone());
    let bob_connection = hub.connect(bob.clone());
    alice_connection
        .handle_text(r#"{"type":"subscribe","all":true}"#)
        .await;
    alice_connection
        .handle_text(&format!(
            r#"{{"type":"subscribe","batchId":"{}"}}"#,
            bobs_batch.id
        ))
        .await;
    bob_connection
        .handle_text(r#"{"type":"subscribe","all":true}"#)
        .await;

    hub.publish(&job_completed(&bob, bobs_batch.id, 0));
    hub.publish(&progress(&bob, bobs_batch.id, 1, 3));
    hub.publish(&finished(&bob, bobs_batch.id, 3, 0));

    let alice_frames = drain(&alice_connection).await;
    assert_eq!(types(&alice_frames), ["error"]);
    assert_eq!(alice_frames[0]["code"], "BATCH_NOT_FOUND");
    assert_eq!(alice_frames[0]["batchId"], bobs_batch.id.to_string());

    let bob_frames = drain(&bob_connection).await;
    assert_eq!(types(&bob_frames), ["job.completed", "batch.finished"]);
    assert!(bob_frames.iter().all(|frame| frame["userId"] == "bob"));
}

#[tokio::test(start_paused = true)]
async fn foreign_snapshot_from_source_rejected() {
    let source = FakeSource {
        ignore_owner: true,
        ..FakeSource::default()
    };
    let (hub, source) = hub_with(HubConfig::default(), source);
    let bobs_batch = batch(&user("bob"), 3);
    source.insert(bobs_batch.clone());

    let connection = hub.connect(user("alice"));
    connection
        .handle_text(&format!(
            r#"{{"type":"subscribe","batchId":"{}"}}"#,
            bobs_batch.id
        ))
        .await;

    let frames = drain(&connection).await;
    assert_eq!(types(&frames), ["error"]);
    assert_eq!(frames[0]["code"], "BATCH_NOT_FOUND");
}

#[tokio::test(start_paused = true)]
async fn snapshot_precedes_updates() {
    let gate = Arc::new(Semaphore::new(0));
    let source = FakeSource {
        gate: Some(gate.clone()),
        ..FakeSource::default()
    };
    let (hub, source) = hub_with(HubConfig::default(), source);
    let alice = user("alice");
    let alices_batch = batch(&alice, 4);
    source.insert(alices_batch.clone());

    let connection = Arc::new(hub.connect(alice.clone()));
    let subscriber = connection.clone();
    let subscribe = format!(r#"{{"type":"subscribe","batchId":"{}"}}"#, alices_batch.id);
    let task = tokio::spawn(async move { subscriber.handle_text(&subscribe).await });
    tokio::time::sleep(Duration::from_millis(1)).await;

    // Published while the snapshot is still being read.
    hub.publish(&job_completed(&alice, alices_batch.id, 0));
    hub.publish(&progress(&alice, alices_batch.id, 1, 4));
    assert!(drain(&connection).await.is_empty());

    gate.add_permits(1);
    task.await.unwrap();

    let frames = drain(&connection).await;
    assert_eq!(
        types(&frames),
        ["batch.snapshot", "job.completed", "batch.progress"]
    );
    assert_eq!(frames[0]["batchId"], alices_batch.id.to_string());
    assert_eq!(frames[0]["stage"], "pending");
    assert_eq!(frames[0]["details"]["liveStats"]["total"], 4);
    assert_eq!(frames[2]["percentage"], 25);
}

#[tokio::test(start_paused = true)]
async fn progress_is_coalesced_per_batch() {
    let (hub, _source) = hub();
    let alice = user("alice");
    let batch_id = BatchId::new();
    let connection = hub.connect(alice.clone());
    connection
        .handle_text(r#"{"type":"subscribe","all":true}"#)
        .await;

    // A burst: only the latest state is sent.
    for succeeded in 1..=100 {
        hub.publish(&progress(&alice, batch_id, succeeded, 1000));
    }
    let frames = drain(&connection).await;
    assert_eq!(types(&frames), ["batch.progress"]);
    assert_eq!(frames[0]["details"]["liveStats"]["succeeded"], 100);

    // A steady stream over two seconds: at most 4 per second.
    let mut received = Vec::new();
    for step in 0..40u64 {
        hub.publish(&progress(&alice, batch_id, 101 + step, 1000));
        tokio::time::sleep(Duration::from_millis(50)).await;
        received.extend(drain(&connection).await);
    }
    received.extend(drain(&connection).await);
    assert!(
        (7..=9).contains(&received.len()),
        "received {} progress messages in 2 s",
        received.len()
    );
    let last = received.last().unwrap();
    assert_eq!(last["details"]["liveStats"]["succeeded"], 140);
}

#[tokio::test(start_paused = true)]
async fn finished_always_delivered_last() {
    let (hub, _source) = hub();
    let alice = user("alice");
    let batch_id = BatchId::new();
    let connection = hub.connect(alice.clone());
    connection
        .handle_text(r#"{"type":"subscribe","all":true}"#)
        .await;

    hub.publish(&progress(&alice, batch_id, 1, 3));
    assert_eq!(types(&drain(&connection).await), ["batch.progress"]);

    // Waiting behind the interval when the batch finishes.
    hub.publish(&progress(&alice, batch_id, 2, 3));
    hub.publish(&progress(&alice, batch_id, 3, 3));
    hub.publish(&finished(&alice, batch_id, 3, 0));
    // A late terminal progress and a repeated finish of the same generation.
    hub.publish(&progress(&alice, batch_id, 3, 3));
    hub.publish(&finished(&alice, batch_id, 3, 0));
    tokio::time::sleep(Duration::from_secs(1)).await;

    let frames = drain(&connection).await;
    assert_eq!(types(&frames), ["batch.finished"]);
    assert_eq!(frames[0]["status"], "completed");
    assert_eq!(frames[0]["stats"]["succeeded"], 3);

    // A retry reopens the batch under the next generation.
    hub.publish(&progress(&alice, batch_id, 2, 3));
    hub.publish(&finished(&alice, batch_id, 3, 1));
    let frames = drain(&connection).await;
    assert_eq!(types(&frames), ["batch.finished"]);
    assert_eq!(frames[0]["generation"], 1);
}

#[tokio::test(start_paused = true)]
async fn older_relayed_progress_is_dropped() {
    let (hub, _source) = hub();
    let alice = user("alice");
    let batch_id = BatchId::new();
    let connection = hub.connect(alice.clone());
    connection
        .handle_text(r#"{"type":"subscribe","all":true}"#)
        .await;

    hub.publish(&progress_at(&alice, batch_id, 5, 10, 5));
    assert_eq!(types(&drain(&connection).await), ["batch.progress"]);

    // Relayed from a slower process: committed before what was just sent.
    hub.publish(&progress_at(&alice, batch_id, 3, 10, 3));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        drain(&connection).await.is_empty(),
        "progress never goes back"
    );

    hub.publish(&progress_at(&alice, batch_id, 9, 10, 9));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let frames = drain(&connection).await;
    assert_eq!(types(&frames), ["batch.progress"]);
    assert_eq!(frames[0]["details"]["liveStats"]["succeeded"], 9);

    // The finishing commit's own progress and its finish share revision 10;
    // a progress of revision 8 relayed after the finish must not reopen it.
    let mut done = finished(&alice, batch_id, 10, 0);
    if let QueueEvent::BatchFinished(finish) = &mut done {
        finish.revision = 10;
    }
    hub.publish(&progress_at(&alice, batch_id, 10, 10, 10));
    hub.publish(&done);
    hub.publish(&progress_at(&alice, batch_id, 8, 10, 8));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let frames = drain(&connection).await;
    assert_eq!(
        types(&frames),
        ["batch.finished"],
        "nothing follows the final state"
    );
}

#[tokio::test(start_paused = true)]
async fn job_result_after_finish_is_dropped() {
    let (hub, _source) = hub();
    let alice = user("alice");
    let batch_id = BatchId::new();
    let connection = hub.connect(alice.clone());
    connection
        .handle_text(r#"{"type":"subscribe","all":true}"#)
        .await;

    hub.publish(&job_completed(&alice, batch_id, 0));
    hub.publish(&finished(&alice, batch_id, 2, 0));
    hub.publish(&job_completed(&alice, batch_id, 1));
    tokio::time::sleep(Duration::from_secs(1)).await;

    let frames = drain(&connection).await;
    assert_eq!(types(&frames), ["job.completed", "batch.finished"]);
}

#[tokio::test(start_paused = true)]
async fn snapshot_skipped_after_finished() {
    let (hub, source) = hub();
    let alice = user("alice");
    let mut done = batch(&alice, 2);
    done.status = BatchStatus::Completed;
    done.counters.succeeded = 2;
    source.insert(done.clone());

    let connection = hub.connect(alice.clone());
    connection
        .handle_text(r#"{"type":"subscribe","all":true}"#)
        .await;
    hub.publish(&finished(&alice, done.id, 2, 0));
    connection
        .handle_text(&format!(
            r#"{{"type":"subscribe","batchId":"{}"}}"#,
            done.id
        ))
        .await;

    let frames = drain(&connection).await;
    assert_eq!(types(&frames), ["batch.finished"]);
}

#[tokio::test(start_paused = true)]
async fn never_reading_client_is_bounded() {
    let config = HubConfig {
        buffer_capacity: 8,
        slow_client_grace: Duration::from_secs(5),
        ..HubConfig::default()
    };
    let (hub, _source) = hub_with(config, FakeSource::default());
    let alice = user("alice");
    let batch_id = BatchId::new();
    let slow = hub.connect(alice.clone());
    let fast = hub.connect(alice.clone());
    slow.handle_text(r#"{"type":"subscribe","all":true}"#).await;
    fast.handle_text(r#"{"type":"subscribe","all":true}"#).await;

    // Publishing is synchronous, so it cannot wait for the slow client.
    for seq in 0..10_000 {
        hub.publish(&job_completed(&alice, batch_id, seq));
        assert!(matches!(
            fast.next_outgoing().await,
            Some(Outgoing::Text(_))
        ));
    }
    assert_eq!(slow.buffered_messages(), 8);
    assert_eq!(slow.dropped_messages(), 10_000 - 8);
    assert!(!slow.is_closed());

    // Still full after the grace period: the slow client is closed.
    tokio::time::advance(Duration::from_secs(6)).await;
    hub.publish(&job_completed(&alice, batch_id, 10_000));
    assert!(slow.is_closed());
    assert_eq!(
        slow.next_outgoing().await,
        Some(Outgoing::Close(CloseCause::ClientTooSlow))
    );
    assert_eq!(CloseCause::ClientTooSlow.code(), 4008);
    assert_eq!(slow.next_outgoing().await, None);
    assert_eq!(slow.buffered_messages(), 0);

    // The other connection of the same user is unaffected.
    assert!(!fast.is_closed());
    assert_eq!(types(&drain(&fast).await), ["job.completed"]);
}

#[tokio::test(start_paused = true)]
async fn finished_replaces_droppable_when_full() {
    let config = HubConfig {
        buffer_capacity: 2,
        ..HubConfig::default()
    };
    let (hub, _source) = hub_with(config, FakeSource::default());
    let alice = user("alice");
    let connection = hub.connect(alice.clone());
    connection
        .handle_text(r#"{"type":"subscribe","all":true}"#)
        .await;
    let first = BatchId::new();
    let second = BatchId::new();
    let third = BatchId::new();

    hub.publish(&job_completed(&alice, first, 0));
    hub.publish(&job_completed(&alice, first, 1));
    hub.publish(&finished(&alice, first, 2, 0));
    hub.publish(&finished(&alice, second, 2, 0));
    assert!(!connection.is_closed());

    // Only must-deliver messages are buffered: a third one finds no room.
    hub.publish(&finished(&alice, third, 2, 0));
    assert!(connection.is_closed());
    assert_eq!(
        connection.next_outgoing().await,
        Some(Outgoing::Close(CloseCause::ClientTooSlow))
    );
}

#[tokio::test(start_paused = true)]
async fn invalid_client_messages_get_errors() {
    let config = HubConfig {
        max_message_bytes: 64,
        ..HubConfig::default()
    };
    let (hub, _source) = hub_with(config, FakeSource::default());
    let connection = hub.connect(user("alice"));

    connection.handle_text("not json").await;
    connection.handle_text(r#"{"type":"shutdown"}"#).await;
    connection.handle_text(r#"{"type":"subscribe"}"#).await;
    connection.handle_text(&"x".repeat(65)).await;
    connection.reject_binary();
    connection.reject_oversized();
    connection.handle_text(r#"{"type":"ping"}"#).await;

    let frames = drain(&connection).await;
    let codes: Vec<&str> = frames
        .iter()
        .map(|frame| frame["code"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        codes,
        [
            "INVALID_MESSAGE",
            "UNKNOWN_TYPE",
            "INVALID_MESSAGE",
            "MESSAGE_TOO_LARGE",
            "INVALID_MESSAGE",
            "MESSAGE_TOO_LARGE",
            ""
        ]
    );
    assert_eq!(frames[6]["type"], "pong");
    assert!(!connection.is_closed());
}

#[tokio::test(start_paused = true)]
async fn unsubscribe_stops_updates() {
    let (hub, source) = hub();
    let alice = user("alice");
    let alices_batch = batch(&alice, 3);
    source.insert(alices_batch.clone());
    let connection = hub.connect(alice.clone());

    connection
        .handle_text(&format!(
            r#"{{"type":"subscribe","batchId":"{}"}}"#,
            alices_batch.id
        ))
        .await;
    hub.publish(&job_completed(&alice, alices_batch.id, 0));
    hub.publish(&job_completed(&alice, BatchId::new(), 0));
    assert_eq!(
        types(&drain(&connection).await),
        ["batch.snapshot", "job.completed"]
    );

    hub.publish(&progress(&alice, alices_batch.id, 1, 3));
    connection
        .handle_text(&format!(
            r#"{{"type":"unsubscribe","batchId":"{}"}}"#,
            alices_batch.id
        ))
        .await;
    hub.publish(&job_completed(&alice, alices_batch.id, 1));
    assert!(drain(&connection).await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn subscription_limit_enforced() {
    let config = HubConfig {
        max_subscriptions: 1,
        ..HubConfig::default()
    };
    let (hub, source) = hub_with(config, FakeSource::default());
    let alice = user("alice");
    let first = batch(&alice, 1);
    let second = batch(&alice, 1);
    source.insert(first.clone());
    source.insert(second.clone());
    let connection = hub.connect(alice);

    for id in [first.id, second.id] {
        connection
            .handle_text(&format!(r#"{{"type":"subscribe","batchId":"{id}"}}"#))
            .await;
    }
    let frames = drain(&connection).await;
    assert_eq!(types(&frames), ["batch.snapshot", "error"]);
    assert_eq!(frames[1]["code"], "TOO_MANY_SUBSCRIPTIONS");
}

#[tokio::test(start_paused = true)]
async fn room_removed_with_last_connection() {
    let (hub, _source) = hub();
    let alice = user("alice");
    let first = hub.connect(alice.clone());
    let second = hub.connect(alice.clone());
    assert_eq!(hub.room_count(), 1);
    assert_eq!(hub.connection_count(&alice), 2);

    drop(first);
    assert_eq!(hub.connection_count(&alice), 1);
    drop(second);
    assert_eq!(hub.room_count(), 0);
    assert_eq!(hub.connection_count(&alice), 0);
}

#[tokio::test(start_paused = true)]
async fn close_all_sends_going_away() {
    let (hub, _source) = hub();
    let connection = hub.connect(user("alice"));
    hub.close_all();
    assert_eq!(
        connection.next_outgoing().await,
        Some(Outgoing::Close(CloseCause::GoingAway))
    );
}
