//! Per-connection rate limits and server-wide connection caps (SPEC.md section 7).
//!
//! [`TokenBucket`] and [`Strikes`] are plain values owned by one connection's reader; the
//! [`ConnectionCaps`] are shared and hand out a [`ConnectionPermit`] before an upgrade,
//! released when the connection's task drops it. Nothing here does I/O.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::Endpoint;

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
    #[error("the server is at its connection limit")]
    Total,
}

type UserKey = (String, String, Endpoint);

/// The server's connection counters.
pub struct ConnectionCaps {
    max_total: usize,
    max_per_user: usize,
    total: AtomicUsize,
    per_user: Mutex<HashMap<UserKey, usize>>,
}

/// Holds a connection's place under the caps until dropped.
pub struct ConnectionPermit {
    caps: Arc<ConnectionCaps>,
    key: UserKey,
}

impl ConnectionCaps {
    pub fn new(max_total: usize, max_per_user: usize) -> Self {
        Self {
            max_total,
            max_per_user,
            total: AtomicUsize::new(0),
            per_user: Mutex::new(HashMap::new()),
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
        let mut per_user = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        if self.total.load(Ordering::Relaxed) >= self.max_total {
            return Err(CapError::Total);
        }
        let n = per_user.entry(key.clone()).or_insert(0);
        if *n >= self.max_per_user {
            return Err(CapError::PerUser);
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(ConnectionPermit {
            caps: self.clone(),
            key,
        })
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut per_user = self.caps.per_user.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_user.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                per_user.remove(&self.key);
            }
        }
        self.caps.total.fetch_sub(1, Ordering::Relaxed);
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
        let caps = Arc::new(ConnectionCaps::new(3, 2));
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
}
