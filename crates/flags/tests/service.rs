//! The flag service against a real SQLite file: start-up, local changes,
//! polling, failure handling and shutdown of the refresh task.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use domain::{FlagPatch, FlagStore, FlagStoreError, NewFlag, Rollout, UserId};
use flags::{Evaluation, FlagConfig, FlagError, FlagService, Reason, bucket};
use support::{Instrumented, admin, name, open_store, wait_for};
use tokio_util::sync::CancellationToken;

/// Long enough that the background task never ticks during a test.
const NO_POLLING: Duration = Duration::from_secs(3_600);
const FAST_POLLING: Duration = Duration::from_millis(50);

fn config(refresh_interval: Duration) -> FlagConfig {
    FlagConfig {
        refresh_interval,
        ..FlagConfig::default()
    }
}

fn enabled_flag(flag: &str) -> NewFlag {
    NewFlag {
        enabled: true,
        rollout: Rollout::FULL,
        ..NewFlag::new(name(flag))
    }
}

#[tokio::test]
async fn seeded_flag_is_on_for_everyone() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir.path().join("flags.db")).await;
    let service = FlagService::start(
        Arc::new(store),
        FlagConfig::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap();

    for user in ["alice", "bob", "user-1", ""] {
        let evaluation = service.evaluate("batch_operations", user);
        assert!(evaluation.enabled, "batch_operations is off for {user:?}");
        assert_eq!(evaluation.reason, Reason::Rollout);
        assert_eq!(evaluation.bucket, Some(bucket("batch_operations", user)));
    }
    assert_eq!(service.revision(), 1);
    assert!(service.is_refreshing());
}

#[tokio::test]
async fn default_refresh_interval_is_two_seconds() {
    assert_eq!(
        FlagConfig::default().refresh_interval,
        Duration::from_secs(2)
    );
    assert!(!FlagConfig::default().unknown_flag_default);
}

#[tokio::test]
async fn zero_interval_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir.path().join("flags.db")).await;
    let error = FlagService::start(
        Arc::new(store),
        config(Duration::ZERO),
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, FlagError::ZeroRefreshInterval));
    assert!(error.to_string().contains("refresh_interval"));
}

#[tokio::test]
async fn failed_initial_load_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = Instrumented::new(open_store(&dir.path().join("flags.db")).await);
    store.set_failing(true);
    let error = FlagService::start(store, FlagConfig::default(), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(error, FlagError::Load(FlagStoreError::Store(_))));
}

#[tokio::test]
async fn unknown_flag_uses_default() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir.path().join("flags.db")).await;

    let off = FlagService::start(
        Arc::new(store.clone()),
        config(NO_POLLING),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(
        off.evaluate("no.such.flag", "alice"),
        Evaluation::unknown(false)
    );
    assert_eq!(off.evaluate("no.such.flag", "bob").reason, Reason::Unknown);
    assert_eq!(off.unknown_evaluations(), 2);

    let on_config = FlagConfig {
        unknown_flag_default: true,
        ..config(NO_POLLING)
    };
    let on = FlagService::start(Arc::new(store), on_config, CancellationToken::new())
        .await
        .unwrap();
    let evaluation = on.evaluate("no.such.flag", "alice");
    assert!(evaluation.enabled);
    assert_eq!(evaluation.reason, Reason::Unknown);
    assert_eq!(evaluation.bucket, None);
}

#[tokio::test]
async fn local_changes_apply_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir.path().join("flags.db")).await;
    let service = FlagService::start(
        Arc::new(store),
        config(NO_POLLING),
        CancellationToken::new(),
    )
    .await
    .unwrap();

    let created = service
        .create_flag(enabled_flag("new.ui"), &admin(), Utc::now())
        .await
        .unwrap();
    assert!(service.is_enabled("new.ui", "alice"));
    assert_eq!(service.revision(), created.revision);

    let patch = FlagPatch {
        deny_list: Some([UserId::new("alice")].into_iter().collect()),
        expected_version: Some(1),
        ..FlagPatch::default()
    };
    let updated = service
        .update_flag(&name("new.ui"), patch, &admin(), Utc::now())
        .await
        .unwrap();
    assert_eq!(updated.flag.version, 2);
    assert_eq!(service.evaluate("new.ui", "alice").reason, Reason::DenyList);
    assert!(service.is_enabled("new.ui", "bob"));

    service
        .delete_flag(&name("new.ui"), Some(2), &admin(), Utc::now())
        .await
        .unwrap();
    assert_eq!(service.evaluate("new.ui", "bob").reason, Reason::Unknown);
    assert_eq!(service.revision(), created.revision + 2);

    let audit = service
        .list_flag_audit(&name("new.ui"), domain::AuditFilter::default())
        .await
        .unwrap();
    assert_eq!(audit.items.len(), 3);
}

#[tokio::test]
async fn rejected_change_leaves_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir.path().join("flags.db")).await;
    let service = FlagService::start(
        Arc::new(store),
        config(NO_POLLING),
        CancellationToken::new(),
    )
    .await
    .unwrap();

    let patch = FlagPatch {
        enabled: Some(false),
        expected_version: Some(9),
        ..FlagPatch::default()
    };
    let error = service
        .update_flag(&name("batch_operations"), patch, &admin(), Utc::now())
        .await
        .unwrap_err();
    assert!(matches!(error, FlagStoreError::VersionConflict { .. }));
    assert!(service.is_enabled("batch_operations", "alice"));
    assert_eq!(service.revision(), 1);

    let error = service
        .create_flag(enabled_flag("batch_operations"), &admin(), Utc::now())
        .await
        .unwrap_err();
    assert!(matches!(error, FlagStoreError::AlreadyExists { .. }));
    assert_eq!(service.revision(), 1);
}

#[tokio::test]
async fn outside_change_waits_for_refresh() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir.path().join("flags.db")).await;
    let service = FlagService::start(
        Arc::new(store.clone()),
        config(NO_POLLING),
        CancellationToken::new(),
    )
    .await
    .unwrap();

    store
        .create_flag(enabled_flag("outside"), &admin(), Utc::now())
        .await
        .unwrap();
    assert_eq!(
        service.evaluate("outside", "alice").reason,
        Reason::Unknown,
        "evaluation must not read the store"
    );

    assert!(service.refresh().await.unwrap(), "a new revision reloads");
    assert!(service.is_enabled("outside", "alice"));
    assert_eq!(service.revision(), 2);
    assert!(
        !service.refresh().await.unwrap(),
        "an unchanged revision does not reload"
    );
}

#[tokio::test]
async fn local_change_after_outside_change_converges() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir.path().join("flags.db")).await;
    let service = FlagService::start(
        Arc::new(store.clone()),
        config(NO_POLLING),
        CancellationToken::new(),
    )
    .await
    .unwrap();

    // Revision 2 happens behind the service's back, revision 3 through it.
    store
        .create_flag(enabled_flag("outside"), &admin(), Utc::now())
        .await
        .unwrap();
    let local = service
        .create_flag(enabled_flag("local"), &admin(), Utc::now())
        .await
        .unwrap();
    assert_eq!(local.revision, 3);
    assert!(service.is_enabled("local", "alice"));
    assert_eq!(service.evaluate("outside", "alice").reason, Reason::Unknown);
    assert_eq!(
        service.revision(),
        1,
        "the snapshot does not claim revision 2, which it lacks"
    );

    assert!(service.refresh().await.unwrap());
    assert!(service.is_enabled("outside", "alice"));
    assert!(service.is_enabled("local", "alice"));
    assert_eq!(service.revision(), 3);
}

#[tokio::test]
async fn polling_reads_only_the_revision() {
    let dir = tempfile::tempdir().unwrap();
    let store = Instrumented::new(open_store(&dir.path().join("flags.db")).await);
    let service = FlagService::start(
        store.clone(),
        config(FAST_POLLING),
        CancellationToken::new(),
    )
    .await
    .unwrap();

    let polled = wait_for(Duration::from_secs(5), || store.revision_reads() >= 5).await;
    assert!(polled.is_some(), "the refresh task did not poll");
    assert_eq!(
        store.listings(),
        1,
        "only the initial load lists every flag"
    );

    store
        .inner
        .create_flag(enabled_flag("outside"), &admin(), Utc::now())
        .await
        .unwrap();
    let seen = wait_for(Duration::from_secs(5), || {
        service.is_enabled("outside", "alice")
    })
    .await;
    assert!(
        seen.is_some(),
        "the refresh task did not pick up the change"
    );
    assert_eq!(store.listings(), 2);
}

#[tokio::test]
async fn refresh_failure_keeps_snapshot_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let store = Instrumented::new(open_store(&dir.path().join("flags.db")).await);
    let service = FlagService::start(
        store.clone(),
        config(FAST_POLLING),
        CancellationToken::new(),
    )
    .await
    .unwrap();

    store.set_failing(true);
    store
        .inner
        .create_flag(enabled_flag("during.outage"), &admin(), Utc::now())
        .await
        .unwrap();
    let before = store.revision_reads();
    let failed_polls = wait_for(Duration::from_secs(5), || {
        store.revision_reads() >= before + 5
    })
    .await;
    assert!(
        failed_polls.is_some(),
        "the refresh task stopped polling after a failure"
    );
    assert!(service.is_refreshing());
    assert!(
        service.is_enabled("batch_operations", "alice"),
        "the last snapshot stays in use"
    );
    assert_eq!(
        service.evaluate("during.outage", "alice").reason,
        Reason::Unknown
    );
    assert!(service.refresh().await.is_err());

    store.set_failing(false);
    let recovered = wait_for(Duration::from_secs(5), || {
        service.is_enabled("during.outage", "alice")
    })
    .await;
    assert!(recovered.is_some(), "the refresh task did not recover");
}

#[tokio::test]
async fn cancellation_stops_refresh() {
    let dir = tempfile::tempdir().unwrap();
    let store = Instrumented::new(open_store(&dir.path().join("flags.db")).await);
    let cancel = CancellationToken::new();
    let service = FlagService::start(store.clone(), config(FAST_POLLING), cancel.clone())
        .await
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || store.revision_reads() >= 2)
            .await
            .is_some()
    );

    cancel.cancel();
    let stopped = wait_for(Duration::from_secs(5), || !service.is_refreshing()).await;
    assert!(
        stopped.is_some(),
        "the refresh task is still running after cancellation"
    );
    let reads = store.revision_reads();
    tokio::time::sleep(FAST_POLLING * 5).await;
    assert_eq!(store.revision_reads(), reads);

    // Evaluation and admin writes still work; only polling stopped.
    assert!(service.is_enabled("batch_operations", "alice"));
    service
        .create_flag(enabled_flag("after.cancel"), &admin(), Utc::now())
        .await
        .unwrap();
    assert!(service.is_enabled("after.cancel", "alice"));
}

#[tokio::test]
async fn dropping_service_stops_refresh() {
    let dir = tempfile::tempdir().unwrap();
    let store = Instrumented::new(open_store(&dir.path().join("flags.db")).await);
    let cancel = CancellationToken::new();
    let service = FlagService::start(store.clone(), config(FAST_POLLING), cancel.clone())
        .await
        .unwrap();
    let clone = service.clone();
    assert!(
        wait_for(Duration::from_secs(5), || store.revision_reads() >= 2)
            .await
            .is_some()
    );

    drop(service);
    let reads = store.revision_reads();
    tokio::time::sleep(FAST_POLLING * 4).await;
    assert!(
        store.revision_reads() > reads,
        "a remaining clone keeps the task running"
    );

    drop(clone);
    // A poll already under way when the last clone goes may still finish.
    tokio::time::sleep(FAST_POLLING * 2).await;
    let reads = store.revision_reads();
    tokio::time::sleep(FAST_POLLING * 6).await;
    assert_eq!(
        store.revision_reads(),
        reads,
        "the task kept polling after the service was dropped"
    );
    assert!(
        !cancel.is_cancelled(),
        "dropping the service must not cancel the caller's token"
    );
}

#[tokio::test]
async fn snapshot_lists_flags_without_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = Instrumented::new(open_store(&dir.path().join("flags.db")).await);
    let service = FlagService::start(store.clone(), config(NO_POLLING), CancellationToken::new())
        .await
        .unwrap();
    service
        .create_flag(enabled_flag("zeta"), &admin(), Utc::now())
        .await
        .unwrap();

    let names: Vec<String> = service
        .snapshot()
        .flags()
        .iter()
        .map(|f| f.name.to_string())
        .collect();
    assert_eq!(names, ["batch_operations", "zeta"]);
    assert_eq!(store.listings(), 1);
    let fresh = service.get_flag(&name("zeta")).await.unwrap();
    assert_eq!(fresh.version, 1);
}
