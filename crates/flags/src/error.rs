use domain::FlagStoreError;
use thiserror::Error;

/// Errors of starting a [`FlagService`](crate::FlagService). Errors of its
/// store operations are [`FlagStoreError`].
#[derive(Debug, Error)]
pub enum FlagError {
    #[error(
        "feature flag refresh interval is zero; set refresh_interval to a positive duration such as 2 s"
    )]
    ZeroRefreshInterval,

    #[error(
        "the feature flag service needs a tokio runtime; call FlagService::start from a task running on tokio"
    )]
    NoRuntime,

    #[error("loading the feature flags failed; check that the store is reachable and migrated")]
    Load(#[source] FlagStoreError),
}
