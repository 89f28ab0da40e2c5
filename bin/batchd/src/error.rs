//! The one place where failures become HTTP responses.
//!
//! Every error body has the same shape: `{"code", "message",
//! "correlationId"}`. The code is stable and meant for programs; the
//! message is for people. 4xx responses are the caller's mistake and are
//! not logged as errors; a 5xx gets a generic message and one log line
//! with the cause.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use domain::StoreError;
use queue::QueueError;
use serde::Serialize;

use crate::correlation;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// The rate-limit policy that rejected the request, if one did.
    pub policy: Option<String>,
    /// Seconds to wait before retrying, sent as `Retry-After`.
    pub retry_after: Option<u64>,
}

/// The JSON body of every error response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// Stable machine-readable code, such as `BATCH_NOT_FOUND`.
    pub code: String,
    pub message: String,
    pub correlation_id: String,
    /// The rate-limit policy that rejected the request (429 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            policy: None,
            retry_after: None,
        }
    }

    pub fn with_policy(mut self, policy: &str) -> Self {
        self.policy = Some(policy.to_owned());
        self
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub fn too_large(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            "the server failed to handle the request; retry, and report the correlation id if it persists",
        )
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let body = ErrorBody {
            code: self.code.to_owned(),
            message: self.message.clone(),
            correlation_id: correlation::current().unwrap_or_default(),
            policy: self.policy.clone(),
        };
        let mut response = HttpResponse::build(self.status);
        if self.status == StatusCode::UNAUTHORIZED {
            response.insert_header(("WWW-Authenticate", "Bearer"));
        }
        if let Some(seconds) = self.retry_after {
            response.insert_header(("Retry-After", seconds.to_string()));
        }
        response.json(body)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match &error {
            StoreError::NotFound { entity, .. } => {
                let code = match *entity {
                    "batch" => "BATCH_NOT_FOUND",
                    "job" => "JOB_NOT_FOUND",
                    _ => "NOT_FOUND",
                };
                ApiError::not_found(code, error.to_string())
            }
            StoreError::IllegalState { .. } => {
                ApiError::new(StatusCode::CONFLICT, "ILLEGAL_STATE", error.to_string())
            }
            StoreError::IdempotencyMismatch { .. } => {
                ApiError::unprocessable("IDEMPOTENCY_KEY_REUSED", error.to_string())
            }
            StoreError::IdempotencyInProgress { .. } => ApiError::new(
                StatusCode::CONFLICT,
                "IDEMPOTENCY_KEY_IN_PROGRESS",
                error.to_string(),
            ),
            StoreError::Invalid { field: "items", .. } => {
                ApiError::unprocessable("INVALID_ITEMS", error.to_string())
            }
            StoreError::Invalid { .. } => {
                ApiError::unprocessable("INVALID_FIELD", error.to_string())
            }
            StoreError::DependencyNotFound { .. } => {
                ApiError::unprocessable("DEPENDENCY_NOT_FOUND", error.to_string())
            }
            StoreError::Closed => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "SHUTTING_DOWN",
                "the server is shutting down; retry against another instance or after restart",
            ),
            StoreError::Unavailable { .. } => {
                tracing::warn!(error = %ErrorChain(&error), "the database is unreachable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "STORE_UNAVAILABLE",
                    "the database is unreachable at the moment; retry shortly, with the same Idempotency-Key when creating a batch",
                )
            }
            StoreError::Corrupt { .. } | StoreError::Backend { .. } => {
                ApiError::internal(&ErrorChain(&error))
            }
        }
    }
}

impl From<QueueError> for ApiError {
    fn from(error: QueueError) -> Self {
        match error {
            QueueError::UnknownKind { kind } => ApiError::unprocessable(
                "UNKNOWN_KIND",
                format!("job kind {kind:?} is not configured on this server"),
            ),
            QueueError::AlreadyStarted => ApiError::internal(&"queue started twice"),
            QueueError::Store(error) => error.into(),
        }
    }
}

/// Displays an error with its sources, for the one log line of a 5xx.
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}
