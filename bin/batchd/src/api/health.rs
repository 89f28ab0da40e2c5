//! Liveness and readiness.

use actix_web::{HttpResponse, web};

use super::AppState;
use crate::error::ApiError;

#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses((status = 200, description = "the process is up", body = Object))
)]
pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

#[utoipa::path(
    get,
    path = "/ready",
    tag = "operations",
    responses(
        (status = 200, description = "the store responds and work can be accepted", body = Object),
        (status = 503, description = "the store does not respond", body = crate::error::ErrorBody),
    )
)]
pub async fn ready(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    match state.queue.store().kind_controls().await {
        Ok(_) => Ok(HttpResponse::Ok().json(serde_json::json!({ "status": "ready" }))),
        Err(error) => {
            tracing::warn!(%error, "readiness check failed");
            Err(ApiError::new(
                actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
                "NOT_READY",
                "the store does not answer; retry shortly",
            ))
        }
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus metrics in the OpenMetrics text format", content_type = "application/openmetrics-text", body = String))
)]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(telemetry::CONTENT_TYPE)
        .body(state.metrics.encode())
}
