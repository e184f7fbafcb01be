//! Prometheus metrics: one [`Metrics`] value per server, shared behind an `Arc`.
//!
//! This module owns the registry and the names of every metric; the rest of the server only
//! increments handles it hands out. Per-endpoint counters are resolved once at start-up so
//! the per-frame hot path touches an atomic, never the label map. It must not hold any
//! session or connection state.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

type Labels = [(&'static str, &'static str); 1];

/// The two WebSocket endpoints, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Whiteboard,
    Tutor,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Whiteboard => "whiteboard",
            Endpoint::Tutor => "tutor",
        }
    }
}

/// Counters of one endpoint, resolved from their families once.
#[derive(Clone)]
pub struct EndpointMetrics {
    pub connections: Gauge,
    pub frames_in: Counter,
    pub frames_out: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    /// Wire bytes of permessage-deflate messages (compressed payloads).
    pub compressed_bytes_in: Counter,
    pub compressed_bytes_out: Counter,
    pub rate_limited: Counter,
    /// `easel_closes_total{endpoint, code}` of this endpoint: the closes the server sent.
    closes: Family<[(&'static str, String); 2], Counter>,
    endpoint: Endpoint,
}

impl EndpointMetrics {
    /// Counts a close the server sent on this endpoint, by code.
    pub fn closed(&self, code: u16) {
        self.closes
            .get_or_create(&[
                ("endpoint", self.endpoint.as_str().to_owned()),
                ("code", code.to_string()),
            ])
            .inc();
    }
}

/// What a node of a cluster measures of Redis and of the other nodes (each node exports its
/// own: the node id is in `easel_cluster_node_info`).
pub struct ClusterMetrics {
    node_info: Family<Vec<(String, String)>, Gauge>,
    /// Round trip of a Redis PING, every second.
    pub redis_round_trip: AtomicHistogram,
    /// Time from another node's publishing an event to this node's reading it.
    pub stream_lag: AtomicHistogram,
    /// Stream reads that failed (Redis unreachable).
    pub read_failures: Counter,
    /// Events to other nodes dropped: awareness while Redis was unreachable or the queue full.
    pub events_dropped: Counter,
    /// Nodes this node found dead (heartbeat gone) and cleaned up after.
    pub nodes_gone: Counter,
    /// Compaction leases taken over from a node that held one and died.
    pub lease_takeovers: Counter,
    /// Sessions caught up from the store because the stream no longer held entries this
    /// node had not read (another node's version trimmed them first).
    pub catch_ups: Counter,
    /// 1 while Redis answers, 0 while it does not.
    pub redis_up: Gauge,
}

impl ClusterMetrics {
    fn register(registry: &mut Registry) -> Self {
        let node_info = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register(
            "cluster_node_info",
            "This node's id in cluster mode (value 1)",
            node_info.clone(),
        );
        let redis_round_trip = AtomicHistogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "redis_round_trip_seconds",
            "Round trip of a Redis PING (cluster mode)",
            redis_round_trip.clone(),
        );
        let stream_lag = AtomicHistogram::new(exponential_buckets(0.000_1, 2.0, 16));
        registry.register(
            "cluster_stream_lag_seconds",
            "Time from another node's publishing an event to this node's reading it",
            stream_lag.clone(),
        );
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let read_failures = counter(
            registry,
            "cluster_read_failures",
            "Stream reads from Redis that failed",
        );
        let events_dropped = counter(
            registry,
            "cluster_events_dropped",
            "Events to other nodes dropped (awareness while Redis was unreachable)",
        );
        let nodes_gone = counter(
            registry,
            "cluster_nodes_gone",
            "Nodes found dead (heartbeat expired) and cleaned up after",
        );
        let lease_takeovers = counter(
            registry,
            "cluster_lease_takeovers",
            "Compaction leases taken over from a dead node",
        );
        let catch_ups = counter(
            registry,
            "cluster_catch_ups",
            "Sessions caught up from the store after entries were trimmed before this node read them",
        );
        let redis_up = Gauge::default();
        registry.register(
            "redis_up",
            "1 while Redis answers, 0 while it does not (cluster mode)",
            redis_up.clone(),
        );
        Self {
            node_info,
            redis_round_trip,
            stream_lag,
            read_failures,
            events_dropped,
            nodes_gone,
            lease_takeovers,
            catch_ups,
            redis_up,
        }
    }

    /// Names this node in the metrics.
    pub fn set_node(&self, node: &str) {
        self.node_info
            .get_or_create(&vec![("node".to_owned(), node.to_owned())])
            .set(1);
    }
}

pub struct Metrics {
    registry: Registry,
    pub whiteboard: EndpointMetrics,
    pub tutor: EndpointMetrics,
    pub sessions_loaded: Gauge,
    pub updates_applied: Counter,
    pub updates_rejected: Counter,
    pub chat_messages: Counter,
    auth_failures: Family<Labels, Counter>,
    pub relay_latency: AtomicHistogram,
    pub snapshot_duration: AtomicHistogram,
    /// Cluster mode (SPEC 9); zero on a single node.
    pub cluster: ClusterMetrics,
    pub store_decode_errors: Counter,
    /// 1 while the store takes writes, 0 while it refuses them (disk full, I/O error).
    pub store_writable: Gauge,
    /// Times the store stopped taking writes.
    pub store_write_failures: Counter,
    /// Whiteboard protocol messages received (a frame may pack many).
    pub whiteboard_messages_in: Counter,
    /// Tutor messages refused with `too_large` (text, client_id, event name or data).
    pub tutor_too_large: Counter,
    /// Chat history frames sent (a history may take several pages).
    pub history_pages: Counter,
    limit_refusals: Family<[(&'static str, &'static str); 1], Counter>,
    /// Whiteboard input refused by the update guard (SPEC.md 7.1), by reason.
    pub guard_refusals: GuardRefusals,
    pub updates_rolled_back: Counter,
    /// Times a whiteboard reader stopped reading to wait for the sequencer, by reason.
    pub reader_waits: ReaderWaits,
    /// Relays handed to the connections in one batch (see `Board::end_batch`), and the
    /// messages they held: their ratio is the mean batch, which grows with the load.
    pub relay_batches: Counter,
    pub relay_batch_messages: Counter,
    /// Whiteboard log appends (one store entry each, see `Board::append`), and the updates
    /// they held: a batch ends at 16 updates or 64 KiB of them.
    pub log_appends: Counter,
    pub log_appended_updates: Counter,
    /// Join answers (full sync step 2s) prepared ahead of a join storm on boards at rest
    /// (`session::prepare`).
    pub join_answers_prepared: Counter,
}

/// `easel_whiteboard_reader_waits_total{reason}`, resolved once: why a whiteboard reader
/// stopped reading its client for a while. None of these refuses anything; a count that
/// grows with the load says the sequencer is the bottleneck.
#[derive(Clone)]
pub struct ReaderWaits {
    /// The connection had its most updates in flight (`MAX_IN_FLIGHT`).
    pub in_flight: Counter,
    /// The session's sequencer queue was full.
    pub queue_full: Counter,
    /// A sync step 1 waited for the client's updates before it (its step 2 holds them).
    pub step1: Counter,
}

/// `easel_guard_refusals_total{reason}`, resolved once.
#[derive(Clone)]
pub struct GuardRefusals {
    /// Truncated bytes, lengths past the end, unknown tags.
    pub malformed: Counter,
    /// Values or shared types nested past `limits.max_nesting`.
    pub too_deep: Counter,
    /// A document past `limits.max_doc_bytes`.
    pub doc_size: Counter,
    /// Pending updates past `limits.max_pending_bytes`.
    pub pending: Counter,
    /// Awareness past its per-connection, per-session or per-state bounds.
    pub awareness: Counter,
}

impl GuardRefusals {
    /// Counts a guard error under its reason.
    pub fn count(&self, e: &crate::doc::guard::GuardError) {
        use crate::doc::guard::GuardError;
        match e {
            GuardError::Malformed(_) => self.malformed.inc(),
            GuardError::TooDeep { .. } => self.too_deep.inc(),
            GuardError::TooLarge { .. } => self.doc_size.inc(),
        };
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Registers a counter family labelled `reason` and returns what resolves one of its
/// counters (once, at start-up: the hot path then holds the counter itself).
fn by_reason(registry: &mut Registry, name: &str, help: &str) -> impl Fn(&'static str) -> Counter {
    let family = Family::<Labels, Counter>::default();
    registry.register(name, help, family.clone());
    move |r| family.get_or_create_owned(&[("reason", r)])
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("easel");
        let connections = Family::<Labels, Gauge>::default();
        let frames_in = Family::<Labels, Counter>::default();
        let frames_out = Family::<Labels, Counter>::default();
        let bytes_in = Family::<Labels, Counter>::default();
        let bytes_out = Family::<Labels, Counter>::default();
        let rate_limited = Family::<Labels, Counter>::default();
        let compressed_in = Family::<Labels, Counter>::default();
        let compressed_out = Family::<Labels, Counter>::default();
        registry.register(
            "compressed_bytes_in",
            "WebSocket payload bytes received compressed (permessage-deflate), as on the wire",
            compressed_in.clone(),
        );
        registry.register(
            "compressed_bytes_out",
            "WebSocket payload bytes sent compressed (permessage-deflate), as on the wire",
            compressed_out.clone(),
        );
        registry.register(
            "deflate_compressions",
            "Outgoing messages compressed (permessage-deflate); once per message, however many receive it",
            crate::ws::deflate::compressions().clone(),
        );
        registry.register(
            "connections",
            "Open WebSocket connections",
            connections.clone(),
        );
        registry.register("frames_in", "WebSocket frames received", frames_in.clone());
        registry.register("frames_out", "WebSocket frames sent", frames_out.clone());
        registry.register(
            "bytes_in",
            "WebSocket payload bytes received",
            bytes_in.clone(),
        );
        registry.register(
            "bytes_out",
            "WebSocket payload bytes sent",
            bytes_out.clone(),
        );
        registry.register(
            "rate_limited",
            "Frames refused or dropped by a rate limit",
            rate_limited.clone(),
        );
        let closes = Family::<[(&'static str, String); 2], Counter>::default();
        registry.register(
            "closes",
            "Connections closed by the server, by endpoint and close code",
            closes.clone(),
        );
        let endpoint = |e: Endpoint| {
            let l = [("endpoint", e.as_str())];
            EndpointMetrics {
                connections: connections.get_or_create_owned(&l),
                frames_in: frames_in.get_or_create_owned(&l),
                frames_out: frames_out.get_or_create_owned(&l),
                bytes_in: bytes_in.get_or_create_owned(&l),
                bytes_out: bytes_out.get_or_create_owned(&l),
                compressed_bytes_in: compressed_in.get_or_create_owned(&l),
                compressed_bytes_out: compressed_out.get_or_create_owned(&l),
                rate_limited: rate_limited.get_or_create_owned(&l),
                closes: closes.clone(),
                endpoint: e,
            }
        };
        let whiteboard = endpoint(Endpoint::Whiteboard);
        let tutor = endpoint(Endpoint::Tutor);

        let sessions_loaded = Gauge::default();
        registry.register(
            "sessions_loaded",
            "Sessions held in memory",
            sessions_loaded.clone(),
        );
        let updates_applied = Counter::default();
        registry.register(
            "updates_applied",
            "Yjs updates applied to a session document",
            updates_applied.clone(),
        );
        let updates_rejected = Counter::default();
        registry.register(
            "updates_rejected",
            "Yjs updates refused (undecodable, rejected by yrs, or from a viewer)",
            updates_rejected.clone(),
        );
        let chat_messages = Counter::default();
        registry.register(
            "chat_messages",
            "Chat messages stored",
            chat_messages.clone(),
        );
        let auth_failures = Family::<Labels, Counter>::default();
        registry.register(
            "auth_failures",
            "Refused requests by reason",
            auth_failures.clone(),
        );
        let relay_latency = AtomicHistogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "relay_latency_seconds",
            "Time from an update's arrival on its session's sequencer queue to its relay being queued for every receiver (after the batch's append)",
            relay_latency.clone(),
        );
        let snapshot_duration = AtomicHistogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "snapshot_duration_seconds",
            "Time to encode and store a snapshot",
            snapshot_duration.clone(),
        );
        let cluster = ClusterMetrics::register(&mut registry);
        let store_decode_errors = Counter::default();
        registry.register(
            "store_decode_errors",
            "Stored records that did not decode and were skipped",
            store_decode_errors.clone(),
        );
        let reason = by_reason(
            &mut registry,
            "guard_refusals",
            "Whiteboard input refused by the update guard, by reason",
        );
        let guard_refusals = GuardRefusals {
            malformed: reason("malformed"),
            too_deep: reason("too_deep"),
            doc_size: reason("doc_size"),
            pending: reason("pending"),
            awareness: reason("awareness"),
        };
        let reason = by_reason(
            &mut registry,
            "whiteboard_reader_waits",
            "Times a whiteboard reader stopped reading to wait for the session's sequencer, by reason",
        );
        let reader_waits = ReaderWaits {
            in_flight: reason("in_flight"),
            queue_full: reason("queue_full"),
            step1: reason("step1"),
        };
        let relay_batches = Counter::default();
        registry.register(
            "relay_batches",
            "Batches of relays handed to a session's connections (one queue lock and one wake-up each)",
            relay_batches.clone(),
        );
        let relay_batch_messages = Counter::default();
        registry.register(
            "relay_batch_messages",
            "Messages relayed in those batches",
            relay_batch_messages.clone(),
        );
        let log_appends = Counter::default();
        registry.register(
            "whiteboard_log_appends",
            "Appends to whiteboard logs (one store entry each: a batch of updates)",
            log_appends.clone(),
        );
        let log_appended_updates = Counter::default();
        registry.register(
            "whiteboard_log_appended_updates",
            "Updates in those appends",
            log_appended_updates.clone(),
        );
        let join_answers_prepared = Counter::default();
        registry.register(
            "whiteboard_join_answers_prepared",
            "Join answers of large boards at rest encoded and compressed ahead of their joiners",
            join_answers_prepared.clone(),
        );
        let updates_rolled_back = Counter::default();
        registry.register(
            "updates_rolled_back",
            "Updates refused after they began to integrate; the document was rebuilt from the store",
            updates_rolled_back.clone(),
        );
        let limit_refusals = Family::default();
        registry.register(
            "limit_refusals",
            "Requests refused or cut off by a limit of SPEC 7.1, by limit",
            limit_refusals.clone(),
        );
        let whiteboard_messages_in = Counter::default();
        registry.register(
            "whiteboard_messages_in",
            "Whiteboard protocol messages received (a frame may pack several)",
            whiteboard_messages_in.clone(),
        );
        let tutor_too_large = Counter::default();
        registry.register(
            "tutor_too_large",
            "Tutor messages refused as too large (text, client_id, event name or data)",
            tutor_too_large.clone(),
        );
        let history_pages = Counter::default();
        registry.register(
            "history_pages",
            "Chat history frames sent, a page each",
            history_pages.clone(),
        );
        let store_writable = Gauge::default();
        registry.register(
            "store_writable",
            "1 while the store takes writes, 0 while it refuses them (see /readyz for why)",
            store_writable.clone(),
        );
        let store_write_failures = Counter::default();
        registry.register(
            "store_write_failures",
            "Times the store stopped taking writes (disk full, I/O error)",
            store_write_failures.clone(),
        );
        Self {
            limit_refusals,
            registry,
            whiteboard,
            tutor,
            sessions_loaded,
            updates_applied,
            updates_rejected,
            chat_messages,
            auth_failures,
            relay_latency,
            snapshot_duration,
            cluster,
            store_decode_errors,
            guard_refusals,
            updates_rolled_back,
            reader_waits,
            relay_batches,
            relay_batch_messages,
            log_appends,
            log_appended_updates,
            join_answers_prepared,
            whiteboard_messages_in,
            tutor_too_large,
            history_pages,
            store_writable,
            store_write_failures,
        }
    }

    pub fn endpoint(&self, e: Endpoint) -> &EndpointMetrics {
        match e {
            Endpoint::Whiteboard => &self.whiteboard,
            Endpoint::Tutor => &self.tutor,
        }
    }

    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// One refusal by a hostile-input limit; `limit` is a stable label value
    /// (`long_polls_per_user`, `http_timeout`, `state_vector`, ...).
    pub fn limit_refused(&self, limit: &'static str) {
        self.limit_refusals.get_or_create(&[("limit", limit)]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// A Prometheus histogram that observes without a lock: a fixed set of buckets, each an
/// `AtomicU64`, and the sum as whole nanoseconds in another. prometheus-client's own
/// `Histogram` takes a mutex per observation, and the relay observes one per update from
/// every worker at once (issue #13). Encoded exactly as that `Histogram` with the same
/// bounds is (name, `le` labels, a closing `+Inf` bucket, `_sum` in seconds, `_count`).
///
/// The count is the buckets' total, so `_count` always equals the `+Inf` bucket; a scrape
/// during observations may see the sum and the buckets one observation apart, as any
/// lock-free exporter may. Cloning shares the same counts (as `Histogram` does).
#[derive(Debug, Clone)]
pub struct AtomicHistogram {
    inner: Arc<HistogramCells>,
}

#[derive(Debug)]
struct HistogramCells {
    /// Upper bounds, ascending, the last one `+Inf`.
    bounds: Box<[f64]>,
    /// Observations per bucket (not cumulative), one per bound.
    counts: Box<[AtomicU64]>,
    /// Sum of the observed values, in nanoseconds (values are seconds).
    sum_nanos: AtomicU64,
}

impl AtomicHistogram {
    /// Buckets with these upper bounds (non-finite ones dropped) and `+Inf`, as
    /// `prometheus_client::metrics::histogram::Histogram::new` makes them.
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let bounds: Box<[f64]> = bounds
            .into_iter()
            .filter(|b| b.is_finite())
            .chain(std::iter::once(f64::INFINITY))
            .collect();
        let counts = bounds.iter().map(|_| AtomicU64::new(0)).collect();
        Self {
            inner: Arc::new(HistogramCells {
                bounds,
                counts,
                sum_nanos: AtomicU64::new(0),
            }),
        }
    }

    /// Records one value, in seconds. A value that is not a number counts in `+Inf`, as in
    /// prometheus-client; a negative or not finite one adds nothing to the sum.
    pub fn observe(&self, seconds: f64) {
        let cells = &*self.inner;
        let last = cells.bounds.len() - 1;
        let i = if seconds.is_nan() {
            last
        } else {
            // At most 17 bounds: a linear scan beats a binary search's branches here.
            cells
                .bounds
                .iter()
                .position(|b| seconds <= *b)
                .unwrap_or(last)
        };
        cells.counts[i].fetch_add(1, Ordering::Relaxed);
        if seconds.is_finite() && seconds > 0.0 {
            // `as` saturates: a value past 584 years adds u64::MAX nanoseconds.
            let nanos = (seconds * 1e9).round() as u64;
            cells.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        }
    }

    /// The sum (seconds), the count and the buckets (upper bound, observations in that
    /// bucket alone), as the encoder takes them.
    fn read(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let cells = &*self.inner;
        let buckets: Vec<(f64, u64)> = cells
            .bounds
            .iter()
            .zip(cells.counts.iter())
            .map(|(b, n)| (*b, n.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = cells.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, count, buckets)
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.read();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::histogram::Histogram;

    /// The lock-free histogram is exposed exactly as prometheus-client's own with the same
    /// bounds and observations: same name, same `le` labels, same counts and sum.
    #[test]
    fn atomic_histogram_encodes_as_prometheus_clients_histogram() {
        let bounds = || exponential_buckets(0.000_05, 2.0, 16);
        let ours = AtomicHistogram::new(bounds());
        let theirs = Histogram::new(bounds());
        let values = [
            0.0,
            0.000_01,
            0.000_05,
            0.000_050_1,
            0.000_3,
            0.001,
            0.25,
            1.5,
            2.0,
            9.0,
            1e6,
        ];
        for v in values {
            ours.observe(v);
            theirs.observe(v);
        }
        let render = |register: &dyn Fn(&mut Registry)| {
            let mut registry = Registry::with_prefix("easel");
            register(&mut registry);
            let mut out = String::new();
            encode(&mut out, &registry).expect("encode");
            out
        };
        let a = render(&|r| r.register("relay_latency_seconds", "help", ours.clone()));
        let b = render(&|r| r.register("relay_latency_seconds", "help", theirs.clone()));
        // The sums are added differently (whole nanoseconds against f64s): equal to 1 ns.
        let without_sum = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.contains("_sum"))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(without_sum(&a), without_sum(&b));
        let sum = |t: &str| -> f64 {
            t.lines()
                .find_map(|l| l.strip_prefix("easel_relay_latency_seconds_sum "))
                .and_then(|v| v.parse().ok())
                .expect("a _sum line")
        };
        assert!((sum(&a) - sum(&b)).abs() < 1e-9 * sum(&b), "{a}\n{b}");
        assert!(a.contains("easel_relay_latency_seconds_bucket{le=\"+Inf\"} 11"));
        assert!(a.contains("easel_relay_latency_seconds_count 11"));
    }

    #[test]
    fn atomic_histogram_counts_from_many_threads_without_losing_any() {
        let h = AtomicHistogram::new(exponential_buckets(0.001, 2.0, 4));
        std::thread::scope(|s| {
            for t in 0..4 {
                let h = h.clone();
                s.spawn(move || {
                    for i in 0..10_000u64 {
                        h.observe(((i + t) % 20) as f64 * 0.001);
                    }
                });
            }
        });
        let (sum, count, buckets) = h.read();
        assert_eq!(count, 40_000);
        assert_eq!(buckets.iter().map(|(_, n)| n).sum::<u64>(), 40_000);
        // Each thread observes 0..=19 ms 500 times each: 4 * 500 * 190 ms = 380 s.
        assert!((sum - 380.0).abs() < 1e-6, "{sum}");
    }
}
