//! Two processes sharing one database, modelled as two store handles opened
//! on the same file, each with its own writer, read pool and flag service.
//! A change made through one service must reach the other's snapshot within
//! the refresh interval.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use domain::{FlagPatch, NewFlag, Rollout, UserId};
use flags::{FlagConfig, FlagService, Reason};
use support::{admin, name, open_store, wait_for};
use tokio_util::sync::CancellationToken;

const INTERVAL: Duration = Duration::from_millis(200);
/// Time for one poll and one reload on a busy test machine, on top of the
/// interval.
const RELOAD_ALLOWANCE: Duration = Duration::from_millis(800);

async fn start(path: &std::path::Path, cancel: &CancellationToken) -> FlagService {
    let store = open_store(path).await;
    let config = FlagConfig {
        refresh_interval: INTERVAL,
        ..FlagConfig::default()
    };
    FlagService::start(Arc::new(store), config, cancel.clone())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_reaches_other_process_within_interval() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let cancel = CancellationToken::new();
    let first = start(&path, &cancel).await;
    let second = start(&path, &cancel).await;
    let limit = INTERVAL + RELOAD_ALLOWANCE;

    // Create through the first process.
    let created = NewFlag {
        enabled: true,
        rollout: Rollout::FULL,
        ..NewFlag::new(name("shared.flag"))
    };
    first
        .create_flag(created, &admin(), Utc::now())
        .await
        .unwrap();
    assert!(first.is_enabled("shared.flag", "alice"));
    let took = wait_for(limit, || second.is_enabled("shared.flag", "alice")).await;
    assert!(
        took.is_some(),
        "the second process did not see the new flag within {limit:?}"
    );

    // Update through the second process.
    let patch = FlagPatch {
        deny_list: Some([UserId::new("alice")].into_iter().collect()),
        expected_version: Some(1),
        ..FlagPatch::default()
    };
    second
        .update_flag(&name("shared.flag"), patch, &admin(), Utc::now())
        .await
        .unwrap();
    assert_eq!(
        second.evaluate("shared.flag", "alice").reason,
        Reason::DenyList
    );
    let took = wait_for(limit, || {
        first.evaluate("shared.flag", "alice").reason == Reason::DenyList
    })
    .await;
    assert!(
        took.is_some(),
        "the first process did not see the update within {limit:?}"
    );

    // Delete through the first process.
    first
        .delete_flag(&name("shared.flag"), Some(2), &admin(), Utc::now())
        .await
        .unwrap();
    let took = wait_for(limit, || {
        second.evaluate("shared.flag", "bob").reason == Reason::Unknown
    })
    .await;
    assert!(
        took.is_some(),
        "the second process did not see the deletion within {limit:?}"
    );

    // Both end on the same revision.
    let same = wait_for(limit, || first.revision() == second.revision()).await;
    assert!(
        same.is_some(),
        "revisions {} and {} did not converge",
        first.revision(),
        second.revision()
    );
    assert_eq!(first.revision(), 4);
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_rollout_change_converges() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let cancel = CancellationToken::new();
    let first = start(&path, &cancel).await;
    let second = start(&path, &cancel).await;
    assert!(second.is_enabled("batch_operations", "user-1"));

    let patch = FlagPatch {
        rollout: Some(Rollout::NONE),
        ..FlagPatch::default()
    };
    first
        .update_flag(&name("batch_operations"), patch, &admin(), Utc::now())
        .await
        .unwrap();
    let limit = INTERVAL + RELOAD_ALLOWANCE;
    let took = wait_for(limit, || !second.is_enabled("batch_operations", "user-1")).await;
    assert!(
        took.is_some(),
        "rollout 0 did not reach the second process within {limit:?}"
    );
    cancel.cancel();
}
