//! Connecting, migrating and LISTEN/NOTIFY against the local PostgreSQL.

use std::time::Duration;

use postgres_store::{PgConfig, PgStore, Signal, testing};
use tokio::sync::broadcast;

async fn next_signal(receiver: &mut broadcast::Receiver<Signal>) -> Signal {
    loop {
        let signal = tokio::time::timeout(Duration::from_secs(10), receiver.recv())
            .await
            .expect("a signal within 10 s")
            .expect("the signal channel stays open");
        if signal != Signal::Resync {
            return signal;
        }
    }
}

#[tokio::test]
async fn two_processes_migrate_the_same_fresh_schema() {
    let config = testing::isolated_config();
    let (first, second) = tokio::join!(
        PgStore::connect(config.clone()),
        PgStore::connect(config.clone())
    );
    first.expect("first store connects");
    second.expect("second store connects");
    testing::drop_schema(config.schema.as_deref().unwrap())
        .await
        .unwrap();
}

#[tokio::test]
async fn signal_reaches_only_its_schema() {
    let config = testing::isolated_config();
    let sender = PgStore::connect(config.clone()).await.unwrap();
    let peer = PgStore::connect(config.clone()).await.unwrap();
    let stranger = PgStore::connect(testing::isolated_config()).await.unwrap();

    let mut at_peer = peer.signals();
    let mut at_stranger = stranger.signals();
    // The first signal on a new subscription is the listener's resync.
    assert_eq!(at_peer.recv().await.unwrap(), Signal::Resync);
    assert_eq!(at_stranger.recv().await.unwrap(), Signal::Resync);

    let signal = Signal::Wake {
        kinds: vec!["webhook".to_owned()],
    };
    sender.publish(&signal).await.unwrap();
    assert_eq!(next_signal(&mut at_peer).await, signal);

    // A marker sent on the stranger's own schema arrives, and nothing of
    // the first schema arrived before it.
    let marker = Signal::KindControls;
    stranger.publish(&marker).await.unwrap();
    assert_eq!(next_signal(&mut at_stranger).await, marker);
}

#[tokio::test]
async fn oversized_signal_is_rejected() {
    let store = PgStore::connect(testing::isolated_config()).await.unwrap();
    let error = store
        .publish(&Signal::Relay {
            origin: "p".to_owned(),
            payload: serde_json::Value::String("x".repeat(8_000)),
        })
        .await
        .unwrap_err();
    assert!(error.to_string().contains("signal"), "{error}");
}

#[tokio::test]
async fn invalid_url_names_the_format() {
    let error = PgStore::connect(PgConfig::new("postgres://[not a host"))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("connection string"), "{error}");
}

#[tokio::test]
async fn listener_reconnects_with_resync() {
    let config = testing::isolated_config();
    let schema = config.schema.clone().unwrap();
    let store = PgStore::connect(config).await.unwrap();
    let mut signals = store.signals();
    assert_eq!(signals.recv().await.unwrap(), Signal::Resync);

    // Cut the listening session from the server side, as a failover or an
    // idle-connection reaper would.
    let admin: tokio_postgres::Config = testing::database_url().parse().unwrap();
    let (client, connection) = admin.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let terminated = client
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE query = $1 AND pid <> pg_backend_pid()",
            &[&format!("LISTEN \"batchd.{schema}\"")],
        )
        .await
        .unwrap();
    assert_eq!(
        terminated.len(),
        1,
        "exactly this store's listener was found"
    );

    let resync = tokio::time::timeout(Duration::from_secs(10), signals.recv())
        .await
        .expect("a resync within 10 s of the session's end")
        .unwrap();
    assert_eq!(resync, Signal::Resync);

    let signal = Signal::FlagsChanged { revision: 9 };
    store.publish(&signal).await.unwrap();
    assert_eq!(next_signal(&mut signals).await, signal);
}
