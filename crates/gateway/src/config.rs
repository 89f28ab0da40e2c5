//! Limits of the hub and of each connection.

use std::time::Duration;

use thiserror::Error;

/// An invalid hub configuration.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid gateway setting {field}: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
}

/// When the server pings a connection and when it gives up on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatConfig {
    /// Time between two pings sent by the server.
    pub ping_interval: Duration,
    /// A connection from which nothing (pong, ping or message) has arrived
    /// for this long is closed.
    pub timeout: Duration,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(20),
            timeout: Duration::from_secs(60),
        }
    }
}

impl HeartbeatConfig {
    /// Returns whether a connection last heard from `since_last_seen` ago
    /// has timed out.
    pub fn is_timed_out(&self, since_last_seen: Duration) -> bool {
        since_last_seen > self.timeout
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ping_interval.is_zero() {
            return Err(ConfigError {
                field: "heartbeat.ping_interval",
                reason: "must be greater than zero".into(),
            });
        }
        if self.timeout <= self.ping_interval {
            return Err(ConfigError {
                field: "heartbeat.timeout",
                reason: format!(
                    "{:?} must be longer than the ping interval {:?}, or every connection times out between two pings",
                    self.timeout, self.ping_interval
                ),
            });
        }
        Ok(())
    }
}

/// Settings of a [`crate::Hub`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// Maximum number of messages buffered for one connection.
    pub buffer_capacity: usize,
    /// Maximum number of `batch.progress` messages per second for one batch
    /// on one connection.
    pub progress_per_second: u32,
    /// How long a connection's buffer may stay full before the client is
    /// disconnected as too slow.
    pub slow_client_grace: Duration,
    /// Maximum size of one client message in bytes.
    pub max_message_bytes: usize,
    /// Maximum number of single-batch subscriptions of one connection.
    pub max_subscriptions: usize,
    /// How long reading a snapshot may take before the subscribe fails.
    pub snapshot_timeout: Duration,
    pub heartbeat: HeartbeatConfig,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            buffer_capacity: 256,
            progress_per_second: 4,
            slow_client_grace: Duration::from_secs(10),
            max_message_bytes: 16 * 1024,
            max_subscriptions: 100,
            snapshot_timeout: Duration::from_secs(5),
            heartbeat: HeartbeatConfig::default(),
        }
    }
}

impl HubConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("buffer_capacity", self.buffer_capacity),
            ("progress_per_second", self.progress_per_second as usize),
            ("max_message_bytes", self.max_message_bytes),
            ("max_subscriptions", self.max_subscriptions),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ConfigError {
                    field,
                    reason: "must be at least 1".into(),
                });
            }
        }
        if self.snapshot_timeout.is_zero() {
            return Err(ConfigError {
                field: "snapshot_timeout",
                reason: "must be greater than zero".into(),
            });
        }
        self.heartbeat.validate()
    }

    /// Minimum time between two progress messages of one batch.
    pub(crate) fn progress_interval(&self) -> Duration {
        Duration::from_secs(1) / self.progress_per_second.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        assert_eq!(HubConfig::default().validate(), Ok(()));
    }

    #[test]
    fn zero_limits_are_rejected() {
        let config = HubConfig {
            buffer_capacity: 0,
            ..HubConfig::default()
        };
        assert_eq!(
            config.validate().map_err(|e| e.field),
            Err("buffer_capacity")
        );
    }

    #[test]
    fn heartbeat_timeout_must_exceed_interval() {
        let heartbeat = HeartbeatConfig {
            ping_interval: Duration::from_secs(30),
            timeout: Duration::from_secs(30),
        };
        assert_eq!(
            heartbeat.validate().map_err(|e| e.field),
            Err("heartbeat.timeout")
        );
    }

    #[test]
    fn heartbeat_times_out_after_timeout() {
        let heartbeat = HeartbeatConfig::default();
        assert!(!heartbeat.is_timed_out(Duration::from_secs(60)));
        assert!(heartbeat.is_timed_out(Duration::from_secs(61)));
    }

    #[test]
    fn progress_interval_follows_rate() {
        assert_eq!(
            HubConfig::default().progress_interval(),
            Duration::from_millis(250)
        );
    }
}
