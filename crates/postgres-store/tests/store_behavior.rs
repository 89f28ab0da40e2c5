//! PostgreSQL store behavior that the shared conformance suite does not
//! cover: wake-up signals sent with committed writes, deletion of staging
//! batches whose writer went quiet, the attempt history cap, and
//! idempotent creation racing across processes.

#![allow(
    clippy::unwrap_used,
    reason = "test support: a failed unwrap is a failed test"
)]

use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::{
    AdminStore, AttemptOutcome, BatchId, BeginOutcome, ClaimRequest, ClaimedJob, FailureKind,
    JobStore, LeaseOwner, NewBatch, NewJob, OutcomeKind, Scope, StoreError, UserId,
};
use postgres_store::{PgConfig, PgStore, Signal, testing};
use tokio::sync::broadcast;

fn now_ms() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap()
}

fn items(n: usize) -> Vec<NewJob> {
    (0..n)
        .map(|i| NewJob::from_value(&serde_json::json!({ "n": i })).unwrap())
        .collect()
}

fn alice() -> UserId {
    UserId::new("alice")
}

/// Returns the next signal other than a listener resync.
async fn next_signal(receiver: &mut broadcast::Receiver<Signal>) -> Signal {
    loop {
        let signal = tokio::time::timeout(Duration::from_secs(10), receiver.recv())
            .await
            .expect("a signal within 10 s")
            .expect("the signal channel stays open");
        if signal != Signal::Resync {
            return signal;
        }
    }
}

async fn claim_one(store: &PgStore, kind: &str, now: DateTime<Utc>) -> ClaimedJob {
    let mut claimed = store
        .claim(
            ClaimRequest {
                kind: kind.into(),
                owner: LeaseOwner::unique("test"),
                limit: 1,
                lease_until: now + chrono::Duration::seconds(30),
            },
            now,
        )
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1, "one {kind} job is claimable");
    claimed.remove(0)
}

#[tokio::test]
async fn committed_writes_wake_other_processes() {
    let config = testing::isolated_config();
    let writer = PgStore::connect(config.clone()).await.unwrap();
    let listener = PgStore::connect(config).await.unwrap();
    let mut signals = listener.signals();
    assert_eq!(signals.recv().await.unwrap(), Signal::Resync);
    let now = now_ms();

    // A write that fails commits nothing and sends no signal.
    let mut orphan = NewBatch::new(alice(), "never");
    orphan.depends_on = vec![BatchId::new()];
    assert!(writer.create_batch(orphan, items(1), now).await.is_err());

    writer
        .create_batch(NewBatch::new(alice(), "fetch"), items(2), now)
        .await
        .unwrap();
    let woken = Signal::Wake {
        kinds: vec!["fetch".to_owned()],
    };
    assert_eq!(next_signal(&mut signals).await, woken);

    // A retry becomes runnable when promoted, in another process.
    let job = claim_one(&writer, "fetch", now).await;
    let retry = AttemptOutcome {
        lease: job.lease.clone(),
        started_at: now,
        duration_ms: 1,
        kind: OutcomeKind::Retry {
            error: "upstream returned 503".into(),
            failure: FailureKind::Error,
            run_at: now,
            counts_attempt: true,
        },
    };
    writer.record_outcomes(vec![retry], now).await.unwrap();
    assert_eq!(listener.promote_due(now).await.unwrap().promoted, 1);
    assert_eq!(next_signal(&mut signals).await, woken);

    writer.set_kind_paused("fetch", true, now).await.unwrap();
    assert_eq!(next_signal(&mut signals).await, Signal::KindControls);
}

/// Ids of the staging batches in `config`'s schema, read directly.
async fn staging_ids(config: &PgConfig) -> Vec<String> {
    let mut pg_config: tokio_postgres::Config = config.url.parse().unwrap();
    let schema = config.schema.as_deref().unwrap();
    pg_config.options(format!("-c search_path={schema}"));
    let (client, connection) = pg_config.connect(tokio_postgres::NoTls).await.unwrap();
    let driver = tokio::spawn(connection);
    let rows = client
        .query("SELECT id FROM batches WHERE NOT accepted ORDER BY id", &[])
        .await
        .unwrap();
    drop(client);
    driver.abort();
    rows.iter().map(|row| row.get(0)).collect()
}

async fn begin(store: &PgStore, kind: &str, now: DateTime<Utc>) -> domain::StagingBatch {
    match store
        .begin_batch(NewBatch::new(alice(), kind), now)
        .await
        .unwrap()
    {
        BeginOutcome::Started(staging) => staging,
        BeginOutcome::Existing(batch) => panic!("a fresh batch matched {}", batch.id),
    }
}

#[tokio::test]
async fn reaper_deletes_quiet_staging_batches() {
    let config = testing::isolated_config();
    let store = PgStore::connect(config.clone()).await.unwrap();
    let quiet_after = chrono::Duration::from_std(config.abandon_staging_after).unwrap();
    let minute = chrono::Duration::minutes(1);
    let t0 = now_ms();

    let mut quiet = begin(&store, "noop", t0).await;
    store.append_items(&mut quiet, items(3), t0).await.unwrap();
    // Appending again moves a batch's quiet period forward.
    let mut busy = begin(&store, "noop", t0).await;
    let busy_append = t0 + minute + chrono::Duration::seconds(10);
    store
        .append_items(&mut busy, items(3), busy_append)
        .await
        .unwrap();

    let first_sweep = t0 + quiet_after + minute;
    store.reap_expired_leases(first_sweep).await.unwrap();
    assert_eq!(staging_ids(&config).await, vec![busy.id.to_string()]);

    // Within a minute of the last sweep the reaper does not sweep again,
    // though `busy` has been quiet too long by now.
    let too_soon = busy_append + quiet_after + chrono::Duration::seconds(5);
    assert!(too_soon - first_sweep < minute);
    store.reap_expired_leases(too_soon).await.unwrap();
    assert_eq!(staging_ids(&config).await, vec![busy.id.to_string()]);

    store
        .reap_expired_leases(first_sweep + minute)
        .await
        .unwrap();
    assert!(staging_ids(&config).await.is_empty());

    let late_commit = store.commit_batch(quiet, first_sweep).await;
    assert!(
        matches!(late_commit, Err(StoreError::NotFound { .. })),
        "{late_commit:?}"
    );
}

#[tokio::test]
async fn attempt_history_keeps_newest_records() {
    let store = PgStore::connect(testing::isolated_config()).await.unwrap();
    let now = now_ms();
    store
        .create_batch(NewBatch::new(alice(), "flaky"), items(1), now)
        .await
        .unwrap();

    let failures = domain::MAX_ATTEMPT_HISTORY + 2;
    let mut job_id = None;
    for failure in 0..failures {
        let job = claim_one(&store, "flaky", now).await;
        job_id = Some(job.id);
        // Not counted, so the job never runs out of attempts.
        let retry = AttemptOutcome {
            lease: job.lease.clone(),
            started_at: now,
            duration_ms: 1,
            kind: OutcomeKind::Retry {
                error: format!("failure {failure}"),
                failure: FailureKind::RetryAfter,
                run_at: now,
                counts_attempt: false,
            },
        };
        store.record_outcomes(vec![retry], now).await.unwrap();
        store.promote_due(now).await.unwrap();
    }

    let job = store.get_job(&Scope::Admin, job_id.unwrap()).await.unwrap();
    let messages: Vec<&str> = job
        .errors
        .iter()
        .map(|record| record.error.as_str())
        .collect();
    let expected: Vec<String> = (2..failures)
        .map(|failure| format!("failure {failure}"))
        .collect();
    assert_eq!(messages, expected);
    let newest = format!("failure {}", failures - 1);
    assert_eq!(job.last_error.as_deref(), Some(newest.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_creates_race_to_one_batch() {
    let config = testing::isolated_config();
    let first = PgStore::connect(config.clone()).await.unwrap();
    let second = PgStore::connect(config).await.unwrap();
    let now = now_ms();
    let keyed = |key: &str| {
        let mut new = NewBatch::new(alice(), "noop");
        new.idempotency_key = Some(key.to_owned());
        new.request_digest = Some("digest".to_owned());
        new
    };

    for round in 0..10 {
        let key = format!("key-{round}");
        let (a, b) = tokio::join!(
            first.create_batch(keyed(&key), items(200), now),
            second.create_batch(keyed(&key), items(200), now),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.batch.id, b.batch.id, "round {round}");
        assert!(a.created != b.created, "round {round}: exactly one creates");
        assert_eq!(a.batch.counters.item_count, 200);
        assert_eq!(b.batch.counters.item_count, 200);
    }

    // A key whose batch is still streaming is reported as in progress.
    let mut streaming = keyed("streaming");
    streaming.request_digest = None;
    let BeginOutcome::Started(_) = first.begin_batch(streaming, now).await.unwrap() else {
        panic!("a fresh key must start staging");
    };
    let repeat = second.create_batch(keyed("streaming"), items(1), now).await;
    assert!(
        matches!(repeat, Err(StoreError::IdempotencyInProgress { .. })),
        "{repeat:?}"
    );
}
