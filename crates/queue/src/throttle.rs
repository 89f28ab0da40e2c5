//! Processing rate limits: a GCRA per key (a kind, or a kind and owner).
//!
//! GCRA keeps one number per key, the theoretical arrival time (TAT). With
//! emission interval `T = per / max` and burst tolerance `(burst - 1) * T`,
//! a start at time `now` is allowed when `TAT - tolerance <= now`, and
//! moves the TAT to `max(TAT, now) + T`. Any window of one period admits at
//! most `max + burst - 1` starts. A key whose TAT is in the past is
//! back at full capacity, so it can be forgotten: that keeps the map
//! bounded by the keys active within one period.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::Rate;

/// Keys kept before idle ones are swept.
const SWEEP_AT: usize = 10_000;

#[derive(Debug)]
pub(crate) struct Throttle {
    interval_ms: f64,
    tolerance_ms: f64,
    /// TAT per key, in milliseconds since the epoch.
    tat: HashMap<String, f64>,
}

impl Throttle {
    pub(crate) fn new(rate: Rate) -> Self {
        let max = f64::from(rate.max.max(1));
        let burst = f64::from(rate.burst().clamp(1, rate.max.max(1)));
        let interval_ms = rate.per.as_secs_f64() * 1000.0 / max;
        Self {
            interval_ms,
            tolerance_ms: interval_ms * (burst - 1.0),
            tat: HashMap::new(),
        }
    }

    /// Grants up to `wanted` starts for `key` now. Returns how many were
    /// granted and, if fewer than wanted, how long until the next one.
    pub(crate) fn take_up_to(
        &mut self,
        key: &str,
        wanted: u32,
        now: DateTime<Utc>,
    ) -> (u32, Option<Duration>) {
        let now_ms = now.timestamp_millis() as f64;
        if self.tat.len() >= SWEEP_AT {
            self.tat.retain(|_, tat| *tat > now_ms);
        }

        let tat = self.tat.get(key).copied().unwrap_or(now_ms).max(now_ms);
        let mut next = tat;
        let mut granted = 0;
        while granted < wanted && next - self.tolerance_ms <= now_ms {
            next += self.interval_ms;
            granted += 1;
        }
        if granted > 0 {
            self.tat.insert(key.to_owned(), next);
        }

        let wait = (granted < wanted).then(|| {
            let ready_at = next - self.tolerance_ms;
            Duration::from_millis((ready_at - now_ms).max(1.0).ceil() as u64)
        });
        (granted, wait)
    }

    /// Gives back starts that were granted but not used.
    pub(crate) fn refund(&mut self, key: &str, unused: u32, now: DateTime<Utc>) {
        let now_ms = now.timestamp_millis() as f64;
        if let Some(tat) = self.tat.get_mut(key) {
            *tat = (*tat - self.interval_ms * f64::from(unused)).max(now_ms);
        }
    }

    #[cfg(test)]
    pub(crate) fn keys(&self) -> usize {
        self.tat.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn start() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
    }

    #[test]
    fn grants_the_burst_at_once_then_spaces_starts() {
        let mut throttle = Throttle::new(Rate::per_minute(10));
        let (granted, wait) = throttle.take_up_to("pdf", 20, start());
        assert_eq!(granted, 2);
        assert_eq!(wait, Some(Duration::from_secs(6)));

        let (granted, _) = throttle.take_up_to("pdf", 1, start() + chrono::Duration::seconds(5));
        assert_eq!(granted, 0);
        let (granted, _) = throttle.take_up_to("pdf", 1, start() + chrono::Duration::seconds(6));
        assert_eq!(granted, 1);
    }

    #[test]
    fn no_minute_admits_more_than_the_limit_after_a_burst() {
        let mut throttle = Throttle::new(Rate::per_minute(10));
        let mut starts = Vec::new();
        for second in 0..180 {
            let now = start() + chrono::Duration::seconds(second);
            let (granted, _) = throttle.take_up_to("pdf", 5, now);
            starts.extend(std::iter::repeat_n(second, granted as usize));
        }
        for window_start in 0..120 {
            let in_window = starts
                .iter()
                .filter(|s| **s >= window_start && **s < window_start + 60)
                .count();
            // The default burst is a fifth of the limit, so a window may
            // hold the limit plus one burst start.
            assert!(
                in_window <= 11,
                "window at {window_start}s admitted {in_window}"
            );
        }
        let steady = starts.iter().filter(|s| (120..180).contains(*s)).count();
        assert_eq!(steady, 10, "a steady minute admits the limit");
    }

    #[test]
    fn refund_returns_unused_starts() {
        let mut throttle = Throttle::new(Rate {
            burst: Some(10),
            ..Rate::per_minute(10)
        });
        let (granted, _) = throttle.take_up_to("pdf", 10, start());
        assert_eq!(granted, 10);
        throttle.refund("pdf", 4, start());
        let (granted, _) = throttle.take_up_to("pdf", 10, start());
        assert_eq!(granted, 4);
    }

    #[test]
    fn idle_keys_are_swept() {
        let mut throttle = Throttle::new(Rate::per_minute(60));
        for user in 0..(SWEEP_AT * 3) {
            let now = start() + chrono::Duration::seconds(user as i64);
            throttle.take_up_to(&format!("user:{user}"), 1, now);
        }
        assert!(throttle.keys() <= SWEEP_AT, "{} keys kept", throttle.keys());
    }
}
