//! SIGKILL of the real server in the middle of a batch: after a restart on
//! the same files, the batch finishes with nothing lost and exact counters.

#![allow(clippy::unwrap_used, reason = "tests")]

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

const CONFIG: &str = r#"
[queue]
lease_seconds = 2

[kinds.sleep]
handler = "sleep"
concurrency = 16
"#;

#[tokio::test]
async fn killed_server_finishes_the_batch_after_restart() {
    let server = Server::start(CONFIG);
    let alice = token("alice", false);
    let items: Vec<_> = (0..2_000).map(|_| json!({ "ms": 15 })).collect();
    let (status, batch) = call(
        client()
            .post(server.url("/api/batches"))
            .bearer_auth(&alice)
            .json(&json!({ "kind": "sleep", "items": items })),
    )
    .await;
    assert_eq!(status, 201, "{batch}");
    let id = batch["id"].as_str().unwrap().to_owned();

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, batch) = call(
            client()
                .get(server.url(&format!("/api/batches/{id}")))
                .bearer_auth(&alice),
        )
        .await;
        if batch["succeeded"].as_u64().unwrap() >= 500 {
            assert!(
                batch["succeeded"].as_u64().unwrap() < 2_000,
                "killed too late: {batch}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no progress before the kill: {batch}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let data_dir = server.kill();

    let restarted = Server::start_in(&data_dir, CONFIG);
    let done = wait_terminal(&restarted, &alice, &id, Duration::from_secs(120)).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["succeeded"], 2_000);
    assert_eq!(done["failed"], 0);

    let items = all_items(&restarted, &alice, &id).await;
    assert_eq!(items.len(), 2_000);
    assert!(items.iter().all(|item| item["status"] == "succeeded"));
    let repeated = items
        .iter()
        .filter(|item| item["attempts"].as_u64().unwrap() > 1)
        .count();
    assert!(
        repeated <= 16,
        "{repeated} items ran twice; only the 16 in flight may"
    );
    for item in items
        .iter()
        .filter(|item| item["attempts"].as_u64().unwrap() > 1)
    {
        assert_eq!(item["errors"][0]["kind"], "leaseExpired", "{item}");
    }
}
