//! The actix adapter of the `ratelimit` crate: a middleware that charges
//! each request to its route's policy and writes the rate-limit headers,
//! and the item budget charged by batch creation.
//!
//! Headers on every limited response: the conventional `X-RateLimit-Limit`,
//! `X-RateLimit-Remaining`, `X-RateLimit-Window` (seconds) and
//! `X-RateLimit-Reset` (Unix seconds when the budget is full again), and
//! the IETF structured fields `RateLimit-Policy: "name";q=LIMIT;w=WINDOW`
//! and `RateLimit: "name";r=REMAINING;t=SECONDS`. A rejection is 429 with
//! `Retry-After` and the standard error body.

use std::future::{Ready, ready};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::EitherBody;
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::http::StatusCode;
use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use actix_web::web;
use anyhow::Context;
use domain::{Clock, RateLimitStore};
use futures_util::future::LocalBoxFuture;
use ratelimit::{
    ClientKeyRules, ClientRequest, Decision, InMemoryLimiter, MemoryLimits, Policy, PolicySet,
    RateLimitConfig, RateLimiter, StoreLimiter,
};
use serde::Deserialize;

use crate::auth::Auth;
use crate::error::ApiError;

/// Policy charged by batch creation with the number of items.
pub const ITEMS_POLICY: &str = "batch_items";

/// Paths never limited: probes and scrapes must not be throttled.
const EXEMPT: [&str; 4] = ["/health", "/ready", "/metrics", "/openapi.json"];

/// Storage of the limiter state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// In this process only.
    #[default]
    Memory,
    /// In the database, shared by every process on it.
    Store,
}

/// Handling of a batch larger than the caller's item budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ItemBudget {
    /// Accept the batch and run the owner's items no faster than the
    /// `batch_items` policy allows.
    #[default]
    Pace,
    /// Reject a batch whose items do not fit the budget now, saying how
    /// many would.
    Reject,
}

/// The `[rate_limits]` configuration section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Turn every limit off.
    pub disabled: bool,
    pub backend: Backend,
    pub item_budget: ItemBudget,
    #[serde(flatten)]
    pub limits: RateLimitConfig,
}

/// Built-in route assignments; configuration may override each.
fn default_routes() -> [(&'static str, &'static str); 2] {
    [
        ("POST /api/batches", "batch_creation"),
        ("GET /ws", "realtime"),
    ]
}

/// The server's limiter: policies, key rules and where state lives.
#[derive(Clone)]
pub struct Limits {
    pub policies: Arc<PolicySet>,
    keys: Arc<ClientKeyRules>,
    limiter: Arc<dyn RateLimiter>,
    clock: Arc<dyn Clock>,
    pub disabled: bool,
    pub item_budget: ItemBudget,
    metrics: Option<Arc<telemetry::Metrics>>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("disabled", &self.disabled)
            .finish_non_exhaustive()
    }
}

impl Limits {
    /// Builds the limiter and, for the memory backend, a sweeper task that
    /// keeps per-key state bounded; the store backend prunes old rows.
    pub fn build<S: RateLimitStore>(
        settings: &RateLimitSettings,
        store: Arc<S>,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Self> {
        let mut config = settings.limits.clone();
        for (route, policy) in default_routes() {
            config
                .routes
                .entry(route.to_owned())
                .or_insert_with(|| policy.to_owned());
        }
        let policies = PolicySet::from_config(&config).context("config section rate_limits")?;
        let keys = ClientKeyRules::from_config(&config.client_key)
            .context("config section rate_limits.client_key")?;

        let limiter: Arc<dyn RateLimiter> = match settings.backend {
            Backend::Memory => {
                let memory = Arc::new(InMemoryLimiter::new(MemoryLimits::default()));
                let sweeper = Arc::downgrade(&memory);
                let sweep_clock = clock.clone();
                tokio::spawn(async move {
                    let mut ticker = tokio::time::interval(Duration::from_secs(30));
                    loop {
                        ticker.tick().await;
                        let Some(memory) = sweeper.upgrade() else {
                            return;
                        };
                        let swept = memory.sweep(sweep_clock.now());
                        if swept > 0 {
                            tracing::debug!(
                                swept,
                                keys = memory.len(),
                                "idle rate-limit keys swept"
                            );
                        }
                    }
                });
                memory
            }
            Backend::Store => {
                let shared = Arc::new(StoreLimiter::new(store));
                let pruner = Arc::downgrade(&shared);
                let prune_clock = clock.clone();
                tokio::spawn(async move {
                    let mut ticker = tokio::time::interval(Duration::from_secs(60));
                    loop {
                        ticker.tick().await;
                        let Some(shared) = pruner.upgrade() else {
                            return;
                        };
                        match shared.prune(prune_clock.now()).await {
                            Ok(0) => {}
                            Ok(pruned) => tracing::debug!(pruned, "stale rate-limit rows pruned"),
                            Err(error) => tracing::warn!(%error, "pruning rate-limit rows failed"),
                        }
                    }
                });
                shared
            }
        };

        Ok(Self {
            policies: Arc::new(policies),
            keys: Arc::new(keys),
            limiter,
            clock,
            disabled: settings.disabled,
            item_budget: settings.item_budget,
            metrics: None,
        })
    }

    /// Derives the client's key: `user:<id>` with a valid token, else its
    /// address.
    fn key(&self, request: &ServiceRequest, user: Option<&str>) -> String {
        let peer = request
            .peer_addr()
            .map(|addr| addr.ip())
            .unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let x_forwarded_for = header_lines(request.headers(), "x-forwarded-for");
        let forwarded = header_lines(request.headers(), "forwarded");
        self.keys.key_for(&ClientRequest {
            peer,
            user_id: user,
            x_forwarded_for: &x_forwarded_for,
            forwarded: &forwarded,
        })
    }

    /// Counts item-budget rejections in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<telemetry::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Charges `items` to the caller's item budget in reject mode; in pace
    /// mode the queue paces the items instead and this admits everything.
    pub async fn charge_items(&self, user: &str, items: u64) -> Result<(), ApiError> {
        if self.disabled || self.item_budget == ItemBudget::Pace || items == 0 {
            return Ok(());
        }
        let Some(policy) = self.policies.get(ITEMS_POLICY) else {
            return Ok(());
        };
        let key = format!("user:{user}");
        let cost = u32::try_from(items).unwrap_or(u32::MAX);
        let decision = self
            .limiter
            .check(policy, &key, cost, self.clock.now())
            .await
            .map_err(|error| ApiError::internal(&error))?;
        if decision.is_allowed() {
            return Ok(());
        }
        tracing::warn!(target: "security", user_id = user, policy = policy.name(), items, fits = decision.available_now, "item budget exceeded");
        if let Some(metrics) = &self.metrics {
            metrics.rate_limit_rejected(policy.name());
        }
        let retry = decision
            .retry_after_secs()
            .unwrap_or(decision.reset_after_secs())
            .max(1);
        Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "RATE_LIMITED",
            format!(
                "{items} items exceed the {} budget ({} per {} s); {} would fit now, retry in {retry} s",
                policy.name(),
                policy.limit(),
                policy.period().as_secs(),
                decision.available_now
            ),
        )
        .with_policy(policy.name())
        .with_retry_after(retry))
    }

    /// Returns the rate at which pace mode runs one owner's items, taken
    /// from the `batch_items` policy.
    pub fn item_pace(&self) -> Option<queue::Rate> {
        if self.disabled || self.item_budget != ItemBudget::Pace {
            return None;
        }
        let policy = self.policies.get(ITEMS_POLICY)?;
        Some(queue::Rate {
            max: policy.limit(),
            per: policy.period(),
            burst: Some(policy.burst().max(1)),
        })
    }
}

fn header_lines<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a str> {
    headers
        .get_all(name)
        .filter_map(|value| value.to_str().ok())
        .collect()
}

/// Writes the rate-limit headers of `decision` under `policy`.
pub fn write_headers(headers: &mut HeaderMap, policy: &Policy, decision: &Decision) {
    let window = policy.period().as_secs().max(1);
    let reset_epoch = decision.reset_at.timestamp().max(0);
    let reset_after = decision.reset_after_secs();
    let name = policy.name();
    let values = [
        ("x-ratelimit-limit", decision.limit.to_string()),
        ("x-ratelimit-remaining", decision.remaining.to_string()),
        ("x-ratelimit-window", window.to_string()),
        ("x-ratelimit-reset", reset_epoch.to_string()),
        (
            "ratelimit-policy",
            format!("\"{name}\";q={};w={window}", decision.limit),
        ),
        (
            "ratelimit",
            format!("\"{name}\";r={};t={reset_after}", decision.remaining),
        ),
    ];
    for (header, value) in values {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(header), value);
        }
    }
    if let Some(retry) = decision.retry_after_secs() {
        headers.insert(
            HeaderName::from_static("retry-after"),
            HeaderValue::from(retry.max(1)),
        );
    }
}

/// Middleware charging one unit per request to the route's policy.
#[derive(Debug, Clone, Copy, Default)]
pub struct RateLimit;

impl<S, B> Transform<S, ServiceRequest> for RateLimit
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Transform = RateLimitMiddleware<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(RateLimitMiddleware {
            service: Rc::new(service),
        }))
    }
}

pub struct RateLimitMiddleware<S> {
    service: Rc<S>,
}

impl<S, B> Service<ServiceRequest> for RateLimitMiddleware<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    forward_ready!(service);

    fn call(&self, request: ServiceRequest) -> Self::Future {
        let service = self.service.clone();
        Box::pin(async move {
            let limits = request.app_data::<web::Data<Limits>>().cloned();
            let exempt = EXEMPT.contains(&request.path());
            let Some(limits) = limits.filter(|limits| !limits.disabled && !exempt) else {
                return service
                    .call(request)
                    .await
                    .map(ServiceResponse::map_into_left_body);
            };

            // A request with a valid token is counted against its user. Any
            // other request is counted against its address, so invalid
            // tokens cannot spread one client over many keys.
            let user = request
                .app_data::<web::Data<Auth>>()
                .and_then(|auth| bearer_user(&request, auth));
            let key = limits.key(&request, user.as_deref());
            let pattern = request
                .match_pattern()
                .unwrap_or_else(|| request.path().to_owned());
            let route = format!("{} {pattern}", request.method());
            let policy = limits.policies.for_route(&route);

            let decision = match limits
                .limiter
                .check(policy, &key, 1, limits.clock.now())
                .await
            {
                Ok(decision) => decision,
                Err(error) => {
                    // A broken limiter store must not take the API down:
                    // the request goes through, and the failure is logged.
                    tracing::error!(%error, route = %route, "rate-limit check failed; request admitted");
                    return service
                        .call(request)
                        .await
                        .map(ServiceResponse::map_into_left_body);
                }
            };

            if !decision.is_allowed() {
                let retry = decision.retry_after_secs().unwrap_or(1).max(1);
                tracing::warn!(
                    target: "security",
                    key = %key,
                    policy = policy.name(),
                    route = %route,
                    retry_after_s = retry,
                    "request rate limited"
                );
                let error = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "RATE_LIMITED",
                    format!(
                        "{} (policy {}); retry in {retry} s",
                        policy.message(),
                        policy.name()
                    ),
                )
                .with_policy(policy.name());
                let mut response = actix_web::ResponseError::error_response(&error);
                write_headers(response.headers_mut(), policy, &decision);
                let (request, _) = request.into_parts();
                return Ok(ServiceResponse::new(request, response).map_into_right_body());
            }

            let mut response = service.call(request).await?;
            write_headers(response.headers_mut(), policy, &decision);
            Ok(response.map_into_left_body())
        })
    }
}

fn bearer_user(request: &ServiceRequest, auth: &Auth) -> Option<String> {
    let value = request
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?;
    auth.verify(token.trim()).ok().map(|user| user.id.0)
}
