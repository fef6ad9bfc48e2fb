//! The crawler budget: a token bucket per client for cold generations
//! (`docs/archiver.md#crawler-budget`).
//!
//! A hit costs a `pread`; a miss costs a `git archive` and seconds of CPU.
//! A crawler walking every commit of every repository asks only for misses,
//! so it is the misses that are budgeted: each client has a bucket of
//! `--client-cold-burst` tokens refilled at `--client-cold-rate`, a request
//! that would start a generation takes one, and a client with none gets
//! `429` with `Retry-After` (the time until its next token, in whole
//! seconds, at least 1). Hits and joins never touch a token.
//!
//! Invariants:
//! - A client never starts more generations than its tokens allow: the
//!   token is taken *before* the cache lookup that may start the generation
//!   ([`Budget::reserve`]) and given back when the lookup turned out to be a
//!   hit or a join ([`Reservation::refund`]), so concurrent requests of one
//!   client cannot both spend its last token.
//! - Memory is bounded: at most `--client-cold-max-clients` buckets are
//!   kept, least recently used first out. A bucket pushed out comes back
//!   full, which is what an unknown client gets anyway; the price is that a
//!   client with more addresses than the bound can refill its own buckets
//!   by cycling through them. An IPv6 client is one `/64` (what a single
//!   host or home network is given), so one machine cannot mint addresses
//!   for free.
//! - Time is tokio's clock, so the tests run on a paused clock.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lru::LruCache;
use metrics::{counter, gauge};
use tokio::time::Instant;

use crate::metrics as m;

/// Cold generations per second a client may start, from `--client-cold-rate`
/// (`30/min`, `2/s`, `100/h`; `0`: no budget).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    per_second: f64,
}

impl Rate {
    pub fn per_second(self) -> f64 {
        self.per_second
    }

    pub fn is_off(self) -> bool {
        self.per_second == 0.0
    }
}

/// Parses `N/s`, `N/min`, `N/h` (also `sec`, `m`, `hour`), or `0`.
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    let text = text.trim();
    let (count, unit) = match text.split_once('/') {
        Some((count, unit)) => (count.trim(), unit.trim()),
        None if text.parse::<f64>() == Ok(0.0) => return Ok(Rate { per_second: 0.0 }),
        None => return Err(format!("{text:?}: give a rate as N/s, N/min or N/h, or 0")),
    };
    let seconds = match unit {
        "s" | "sec" | "second" => 1.0,
        "m" | "min" | "minute" => 60.0,
        "h" | "hour" => 3600.0,
        _ => return Err(format!("{text:?}: the unit is s, min or h")),
    };
    let count: f64 = count
        .parse()
        .ok()
        .filter(|count: &f64| count.is_finite() && *count >= 0.0)
        .ok_or_else(|| format!("{text:?}: the count is a non-negative number"))?;
    Ok(Rate {
        per_second: count / seconds,
    })
}

/// Who a budget belongs to: an IPv4 address, or an IPv6 `/64`, the key
/// every per-client rule uses.
pub use gitball_core::client::client_key;

/// One client's bucket.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// The buckets of every tracked client.
pub struct Budget {
    rate: f64,
    burst: f64,
    clients: Mutex<LruCache<IpAddr, Bucket>>,
}

/// A token taken for a request that may start a generation. Give it back
/// with [`Reservation::refund`] when the request did not start one;
/// dropping it keeps it spent.
#[must_use]
pub struct Reservation {
    budget: Arc<Budget>,
    client: IpAddr,
}

impl Reservation {
    /// The lookup was a hit or a join: no generation was started.
    pub fn refund(self) {
        let mut clients = self.budget.lock();
        if let Some(bucket) = clients.peek_mut(&self.client) {
            bucket.tokens = (bucket.tokens + 1.0).min(self.budget.burst);
        }
    }
}

/// The client's bucket is empty; its next token comes in this long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exhausted {
    pub retry_after: Duration,
}

impl Exhausted {
    /// `Retry-After` in whole seconds, rounded up, at least 1.
    pub fn retry_after_seconds(self) -> u64 {
        (self.retry_after.as_secs_f64().ceil() as u64).max(1)
    }
}

impl Budget {
    /// `None` when the rate is 0: no budget at all.
    pub fn new(rate: Rate, burst: u32, max_clients: NonZeroUsize) -> Option<Arc<Budget>> {
        gauge!(m::BUDGET_RATE).set(rate.per_second);
        gauge!(m::BUDGET_BURST).set(if rate.is_off() { 0.0 } else { burst as f64 });
        if rate.is_off() {
            return None;
        }
        Some(Arc::new(Budget {
            rate: rate.per_second,
            burst: f64::from(burst.max(1)),
            clients: Mutex::new(LruCache::new(max_clients)),
        }))
    }

    /// Takes one of `client`'s tokens, or says when the next one comes.
    pub fn reserve(self: &Arc<Self>, client: IpAddr) -> Result<Reservation, Exhausted> {
        let client = client_key(client);
        let now = Instant::now();
        let mut clients = self.lock();
        let burst = self.burst;
        let bucket = clients.get_or_insert_mut(client, || Bucket {
            tokens: burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.updated = now;
        let outcome = if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(Reservation {
                budget: self.clone(),
                client,
            })
        } else {
            let missing = 1.0 - bucket.tokens;
            Err(Exhausted {
                retry_after: Duration::from_secs_f64(missing / self.rate),
            })
        };
        gauge!(m::BUDGET_CLIENTS).set(clients.len() as f64);
        if outcome.is_ok() {
            counter!(m::BUDGET_TAKEN_TOTAL).increment(1);
        }
        // A refusal is counted by the caller, once it knows the request
        // would have started a generation (`BUDGET_REJECTED_TOTAL`).
        outcome
    }

    /// Clients tracked now (at most `--client-cold-max-clients`).
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, LruCache<IpAddr, Bucket>> {
        // Every mutation is a few field writes: a poisoned map is consistent.
        self.clients
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(rate: &str, burst: u32, max_clients: usize) -> Arc<Budget> {
        Budget::new(
            parse_rate(rate).unwrap(),
            burst,
            NonZeroUsize::new(max_clients).unwrap(),
        )
        .expect("a rate above 0 is a budget")
    }

    fn client(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn rates_parse_in_their_units() {
        assert_eq!(parse_rate("30/min").unwrap().per_second(), 0.5);
        assert_eq!(parse_rate("2/s").unwrap().per_second(), 2.0);
        assert_eq!(parse_rate("3600/h").unwrap().per_second(), 1.0);
        assert_eq!(parse_rate(" 1.5 / sec ").unwrap().per_second(), 1.5);
        assert!(parse_rate("0").unwrap().is_off());
        assert!(parse_rate("0/min").unwrap().is_off());
        for bad in ["30", "30/day", "-1/s", "x/s", "", "inf/s", "NaN/s"] {
            assert!(parse_rate(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn rate_zero_is_no_budget() {
        let off = Budget::new(parse_rate("0").unwrap(), 5, NonZeroUsize::new(10).unwrap());
        assert!(off.is_none());
    }

    #[test]
    fn ipv6_clients_are_their_slash_64_and_mapped_ipv4_is_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_eq!(client_key(a), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        assert_ne!(client_key(a), client_key(other));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(client_key(mapped), client(7));
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_the_rate_with_retry_after_until_the_next_token() {
        let budget = budget("30/min", 3, 10);
        for _ in 0..3 {
            let _spent = budget.reserve(client(1)).map_err(|_| ()).unwrap();
        }
        let exhausted = budget.reserve(client(1)).err().unwrap();
        // One token every 2 s.
        assert_eq!(exhausted.retry_after, Duration::from_secs(2));
        assert_eq!(exhausted.retry_after_seconds(), 2);
        // Another client is not affected.
        assert!(budget.reserve(client(2)).is_ok());

        tokio::time::advance(Duration::from_millis(500)).await;
        let exhausted = budget.reserve(client(1)).err().unwrap();
        assert_eq!(exhausted.retry_after, Duration::from_millis(1500));
        assert_eq!(exhausted.retry_after_seconds(), 2, "rounded up");
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(budget.reserve(client(1)).is_ok());
        assert!(budget.reserve(client(1)).is_err());

        // A long pause refills to the burst, not beyond.
        tokio::time::advance(Duration::from_secs(3600)).await;
        for _ in 0..3 {
            assert!(budget.reserve(client(1)).is_ok());
        }
        assert!(budget.reserve(client(1)).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_at_least_one_second() {
        let budget = budget("10/s", 1, 10);
        assert!(budget.reserve(client(1)).is_ok());
        let exhausted = budget.reserve(client(1)).err().unwrap();
        assert_eq!(exhausted.retry_after, Duration::from_millis(100));
        assert_eq!(exhausted.retry_after_seconds(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refunded_token_is_spent_again_and_never_beyond_the_burst() {
        let budget = budget("1/h", 2, 10);
        let first = budget.reserve(client(1)).map_err(|_| ()).unwrap();
        first.refund();
        let first = budget.reserve(client(1)).map_err(|_| ()).unwrap();
        let second = budget.reserve(client(1)).map_err(|_| ()).unwrap();
        assert!(budget.reserve(client(1)).is_err());
        // Kept: both generations started.
        drop((first, second));
        assert!(budget.reserve(client(1)).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn tracked_clients_stay_under_the_bound() {
        let budget = budget("1/h", 1, 4);
        for last in 0..100 {
            let _spent = budget.reserve(client(last));
            assert!(budget.tracked() <= 4);
        }
        assert_eq!(budget.tracked(), 4);
        // The most recent clients are the ones remembered.
        assert!(budget.reserve(client(99)).is_err());
        // One pushed out long ago comes back with a full bucket.
        assert!(budget.reserve(client(0)).is_ok());
    }

    /// The clients forgotten first are the least recently *seen*, not the
    /// first tracked (docs/archiver.md, crawler budget: "LRU"): a crawler
    /// that keeps asking stays remembered with its empty bucket while new
    /// clients arrive, and a refused request counts as being seen.
    /// (Mutation review: forgetting in insertion order passed every test.)
    #[tokio::test(start_paused = true)]
    async fn the_least_recently_seen_client_is_forgotten_first() {
        let budget = budget("1/h", 1, 4);
        for last in 0..4 {
            let _spent = budget.reserve(client(last)).expect("a full bucket");
        }
        // Client 0, the first tracked, is seen again (refused: empty).
        assert!(budget.reserve(client(0)).is_err());
        // Two new clients push out the two least recently seen: 1 and 2.
        for last in 4..6 {
            let _spent = budget.reserve(client(last)).expect("a new client");
        }
        assert_eq!(budget.tracked(), 4);
        assert!(
            budget.reserve(client(0)).is_err(),
            "client 0 was seen recently: still remembered, still empty"
        );
        assert!(
            budget.reserve(client(1)).is_ok(),
            "client 1 was least recently seen: forgotten, back full"
        );
    }
}
