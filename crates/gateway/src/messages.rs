//! The JSON messages exchanged over a connection.

use chrono::{DateTime, Utc};
use domain::{Batch, BatchCounters, BatchFinished, BatchId, BatchProgress, BatchStatus, UserId};
use queue::{JobEvent, QueueEvent};
use serde::{Deserialize, Serialize};

/// Stable error codes sent in `error` messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// The frame is not a JSON object of a known shape.
    InvalidMessage,
    /// The JSON `type` is not one the server accepts.
    UnknownType,
    /// The frame is larger than the configured limit.
    MessageTooLarge,
    /// The batch does not exist or belongs to another user.
    BatchNotFound,
    /// The batch's current state could not be read.
    SnapshotFailed,
    /// The connection already has the maximum number of batch subscriptions.
    TooManySubscriptions,
}

/// Live counters of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LiveStats {
    /// Items in a terminal state.
    pub processed: u64,
    pub succeeded: u64,
    /// Dead items.
    pub failed: u64,
    pub cancelled: u64,
    pub total: u64,
    /// 1-based position of the next item to finish, or `None` when every
    /// item has finished. Items run concurrently, so this is the count of
    /// finished items plus one, not the position of a particular job.
    pub current_item: Option<u64>,
}

impl LiveStats {
    pub fn from_counters(counters: &BatchCounters) -> Self {
        let processed = counters.finished();
        let current_item = (processed < counters.item_count).then_some(processed + 1);
        Self {
            processed,
            succeeded: counters.succeeded,
            failed: counters.failed,
            cancelled: counters.cancelled,
            total: counters.item_count,
            current_item,
        }
    }
}

/// The stage of a batch as shown to a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StageDetails {
    pub stage_name: String,
    /// 1 (waiting), 2 (processing) or 3 (finished).
    pub stage_number: u8,
    pub total_stages: u8,
    pub live_stats: LiveStats,
}

/// Body of `batch.snapshot` and `batch.progress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchUpdate {
    pub user_id: UserId,
    pub batch_id: BatchId,
    /// The batch status: pending, processing, completed, failed or cancelled.
    pub stage: BatchStatus,
    /// Share of finished items, 0 to 100.
    pub percentage: u8,
    /// A one-line summary for display, such as "12 of 40 items finished".
    pub message: String,
    pub details: StageDetails,
}

impl BatchUpdate {
    fn new(
        user_id: UserId,
        batch_id: BatchId,
        status: BatchStatus,
        counters: &BatchCounters,
    ) -> Self {
        let (stage_name, stage_number) = match status {
            BatchStatus::Pending => ("Waiting to start", 1),
            BatchStatus::Processing => ("Processing items", 2),
            BatchStatus::Completed => ("Completed", 3),
            BatchStatus::Failed => ("Finished with failures", 3),
            BatchStatus::Cancelled => ("Cancelled", 3),
        };
        Self {
            user_id,
            batch_id,
            stage: status,
            percentage: counters.percentage(),
            message: format!(
                "{} of {} items finished",
                counters.finished(),
                counters.item_count
            ),
            details: StageDetails {
                stage_name: stage_name.to_owned(),
                stage_number,
                total_stages: 3,
                live_stats: LiveStats::from_counters(counters),
            },
        }
    }

    pub fn from_batch(batch: &Batch) -> Self {
        Self::new(batch.owner.clone(), batch.id, batch.status, &batch.counters)
    }

    pub fn from_progress(progress: &BatchProgress) -> Self {
        Self::new(
            progress.owner.clone(),
            progress.batch_id,
            progress.status,
            &progress.counters,
        )
    }
}

/// Body of `batch.finished`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FinishedUpdate {
    pub user_id: UserId,
    pub batch_id: BatchId,
    /// Completed, failed or cancelled.
    pub status: BatchStatus,
    /// Retries and re-drives reopen a batch under the next generation, which
    /// finishes again.
    pub generation: u32,
    pub percentage: u8,
    pub stats: LiveStats,
    pub finished_at: DateTime<Utc>,
}

impl FinishedUpdate {
    pub fn from_finished(finished: &BatchFinished) -> Self {
        Self {
            user_id: finished.owner.clone(),
            batch_id: finished.batch_id,
            status: finished.status,
            generation: finished.generation,
            percentage: finished.counters.percentage(),
            stats: LiveStats::from_counters(&finished.counters),
            finished_at: finished.finished_at,
        }
    }
}

/// Body of the `job.*` messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobUpdate {
    pub user_id: UserId,
    pub batch_id: BatchId,
    pub job_id: domain::JobId,
    pub kind: String,
    /// 0-based position of the job in its batch.
    pub seq: u32,
    pub attempt: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_at: Option<DateTime<Utc>>,
}

impl JobUpdate {
    pub fn from_event(event: &JobEvent) -> Self {
        Self {
            user_id: event.owner.clone(),
            batch_id: event.batch_id,
            job_id: event.job_id,
            kind: event.kind.clone(),
            seq: event.seq,
            attempt: event.attempt,
            progress: event.progress,
            error: event.error.clone(),
            run_at: event.run_at,
        }
    }
}

/// Body of an `error` message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// The batch the failed request named, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<BatchId>,
}

/// A message from the server to a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type")]
pub enum ServerMessage {
    #[serde(rename = "batch.snapshot")]
    BatchSnapshot(BatchUpdate),
    #[serde(rename = "batch.progress")]
    BatchProgress(BatchUpdate),
    #[serde(rename = "batch.finished")]
    BatchFinished(FinishedUpdate),
    #[serde(rename = "job.queued")]
    JobQueued(JobUpdate),
    #[serde(rename = "job.processing")]
    JobProcessing(JobUpdate),
    #[serde(rename = "job.progress")]
    JobProgress(JobUpdate),
    #[serde(rename = "job.completed")]
    JobCompleted(JobUpdate),
    #[serde(rename = "job.retry")]
    JobRetry(JobUpdate),
    #[serde(rename = "job.failed")]
    JobFailed(JobUpdate),
    #[serde(rename = "job.cancelled")]
    JobCancelled(JobUpdate),
    #[serde(rename = "error")]
    Error(ErrorBody),
    #[serde(rename = "pong")]
    Pong,
}

impl ServerMessage {
    /// Converts a queue event into the message a subscriber receives.
    pub fn from_event(event: &QueueEvent) -> Self {
        match event {
            QueueEvent::JobQueued(e) => ServerMessage::JobQueued(JobUpdate::from_event(e)),
            QueueEvent::JobProcessing(e) => ServerMessage::JobProcessing(JobUpdate::from_event(e)),
            QueueEvent::JobProgress(e) => ServerMessage::JobProgress(JobUpdate::from_event(e)),
            QueueEvent::JobCompleted(e) => ServerMessage::JobCompleted(JobUpdate::from_event(e)),
            QueueEvent::JobRetry(e) => ServerMessage::JobRetry(JobUpdate::from_event(e)),
            QueueEvent::JobFailed(e) => ServerMessage::JobFailed(JobUpdate::from_event(e)),
            QueueEvent::JobCancelled(e) => ServerMessage::JobCancelled(JobUpdate::from_event(e)),
            QueueEvent::BatchProgress(p) => {
                ServerMessage::BatchProgress(BatchUpdate::from_progress(p))
            }
            QueueEvent::BatchFinished(f) => {
                ServerMessage::BatchFinished(FinishedUpdate::from_finished(f))
            }
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>, batch_id: Option<BatchId>) -> Self {
        ServerMessage::Error(ErrorBody {
            code,
            message: message.into(),
            batch_id,
        })
    }

    /// Serializes the message as a JSON text frame.
    pub fn to_json(&self) -> String {
        // Every field is a string, number, bool, UUID or timestamp, and
        // none of these fails to serialize. The fallback keeps the frame
        // valid JSON if that ever changes.
        serde_json::to_string(self).unwrap_or_else(|error| {
            tracing::error!(%error, "serializing a server message failed");
            r#"{"type":"error","code":"INTERNAL","message":"serializing the message failed"}"#
                .to_owned()
        })
    }
}

/// The target of a subscribe or unsubscribe message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Batch(BatchId),
    /// Every batch of the connection's user.
    All,
}

/// A message from a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientMessage {
    Subscribe(Topic),
    Unsubscribe(Topic),
    Ping,
}

/// A client message that could not be accepted, with the code to send back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ClientMessageError {
    pub code: ErrorCode,
    pub message: String,
}

impl ClientMessageError {
    fn invalid(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::InvalidMessage,
            message: message.into(),
        }
    }
}

/// The wire shape of a client message, before its fields are checked.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawClientMessage {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    batch_id: Option<String>,
    #[serde(default)]
    all: Option<bool>,
}

impl ClientMessage {
    /// Parses a text frame. Errors carry the code and a message that lists
    /// the accepted shapes.
    pub fn parse(text: &str) -> Result<Self, ClientMessageError> {
        let raw: RawClientMessage = serde_json::from_str(text).map_err(|error| {
            ClientMessageError::invalid(format!(
                "invalid message: {error}; expected a JSON object such as {{\"type\":\"subscribe\",\"batchId\":\"<uuid>\"}}"
            ))
        })?;

        match raw.kind.as_str() {
            "ping" => {
                if raw.batch_id.is_some() || raw.all.is_some() {
                    return Err(ClientMessageError::invalid(
                        "invalid ping message: it takes no fields besides \"type\"",
                    ));
                }
                Ok(ClientMessage::Ping)
            }
            "subscribe" => Ok(ClientMessage::Subscribe(parse_topic(&raw)?)),
            "unsubscribe" => Ok(ClientMessage::Unsubscribe(parse_topic(&raw)?)),
            other => Err(ClientMessageError {
                code: ErrorCode::UnknownType,
                message: format!(
                    "unknown message type {other:?}; expected subscribe, unsubscribe or ping"
                ),
            }),
        }
    }
}

fn parse_topic(raw: &RawClientMessage) -> Result<Topic, ClientMessageError> {
    match (&raw.batch_id, raw.all) {
        (Some(id), None) => id.parse::<BatchId>().map(Topic::Batch).map_err(|_| {
            ClientMessageError::invalid(format!("invalid batchId {id:?}: expected a UUID"))
        }),
        (None, Some(true)) => Ok(Topic::All),
        _ => Err(ClientMessageError::invalid(format!(
            "invalid {} message: set either \"batchId\" to a batch id or \"all\" to true",
            raw.kind
        ))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn parse_accepts_documented_shapes() {
        let id = BatchId::new();
        let text = format!(r#"{{"type":"subscribe","batchId":"{id}"}}"#);
        assert_eq!(
            ClientMessage::parse(&text).unwrap(),
            ClientMessage::Subscribe(Topic::Batch(id))
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"unsubscribe","all":true}"#).unwrap(),
            ClientMessage::Unsubscribe(Topic::All)
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"ping"}"#).unwrap(),
            ClientMessage::Ping
        );
    }

    #[test]
    fn parse_rejects_malformed_messages() {
        let cases = [
            "",
            "not json",
            "[]",
            r#"{"batchId":"x"}"#,
            r#"{"type":"subscribe"}"#,
            r#"{"type":"subscribe","all":false}"#,
            r#"{"type":"subscribe","batchId":"not-a-uuid"}"#,
            r#"{"type":"subscribe","batchId":"018f0000-0000-7000-8000-000000000000","all":true}"#,
            r#"{"type":"subscribe","all":true,"extra":1}"#,
            r#"{"type":"ping","all":true}"#,
            r#"{"type":7}"#,
        ];
        for text in cases {
            let error = ClientMessage::parse(text).unwrap_err();
            assert_eq!(error.code, ErrorCode::InvalidMessage, "input {text:?}");
        }
    }

    #[test]
    fn parse_reports_unknown_type() {
        let error = ClientMessage::parse(r#"{"type":"shutdown"}"#).unwrap_err();
        assert_eq!(error.code, ErrorCode::UnknownType);
        assert!(error.message.contains("shutdown"));
    }

    #[test]
    fn progress_message_shape() {
        let progress = BatchProgress {
            batch_id: BatchId::new(),
            owner: UserId::new("alice"),
            kind: "email".into(),
            status: BatchStatus::Processing,
            counters: BatchCounters {
                item_count: 4,
                succeeded: 1,
                failed: 1,
                cancelled: 0,
            },
            correlation_id: None,
            revision: 3,
        };
        let json: serde_json::Value = serde_json::from_str(
            &ServerMessage::from_event(&QueueEvent::BatchProgress(progress.clone())).to_json(),
        )
        .unwrap();

        assert_eq!(json["type"], "batch.progress");
        assert_eq!(json["userId"], "alice");
        assert_eq!(json["batchId"], progress.batch_id.to_string());
        assert_eq!(json["stage"], "processing");
        assert_eq!(json["percentage"], 50);
        assert_eq!(json["message"], "2 of 4 items finished");
        assert_eq!(json["details"]["stageName"], "Processing items");
        assert_eq!(json["details"]["stageNumber"], 2);
        assert_eq!(json["details"]["totalStages"], 3);
        let stats = &json["details"]["liveStats"];
        assert_eq!(stats["processed"], 2);
        assert_eq!(stats["succeeded"], 1);
        assert_eq!(stats["failed"], 1);
        assert_eq!(stats["cancelled"], 0);
        assert_eq!(stats["total"], 4);
        assert_eq!(stats["currentItem"], 3);
    }

    #[test]
    fn error_message_shape() {
        let json: serde_json::Value = serde_json::from_str(
            &ServerMessage::error(ErrorCode::MessageTooLarge, "too big", None).to_json(),
        )
        .unwrap();
        assert_eq!(json["type"], "error");
        assert_eq!(json["code"], "MESSAGE_TOO_LARGE");
        assert_eq!(json["message"], "too big");
        assert!(json.get("batchId").is_none());
    }
}
