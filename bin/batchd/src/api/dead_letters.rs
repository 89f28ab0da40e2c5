//! Dead-letter routes: list and re-drive. Users see their own dead jobs;
//! admins see everyone's.

use actix_web::{HttpResponse, web};
use domain::{DeadLetterFilter, JobId, RedriveSelection, Scope};
use serde::Deserialize;

use super::{AppState, parse_batch_id};
use crate::auth::AuthUser;
use crate::error::ApiError;

/// Most jobs one re-drive request names.
const MAX_REDRIVE_IDS: usize = 1_000;

fn scope_of(user: &AuthUser) -> Scope {
    if user.admin {
        Scope::Admin
    } else {
        user.own_scope()
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeadQuery {
    pub kind: Option<String>,
    /// Only dead jobs of this batch.
    pub batch: Option<String>,
    pub cursor: Option<String>,
    pub limit: Option<u32>,
}

#[utoipa::path(
    get,
    path = "/api/dead-letters",
    tag = "dead letters",
    params(DeadQuery),
    responses((status = 200, description = "dead jobs with payload and attempt history, oldest first", body = Object)),
    security(("bearer" = []))
)]
pub async fn list(
    user: AuthUser,
    state: web::Data<AppState>,
    query: web::Query<DeadQuery>,
) -> Result<HttpResponse, ApiError> {
    let query = query.into_inner();
    let cursor = query
        .cursor
        .map(|c| c.parse::<i64>().map(JobId))
        .transpose()
        .map_err(|_| super::invalid_cursor())?;
    let batch_id = query.batch.as_deref().map(parse_batch_id).transpose()?;
    // A batch the caller cannot see answers 404, as it does everywhere,
    // rather than an empty list that would reveal that it exists.
    if let Some(id) = batch_id {
        state.queue.store().get_batch(&scope_of(&user), id).await?;
    }
    let filter = DeadLetterFilter {
        kind: query.kind,
        batch_id,
        cursor,
        limit: super::batches::page_limit(&state, query.limit)?,
    };
    let page = state
        .queue
        .store()
        .list_dead(&scope_of(&user), filter)
        .await?;
    Ok(HttpResponse::Ok().json(page))
}

/// Selection of dead jobs to re-drive: named ids, or everything matching a filter.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedriveRequest {
    pub job_ids: Option<Vec<i64>>,
    pub kind: Option<String>,
    pub batch: Option<String>,
    /// Most jobs re-driven by a filter; default 100.
    pub limit: Option<u32>,
}

#[utoipa::path(
    post,
    path = "/api/dead-letters/redrive",
    tag = "dead letters",
    request_body = RedriveRequest,
    responses(
        (status = 200, description = "the jobs sent back to the queue", body = Object),
        (status = 400, description = "malformed request", body = crate::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn redrive(
    user: AuthUser,
    state: web::Data<AppState>,
    body: web::Json<RedriveRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let selection = match body.job_ids {
        Some(ids) if ids.is_empty() => {
            return Err(ApiError::bad_request(
                "INVALID_FIELD",
                "jobIds must name at least one job",
            ));
        }
        Some(ids) if ids.len() > MAX_REDRIVE_IDS => {
            return Err(ApiError::bad_request(
                "INVALID_FIELD",
                format!(
                    "jobIds may name at most {MAX_REDRIVE_IDS} jobs, got {}",
                    ids.len()
                ),
            ));
        }
        Some(ids) => RedriveSelection::Jobs(ids.into_iter().map(JobId).collect()),
        None => RedriveSelection::Matching(DeadLetterFilter {
            kind: body.kind,
            batch_id: body.batch.as_deref().map(parse_batch_id).transpose()?,
            cursor: None,
            limit: super::batches::page_limit(&state, body.limit)?,
        }),
    };
    let report = state.queue.redrive(&scope_of(&user), selection).await?;
    tracing::info!(target: "security", user_id = %user.id, redriven = report.redriven.len(), "dead letters re-driven");
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "redriven": report.redriven,
        "count": report.redriven.len(),
    })))
}
