//! Cost of one in-memory check. Run with `cargo bench -p ratelimit`.

use std::hint::black_box;

use chrono::{DateTime, Duration, Utc};
use criterion::{Criterion, criterion_group, criterion_main};
use ratelimit::{InMemoryLimiter, MemoryLimits, PolicySet};

fn start() -> DateTime<Utc> {
    DateTime::from_timestamp(1_900_000_000, 0).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

fn one_key(c: &mut Criterion) {
    let policies = PolicySet::defaults();
    let policy = policies.general().clone();
    let limiter = InMemoryLimiter::new(MemoryLimits::default());
    let mut now = start();
    // One request per emission interval keeps the key admitted every time.
    let step = Duration::milliseconds(policy.gcra().emission_interval_ms);

    c.bench_function("in-memory check, one key", |b| {
        b.iter(|| {
            now += step;
            black_box(limiter.check_sync(&policy, black_box("user:42"), 1, now))
        })
    });
}

fn many_keys(c: &mut Criterion) {
    let policies = PolicySet::defaults();
    let policy = policies.general().clone();
    let limiter = InMemoryLimiter::new(MemoryLimits::default());
    let keys: Vec<String> = (0..10_000).map(|i| format!("user:{i}")).collect();
    let mut now = start();
    let mut index = 0;

    // A key comes round every 10,000 checks, 10 s later, so it is admitted.
    c.bench_function("in-memory check, 10k keys", |b| {
        b.iter(|| {
            index = (index + 1) % keys.len();
            now += Duration::milliseconds(1);
            black_box(limiter.check_sync(&policy, black_box(&keys[index]), 1, now))
        })
    });
}

criterion_group!(benches, one_key, many_keys);
criterion_main!(benches);
