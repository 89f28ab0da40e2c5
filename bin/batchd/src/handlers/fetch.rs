//! The `fetch` handler: downloads one document per item into
//! content-addressed storage under the data directory.
//!
//! Item payload: `{"url": "https://..."}`; other fields are ignored.
//! Each download follows redirects itself, so that every hop is checked
//! against the address policy before it is sent, streams the body to a
//! temporary file while hashing it, and then renames the file to
//! `data_dir/documents/<first 2 hex digits>/<sha256 hex>`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use chrono::Utc;
use queue::{HandlerError, JobContext, JobHandler};
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderValue, LOCATION};
use reqwest::{Client, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use url::Url;

use super::attempt::Attempt;
use super::guard::{AddressPolicy, check_url, resolve_checked};
use super::host_limit::{HostRateLimit, HostRateLimiter};
use super::http::{
    build_client, guard_failure, host_of, read_excerpt, request_failure, status_failure, to_result,
};
use super::settings::{SetupError, default_user_agent, deserialize_seconds};

/// Directory under `data_dir` that contains stored documents.
const DOCUMENTS_DIR: &str = "documents";
/// Directory under the documents directory for downloads in progress. Its
/// name cannot clash with the two-hex-digit shard directories.
const TEMP_DIR: &str = "tmp";
/// Temporary files older than this are left over from a crash and are
/// removed when a handler starts. No download in progress is that old
/// unless the timeout is set to more than a day.
const STALE_TEMP_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// Body bytes of a failed response quoted in the error.
const MAX_ERROR_BODY: usize = 512;

/// Settings of the `fetch` handler. Config keys are snake_case:
/// `data_dir`, `max_bytes`, `allowed_content_types`, `max_redirects`,
/// `timeout_seconds`, `per_host_rate`, `policy`, `user_agent`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FetchSettings {
    /// Root of the document store; documents go under `documents/`.
    pub data_dir: PathBuf,
    /// Largest document in bytes; a larger one fails permanently.
    pub max_bytes: u64,
    /// Accepted media types, such as "application/pdf" or "text/*";
    /// "*/*" accepts any. Parameters such as charset are ignored.
    pub allowed_content_types: Vec<String>,
    /// Most redirects followed for one document.
    pub max_redirects: u32,
    /// Limit for each request of a redirect chain, from connecting to the
    /// end of the body.
    #[serde(rename = "timeout_seconds", deserialize_with = "deserialize_seconds")]
    pub timeout: Duration,
    pub per_host_rate: HostRateLimit,
    pub policy: AddressPolicy,
    pub user_agent: String,
}

impl FetchSettings {
    /// Default settings with documents stored under `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            ..Self::default()
        }
    }
}

impl Default for FetchSettings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("batchd-data"),
            max_bytes: 25 * 1024 * 1024,
            allowed_content_types: vec!["application/pdf".to_owned()],
            max_redirects: 5,
            timeout: Duration::from_secs(60),
            per_host_rate: HostRateLimit::default(),
            policy: AddressPolicy::default(),
            user_agent: default_user_agent(),
        }
    }
}

/// The `fetch` item payload.
#[derive(Debug, Deserialize)]
struct FetchPayload {
    url: String,
}

/// An entry of `allowed_content_types`, lowercased.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ContentTypePattern {
    Any,
    AnySubtype(String),
    Exact(String),
}

impl ContentTypePattern {
    fn parse(text: &str) -> Option<Self> {
        let essence = media_type_essence(text)?;
        if essence == "*/*" {
            return Some(ContentTypePattern::Any);
        }
        let (kind, subtype) = essence.split_once('/')?;
        if kind == "*" || !is_token(kind) {
            return None;
        }
        if subtype == "*" {
            Some(ContentTypePattern::AnySubtype(kind.to_owned()))
        } else if is_token(subtype) {
            Some(ContentTypePattern::Exact(essence))
        } else {
            None
        }
    }

    fn matches(&self, essence: &str) -> bool {
        match self {
            ContentTypePattern::Any => true,
            ContentTypePattern::AnySubtype(kind) => essence
                .split_once('/')
                .is_some_and(|(actual, _)| actual == kind),
            ContentTypePattern::Exact(expected) => essence == expected,
        }
    }

    fn as_accept(&self) -> String {
        match self {
            ContentTypePattern::Any => "*/*".to_owned(),
            ContentTypePattern::AnySubtype(kind) => format!("{kind}/*"),
            ContentTypePattern::Exact(essence) => essence.clone(),
        }
    }
}

/// Returns the lowercase "type/subtype" of a Content-Type value, without
/// parameters, or `None` when it has no slash.
fn media_type_essence(value: &str) -> Option<String> {
    let essence = value.split(';').next()?.trim().to_ascii_lowercase();
    let (kind, subtype) = essence.split_once('/')?;
    if kind.is_empty() || subtype.is_empty() || subtype.contains('/') {
        return None;
    }
    Some(essence)
}

/// Returns whether `text` is an RFC 9110 token, as the parts of a media type are.
fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte))
}

/// Downloads documents; see the module documentation.
///
/// Result JSON: `path` (relative to `data_dir`, with `/` separators),
/// `bytes`, `sha256` (lowercase hex), `contentType` (the media type
/// without parameters), `url` (from the payload) and `finalUrl` (after
/// redirects).
///
/// Outcomes: an invalid payload or URL, a blocked address, too many
/// redirects, a content type that is not allowed, a body over `max_bytes`,
/// 3xx without a usable Location and 4xx other than 408 and 429 fail
/// permanently. 429 and 503 with `Retry-After`, and the per-host rate
/// limit, ask to run again later without counting an attempt. 408, 429,
/// 5xx, timeouts, connection and local disk errors are retryable.
#[derive(Debug)]
pub struct FetchHandler {
    settings: FetchSettings,
    content_types: Vec<ContentTypePattern>,
    accept: HeaderValue,
    client: Client,
    limiter: HostRateLimiter,
    temp_dir: PathBuf,
}

impl FetchHandler {
    /// Checks the settings, creates the storage directories, removes
    /// temporary files left by a crash, and builds the HTTP client.
    pub fn new(settings: FetchSettings) -> Result<Self, SetupError> {
        let content_types = settings
            .allowed_content_types
            .iter()
            .map(|text| {
                ContentTypePattern::parse(text).ok_or_else(|| SetupError::ContentType(text.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if content_types.is_empty() {
            return Err(SetupError::NoContentTypes);
        }
        let accept = content_types
            .iter()
            .map(ContentTypePattern::as_accept)
            .collect::<Vec<_>>()
            .join(", ");
        // Every pattern is made of token characters, '/' and '*'.
        let accept =
            HeaderValue::from_str(&accept).map_err(|_| SetupError::ContentType(accept.clone()))?;

        if settings.timeout.is_zero() {
            return Err(SetupError::ZeroTimeout);
        }
        if HeaderValue::from_str(&settings.user_agent).is_err() {
            return Err(SetupError::UserAgent(settings.user_agent));
        }
        let limiter = HostRateLimiter::new(settings.per_host_rate)?;

        let temp_dir = settings.data_dir.join(DOCUMENTS_DIR).join(TEMP_DIR);
        std::fs::create_dir_all(&temp_dir).map_err(|source| SetupError::DataDir {
            path: temp_dir.clone(),
            source,
        })?;
        remove_stale_temp_files(&temp_dir, STALE_TEMP_AGE);

        let client = build_client(settings.policy, settings.timeout, &settings.user_agent)
            .map_err(SetupError::Client)?;
        Ok(Self {
            settings,
            content_types,
            accept,
            client,
            limiter,
            temp_dir,
        })
    }

    /// Runs one attempt; [`JobHandler::run`] calls this.
    pub async fn fetch(
        &self,
        attempt: &Attempt<'_>,
    ) -> Result<Option<Box<RawValue>>, HandlerError> {
        // Dropping the download on cancellation drops its temporary file,
        // which removes it.
        tokio::select! {
            biased;
            () = attempt.cancel.cancelled() => Err(HandlerError::Cancelled),
            result = self.download(attempt) => result,
        }
    }

    async fn download(&self, attempt: &Attempt<'_>) -> Result<Option<Box<RawValue>>, HandlerError> {
        let payload: FetchPayload = serde_json::from_str(attempt.payload).map_err(|error| {
            HandlerError::Permanent(format!(
                "invalid fetch payload: {error}; expected {{\"url\": \"https://...\"}}"
            ))
        })?;
        let original = Url::parse(&payload.url).map_err(|error| {
            HandlerError::Permanent(format!(
                "invalid url in the fetch payload: {error}; expected an absolute http(s) URL"
            ))
        })?;

        let (mut response, final_url) = self.follow_redirects(attempt, &original).await?;
        let target = format!("fetch from {}", host_of(&final_url));
        let content_type = self.check_content_type(&response, &target)?;
        if let Some(length) = response.content_length()
            && length > self.settings.max_bytes
        {
            return Err(HandlerError::Permanent(format!(
                "{target}: Content-Length {length} exceeds max_bytes {}; raise max_bytes to accept larger documents",
                self.settings.max_bytes
            )));
        }

        let stored = self.store_body(attempt, &mut response, &target).await?;
        tracing::debug!(
            job_id = %attempt.job_id,
            host = host_of(&final_url),
            bytes = stored.bytes,
            "document stored"
        );
        to_result(&serde_json::json!({
            "path": stored.relative_path,
            "bytes": stored.bytes,
            "sha256": stored.sha256,
            "contentType": content_type,
            "url": original.as_str(),
            "finalUrl": final_url.as_str(),
        }))
    }

    /// Sends the GET and follows up to `max_redirects` redirects, checking
    /// every hop against the policy and the per-host rate. Returns the
    /// final 2xx response and its URL. Any other final status becomes the
    /// matching handler error.
    async fn follow_redirects(
        &self,
        attempt: &Attempt<'_>,
        original: &Url,
    ) -> Result<(Response, Url), HandlerError> {
        let mut url = original.clone();
        let mut redirects = 0;
        loop {
            let host = host_of(&url);
            let target = format!("fetch from {host}");
            resolve_checked(&url, self.settings.policy)
                .await
                .map_err(|error| guard_failure(&error, &target))?;
            self.wait_for_rate(&url, redirects == 0, attempt).await?;

            let mut response = self
                .client
                .get(url.clone())
                .header(ACCEPT, self.accept.clone())
                .send()
                .await
                .map_err(|error| request_failure(&error, &target, self.settings.timeout))?;
            let status = response.status();
            tracing::debug!(
                job_id = %attempt.job_id,
                host,
                status = status.as_u16(),
                redirects,
                "fetch response received"
            );

            if status.is_success() {
                return Ok((response, url));
            }
            if is_followed_redirect(status) {
                if redirects >= self.settings.max_redirects {
                    return Err(HandlerError::Permanent(format!(
                        "fetch of {} stopped after {redirects} redirects, the max_redirects limit; the last response came from {host}. Submit the final URL or raise max_redirects",
                        host_of(original)
                    )));
                }
                let Some(location) = response.headers().get(LOCATION) else {
                    return Err(HandlerError::Permanent(format!(
                        "{target} returned HTTP {status} without a Location header"
                    )));
                };
                let Ok(location) = location.to_str() else {
                    return Err(HandlerError::Permanent(format!(
                        "{target} returned HTTP {status} with a Location header that is not visible ASCII"
                    )));
                };
                url = next_hop(&url, location, self.settings.policy)?;
                redirects += 1;
                continue;
            }

            let excerpt = read_excerpt(&mut response, MAX_ERROR_BODY).await;
            return Err(status_failure(
                status,
                response.headers(),
                &excerpt,
                &target,
                Utc::now(),
            ));
        }
    }

    /// Applies the per-host rate limit before a request. The first request
    /// of an attempt is put off with [`HandlerError::RetryAfter`] when the
    /// host is over its rate. A later hop of a redirect chain waits for its
    /// slot instead, because giving up there would waste the hops already
    /// made and could repeat forever on a chain longer than the burst.
    async fn wait_for_rate(
        &self,
        url: &Url,
        first_hop: bool,
        attempt: &Attempt<'_>,
    ) -> Result<(), HandlerError> {
        let host = host_of(url);
        let now = Instant::now();
        if first_hop {
            return self.limiter.try_acquire(host, now).map_err(|delay| {
                tracing::debug!(
                    job_id = %attempt.job_id,
                    host,
                    delay_ms = delay.as_millis(),
                    "fetch deferred by the per-host rate limit"
                );
                HandlerError::RetryAfter {
                    delay,
                    reason: format!(
                        "per-host rate limit of {} requests per second reached for {host}",
                        self.settings.per_host_rate.per_second
                    ),
                }
            });
        }
        let wait = self.limiter.reserve(host, now);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Ok(())
    }

    /// Returns the response's media type if it is allowed.
    fn check_content_type(
        &self,
        response: &Response,
        target: &str,
    ) -> Result<String, HandlerError> {
        let header = response.headers().get(CONTENT_TYPE);
        let Some(header) = header else {
            return Err(HandlerError::Permanent(format!(
                "{target} returned no Content-Type; allowed types are {}",
                self.settings.allowed_content_types.join(", ")
            )));
        };
        let essence = header.to_str().ok().and_then(media_type_essence);
        match essence {
            Some(essence)
                if self
                    .content_types
                    .iter()
                    .any(|pattern| pattern.matches(&essence)) =>
            {
                Ok(essence)
            }
            _ => Err(HandlerError::Permanent(format!(
                "{target} returned Content-Type {:?}, which is not allowed; allowed types are {}. Add the type to allowed_content_types to accept it",
                String::from_utf8_lossy(header.as_bytes()),
                self.settings.allowed_content_types.join(", ")
            ))),
        }
    }

    /// Streams the body to a temporary file while hashing and counting
    /// it, then moves the file into content-addressed storage.
    async fn store_body(
        &self,
        attempt: &Attempt<'_>,
        response: &mut Response,
        target: &str,
    ) -> Result<StoredDocument, HandlerError> {
        let max_bytes = self.settings.max_bytes;
        let expected = response.content_length().filter(|length| *length > 0);
        let mut temp = TempFile::create(&self.temp_dir).await?;
        let mut hasher = Sha256::new();
        let mut bytes: u64 = 0;
        let mut reported = 0;

        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|error| request_failure(&error, target, self.settings.timeout))?
        {
            bytes = bytes.saturating_add(chunk.len() as u64);
            if bytes > max_bytes {
                return Err(HandlerError::Permanent(format!(
                    "{target}: the body exceeds max_bytes {max_bytes}, so the download was stopped; raise max_bytes to accept larger documents"
                )));
            }
            hasher.update(&chunk);
            temp.write(&chunk).await?;

            if let Some(expected) = expected {
                let percent = u8::try_from(bytes.saturating_mul(100) / expected)
                    .unwrap_or(100)
                    .min(99);
                if percent > reported {
                    reported = percent;
                    attempt.report_progress(percent);
                }
            }
        }
        temp.finish().await?;

        let sha256 = hex::encode(hasher.finalize());
        let shard = &sha256[..2];
        let relative_path = format!("{DOCUMENTS_DIR}/{shard}/{sha256}");
        let final_path = self
            .settings
            .data_dir
            .join(DOCUMENTS_DIR)
            .join(shard)
            .join(&sha256);
        temp.persist(&final_path).await?;
        Ok(StoredDocument {
            relative_path,
            sha256,
            bytes,
        })
    }
}

#[async_trait]
impl JobHandler for FetchHandler {
    async fn run(&self, job: JobContext) -> Result<Option<Box<RawValue>>, HandlerError> {
        let progress = |percent| job.report_progress(percent);
        self.fetch(&Attempt::from_context(&job, &progress)).await
    }
}

struct StoredDocument {
    relative_path: String,
    sha256: String,
    bytes: u64,
}

/// Returns whether `status` is a redirect whose Location is followed, as
/// browsers and reqwest follow them.
/// Every followed hop is a GET without a body, which is what a fetch sends
/// anyway.
fn is_followed_redirect(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::MOVED_PERMANENTLY
            | StatusCode::FOUND
            | StatusCode::SEE_OTHER
            | StatusCode::TEMPORARY_REDIRECT
            | StatusCode::PERMANENT_REDIRECT
    )
}

/// Resolves a redirect's Location against the current URL and checks the
/// result with [`check_url`]: scheme, userinfo and IP literal. Pure: the
/// name is resolved and checked again when the hop is sent.
fn next_hop(current: &Url, location: &str, policy: AddressPolicy) -> Result<Url, HandlerError> {
    let from = host_of(current);
    let next = current.join(location).map_err(|error| {
        HandlerError::Permanent(format!(
            "fetch from {from} redirected to an invalid Location {location:?}: {error}"
        ))
    })?;
    check_url(&next, policy).map_err(|error| {
        HandlerError::Permanent(format!(
            "fetch from {from} redirected to a rejected URL: {error}"
        ))
    })?;
    Ok(next)
}

/// A download in progress. The file is removed when this value drops,
/// unless [`TempFile::persist`] moved it into storage, so every failure
/// path and a cancelled download clean up.
struct TempFile {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    keep: bool,
}

impl TempFile {
    async fn create(dir: &Path) -> Result<Self, HandlerError> {
        let path = dir.join(format!("{}.part", uuid::Uuid::new_v4()));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(|error| disk_failure("creating", &path, &error))?;
        Ok(Self {
            path,
            file: Some(file),
            keep: false,
        })
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), HandlerError> {
        let Some(file) = self.file.as_mut() else {
            return Err(disk_failure_message(
                "writing",
                &self.path,
                "the file is closed",
            ));
        };
        file.write_all(bytes)
            .await
            .map_err(|error| disk_failure("writing", &self.path, &error))
    }

    /// Flushes and syncs the contents to disk and closes the file.
    async fn finish(&mut self) -> Result<(), HandlerError> {
        let Some(mut file) = self.file.take() else {
            return Ok(());
        };
        file.flush()
            .await
            .map_err(|error| disk_failure("flushing", &self.path, &error))?;
        file.sync_all()
            .await
            .map_err(|error| disk_failure("syncing", &self.path, &error))
    }

    /// Moves the file to `destination`. If a document with the same hash
    /// is already stored, that file is kept and this one is removed. Two
    /// downloads of the same content may both find no file and both
    /// rename; the second rename replaces identical bytes, atomically.
    async fn persist(mut self, destination: &Path) -> Result<(), HandlerError> {
        if let Some(parent) = destination.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|error| disk_failure("creating directory", parent, &error))?;
        }
        let exists = tokio::fs::try_exists(destination)
            .await
            .map_err(|error| disk_failure("checking", destination, &error))?;
        if exists {
            return Ok(());
        }
        tokio::fs::rename(&self.path, destination)
            .await
            .map_err(|error| disk_failure("moving the download to", destination, &error))?;
        self.keep = true;
        if let Some(parent) = destination.parent() {
            sync_directory(parent).await;
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        // Close the handle first; the removal works either way on Unix.
        drop(self.file.take());
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => tracing::warn!(
                path = %self.path.display(),
                %error,
                "removing a temporary download failed; it is removed at the next start if older than a day"
            ),
        }
    }
}

/// Makes a rename durable by syncing its directory. Best effort: the
/// document is already in place, so a failure is only logged.
async fn sync_directory(dir: &Path) {
    let result = async {
        let handle = tokio::fs::File::open(dir).await?;
        handle.sync_all().await
    }
    .await;
    if let Err(error) = result {
        tracing::warn!(path = %dir.display(), %error, "syncing the document directory failed");
    }
}

fn disk_failure(action: &str, path: &Path, error: &std::io::Error) -> HandlerError {
    disk_failure_message(action, path, &error.to_string())
}

/// Local disk errors are retryable: a full disk or a permission problem
/// can be fixed by an operator while the job waits.
fn disk_failure_message(action: &str, path: &Path, detail: &str) -> HandlerError {
    HandlerError::Retryable(format!(
        "{action} {} failed: {detail}; check free space and permissions of data_dir",
        path.display()
    ))
}

/// Removes `*.part` files older than `max_age` from `dir`. Best effort:
/// failures are logged, never raised.
fn remove_stale_temp_files(dir: &Path, max_age: Duration) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) => {
            tracing::warn!(path = %dir.display(), %error, "listing temporary downloads failed");
            return;
        }
    };
    let now = SystemTime::now();
    let mut removed = 0_u64;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|extension| extension != "part") {
            continue;
        }
        let age = entry
            .metadata()
            .and_then(|metadata| metadata.modified())
            .ok()
            .and_then(|modified| now.duration_since(modified).ok());
        if age.is_some_and(|age| age > max_age) {
            match std::fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "removing a stale temporary download failed")
                }
            }
        }
    }
    if removed > 0 {
        tracing::info!(path = %dir.display(), removed, "removed stale temporary downloads");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const NONE: AddressPolicy = AddressPolicy {
        allow_loopback: false,
        allow_private: false,
    };

    fn current() -> Url {
        Url::parse("https://docs.example.com/a/b.pdf").unwrap()
    }

    #[test]
    fn next_hop_resolves_relative_locations() {
        let cases = [
            ("/c.pdf", "https://docs.example.com/c.pdf"),
            ("c.pdf", "https://docs.example.com/a/c.pdf"),
            ("//cdn.example.net/x.pdf", "https://cdn.example.net/x.pdf"),
            (
                "http://mirror.example.org/y.pdf",
                "http://mirror.example.org/y.pdf",
            ),
        ];
        for (location, expected) in cases {
            let next = next_hop(&current(), location, NONE).unwrap();
            assert_eq!(next.as_str(), expected, "{location}");
        }
    }

    #[test]
    fn next_hop_rejects_other_schemes() {
        for location in [
            "file:///etc/passwd",
            "ftp://files.example.com/a.pdf",
            "data:application/pdf;base64,JVBERi0=",
            "javascript:alert(1)",
        ] {
            match next_hop(&current(), location, NONE) {
                Err(HandlerError::Permanent(message)) => {
                    assert!(
                        message.contains("unsupported URL scheme"),
                        "{location}: {message}"
                    )
                }
                other => panic!("{location}: expected a permanent failure, got {other:?}"),
            }
        }
    }

    #[test]
    fn next_hop_rejects_blocked_literals_and_userinfo() {
        for location in [
            "http://169.254.169.254/latest/meta-data/",
            "http://127.0.0.1:8080/admin",
            "http://[::1]/",
            "http://10.0.0.7/internal.pdf",
            "http://[::ffff:192.168.0.1]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[2002:a9fe:a9fe::1]/",
            "https://user:secret@docs.example.com/",
        ] {
            match next_hop(&current(), location, NONE) {
                Err(HandlerError::Permanent(message)) => {
                    assert!(message.contains("rejected URL"), "{location}: {message}");
                    assert!(!message.contains("secret"), "{message}");
                }
                other => panic!("{location}: expected a permanent failure, got {other:?}"),
            }
        }
    }

    #[test]
    fn content_type_patterns() {
        let pdf = ContentTypePattern::parse("application/pdf").unwrap();
        assert!(pdf.matches("application/pdf"));
        assert!(!pdf.matches("application/pdfx"));
        assert!(!pdf.matches("text/html"));

        let text = ContentTypePattern::parse(" Text/* ").unwrap();
        assert_eq!(text, ContentTypePattern::AnySubtype("text".into()));
        assert!(text.matches("text/plain"));
        assert!(text.matches("text/html"));
        assert!(!text.matches("textual/plain"));

        assert_eq!(
            ContentTypePattern::parse("*/*"),
            Some(ContentTypePattern::Any)
        );
        assert_eq!(
            ContentTypePattern::parse("application/pdf; charset=binary"),
            Some(ContentTypePattern::Exact("application/pdf".into()))
        );
        for invalid in ["", "pdf", "*/pdf", "application/", "/pdf", "a b/c", "a/b/c"] {
            assert_eq!(ContentTypePattern::parse(invalid), None, "{invalid:?}");
        }
    }

    #[test]
    fn media_type_essence_ignores_parameters() {
        assert_eq!(
            media_type_essence("Application/PDF; charset=UTF-8").as_deref(),
            Some("application/pdf")
        );
        assert_eq!(
            media_type_essence("text/html").as_deref(),
            Some("text/html")
        );
        assert_eq!(media_type_essence("garbage"), None);
    }

    #[test]
    fn settings_defaults_and_keys() {
        let defaults = FetchSettings::default();
        assert_eq!(defaults.max_bytes, 25 * 1024 * 1024);
        assert_eq!(defaults.allowed_content_types, vec!["application/pdf"]);
        assert_eq!(defaults.max_redirects, 5);

        let settings: FetchSettings = serde_json::from_value(serde_json::json!({
            "data_dir": "/var/lib/batchd",
            "max_bytes": 1024,
            "allowed_content_types": ["text/*"],
            "timeout_seconds": 5,
            "per_host_rate": {"per_second": 0.5, "burst": 1},
            "policy": {"allow_loopback": true}
        }))
        .unwrap();
        assert_eq!(settings.data_dir, PathBuf::from("/var/lib/batchd"));
        assert_eq!(settings.timeout, Duration::from_secs(5));
        assert_eq!(settings.per_host_rate.per_second, 0.5);
        assert_eq!(settings.max_redirects, 5);
        assert!(settings.policy.allow_loopback);
    }

    #[test]
    fn new_rejects_invalid_settings() {
        let dir = tempfile::tempdir().unwrap();
        let base = FetchSettings {
            data_dir: dir.path().to_owned(),
            ..FetchSettings::default()
        };

        let mut settings = base.clone();
        settings.allowed_content_types = vec!["pdf".into()];
        assert!(matches!(
            FetchHandler::new(settings),
            Err(SetupError::ContentType(_))
        ));

        let mut settings = base.clone();
        settings.allowed_content_types.clear();
        assert!(matches!(
            FetchHandler::new(settings),
            Err(SetupError::NoContentTypes)
        ));

        let mut settings = base.clone();
        settings.per_host_rate.per_second = 0.0;
        assert!(matches!(
            FetchHandler::new(settings),
            Err(SetupError::Rate(_))
        ));

        let mut settings = base;
        settings.data_dir = dir.path().join("file");
        std::fs::write(&settings.data_dir, b"not a directory").unwrap();
        assert!(matches!(
            FetchHandler::new(settings),
            Err(SetupError::DataDir { .. })
        ));
    }

    #[test]
    fn stale_temp_files_removed() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join("old.part");
        let fresh = dir.path().join("new.part");
        let other = dir.path().join("keep.txt");
        for path in [&stale, &fresh, &other] {
            std::fs::write(path, b"x").unwrap();
        }
        let old = SystemTime::now() - Duration::from_secs(2 * 24 * 60 * 60);
        std::fs::File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(old)
            .unwrap();
        std::fs::File::options()
            .write(true)
            .open(&other)
            .unwrap()
            .set_modified(old)
            .unwrap();

        remove_stale_temp_files(dir.path(), STALE_TEMP_AGE);
        assert!(!stale.exists());
        assert!(fresh.exists());
        assert!(other.exists());
    }
}
