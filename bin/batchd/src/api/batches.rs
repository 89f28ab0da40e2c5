//! Batch routes: create (JSON or streamed NDJSON), list, get, items,
//! cancel and retry.

use actix_web::http::StatusCode;
use actix_web::http::header::{CONTENT_TYPE, LOCATION};
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use domain::{
    BatchFilter, BatchId, BatchStatus, BeginOutcome, ItemFilter, JobStatus, NewBatch, NewJob,
    StagingBatch,
};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::{AppState, parse_batch_id};
use crate::auth::AuthUser;
use crate::correlation;
use crate::error::ApiError;

/// Longest accepted Idempotency-Key, in bytes.
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Maximum time a streamed upload with buffered items goes without writing
/// them. The PostgreSQL store deletes an upload that wrote nothing for
/// `abandon_staging_minutes` (5 by default) as abandoned by a dead process.
const STAGING_TOUCH: std::time::Duration = std::time::Duration::from_secs(60);

/// Reads the next part of a body. A client that stops sending for
/// `idle` gets 408 instead of holding the connection forever.
async fn next_chunk(
    payload: &mut web::Payload,
    idle: std::time::Duration,
) -> Result<Option<web::Bytes>, ApiError> {
    match tokio::time::timeout(idle, payload.next()).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "REQUEST_TIMEOUT",
            format!(
                "the request body stalled for {} s; send the whole body, matching its Content-Length",
                idle.as_secs()
            ),
        )),
        Ok(None) => Ok(None),
        Ok(Some(Ok(chunk))) => Ok(Some(chunk)),
        Ok(Some(Err(error))) => Err(ApiError::bad_request(
            "INVALID_BODY",
            format!("reading the request body failed: {error}"),
        )),
    }
}

/// Body of a JSON batch creation.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateBatchRequest {
    /// Job kind; must be configured on the server.
    pub kind: String,
    /// The items, one job each, any JSON values.
    #[schema(value_type = Vec<Object>)]
    pub items: Vec<Box<RawValue>>,
    /// Free configuration stored with the batch.
    #[schema(value_type = Option<Object>)]
    pub config: Option<serde_json::Value>,
    /// Free metadata stored with the batch.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    /// Higher runs first; default 0.
    pub priority: Option<i32>,
    /// Earliest start, RFC 3339.
    pub run_at: Option<DateTime<Utc>>,
    /// Attempts per item, the first included; defaults to the kind's.
    pub max_attempts: Option<u32>,
    /// Batches that must complete before this one starts.
    #[schema(value_type = Option<Vec<String>>)]
    pub depends_on: Option<Vec<BatchId>>,
}

/// Query of an NDJSON batch creation, where the body holds only items.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateQuery {
    /// Job kind of an NDJSON body.
    pub kind: Option<String>,
    pub priority: Option<i32>,
    pub run_at: Option<DateTime<Utc>>,
    pub max_attempts: Option<u32>,
}

fn idempotency_key(request: &HttpRequest) -> Result<Option<String>, ApiError> {
    let Some(value) = request.headers().get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|key| !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY)
        .ok_or_else(|| {
            ApiError::bad_request(
                "INVALID_IDEMPOTENCY_KEY",
                "the Idempotency-Key header must be 1 to 255 bytes of visible ASCII",
            )
        })?;
    Ok(Some(key.to_owned()))
}

fn is_ndjson(request: &HttpRequest) -> bool {
    request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(|value| {
            value
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .is_some_and(|media| {
            matches!(
                media.as_str(),
                "application/x-ndjson" | "application/ndjson" | "application/jsonl"
            )
        })
}

fn created_response(batch: &domain::Batch, created: bool) -> HttpResponse {
    if created {
        HttpResponse::Created()
            .insert_header((LOCATION, format!("/api/batches/{}", batch.id)))
            .json(batch)
    } else {
        HttpResponse::Ok()
            .insert_header(("Idempotent-Replayed", "true"))
            .json(batch)
    }
}

/// Fills a batch description from the request's options.
fn describe(
    state: &AppState,
    request: &HttpRequest,
    user: &AuthUser,
    kind: &str,
    options: BatchOptions,
) -> Result<NewBatch, ApiError> {
    let mut batch = state.queue.new_batch(user.id.clone(), kind)?;
    if let Some(priority) = options.priority {
        batch.priority = priority;
    }
    if let Some(max_attempts) = options.max_attempts {
        if !(1..=100).contains(&max_attempts) {
            return Err(ApiError::unprocessable(
                "INVALID_FIELD",
                format!("maxAttempts must be between 1 and 100, got {max_attempts}"),
            ));
        }
        batch.max_attempts = max_attempts;
    }
    batch.run_at = options.run_at;
    batch.correlation_id = Some(correlation::of(request));
    batch.traceparent = correlation::traceparent_of(request);
    batch.idempotency_key = idempotency_key(request)?;
    Ok(batch)
}

struct BatchOptions {
    priority: Option<i32>,
    run_at: Option<DateTime<Utc>>,
    max_attempts: Option<u32>,
}

async fn read_limited(
    mut payload: web::Payload,
    limit: usize,
    idle: std::time::Duration,
) -> Result<web::BytesMut, ApiError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = next_chunk(&mut payload, idle).await? {
        if body.len() + chunk.len() > limit {
            return Err(ApiError::too_large(
                "PAYLOAD_TOO_LARGE",
                format!(
                    "the request body is larger than {limit} bytes; send large batches as NDJSON"
                ),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[utoipa::path(
    post,
    path = "/api/batches",
    tag = "batches",
    request_body(
        description = "a JSON batch, or an NDJSON body of items (one JSON value per line) with the kind in the query",
        content(
            (CreateBatchRequest = "application/json"),
            (String = "application/x-ndjson"),
        )
    ),
    params(CreateQuery, ("Idempotency-Key" = Option<String>, Header, description = "repeat a request safely: the same key returns the same batch")),
    responses(
        (status = 201, description = "batch accepted", body = Object),
        (status = 200, description = "idempotent replay of an earlier batch", body = Object),
        (status = 400, description = "malformed body", body = crate::error::ErrorBody),
        (status = 403, description = "batch creation is disabled for the caller", body = crate::error::ErrorBody),
        (status = 413, description = "body, item or batch too large", body = crate::error::ErrorBody),
        (status = 422, description = "unknown kind, empty batch or invalid field", body = crate::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    request: HttpRequest,
    user: AuthUser,
    state: web::Data<AppState>,
    query: web::Query<CreateQuery>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    state.check_batch_gate(&user)?;
    let query = query.into_inner();
    if is_ndjson(&request) {
        return create_streamed(request, user, state, query, payload).await;
    }

    let limits = &state.config.limits;
    let idle = std::time::Duration::from_secs(limits.body_idle_timeout_seconds.max(1));
    let body = read_limited(payload, limits.max_json_body_bytes, idle).await?;
    let digest = hex::encode(Sha256::digest(&body));
    let parsed: CreateBatchRequest = serde_json::from_slice(&body).map_err(|error| {
        ApiError::bad_request(
            "INVALID_JSON",
            format!("the request body is not a valid batch: {error}"),
        )
    })?;

    if !state.queue.is_known_kind(&parsed.kind) {
        return Err(unknown_kind(&parsed.kind, &state));
    }
    if parsed.items.is_empty() {
        return Err(ApiError::unprocessable(
            "EMPTY_BATCH",
            "a batch needs at least one item",
        ));
    }
    if parsed.items.len() as u64 > limits.max_items_per_batch {
        return Err(ApiError::too_large(
            "BATCH_TOO_LARGE",
            format!(
                "{} items exceed the limit of {} per batch",
                parsed.items.len(),
                limits.max_items_per_batch
            ),
        ));
    }
    if let Some((index, item)) = parsed
        .items
        .iter()
        .enumerate()
        .find(|(_, item)| item.get().len() > limits.max_item_bytes)
    {
        return Err(ApiError::too_large(
            "ITEM_TOO_LARGE",
            format!(
                "item {index} is {} bytes, more than the limit of {}",
                item.get().len(),
                limits.max_item_bytes
            ),
        ));
    }
    for (field, value) in [("config", &parsed.config), ("metadata", &parsed.metadata)] {
        if value.as_ref().is_some_and(|v| !v.is_object()) {
            return Err(ApiError::unprocessable(
                "INVALID_FIELD",
                format!("{field} must be a JSON object"),
            ));
        }
    }

    let options = BatchOptions {
        priority: parsed.priority,
        run_at: parsed.run_at,
        max_attempts: parsed.max_attempts,
    };
    let mut batch = describe(&state, &request, &user, &parsed.kind, options)?;
    batch.request_digest = Some(digest);
    if let Some(config) = parsed.config {
        batch.config = config;
    }
    if let Some(metadata) = parsed.metadata {
        batch.metadata = metadata;
    }
    batch.depends_on = parsed.depends_on.unwrap_or_default();

    state
        .consume_item_budget(&user, parsed.items.len() as u64)
        .await?;
    let items: Vec<NewJob> = parsed.items.into_iter().map(NewJob::new).collect();
    let created = state.queue.create_batch(batch, items).await?;
    Ok(created_response(&created.batch, created.created))
}

fn unknown_kind(kind: &str, state: &AppState) -> ApiError {
    ApiError::unprocessable(
        "UNKNOWN_KIND",
        format!(
            "job kind {kind:?} is not configured; known kinds: {}",
            state.queue.kinds().join(", ")
        ),
    )
}

/// Creates a batch from an NDJSON body, one item per line, inserting in
/// chunks as lines arrive so the body is never held in memory whole.
async fn create_streamed(
    request: HttpRequest,
    user: AuthUser,
    state: web::Data<AppState>,
    query: CreateQuery,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let kind = query.kind.ok_or_else(|| {
        ApiError::bad_request(
            "MISSING_KIND",
            "an NDJSON body needs the job kind in the query, as ?kind=NAME",
        )
    })?;
    if !state.queue.is_known_kind(&kind) {
        return Err(unknown_kind(&kind, &state));
    }
    let options = BatchOptions {
        priority: query.priority,
        run_at: query.run_at,
        max_attempts: query.max_attempts,
    };
    let batch = describe(&state, &request, &user, &kind, options)?;

    let staging = match state.queue.begin_batch(batch).await? {
        BeginOutcome::Started(staging) => staging,
        // NOTE: a replayed NDJSON request is matched by its key alone; its
        // body is not compared with the first one, unlike a JSON body.
        BeginOutcome::Existing(existing) => return Ok(created_response(&existing, false)),
    };
    let batch_id = staging.id;

    match stream_items(&state, &user, staging.clone(), payload).await {
        Ok(staging) => {
            let created = state.queue.commit_batch(staging).await?;
            Ok(created_response(&created.batch, true))
        }
        Err(error) => {
            if let Err(abort_error) = state.queue.abort_batch(staging).await {
                tracing::warn!(batch_id = %batch_id, error = %abort_error, "aborting a rejected NDJSON batch failed; start-up recovery removes it");
            }
            Err(error)
        }
    }
}

async fn stream_items(
    state: &AppState,
    user: &AuthUser,
    mut staging: StagingBatch,
    mut payload: web::Payload,
) -> Result<StagingBatch, ApiError> {
    let limits = &state.config.limits;
    let chunk_rows = state.config.queue.insert_chunk_rows.max(1);
    let mut pending: Vec<NewJob> = Vec::with_capacity(chunk_rows);
    let mut buffer: Vec<u8> = Vec::new();
    let mut received: u64 = 0;
    let mut line_number: u64 = 0;
    let mut items: u64 = 0;

    let mut take_line = |line: &[u8], pending: &mut Vec<NewJob>| -> Result<(), ApiError> {
        line_number += 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        if line.len() > limits.max_item_bytes {
            return Err(ApiError::too_large(
                "ITEM_TOO_LARGE",
                format!(
                    "line {line_number} is {} bytes, more than the item limit of {}",
                    line.len(),
                    limits.max_item_bytes
                ),
            ));
        }
        let text = std::str::from_utf8(line).map_err(|_| {
            ApiError::bad_request(
                "INVALID_JSON",
                format!("line {line_number} is not valid UTF-8"),
            )
        })?;
        let item: Box<RawValue> = serde_json::from_str(text).map_err(|error| {
            ApiError::bad_request(
                "INVALID_JSON",
                format!("line {line_number} is not valid JSON: {error}"),
            )
        })?;
        items += 1;
        if items > limits.max_items_per_batch {
            return Err(ApiError::too_large(
                "BATCH_TOO_LARGE",
                format!(
                    "the batch exceeds the limit of {} items",
                    limits.max_items_per_batch
                ),
            ));
        }
        pending.push(NewJob::new(item));
        Ok(())
    };

    let idle = std::time::Duration::from_secs(limits.body_idle_timeout_seconds.max(1));
    let mut last_append = std::time::Instant::now();
    while let Some(chunk) = next_chunk(&mut payload, idle).await? {
        received += chunk.len() as u64;
        if received > limits.max_ndjson_body_bytes {
            return Err(ApiError::too_large(
                "PAYLOAD_TOO_LARGE",
                format!(
                    "the request body is larger than {} bytes",
                    limits.max_ndjson_body_bytes
                ),
            ));
        }
        buffer.extend_from_slice(&chunk);

        let mut start = 0;
        while let Some(offset) = buffer[start..].iter().position(|b| *b == b'\n') {
            take_line(&buffer[start..start + offset], &mut pending)?;
            start += offset + 1;
        }
        buffer.drain(..start);
        if buffer.len() > limits.max_item_bytes {
            return Err(ApiError::too_large(
                "ITEM_TOO_LARGE",
                format!(
                    "line {} is longer than the item limit of {} bytes",
                    line_number + 1,
                    limits.max_item_bytes
                ),
            ));
        }

        // A slow upload still writes every STAGING_TOUCH, so the store can
        // tell a live upload from one whose process died.
        let stale = !pending.is_empty() && last_append.elapsed() >= STAGING_TOUCH;
        if pending.len() >= chunk_rows || stale {
            let part = std::mem::replace(&mut pending, Vec::with_capacity(chunk_rows));
            state.consume_item_budget(user, part.len() as u64).await?;
            state.queue.append_items(&mut staging, part).await?;
            last_append = std::time::Instant::now();
        }
    }
    if !buffer.is_empty() {
        take_line(&buffer, &mut pending)?;
    }
    if !pending.is_empty() {
        state
            .consume_item_budget(user, pending.len() as u64)
            .await?;
        state.queue.append_items(&mut staging, pending).await?;
    }
    if staging.items_appended == 0 {
        return Err(ApiError::unprocessable(
            "EMPTY_BATCH",
            "a batch needs at least one item",
        ));
    }
    Ok(staging)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListQuery {
    /// Only batches in this status.
    pub status: Option<String>,
    /// Only batches of this kind.
    pub kind: Option<String>,
    /// The `nextCursor` of the previous page.
    pub cursor: Option<String>,
    /// Page size, 1 to the server's maximum (default 100).
    pub limit: Option<u32>,
}

pub(super) fn page_limit(state: &AppState, limit: Option<u32>) -> Result<u32, ApiError> {
    let max = state.config.limits.max_page_size;
    match limit {
        None => Ok(100.min(max)),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad_request(
            "INVALID_QUERY",
            format!("limit must be between 1 and {max}, got {n}"),
        )),
    }
}

#[utoipa::path(
    get,
    path = "/api/batches",
    tag = "batches",
    params(ListQuery),
    responses((status = 200, description = "the caller's batches, newest first", body = Object)),
    security(("bearer" = []))
)]
pub async fn list(
    user: AuthUser,
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let query = query.into_inner();
    let status = query
        .status
        .map(|s| s.parse::<BatchStatus>())
        .transpose()
        .map_err(|error| ApiError::bad_request("INVALID_QUERY", error))?;
    let cursor = query
        .cursor
        .map(|c| c.parse::<BatchId>())
        .transpose()
        .map_err(|_| super::invalid_cursor())?;
    let filter = BatchFilter {
        status,
        kind: query.kind,
        cursor,
        limit: page_limit(&state, query.limit)?,
    };
    let page = state
        .queue
        .store()
        .list_batches(&user.own_scope(), filter)
        .await?;
    Ok(HttpResponse::Ok().json(page))
}

#[utoipa::path(
    get,
    path = "/api/batches/{id}",
    tag = "batches",
    params(("id" = String, Path, description = "batch id")),
    responses(
        (status = 200, description = "the batch with its counters", body = Object),
        (status = 404, description = "no such batch for this caller", body = crate::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    user: AuthUser,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_batch_id(&id)?;
    let batch = state.queue.store().get_batch(&user.own_scope(), id).await?;
    Ok(HttpResponse::Ok().json(batch))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ItemsQuery {
    /// Only items in this status.
    pub status: Option<String>,
    /// The `nextCursor` of the previous page.
    pub cursor: Option<String>,
    pub limit: Option<u32>,
}

#[utoipa::path(
    get,
    path = "/api/batches/{id}/items",
    tag = "batches",
    params(("id" = String, Path, description = "batch id"), ItemsQuery),
    responses(
        (status = 200, description = "the batch's items in submission order", body = Object),
        (status = 404, description = "no such batch for this caller", body = crate::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn items(
    user: AuthUser,
    state: web::Data<AppState>,
    id: web::Path<String>,
    query: web::Query<ItemsQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_batch_id(&id)?;
    let query = query.into_inner();
    let status = query
        .status
        .map(|s| s.parse::<JobStatus>())
        .transpose()
        .map_err(|error| ApiError::bad_request("INVALID_QUERY", error))?;
    let cursor = query
        .cursor
        .map(|c| c.parse::<u32>())
        .transpose()
        .map_err(|_| super::invalid_cursor())?;
    let filter = ItemFilter {
        status,
        cursor,
        limit: page_limit(&state, query.limit)?,
    };
    let page = state
        .queue
        .store()
        .list_items(&user.own_scope(), id, filter)
        .await?;
    Ok(HttpResponse::Ok().json(page))
}

#[utoipa::path(
    post,
    path = "/api/batches/{id}/cancel",
    tag = "batches",
    params(("id" = String, Path, description = "batch id")),
    responses(
        (status = 200, description = "waiting items cancelled, running ones signalled", body = Object),
        (status = 404, description = "no such batch for this caller", body = crate::error::ErrorBody),
        (status = 409, description = "the batch has already finished", body = crate::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn cancel(
    user: AuthUser,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_batch_id(&id)?;
    let reason = format!("cancelled by {}", user.id);
    let batch = state
        .queue
        .cancel_batch(&user.own_scope(), id, &reason)
        .await?;
    Ok(HttpResponse::Ok().json(batch))
}

#[utoipa::path(
    post,
    path = "/api/batches/{id}/retry",
    tag = "batches",
    params(("id" = String, Path, description = "batch id")),
    responses(
        (status = 200, description = "dead items queued again", body = Object),
        (status = 404, description = "no such batch for this caller", body = crate::error::ErrorBody),
        (status = 409, description = "the batch has no dead items", body = crate::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn retry(
    user: AuthUser,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_batch_id(&id)?;
    let (batch, report) = state.queue.retry_batch(&user.own_scope(), id).await?;
    if report.redriven.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "NO_FAILED_ITEMS",
            format!("batch {id} has no dead items to retry"),
        ));
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "batch": batch,
        "requeued": report.redriven.len(),
    })))
}
