//! HTTP routes and the state they share.

use std::sync::Arc;

use ::flags::FlagService;
use actix_web::{HttpRequest, HttpResponse, web};
use domain::BatchId;
use queue::Queue;

use crate::auth::AuthUser;
use crate::config::Config;
use crate::error::ApiError;

pub mod admin;
pub mod batches;
pub mod dead_letters;
pub mod flags;
pub mod health;
pub mod jobs;
pub mod openapi;
pub mod ws;

/// Flag that gates batch creation.
pub const BATCH_FLAG: &str = "batch_operations";

/// State shared by every request handler.
pub struct AppState {
    pub queue: Queue,
    pub flags: FlagService,
    /// The flags' store, for listings that must not come from a snapshot.
    pub flag_store: Arc<dyn domain::FlagStore>,
    pub config: Arc<Config>,
    pub limits: crate::limits::Limits,
    pub metrics: Arc<telemetry::Metrics>,
    pub hub: Arc<gateway::Hub>,
    pub tickets: crate::tickets::Tickets,
    pub origins: gateway::OriginPolicy,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// Rejects batch creation for users the rollout has not reached.
    pub fn check_batch_gate(&self, user: &AuthUser) -> Result<(), ApiError> {
        let evaluation = self.flags.evaluate(BATCH_FLAG, user.id.as_str());
        if evaluation.enabled {
            return Ok(());
        }
        tracing::info!(user_id = %user.id, flag = BATCH_FLAG, reason = evaluation.reason.as_str(), "batch creation gated off");
        Err(ApiError::forbidden(
            "FEATURE_DISABLED",
            format!("batch creation is not enabled for this user (feature flag {BATCH_FLAG})"),
        ))
    }

    /// Charges `items` against the caller's item budget (reject mode);
    /// in pace mode the queue paces the items instead.
    pub async fn consume_item_budget(&self, user: &AuthUser, items: u64) -> Result<(), ApiError> {
        self.limits.charge_items(user.id.as_str(), items).await
    }
}

/// Builds the error for a listing cursor that no page returned.
pub fn invalid_cursor() -> ApiError {
    ApiError::bad_request(
        "INVALID_CURSOR",
        "cursor must be the nextCursor of a previous page",
    )
}

/// Parses a batch id from a path; an id that cannot exist is not found.
pub fn parse_batch_id(raw: &str) -> Result<BatchId, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::not_found("BATCH_NOT_FOUND", format!("batch {raw} not found")))
}

/// Registers every route.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/batches")
            .route(web::post().to(batches::create))
            .route(web::get().to(batches::list))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/batches/{id}")
            .route(web::get().to(batches::get))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/batches/{id}/items")
            .route(web::get().to(batches::items))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/batches/{id}/cancel")
            .route(web::post().to(batches::cancel))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/batches/{id}/retry")
            .route(web::post().to(batches::retry))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/jobs/{id}")
            .route(web::get().to(jobs::get))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/dead-letters")
            .route(web::get().to(dead_letters::list))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/dead-letters/redrive")
            .route(web::post().to(dead_letters::redrive))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/admin/kinds")
            .route(web::get().to(admin::kinds))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/admin/kinds/{kind}/pause")
            .route(web::post().to(admin::pause))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/admin/kinds/{kind}/resume")
            .route(web::post().to(admin::resume))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/admin/flags")
            .route(web::get().to(flags::list))
            .route(web::post().to(flags::create))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/admin/flags/{name}")
            .route(web::get().to(flags::get))
            .route(web::patch().to(flags::update))
            .route(web::delete().to(flags::delete))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/admin/flags/{name}/evaluate")
            .route(web::get().to(flags::evaluate))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/admin/flags/{name}/audit")
            .route(web::get().to(flags::audit))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/ws/tickets")
            .route(web::post().to(ws::ticket))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/ws")
            .route(web::get().to(ws::connect))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/health")
            .route(web::get().to(health::health))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/ready")
            .route(web::get().to(health::ready))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/metrics")
            .route(web::get().to(health::metrics))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/openapi.json")
            .route(web::get().to(openapi::document))
            .default_service(web::to(method_not_allowed)),
    );
}

async fn method_not_allowed(request: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(
        actix_web::http::StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        format!(
            "{} is not supported on {}",
            request.method(),
            request.path()
        ),
    ))
}

/// Returns the error for requests that match no route.
pub async fn not_found(request: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found(
        "ROUTE_NOT_FOUND",
        format!(
            "no route for {} {}; see /openapi.json",
            request.method(),
            request.path()
        ),
    ))
}

/// Turns extractor failures (bad JSON, bad query) into the error shape.
pub fn json_config(limit: usize) -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(limit)
        .error_handler(|error, _| {
            use actix_web::error::JsonPayloadError;
            let api = match &error {
                JsonPayloadError::Overflow { limit }
                | JsonPayloadError::OverflowKnownLength { limit, .. } => ApiError::too_large(
                    "PAYLOAD_TOO_LARGE",
                    format!("the request body is larger than {limit} bytes"),
                ),
                JsonPayloadError::ContentType => ApiError::new(
                    actix_web::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UNSUPPORTED_MEDIA_TYPE",
                    "send the body as application/json",
                ),
                other => ApiError::bad_request(
                    "INVALID_JSON",
                    format!("the request body is not valid: {other}"),
                ),
            };
            api.into()
        })
}

pub fn query_config() -> web::QueryConfig {
    web::QueryConfig::default().error_handler(|error, _| {
        ApiError::bad_request("INVALID_QUERY", format!("invalid query string: {error}")).into()
    })
}

pub fn path_config() -> web::PathConfig {
    web::PathConfig::default().error_handler(|error, _| {
        ApiError::not_found("NOT_FOUND", format!("invalid path parameter: {error}")).into()
    })
}
