//! The HTTP API of the real binary: batch lifecycle, errors, auth and
//! isolation, dead letters, kinds and the OpenAPI document.

#![allow(clippy::unwrap_used, reason = "tests")]

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;

fn config(receiver: &Receiver) -> String {
    format!(
        r#"
[limits]
max_json_body_bytes = 200000
max_items_per_batch = 30000
max_item_bytes = 4096
max_page_size = 500

[outbound]
allow_loopback = true

[kinds.noop]
handler = "noop"

[kinds.sleep]
handler = "sleep"
concurrency = 2

[kinds.hook_bad]
handler = "webhook"
url = "http://{addr}/bad"
secret = "receiver-signing-secret"
max_attempts = 3
backoff_base_ms = 50
"#,
        addr = receiver.addr
    )
}

async fn create(server: &Server, token: &str, body: Value) -> (u16, Value) {
    call(
        client()
            .post(server.url("/api/batches"))
            .bearer_auth(token)
            .json(&body),
    )
    .await
}

#[tokio::test]
async fn batch_lifecycle_over_http() {
    let receiver = Receiver::start().await;
    let server = Server::start(&config(&receiver));
    let alice = token("alice", false);

    let (status, batch) = create(
        &server,
        &alice,
        json!({ "kind": "noop", "items": [{"n": 1}, {"n": 2}, {"n": 3}], "metadata": {"source": "test"} }),
    )
    .await;
    assert_eq!(status, 201, "{batch}");
    let id = batch["id"].as_str().unwrap().to_owned();
    assert_eq!(batch["itemCount"], 3);
    assert_eq!(batch["metadata"]["source"], "test");
    assert_eq!(batch["owner"], "alice");
    assert!(
        batch["correlationId"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
    );

    let done = wait_terminal(&server, &alice, &id, Duration::from_secs(20)).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["succeeded"], 3);

    let items = all_items(&server, &alice, &id).await;
    assert_eq!(items.len(), 3);
    assert!(items.iter().all(|item| item["status"] == "succeeded"));
    assert_eq!(items[1]["payload"], json!({"n": 2}));

    let (status, page) = call(
        client()
            .get(server.url(&format!("/api/batches/{id}/items?status=queued")))
            .bearer_auth(&alice),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(page["items"].as_array().unwrap().len(), 0);

    let job_id = items[0]["id"].as_i64().unwrap();
    let (status, job) = call(
        client()
            .get(server.url(&format!("/api/jobs/{job_id}")))
            .bearer_auth(&alice),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(job["attempts"], 1);
}

#[tokio::test]
async fn listing_filters_and_paginates() {
    let receiver = Receiver::start().await;
    let server = Server::start(&config(&receiver));
    let bob = token("bob", false);
    let mut ids = Vec::new();
    for n in 0..5 {
        let (status, batch) = create(&server, &bob, json!({ "kind": "noop", "items": [n] })).await;
        assert_eq!(status, 201);
        ids.push(batch["id"].as_str().unwrap().to_owned());
    }

    let (status, first) = call(
        client()
            .get(server.url("/api/batches?limit=2"))
            .bearer_auth(&bob),
    )
    .await;
    assert_eq!(status, 200);
    let first_ids: Vec<&str> = first["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(first_ids, vec![ids[4].as_str(), ids[3].as_str()]);
    let cursor = first["nextCursor"].as_str().unwrap();

    let (_, second) = call(
        client()
            .get(server.url(&format!("/api/batches?limit=10&cursor={cursor}")))
            .bearer_auth(&bob),
    )
    .await;
    assert_eq!(second["items"].as_array().unwrap().len(), 3);
    assert!(second["nextCursor"].is_null());

    let (_, by_kind) = call(
        client()
            .get(server.url("/api/batches?kind=sleep"))
            .bearer_auth(&bob),
    )
    .await;
    assert_eq!(by_kind["items"].as_array().unwrap().len(), 0);

    let (status, error) = call(
        client()
            .get(server.url("/api/batches?status=bogus"))
            .bearer_auth(&bob),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(error["code"], "INVALID_QUERY");
    let (status, error) = call(
        client()
            .get(server.url("/api/batches?cursor=not-a-cursor"))
            .bearer_auth(&bob),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(error["code"], "INVALID_CURSOR");
    let (status, error) = call(
        client()
            .get(server.url("/api/batches?limit=501"))
            .bearer_auth(&bob),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(error["code"], "INVALID_QUERY");
}

#[tokio::test]
async fn idempotency_key_returns_the_first_batch() {
    let receiver = Receiver::start().await;
    let server = Server::start(&config(&receiver));
    let alice = token("alice", false);
    let body = json!({ "kind": "noop", "items": [1, 2] });

    let send = |body: Value| {
        call(
            client()
                .post(server.url("/api/batches"))
                .bearer_auth(&alice)
                .header("Idempotency-Key", "order-42")
                .json(&body),
        )
    };
    let (first_status, first) = send(body.clone()).await;
    let (second_status, second) = send(body).await;
    assert_eq!(first_status, 201);
    assert_eq!(second_status, 200);
    assert_eq!(first["id"], second["id"]);

    let (status, error) = send(json!({ "kind": "noop", "items": [3] })).await;
    assert_eq!(status, 422);
    assert_eq!(error["code"], "IDEMPOTENCY_KEY_REUSED");

    let (_, list) = call(client().get(server.url("/api/batches")).bearer_auth(&alice)).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn bad_requests_get_their_codes_never_a_500() {
    let receiver = Receiver::start().await;
    let server = Server::start(&config(&receiver));
    let alice = token("alice", false);
    let client = client();

    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            client
                .post(server.url("/api/batches"))
                .bearer_auth(&alice)
                .header("content-type", "application/json")
                .body("{\"kind\": "),
            400,
            "INVALID_JSON",
        ),
        (
            client
                .post(server.url("/api/batches"))
                .bearer_auth(&alice)
                .json(&json!({"kind": "nope", "items": [1]})),
            422,
            "UNKNOWN_KIND",
        ),
        (
            client
                .post(server.url("/api/batches"))
                .bearer_auth(&alice)
                .json(&json!({"kind": "noop", "items": []})),
            422,
            "EMPTY_BATCH",
        ),
        (
            client
                .post(server.url("/api/batches"))
                .bearer_auth(&alice)
                .json(&json!({"kind": "noop"})),
            400,
            "INVALID_JSON",
        ),
        (
            client
                .post(server.url("/api/batches"))
                .bearer_auth(&alice)
                .json(&json!({"kind": "noop", "items": [1], "extra": true})),
            400,
            "INVALID_JSON",
        ),
        (
            client
                .post(server.url("/api/batches"))
                .bearer_auth(&alice)
                .json(&json!({"kind": "noop", "items": [1], "metadata": [1]})),
            422,
            "INVALID_FIELD",
        ),
        (
            client
                .post(server.url("/api/batches"))
                .bearer_auth(&alice)
                .json(&json!({"kind": "noop", "items": ["x".repeat(5000)]})),
            413,
            "ITEM_TOO_LARGE",
        ),
        (
            client
                .post(server.url("/api/batches"))
                .bearer_auth(&alice)
                .json(
                    &json!({"kind": "noop", "items": vec![json!({"pad": "y".repeat(100)}); 3000]}),
                ),
            413,
            "PAYLOAD_TOO_LARGE",
        ),
        (
            client
                .post(server.url("/api/batches"))
                .bearer_auth(&alice)
                .json(&json!({"kind": "noop", "items": vec![0; 30001]})),
            413,
            "BATCH_TOO_LARGE",
        ),
        (
            client
                .post(server.url("/api/batches"))
                .bearer_auth(&alice)
                .header("Idempotency-Key", "")
                .json(&json!({"kind": "noop", "items": [1]})),
            400,
            "INVALID_IDEMPOTENCY_KEY",
        ),
        (
            client
                .get(server.url("/api/batches/not-a-uuid"))
                .bearer_auth(&alice),
            404,
            "BATCH_NOT_FOUND",
        ),
        (
            client
                .get(server.url("/api/batches/0193c5a0-0000-7000-8000-000000000000"))
                .bearer_auth(&alice),
            404,
            "BATCH_NOT_FOUND",
        ),
        (
            client
                .get(server.url("/api/jobs/999999"))
                .bearer_auth(&alice),
            404,
            "JOB_NOT_FOUND",
        ),
        (
            client
                .get(server.url("/api/nothing-here"))
                .bearer_auth(&alice),
            404,
            "ROUTE_NOT_FOUND",
        ),
        (
            client
                .delete(server.url("/api/batches"))
                .bearer_auth(&alice),
            405,
            "METHOD_NOT_ALLOWED",
        ),
        (
            client
                .post(server.url("/api/dead-letters/redrive"))
                .bearer_auth(&alice)
                .header("content-type", "application/json")
                .body("[]"),
            400,
            "INVALID_JSON",
        ),
        (
            client
                .post(server.url("/api/dead-letters/redrive"))
                .bearer_auth(&alice)
                .json(&json!({"jobIds": []})),
            400,
            "INVALID_FIELD",
        ),
        (
            client
                .post(server.url("/api/batches?kind=noop"))
                .bearer_auth(&alice)
                .header("content-type", "application/x-ndjson")
                .body(""),
            422,
            "EMPTY_BATCH",
        ),
        (
            client
                .post(server.url("/api/batches"))
                .bearer_auth(&alice)
                .header("content-type", "application/x-ndjson")
                .body("1\n"),
            400,
            "MISSING_KIND",
        ),
    ];

    for (request, expected_status, expected_code) in cases {
        let (status, body) = call(request.header("X-Correlation-ID", "case-1")).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (expected_status, Some(expected_code)),
            "{body}"
        );
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        assert_eq!(body["correlationId"], "case-1", "{body}");
    }
}

#[tokio::test]
async fn authentication_and_isolation() {
    let receiver = Receiver::start().await;
    let server = Server::start(&config(&receiver));
    let alice = token("alice", false);
    let mallory = token("mallory", false);
    let client = client();

    let (status, body) = call(client.get(server.url("/api/batches"))).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("TOKEN_MISSING"))
    );

    // Signed with another key.
    let forged = {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_batchd"))
            .args(["token", "--user", "alice", "--admin"])
            .env(
                "BATCHD_JWT_SECRET",
                "a-completely-different-secret-of-enough-length",
            )
            .output()
            .unwrap();
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    };
    let (status, body) = call(client.get(server.url("/api/batches")).bearer_auth(&forged)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("TOKEN_INVALID"))
    );

    // alg: none with no signature.
    let unsigned = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsInJvbGUiOiJhZG1pbiIsImV4cCI6OTk5OTk5OTk5OX0.";
    let (status, _) = call(client.get(server.url("/api/batches")).bearer_auth(unsigned)).await;
    assert_eq!(status, 401);

    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({ "sub": "alice", "exp": 1_000_000_000u64, "iat": 999_999_000u64 }),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let (status, body) = call(client.get(server.url("/api/batches")).bearer_auth(&expired)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("TOKEN_EXPIRED"))
    );

    let (_, batch) = create(
        &server,
        &alice,
        json!({ "kind": "sleep", "items": [{"ms": 2000}, {"ms": 2000}, {"ms": 2000}] }),
    )
    .await;
    let id = batch["id"].as_str().unwrap();
    for (method, path) in [
        ("GET", format!("/api/batches/{id}")),
        ("GET", format!("/api/batches/{id}/items")),
        ("POST", format!("/api/batches/{id}/cancel")),
        ("POST", format!("/api/batches/{id}/retry")),
    ] {
        let request = match method {
            "GET" => client.get(server.url(&path)),
            _ => client.post(server.url(&path)),
        };
        let (status, body) = call(request.bearer_auth(&mallory)).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (404, Some("BATCH_NOT_FOUND")),
            "{method} {path}: {body}"
        );
    }
    let (_, list) = call(client.get(server.url("/api/batches")).bearer_auth(&mallory)).await;
    assert!(list["items"].as_array().unwrap().is_empty());

    let (status, body) = call(
        client
            .get(server.url("/api/admin/kinds"))
            .bearer_auth(&alice),
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (403, Some("FORBIDDEN")));

    // Alice's batch is still running and hers to cancel.
    let (status, cancelled) = call(
        client
            .post(server.url(&format!("/api/batches/{id}/cancel")))
            .bearer_auth(&alice),
    )
    .await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["cancelRequested"], true);
    let done = wait_terminal(&server, &alice, id, Duration::from_secs(20)).await;
    assert_eq!(done["status"], "cancelled");
    let (status, body) = call(
        client
            .post(server.url(&format!("/api/batches/{id}/cancel")))
            .bearer_auth(&alice),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("ILLEGAL_STATE"))
    );
}

#[tokio::test]
async fn dead_letters_are_listed_and_redriven() {
    let receiver = Receiver::start().await;
    let server = Server::start(&config(&receiver));
    let alice = token("alice", false);
    let admin = token("ops", true);
    let client = client();

    let (_, batch) = create(
        &server,
        &alice,
        json!({ "kind": "hook_bad", "items": [{"id": 1}, {"id": 2}] }),
    )
    .await;
    let id = batch["id"].as_str().unwrap().to_owned();
    let done = wait_terminal(&server, &alice, &id, Duration::from_secs(20)).await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["failed"], 2);
    assert_eq!(receiver.count("/bad"), 2, "a 400 is not retried");

    let (status, dead) = call(
        client
            .get(server.url(&format!("/api/dead-letters?batch={id}")))
            .bearer_auth(&alice),
    )
    .await;
    assert_eq!(status, 200);
    let dead = dead["items"].as_array().unwrap().clone();
    assert_eq!(dead.len(), 2);
    let error = dead[0]["lastError"].as_str().unwrap();
    assert!(error.contains("400"), "{error}");
    assert!(error.contains("field x is required"), "{error}");
    assert_eq!(dead[0]["errors"].as_array().unwrap().len(), 1);

    let (_, none) = call(
        client
            .get(server.url("/api/dead-letters"))
            .bearer_auth(token("mallory", false)),
    )
    .await;
    assert!(none["items"].as_array().unwrap().is_empty());
    let (_, all) = call(
        client
            .get(server.url("/api/dead-letters"))
            .bearer_auth(&admin),
    )
    .await;
    assert_eq!(all["items"].as_array().unwrap().len(), 2);

    let job_id = dead[0]["id"].as_i64().unwrap();
    let (status, report) = call(
        client
            .post(server.url("/api/dead-letters/redrive"))
            .bearer_auth(&alice)
            .json(&json!({ "jobIds": [job_id] })),
    )
    .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["count"], 1);
    let again = wait_terminal(&server, &alice, &id, Duration::from_secs(20)).await;
    assert_eq!(again["status"], "failed");
    assert_eq!(receiver.count("/bad"), 3);

    let (status, retried) = call(
        client
            .post(server.url(&format!("/api/batches/{id}/retry")))
            .bearer_auth(&alice),
    )
    .await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(retried["requeued"], 2);
    wait_terminal(&server, &alice, &id, Duration::from_secs(20)).await;
    assert_eq!(receiver.count("/bad"), 5);
}

#[tokio::test]
async fn ndjson_body_streams_a_large_batch() {
    let receiver = Receiver::start().await;
    let server = Server::start(&config(&receiver));
    let alice = token("alice", false);
    let body: String = (0..20_000).map(|n| format!("{{\"n\":{n}}}\n")).collect();

    let (status, batch) = call(
        client()
            .post(server.url("/api/batches?kind=noop&priority=3"))
            .bearer_auth(&alice)
            .header("content-type", "application/x-ndjson")
            .body(body),
    )
    .await;
    assert_eq!(status, 201, "{batch}");
    assert_eq!(batch["itemCount"], 20_000);
    assert_eq!(batch["priority"], 3);
    let id = batch["id"].as_str().unwrap().to_owned();
    let done = wait_terminal(&server, &alice, &id, Duration::from_secs(60)).await;
    assert_eq!(done["succeeded"], 20_000);

    let (status, error) = call(
        client()
            .post(server.url("/api/batches?kind=noop"))
            .bearer_auth(&alice)
            .header("content-type", "application/x-ndjson")
            .body("{\"n\":1}\n{\"n\":2}\nnot json\n"),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(error["code"], "INVALID_JSON");
    assert!(
        error["message"].as_str().unwrap().contains("line 3"),
        "{error}"
    );
    let (_, list) = call(client().get(server.url("/api/batches")).bearer_auth(&alice)).await;
    assert_eq!(
        list["items"].as_array().unwrap().len(),
        1,
        "the rejected batch left nothing behind"
    );
}

#[tokio::test]
async fn admin_pauses_and_resumes_a_kind() {
    let receiver = Receiver::start().await;
    let server = Server::start(&config(&receiver));
    let alice = token("alice", false);
    let admin = token("ops", true);
    let client = client();

    let (status, body) = call(
        client
            .post(server.url("/api/admin/kinds/noop/pause"))
            .bearer_auth(&admin),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, batch) = create(&server, &alice, json!({ "kind": "noop", "items": [1, 2] })).await;
    let id = batch["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (_, still) = call(
        client
            .get(server.url(&format!("/api/batches/{id}")))
            .bearer_auth(&alice),
    )
    .await;
    assert_eq!(still["status"], "pending");

    let (_, kinds) = call(
        client
            .get(server.url("/api/admin/kinds"))
            .bearer_auth(&admin),
    )
    .await;
    let noop = kinds["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kind"] == "noop")
        .unwrap()
        .clone();
    assert_eq!(noop["paused"], true);

    let (status, _) = call(
        client
            .post(server.url("/api/admin/kinds/noop/resume"))
            .bearer_auth(&admin),
    )
    .await;
    assert_eq!(status, 200);
    let done = wait_terminal(&server, &alice, &id, Duration::from_secs(20)).await;
    assert_eq!(done["status"], "completed");

    let (status, body) = call(
        client
            .post(server.url("/api/admin/kinds/unknown/pause"))
            .bearer_auth(&admin),
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (422, Some("UNKNOWN_KIND")));
}

#[tokio::test]
async fn health_ready_and_openapi_match_the_routes() {
    let receiver = Receiver::start().await;
    let server = Server::start(&config(&receiver));
    let client = client();

    let (status, health) = call(client.get(server.url("/health"))).await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    let (status, ready) = call(client.get(server.url("/ready"))).await;
    assert_eq!((status, ready["status"].as_str()), (200, Some("ready")));

    let (status, document) = call(client.get(server.url("/openapi.json"))).await;
    assert_eq!(status, 200);
    let paths = document["paths"].as_object().unwrap();
    let contract = [
        ("post", "/api/batches"),
        ("get", "/api/batches"),
        ("get", "/api/batches/{id}"),
        ("get", "/api/batches/{id}/items"),
        ("post", "/api/batches/{id}/cancel"),
        ("post", "/api/batches/{id}/retry"),
        ("get", "/api/dead-letters"),
        ("post", "/api/dead-letters/redrive"),
        ("get", "/health"),
        ("get", "/ready"),
        ("get", "/openapi.json"),
    ];
    for (method, path) in contract {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} is missing from the document"
        );
    }

    // Every documented operation is served: none answers "no route".
    let admin = token("ops", true);
    for (path, operations) in paths {
        let concrete = path
            .replace("{id}", "0193c5a0-0000-7000-8000-000000000000")
            .replace("{kind}", "noop")
            .replace("{name}", "no_such_flag");
        for method in operations.as_object().unwrap().keys() {
            let request = match method.as_str() {
                "get" => client.get(server.url(&concrete)),
                "post" => client.post(server.url(&concrete)).json(&json!({})),
                "patch" => client.patch(server.url(&concrete)).json(&json!({})),
                "delete" => client.delete(server.url(&concrete)),
                other => panic!("unexpected method {other} in the document"),
            };
            let (_, body) = call(request.bearer_auth(&admin)).await;
            assert_ne!(
                body["code"], "ROUTE_NOT_FOUND",
                "{method} {path} is documented but not served"
            );
            assert_ne!(
                body["code"], "METHOD_NOT_ALLOWED",
                "{method} {path} is documented but not served"
            );
        }
    }
    // Leave the paused kind as it was.
    call(
        client
            .post(server.url("/api/admin/kinds/noop/resume"))
            .bearer_auth(&admin),
    )
    .await;
}

#[test]
fn serve_refuses_to_start_without_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("BATCHD_JWT_SECRET")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("BATCHD_JWT_SECRET"), "{stderr}");
    assert!(stderr.contains("--dev"), "{stderr}");
}

#[test]
fn help_names_units() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(["token", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("seconds"), "{help}");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for option in [
        "--listen",
        "--database",
        "--data-dir",
        "--log-dir",
        "--jwt-secret",
        "--dev",
        "--config",
    ] {
        assert!(help.contains(option), "serve --help lacks {option}: {help}");
    }
}
