//! Job read route.

use actix_web::{HttpResponse, web};
use domain::JobId;

use super::AppState;
use crate::auth::AuthUser;
use crate::error::ApiError;

#[utoipa::path(
    get,
    path = "/api/jobs/{id}",
    tag = "batches",
    params(("id" = i64, Path, description = "job id")),
    responses(
        (status = 200, description = "the job with its attempt history", body = Object),
        (status = 404, description = "no such job for this caller", body = crate::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    user: AuthUser,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::not_found("JOB_NOT_FOUND", format!("job {id} not found")))?;
    let scope = if user.admin {
        domain::Scope::Admin
    } else {
        user.own_scope()
    };
    let job = state.queue.store().get_job(&scope, JobId(id)).await?;
    Ok(HttpResponse::Ok().json(job))
}
