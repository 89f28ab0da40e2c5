//! The conformance suite of [`FlagStore`]: every backend runs these same
//! checks against a fresh store, whose only flag is the seeded
//! `batch_operations` at revision 1.
//!
//! A backend's test file calls [`flag_conformance_tests!`](crate::flag_conformance_tests)
//! with an expression that opens a fresh store and one that opens two
//! handles on one fresh database, as two processes would.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, TimeZone, Utc};
use domain::{
    AuditFilter, FeatureFlag, FlagAction, FlagName, FlagPatch, FlagStore, FlagStoreError,
    FlagValidationError, MAX_FLAG_LIST_LEN, NewFlag, Rollout, UserId, UserListKind,
};

/// Expands to one test per flag-store check. `fresh` is an async
/// expression returning a fresh store, and `pair` one returning two handles
/// on one fresh database.
#[macro_export]
macro_rules! flag_conformance_tests {
    (fresh: $open:expr, pair: $open_pair:expr $(,)?) => {
        $crate::flag_conformance_tests!(@one $open;
            seeded_batch_operations,
            create_and_read_back,
            create_duplicate_rejected,
            update_bumps_version_and_audits,
            update_version_conflict,
            update_without_change_writes_nothing,
            update_missing_is_not_found,
            delete_audits_and_keeps_history,
            recreate_after_delete_restarts_version,
            audit_pages_newest_first,
            validation_errors_write_nothing,
            listing_sorts_names_bytewise,
        );
        $crate::flag_conformance_tests!(@pair $open_pair;
            two_handles_share_revision,
        );
    };
    (@one $open:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $check() {
                let store = $open;
                $crate::flags::$check(&store).await;
            }
        )*
    };
    (@pair $open_pair:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $check() {
                let (first, second) = $open_pair;
                $crate::flags::$check(&first, &second).await;
            }
        )*
    };
}

const SEEDED: &str = "batch_operations";

fn name(text: &str) -> FlagName {
    FlagName::parse(text).unwrap()
}

fn admin() -> UserId {
    UserId::new("admin-1")
}

fn users(ids: &[&str]) -> BTreeSet<UserId> {
    ids.iter().map(|id| UserId::new(*id)).collect()
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 2, 3, 4, 5).unwrap() + Duration::milliseconds(678)
}

fn checkout_flag() -> NewFlag {
    NewFlag {
        enabled: true,
        rollout: Rollout::new(25).unwrap(),
        allow_list: users(&["alice", "bob"]),
        deny_list: users(&["mallory"]),
        metadata: serde_json::json!({ "owner": "payments" }),
        ..NewFlag::new(name("checkout.v2"))
    }
}

pub async fn seeded_batch_operations<S: FlagStore>(store: &S) {
    let flag = store.get_flag(&name(SEEDED)).await.unwrap();
    assert!(flag.enabled);
    assert_eq!(flag.rollout, Rollout::FULL);
    assert!(flag.allow_list.is_empty());
    assert!(flag.deny_list.is_empty());
    assert_eq!(flag.metadata, serde_json::json!({}));
    assert_eq!(flag.version, 1);
    assert_eq!(flag.created_at, flag.updated_at);

    let listing = store.list_flags().await.unwrap();
    assert_eq!(listing.revision, 1);
    assert_eq!(listing.flags, vec![flag.clone()]);
    assert_eq!(store.flag_revision().await.unwrap(), 1);

    let audit = store
        .list_flag_audit(&name(SEEDED), AuditFilter::default())
        .await
        .unwrap();
    assert_eq!(audit.items.len(), 1);
    let entry = &audit.items[0];
    assert_eq!(entry.action, FlagAction::Created);
    assert_eq!(entry.actor, UserId::new("system:migration"));
    assert_eq!(entry.revision, 1);
    assert_eq!(entry.before, None);
    let after: FeatureFlag = serde_json::from_value(entry.after.clone().unwrap()).unwrap();
    assert_eq!(after, flag);
}

pub async fn create_and_read_back<S: FlagStore>(store: &S) {
    let change = store
        .create_flag(checkout_flag(), &admin(), t0())
        .await
        .unwrap();
    assert_eq!(change.action, Some(FlagAction::Created));
    assert_eq!(change.revision, 2);
    assert_eq!(change.flag.version, 1);
    assert_eq!(change.flag.created_at, t0());
    assert_eq!(change.flag.updated_at, t0());

    let read = store.get_flag(&name("checkout.v2")).await.unwrap();
    assert_eq!(read, change.flag);
    assert_eq!(read.allow_list, users(&["alice", "bob"]));
    assert_eq!(read.deny_list, users(&["mallory"]));
    assert_eq!(read.metadata, serde_json::json!({ "owner": "payments" }));

    let listing = store.list_flags().await.unwrap();
    let names: Vec<&str> = listing.flags.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        vec![SEEDED, "checkout.v2"],
        "listing is sorted by name"
    );
    assert_eq!(listing.revision, 2);
}

pub async fn create_duplicate_rejected<S: FlagStore>(store: &S) {
    store
        .create_flag(checkout_flag(), &admin(), t0())
        .await
        .unwrap();

    let error = store
        .create_flag(checkout_flag(), &admin(), t0())
        .await
        .unwrap_err();
    assert!(
        matches!(error, FlagStoreError::AlreadyExists { ref name } if name.as_str() == "checkout.v2")
    );
    assert_eq!(
        store.flag_revision().await.unwrap(),
        2,
        "a rejected create must not bump the revision"
    );
    let audit = store
        .list_flag_audit(&name("checkout.v2"), AuditFilter::default())
        .await
        .unwrap();
    assert_eq!(audit.items.len(), 1);
}

pub async fn update_bumps_version_and_audits<S: FlagStore>(store: &S) {
    let created = store
        .create_flag(checkout_flag(), &admin(), t0())
        .await
        .unwrap();

    let later = t0() + Duration::seconds(30);
    let patch = FlagPatch {
        rollout: Some(Rollout::new(60).unwrap()),
        deny_list: Some(BTreeSet::new()),
        expected_version: Some(1),
        ..FlagPatch::default()
    };
    let change = store
        .update_flag(&name("checkout.v2"), patch, &UserId::new("admin-2"), later)
        .await
        .unwrap();
    assert_eq!(change.action, Some(FlagAction::Updated));
    assert_eq!(change.revision, 3);
    assert_eq!(change.flag.version, 2);
    assert_eq!(change.flag.rollout.percent(), 60);
    assert!(change.flag.deny_list.is_empty());
    assert_eq!(
        change.flag.allow_list, created.flag.allow_list,
        "unset fields keep their value"
    );
    assert!(change.flag.enabled);
    assert_eq!(change.flag.created_at, t0());
    assert_eq!(change.flag.updated_at, later);
    assert_eq!(
        store.get_flag(&name("checkout.v2")).await.unwrap(),
        change.flag
    );

    let audit = store
        .list_flag_audit(&name("checkout.v2"), AuditFilter::default())
        .await
        .unwrap();
    assert_eq!(audit.items.len(), 2);
    let entry = &audit.items[0];
    assert_eq!(entry.action, FlagAction::Updated);
    assert_eq!(entry.actor, UserId::new("admin-2"));
    assert_eq!(entry.at, later);
    assert_eq!(entry.revision, 3);
    let before: FeatureFlag = serde_json::from_value(entry.before.clone().unwrap()).unwrap();
    let after: FeatureFlag = serde_json::from_value(entry.after.clone().unwrap()).unwrap();
    assert_eq!(before, created.flag);
    assert_eq!(after, change.flag);
    assert_eq!(audit.items[1].action, FlagAction::Created);
}

pub async fn update_version_conflict<S: FlagStore>(store: &S) {
    store
        .create_flag(checkout_flag(), &admin(), t0())
        .await
        .unwrap();
    let patch = FlagPatch {
        enabled: Some(false),
        expected_version: Some(7),
        ..FlagPatch::default()
    };

    let error = store
        .update_flag(&name("checkout.v2"), patch, &admin(), t0())
        .await
        .unwrap_err();
    match error {
        FlagStoreError::VersionConflict {
            expected, actual, ..
        } => {
            assert_eq!(expected, 7);
            assert_eq!(actual, 1);
        }
        other => panic!("expected a version conflict, got {other:?}"),
    }
    let flag = store.get_flag(&name("checkout.v2")).await.unwrap();
    assert!(flag.enabled, "a conflicting patch must write nothing");
    assert_eq!(flag.version, 1);
    assert_eq!(store.flag_revision().await.unwrap(), 2);
}

pub async fn update_without_change_writes_nothing<S: FlagStore>(store: &S) {
    store
        .create_flag(checkout_flag(), &admin(), t0())
        .await
        .unwrap();
    let patch = FlagPatch {
        enabled: Some(true),
        rollout: Some(Rollout::new(25).unwrap()),
        ..FlagPatch::default()
    };

    let change = store
        .update_flag(
            &name("checkout.v2"),
            patch,
            &admin(),
            t0() + Duration::hours(1),
        )
        .await
        .unwrap();
    assert_eq!(change.action, None);
    assert_eq!(change.flag.version, 1);
    assert_eq!(change.flag.updated_at, t0());
    assert_eq!(change.revision, 2);
    let audit = store
        .list_flag_audit(&name("checkout.v2"), AuditFilter::default())
        .await
        .unwrap();
    assert_eq!(audit.items.len(), 1);
}

pub async fn update_missing_is_not_found<S: FlagStore>(store: &S) {
    let error = store
        .update_flag(&name("missing"), FlagPatch::default(), &admin(), t0())
        .await
        .unwrap_err();
    assert!(matches!(error, FlagStoreError::NotFound { ref name } if name.as_str() == "missing"));
    assert_eq!(error.to_string(), "feature flag missing not found");
    let error = store.get_flag(&name("missing")).await.unwrap_err();
    assert!(matches!(error, FlagStoreError::NotFound { .. }));
}

pub async fn delete_audits_and_keeps_history<S: FlagStore>(store: &S) {
    let created = store
        .create_flag(checkout_flag(), &admin(), t0())
        .await
        .unwrap();

    let error = store
        .delete_flag(&name("checkout.v2"), Some(2), &admin(), t0())
        .await
        .unwrap_err();
    assert!(matches!(error, FlagStoreError::VersionConflict { .. }));

    let later = t0() + Duration::minutes(5);
    let change = store
        .delete_flag(&name("checkout.v2"), Some(1), &admin(), later)
        .await
        .unwrap();
    assert_eq!(change.action, Some(FlagAction::Deleted));
    assert_eq!(change.flag, created.flag);
    assert_eq!(change.revision, 3);
    assert!(matches!(
        store.get_flag(&name("checkout.v2")).await,
        Err(FlagStoreError::NotFound { .. })
    ));

    let audit = store
        .list_flag_audit(&name("checkout.v2"), AuditFilter::default())
        .await
        .unwrap();
    assert_eq!(audit.items.len(), 2);
    let entry = &audit.items[0];
    assert_eq!(entry.action, FlagAction::Deleted);
    assert_eq!(entry.at, later);
    assert_eq!(entry.after, None);
    let before: FeatureFlag = serde_json::from_value(entry.before.clone().unwrap()).unwrap();
    assert_eq!(before, created.flag);

    let error = store
        .delete_flag(&name("checkout.v2"), None, &admin(), later)
        .await
        .unwrap_err();
    assert!(matches!(error, FlagStoreError::NotFound { .. }));
}

pub async fn recreate_after_delete_restarts_version<S: FlagStore>(store: &S) {
    store
        .create_flag(checkout_flag(), &admin(), t0())
        .await
        .unwrap();
    store
        .delete_flag(&name("checkout.v2"), None, &admin(), t0())
        .await
        .unwrap();

    let change = store
        .create_flag(checkout_flag(), &admin(), t0())
        .await
        .unwrap();
    assert_eq!(change.flag.version, 1);
    assert_eq!(
        change.revision, 4,
        "the revision keeps growing across a delete"
    );
    let audit = store
        .list_flag_audit(&name("checkout.v2"), AuditFilter::default())
        .await
        .unwrap();
    let actions: Vec<FlagAction> = audit.items.iter().map(|e| e.action).collect();
    assert_eq!(
        actions,
        vec![
            FlagAction::Created,
            FlagAction::Deleted,
            FlagAction::Created
        ]
    );
}

pub async fn audit_pages_newest_first<S: FlagStore>(store: &S) {
    store
        .create_flag(checkout_flag(), &admin(), t0())
        .await
        .unwrap();
    for percent in 1..=4 {
        let patch = FlagPatch {
            rollout: Some(Rollout::new(percent).unwrap()),
            ..FlagPatch::default()
        };
        store
            .update_flag(&name("checkout.v2"), patch, &admin(), t0())
            .await
            .unwrap();
    }

    let first = store
        .list_flag_audit(
            &name("checkout.v2"),
            AuditFilter {
                cursor: None,
                limit: 2,
            },
        )
        .await
        .unwrap();
    assert_eq!(first.items.len(), 2);
    let revisions: Vec<u64> = first.items.iter().map(|e| e.revision).collect();
    assert_eq!(revisions, vec![6, 5]);
    let cursor: i64 = first.next_cursor.unwrap().parse().unwrap();

    let second = store
        .list_flag_audit(
            &name("checkout.v2"),
            AuditFilter {
                cursor: Some(cursor),
                limit: 10,
            },
        )
        .await
        .unwrap();
    let revisions: Vec<u64> = second.items.iter().map(|e| e.revision).collect();
    assert_eq!(revisions, vec![4, 3, 2]);
    assert_eq!(second.next_cursor, None);

    let none = store
        .list_flag_audit(&name("never.existed"), AuditFilter::default())
        .await
        .unwrap();
    assert!(none.items.is_empty());
}

pub async fn validation_errors_write_nothing<S: FlagStore>(store: &S) {
    let mut too_long = checkout_flag();
    too_long.allow_list = (0..=MAX_FLAG_LIST_LEN)
        .map(|i| UserId::new(format!("user-{i}")))
        .collect();
    let error = store
        .create_flag(too_long, &admin(), t0())
        .await
        .unwrap_err();
    assert!(matches!(
        error,
        FlagStoreError::Invalid(FlagValidationError::ListTooLong {
            list: UserListKind::Allow,
            ..
        })
    ));

    let error = store
        .create_flag(checkout_flag(), &UserId::new(""), t0())
        .await
        .unwrap_err();
    assert!(matches!(
        error,
        FlagStoreError::Invalid(FlagValidationError::EmptyActor)
    ));

    let patch = FlagPatch {
        deny_list: Some(users(&[""])),
        ..FlagPatch::default()
    };
    let error = store
        .update_flag(&name(SEEDED), patch, &admin(), t0())
        .await
        .unwrap_err();
    assert!(matches!(
        error,
        FlagStoreError::Invalid(FlagValidationError::EmptyUserId {
            list: UserListKind::Deny
        })
    ));

    assert_eq!(store.flag_revision().await.unwrap(), 1);
    assert_eq!(store.list_flags().await.unwrap().flags.len(), 1);
}

pub async fn two_handles_share_revision<S: FlagStore>(first: &S, second: &S) {
    first
        .create_flag(checkout_flag(), &admin(), t0())
        .await
        .unwrap();
    assert_eq!(second.flag_revision().await.unwrap(), 2);
    let change = second
        .update_flag(
            &name("checkout.v2"),
            FlagPatch {
                enabled: Some(false),
                expected_version: Some(1),
                ..FlagPatch::default()
            },
            &admin(),
            t0(),
        )
        .await
        .unwrap();
    assert_eq!(change.revision, 3);
    assert_eq!(first.flag_revision().await.unwrap(), 3);
    assert!(!first.get_flag(&name("checkout.v2")).await.unwrap().enabled);
}

pub async fn listing_sorts_names_bytewise<S: FlagStore>(store: &S) {
    // Punctuation and digits sort before letters in byte order, which a
    // locale-aware collation would not keep.
    for text in ["b.z", "a_b", "b-z", "a9", "ab", "a.b", "a-b"] {
        store
            .create_flag(NewFlag::new(name(text)), &admin(), t0())
            .await
            .unwrap();
    }

    let listing = store.list_flags().await.unwrap();
    let names: Vec<&str> = listing.flags.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        vec!["a-b", "a.b", "a9", "a_b", "ab", "b-z", "b.z", SEEDED]
    );
}
