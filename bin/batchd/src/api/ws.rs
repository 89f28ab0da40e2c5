//! The WebSocket endpoint and the tickets browsers use to reach it.
//!
//! Credentials, in the order they are looked for: an `Authorization:
//! Bearer` header (non-browser clients); a `Sec-WebSocket-Protocol` offer
//! of `batchd` plus `bearer.<token>` (browsers, which cannot set headers
//! on the handshake); or a short-lived single-use `?ticket=` from
//! `POST /api/ws/tickets`. A long-lived token is never accepted in the
//! query string, where proxies log it. Everything is checked before the
//! upgrade, so a refused client gets an HTTP error, not a socket.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

use super::AppState;
use crate::auth::{Auth, AuthUser};
use crate::error::ApiError;

/// Subprotocol the server selects when a browser offers a token that way.
const SUBPROTOCOL: &str = "batchd";

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WsQuery {
    /// A single-use ticket from `POST /api/ws/tickets`.
    pub ticket: Option<String>,
    /// Never accepted: sending a token here is refused with 400.
    pub token: Option<String>,
}

/// Formats the client's address for the security log.
fn peer(request: &HttpRequest) -> String {
    request
        .peer_addr()
        .map_or_else(|| "unknown".to_owned(), |addr| addr.ip().to_string())
}

fn offered_token(request: &HttpRequest) -> Option<String> {
    let offers: Vec<String> = request
        .headers()
        .get_all("sec-websocket-protocol")
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|offer| offer.trim().to_owned())
        .collect();
    let offered_batchd = offers.iter().any(|offer| offer == SUBPROTOCOL);
    let token = offers
        .iter()
        .find_map(|offer| offer.strip_prefix("bearer."))
        .map(str::to_owned);
    token.filter(|_| offered_batchd)
}

#[utoipa::path(
    get,
    path = "/ws",
    tag = "realtime",
    params(WsQuery),
    responses(
        (status = 101, description = "switched to WebSocket; see the message types in the architecture notes"),
        (status = 400, description = "a token in the query string, or not a WebSocket handshake", body = crate::error::ErrorBody),
        (status = 401, description = "missing, invalid, expired or used credential", body = crate::error::ErrorBody),
        (status = 403, description = "Origin not allowed", body = crate::error::ErrorBody),
    )
)]
pub async fn connect(
    request: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
    auth: web::Data<Auth>,
    query: web::Query<WsQuery>,
) -> Result<HttpResponse, ApiError> {
    let origin = request
        .headers()
        .get("origin")
        .and_then(|value| value.to_str().ok());
    if let Err(error) = state.origins.check(origin) {
        tracing::warn!(target: "security", origin = origin.unwrap_or(""), %error, "websocket origin rejected");
        return Err(ApiError::forbidden("ORIGIN_NOT_ALLOWED", error.to_string()));
    }
    if query.token.is_some() {
        tracing::warn!(target: "security", peer = %peer(&request), "websocket token in the query string rejected");
        return Err(ApiError::bad_request(
            "TOKEN_IN_QUERY",
            "tokens are not accepted in the query string; use the Authorization header, the bearer subprotocol, or a ticket",
        ));
    }

    let header = request
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let from_protocol = offered_token(&request);
    let rejected = |error: ApiError| {
        tracing::warn!(target: "security", code = error.code, peer = %peer(&request), "websocket authentication failed");
        error
    };
    let user = if let Some(value) = header {
        let token = value
            .strip_prefix("Bearer ")
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "TOKEN_INVALID",
                    "the Authorization header must use the Bearer scheme",
                )
            })
            .map_err(rejected)?;
        auth.verify(token.trim()).map_err(rejected)?.id
    } else if let Some(token) = &from_protocol {
        auth.verify(token).map_err(rejected)?.id
    } else if let Some(ticket) = &query.ticket {
        state.tickets.redeem(ticket).await.map_err(|error| {
            tracing::warn!(target: "security", %error, "websocket ticket rejected");
            ApiError::unauthorized("TICKET_INVALID", error.to_string())
        })?
    } else {
        tracing::warn!(target: "security", "websocket connection without credentials");
        return Err(ApiError::unauthorized(
            "TOKEN_MISSING",
            "send an Authorization: Bearer header, the bearer subprotocol, or ?ticket= from POST /api/ws/tickets",
        ));
    };

    let mut response =
        gateway::actix::upgrade(state.hub.clone(), user, &request, body).map_err(|error| {
            ApiError::bad_request(
                "NOT_A_WEBSOCKET",
                format!("the request is not a WebSocket handshake: {error}"),
            )
        })?;
    if from_protocol.is_some() && header.is_none() {
        response.headers_mut().insert(
            actix_web::http::header::SEC_WEBSOCKET_PROTOCOL,
            actix_web::http::header::HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    Ok(response)
}

#[utoipa::path(
    post,
    path = "/api/ws/tickets",
    tag = "realtime",
    responses(
        (status = 201, description = "a single-use ticket for GET /ws?ticket=, valid for 30 s: {ticket, expiresAt}", body = Object),
        (status = 401, description = "not authenticated", body = crate::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn ticket(user: AuthUser, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let (ticket, expires_at) = state.tickets.issue(user.id.clone()).map_err(|error| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "TICKETS_EXHAUSTED",
            error.to_string(),
        )
    })?;
    Ok(HttpResponse::Created().json(serde_json::json!({
        "ticket": ticket,
        "expiresAt": expires_at,
    })))
}
