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

tokio::task_local! {
    static CURRENT: String;
}

/// Returns the correlation id of the request being handled, if any.
pub fn current() -> Option<String> {
    CURRENT.try_with(Clone::clone).ok()
}

/// The request's correlation id, as the middleware stored it.
#[derive(Debug, Clone)]
pub struct CorrelationId(pub String);

/// The request's W3C trace context: the incoming `traceparent` when it is
/// valid, else a new trace.
#[derive(Debug, Clone)]
pub struct TraceParent(pub String);

/// Returns the trace context the middleware stored for `request`.
pub fn traceparent_of(request: &HttpRequest) -> Option<String> {
    request
        .extensions()
        .get::<TraceParent>()
        .map(|t| t.0.clone())
}

pub fn of(request: &HttpRequest) -> String {
    request
        .extensions()
        .get::<CorrelationId>()
        .map(|id| id.0.clone())
        .unwrap_or_default()
}

/// Keeps a valid incoming id (short, safe characters), else makes a new
/// UUID v4; the rule is `telemetry::correlation::accept`.
pub fn accept(incoming: Option<&str>) -> String {
    telemetry::correlation::accept(incoming)
}

/// Middleware that assigns the id, runs the request in its span, and
/// records the request in the HTTP metrics.
#[derive(Debug, Clone, Default)]
pub struct Correlation {
    metrics: Option<std::sync::Arc<telemetry::Metrics>>,
}

impl Correlation {
    pub fn new(metrics: std::sync::Arc<telemetry::Metrics>) -> Self {
        Self {
            metrics: Some(metrics),
        }
    }
}

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
            metrics: self.metrics.clone(),
        }))
    }
}

pub struct CorrelationMiddleware<S> {
    service: Rc<S>,
    metrics: Option<std::sync::Arc<telemetry::Metrics>>,
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
        let trace = telemetry::correlation::TraceContext::accept(
            request
                .headers()
                .get(telemetry::correlation::TRACEPARENT_HEADER)
                .and_then(|value| value.to_str().ok()),
        );
        let trace_id = trace.trace_id_hex();
        request
            .extensions_mut()
            .insert(TraceParent(trace.to_string()));

        let span = tracing::info_span!(
            "request",
            correlation_id = %id,
            trace_id = %trace_id,
            method = %request.method(),
            path = %request.path(),
        );
        let service = self.service.clone();
        let scoped_id = id.clone();
        let metrics = self.metrics.clone();
        let route = request
            .match_pattern()
            .unwrap_or_else(|| "unmatched".to_owned());
        let method = request.method().to_string();
        let started = std::time::Instant::now();
        Box::pin(
            CURRENT
                .scope(scoped_id, async move {
                    let mut response = service.call(request).await?;
                    if let Some(metrics) = metrics {
                        let status = response.status().as_u16();
                        metrics.observe_request(&route, &method, status, started.elapsed());
                    }
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
