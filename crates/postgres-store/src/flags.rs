//! Feature flags: [`FlagStore`] on PostgreSQL, shared by every batchd
//! process on the schema.
//!
//! Every change runs in one READ COMMITTED transaction that first locks the
//! single row of `feature_flag_revision`. Every flag write of this store
//! takes that lock before any other, so flag changes from all processes are
//! serialized and cannot deadlock on each other. Each statement after the lock reads
//! every change committed before it, so the version check sees the latest
//! flag. The change, its audit entry, the revision bump and the
//! [`Signal::FlagsChanged`] notification commit together or not at all,
//! and audit ids grow in revision order.
//!
//! Flag-level outcomes (not found, already exists, version conflict, a
//! patch that changes nothing) roll the transaction back: they write
//! nothing and notify nobody.

use std::collections::BTreeSet;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Transaction};
use domain::{
    AuditFilter, FeatureFlag, FlagAction, FlagAuditEntry, FlagChange, FlagListing, FlagName,
    FlagPatch, FlagStore, FlagStoreError, NewFlag, Page, Rollout, StoreError, UserId,
    check_flag_version, validate_actor,
};
use tokio_postgres::{IsolationLevel, Row};

use crate::read::{column, corrupt, execute, query, query_opt};
use crate::write::{begin_read_committed, retry_transaction};
use crate::{PgStore, Signal, db_error, notify};

const SELECT_FLAG: &str = "
SELECT name, enabled, rollout, allow_list, deny_list, metadata, version, created_at, updated_at
FROM feature_flags WHERE name = $1";

/// The name column sorts bytewise (COLLATE "C"), as `FlagName` does.
const SELECT_ALL_FLAGS: &str = "
SELECT name, enabled, rollout, allow_list, deny_list, metadata, version, created_at, updated_at
FROM feature_flags ORDER BY name";

const INSERT_FLAG: &str = "
INSERT INTO feature_flags (name, enabled, rollout, allow_list, deny_list, metadata, version,
                           created_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (name) DO NOTHING";

/// Fenced by the version read under the revision lock.
const UPDATE_FLAG: &str = "
UPDATE feature_flags
SET enabled = $2, rollout = $3, allow_list = $4, deny_list = $5, metadata = $6,
    version = $7, updated_at = $8
WHERE name = $1 AND version = $9";

const DELETE_FLAG: &str = "DELETE FROM feature_flags WHERE name = $1 AND version = $2";

const READ_REVISION: &str = "SELECT revision FROM feature_flag_revision WHERE id = 1";

/// Taken first by every flag write, and held until it commits or rolls back.
const LOCK_REVISION: &str = "SELECT revision FROM feature_flag_revision WHERE id = 1 FOR UPDATE";

const BUMP_REVISION: &str =
    "UPDATE feature_flag_revision SET revision = revision + 1 WHERE id = 1 RETURNING revision";

const INSERT_AUDIT: &str = "
INSERT INTO feature_flag_audit (flag, action, actor, revision, at, before, after)
VALUES ($1, $2, $3, $4, $5, $6, $7)";

const SELECT_AUDIT: &str = "
SELECT id, flag, action, actor, revision, at, before, after
FROM feature_flag_audit
WHERE flag = $1 AND id < $2
ORDER BY id DESC
LIMIT $3";

/// A flag-level outcome inside a successful database operation.
type Outcome<T> = Result<T, FlagStoreError>;

fn flag_from_row(row: &Row) -> Result<FeatureFlag, StoreError> {
    let name: String = column(row, 0)?;
    let enabled: bool = column(row, 1)?;
    let rollout: i16 = column(row, 2)?;
    let allow_list: String = column(row, 3)?;
    let deny_list: String = column(row, 4)?;
    let metadata: String = column(row, 5)?;
    let version: i64 = column(row, 6)?;
    let created_at: i64 = column(row, 7)?;
    let updated_at: i64 = column(row, 8)?;

    Ok(FeatureFlag {
        name: FlagName::parse(name.clone()).map_err(|_| corrupt("flag name", name))?,
        enabled,
        rollout: Rollout::new(i64::from(rollout)).map_err(|_| corrupt("flag rollout", rollout))?,
        allow_list: parse_users("flag allow list", &allow_list)?,
        deny_list: parse_users("flag deny list", &deny_list)?,
        metadata: serde_json::from_str(&metadata)
            .map_err(|_| corrupt("flag metadata", &metadata))?,
        version: u64::try_from(version).map_err(|_| corrupt("flag version", version))?,
        created_at: from_millis("flag creation time", created_at)?,
        updated_at: from_millis("flag update time", updated_at)?,
    })
}

fn parse_users(what: &'static str, text: &str) -> Result<BTreeSet<UserId>, StoreError> {
    serde_json::from_str(text).map_err(|_| corrupt(what, text))
}

fn users_json(users: &BTreeSet<UserId>) -> Result<String, StoreError> {
    serde_json::to_string(users)
        .map_err(|source| StoreError::backend("encode flag user list", source))
}

fn flag_json(flag: &FeatureFlag) -> Result<String, StoreError> {
    serde_json::to_string(flag)
        .map_err(|source| StoreError::backend("encode flag for audit", source))
}

fn from_millis(what: &'static str, millis: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(millis).ok_or_else(|| corrupt(what, millis))
}

/// Drops sub-millisecond precision, so the flag a write returns equals the
/// one a later read returns.
fn stored_time(now: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

/// Stored form of a version: versions start at 1 and grow by 1 per change,
/// so one that does not fit an `i64` is a bug, not an input.
fn version_column(version: u64) -> Result<i64, StoreError> {
    i64::try_from(version).map_err(|_| corrupt("flag version", version))
}

fn revision_value(revision: i64) -> Result<u64, StoreError> {
    u64::try_from(revision).map_err(|_| corrupt("flag revision", revision))
}

async fn read_flag(
    client: &impl GenericClient,
    name: &FlagName,
) -> Result<Option<FeatureFlag>, StoreError> {
    query_opt(client, "read feature flag", SELECT_FLAG, &[&name.as_str()])
        .await?
        .as_ref()
        .map(flag_from_row)
        .transpose()
}

async fn read_revision(client: &impl GenericClient, sql: &str) -> Result<u64, StoreError> {
    const OPERATION: &str = "read feature flag revision";

    let row = query_opt(client, OPERATION, sql, &[])
        .await?
        .ok_or_else(|| corrupt("flag revision row", "missing"))?;
    revision_value(column(&row, 0)?)
}

/// One flag write, borrowed by each attempt of its transaction.
#[derive(Debug, Clone, Copy)]
enum FlagWrite<'a> {
    Create {
        flag: &'a FeatureFlag,
    },
    Update {
        name: &'a FlagName,
        patch: &'a FlagPatch,
        now: DateTime<Utc>,
    },
    Delete {
        name: &'a FlagName,
        expected_version: Option<u64>,
        now: DateTime<Utc>,
    },
}

impl FlagWrite<'_> {
    fn operation(self) -> &'static str {
        match self {
            FlagWrite::Create { .. } => "create feature flag",
            FlagWrite::Update { .. } => "update feature flag",
            FlagWrite::Delete { .. } => "delete feature flag",
        }
    }
}

/// Writes the audit entry and bumps the revision. The caller has already
/// written the change itself in the same transaction.
async fn record_change(
    transaction: &Transaction<'_>,
    name: &FlagName,
    action: FlagAction,
    actor: &UserId,
    now_ms: i64,
    before: Option<&FeatureFlag>,
    after: Option<&FeatureFlag>,
) -> Result<u64, StoreError> {
    const OPERATION: &str = "bump feature flag revision";

    let row = query_opt(transaction, OPERATION, BUMP_REVISION, &[])
        .await?
        .ok_or_else(|| corrupt("flag revision row", "missing"))?;
    let revision: i64 = column(&row, 0)?;

    let before = before.map(flag_json).transpose()?;
    let after = after.map(flag_json).transpose()?;
    execute(
        transaction,
        "write feature flag audit entry",
        INSERT_AUDIT,
        &[
            &name.as_str(),
            &action.as_str(),
            &actor.as_str(),
            &revision,
            &now_ms,
            &before,
            &after,
        ],
    )
    .await?;
    revision_value(revision)
}

async fn create_in(
    transaction: &Transaction<'_>,
    flag: &FeatureFlag,
    actor: &UserId,
) -> Result<Outcome<FlagChange>, StoreError> {
    let allow_list = users_json(&flag.allow_list)?;
    let deny_list = users_json(&flag.deny_list)?;
    let version = version_column(flag.version)?;
    let created_at = flag.created_at.timestamp_millis();
    let inserted = execute(
        transaction,
        "create feature flag",
        INSERT_FLAG,
        &[
            &flag.name.as_str(),
            &flag.enabled,
            &i16::from(flag.rollout.percent()),
            &allow_list,
            &deny_list,
            &flag.metadata.to_string(),
            &version,
            &created_at,
            &flag.updated_at.timestamp_millis(),
        ],
    )
    .await?;
    if inserted == 0 {
        return Ok(Err(FlagStoreError::AlreadyExists {
            name: flag.name.clone(),
        }));
    }

    let revision = record_change(
        transaction,
        &flag.name,
        FlagAction::Created,
        actor,
        created_at,
        None,
        Some(flag),
    )
    .await?;
    Ok(Ok(FlagChange {
        flag: flag.clone(),
        action: Some(FlagAction::Created),
        revision,
    }))
}

async fn update_in(
    transaction: &Transaction<'_>,
    name: &FlagName,
    patch: &FlagPatch,
    actor: &UserId,
    now: DateTime<Utc>,
    locked_revision: u64,
) -> Result<Outcome<FlagChange>, StoreError> {
    let Some(current) = read_flag(transaction, name).await? else {
        return Ok(Err(FlagStoreError::NotFound { name: name.clone() }));
    };
    if let Err(conflict) = check_flag_version(&current, patch.expected_version) {
        return Ok(Err(conflict));
    }
    let Some(next) = patch.apply(&current, now) else {
        return Ok(Ok(FlagChange {
            flag: current,
            action: None,
            revision: locked_revision,
        }));
    };

    let allow_list = users_json(&next.allow_list)?;
    let deny_list = users_json(&next.deny_list)?;
    let next_version = version_column(next.version)?;
    let current_version = version_column(current.version)?;
    let updated = execute(
        transaction,
        "update feature flag",
        UPDATE_FLAG,
        &[
            &name.as_str(),
            &next.enabled,
            &i16::from(next.rollout.percent()),
            &allow_list,
            &deny_list,
            &next.metadata.to_string(),
            &next_version,
            &next.updated_at.timestamp_millis(),
            &current_version,
        ],
    )
    .await?;
    if updated != 1 {
        // The row was read under the revision lock, which every flag
        // writer holds, so only a write that bypassed the store gets here.
        return Err(corrupt("flag row count after update", updated));
    }

    let revision = record_change(
        transaction,
        name,
        FlagAction::Updated,
        actor,
        now.timestamp_millis(),
        Some(&current),
        Some(&next),
    )
    .await?;
    Ok(Ok(FlagChange {
        flag: next,
        action: Some(FlagAction::Updated),
        revision,
    }))
}

async fn delete_in(
    transaction: &Transaction<'_>,
    name: &FlagName,
    expected_version: Option<u64>,
    actor: &UserId,
    now: DateTime<Utc>,
) -> Result<Outcome<FlagChange>, StoreError> {
    let Some(current) = read_flag(transaction, name).await? else {
        return Ok(Err(FlagStoreError::NotFound { name: name.clone() }));
    };
    if let Err(conflict) = check_flag_version(&current, expected_version) {
        return Ok(Err(conflict));
    }

    let current_version = version_column(current.version)?;
    let deleted = execute(
        transaction,
        "delete feature flag",
        DELETE_FLAG,
        &[&name.as_str(), &current_version],
    )
    .await?;
    if deleted != 1 {
        return Err(corrupt("flag row count after delete", deleted));
    }

    let revision = record_change(
        transaction,
        name,
        FlagAction::Deleted,
        actor,
        now.timestamp_millis(),
        Some(&current),
        None,
    )
    .await?;
    Ok(Ok(FlagChange {
        flag: current,
        action: Some(FlagAction::Deleted),
        revision,
    }))
}

fn audit_from_row(row: &Row) -> Result<FlagAuditEntry, StoreError> {
    let id: i64 = column(row, 0)?;
    let flag: String = column(row, 1)?;
    let action: String = column(row, 2)?;
    let actor: String = column(row, 3)?;
    let revision: i64 = column(row, 4)?;
    let at: i64 = column(row, 5)?;
    let before: Option<String> = column(row, 6)?;
    let after: Option<String> = column(row, 7)?;

    let json = |what: &'static str,
                text: Option<String>|
     -> Result<Option<serde_json::Value>, StoreError> {
        text.map(|text| serde_json::from_str(&text).map_err(|_| corrupt(what, text)))
            .transpose()
    };
    Ok(FlagAuditEntry {
        id,
        flag: FlagName::parse(flag.clone()).map_err(|_| corrupt("audited flag name", flag))?,
        action: action
            .parse()
            .map_err(|_| corrupt("flag audit action", &action))?,
        actor: UserId::new(actor),
        at: from_millis("flag audit time", at)?,
        revision: u64::try_from(revision).map_err(|_| corrupt("flag audit revision", revision))?,
        before: json("flag audit before", before)?,
        after: json("flag audit after", after)?,
    })
}

impl PgStore {
    /// Runs a flag write in its own transaction, retried on serialization
    /// failures and deadlocks, and logs the change it made.
    async fn write_flag(
        &self,
        write: FlagWrite<'_>,
        actor: &UserId,
    ) -> Result<FlagChange, FlagStoreError> {
        let operation = write.operation();
        let outcome = retry_transaction(operation, || self.write_flag_once(write, actor)).await?;
        let change = outcome?;
        if let Some(action) = change.action {
            tracing::info!(
                flag = %change.flag.name,
                %action,
                %actor,
                version = change.flag.version,
                revision = change.revision,
                "feature flag changed"
            );
        }
        Ok(change)
    }

    /// Runs one attempt of a flag write. It locks the revision row, applies
    /// the write, and commits it with its notification, or rolls back when
    /// the write was rejected or changed nothing.
    async fn write_flag_once(
        &self,
        write: FlagWrite<'_>,
        actor: &UserId,
    ) -> Result<Outcome<FlagChange>, StoreError> {
        let operation = write.operation();
        let mut client = self.client(operation).await?;
        let transaction = begin_read_committed(&mut client, operation).await?;
        let locked_revision = read_revision(&transaction, LOCK_REVISION).await?;

        let outcome = match write {
            FlagWrite::Create { flag } => create_in(&transaction, flag, actor).await?,
            FlagWrite::Update { name, patch, now } => {
                update_in(&transaction, name, patch, actor, now, locked_revision).await?
            }
            FlagWrite::Delete {
                name,
                expected_version,
                now,
            } => delete_in(&transaction, name, expected_version, actor, now).await?,
        };

        match &outcome {
            Ok(FlagChange {
                action: Some(_),
                revision,
                ..
            }) => {
                // Sent inside the transaction, so other processes hear of
                // the change exactly when it becomes visible to them.
                let signal = Signal::FlagsChanged {
                    revision: *revision,
                };
                notify::send(&*transaction, self.channel(), &signal).await?;
                transaction.commit().await.map_err(db_error(operation))?;
            }
            _ => transaction.rollback().await.map_err(db_error(operation))?,
        }
        Ok(outcome)
    }
}

#[async_trait]
impl FlagStore for PgStore {
    async fn list_flags(&self) -> Result<FlagListing, FlagStoreError> {
        const OPERATION: &str = "list feature flags";

        let mut client = self.client(OPERATION).await?;
        // One snapshot for both reads, so the revision matches the rows.
        let transaction = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(db_error(OPERATION))?;
        let revision = read_revision(&transaction, READ_REVISION).await?;
        let flags = query(&transaction, OPERATION, SELECT_ALL_FLAGS, &[])
            .await?
            .iter()
            .map(flag_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        transaction.commit().await.map_err(db_error(OPERATION))?;
        Ok(FlagListing { revision, flags })
    }

    async fn get_flag(&self, name: &FlagName) -> Result<FeatureFlag, FlagStoreError> {
        let client = self.client("read feature flag").await?;
        let flag = read_flag(&client, name).await?;
        flag.ok_or_else(|| FlagStoreError::NotFound { name: name.clone() })
    }

    async fn create_flag(
        &self,
        flag: NewFlag,
        actor: &UserId,
        now: DateTime<Utc>,
    ) -> Result<FlagChange, FlagStoreError> {
        flag.validate()?;
        validate_actor(actor)?;
        let flag = FeatureFlag::from_new(flag, stored_time(now));
        self.write_flag(FlagWrite::Create { flag: &flag }, actor)
            .await
    }

    async fn update_flag(
        &self,
        name: &FlagName,
        patch: FlagPatch,
        actor: &UserId,
        now: DateTime<Utc>,
    ) -> Result<FlagChange, FlagStoreError> {
        patch.validate()?;
        validate_actor(actor)?;
        let write = FlagWrite::Update {
            name,
            patch: &patch,
            now: stored_time(now),
        };
        self.write_flag(write, actor).await
    }

    async fn delete_flag(
        &self,
        name: &FlagName,
        expected_version: Option<u64>,
        actor: &UserId,
        now: DateTime<Utc>,
    ) -> Result<FlagChange, FlagStoreError> {
        validate_actor(actor)?;
        let write = FlagWrite::Delete {
            name,
            expected_version,
            now: stored_time(now),
        };
        self.write_flag(write, actor).await
    }

    async fn list_flag_audit(
        &self,
        name: &FlagName,
        filter: AuditFilter,
    ) -> Result<Page<FlagAuditEntry>, FlagStoreError> {
        const OPERATION: &str = "list feature flag audit";

        let limit = filter.page_size();
        let before_id = filter.cursor.unwrap_or(i64::MAX);
        let client = self.client(OPERATION).await?;
        let rows = query(
            &client,
            OPERATION,
            SELECT_AUDIT,
            &[&name.as_str(), &before_id, &(i64::from(limit) + 1)],
        )
        .await?;
        let mut entries = rows
            .iter()
            .map(audit_from_row)
            .collect::<Result<Vec<_>, _>>()?;

        let has_more = entries.len() > limit as usize;
        entries.truncate(limit as usize);
        let next_cursor = if has_more {
            entries.last().map(|entry| entry.id.to_string())
        } else {
            None
        };
        Ok(Page {
            items: entries,
            next_cursor,
        })
    }

    async fn flag_revision(&self) -> Result<u64, FlagStoreError> {
        let client = self.client("read feature flag revision").await?;
        Ok(read_revision(&client, READ_REVISION).await?)
    }
}
