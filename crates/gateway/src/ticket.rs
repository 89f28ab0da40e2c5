//! Short-lived single-use tickets, for browsers that cannot set an
//! `Authorization` header on a WebSocket request. The HTTP API issues a
//! ticket to an authenticated user, and the client passes it in the
//! connection URL.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, Utc};
use domain::{Clock, SystemClock, UserId};
use thiserror::Error;
use uuid::Uuid;

/// A ticket value: 64 hex digits from two random UUIDs (244 random bits
/// from the operating system's generator).
#[derive(Clone, PartialEq, Eq)]
pub struct Ticket(String);

impl Ticket {
    fn generate() -> Self {
        Self(format!(
            "{}{}",
            Uuid::new_v4().simple(),
            Uuid::new_v4().simple()
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The value is a credential, so it is never printed in debug output.
impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Ticket(..)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TicketError {
    /// Unknown, already redeemed, or never issued.
    #[error("ticket is invalid or was already used; request a new one")]
    Invalid,
    #[error("ticket expired; request a new one")]
    Expired,
    #[error("too many outstanding tickets ({max}); retry after some expire")]
    TooMany { max: usize },
}

#[derive(Debug)]
struct Issued {
    user: UserId,
    expires_at: DateTime<Utc>,
}

/// Issues and redeems tickets. Memory is bounded: expired tickets are swept
/// on every issue, and at most `max_outstanding` are held.
#[derive(Debug)]
pub struct TicketStore {
    ttl: Duration,
    max_outstanding: usize,
    clock: Arc<dyn Clock>,
    issued: Mutex<HashMap<String, Issued>>,
}

impl Default for TicketStore {
    /// 30-second tickets, at most 10,000 outstanding, on the wall clock.
    fn default() -> Self {
        Self::new(Duration::seconds(30), 10_000, Arc::new(SystemClock))
    }
}

impl TicketStore {
    pub fn new(ttl: Duration, max_outstanding: usize, clock: Arc<dyn Clock>) -> Self {
        Self {
            ttl,
            max_outstanding,
            clock,
            issued: Mutex::new(HashMap::new()),
        }
    }

    fn issued(&self) -> std::sync::MutexGuard<'_, HashMap<String, Issued>> {
        self.issued
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Issues a ticket for `user`, valid for the configured time.
    pub fn issue(&self, user: UserId) -> Result<(Ticket, DateTime<Utc>), TicketError> {
        let now = self.clock.now();
        let mut issued = self.issued();
        issued.retain(|_, ticket| ticket.expires_at > now);
        if issued.len() >= self.max_outstanding {
            tracing::warn!(
                outstanding = issued.len(),
                "websocket ticket limit reached; rejecting a new ticket"
            );
            return Err(TicketError::TooMany {
                max: self.max_outstanding,
            });
        }
        let ticket = Ticket::generate();
        let expires_at = now + self.ttl;
        issued.insert(ticket.0.clone(), Issued { user, expires_at });
        Ok((ticket, expires_at))
    }

    /// Consumes a ticket and returns its user. A ticket works once.
    pub fn redeem(&self, ticket: &str) -> Result<UserId, TicketError> {
        let now = self.clock.now();
        let issued = self.issued().remove(ticket).ok_or(TicketError::Invalid)?;
        if issued.expires_at <= now {
            return Err(TicketError::Expired);
        }
        Ok(issued.user)
    }

    /// Removes expired tickets; `issue` does this too.
    pub fn sweep(&self) {
        let now = self.clock.now();
        self.issued().retain(|_, ticket| ticket.expires_at > now);
    }

    /// Number of tickets held, including expired ones not yet swept.
    pub fn len(&self) -> usize {
        self.issued().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use domain::ManualClock;

    fn store(max: usize) -> (TicketStore, ManualClock) {
        let clock = ManualClock::new(Utc::now());
        let store = TicketStore::new(Duration::seconds(30), max, Arc::new(clock.clone()));
        (store, clock)
    }

    #[test]
    fn ticket_redeems_once() {
        let (store, _clock) = store(10);
        let (ticket, _) = store.issue(UserId::new("alice")).unwrap();

        assert_eq!(store.redeem(ticket.as_str()), Ok(UserId::new("alice")));
        assert_eq!(store.redeem(ticket.as_str()), Err(TicketError::Invalid));
    }

    #[test]
    fn ticket_expires_after_ttl() {
        let (store, clock) = store(10);
        let (ticket, expires_at) = store.issue(UserId::new("alice")).unwrap();
        assert_eq!(expires_at, clock.now() + Duration::seconds(30));

        clock.advance(Duration::seconds(30));
        assert_eq!(store.redeem(ticket.as_str()), Err(TicketError::Expired));
        assert_eq!(store.redeem(ticket.as_str()), Err(TicketError::Invalid));
    }

    #[test]
    fn unknown_ticket_rejected() {
        let (store, _clock) = store(10);
        assert_eq!(store.redeem("not-a-ticket"), Err(TicketError::Invalid));
        assert_eq!(store.redeem(""), Err(TicketError::Invalid));
    }

    #[test]
    fn tickets_are_distinct() {
        let (store, _clock) = store(10);
        let (first, _) = store.issue(UserId::new("alice")).unwrap();
        let (second, _) = store.issue(UserId::new("alice")).unwrap();
        assert_ne!(first, second);
        assert_eq!(first.as_str().len(), 64);
    }

    #[test]
    fn expired_tickets_are_swept() {
        let (store, clock) = store(2);
        store.issue(UserId::new("alice")).unwrap();
        store.issue(UserId::new("alice")).unwrap();
        assert_eq!(
            store.issue(UserId::new("alice")),
            Err(TicketError::TooMany { max: 2 })
        );

        clock.advance(Duration::seconds(31));
        assert!(store.issue(UserId::new("bob")).is_ok());
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn ticket_debug_hides_value() {
        let ticket = Ticket::generate();
        assert!(!format!("{ticket:?}").contains(ticket.as_str()));
    }
}
