//! Feature flags on the local PostgreSQL: the shared flag-store
//! conformance suite on a fresh schema per test, then checks that need
//! several processes, stood in for by several stores on one schema.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test"
)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use domain::{
    AuditFilter, FeatureFlag, FlagAction, FlagChange, FlagName, FlagPatch, FlagStore,
    FlagStoreError, NewFlag, Rollout, UserId,
};
use postgres_store::{PgConfig, PgStore, Signal, testing};
use tokio::sync::broadcast;

/// Drops schemas that earlier runs left behind, once per test binary.
async fn drop_stale_schemas_once() {
    static DONE: AtomicBool = AtomicBool::new(false);
    if !DONE.swap(true, Ordering::SeqCst)
        && let Err(error) = testing::drop_stale_schemas().await
    {
        // Another test run may be dropping the same schemas, and the next
        // run tries again.
        eprintln!("dropping stale test schemas failed: {error}");
    }
}

async fn connect(config: PgConfig) -> PgStore {
    PgStore::connect(config)
        .await
        .expect("connect to the test PostgreSQL; set BATCHD_TEST_DATABASE_URL if it is not local")
}

async fn fresh_store() -> PgStore {
    drop_stale_schemas_once().await;
    connect(testing::isolated_config()).await
}

/// Two stores on one fresh schema, as two processes would have.
async fn store_pair() -> (PgStore, PgStore) {
    drop_stale_schemas_once().await;
    let config = testing::isolated_config();
    (connect(config.clone()).await, connect(config).await)
}

store_conformance::flag_conformance_tests!(fresh: fresh_store().await, pair: store_pair().await);

fn name(text: &str) -> FlagName {
    FlagName::parse(text).expect("a valid flag name")
}

fn admin() -> UserId {
    UserId::new("admin-1")
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 2, 3, 4, 5).unwrap()
}

fn schema_of(store: &PgStore) -> String {
    store
        .config()
        .schema
        .clone()
        .expect("test stores have a schema")
}

/// Waits for the next signal other than the listener's resync.
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

/// Lists every audit entry of `flag`, oldest first.
async fn audit_oldest_first(store: &PgStore, flag: &FlagName) -> Vec<domain::FlagAuditEntry> {
    let page = store
        .list_flag_audit(
            flag,
            AuditFilter {
                cursor: None,
                limit: domain::MAX_AUDIT_PAGE,
            },
        )
        .await
        .unwrap();
    assert_eq!(page.next_cursor, None, "the test writes less than a page");
    page.items.into_iter().rev().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_apply_once_per_version() {
    const ROUNDS: u64 = 20;
    const WRITERS: u64 = 4;

    let (first, second) = store_pair().await;
    let flag = name("checkout.v2");
    first
        .create_flag(NewFlag::new(flag.clone()), &admin(), t0())
        .await
        .unwrap();

    let mut winners: Vec<FlagChange> = Vec::new();
    for version in 1..=ROUNDS {
        // Every writer of a round expects the same version; the writers
        // alternate between the two stores.
        let mut tasks = Vec::new();
        for writer in 0..WRITERS {
            let store = if writer % 2 == 0 {
                first.clone()
            } else {
                second.clone()
            };
            // Distinct in every round and for every writer, so no patch
            // is a no-op.
            let rollout = i64::try_from(writer * 25 + version).unwrap();
            let patch = FlagPatch {
                rollout: Some(Rollout::new(rollout).unwrap()),
                expected_version: Some(version),
                ..FlagPatch::default()
            };
            let flag = flag.clone();
            let now = t0() + chrono::Duration::seconds(i64::try_from(version).unwrap());
            tasks.push(tokio::spawn(async move {
                let actor = UserId::new(format!("writer-{writer}"));
                store.update_flag(&flag, patch, &actor, now).await
            }));
        }

        let mut applied = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                Ok(change) => applied.push(change),
                Err(FlagStoreError::VersionConflict {
                    expected, actual, ..
                }) => {
                    assert_eq!(expected, version, "round {version}");
                    assert_eq!(actual, version + 1, "round {version}");
                }
                Err(other) => panic!("round {version}: unexpected error {other}"),
            }
        }
        assert_eq!(applied.len(), 1, "round {version}: one writer wins");
        let change = applied.remove(0);
        assert_eq!(change.action, Some(FlagAction::Updated));
        assert_eq!(change.flag.version, version + 1);
        winners.push(change);
    }

    let revisions: Vec<u64> = winners.iter().map(|change| change.revision).collect();
    let expected: Vec<u64> = (3..=ROUNDS + 2).collect();
    assert_eq!(
        revisions, expected,
        "revisions after the seed (1) and the create (2) grow by 1 per change"
    );
    assert_eq!(first.flag_revision().await.unwrap(), ROUNDS + 2);
    assert_eq!(second.flag_revision().await.unwrap(), ROUNDS + 2);
    let last = &winners[winners.len() - 1].flag;
    assert_eq!(&second.get_flag(&flag).await.unwrap(), last);

    let audit = audit_oldest_first(&second, &flag).await;
    assert_eq!(
        audit.len() as u64,
        ROUNDS + 1,
        "one entry per applied change"
    );
    assert_eq!(audit[0].action, FlagAction::Created);
    let audit_revisions: Vec<u64> = audit.iter().map(|entry| entry.revision).collect();
    let expected: Vec<u64> = (2..=ROUNDS + 2).collect();
    assert_eq!(audit_revisions, expected);
    for (entry, winner) in audit[1..].iter().zip(&winners) {
        assert_eq!(entry.action, FlagAction::Updated);
        let after: FeatureFlag = serde_json::from_value(entry.after.clone().unwrap()).unwrap();
        assert_eq!(&after, &winner.flag, "revision {}", entry.revision);
    }
    for pair in audit.windows(2) {
        assert_eq!(
            pair[0].after, pair[1].before,
            "each change starts from the previous one (revision {})",
            pair[1].revision
        );
    }

    testing::drop_schema(&schema_of(&first)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_of_one_name() {
    let (first, second) = store_pair().await;
    let flag = name("new.ui");
    let actor = admin();

    let (from_first, from_second) = tokio::join!(
        first.create_flag(NewFlag::new(flag.clone()), &actor, t0()),
        second.create_flag(NewFlag::new(flag.clone()), &actor, t0()),
    );
    let outcomes = [from_first, from_second];
    let created = outcomes.iter().filter(|outcome| outcome.is_ok()).count();
    assert_eq!(created, 1, "{outcomes:?}");
    let rejected = outcomes
        .iter()
        .filter(|outcome| matches!(outcome, Err(FlagStoreError::AlreadyExists { .. })))
        .count();
    assert_eq!(rejected, 1, "{outcomes:?}");

    assert_eq!(first.flag_revision().await.unwrap(), 2);
    assert_eq!(audit_oldest_first(&first, &flag).await.len(), 1);

    testing::drop_schema(&schema_of(&first)).await.unwrap();
}

#[tokio::test]
async fn flag_change_signals_other_store() {
    let (listener, writer) = store_pair().await;
    let mut signals = listener.signals();
    // The resync comes once the listening connection is subscribed, so
    // nothing sent after it can be missed.
    let first = tokio::time::timeout(Duration::from_secs(10), signals.recv())
        .await
        .expect("the listener starts within 10 s")
        .unwrap();
    assert_eq!(first, Signal::Resync);

    let flag = name("checkout.v2");
    let created = writer
        .create_flag(NewFlag::new(flag.clone()), &admin(), t0())
        .await
        .unwrap();
    assert_eq!(
        next_signal(&mut signals).await,
        Signal::FlagsChanged {
            revision: created.revision
        }
    );

    // Rejected writes and a patch that changes nothing send no signal, so
    // the next one is the deletion's.
    let conflict = FlagPatch {
        enabled: Some(true),
        expected_version: Some(9),
        ..FlagPatch::default()
    };
    let error = writer
        .update_flag(&flag, conflict, &admin(), t0())
        .await
        .unwrap_err();
    assert!(
        matches!(error, FlagStoreError::VersionConflict { .. }),
        "{error}"
    );
    let unchanged = writer
        .update_flag(&flag, FlagPatch::default(), &admin(), t0())
        .await
        .unwrap();
    assert_eq!(unchanged.action, None);
    let error = writer
        .create_flag(NewFlag::new(flag.clone()), &admin(), t0())
        .await
        .unwrap_err();
    assert!(
        matches!(error, FlagStoreError::AlreadyExists { .. }),
        "{error}"
    );

    let deleted = writer
        .delete_flag(&flag, Some(1), &admin(), t0())
        .await
        .unwrap();
    assert_eq!(deleted.revision, created.revision + 1);
    assert_eq!(
        next_signal(&mut signals).await,
        Signal::FlagsChanged {
            revision: deleted.revision
        }
    );

    testing::drop_schema(&schema_of(&listener)).await.unwrap();
}

/// Waits until some session waits for a lock that session `pid` holds.
async fn wait_until_blocking(client: &tokio_postgres::Client, pid: i32) {
    for _ in 0..1_000 {
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY (pg_blocking_pids(pid))",
                &[&pid],
            )
            .await
            .unwrap();
        if row.get::<_, i64>(0) > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no session waited for the locks of backend {pid} within 10 s");
}

#[tokio::test]
async fn deadlocked_flag_write_is_retried() {
    let store = fresh_store().await;
    let schema = schema_of(&store);
    let flag = name("checkout.v2");
    store
        .create_flag(NewFlag::new(flag.clone()), &admin(), t0())
        .await
        .unwrap();

    // A session outside the store locks the flag row, then the revision
    // row: the reverse of the store's order. Its long deadlock timeout
    // makes PostgreSQL pick the store's transaction as the victim.
    let (other, connection) =
        tokio_postgres::connect(&testing::database_url(), tokio_postgres::NoTls)
            .await
            .unwrap();
    let driver = tokio::spawn(connection);
    other
        .batch_execute(&format!(
            "SET search_path = {schema};
             SET deadlock_timeout = '30s';
             BEGIN;
             SELECT 1 FROM feature_flags WHERE name = 'checkout.v2' FOR UPDATE;"
        ))
        .await
        .unwrap();
    let other_pid: i32 = other
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);

    let update = tokio::spawn({
        let store = store.clone();
        let flag = flag.clone();
        async move {
            let patch = FlagPatch {
                enabled: Some(true),
                expected_version: Some(1),
                ..FlagPatch::default()
            };
            store.update_flag(&flag, patch, &admin(), t0()).await
        }
    });

    // The store has now locked the revision row and waits for the flag row.
    wait_until_blocking(&other, other_pid).await;
    // Closing the cycle: after the server's deadlock timeout (1 s by
    // default) the store's transaction fails with 40P01, which releases
    // the revision row to this session.
    other
        .batch_execute("SELECT 1 FROM feature_flag_revision WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    other.batch_execute("ROLLBACK").await.unwrap();

    let change = tokio::time::timeout(Duration::from_secs(20), update)
        .await
        .expect("the retried update finishes within 20 s")
        .unwrap()
        .expect("the update succeeds on a later attempt");
    assert_eq!(change.action, Some(FlagAction::Updated));
    assert_eq!(change.flag.version, 2);
    assert_eq!(change.revision, 3);
    assert_eq!(audit_oldest_first(&store, &flag).await.len(), 2);

    drop(other);
    driver.abort();
    testing::drop_schema(&schema).await.unwrap();
}
