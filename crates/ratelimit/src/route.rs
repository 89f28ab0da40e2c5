//! The front door for a server: route to policy, request to key, and a
//! check at the injected clock's time.

use std::sync::Arc;

use domain::Clock;

use crate::decision::{Decision, RateLimitError, RateLimiter};
use crate::key::{ClientKeyRules, ClientRequest};
use crate::policy::{Policy, PolicySet};

/// Checks requests by route: picks the route's policy, derives the
/// client's key and calls the limiter with the clock's current time.
#[derive(Debug, Clone)]
pub struct RouteLimiter {
    policies: Arc<PolicySet>,
    keys: Arc<ClientKeyRules>,
    limiter: Arc<dyn RateLimiter>,
    clock: Arc<dyn Clock>,
}

/// A route check's decision with the policy and key it was made for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteDecision<'a> {
    pub policy: &'a Policy,
    pub key: String,
    pub decision: Decision,
}

impl RouteLimiter {
    pub fn new(
        policies: PolicySet,
        keys: ClientKeyRules,
        limiter: Arc<dyn RateLimiter>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            policies: Arc::new(policies),
            keys: Arc::new(keys),
            limiter,
            clock,
        }
    }

    pub fn policies(&self) -> &PolicySet {
        &self.policies
    }

    pub fn keys(&self) -> &ClientKeyRules {
        &self.keys
    }

    /// Checks `cost` units of `route_id`'s policy for the client of
    /// `request`. Routes without an assignment use `general`.
    pub async fn check(
        &self,
        route_id: &str,
        request: &ClientRequest<'_>,
        cost: u32,
    ) -> Result<RouteDecision<'_>, RateLimitError> {
        let policy = self.policies.for_route(route_id);
        let key = self.keys.key_for(request);
        let decision = self
            .limiter
            .check(policy, &key, cost, self.clock.now())
            .await?;
        Ok(RouteDecision {
            policy,
            key,
            decision,
        })
    }
}
