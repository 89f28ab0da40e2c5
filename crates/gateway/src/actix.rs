//! The actix-web transport: upgrades a request to a WebSocket (actix-ws
//! 0.4) and runs the connection's read and write loops.

use std::sync::Arc;
use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::{
    AggregatedMessage, AggregatedMessageStream, CloseCode, CloseReason, ProtocolError, Session,
};
use domain::UserId;
use tokio::time::Instant;

use crate::config::HeartbeatConfig;
use crate::hub::{CloseCause, Connection, Hub, Outgoing};

/// How long the writer tries to send a close frame before it drops the
/// connection without one, such as to a client that stopped reading.
const CLOSE_FRAME_TIMEOUT: Duration = Duration::from_secs(1);

/// Upgrades a request to a WebSocket connection of `user` and spawns its
/// read and write loops on the current actix runtime.
///
/// Call it only after the user was authenticated (token or
/// [`crate::TicketStore::redeem`]) and the origin was checked with
/// [`crate::OriginPolicy::check`]. Fails with a 400 response when the
/// request is not a WebSocket handshake.
pub fn upgrade(
    hub: Arc<Hub>,
    user: UserId,
    req: &HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    let (response, session, stream) = actix_ws::handle(req, body)?;
    let max_message_bytes = hub.config().max_message_bytes;
    let heartbeat = hub.config().heartbeat;
    let stream = stream
        .max_frame_size(max_message_bytes)
        .aggregate_continuations()
        .max_continuation_size(max_message_bytes);

    let connection = Arc::new(hub.connect(user));
    tracing::info!(
        user_id = %connection.user(),
        connection_id = connection.id(),
        "websocket connection opened"
    );

    actix_web::rt::spawn(read_loop(
        connection.clone(),
        session.clone(),
        stream,
        heartbeat,
    ));
    actix_web::rt::spawn(write_loop(connection, session, heartbeat));
    Ok(response)
}

/// Returns whether a stream error means the message was too large. The
/// codec has already skipped such a frame, so reading can go on.
fn is_too_large(error: &ProtocolError) -> bool {
    match error {
        ProtocolError::Overflow => true,
        // actix-ws 0.4 reports an oversized continuation only by this text.
        ProtocolError::Io(io) => io.to_string().contains("maximum continuation size"),
        _ => false,
    }
}

async fn read_loop(
    connection: Arc<Connection>,
    mut session: Session,
    mut stream: AggregatedMessageStream,
    heartbeat: HeartbeatConfig,
) {
    loop {
        // Any frame from the client, including the pong to the writer's
        // ping, restarts the heartbeat timeout. The check lives here and not
        // in the writer because a writer blocked on a full socket sends no
        // pings, and such a client must time out too.
        let message = tokio::select! {
            () = connection.closed() => break,
            message = tokio::time::timeout(heartbeat.timeout, stream.recv()) => message,
        };
        let Ok(message) = message else {
            connection.close(CloseCause::HeartbeatTimeout);
            break;
        };
        match message {
            None => {
                connection.close(CloseCause::Normal);
                break;
            }
            Some(Ok(message)) => match message {
                AggregatedMessage::Text(text) => connection.handle_text(&text).await,
                AggregatedMessage::Binary(_) => connection.reject_binary(),
                AggregatedMessage::Ping(payload) => {
                    if session.pong(&payload).await.is_err() {
                        connection.close(CloseCause::Normal);
                        break;
                    }
                }
                AggregatedMessage::Pong(_) => {}
                AggregatedMessage::Close(_) => {
                    connection.close(CloseCause::Normal);
                    break;
                }
            },
            // NOTE: actix-http buffers a whole oversized frame before it
            // drops it, so the frame limit bounds what is parsed, not what
            // is read from the socket.
            Some(Err(error)) if is_too_large(&error) => connection.reject_oversized(),
            Some(Err(error)) => {
                tracing::warn!(
                    user_id = %connection.user(),
                    connection_id = connection.id(),
                    %error,
                    "websocket protocol error; closing the connection"
                );
                connection.close(CloseCause::ProtocolError);
                break;
            }
        }
    }
}

async fn write_loop(connection: Arc<Connection>, mut session: Session, heartbeat: HeartbeatConfig) {
    let mut ping = tokio::time::interval_at(
        Instant::now() + heartbeat.ping_interval,
        heartbeat.ping_interval,
    );
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            outgoing = connection.next_outgoing() => match outgoing {
                Some(Outgoing::Text(text)) => {
                    // A client that stopped reading blocks the send; the
                    // hub then closes the connection, which ends the wait.
                    let sent = tokio::select! {
                        sent = session.text(String::from(&*text)) => sent.is_ok(),
                        () = connection.closed() => true,
                    };
                    if !sent {
                        connection.close(CloseCause::Normal);
                    }
                }
                Some(Outgoing::Close(cause)) => {
                    send_close(&connection, session, cause).await;
                    return;
                }
                None => return,
            },
            _ = ping.tick() => {
                let sent = tokio::select! {
                    sent = session.ping(b"") => sent.is_ok(),
                    () = connection.closed() => true,
                };
                if !sent {
                    connection.close(CloseCause::Normal);
                }
            }
        }
    }
}

async fn send_close(connection: &Connection, session: Session, cause: CloseCause) {
    let reason = CloseReason {
        code: CloseCode::from(cause.code()),
        description: Some(cause.reason().to_owned()),
    };
    match tokio::time::timeout(CLOSE_FRAME_TIMEOUT, session.close(Some(reason))).await {
        Ok(_) => {}
        Err(_elapsed) => tracing::debug!(
            user_id = %connection.user(),
            connection_id = connection.id(),
            "sending the close frame timed out; dropping the connection"
        ),
    }
    tracing::info!(
        user_id = %connection.user(),
        connection_id = connection.id(),
        close_code = cause.code(),
        dropped = connection.dropped_messages(),
        "websocket connection closed"
    );
}
