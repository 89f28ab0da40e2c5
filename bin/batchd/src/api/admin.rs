//! Operator routes for job kinds: list, pause, resume.

use actix_web::{HttpResponse, web};
use serde::Serialize;

use super::AppState;
use crate::auth::AdminUser;
use crate::error::ApiError;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct KindStatus {
    kind: String,
    handler: crate::config::HandlerName,
    paused: bool,
    concurrency: usize,
}

#[utoipa::path(
    get,
    path = "/api/admin/kinds",
    tag = "admin",
    responses(
        (status = 200, description = "configured kinds and whether each is paused", body = Object),
        (status = 403, description = "the caller is not an admin", body = crate::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn kinds(
    _admin: AdminUser,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let kinds: Vec<KindStatus> = state
        .config
        .kinds
        .iter()
        .map(|(kind, settings)| KindStatus {
            kind: kind.clone(),
            handler: settings.handler,
            paused: state.queue.is_paused(kind),
            concurrency: settings.concurrency,
        })
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "items": kinds })))
}

#[utoipa::path(
    post,
    path = "/api/admin/kinds/{kind}/pause",
    tag = "admin",
    params(("kind" = String, Path, description = "job kind")),
    responses(
        (status = 200, description = "workers on every process stop claiming the kind", body = Object),
        (status = 422, description = "unknown kind", body = crate::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn pause(
    admin: AdminUser,
    state: web::Data<AppState>,
    kind: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    state.queue.pause_kind(&kind).await?;
    tracing::info!(target: "security", user_id = %admin.0.id, kind = %kind, "kind paused");
    Ok(HttpResponse::Ok().json(serde_json::json!({ "kind": kind.as_str(), "paused": true })))
}

#[utoipa::path(
    post,
    path = "/api/admin/kinds/{kind}/resume",
    tag = "admin",
    params(("kind" = String, Path, description = "job kind")),
    responses(
        (status = 200, description = "workers claim the kind again", body = Object),
        (status = 422, description = "unknown kind", body = crate::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn resume(
    admin: AdminUser,
    state: web::Data<AppState>,
    kind: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    state.queue.resume_kind(&kind).await?;
    tracing::info!(target: "security", user_id = %admin.0.id, kind = %kind, "kind resumed");
    Ok(HttpResponse::Ok().json(serde_json::json!({ "kind": kind.as_str(), "paused": false })))
}
