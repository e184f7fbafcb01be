//! Per-connection rate limits and server-wide caps (SPEC.md sections 7 and 7.1).
//!
//! [`TokenBucket`] and [`Strikes`] are plain values owned by one connection's reader; the
//! [`ConnectionCaps`] are shared and hand out a [`ConnectionPermit`] before an upgrade,
//! released when the connection's task drops it. [`LongPollCaps`] do the same for HTTP long
//! polls, and [`NewSessionRate`] meters how many sessions one user brings into memory per
//! minute. Nothing here does I/O.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::Endpoint;
use crate::sync;

/// A token bucket: `rate` tokens a second, holding at most `burst`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes a token if one is there.
    pub fn try_take(&mut self) -> bool {
        self.refill(Instant::now());
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket is back at its burst (unused for long enough).
    pub fn is_full(&mut self) -> bool {
        self.refill(Instant::now());
        self.tokens >= self.burst
    }

    /// How long until a token is there (zero if one is now).
    pub fn wait_time(&mut self) -> Duration {
        self.refill(Instant::now());
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
        }
    }
}

/// Counts offences in a sliding window; `limit` offences within `window` is too many.
#[derive(Debug)]
pub struct Strikes {
    limit: u32,
    window: Duration,
    times: std::collections::VecDeque<Instant>,
}

impl Strikes {
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            times: Default::default(),
        }
    }

    /// Records one offence; `true` when the count within the window passes the limit.
    pub fn strike(&mut self) -> bool {
        let now = Instant::now();
        while let Some(first) = self.times.front() {
            if now.saturating_duration_since(*first) > self.window {
                self.times.pop_front();
            } else {
                break;
            }
        }
        self.times.push_back(now);
        self.times.len() > self.limit as usize
    }
}

/// Why a connection was refused before its upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CapError {
    #[error("too many connections for this user in this session")]
    PerUser,
    #[error("too many connections for this user across sessions")]
    PerUserTotal,
    #[error("the server is at its connection limit")]
    Total,
}

impl CapError {
    /// A short label for logs and metrics.
    pub fn reason(self) -> &'static str {
        match self {
            CapError::PerUser => "per_user_cap",
            CapError::PerUserTotal => "per_user_total_cap",
            CapError::Total => "server_cap",
        }
    }
}

type UserKey = (String, String, Endpoint);

/// The server's connection counters.
pub struct ConnectionCaps {
    max_total: usize,
    max_per_user: usize,
    max_per_user_total: usize,
    total: AtomicUsize,
    counts: Mutex<UserCounts>,
}

/// Open connections by (user, session, endpoint) and by user alone, under one lock so the
/// two never disagree.
#[derive(Default)]
struct UserCounts {
    per_session: HashMap<UserKey, usize>,
    per_user: HashMap<String, usize>,
}

/// Takes one from `map[key]`, removing the entry at zero so the maps hold only users
/// with something open.
fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// Holds a connection's place under the caps until dropped.
pub struct ConnectionPermit {
    caps: Arc<ConnectionCaps>,
    key: UserKey,
}

impl ConnectionCaps {
    /// `max_per_user` counts one user's connections to one session and endpoint,
    /// `max_per_user_total` one user's connections to every session and endpoint.
    pub fn new(max_total: usize, max_per_user: usize, max_per_user_total: usize) -> Self {
        Self {
            max_total,
            max_per_user,
            max_per_user_total,
            total: AtomicUsize::new(0),
            counts: Mutex::new(UserCounts::default()),
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Reserves a place for one more connection of `user` to `session` on `endpoint`.
    pub fn acquire(
        self: &Arc<Self>,
        user: &str,
        session: &str,
        endpoint: Endpoint,
    ) -> Result<ConnectionPermit, CapError> {
        let key = (user.to_owned(), session.to_owned(), endpoint);
        let mut counts = sync::lock(&self.counts);
        if self.total.load(Ordering::Relaxed) >= self.max_total {
            return Err(CapError::Total);
        }
        if counts.per_user.get(user).copied().unwrap_or(0) >= self.max_per_user_total {
            return Err(CapError::PerUserTotal);
        }
        if counts.per_session.get(&key).copied().unwrap_or(0) >= self.max_per_user {
            return Err(CapError::PerUser);
        }
        *counts.per_session.entry(key.clone()).or_insert(0) += 1;
        *counts.per_user.entry(key.0.clone()).or_insert(0) += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(ConnectionPermit {
            caps: self.clone(),
            key,
        })
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut counts = sync::lock(&self.caps.counts);
        release(&mut counts.per_session, &self.key);
        release(&mut counts.per_user, &self.key.0);
        self.caps.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a long poll was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LongPollError {
    #[error("too many long polls held for this user")]
    PerUser,
    #[error("the server holds as many long polls as it may")]
    Total,
}

impl LongPollError {
    /// A short label for logs and metrics.
    pub fn reason(self) -> &'static str {
        match self {
            LongPollError::PerUser => "long_polls_per_user",
            LongPollError::Total => "long_polls",
        }
    }
}

/// Long polls held at once, per user and in all. A held poll costs a socket (a file
/// descriptor) and a task for up to 30 s, so one token must not be able to hold thousands.
pub struct LongPollCaps {
    max_total: usize,
    max_per_user: usize,
    counts: Mutex<(usize, HashMap<String, usize>)>,
}

/// A long poll's place under the [`LongPollCaps`], given back when dropped.
pub struct LongPollPermit {
    caps: Arc<LongPollCaps>,
    user: String,
}

impl LongPollCaps {
    pub fn new(max_total: usize, max_per_user: usize) -> Self {
        Self {
            max_total,
            max_per_user,
            counts: Mutex::new((0, HashMap::new())),
        }
    }

    /// Long polls held now.
    pub fn held(&self) -> usize {
        sync::lock(&self.counts).0
    }

    pub fn acquire(self: &Arc<Self>, user: &str) -> Result<LongPollPermit, LongPollError> {
        let mut counts = sync::lock(&self.counts);
        let (total, per_user) = &mut *counts;
        if per_user.get(user).copied().unwrap_or(0) >= self.max_per_user {
            return Err(LongPollError::PerUser);
        }
        if *total >= self.max_total {
            return Err(LongPollError::Total);
        }
        *total += 1;
        *per_user.entry(user.to_owned()).or_insert(0) += 1;
        Ok(LongPollPermit {
            caps: self.clone(),
            user: user.to_owned(),
        })
    }
}

impl Drop for LongPollPermit {
    fn drop(&mut self) {
        let mut counts = sync::lock(&self.caps.counts);
        counts.0 = counts.0.saturating_sub(1);
        release(&mut counts.1, &self.user);
    }
}

/// How many sessions each user may bring into memory: a token bucket per user holding
/// `per_minute` tokens, refilled at `per_minute` a minute. Loading a session reads the
/// store and keeps a document in memory until it idles out, so a token for `sid: "*"`
/// must not be able to load thousands of them.
pub struct NewSessionRate {
    per_minute: u32,
    buckets: Mutex<HashMap<String, TokenBucket>>,
}

/// Buckets kept before idle (full) ones are pruned; bounds the map under many users.
const PRUNE_BUCKETS_AT: usize = 4096;

impl NewSessionRate {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one new-session token of `user`; `false` when the user has none left.
    pub fn try_take(&self, user: &str) -> bool {
        let mut buckets = sync::lock(&self.buckets);
        if buckets.len() >= PRUNE_BUCKETS_AT && !buckets.contains_key(user) {
            // A full bucket is the same as no bucket: forget it.
            buckets.retain(|_, b| !b.is_full());
        }
        let per_minute = self.per_minute;
        buckets
            .entry(user.to_owned())
            .or_insert_with(|| TokenBucket::new(f64::from(per_minute) / 60.0, per_minute))
            .try_take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_refuses() {
        let mut b = TokenBucket::new(1.0, 3);
        assert!(b.try_take() && b.try_take() && b.try_take());
        assert!(!b.try_take());
        assert!(b.wait_time() > Duration::ZERO);
    }

    #[test]
    fn strikes_pass_the_limit() {
        let mut s = Strikes::new(2, Duration::from_secs(60));
        assert!(!s.strike());
        assert!(!s.strike());
        assert!(s.strike());
    }

    #[test]
    fn caps_release_on_drop() {
        let caps = Arc::new(ConnectionCaps::new(3, 2, 64));
        let a = caps.acquire("u", "s", Endpoint::Tutor).unwrap();
        let _b = caps.acquire("u", "s", Endpoint::Tutor).unwrap();
        assert_eq!(
            caps.acquire("u", "s", Endpoint::Tutor).err(),
            Some(CapError::PerUser)
        );
        let _c = caps.acquire("u", "s", Endpoint::Whiteboard).unwrap();
        assert_eq!(
            caps.acquire("v", "s", Endpoint::Tutor).err(),
            Some(CapError::Total)
        );
        drop(a);
        assert!(caps.acquire("u", "s", Endpoint::Tutor).is_ok());
        assert_eq!(caps.open(), 2);
    }

    #[test]
    fn per_user_total_spans_sessions() {
        let caps = Arc::new(ConnectionCaps::new(100, 8, 3));
        let a = caps.acquire("u", "s1", Endpoint::Tutor).unwrap();
        let _b = caps.acquire("u", "s2", Endpoint::Whiteboard).unwrap();
        let _c = caps.acquire("u", "s3", Endpoint::Tutor).unwrap();
        assert_eq!(
            caps.acquire("u", "s4", Endpoint::Tutor).err(),
            Some(CapError::PerUserTotal)
        );
        assert!(caps.acquire("v", "s4", Endpoint::Tutor).is_ok());
        drop(a);
        assert!(caps.acquire("u", "s4", Endpoint::Tutor).is_ok());
    }

    #[test]
    fn long_polls_are_capped_per_user_and_in_all() {
        let caps = Arc::new(LongPollCaps::new(3, 2));
        let a = caps.acquire("u").unwrap();
        let _b = caps.acquire("u").unwrap();
        assert_eq!(caps.acquire("u").err(), Some(LongPollError::PerUser));
        let _c = caps.acquire("v").unwrap();
        assert_eq!(caps.acquire("w").err(), Some(LongPollError::Total));
        drop(a);
        assert_eq!(caps.held(), 2);
        assert!(caps.acquire("u").is_ok());
    }

    #[test]
    fn new_sessions_are_metered_per_user() {
        let rate = NewSessionRate::new(2);
        assert!(rate.try_take("u") && rate.try_take("u"));
        assert!(!rate.try_take("u"));
        assert!(rate.try_take("v"));
    }
}
