//! WebSocket tickets that work on every process sharing a database.
//!
//! One process keeps its tickets in memory ([`gateway::TicketStore`]).
//! Behind a load balancer, the process that redeems a ticket is often not
//! the one that issued it, so on PostgreSQL a ticket carries its own proof
//! instead: the user, the expiry and a random nonce, signed with a key
//! derived from the JWT secret that all processes share. Any process can
//! check it. The store's GCRA table enforces single use across processes:
//! the first redemption of a nonce takes its only unit, which comes back
//! only after the ticket has expired.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use domain::{Clock, GcraParams, GcraRequest, RateLimitStore, UserId};
use gateway::TicketError;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Rate-limit policy under which redeemed nonces are remembered.
const REDEEMED_POLICY: &str = "ws.ticket";

/// Tag of the ticket format, so a later format can be recognized.
const VERSION: &str = "t1";

/// The ticket issuer of a server: in memory, or signed and shared.
#[derive(Debug)]
pub enum Tickets {
    /// In this process's memory; for a single process.
    Local(gateway::TicketStore),
    /// Signed, and redeemed once across every process on the store.
    Shared(SharedTickets),
}

impl Tickets {
    /// Issues a ticket for `user`; returns it and its expiry.
    pub fn issue(&self, user: UserId) -> Result<(String, DateTime<Utc>), TicketError> {
        match self {
            Tickets::Local(store) => store
                .issue(user)
                .map(|(ticket, expires_at)| (ticket.as_str().to_owned(), expires_at)),
            Tickets::Shared(shared) => Ok(shared.issue(&user)),
        }
    }

    /// Consumes a ticket and returns its user. A ticket works once.
    pub async fn redeem(&self, ticket: &str) -> Result<UserId, TicketError> {
        match self {
            Tickets::Local(store) => store.redeem(ticket),
            Tickets::Shared(shared) => shared.redeem(ticket).await,
        }
    }
}

/// Signed tickets that any process with the JWT secret can check.
pub struct SharedTickets {
    key: Vec<u8>,
    ttl: Duration,
    store: Arc<dyn RateLimitStore>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for SharedTickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTickets")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl SharedTickets {
    /// Tickets valid for `ttl`, signed with a key derived from
    /// `jwt_secret`: a ticket is not a token, and must never pass for one.
    pub fn new(
        jwt_secret: &str,
        ttl: Duration,
        store: Arc<dyn RateLimitStore>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let key = mac(jwt_secret.as_bytes(), b"batchd websocket ticket key").to_vec();
        Self {
            key,
            ttl,
            store,
            clock,
        }
    }

    fn issue(&self, user: &UserId) -> (String, DateTime<Utc>) {
        let expires_at = self.clock.now() + self.ttl;
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let body = format!(
            "{VERSION}.{}.{}.{nonce}",
            hex::encode(user.as_str()),
            expires_at.timestamp_millis()
        );
        let signature = hex::encode(mac(&self.key, body.as_bytes()));
        (format!("{body}.{signature}"), expires_at)
    }

    async fn redeem(&self, ticket: &str) -> Result<UserId, TicketError> {
        let parsed = self.verify(ticket).ok_or(TicketError::Invalid)?;
        let now = self.clock.now();
        if parsed.expires_ms <= now.timestamp_millis() {
            return Err(TicketError::Expired);
        }

        // One unit per nonce that refills only after twice the lifetime,
        // by which time the ticket has expired anyway.
        let lifetime_ms = self.ttl.num_milliseconds().max(1);
        let first_use = self
            .store
            .check_gcra(GcraRequest {
                policy: REDEEMED_POLICY.to_owned(),
                key: parsed.nonce,
                cost: 1,
                params: GcraParams {
                    emission_interval_ms: lifetime_ms.saturating_mul(2),
                    tolerance_ms: 0,
                },
                now,
            })
            .await
            .map_err(|error| {
                tracing::warn!(%error, "recording a websocket ticket's use failed; refusing it");
                TicketError::Invalid
            })?;
        if first_use.allowed {
            Ok(parsed.user)
        } else {
            Err(TicketError::Invalid)
        }
    }

    /// Checks the signature and reads the fields; `None` for anything that
    /// this key did not sign.
    fn verify(&self, ticket: &str) -> Option<ParsedTicket> {
        let (body, signature) = ticket.rsplit_once('.')?;
        let signature = hex::decode(signature).ok()?;
        let mut check = HmacSha256::new_from_slice(&self.key).ok()?;
        check.update(body.as_bytes());
        check.verify_slice(&signature).ok()?;

        let mut fields = body.split('.');
        let (version, user, expires, nonce) = (
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
        );
        if version != VERSION || fields.next().is_some() {
            return None;
        }
        let user = String::from_utf8(hex::decode(user).ok()?).ok()?;
        Some(ParsedTicket {
            user: UserId::new(user),
            expires_ms: expires.parse().ok()?,
            nonce: nonce.to_owned(),
        })
    }
}

struct ParsedTicket {
    user: UserId,
    expires_ms: i64,
    nonce: String,
}

fn mac(key: &[u8], message: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so the error branch is unreachable.
    // It returns a value that matches no signature instead of panicking.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => return [0; 32],
    };
    mac.update(message);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use domain::ManualClock;
    use sqlite_store::{SqliteConfig, SqliteStore};

    use super::*;

    const SECRET: &str = "a-test-secret-that-is-long-enough-0123";

    async fn shared(dir: &tempfile::TempDir, clock: Arc<ManualClock>) -> SharedTickets {
        let store = SqliteStore::open(SqliteConfig::new(dir.path().join("t.db")))
            .await
            .unwrap();
        SharedTickets::new(SECRET, Duration::seconds(30), Arc::new(store), clock)
    }

    fn clock() -> Arc<ManualClock> {
        Arc::new(ManualClock::new(
            DateTime::from_timestamp_millis(1_800_000_000_000).unwrap(),
        ))
    }

    #[tokio::test]
    async fn ticket_works_once_on_other_process() {
        let dir = tempfile::tempdir().unwrap();
        let clock = clock();
        let issuer = shared(&dir, clock.clone()).await;
        let other = SharedTickets::new(
            SECRET,
            Duration::seconds(30),
            issuer.store.clone(),
            clock.clone(),
        );

        let (ticket, _) = issuer.issue(&UserId::new("alice.example"));
        assert_eq!(
            other.redeem(&ticket).await.unwrap(),
            UserId::new("alice.example")
        );
        assert_eq!(issuer.redeem(&ticket).await, Err(TicketError::Invalid));
        assert_eq!(other.redeem(&ticket).await, Err(TicketError::Invalid));
    }

    #[tokio::test]
    async fn expired_or_altered_ticket_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let clock = clock();
        let tickets = shared(&dir, clock.clone()).await;

        let (ticket, _) = tickets.issue(&UserId::new("alice"));
        let forged = ticket.replacen(&hex::encode("alice"), &hex::encode("admin"), 1);
        assert_eq!(tickets.redeem(&forged).await, Err(TicketError::Invalid));
        assert_eq!(
            tickets.redeem("t1.00.1.x.00").await,
            Err(TicketError::Invalid)
        );
        assert_eq!(tickets.redeem("").await, Err(TicketError::Invalid));

        let other_secret = SharedTickets::new(
            "another-secret-that-is-long-enough-456",
            Duration::seconds(30),
            tickets.store.clone(),
            clock.clone(),
        );
        assert_eq!(
            other_secret.redeem(&ticket).await,
            Err(TicketError::Invalid)
        );

        clock.advance(Duration::seconds(31));
        assert_eq!(tickets.redeem(&ticket).await, Err(TicketError::Expired));
    }
}
