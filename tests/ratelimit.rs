//! Rate limits through the real binary: headers, 429 bodies, per-user
//! keys, forwarding headers from trusted and untrusted peers, the item
//! budget, and one limit shared by two processes on one SQLite file.

#![allow(clippy::unwrap_used, reason = "tests")]

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

/// A configuration with the policy `tiny` (3 at once, then one every
/// 20 s) on `GET /api/batches`. `settings` goes into `[rate_limits]`,
/// `policies` and `routes` into their tables.
fn config_with(settings: &str, policies: &str, routes: &str) -> String {
    format!(
        r#"
[kinds.noop]
handler = "noop"

[rate_limits]
{settings}

[rate_limits.policies.tiny]
limit = 3
period = "1m"
burst = 2
message = "slow down"
{policies}

[rate_limits.routes]
"GET /api/batches" = "tiny"
{routes}
"#
    )
}

fn config(settings: &str) -> String {
    config_with(settings, "", "")
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn headers_count_down_and_the_fourth_request_is_rejected() {
    let server = Server::start(&config(""));
    let alice = token("alice", false);
    let client = client();

    for n in 1..=3u32 {
        let response = client
            .get(server.url("/api/batches"))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-ratelimit-limit"), "3");
        assert_eq!(
            header(&response, "x-ratelimit-remaining"),
            (3 - n).to_string(),
            "request {n}"
        );
        assert_eq!(header(&response, "x-ratelimit-window"), "60");
        assert!(
            header(&response, "x-ratelimit-reset")
                .parse::<i64>()
                .unwrap()
                > chrono::Utc::now().timestamp() - 1
        );
        assert_eq!(header(&response, "ratelimit-policy"), "\"tiny\";q=3;w=60");
        assert!(
            header(&response, "ratelimit").starts_with(&format!("\"tiny\";r={};t=", 3 - n)),
            "{}",
            header(&response, "ratelimit")
        );
    }

    let response = client
        .get(server.url("/api/batches"))
        .bearer_auth(&alice)
        .header("X-Correlation-ID", "limited-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let retry: u64 = header(&response, "retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(header(&response, "x-ratelimit-remaining"), "0");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], "RATE_LIMITED");
    assert_eq!(body["policy"], "tiny");
    assert_eq!(body["correlationId"], "limited-1");
    assert!(
        body["message"].as_str().unwrap().contains("slow down"),
        "{body}"
    );

    // Another user has a budget of their own; other routes use general.
    let (status, _) = call(
        client
            .get(server.url("/api/batches"))
            .bearer_auth(token("bob", false)),
    )
    .await;
    assert_eq!(status, 200);
    let response = client
        .get(server.url("/api/admin/kinds"))
        .bearer_auth(token("ops", true))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&response, "x-ratelimit-limit"), "100");
    let response = client.get(server.url("/health")).send().await.unwrap();
    assert!(
        response.headers().get("x-ratelimit-limit").is_none(),
        "probes are not limited"
    );
}

#[tokio::test]
async fn concurrent_requests_admit_exactly_the_limit() {
    let server = Server::start(&config_with(
        "",
        "[rate_limits.policies.pool]\nlimit = 5\nperiod = \"1m\"\nburst = 4\n",
        "\"GET /api/admin/kinds\" = \"pool\"\n",
    ));
    let admin = token("ops", true);
    let client = client();
    let requests = (0..40).map(|_| {
        client
            .get(server.url("/api/admin/kinds"))
            .bearer_auth(&admin)
            .send()
    });
    let statuses: Vec<u16> = futures_util::future::join_all(requests)
        .await
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 35);
}

#[tokio::test]
async fn forwarding_headers_count_only_from_trusted_proxies() {
    // No trusted proxy: a spoofed X-Forwarded-For changes nothing, so
    // anonymous requests from this peer share one budget.
    let untrusted = Server::start(&config(""));
    let client = client();
    let mut statuses = Vec::new();
    for n in 0..4 {
        let response = client
            .get(untrusted.url("/api/batches"))
            .header("X-Forwarded-For", format!("203.0.113.{n}"))
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(
        statuses,
        vec![401, 401, 401, 429],
        "a spoofed header must not give fresh keys"
    );

    // With loopback trusted as a proxy, the right-most untrusted address
    // is the client.
    let trusted = Server::start(&config_with(
        "",
        "[rate_limits.client_key]\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
        "",
    ));
    for n in 0..4 {
        let response = client
            .get(trusted.url("/api/batches"))
            .header("X-Forwarded-For", format!("198.51.100.7, 203.0.113.{n}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            401,
            "client 203.0.113.{n} has a budget of its own"
        );
    }
    for _ in 0..3 {
        client
            .get(trusted.url("/api/batches"))
            .header("X-Forwarded-For", "203.0.113.50")
            .send()
            .await
            .unwrap();
    }
    let response = client
        .get(trusted.url("/api/batches"))
        .header("X-Forwarded-For", "198.51.100.9, 203.0.113.50")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        429,
        "the same right-most client shares its budget"
    );
}

#[tokio::test]
async fn item_budget_rejects_or_paces_large_batches() {
    let policies = "[rate_limits.policies.batch_items]\nlimit = 60\nperiod = \"1m\"\nburst = 5\n";
    let reject = Server::start(&config_with("item_budget = \"reject\"", policies, ""));
    let alice = token("alice", false);
    let (status, body) = call(
        client()
            .post(reject.url("/api/batches"))
            .bearer_auth(&alice)
            .json(&json!({ "kind": "noop", "items": vec![1; 10] })),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (429, Some("RATE_LIMITED")),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("6 would fit now"),
        "{body}"
    );
    let (status, _) = call(
        client()
            .post(reject.url("/api/batches"))
            .bearer_auth(&alice)
            .json(&json!({ "kind": "noop", "items": vec![1; 6] })),
    )
    .await;
    assert_eq!(status, 201, "a batch within the budget is accepted");

    let pace = Server::start(&config_with("item_budget = \"pace\"", policies, ""));
    let started = Instant::now();
    let (status, batch) = call(
        client()
            .post(pace.url("/api/batches"))
            .bearer_auth(&alice)
            .json(&json!({ "kind": "noop", "items": vec![1; 9] })),
    )
    .await;
    assert_eq!(status, 201, "{batch}");
    let id = batch["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (_, early) = call(
        client()
            .get(pace.url(&format!("/api/batches/{id}")))
            .bearer_auth(&alice),
    )
    .await;
    let early_done = early["succeeded"].as_u64().unwrap();
    assert!(
        (1..9).contains(&early_done),
        "the burst runs at once and the rest is paced: {early}"
    );
    let done = wait_terminal(&pace, &token("alice", false), &id, Duration::from_secs(30)).await;
    assert_eq!(done["succeeded"], 9);
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "9 items at 1 per second after a burst of 6"
    );
}

#[tokio::test]
async fn store_backend_shares_one_limit_between_processes() {
    let shared = config("backend = \"store\"");
    let first = Server::start(&shared);
    let second = Server::start_in(&first.data_dir, &shared);
    let alice = token("alice", false);
    let client = client();

    let mut statuses = Vec::new();
    for server in [&first, &second, &first, &second] {
        let response = client
            .get(server.url("/api/batches"))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(
        statuses,
        vec![200, 200, 200, 429],
        "three requests per minute across both processes"
    );
}
