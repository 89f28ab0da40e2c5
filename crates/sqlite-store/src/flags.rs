//! Feature flags: [`FlagStore`] on SQLite.
//!
//! Writes go through the single writer, so a change, its audit entry and
//! the revision bump commit together or not at all. The revision is one
//! row in `feature_flag_revision`, so polling it costs one primary-key read.
//!
//! Flag-level outcomes (not found, already exists, version conflict) are
//! decided before the operation writes anything. The writer closures return
//! them as the inner `Err` of a nested result, so the writer treats the
//! operation as successful and releases its savepoint, which contains no
//! writes at that point.

use std::collections::BTreeSet;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::{
    AuditFilter, FeatureFlag, FlagAction, FlagAuditEntry, FlagChange, FlagListing, FlagName,
    FlagPatch, FlagStore, FlagStoreError, NewFlag, Page, Rollout, StoreError, UserId,
    check_flag_version, validate_actor,
};
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::{SqliteStore, db_error, from_millis, to_millis};

const SELECT_FLAG: &str = "
SELECT name, enabled, rollout, allow_list, deny_list, metadata, version, created_at, updated_at
FROM feature_flags WHERE name = ?1";

const SELECT_ALL_FLAGS: &str = "
SELECT name, enabled, rollout, allow_list, deny_list, metadata, version, created_at, updated_at
FROM feature_flags ORDER BY name";

const INSERT_FLAG: &str = "
INSERT INTO feature_flags (name, enabled, rollout, allow_list, deny_list, metadata, version,
                           created_at, updated_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
ON CONFLICT (name) DO NOTHING";

/// Fenced by the version read in the same transaction.
const UPDATE_FLAG: &str = "
UPDATE feature_flags
SET enabled = ?2, rollout = ?3, allow_list = ?4, deny_list = ?5, metadata = ?6,
    version = ?7, updated_at = ?8
WHERE name = ?1 AND version = ?9";

const DELETE_FLAG: &str = "DELETE FROM feature_flags WHERE name = ?1 AND version = ?2";

const READ_REVISION: &str = "SELECT revision FROM feature_flag_revision WHERE id = 1";

const BUMP_REVISION: &str =
    "UPDATE feature_flag_revision SET revision = revision + 1 WHERE id = 1 RETURNING revision";

const INSERT_AUDIT: &str = "
INSERT INTO feature_flag_audit (flag, action, actor, revision, at, before, after)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";

const SELECT_AUDIT: &str = "
SELECT id, flag, action, actor, revision, at, before, after
FROM feature_flag_audit
WHERE flag = ?1 AND id < ?2
ORDER BY id DESC
LIMIT ?3";

/// A flag-level outcome inside a successful database operation.
type Outcome<T> = Result<T, FlagStoreError>;

fn corrupt(what: &'static str, value: impl ToString) -> StoreError {
    StoreError::Corrupt {
        what,
        value: value.to_string(),
    }
}

fn flag_from_row(row: &Row<'_>) -> rusqlite::Result<Result<FeatureFlag, StoreError>> {
    let name: String = row.get(0)?;
    let enabled: bool = row.get(1)?;
    let rollout: i64 = row.get(2)?;
    let allow_list: String = row.get(3)?;
    let deny_list: String = row.get(4)?;
    let metadata: String = row.get(5)?;
    let version: i64 = row.get(6)?;
    let created_at: i64 = row.get(7)?;
    let updated_at: i64 = row.get(8)?;
    Ok(parse_flag(
        name,
        enabled,
        rollout,
        &allow_list,
        &deny_list,
        &metadata,
        version,
        created_at,
        updated_at,
    ))
}

#[allow(clippy::too_many_arguments)]
fn parse_flag(
    name: String,
    enabled: bool,
    rollout: i64,
    allow_list: &str,
    deny_list: &str,
    metadata: &str,
    version: i64,
    created_at: i64,
    updated_at: i64,
) -> Result<FeatureFlag, StoreError> {
    let name = FlagName::parse(name.clone()).map_err(|_| corrupt("flag name", name))?;
    Ok(FeatureFlag {
        enabled,
        rollout: Rollout::new(rollout).map_err(|_| corrupt("flag rollout", rollout))?,
        allow_list: parse_users("flag allow list", allow_list)?,
        deny_list: parse_users("flag deny list", deny_list)?,
        metadata: serde_json::from_str(metadata).map_err(|_| corrupt("flag metadata", metadata))?,
        version: u64::try_from(version).map_err(|_| corrupt("flag version", version))?,
        created_at: from_millis(created_at),
        updated_at: from_millis(updated_at),
        name,
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

fn read_flag(conn: &Connection, name: &FlagName) -> Result<Option<FeatureFlag>, StoreError> {
    let row = conn
        .prepare_cached(SELECT_FLAG)
        .and_then(|mut stmt| stmt.query_row([name.as_str()], flag_from_row).optional())
        .map_err(db_error("read feature flag"))?;
    row.transpose()
}

fn read_revision(conn: &Connection) -> Result<u64, StoreError> {
    let revision: i64 = conn
        .prepare_cached(READ_REVISION)
        .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)))
        .map_err(db_error("read feature flag revision"))?;
    u64::try_from(revision).map_err(|_| corrupt("flag revision", revision))
}

/// Adds 1 to the revision and returns the new value as stored.
fn bump_revision(conn: &Connection) -> Result<i64, StoreError> {
    conn.prepare_cached(BUMP_REVISION)
        .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)))
        .map_err(db_error("bump feature flag revision"))
}

/// Stored form of a version: versions start at 1 and grow by 1 per change,
/// so one that does not fit an `i64` is a bug, not an input.
fn version_column(version: u64) -> Result<i64, StoreError> {
    i64::try_from(version).map_err(|_| corrupt("flag version", version))
}

/// Writes the audit entry and bumps the revision; the caller has already
/// written the change itself in the same transaction.
fn record_change(
    conn: &Connection,
    name: &FlagName,
    action: FlagAction,
    actor: &UserId,
    now_ms: i64,
    before: Option<&FeatureFlag>,
    after: Option<&FeatureFlag>,
) -> Result<u64, StoreError> {
    let revision = bump_revision(conn)?;
    let before = before.map(flag_json).transpose()?;
    let after = after.map(flag_json).transpose()?;
    conn.prepare_cached(INSERT_AUDIT)
        .and_then(|mut stmt| {
            stmt.execute(params![
                name.as_str(),
                action.as_str(),
                actor.as_str(),
                revision,
                now_ms,
                before,
                after
            ])
        })
        .map_err(db_error("write feature flag audit entry"))?;
    u64::try_from(revision).map_err(|_| corrupt("flag revision", revision))
}

fn create_in(
    conn: &Connection,
    flag: FeatureFlag,
    actor: &UserId,
) -> Result<Outcome<FlagChange>, StoreError> {
    let allow_list = users_json(&flag.allow_list)?;
    let deny_list = users_json(&flag.deny_list)?;
    let version = version_column(flag.version)?;
    let inserted = conn
        .prepare_cached(INSERT_FLAG)
        .and_then(|mut stmt| {
            stmt.execute(params![
                flag.name.as_str(),
                flag.enabled,
                flag.rollout.percent(),
                allow_list,
                deny_list,
                flag.metadata.to_string(),
                version,
                to_millis(flag.created_at),
                to_millis(flag.updated_at),
            ])
        })
        .map_err(db_error("create feature flag"))?;
    if inserted == 0 {
        return Ok(Err(FlagStoreError::AlreadyExists { name: flag.name }));
    }

    let revision = record_change(
        conn,
        &flag.name,
        FlagAction::Created,
        actor,
        to_millis(flag.created_at),
        None,
        Some(&flag),
    )?;
    Ok(Ok(FlagChange {
        flag,
        action: Some(FlagAction::Created),
        revision,
    }))
}

fn update_in(
    conn: &Connection,
    name: &FlagName,
    patch: &FlagPatch,
    actor: &UserId,
    now: DateTime<Utc>,
) -> Result<Outcome<FlagChange>, StoreError> {
    let Some(current) = read_flag(conn, name)? else {
        return Ok(Err(FlagStoreError::NotFound { name: name.clone() }));
    };
    if let Err(conflict) = check_flag_version(&current, patch.expected_version) {
        return Ok(Err(conflict));
    }
    let Some(next) = patch.apply(&current, now) else {
        return Ok(Ok(FlagChange {
            flag: current,
            action: None,
            revision: read_revision(conn)?,
        }));
    };

    let allow_list = users_json(&next.allow_list)?;
    let deny_list = users_json(&next.deny_list)?;
    let next_version = version_column(next.version)?;
    let current_version = version_column(current.version)?;
    let updated = conn
        .prepare_cached(UPDATE_FLAG)
        .and_then(|mut stmt| {
            stmt.execute(params![
                name.as_str(),
                next.enabled,
                next.rollout.percent(),
                allow_list,
                deny_list,
                next.metadata.to_string(),
                next_version,
                to_millis(next.updated_at),
                current_version,
            ])
        })
        .map_err(db_error("update feature flag"))?;
    if updated != 1 {
        // The row was read in this transaction, which holds the write lock.
        return Err(corrupt("flag row count after update", updated));
    }

    let revision = record_change(
        conn,
        name,
        FlagAction::Updated,
        actor,
        to_millis(now),
        Some(&current),
        Some(&next),
    )?;
    Ok(Ok(FlagChange {
        flag: next,
        action: Some(FlagAction::Updated),
        revision,
    }))
}

fn delete_in(
    conn: &Connection,
    name: &FlagName,
    expected_version: Option<u64>,
    actor: &UserId,
    now: DateTime<Utc>,
) -> Result<Outcome<FlagChange>, StoreError> {
    let Some(current) = read_flag(conn, name)? else {
        return Ok(Err(FlagStoreError::NotFound { name: name.clone() }));
    };
    if let Err(conflict) = check_flag_version(&current, expected_version) {
        return Ok(Err(conflict));
    }

    let current_version = version_column(current.version)?;
    let deleted = conn
        .prepare_cached(DELETE_FLAG)
        .and_then(|mut stmt| stmt.execute(params![name.as_str(), current_version]))
        .map_err(db_error("delete feature flag"))?;
    if deleted != 1 {
        return Err(corrupt("flag row count after delete", deleted));
    }

    let revision = record_change(
        conn,
        name,
        FlagAction::Deleted,
        actor,
        to_millis(now),
        Some(&current),
        None,
    )?;
    Ok(Ok(FlagChange {
        flag: current,
        action: Some(FlagAction::Deleted),
        revision,
    }))
}

fn audit_from_row(row: &Row<'_>) -> rusqlite::Result<Result<FlagAuditEntry, StoreError>> {
    let id: i64 = row.get(0)?;
    let flag: String = row.get(1)?;
    let action: String = row.get(2)?;
    let actor: String = row.get(3)?;
    let revision: i64 = row.get(4)?;
    let at: i64 = row.get(5)?;
    let before: Option<String> = row.get(6)?;
    let after: Option<String> = row.get(7)?;
    Ok(parse_audit(
        id, flag, &action, actor, revision, at, before, after,
    ))
}

#[allow(clippy::too_many_arguments)]
fn parse_audit(
    id: i64,
    flag: String,
    action: &str,
    actor: String,
    revision: i64,
    at: i64,
    before: Option<String>,
    after: Option<String>,
) -> Result<FlagAuditEntry, StoreError> {
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
            .map_err(|_| corrupt("flag audit action", action))?,
        actor: UserId::new(actor),
        at: from_millis(at),
        revision: u64::try_from(revision).map_err(|_| corrupt("flag audit revision", revision))?,
        before: json("flag audit before", before)?,
        after: json("flag audit after", after)?,
    })
}

/// Drops sub-millisecond precision, so the flag a write returns equals the
/// one a later read returns.
fn stored_time(now: DateTime<Utc>) -> DateTime<Utc> {
    from_millis(to_millis(now))
}

impl SqliteStore {
    /// Runs a flag write through the single writer and flattens its
    /// flag-level outcome into the error type of [`FlagStore`].
    async fn write_flag<F>(
        &self,
        operation: &'static str,
        actor: &UserId,
        work: F,
    ) -> Result<FlagChange, FlagStoreError>
    where
        F: FnOnce(&Connection) -> Result<Outcome<FlagChange>, StoreError> + Send + 'static,
    {
        let outcome = self.writer().write(operation, false, work).await?;
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
}

#[async_trait]
impl FlagStore for SqliteStore {
    async fn list_flags(&self) -> Result<FlagListing, FlagStoreError> {
        let listing = self
            .read("list feature flags", |conn| {
                // One read transaction, so the revision matches the rows.
                let transaction = conn
                    .unchecked_transaction()
                    .map_err(db_error("list feature flags"))?;
                let revision = read_revision(&transaction)?;
                let flags = {
                    let mut stmt = transaction
                        .prepare_cached(SELECT_ALL_FLAGS)
                        .map_err(db_error("list feature flags"))?;
                    let rows = stmt
                        .query_map([], flag_from_row)
                        .map_err(db_error("list feature flags"))?;
                    let mut flags = Vec::new();
                    for row in rows {
                        flags.push(row.map_err(db_error("list feature flags"))??);
                    }
                    flags
                };
                transaction
                    .commit()
                    .map_err(db_error("list feature flags"))?;
                Ok(FlagListing { revision, flags })
            })
            .await?;
        Ok(listing)
    }

    async fn get_flag(&self, name: &FlagName) -> Result<FeatureFlag, FlagStoreError> {
        let key = name.clone();
        let flag = self
            .read("read feature flag", move |conn| read_flag(conn, &key))
            .await?;
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
        let actor_id = actor.clone();
        self.write_flag("create feature flag", actor, move |conn| {
            create_in(conn, flag, &actor_id)
        })
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
        let name = name.clone();
        let actor_id = actor.clone();
        let now = stored_time(now);
        self.write_flag("update feature flag", actor, move |conn| {
            update_in(conn, &name, &patch, &actor_id, now)
        })
        .await
    }

    async fn delete_flag(
        &self,
        name: &FlagName,
        expected_version: Option<u64>,
        actor: &UserId,
        now: DateTime<Utc>,
    ) -> Result<FlagChange, FlagStoreError> {
        validate_actor(actor)?;
        let name = name.clone();
        let actor_id = actor.clone();
        let now = stored_time(now);
        self.write_flag("delete feature flag", actor, move |conn| {
            delete_in(conn, &name, expected_version, &actor_id, now)
        })
        .await
    }

    async fn list_flag_audit(
        &self,
        name: &FlagName,
        filter: AuditFilter,
    ) -> Result<Page<FlagAuditEntry>, FlagStoreError> {
        let name = name.clone();
        let limit = filter.page_size();
        let before_id = filter.cursor.unwrap_or(i64::MAX);
        let page = self
            .read("list feature flag audit", move |conn| {
                let mut stmt = conn
                    .prepare_cached(SELECT_AUDIT)
                    .map_err(db_error("list feature flag audit"))?;
                let rows = stmt
                    .query_map(params![name.as_str(), before_id, limit + 1], audit_from_row)
                    .map_err(db_error("list feature flag audit"))?;
                let mut entries = Vec::new();
                for row in rows {
                    entries.push(row.map_err(db_error("list feature flag audit"))??);
                }

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
            })
            .await?;
        Ok(page)
    }

    async fn flag_revision(&self) -> Result<u64, FlagStoreError> {
        let revision = self
            .read("read feature flag revision", read_revision)
            .await?;
        Ok(revision)
    }
}

#[cfg(test)]
mod tests {
    //! Checks that depend on SQLite itself. The backend-independent checks
    //! are in the store-conformance crate, run by `tests/flags.rs`.

    #![allow(clippy::unwrap_used)]

    use chrono::{Duration, TimeZone};

    use super::*;
    use crate::SqliteConfig;

    const SEEDED: &str = "batch_operations";

    async fn open(dir: &tempfile::TempDir) -> SqliteStore {
        SqliteStore::open(SqliteConfig::new(dir.path().join("flags.db")))
            .await
            .unwrap()
    }

    fn name(text: &str) -> FlagName {
        FlagName::parse(text).unwrap()
    }

    fn admin() -> UserId {
        UserId::new("admin-1")
    }

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2030, 1, 2, 3, 4, 5).unwrap() + Duration::milliseconds(678)
    }

    #[tokio::test]
    async fn seed_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        store
            .update_flag(
                &name(SEEDED),
                FlagPatch {
                    rollout: Some(Rollout::new(40).unwrap()),
                    ..FlagPatch::default()
                },
                &admin(),
                t0(),
            )
            .await
            .unwrap();
        drop(store);

        let reopened = open(&dir).await;
        let flag = reopened.get_flag(&name(SEEDED)).await.unwrap();
        assert_eq!(flag.rollout.percent(), 40);
        assert_eq!(flag.version, 2);
    }

    #[tokio::test]
    async fn database_checks_back_up_validation() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        // Bypass the typed API to show that the schema rejects a rollout
        // outside 0..=100 on its own.
        let result = store
            .writer()
            .write("insert invalid flag", false, |conn| {
                conn.execute(
                    "INSERT INTO feature_flags (name, enabled, rollout, version, created_at, updated_at)
                     VALUES ('bad', 1, 101, 1, 0, 0)",
                    [],
                )
                .map_err(db_error("insert invalid flag"))
            })
            .await;
        assert!(result.is_err());
        assert_eq!(store.list_flags().await.unwrap().flags.len(), 1);
    }
}
