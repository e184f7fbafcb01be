//! Rate-limited logging of refused tokens.
//!
//! A browser tab left open with an expired or foreign token reconnects every few seconds,
//! and each attempt is refused: logged one line each, a handful of stale tabs bury
//! everything else. So the first refusal of a token is logged in full, then the same
//! token's refusals are only counted, with at most one summary line a minute (written
//! when the next refusal comes in after the minute, and for what is left at shutdown).
//!
//! The token itself is never logged: a token is identified by a fingerprint, a keyed hash
//! whose key is random for each run (so a fingerprint cannot be checked against a guessed
//! token, and means nothing outside this run's log).

use crate::sync;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a summary line may be written per token.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Tokens remembered at once; beyond it the oldest quiet ones are forgotten (a flood of
/// distinct bad tokens must not grow memory without bound).
const MAX_TOKENS: usize = 4096;

struct Entry {
    reason: &'static str,
    session: String,
    since: Instant,
    /// Refusals since the last line written for this token.
    unlogged: u64,
}

pub struct RefusalLog {
    window: Duration,
    key: RandomState,
    tokens: Mutex<HashMap<u64, Entry>>,
}

/// What a refusal should write, decided under the lock and written after it.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// The first refusal of this token: log it in full.
    First,
    /// `count` more refusals over `over`.
    Summary { count: u64, over: Duration },
    /// Counted; nothing to write yet.
    Quiet,
}

impl RefusalLog {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            key: RandomState::new(),
            tokens: Mutex::new(HashMap::new()),
        }
    }

    /// The token's fingerprint as it appears in the log: 12 hex digits.
    pub fn fingerprint(&self, token: &str) -> String {
        format!("{:012x}", self.key.hash_one(token) >> 16)
    }

    /// Records one refusal of `token` and logs what is due.
    pub fn refused(&self, token: &str, session: &str, reason: &'static str) {
        let fingerprint = self.fingerprint(token);
        match self.record(token, session, reason, Instant::now()) {
            Line::First => tracing::info!(
                %session,
                reason,
                token_fp = %fingerprint,
                "request refused (further refusals of this token: one summary a minute)"
            ),
            Line::Summary { count, over } => tracing::info!(
                %session,
                reason,
                token_fp = %fingerprint,
                refused = count,
                over_s = over.as_secs(),
                "the same token was refused again"
            ),
            Line::Quiet => {}
        }
    }

    /// The decision of [`Self::refused`], at time `now`.
    pub fn record(&self, token: &str, session: &str, reason: &'static str, now: Instant) -> Line {
        let id = self.key.hash_one(token);
        let mut tokens = sync::lock(&self.tokens);
        if let Some(entry) = tokens.get_mut(&id) {
            entry.unlogged += 1;
            entry.reason = reason;
            let over = now.saturating_duration_since(entry.since);
            if over >= self.window {
                let count = entry.unlogged;
                entry.unlogged = 0;
                entry.since = now;
                return Line::Summary { count, over };
            }
            return Line::Quiet;
        }
        if tokens.len() >= MAX_TOKENS {
            let window = self.window;
            tokens.retain(|_, e| e.unlogged > 0 || now.saturating_duration_since(e.since) < window);
            if tokens.len() >= MAX_TOKENS {
                // Still full of busy tokens: their counts are lost rather than memory.
                tokens.clear();
            }
        }
        tokens.insert(
            id,
            Entry {
                reason,
                session: session.to_owned(),
                since: now,
                unlogged: 0,
            },
        );
        Line::First
    }

    /// Logs a summary for every token refused since its last line (at shutdown), and
    /// forgets them all.
    pub fn flush(&self) {
        let mut tokens = sync::lock(&self.tokens);
        for entry in tokens.values().filter(|e| e.unlogged > 0) {
            tracing::info!(
                session = %entry.session,
                reason = entry.reason,
                refused = entry.unlogged,
                over_s = entry.since.elapsed().as_secs(),
                "the same token was refused again (count at shutdown)"
            );
        }
        tokens.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_refusal_logged_then_one_summary_per_window() {
        let log = RefusalLog::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(log.record("tok", "s", "expired", t0), Line::First);
        for i in 1..30 {
            assert_eq!(
                log.record("tok", "s", "expired", t0 + Duration::from_secs(i)),
                Line::Quiet
            );
        }
        assert_eq!(
            log.record("tok", "s", "expired", t0 + Duration::from_secs(61)),
            Line::Summary {
                count: 30,
                over: Duration::from_secs(61)
            }
        );
        assert_eq!(
            log.record("tok", "s", "expired", t0 + Duration::from_secs(62)),
            Line::Quiet
        );
        // Another token is its own first refusal.
        assert_eq!(log.record("other", "s", "expired", t0), Line::First);
    }

    #[test]
    fn fingerprints_do_not_contain_the_token_and_are_stable() {
        let log = RefusalLog::new(WINDOW);
        let f = log.fingerprint("eyJhbGciOiJIUzI1NiJ9.e30.sig");
        assert_eq!(f, log.fingerprint("eyJhbGciOiJIUzI1NiJ9.e30.sig"));
        assert_eq!(f.len(), 12);
        assert!(!f.contains("eyJ"));
        assert_ne!(f, log.fingerprint("another"));
    }

    #[test]
    fn memory_is_bounded() {
        let log = RefusalLog::new(WINDOW);
        let t0 = Instant::now();
        for i in 0..(MAX_TOKENS * 2) {
            log.record(&format!("t{i}"), "s", "malformed", t0);
        }
        assert!(log.tokens.lock().unwrap().len() <= MAX_TOKENS);
    }
}
