//! Feature flags through the real binary: the admin API with its audit
//! trail, the gate on batch creation, and a change made on one process
//! reaching another process on the same SQLite file.

#![allow(clippy::unwrap_used, reason = "tests")]

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

const CONFIG: &str = r#"
[flags]
refresh_interval_ms = 300

[kinds.noop]
handler = "noop"
"#;

async fn evaluate(server: &Server, admin: &str, flag: &str, user: &str) -> Value {
    let (status, body) = call(
        client()
            .get(server.url(&format!("/api/admin/flags/{flag}/evaluate?userId={user}")))
            .bearer_auth(admin),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn admin_api_manages_flags_with_an_audit_trail() {
    let server = Server::start(CONFIG);
    let admin = token("ops", true);
    let client = client();

    let (status, created) = call(
        client
            .post(server.url("/api/admin/flags"))
            .bearer_auth(&admin)
            .json(&json!({ "name": "new_exporter", "enabled": true, "rollout": 10, "denyList": ["carol"], "metadata": {"owner": "data"} })),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["version"], 1);
    assert_eq!(created["rollout"], 10);

    let (status, duplicate) = call(
        client
            .post(server.url("/api/admin/flags"))
            .bearer_auth(&admin)
            .json(&json!({ "name": "new_exporter" })),
    )
    .await;
    assert_eq!(
        (status, duplicate["code"].as_str()),
        (409, Some("FLAG_EXISTS"))
    );
    for bad in [
        json!({ "name": "" }),
        json!({ "name": "Bad Name!" }),
        json!({ "name": "ok_name", "rollout": 101 }),
        json!({ "name": "ok_name", "rollout": -1 }),
    ] {
        let (status, body) = call(
            client
                .post(server.url("/api/admin/flags"))
                .bearer_auth(&admin)
                .json(&bad),
        )
        .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (422, Some("INVALID_FLAG")),
            "{bad}: {body}"
        );
    }

    let (status, updated) = call(
        client
            .patch(server.url("/api/admin/flags/new_exporter"))
            .bearer_auth(&admin)
            .json(&json!({ "rollout": 20, "expectedVersion": 1 })),
    )
    .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["version"], 2);
    assert_eq!(
        updated["enabled"], true,
        "a partial update keeps the other fields"
    );
    let (status, stale) = call(
        client
            .patch(server.url("/api/admin/flags/new_exporter"))
            .bearer_auth(&admin)
            .json(&json!({ "rollout": 30, "expectedVersion": 1 })),
    )
    .await;
    assert_eq!(
        (status, stale["code"].as_str()),
        (409, Some("VERSION_CONFLICT"))
    );

    let carol = evaluate(&server, &admin, "new_exporter", "carol").await;
    assert_eq!(
        (carol["enabled"].as_bool(), carol["reason"].as_str()),
        (Some(false), Some("deny_list"))
    );
    let unknown = evaluate(&server, &admin, "no_such_flag", "carol").await;
    assert_eq!(
        (unknown["enabled"].as_bool(), unknown["reason"].as_str()),
        (Some(false), Some("unknown"))
    );
    let someone = evaluate(&server, &admin, "new_exporter", "dave").await;
    assert_eq!(someone["reason"], "rollout");
    assert!(
        someone["bucket"]
            .as_u64()
            .is_some_and(|b| (1..=100).contains(&b)),
        "{someone}"
    );

    let (status, audit) = call(
        client
            .get(server.url("/api/admin/flags/new_exporter/audit"))
            .bearer_auth(&admin),
    )
    .await;
    assert_eq!(status, 200);
    let entries = audit["items"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["actor"], "ops");
    assert_eq!(entries[0]["before"]["rollout"], 10);
    assert_eq!(entries[0]["after"]["rollout"], 20);
    assert!(entries[1]["before"].is_null());

    let (status, _) = call(
        client
            .delete(server.url("/api/admin/flags/new_exporter"))
            .bearer_auth(&admin),
    )
    .await;
    assert_eq!(status, 200);
    let (status, gone) = call(
        client
            .get(server.url("/api/admin/flags/new_exporter"))
            .bearer_auth(&admin),
    )
    .await;
    assert_eq!(
        (status, gone["code"].as_str()),
        (404, Some("FLAG_NOT_FOUND"))
    );

    let (status, denied) = call(
        client
            .get(server.url("/api/admin/flags"))
            .bearer_auth(token("alice", false)),
    )
    .await;
    assert_eq!((status, denied["code"].as_str()), (403, Some("FORBIDDEN")));
}

#[tokio::test]
async fn gate_blocks_creation_but_not_reading() {
    let server = Server::start(CONFIG);
    let admin = token("ops", true);
    let alice = token("alice", false);
    let client = client();

    let (status, batch) = call(
        client
            .post(server.url("/api/batches"))
            .bearer_auth(&alice)
            .json(&json!({ "kind": "noop", "items": [1] })),
    )
    .await;
    assert_eq!(
        status, 201,
        "a new database seeds batch_operations on for everyone: {batch}"
    );
    let id = batch["id"].as_str().unwrap().to_owned();

    let (status, _) = call(
        client
            .patch(server.url("/api/admin/flags/batch_operations"))
            .bearer_auth(&admin)
            .json(&json!({ "denyList": ["alice"] })),
    )
    .await;
    assert_eq!(status, 200);

    let (status, body) = call(
        client
            .post(server.url("/api/batches"))
            .bearer_auth(&alice)
            .json(&json!({ "kind": "noop", "items": [1] })),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("FEATURE_DISABLED"))
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("batch_operations"),
        "{body}"
    );
    let (status, _) = call(
        client
            .get(server.url(&format!("/api/batches/{id}")))
            .bearer_auth(&alice),
    )
    .await;
    assert_eq!(status, 200, "reading existing batches still works");
    let (status, _) = call(
        client
            .post(server.url("/api/batches"))
            .bearer_auth(token("bob", false))
            .json(&json!({ "kind": "noop", "items": [1] })),
    )
    .await;
    assert_eq!(status, 201, "other users are not affected");
}

#[tokio::test]
async fn change_on_one_process_reaches_another() {
    let first = Server::start(CONFIG);
    let second = Server::start_in(&first.data_dir, CONFIG);
    let admin = token("ops", true);

    let (status, _) = call(
        client()
            .post(first.url("/api/admin/flags"))
            .bearer_auth(&admin)
            .json(&json!({ "name": "shared_switch", "enabled": true, "rollout": 100 })),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(
        evaluate(&first, &admin, "shared_switch", "erin").await["enabled"],
        true,
        "visible at once on the writer"
    );

    let started = Instant::now();
    loop {
        let answer = evaluate(&second, &admin, "shared_switch", "erin").await;
        if answer["enabled"] == true {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the second process never saw the flag: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "flag change reached the second process after {:?}",
        started.elapsed()
    );
}
