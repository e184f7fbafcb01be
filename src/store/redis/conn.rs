//! Connections to Redis: the pool every store call borrows from, connect and I/O timeouts,
//! and the backoff that keeps a down Redis from being hammered.
//!
//! - A call takes an idle connection (or opens one), runs its commands, and gives it back;
//!   a connection that failed at the connection level (I/O, timeout, dropped) is dropped,
//!   never returned, and so are the other idle ones (after a Redis restart they are all
//!   stale). Any such failure, the stream reader's included, starts a new generation:
//!   a connection opened before it is not taken back into the pool, so a Redis that
//!   restarted while one call held a connection does not leave a stale one for the next
//!   writer. An error Redis answered (a script's error, `LOADING`) leaves the connection
//!   in step and it goes back to the pool.
//! - Connect timeout [`CONNECT_TIMEOUT`], read and write timeouts [`IO_TIMEOUT`]: a dead
//!   Redis holds a lane thread for at most that long.
//! - After a connection-level failure, calls fail fast with the last error for a while
//!   (100 ms, doubling up to 2 s while failures go on), then the next call tries again;
//!   a successful connect resets it. Nothing here needs a restart to recover.
//!
//! Every failure becomes [`StoreError::Unreachable`]. Owns: `redis::Client` /
//! `ClusterClient`, connections and their timeouts. Must not touch: keys, scripts, values.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::{ConnectionLike, ErrorKind, RedisError, RedisResult};

use super::{ClientIdentity, RedisTarget};
use crate::store::{unpoisoned, StoreError};

/// How long opening a connection may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one command may wait for its reply (or to be written).
pub(super) const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// First fail-fast window after a failure, and the longest.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Idle connections kept (more are opened under load and closed when given back).
const MAX_IDLE: usize = 16;

/// A connection to one Redis, or to a Redis Cluster (which routes each command by its
/// first key's slot).
pub(super) enum Conn {
    Single(redis::Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl Conn {
    pub(super) fn like(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Conn::Single(c) => c,
            Conn::Cluster(c) => c.as_mut(),
        }
    }

    /// Sets the read timeout (`None`: block as long as the command does).
    pub(super) fn set_read_timeout(&mut self, timeout: Option<Duration>) -> RedisResult<()> {
        match self {
            Conn::Single(c) => c.set_read_timeout(timeout),
            Conn::Cluster(c) => c.set_read_timeout(timeout),
        }
    }
}

enum Client {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

#[derive(Default)]
struct Backoff {
    /// Calls fail fast until then.
    until: Option<Instant>,
    delay: Duration,
    last_error: String,
}

pub(super) struct Pool {
    client: Client,
    /// Idle connections with the generation they were opened in.
    idle: Mutex<Vec<(u64, Conn)>>,
    /// Bumped by every connection-level failure: older connections are not reused.
    generation: AtomicU64,
    backoff: Mutex<Backoff>,
}

/// `redis://` or `rediss://`, or a clear error.
pub fn check_redis_url(url: &str) -> Result<(), StoreError> {
    let scheme_ok = url.starts_with("redis://") || url.starts_with("rediss://");
    if !scheme_ok {
        return Err(StoreError::Unreachable(format!(
            "{url:?} is not a Redis URL: it must start with redis:// or rediss:// (e.g. redis://127.0.0.1:6379)"
        )));
    }
    Ok(())
}

/// Before the first `rediss://` connection: install ring as rustls's crypto provider. Today
/// ring is the only provider in the tree and rustls would pick it by itself; were another
/// crate ever to enable aws-lc-rs too, rustls could no longer tell which to use and would
/// panic at the first TLS connection. A second install is refused, harmlessly.
fn install_tls_provider(url: &str) {
    if url.starts_with("rediss://") {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

impl Pool {
    /// Parses the target; connects nothing yet (the first call does).
    pub(super) fn new(
        target: &RedisTarget,
        identity: Option<&ClientIdentity>,
    ) -> Result<Self, StoreError> {
        let invalid = |e: RedisError| StoreError::Unreachable(format!("invalid Redis URL: {e}"));
        let client = match target {
            RedisTarget::Url(url) => {
                check_redis_url(url)?;
                install_tls_provider(url);
                let client = match identity {
                    Some(identity) => {
                        redis::Client::build_with_tls(url.as_str(), identity.certificates())
                            .map_err(|e| {
                                StoreError::Unreachable(format!(
                                    "the Redis client certificate or key: {e}"
                                ))
                            })?
                    }
                    None => redis::Client::open(url.as_str()).map_err(invalid)?,
                };
                Client::Single(client)
            }
            RedisTarget::Cluster(nodes) => {
                if nodes.is_empty() {
                    return Err(StoreError::Unreachable(
                        "cluster.redis_cluster_nodes is empty".into(),
                    ));
                }
                for url in nodes {
                    check_redis_url(url)?;
                    install_tls_provider(url);
                }
                let mut builder =
                    redis::cluster::ClusterClient::builder(nodes.iter().map(String::as_str));
                if let Some(identity) = identity {
                    builder = builder.certs(identity.certificates());
                }
                let client = builder
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(IO_TIMEOUT)
                    // No retries inside redis-rs: its blocking cluster connection
                    // re-sends a command whose reply timed out on the same connection
                    // (an append stored twice, and every later reply on it one off).
                    // A failed call fails here; a redirect drops the connection
                    // (`Pool::run`), and the next one maps the slots afresh.
                    .retries(0)
                    .build()
                    .map_err(invalid)?;
                Client::Cluster(client)
            }
        };
        Ok(Self {
            client,
            idle: Mutex::new(Vec::new()),
            generation: AtomicU64::new(0),
            backoff: Mutex::new(Backoff::default()),
        })
    }

    /// A new connection (not from the pool), unless a recent failure says to wait.
    pub(super) fn open(&self) -> Result<Conn, StoreError> {
        {
            let backoff = unpoisoned(self.backoff.lock());
            if let Some(until) = backoff.until {
                let now = Instant::now();
                if now < until {
                    return Err(StoreError::Unreachable(format!(
                        "{} (next try in {} ms)",
                        backoff.last_error,
                        (until - now).as_millis()
                    )));
                }
            }
        }
        let opened = match &self.client {
            Client::Single(client) => client
                .get_connection_with_timeout(CONNECT_TIMEOUT)
                .and_then(|c| {
                    c.set_read_timeout(Some(IO_TIMEOUT))?;
                    c.set_write_timeout(Some(IO_TIMEOUT))?;
                    Ok(Conn::Single(c))
                }),
            Client::Cluster(client) => client.get_connection().and_then(|c| {
                c.set_read_timeout(Some(IO_TIMEOUT))?;
                c.set_write_timeout(Some(IO_TIMEOUT))?;
                Ok(Conn::Cluster(Box::new(c)))
            }),
        };
        match opened {
            Ok(conn) => {
                *unpoisoned(self.backoff.lock()) = Backoff::default();
                Ok(conn)
            }
            Err(e) => {
                let message = format!("cannot connect to Redis: {e}");
                self.failed(&message);
                Err(StoreError::Unreachable(message))
            }
        }
    }

    /// Runs `f` on a pooled connection; `what` names the operation in the error.
    pub(super) fn run<T>(
        &self,
        what: &str,
        f: impl FnOnce(&mut dyn ConnectionLike) -> RedisResult<T>,
    ) -> Result<T, StoreError> {
        let pooled = unpoisoned(self.idle.lock()).pop();
        let (generation, mut conn) = match pooled {
            Some(pooled) => pooled,
            None => {
                // Read before connecting: a failure while we connect makes this one old.
                let generation = self.generation.load(Ordering::Acquire);
                (generation, self.open()?)
            }
        };
        match f(conn.like()) {
            Ok(value) => {
                self.give_back(generation, conn);
                Ok(value)
            }
            Err(e) => {
                let message = format!("Redis {what}: {e}");
                if e.redirect_node().is_some() {
                    // A Redis Cluster moved the slot: this connection's slot map is
                    // stale, not Redis down. It goes; the next one maps the slots afresh.
                } else if breaks_connection(&e) {
                    self.failed(&message);
                } else {
                    self.give_back(generation, conn);
                }
                Err(StoreError::Unreachable(message))
            }
        }
    }

    fn give_back(&self, generation: u64, conn: Conn) {
        let mut idle = unpoisoned(self.idle.lock());
        if idle.len() < MAX_IDLE && generation == self.generation.load(Ordering::Acquire) {
            idle.push((generation, conn));
        }
    }

    /// A connection-level failure: the idle connections are as stale as the one that
    /// failed (a restarted or dead Redis), so they go, and the fail-fast window starts
    /// (or lengthens).
    pub(super) fn failed(&self, message: &str) {
        {
            let mut idle = unpoisoned(self.idle.lock());
            self.generation.fetch_add(1, Ordering::AcqRel);
            idle.clear();
        }
        let mut backoff = unpoisoned(self.backoff.lock());
        backoff.delay = if backoff.until.is_some() {
            (backoff.delay * 2).clamp(BACKOFF_MIN, BACKOFF_MAX)
        } else {
            BACKOFF_MIN
        };
        backoff.until = Some(Instant::now() + backoff.delay);
        backoff.last_error = message.to_owned();
    }
}

/// Whether the connection is out of step or gone after `e` (else Redis answered with an
/// error and the connection can be used again).
pub(super) fn breaks_connection(e: &RedisError) -> bool {
    let answered = matches!(
        e.kind(),
        ErrorKind::Server(_)
            | ErrorKind::Extension
            | ErrorKind::UnexpectedReturnType
            | ErrorKind::Parse
    );
    !answered
        || e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_redis_urls_are_taken() {
        assert!(check_redis_url("redis://127.0.0.1:6379").is_ok());
        let wrong = check_redis_url("http://127.0.0.1:6379").unwrap_err();
        assert!(wrong.to_string().contains("redis://"), "{wrong}");
        assert!(check_redis_url("rediss://host:6380").is_ok());
    }

    #[test]
    fn a_refused_connect_fails_fast_then_tries_again() {
        // Port 1 on loopback: nothing listens there.
        let pool = Pool::new(&RedisTarget::Url("redis://127.0.0.1:1".into()), None).unwrap();
        let first = pool.open().err().unwrap().to_string();
        assert!(first.contains("cannot connect"), "{first}");
        let fast = pool.open().err().unwrap().to_string();
        assert!(fast.contains("next try in"), "{fast}");
    }
}
