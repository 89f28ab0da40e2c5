//! Feature flags: the validated model, the change and audit records, and the
//! [`FlagStore`] trait that a storage backend implements.
//!
//! A flag is switched per user. Evaluation (in the `flags` crate) checks the
//! deny list, then the allow list, then `enabled`, then the user's rollout
//! bucket. This module only contains the data and its validation, so every
//! backend rejects the same inputs with the same errors.
//!
//! Invariants that every [`FlagStore`] keeps:
//! - A flag's `version` starts at 1 and grows by exactly 1 with each change.
//!   A patch that changes nothing leaves it, and `updated_at`, as they are.
//! - Every create, update and delete writes one [`FlagAuditEntry`] and
//!   bumps the store's flag revision by 1, in the same transaction as the
//!   change itself.
//! - The revision never decreases while the database exists, so a cache
//!   that sees the same revision twice knows nothing has changed.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::error::StoreError;
use crate::ids::UserId;
use crate::store::Page;

/// Maximum length of a flag name, in bytes. Names are ASCII, so this is
/// also the maximum number of characters.
pub const MAX_FLAG_NAME_LEN: usize = 64;

/// Maximum number of user ids in an allow list or a deny list. Evaluation
/// keeps both lists in memory in every process, and a longer list is a sign
/// that the flag wants a rollout percentage instead.
pub const MAX_FLAG_LIST_LEN: usize = 1_000;

/// Maximum length of one user id in a list, and of an actor id, in bytes.
pub const MAX_FLAG_USER_ID_LEN: usize = 256;

/// Maximum size of a flag's metadata, as compact JSON, in bytes.
pub const MAX_FLAG_METADATA_BYTES: usize = 16 * 1024;

/// Default and maximum page sizes of an audit listing.
pub const DEFAULT_AUDIT_PAGE: u32 = 100;
pub const MAX_AUDIT_PAGE: u32 = 1_000;

/// An input that a flag, a patch or an actor id may not contain.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FlagValidationError {
    #[error(
        "flag name is empty; use 1 to {MAX_FLAG_NAME_LEN} lowercase letters, digits, '_', '-' or '.'"
    )]
    EmptyName,

    #[error("flag name is {length} bytes long; use at most {MAX_FLAG_NAME_LEN}")]
    NameTooLong { length: usize },

    #[error("flag name {name:?} starts with {found:?}; start it with a lowercase letter")]
    InvalidNameStart { name: String, found: char },

    #[error(
        "flag name {name:?} contains {found:?} at byte {position}; use only lowercase letters, digits, '_', '-' and '.'"
    )]
    InvalidNameChar {
        name: String,
        found: char,
        position: usize,
    },

    #[error("rollout {value} is out of range; use a percentage from 0 to 100")]
    RolloutOutOfRange { value: i64 },

    #[error("the {list} list has {length} user ids; use at most {MAX_FLAG_LIST_LEN}")]
    ListTooLong { list: UserListKind, length: usize },

    #[error("the {list} list contains an empty user id; remove it")]
    EmptyUserId { list: UserListKind },

    #[error(
        "the {list} list contains a user id of {length} bytes; use at most {MAX_FLAG_USER_ID_LEN}"
    )]
    UserIdTooLong { list: UserListKind, length: usize },

    #[error("flag metadata is {length} bytes of JSON; use at most {MAX_FLAG_METADATA_BYTES}")]
    MetadataTooLarge { length: usize },

    #[error("actor user id is empty; pass the id of the user making the change")]
    EmptyActor,

    #[error("actor user id is {length} bytes long; use at most {MAX_FLAG_USER_ID_LEN}")]
    ActorTooLong { length: usize },
}

/// Errors of the [`FlagStore`] operations.
#[derive(Debug, Error)]
pub enum FlagStoreError {
    #[error(transparent)]
    Invalid(#[from] FlagValidationError),

    #[error("feature flag {name} not found")]
    NotFound { name: FlagName },

    #[error("feature flag {name} already exists; update it instead")]
    AlreadyExists { name: FlagName },

    /// Optimistic concurrency: someone else changed the flag since the
    /// caller read it.
    #[error(
        "feature flag {name} is at version {actual}, not the expected {expected}; read it again and retry"
    )]
    VersionConflict {
        name: FlagName,
        expected: u64,
        actual: u64,
    },

    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Which of a flag's two user lists a value belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UserListKind {
    Allow,
    Deny,
}

impl fmt::Display for UserListKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UserListKind::Allow => "allow",
            UserListKind::Deny => "deny",
        })
    }
}

/// A validated flag name: 1 to [`MAX_FLAG_NAME_LEN`] bytes of lowercase
/// ASCII letters, digits, `_`, `-` and `.`, starting with a letter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FlagName(String);

impl FlagName {
    /// Validates `name` and wraps it.
    pub fn parse(name: impl Into<String>) -> Result<Self, FlagValidationError> {
        let name = name.into();
        validate_name(&name)?;
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn validate_name(name: &str) -> Result<(), FlagValidationError> {
    let mut chars = name.char_indices();
    let Some((_, first)) = chars.next() else {
        return Err(FlagValidationError::EmptyName);
    };
    if name.len() > MAX_FLAG_NAME_LEN {
        return Err(FlagValidationError::NameTooLong { length: name.len() });
    }
    if !first.is_ascii_lowercase() {
        return Err(FlagValidationError::InvalidNameStart {
            name: name.to_owned(),
            found: first,
        });
    }
    for (position, found) in chars {
        let allowed = found.is_ascii_lowercase()
            || found.is_ascii_digit()
            || matches!(found, '_' | '-' | '.');
        if !allowed {
            return Err(FlagValidationError::InvalidNameChar {
                name: name.to_owned(),
                found,
                position,
            });
        }
    }
    Ok(())
}

impl fmt::Display for FlagName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for FlagName {
    type Err = FlagValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for FlagName {
    type Error = FlagValidationError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(value)
    }
}

impl From<FlagName> for String {
    fn from(name: FlagName) -> Self {
        name.0
    }
}

impl AsRef<str> for FlagName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The share of users, in percent from 0 to 100, for whom an enabled flag
/// is on. A user is in when their bucket (1 to 100) is at most this value,
/// so 0 admits nobody and 100 admits everybody.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "u8")]
pub struct Rollout(u8);

impl Rollout {
    pub const NONE: Rollout = Rollout(0);
    pub const FULL: Rollout = Rollout(100);

    /// Validates a percentage. Takes an `i64` so that a negative or huge
    /// request value gets the same clear error as 101.
    pub fn new(percent: i64) -> Result<Self, FlagValidationError> {
        match u8::try_from(percent) {
            Ok(value) if value <= 100 => Ok(Self(value)),
            _ => Err(FlagValidationError::RolloutOutOfRange { value: percent }),
        }
    }

    pub fn percent(self) -> u8 {
        self.0
    }
}

impl TryFrom<i64> for Rollout {
    type Error = FlagValidationError;

    fn try_from(value: i64) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<Rollout> for u8 {
    fn from(rollout: Rollout) -> Self {
        rollout.0
    }
}

impl fmt::Display for Rollout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

/// A stored feature flag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FeatureFlag {
    pub name: FlagName,
    pub enabled: bool,
    pub rollout: Rollout,
    /// Users for whom the flag is on whatever `enabled` and `rollout` say,
    /// unless they are also on the deny list.
    pub allow_list: BTreeSet<UserId>,
    /// Users for whom the flag is always off. The deny list wins over the
    /// allow list.
    pub deny_list: BTreeSet<UserId>,
    /// Free JSON for operators (owner, ticket, expiry); evaluation ignores it.
    pub metadata: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// 1 when created, plus 1 for each change since.
    pub version: u64,
}

impl FeatureFlag {
    /// Builds the first version of a validated new flag.
    pub fn from_new(new: NewFlag, now: DateTime<Utc>) -> Self {
        Self {
            name: new.name,
            enabled: new.enabled,
            rollout: new.rollout,
            allow_list: new.allow_list,
            deny_list: new.deny_list,
            metadata: new.metadata,
            created_at: now,
            updated_at: now,
            version: 1,
        }
    }
}

/// A flag to create. The name and rollout are valid by construction; call
/// [`NewFlag::validate`] (every store does) for the lists and metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct NewFlag {
    pub name: FlagName,
    pub enabled: bool,
    pub rollout: Rollout,
    pub allow_list: BTreeSet<UserId>,
    pub deny_list: BTreeSet<UserId>,
    pub metadata: serde_json::Value,
}

impl NewFlag {
    /// A disabled flag at rollout 0 with empty lists and `{}` as metadata.
    pub fn new(name: FlagName) -> Self {
        Self {
            name,
            enabled: false,
            rollout: Rollout::NONE,
            allow_list: BTreeSet::new(),
            deny_list: BTreeSet::new(),
            metadata: empty_metadata(),
        }
    }

    /// Checks the list bounds, the user ids and the metadata size.
    pub fn validate(&self) -> Result<(), FlagValidationError> {
        validate_list(UserListKind::Allow, &self.allow_list)?;
        validate_list(UserListKind::Deny, &self.deny_list)?;
        validate_metadata(&self.metadata)
    }
}

/// A partial change to a flag: `None` fields keep their current value, and
/// a list given here replaces the whole stored list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlagPatch {
    pub enabled: Option<bool>,
    pub rollout: Option<Rollout>,
    pub allow_list: Option<BTreeSet<UserId>>,
    pub deny_list: Option<BTreeSet<UserId>>,
    pub metadata: Option<serde_json::Value>,
    /// When set, the change applies only if the stored flag is at this
    /// version; otherwise the store returns
    /// [`FlagStoreError::VersionConflict`] and writes nothing.
    pub expected_version: Option<u64>,
}

impl FlagPatch {
    /// Checks the fields the patch sets, as [`NewFlag::validate`] does.
    pub fn validate(&self) -> Result<(), FlagValidationError> {
        if let Some(list) = &self.allow_list {
            validate_list(UserListKind::Allow, list)?;
        }
        if let Some(list) = &self.deny_list {
            validate_list(UserListKind::Deny, list)?;
        }
        if let Some(metadata) = &self.metadata {
            validate_metadata(metadata)?;
        }
        Ok(())
    }

    /// Returns the flag with this patch applied, its version bumped and
    /// `updated_at` set to `now`, or `None` when the patch changes no field.
    /// The expected version is not checked here.
    pub fn apply(&self, current: &FeatureFlag, now: DateTime<Utc>) -> Option<FeatureFlag> {
        let mut next = current.clone();
        if let Some(enabled) = self.enabled {
            next.enabled = enabled;
        }
        if let Some(rollout) = self.rollout {
            next.rollout = rollout;
        }
        if let Some(list) = &self.allow_list {
            next.allow_list = list.clone();
        }
        if let Some(list) = &self.deny_list {
            next.deny_list = list.clone();
        }
        if let Some(metadata) = &self.metadata {
            next.metadata = metadata.clone();
        }
        if next == *current {
            return None;
        }
        next.version = current.version.saturating_add(1);
        next.updated_at = now;
        Some(next)
    }
}

/// Returns the expected-version error when `expected` is set and differs
/// from the stored flag's version.
pub fn check_flag_version(
    current: &FeatureFlag,
    expected: Option<u64>,
) -> Result<(), FlagStoreError> {
    match expected {
        Some(expected) if expected != current.version => Err(FlagStoreError::VersionConflict {
            name: current.name.clone(),
            expected,
            actual: current.version,
        }),
        _ => Ok(()),
    }
}

/// Checks the id of the user who makes a change, before it is written into
/// the audit log.
pub fn validate_actor(actor: &UserId) -> Result<(), FlagValidationError> {
    let length = actor.as_str().len();
    if length == 0 {
        return Err(FlagValidationError::EmptyActor);
    }
    if length > MAX_FLAG_USER_ID_LEN {
        return Err(FlagValidationError::ActorTooLong { length });
    }
    Ok(())
}

fn validate_list(list: UserListKind, users: &BTreeSet<UserId>) -> Result<(), FlagValidationError> {
    if users.len() > MAX_FLAG_LIST_LEN {
        return Err(FlagValidationError::ListTooLong {
            list,
            length: users.len(),
        });
    }
    for user in users {
        let length = user.as_str().len();
        if length == 0 {
            return Err(FlagValidationError::EmptyUserId { list });
        }
        if length > MAX_FLAG_USER_ID_LEN {
            return Err(FlagValidationError::UserIdTooLong { list, length });
        }
    }
    Ok(())
}

fn validate_metadata(metadata: &serde_json::Value) -> Result<(), FlagValidationError> {
    // Display of a JSON value writes compact JSON, the form that is stored.
    let length = metadata.to_string().len();
    if length > MAX_FLAG_METADATA_BYTES {
        return Err(FlagValidationError::MetadataTooLarge { length });
    }
    Ok(())
}

fn empty_metadata() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

/// What a change did to a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlagAction {
    Created,
    Updated,
    Deleted,
}

impl FlagAction {
    pub fn as_str(self) -> &'static str {
        match self {
            FlagAction::Created => "created",
            FlagAction::Updated => "updated",
            FlagAction::Deleted => "deleted",
        }
    }
}

impl fmt::Display for FlagAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FlagAction {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "created" => Ok(FlagAction::Created),
            "updated" => Ok(FlagAction::Updated),
            "deleted" => Ok(FlagAction::Deleted),
            other => Err(format!("unknown flag action {other:?}")),
        }
    }
}

/// One recorded change of a flag. Entries outlive the flag, so the history
/// of a deleted flag can still be read.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FlagAuditEntry {
    /// Increases with every entry in the store; the listing cursor.
    pub id: i64,
    pub flag: FlagName,
    pub action: FlagAction,
    /// The user who made the change.
    pub actor: UserId,
    pub at: DateTime<Utc>,
    /// The store's flag revision right after this change.
    pub revision: u64,
    /// The flag as JSON before the change; `None` for a creation.
    pub before: Option<serde_json::Value>,
    /// The flag as JSON after the change; `None` for a deletion.
    pub after: Option<serde_json::Value>,
}

/// A page request for a flag's audit entries, newest first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Return entries older than this entry id.
    pub cursor: Option<i64>,
    /// 0 means [`DEFAULT_AUDIT_PAGE`]; larger values are capped at
    /// [`MAX_AUDIT_PAGE`].
    pub limit: u32,
}

impl AuditFilter {
    pub fn page_size(&self) -> u32 {
        match self.limit {
            0 => DEFAULT_AUDIT_PAGE,
            limit => limit.min(MAX_AUDIT_PAGE),
        }
    }
}

/// The result of a committed create, update or delete.
#[derive(Debug, Clone, PartialEq)]
pub struct FlagChange {
    /// The flag after the change, or, for a deletion, the flag as it was
    /// just before it was deleted.
    pub flag: FeatureFlag,
    /// What the change did, or `None` when a patch changed nothing and no
    /// write happened.
    pub action: Option<FlagAction>,
    /// The store's flag revision after the change. For a patch that changed
    /// nothing, the revision when the flag was read.
    pub revision: u64,
}

/// Every flag and the revision they reflect, read in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct FlagListing {
    pub revision: u64,
    /// Sorted by name.
    pub flags: Vec<FeatureFlag>,
}

/// Storage of feature flags.
#[async_trait]
pub trait FlagStore: Send + Sync + 'static {
    /// Reads every flag and the current revision as one consistent view.
    async fn list_flags(&self) -> Result<FlagListing, FlagStoreError>;

    async fn get_flag(&self, name: &FlagName) -> Result<FeatureFlag, FlagStoreError>;

    /// Creates a flag at version 1, or returns
    /// [`FlagStoreError::AlreadyExists`].
    async fn create_flag(
        &self,
        flag: NewFlag,
        actor: &UserId,
        now: DateTime<Utc>,
    ) -> Result<FlagChange, FlagStoreError>;

    /// Applies a patch, checking `patch.expected_version` when it is set.
    /// A patch that changes nothing writes nothing, not even an audit entry.
    async fn update_flag(
        &self,
        name: &FlagName,
        patch: FlagPatch,
        actor: &UserId,
        now: DateTime<Utc>,
    ) -> Result<FlagChange, FlagStoreError>;

    /// Deletes a flag, checking `expected_version` when it is set.
    async fn delete_flag(
        &self,
        name: &FlagName,
        expected_version: Option<u64>,
        actor: &UserId,
        now: DateTime<Utc>,
    ) -> Result<FlagChange, FlagStoreError>;

    /// Lists a flag's audit entries, newest first. A flag that never
    /// existed has an empty history rather than a not-found error.
    async fn list_flag_audit(
        &self,
        name: &FlagName,
        filter: AuditFilter,
    ) -> Result<Page<FlagAuditEntry>, FlagStoreError>;

    /// Reads the revision alone: one small read, for caches that poll.
    async fn flag_revision(&self) -> Result<u64, FlagStoreError>;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn flag(name: &str) -> FeatureFlag {
        FeatureFlag::from_new(
            NewFlag::new(FlagName::parse(name).unwrap()),
            DateTime::<Utc>::UNIX_EPOCH,
        )
    }

    fn users(ids: &[&str]) -> BTreeSet<UserId> {
        ids.iter().map(|id| UserId::new(*id)).collect()
    }

    #[test]
    fn name_accepts_allowed_characters() {
        for name in ["a", "batch_operations", "checkout.v2", "new-ui", "a1_-.z"] {
            assert_eq!(FlagName::parse(name).unwrap().as_str(), name);
        }
        let longest = "a".repeat(MAX_FLAG_NAME_LEN);
        assert!(FlagName::parse(longest).is_ok());
    }

    #[test]
    fn name_rejects_empty() {
        assert_eq!(FlagName::parse(""), Err(FlagValidationError::EmptyName));
    }

    #[test]
    fn name_rejects_overlong() {
        let name = "a".repeat(MAX_FLAG_NAME_LEN + 1);
        assert_eq!(
            FlagName::parse(name),
            Err(FlagValidationError::NameTooLong { length: 65 })
        );
    }

    #[test]
    fn name_rejects_bad_start() {
        for (name, found) in [
            ("1abc", '1'),
            ("_abc", '_'),
            ("Abc", 'A'),
            (".a", '.'),
            ("é", 'é'),
        ] {
            assert_eq!(
                FlagName::parse(name),
                Err(FlagValidationError::InvalidNameStart {
                    name: name.to_owned(),
                    found
                }),
                "name {name:?}"
            );
        }
    }

    #[test]
    fn name_rejects_bad_characters() {
        for (name, found, position) in [
            ("aB", 'B', 1),
            ("a b", ' ', 1),
            ("a/b", '/', 1),
            ("ab:c", ':', 2),
        ] {
            assert_eq!(
                FlagName::parse(name),
                Err(FlagValidationError::InvalidNameChar {
                    name: name.to_owned(),
                    found,
                    position
                }),
                "name {name:?}"
            );
        }
    }

    #[test]
    fn name_error_messages_name_the_fix() {
        let message = FlagName::parse("Bad").unwrap_err().to_string();
        assert_eq!(
            message,
            "flag name \"Bad\" starts with 'B'; start it with a lowercase letter"
        );
    }

    #[test]
    fn name_deserializes_with_validation() {
        let name: FlagName = serde_json::from_str("\"ok.name\"").unwrap();
        assert_eq!(name.as_str(), "ok.name");
        assert!(serde_json::from_str::<FlagName>("\"Not ok\"").is_err());
    }

    #[test]
    fn rollout_accepts_0_to_100() {
        assert_eq!(Rollout::new(0).unwrap(), Rollout::NONE);
        assert_eq!(Rollout::new(100).unwrap(), Rollout::FULL);
        assert_eq!(Rollout::new(37).unwrap().percent(), 37);
    }

    #[test]
    fn rollout_rejects_out_of_range() {
        for value in [-1, 101, 255, 256, i64::MIN, i64::MAX] {
            assert_eq!(
                Rollout::new(value),
                Err(FlagValidationError::RolloutOutOfRange { value }),
                "value {value}"
            );
        }
        assert!(serde_json::from_str::<Rollout>("101").is_err());
        assert!(serde_json::from_str::<Rollout>("-5").is_err());
    }

    #[test]
    fn lists_are_bounded() {
        let mut new = NewFlag::new(FlagName::parse("f").unwrap());
        new.allow_list = (0..=MAX_FLAG_LIST_LEN)
            .map(|i| UserId::new(format!("u{i}")))
            .collect();
        assert_eq!(
            new.validate(),
            Err(FlagValidationError::ListTooLong {
                list: UserListKind::Allow,
                length: MAX_FLAG_LIST_LEN + 1
            })
        );

        new.allow_list = (0..MAX_FLAG_LIST_LEN)
            .map(|i| UserId::new(format!("u{i}")))
            .collect();
        assert_eq!(new.validate(), Ok(()));
    }

    #[test]
    fn list_user_ids_are_checked() {
        let mut new = NewFlag::new(FlagName::parse("f").unwrap());
        new.deny_list = users(&[""]);
        assert_eq!(
            new.validate(),
            Err(FlagValidationError::EmptyUserId {
                list: UserListKind::Deny
            })
        );

        new.deny_list = users(&[&"x".repeat(MAX_FLAG_USER_ID_LEN + 1)]);
        assert_eq!(
            new.validate(),
            Err(FlagValidationError::UserIdTooLong {
                list: UserListKind::Deny,
                length: MAX_FLAG_USER_ID_LEN + 1
            })
        );
    }

    #[test]
    fn metadata_is_bounded() {
        let patch = FlagPatch {
            metadata: Some(serde_json::json!({ "note": "x".repeat(MAX_FLAG_METADATA_BYTES) })),
            ..FlagPatch::default()
        };
        assert!(matches!(
            patch.validate(),
            Err(FlagValidationError::MetadataTooLarge { .. })
        ));
    }

    #[test]
    fn actor_is_checked() {
        assert_eq!(
            validate_actor(&UserId::new("")),
            Err(FlagValidationError::EmptyActor)
        );
        assert_eq!(
            validate_actor(&UserId::new("x".repeat(300))),
            Err(FlagValidationError::ActorTooLong { length: 300 })
        );
        assert_eq!(validate_actor(&UserId::new("admin-1")), Ok(()));
    }

    #[test]
    fn patch_bumps_version_once() {
        let current = flag("f");
        let later = DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::seconds(5);
        let patch = FlagPatch {
            enabled: Some(true),
            rollout: Some(Rollout::new(30).unwrap()),
            allow_list: Some(users(&["a", "b"])),
            ..FlagPatch::default()
        };
        let next = patch.apply(&current, later).unwrap();
        assert_eq!(next.version, 2);
        assert_eq!(next.updated_at, later);
        assert_eq!(next.created_at, current.created_at);
        assert!(next.enabled);
        assert_eq!(next.rollout.percent(), 30);
        assert_eq!(next.allow_list, users(&["a", "b"]));
        assert!(next.deny_list.is_empty());
    }

    #[test]
    fn patch_without_change_is_none() {
        let current = flag("f");
        assert_eq!(FlagPatch::default().apply(&current, Utc::now()), None);
        let same = FlagPatch {
            enabled: Some(false),
            rollout: Some(Rollout::NONE),
            ..FlagPatch::default()
        };
        assert_eq!(same.apply(&current, Utc::now()), None);
    }

    #[test]
    fn version_check_reports_both_versions() {
        let current = flag("f");
        assert!(check_flag_version(&current, None).is_ok());
        assert!(check_flag_version(&current, Some(1)).is_ok());
        match check_flag_version(&current, Some(4)) {
            Err(FlagStoreError::VersionConflict {
                expected, actual, ..
            }) => {
                assert_eq!(expected, 4);
                assert_eq!(actual, 1);
            }
            other => panic!("expected a version conflict, got {other:?}"),
        }
    }

    #[test]
    fn flag_round_trips_through_json() {
        let mut original = flag("round.trip");
        original.deny_list = users(&["z", "y"]);
        original.metadata = serde_json::json!({ "owner": "team-a" });
        let json = serde_json::to_value(&original).unwrap();
        assert_eq!(json["denyList"], serde_json::json!(["y", "z"]));
        assert_eq!(json["rollout"], serde_json::json!(0));
        let back: FeatureFlag = serde_json::from_value(json).unwrap();
        assert_eq!(back, original);
    }

    #[test]
    fn audit_page_size_defaults_and_caps() {
        assert_eq!(AuditFilter::default().page_size(), DEFAULT_AUDIT_PAGE);
        assert_eq!(
            AuditFilter {
                cursor: None,
                limit: 5
            }
            .page_size(),
            5
        );
        assert_eq!(
            AuditFilter {
                cursor: None,
                limit: 50_000
            }
            .page_size(),
            MAX_AUDIT_PAGE
        );
    }
}
