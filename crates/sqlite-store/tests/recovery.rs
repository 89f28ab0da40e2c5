//! What a process killed in the middle of creating a batch leaves behind:
//! the chunks it committed stay on disk, and the next open removes them,
//! so nothing half-accepted is ever visible or claimable.

#![allow(clippy::unwrap_used, reason = "tests")]

use domain::{
    AdminStore, BatchFilter, BeginOutcome, ClaimRequest, JobStore, LeaseOwner, NewBatch, NewJob,
    Scope, UserId,
};
use sqlite_store::{SqliteConfig, SqliteStore};

fn items(n: usize) -> Vec<NewJob> {
    (0..n)
        .map(|i| NewJob::from_value(&serde_json::json!({ "n": i })).unwrap())
        .collect()
}

#[tokio::test]
async fn unfinished_batch_is_removed_on_open() {
    let path = tempfile::tempdir().unwrap().keep().join("recovery.db");
    let now = chrono::Utc::now();
    let first = SqliteStore::open(SqliteConfig::new(&path)).await.unwrap();
    let mut new = NewBatch::new(UserId::new("alice"), "noop");
    new.idempotency_key = Some("upload-1".into());
    let id = new.id;
    let BeginOutcome::Started(mut staging) = first.begin_batch(new, now).await.unwrap() else {
        panic!("a fresh batch must start staging");
    };
    // Two committed chunks, then the process "dies" before the final commit.
    first
        .append_items(&mut staging, items(500), now)
        .await
        .unwrap();
    first
        .append_items(&mut staging, items(500), now)
        .await
        .unwrap();
    drop(first);

    let second = SqliteStore::open(SqliteConfig::new(&path)).await.unwrap();
    assert!(second.get_batch(&Scope::Admin, id).await.is_err());
    assert!(
        second
            .list_batches(&Scope::Admin, BatchFilter::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let claimed = second
        .claim(
            ClaimRequest {
                kind: "noop".into(),
                owner: LeaseOwner::unique("test"),
                limit: 2_000,
                lease_until: now + chrono::Duration::seconds(30),
            },
            now,
        )
        .await
        .unwrap();
    assert!(
        claimed.is_empty(),
        "no item of the unfinished batch may run"
    );
    assert!(
        second.queue_depth().await.unwrap().is_empty(),
        "its rows are gone"
    );

    // The idempotency key of the lost request is free again.
    let mut retried = NewBatch::new(UserId::new("alice"), "noop");
    retried.idempotency_key = Some("upload-1".into());
    let created = second.create_batch(retried, items(3), now).await.unwrap();
    assert!(created.created);
}
