//! Feature-flag administration: list, get, create, update, delete,
//! evaluate for a user, and the audit trail. Admins only; every change is
//! written to the security log.

use std::collections::BTreeSet;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use domain::{AuditFilter, FlagName, FlagPatch, FlagStoreError, NewFlag, Rollout, UserId};
use serde::Deserialize;

use super::AppState;
use crate::auth::AdminUser;
use crate::error::ApiError;

impl From<FlagStoreError> for ApiError {
    fn from(error: FlagStoreError) -> Self {
        match error {
            FlagStoreError::Invalid(invalid) => {
                ApiError::unprocessable("INVALID_FLAG", invalid.to_string())
            }
            FlagStoreError::NotFound { name } => {
                ApiError::not_found("FLAG_NOT_FOUND", format!("feature flag {name} not found"))
            }
            error @ FlagStoreError::AlreadyExists { .. } => {
                ApiError::new(StatusCode::CONFLICT, "FLAG_EXISTS", error.to_string())
            }
            error @ FlagStoreError::VersionConflict { .. } => {
                ApiError::new(StatusCode::CONFLICT, "VERSION_CONFLICT", error.to_string())
            }
            FlagStoreError::Store(error) => error.into(),
        }
    }
}

fn flag_name(raw: &str) -> Result<FlagName, ApiError> {
    FlagName::parse(raw).map_err(|error| {
        ApiError::not_found(
            "FLAG_NOT_FOUND",
            format!("feature flag {raw:?} not found: {error}"),
        )
    })
}

fn rollout(value: i64) -> Result<Rollout, ApiError> {
    Rollout::try_from(value)
        .map_err(|error| ApiError::unprocessable("INVALID_FLAG", error.to_string()))
}

fn users(list: Vec<String>) -> BTreeSet<UserId> {
    list.into_iter().map(UserId).collect()
}

#[utoipa::path(
    get,
    path = "/api/admin/flags",
    tag = "feature flags",
    responses((status = 200, description = "every flag, sorted by name", body = Object)),
    security(("bearer" = []))
)]
pub async fn list(_admin: AdminUser, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let listing = state.flag_store.list_flags().await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "items": listing.flags,
        "revision": listing.revision,
    })))
}

#[utoipa::path(
    get,
    path = "/api/admin/flags/{name}",
    tag = "feature flags",
    params(("name" = String, Path, description = "flag name")),
    responses(
        (status = 200, description = "the flag", body = Object),
        (status = 404, description = "no such flag", body = crate::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    _admin: AdminUser,
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let flag = state.flags.get_flag(&flag_name(&name)?).await?;
    Ok(HttpResponse::Ok().json(flag))
}

/// A new flag.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateFlagRequest {
    pub name: String,
    #[serde(default)]
    pub enabled: bool,
    /// Percentage of users, 0 to 100.
    #[serde(default)]
    pub rollout: i64,
    #[serde(default)]
    pub allow_list: Vec<String>,
    #[serde(default)]
    pub deny_list: Vec<String>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
}

#[utoipa::path(
    post,
    path = "/api/admin/flags",
    tag = "feature flags",
    request_body = CreateFlagRequest,
    responses(
        (status = 201, description = "the flag was created", body = Object),
        (status = 409, description = "a flag with this name exists", body = crate::error::ErrorBody),
        (status = 422, description = "invalid name, rollout or lists", body = crate::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    admin: AdminUser,
    state: web::Data<AppState>,
    body: web::Json<CreateFlagRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let name = FlagName::parse(body.name)
        .map_err(|error| ApiError::unprocessable("INVALID_FLAG", error.to_string()))?;
    let mut flag = NewFlag::new(name);
    flag.enabled = body.enabled;
    flag.rollout = rollout(body.rollout)?;
    flag.allow_list = users(body.allow_list);
    flag.deny_list = users(body.deny_list);
    if let Some(metadata) = body.metadata {
        flag.metadata = metadata;
    }

    let change = state
        .flags
        .create_flag(flag, &admin.0.id, chrono::Utc::now())
        .await?;
    tracing::info!(target: "security", user_id = %admin.0.id, flag = %change.flag.name, action = "create", "feature flag changed");
    Ok(HttpResponse::Created().json(change.flag))
}

/// A partial update: only the fields present change.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateFlagRequest {
    pub enabled: Option<bool>,
    pub rollout: Option<i64>,
    pub allow_list: Option<Vec<String>>,
    pub deny_list: Option<Vec<String>>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    /// Apply only if the flag is still at this version.
    pub expected_version: Option<u64>,
}

#[utoipa::path(
    patch,
    path = "/api/admin/flags/{name}",
    tag = "feature flags",
    params(("name" = String, Path, description = "flag name")),
    request_body = UpdateFlagRequest,
    responses(
        (status = 200, description = "the flag after the change", body = Object),
        (status = 404, description = "no such flag", body = crate::error::ErrorBody),
        (status = 409, description = "the flag changed since expectedVersion", body = crate::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn update(
    admin: AdminUser,
    state: web::Data<AppState>,
    name: web::Path<String>,
    body: web::Json<UpdateFlagRequest>,
) -> Result<HttpResponse, ApiError> {
    let name = flag_name(&name)?;
    let body = body.into_inner();
    let patch = FlagPatch {
        enabled: body.enabled,
        rollout: body.rollout.map(rollout).transpose()?,
        allow_list: body.allow_list.map(users),
        deny_list: body.deny_list.map(users),
        metadata: body.metadata,
        expected_version: body.expected_version,
    };
    let change = state
        .flags
        .update_flag(&name, patch, &admin.0.id, chrono::Utc::now())
        .await?;
    tracing::info!(target: "security", user_id = %admin.0.id, flag = %name, action = "update", version = change.flag.version, "feature flag changed");
    Ok(HttpResponse::Ok().json(change.flag))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeleteQuery {
    /// Delete only if the flag is still at this version.
    pub expected_version: Option<u64>,
}

#[utoipa::path(
    delete,
    path = "/api/admin/flags/{name}",
    tag = "feature flags",
    params(("name" = String, Path, description = "flag name"), DeleteQuery),
    responses(
        (status = 200, description = "the flag as it was before deletion", body = Object),
        (status = 404, description = "no such flag", body = crate::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete(
    admin: AdminUser,
    state: web::Data<AppState>,
    name: web::Path<String>,
    query: web::Query<DeleteQuery>,
) -> Result<HttpResponse, ApiError> {
    let name = flag_name(&name)?;
    let change = state
        .flags
        .delete_flag(
            &name,
            query.expected_version,
            &admin.0.id,
            chrono::Utc::now(),
        )
        .await?;
    tracing::info!(target: "security", user_id = %admin.0.id, flag = %name, action = "delete", "feature flag changed");
    Ok(HttpResponse::Ok().json(change.flag))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EvaluateQuery {
    /// The user to evaluate the flag for.
    #[serde(rename = "userId")]
    pub user_id: String,
}

#[utoipa::path(
    get,
    path = "/api/admin/flags/{name}/evaluate",
    tag = "feature flags",
    params(("name" = String, Path, description = "flag name"), EvaluateQuery),
    responses((status = 200, description = "the result for this user and its reason: {enabled, reason, bucket}", body = Object)),
    security(("bearer" = []))
)]
pub async fn evaluate(
    _admin: AdminUser,
    state: web::Data<AppState>,
    name: web::Path<String>,
    query: web::Query<EvaluateQuery>,
) -> Result<HttpResponse, ApiError> {
    if query.user_id.is_empty() {
        return Err(ApiError::bad_request(
            "INVALID_QUERY",
            "userId must not be empty",
        ));
    }
    let evaluation = state.flags.evaluate(&name, &query.user_id);
    Ok(HttpResponse::Ok().json(evaluation))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    pub cursor: Option<i64>,
    pub limit: Option<u32>,
}

#[utoipa::path(
    get,
    path = "/api/admin/flags/{name}/audit",
    tag = "feature flags",
    params(("name" = String, Path, description = "flag name"), AuditQuery),
    responses((status = 200, description = "changes to the flag, newest first: who, when, before and after", body = Object)),
    security(("bearer" = []))
)]
pub async fn audit(
    _admin: AdminUser,
    state: web::Data<AppState>,
    name: web::Path<String>,
    query: web::Query<AuditQuery>,
) -> Result<HttpResponse, ApiError> {
    let name = flag_name(&name)?;
    let filter = AuditFilter {
        cursor: query.cursor,
        limit: query.limit.unwrap_or(0),
    };
    let page = state.flags.list_flag_audit(&name, filter).await?;
    Ok(HttpResponse::Ok().json(page))
}
