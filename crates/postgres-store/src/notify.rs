//! Signals between the processes sharing one schema, over LISTEN/NOTIFY.
//!
//! A notification is best effort: PostgreSQL delivers it to every session
//! listening when the sending transaction commits, and a session that was
//! disconnected at that moment never receives it. So a signal only ever says
//! "look again"; the state it points to is always in the tables. After the
//! listening connection is re-established, subscribers get
//! [`Signal::Resync`] to make up for whatever they may have missed.

use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

/// PostgreSQL rejects a notification payload of 8000 bytes or more.
pub const MAX_SIGNAL_BYTES: usize = 7_999;

/// How many signals a slow subscriber may fall behind before it misses
/// some (and gets a lag error, which it should treat as a resync).
const SIGNAL_BUFFER: usize = 4_096;

/// A message one process sends to the others on the schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "signal", rename_all = "camelCase")]
pub enum Signal {
    /// Jobs of these kinds became claimable.
    Wake { kinds: Vec<String> },
    /// A feature flag changed; the flag revision is now `revision`.
    #[serde(rename_all = "camelCase")]
    FlagsChanged { revision: u64 },
    /// An operator paused or resumed a kind.
    KindControls,
    /// A batch was cancelled while these jobs ran; whichever process runs
    /// them should stop their handlers.
    CancelRunning { jobs: Vec<i64> },
    /// Events a process relays to the others, in the relaying
    /// application's own encoding. `origin` names the sender, so it can
    /// skip its own.
    Relay {
        origin: String,
        payload: serde_json::Value,
    },
    /// The listener reconnected: signals may have been missed, so
    /// subscribers should re-read what they cache. Never sent by a process.
    #[serde(skip)]
    Resync,
}

/// Sends `signal` on `channel` through `client`. Inside a transaction the
/// notification is delivered at commit and dropped on rollback.
pub(crate) async fn send(
    client: &impl tokio_postgres::GenericClient,
    channel: &str,
    signal: &Signal,
) -> Result<(), domain::StoreError> {
    let payload = serde_json::to_string(signal).map_err(|error| domain::StoreError::Invalid {
        field: "signal",
        reason: error.to_string(),
    })?;
    if payload.len() > MAX_SIGNAL_BYTES {
        return Err(domain::StoreError::Invalid {
            field: "signal",
            reason: format!(
                "{} bytes encoded, over PostgreSQL's notification limit of {MAX_SIGNAL_BYTES}; send it in parts",
                payload.len()
            ),
        });
    }
    client
        .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
        .await
        .map_err(crate::db_error("send notification"))?;
    Ok(())
}

/// Owns the broadcast of received signals and starts the listening task on
/// the first subscription.
#[derive(Debug)]
pub(crate) struct SignalHub {
    sender: broadcast::Sender<Signal>,
    started: std::sync::Once,
    pg_config: tokio_postgres::Config,
    channel: String,
    stop: CancellationToken,
}

impl SignalHub {
    pub(crate) fn new(
        pg_config: tokio_postgres::Config,
        channel: String,
        stop: CancellationToken,
    ) -> Self {
        let (sender, _) = broadcast::channel(SIGNAL_BUFFER);
        Self {
            sender,
            started: std::sync::Once::new(),
            pg_config,
            channel,
            stop,
        }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Signal> {
        let receiver = self.sender.subscribe();
        self.started.call_once(|| {
            tokio::spawn(listen(
                self.pg_config.clone(),
                self.channel.clone(),
                self.sender.clone(),
                self.stop.clone(),
            ));
        });
        receiver
    }
}

/// Keeps one connection listening on `channel`, reconnecting with backoff,
/// until `stop` is cancelled.
async fn listen(
    pg_config: tokio_postgres::Config,
    channel: String,
    sender: broadcast::Sender<Signal>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let session = tokio::select! {
            () = stop.cancelled() => return,
            session = listen_once(&pg_config, &channel, &sender, &mut backoff) => session,
        };
        if let Err(error) = session {
            tracing::warn!(
                %error,
                channel = %channel,
                retry_in_ms = backoff.as_millis() as u64,
                "listening for PostgreSQL notifications failed; reconnecting"
            );
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Runs one listening session: connects, subscribes, announces a resync
/// and forwards notifications until the connection fails.
async fn listen_once(
    pg_config: &tokio_postgres::Config,
    channel: &str,
    sender: &broadcast::Sender<Signal>,
    backoff: &mut Duration,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = pg_config.connect(NoTls).await?;
    let (forward, mut received) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(notification)) => {
                    if forward.send(Ok(notification)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    let _ = forward.send(Err(error));
                    return;
                }
            }
        }
    });

    let subscribed = client
        .batch_execute(&format!("LISTEN \"{}\"", channel.replace('"', "\"\"")))
        .await;
    if let Err(error) = subscribed {
        driver.abort();
        return Err(error);
    }
    *backoff = Duration::from_millis(100);
    tracing::debug!(channel, "listening for PostgreSQL notifications");
    let _ = sender.send(Signal::Resync);

    while let Some(message) = received.recv().await {
        let notification = match message {
            Ok(notification) => notification,
            Err(error) => return Err(error),
        };
        match serde_json::from_str::<Signal>(notification.payload()) {
            Ok(signal) => {
                // No subscriber at the moment is not an error.
                let _ = sender.send(signal);
            }
            Err(error) => tracing::warn!(
                %error,
                channel,
                sender_pid = notification.process_id(),
                "ignored a notification that is not a batchd signal"
            ),
        }
    }
    // The driver ended without an error: the server closed the session.
    drop(client);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_round_trip_as_json() {
        for signal in [
            Signal::Wake {
                kinds: vec!["webhook".into()],
            },
            Signal::FlagsChanged { revision: 7 },
            Signal::KindControls,
            Signal::CancelRunning { jobs: vec![7, 9] },
            Signal::Relay {
                origin: "p1".into(),
                payload: serde_json::json!([1, 2]),
            },
        ] {
            let text = serde_json::to_string(&signal).unwrap();
            assert_eq!(serde_json::from_str::<Signal>(&text).unwrap(), signal);
        }
        assert_eq!(
            serde_json::to_string(&Signal::FlagsChanged { revision: 3 }).unwrap(),
            r#"{"signal":"flagsChanged","revision":3}"#
        );
    }

    #[test]
    fn resync_is_never_sent() {
        assert!(serde_json::to_string(&Signal::Resync).is_err());
    }
}
