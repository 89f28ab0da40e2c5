//! Correlation ids: one per request, kept from a valid incoming
//! `X-Correlation-ID` header or created as a UUID v4, echoed in the
//! response and in every error body, and stored on batches.

use std::future::{Ready, ready};
use std::rc::Rc;

use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{HttpMessage, HttpRequest};
use futures_util::future::LocalBoxFuture;
use tracing::Instrument;

pub const HEADER: &str = "x-correlation-id";

/// Longest incoming id kept.
const MAX_LEN: usize = 128;

tokio::task_local! {
    static CURRENT: String;
}

/// The correlation id of the request being handled, if any.
pub fn current() -> Option<String> {
    CURRENT.try_with(Clone::clone).ok()
}

/// The request's correlation id, as the middleware stored it.
#[derive(Debug, Clone)]
pub struct CorrelationId(pub String);

pub fn of(request: &HttpRequest) -> String {
    request
        .extensions()
        .get::<CorrelationId>()
        .map(|id| id.0.clone())
        .unwrap_or_default()
}

/// Keeps an incoming id only if it is short and made of safe characters,
/// so it can go into logs and headers unescaped.
pub fn accept(incoming: Option<&str>) -> String {
    match incoming {
        Some(id)
            if !id.is_empty()
                && id.len() <= MAX_LEN
                && id.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':')
                }) =>
        {
            id.to_owned()
        }
        _ => uuid::Uuid::new_v4().to_string(),
    }
}

/// Middleware that assigns the id and runs the request in its span.
#[derive(Debug, Clone, Copy, Default)]
pub struct Correlation;

impl<S, B> Transform<S, ServiceRequest> for Correlation
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: 'static,
{
    type Response = ServiceResponse<B>;
    type Error = actix_web::Error;
    type Transform = CorrelationMiddleware<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(CorrelationMiddleware {
            service: Rc::new(service),
        }))
    }
}

pub struct CorrelationMiddleware<S> {
    service: Rc<S>,
}

impl<S, B> Service<ServiceRequest> for CorrelationMiddleware<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: 'static,
{
    type Response = ServiceResponse<B>;
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    forward_ready!(service);

    fn call(&self, request: ServiceRequest) -> Self::Future {
        let incoming = request
            .headers()
            .get(HEADER)
            .and_then(|value| value.to_str().ok());
        let id = accept(incoming);
        request.extensions_mut().insert(CorrelationId(id.clone()));

        let span = tracing::info_span!(
            "request",
            correlation_id = %id,
            method = %request.method(),
            path = %request.path(),
        );
        let service = self.service.clone();
        let scoped_id = id.clone();
        Box::pin(
            CURRENT
                .scope(scoped_id, async move {
                    let mut response = service.call(request).await?;
                    if let Ok(value) = HeaderValue::from_str(&id) {
                        response
                            .headers_mut()
                            .insert(HeaderName::from_static(HEADER), value);
                    }
                    Ok(response)
                })
                .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_incoming_id_is_kept() {
        assert_eq!(accept(Some("req-42.a:b_c")), "req-42.a:b_c");
    }

    #[test]
    fn unsafe_or_long_id_is_replaced() {
        for bad in ["", "a b", "x\ny", "<script>", &"a".repeat(129)] {
            let replaced = accept(Some(bad));
            assert_ne!(replaced, bad);
            assert!(uuid::Uuid::parse_str(&replaced).is_ok(), "{replaced}");
        }
    }

    #[test]
    fn missing_id_gets_a_uuid() {
        assert!(uuid::Uuid::parse_str(&accept(None)).is_ok());
    }
}
