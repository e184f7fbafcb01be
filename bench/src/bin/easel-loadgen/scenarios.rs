//! How a plan runs against one server: connecting the clients, the fan-out ramp, the idle
//! stages and the join storm, and the figures each reports (latency windows, CPU, RSS,
//! wire bytes), with the storm's side-by-side comparison of easel and the trivial server.
//! One file of ~850 lines: the three runs share `Run` (connect, settle, finish) and its
//! samples, and split apart they would each need its private parts.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::{sleep, sleep_until, Instant};
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{ReadTxn, StateVector, Transact};

use easel_bench::workload;

use crate::client::{self, ApplyMode, ClientSpec, ClientStats, Counters, Phase, Shared, Step};
use crate::plan::Plan;
use crate::stats::{self, r3, Summary};
use crate::target::{Kind, Target};

/// (send time, latency) pairs, in µs.
pub(crate) type Samples = Vec<(u64, u32)>;

/// The join storm's tutor writes the board in updates of about this size.
const TUTOR_CHUNK: usize = 1 << 20;

/// Everything one run against one server needs.
pub(crate) struct Run<'a> {
    pub(crate) plan: &'a Plan,
    pub(crate) target: &'a mut Target,
    pub(crate) tag: String,
    pub(crate) counters: Arc<Counters>,
    pub(crate) phase: watch::Sender<Phase>,
    pub(crate) clients: Vec<(ClientSpec, Shared)>,
    pub(crate) handles: Vec<tokio::task::JoinHandle<()>>,
    pub(crate) deadline: Instant,
}

pub(crate) fn token(secret: &str, sub: &str, session: &str) -> anyhow::Result<String> {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 6 * 3600;
    let claims = json!({ "sub": sub, "exp": exp, "sid": session, "role": "student" });
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

impl<'a> Run<'a> {
    pub(crate) fn new(plan: &'a Plan, target: &'a mut Target, budget: Duration) -> Self {
        let (phase, _) = watch::channel(Phase::Setup);
        Self {
            plan,
            target,
            tag: format!("lg{}", std::process::id()),
            counters: Arc::new(Counters::default()),
            phase,
            clients: Vec::new(),
            handles: Vec::new(),
            deadline: Instant::now() + budget,
        }
    }

    fn session_id(&self, s: u32) -> String {
        format!("{}-s{s}", self.tag)
    }

    fn spec(
        &self,
        session: u32,
        index: u32,
        clients_in_session: u32,
    ) -> anyhow::Result<ClientSpec> {
        let p = self.plan;
        let sid = self.session_id(session);
        // Round-robin over the nodes, counted over the whole run: a session's clients
        // land on different nodes.
        let base = self
            .target
            .base_for(u64::from(session) * u64::from(clients_in_session) + u64::from(index));
        let url = match self.target.kind {
            // The trivial server ignores the token; it is there so that its joiners send
            // the same upgrade request as easel's.
            Kind::Easel | Kind::Trivial => format!(
                "{base}/ws/v2/session/{sid}/whiteboard?token={}",
                token(&self.target.secret, &format!("{sid}-u{index}"), &sid)?
            ),
            Kind::Baseline => format!("{base}/ws/v2/session/{sid}/whiteboard"),
        };
        Ok(ClientSpec {
            url,
            kind: self.target.kind,
            session,
            index,
            clients_in_session,
            writer: (index < p.writers).then_some(index),
            aware: (index < p.aw_clients).then_some(index),
            n_writers: p.writers,
            n_aware: p.aw_clients,
            points: workload::points_for_payload(p.payload),
            keep_strokes: p.keep_strokes,
            apply: p.apply,
            join_awareness: p.join_awareness,
            hash_step2: false,
            offer_deflate: p.offer_deflate,
            seed_bytes: 0,
            seed_chunk: TUTOR_CHUNK,
            connect_timeout: Duration::from_secs(15),
            sync_timeout: Duration::from_secs(60),
            deadline: self.deadline,
        })
    }

    fn spawn(&mut self, spec: ClientSpec) {
        let stats: Shared = Arc::new(std::sync::Mutex::new(ClientStats::default()));
        let h = tokio::spawn(client::run(
            spec.clone(),
            stats.clone(),
            self.counters.clone(),
            self.phase.subscribe(),
        ));
        self.clients.push((spec, stats));
        self.handles.push(h);
    }

    fn settled(&self) -> usize {
        self.counters.synced.load(Ordering::Acquire) + self.counters.failed.load(Ordering::Acquire)
    }

    /// Spawns clients at most `concurrency` connecting at once; waits until every one is
    /// synced or failed.
    async fn connect_all(
        &mut self,
        specs: Vec<ClientSpec>,
        concurrency: usize,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let until = Instant::now() + limit;
        let target = self.clients.len() + specs.len();
        for spec in specs {
            while self.clients.len() - self.settled() >= concurrency.max(1) {
                if Instant::now() > until {
                    bail!("connecting took longer than {limit:?}");
                }
                sleep(Duration::from_millis(1)).await;
            }
            self.spawn(spec);
        }
        while self.settled() < target {
            if Instant::now() > until {
                bail!(
                    "only {} of {target} clients synced within {limit:?}",
                    self.counters.synced.load(Ordering::Acquire)
                );
            }
            sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    fn errors(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (_, s) in &self.clients {
            out.extend(
                s.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .errors
                    .iter()
                    .cloned(),
            );
        }
        out
    }

    fn connect_summary(&self) -> (Summary, Summary) {
        let mut connect = Vec::new();
        let mut sync = Vec::new();
        for (_, s) in &self.clients {
            let s = s.lock().unwrap_or_else(|e| e.into_inner());
            connect.extend(s.connect_us);
            sync.extend(s.synced_us);
        }
        (Summary::of_us(&mut connect), Summary::of_us(&mut sync))
    }

    /// Takes every latency sample recorded so far.
    fn take_samples(&self) -> (Samples, Samples) {
        let mut upd = Vec::new();
        let mut aw = Vec::new();
        for (_, s) in &self.clients {
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            upd.append(&mut s.upd);
            aw.append(&mut s.aw);
        }
        (upd, aw)
    }

    /// Tells every client to stop, waits for them (bounded), checks convergence.
    async fn finish(&mut self) -> (bool, usize, Vec<String>) {
        self.phase.send_replace(Phase::Finish);
        let until = Instant::now() + Duration::from_secs(60);
        for h in self.handles.drain(..) {
            let left = until.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, h).await.is_err() {
                break;
            }
        }
        let mut by_session: std::collections::BTreeMap<u32, Vec<Option<u64>>> = Default::default();
        for (spec, s) in &self.clients {
            let s = s.lock().unwrap_or_else(|e| e.into_inner());
            if spec.keeps_document() {
                by_session.entry(spec.session).or_default().push(s.digest);
            }
        }
        let mut problems = Vec::new();
        for (session, digests) in &by_session {
            let first = digests.first().copied().flatten();
            if first.is_none() || digests.iter().any(|d| *d != first) {
                let distinct: std::collections::BTreeSet<_> = digests.iter().flatten().collect();
                let missing = digests.iter().filter(|d| d.is_none()).count();
                problems.push(format!(
                    "session {session}: {} clients, {} distinct document states, {missing} without one",
                    digests.len(),
                    distinct.len()
                ));
            }
        }
        (problems.is_empty(), by_session.len(), problems)
    }
}

pub(crate) fn self_cpu() -> f64 {
    stats::proc_sample(std::process::id())
        .map(|s| s.cpu_s)
        .unwrap_or(0.0)
}

/// Latency and throughput of one measured window.
pub(crate) fn window_figures(samples: &[(u64, u32)], from_us: u64, to_us: u64) -> (Summary, u64) {
    let mut lat: Vec<u32> = samples
        .iter()
        .filter(|(t, _)| *t >= from_us && *t < to_us)
        .map(|(_, l)| *l)
        .collect();
    let received = samples
        .iter()
        .filter(|(t, l)| {
            let r = t + *l as u64;
            r >= from_us && r < to_us
        })
        .count() as u64;
    (Summary::of_us(&mut lat), received)
}

pub(crate) async fn run_fanout(
    run: &mut Run<'_>,
    ramp: Option<Vec<f64>>,
    p99_limit_ms: f64,
) -> anyhow::Result<Value> {
    let p = run.plan.clone();
    let mut specs = Vec::new();
    for s in 0..p.sessions {
        for i in 0..p.clients {
            specs.push(run.spec(s, i, p.clients)?);
        }
    }
    let total = specs.len();
    let setup_started = Instant::now();
    run.connect_all(specs, p.concurrency, Duration::from_secs(120))
        .await?;
    let setup_s = setup_started.elapsed().as_secs_f64();
    let (connect, sync) = run.connect_summary();
    if !run.plan.name.is_empty() {
        eprintln!(
            "  {} clients connected in {:.2} s; connect {}; synced {}",
            total,
            setup_s,
            connect.line(),
            sync.line()
        );
    }
    let rates = ramp.clone().unwrap_or_else(|| vec![p.rate]);
    let mut steps = Vec::new();
    let mut all_lost = 0i64;
    let mut knee: Option<usize> = None;
    for (i, rate) in rates.iter().enumerate() {
        let start = Instant::now() + Duration::from_millis(200);
        let measure_from = start + Duration::from_secs_f64(p.warmup);
        let end = measure_from + Duration::from_secs_f64(p.duration);
        if end + Duration::from_secs_f64(p.drain) > run.deadline {
            bail!("the run would pass its time budget");
        }
        let c = &run.counters;
        let before = (
            c.expected_upd.load(Ordering::Acquire),
            c.received_upd.load(Ordering::Acquire),
            c.expected_aw.load(Ordering::Acquire),
            c.received_aw.load(Ordering::Acquire),
            c.sent_upd.load(Ordering::Acquire),
            c.sent_aw.load(Ordering::Acquire),
            c.bytes_sent.load(Ordering::Acquire),
            c.coalesced_aw.load(Ordering::Acquire),
        );
        let senders_done_before = c.senders_done.load(Ordering::Acquire);
        run.phase.send_replace(Phase::Run(Step {
            rate: *rate,
            aw_rate: p.aw_rate,
            start,
            end,
        }));
        sleep_until(measure_from).await;
        let srv0 = run.target.sample();
        let redis0 = run.target.redis_sample();
        let me0 = self_cpu();
        sleep_until(end).await;
        let srv1 = run.target.sample();
        let redis1 = run.target.redis_sample();
        let me1 = self_cpu();
        // Drain: every client has sent all it had to send, and every expected delivery
        // arrived; or the timeout.
        let drain_until = Instant::now() + Duration::from_secs_f64(p.drain);
        loop {
            let c = &run.counters;
            let alive = run.clients.len() - c.failed.load(Ordering::Acquire);
            let done = c.senders_done.load(Ordering::Acquire) - senders_done_before >= alive
                && c.received_upd.load(Ordering::Acquire) >= c.expected_upd.load(Ordering::Acquire)
                && c.received_aw.load(Ordering::Acquire) >= c.expected_aw.load(Ordering::Acquire);
            if done || Instant::now() > drain_until || c.failed.load(Ordering::Acquire) > 0 {
                break;
            }
            sleep(Duration::from_millis(5)).await;
        }
        let drained_after = end.elapsed().as_secs_f64();
        // Let deferred updates be applied before the next step measures anything.
        if p.apply != ApplyMode::Live && i + 1 < rates.len() {
            let acks = run.counters.settle_acks.load(Ordering::Acquire);
            run.phase.send_replace(Phase::Settle);
            let until = Instant::now() + Duration::from_secs(120);
            loop {
                let c = &run.counters;
                let alive = run.clients.len() - c.failed.load(Ordering::Acquire);
                if c.settle_acks.load(Ordering::Acquire) - acks >= alive || Instant::now() > until {
                    break;
                }
                sleep(Duration::from_millis(5)).await;
            }
        }
        let c = &run.counters;
        let expected_upd = c.expected_upd.load(Ordering::Acquire) - before.0;
        let received_upd = c.received_upd.load(Ordering::Acquire) - before.1;
        let expected_aw = c.expected_aw.load(Ordering::Acquire) - before.2;
        let received_aw = c.received_aw.load(Ordering::Acquire) - before.3;
        let sent_upd = c.sent_upd.load(Ordering::Acquire) - before.4;
        let sent_aw = c.sent_aw.load(Ordering::Acquire) - before.5;
        let update_bytes = c.bytes_sent.load(Ordering::Acquire) - before.6;
        let coalesced_aw = c.coalesced_aw.load(Ordering::Acquire) - before.7;
        let (upd, aw) = run.take_samples();
        let (from_us, to_us) = (client::us_of(measure_from), client::us_of(end));
        let (upd_lat, upd_recv_in_window) = window_figures(&upd, from_us, to_us);
        let (aw_lat, aw_recv_in_window) = window_figures(&aw, from_us, to_us);
        let window = p.duration;
        let deliveries_in_window = upd_recv_in_window + aw_recv_in_window;
        let server_cpu = match (srv0, srv1) {
            (Some(a), Some(b)) => Some(b.cpu_s - a.cpu_s),
            _ => None,
        };
        let redis_cpu = match (redis0, redis1) {
            (Some(a), Some(b)) => Some(b.cpu_s - a.cpu_s),
            _ => None,
        };
        // Updates written in the measured window (the offered rate: every writer keeps its
        // schedule), the denominator of the per-update costs.
        let updates_in_window = (rate * (p.writers * p.sessions) as f64 * window).max(1.0);
        let lost =
            (expected_upd as i64 - received_upd as i64) + (expected_aw as i64 - received_aw as i64);
        all_lost += lost;
        // This tool at ≥ 95 % of the CPUs it may run on: its own queues are then in the
        // latencies, and a step that fails may be its limit, not the server's.
        let loadgen_saturated = me1 - me0 >= 0.95 * stats::usable_cpus() as f64 * window;
        let step = json!({
            "rate_per_writer": rate,
            "updates_per_s_offered": rate * (p.writers * p.sessions) as f64,
            "awareness_per_s_offered": p.aw_rate * (p.aw_clients * p.sessions) as f64,
            "updates_sent": sent_upd,
            "update_frame_bytes_avg": update_bytes / sent_upd.max(1),
            "awareness_sent": sent_aw,
            "update_deliveries_expected": expected_upd,
            "update_deliveries_received": received_upd,
            "awareness_deliveries_expected": expected_aw,
            "awareness_deliveries_received": received_aw,
            "awareness_coalesced": coalesced_aw,
            "lost": lost,
            "drained_after_s": r3(drained_after),
            "update_latency": upd_lat.to_json(),
            "awareness_latency": aw_lat.to_json(),
            "update_deliveries_per_s": r3(upd_recv_in_window as f64 / window),
            "awareness_deliveries_per_s": r3(aw_recv_in_window as f64 / window),
            "deliveries_per_s": r3(deliveries_in_window as f64 / window),
            "server_cpu_s": server_cpu.map(r3),
            "server_cpu_us_per_delivery": server_cpu.map(|c| r3(c * 1e6 / deliveries_in_window.max(1) as f64)),
            "server_cpu_us_per_update": server_cpu.map(|c| r3(c * 1e6 / updates_in_window)),
            "server_rss_kib": srv1.map(|s| s.rss_kib),
            "redis_cpu_s": redis_cpu.map(r3),
            "redis_cpu_us_per_update": redis_cpu.map(|c| r3(c * 1e6 / updates_in_window)),
            "loadgen_cpu_s": r3(me1 - me0),
            "loadgen_saturated": loadgen_saturated,
        });
        eprintln!(
            "  step {}: {}/s per writer ({} updates/s, {} cursors/s): {} update deliveries/s, {} cursor deliveries/s, lost {lost}",
            i + 1,
            rate,
            rate * (p.writers * p.sessions) as f64,
            p.aw_rate * (p.aw_clients * p.sessions) as f64,
            (upd_recv_in_window as f64 / window).round(),
            (aw_recv_in_window as f64 / window).round(),
        );
        eprintln!("    updates: {}", upd_lat.line());
        if aw_lat.n > 0 {
            eprintln!(
                "    cursors: {} ({coalesced_aw} states superseded within a tick)",
                aw_lat.line()
            );
        }
        if let Some(cpu) = server_cpu {
            eprintln!(
                "    server CPU {:.2} s in {:.0} s ({:.2} µs per delivery, {:.1} µs per update); load generator CPU {:.2} s",
                cpu,
                window,
                cpu * 1e6 / deliveries_in_window.max(1) as f64,
                cpu * 1e6 / updates_in_window,
                me1 - me0
            );
            if loadgen_saturated {
                eprintln!("    the load generator was saturated: this step measures it too");
            }
        }
        if let Some(cpu) = redis_cpu {
            eprintln!(
                "    Redis CPU {:.2} s ({:.1} µs per update)",
                cpu,
                cpu * 1e6 / updates_in_window
            );
        }
        steps.push(step);
        if c.failed.load(Ordering::Acquire) > 0 {
            break;
        }
        if ramp.is_some() && (upd_lat.p99.max(aw_lat.p99) > p99_limit_ms || lost > 0) {
            knee = Some(i);
            break;
        }
    }
    let (converged, sessions_checked, problems) = run.finish().await;
    let errors = run.errors();
    let end_sample = run.target.sample();
    let out_of_order: u64 = run
        .clients
        .iter()
        .map(|(_, s)| s.lock().unwrap_or_else(|e| e.into_inner()).out_of_order)
        .sum();
    let mut report = json!({
        "clients": total,
        "setup_s": r3(setup_s),
        "connect": connect.to_json(),
        "synced": sync.to_json(),
        "steps": steps,
        "lost": all_lost,
        "out_of_order": out_of_order,
        "converged": converged,
        "sessions_checked": sessions_checked,
        "convergence_problems": problems,
        "server_peak_rss_kib": end_sample.map(|s| s.hwm_kib),
        "server_cpu_s_total": end_sample.map(|s| r3(s.cpu_s)),
        "errors": errors.iter().take(20).collect::<Vec<_>>(),
        "error_count": errors.len(),
        "ok": converged && all_lost == 0 && out_of_order == 0 && errors.is_empty(),
    });
    if let Some(ramp) = ramp {
        let steps = report["steps"].as_array().cloned().unwrap_or_default();
        let sustained = steps
            .iter()
            .filter(|s| {
                s["update_latency"]["p99_ms"].as_f64().unwrap_or(f64::MAX) <= p99_limit_ms
                    && s["lost"].as_i64() == Some(0)
            })
            .max_by(|a, b| {
                a["deliveries_per_s"]
                    .as_f64()
                    .partial_cmp(&b["deliveries_per_s"].as_f64())
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
            .cloned();
        report["saturation"] = json!({
            "p99_limit_ms": p99_limit_ms,
            "ramp": ramp,
            "reached": knee.is_some(),
            "knee_step": knee.map(|k| steps[k].clone()),
            "knee_loadgen_saturated": knee.map(|k| steps[k]["loadgen_saturated"] == json!(true)),
            "best_under_limit": sustained,
        });
    }
    Ok(report)
}

pub(crate) async fn run_idle(run: &mut Run<'_>, stages: Vec<u32>) -> anyhow::Result<Value> {
    let p = run.plan.clone();
    let needed = *stages.iter().max().unwrap_or(&0) as u64;
    if let Some(limit) = stats::nofile_limit() {
        if limit < needed + 200 {
            bail!(
                "{needed} connections need more open files than the limit {limit}: run with `ulimit -n {}` first",
                needed + 1000
            );
        }
    }
    sleep(Duration::from_millis(500)).await;
    let before = run.target.sample();
    let mut made = 0u32;
    let mut out = Vec::new();
    let per = p.clients.max(1);
    for total in stages {
        let mut specs = Vec::new();
        while made < total {
            let s = made / per;
            let i = made % per;
            specs.push(run.spec(s, i, per)?);
            made += 1;
        }
        let t = Instant::now();
        run.connect_all(specs, p.concurrency, Duration::from_secs(300))
            .await?;
        let setup = t.elapsed().as_secs_f64();
        // Let allocations settle (greetings sent, awareness relayed).
        sleep(Duration::from_secs(3)).await;
        let now = run.target.sample();
        let per_conn = match (before, now) {
            (Some(b), Some(n)) => Some((n.rss_kib as f64 - b.rss_kib as f64) / made as f64),
            _ => None,
        };
        eprintln!(
            "  {made} idle connections ({} sessions of {per}) in {setup:.1} s: server RSS {} KiB, {} KiB per connection",
            made.div_ceil(per),
            now.map(|s| s.rss_kib).unwrap_or(0),
            per_conn.map(|v| format!("{v:.1}")).unwrap_or("?".into())
        );
        out.push(json!({
            "connections": made,
            "sessions": made.div_ceil(per),
            "connect_s": r3(setup),
            "server_rss_kib": now.map(|s| s.rss_kib),
            "server_rss_kib_before": before.map(|s| s.rss_kib),
            "rss_kib_per_connection": per_conn.map(r3),
            "server_cpu_s": now.map(|s| r3(s.cpu_s)),
            "loadgen_rss_kib": stats::proc_sample(std::process::id()).map(|s| s.rss_kib),
        }));
        if run.counters.failed.load(Ordering::Acquire) > 0 {
            break;
        }
    }
    let (connect, sync) = run.connect_summary();
    let (converged, sessions_checked, problems) = run.finish().await;
    let errors = run.errors();
    let end_sample = run.target.sample();
    Ok(json!({
        "stages": out,
        "connect": connect.to_json(),
        "synced": sync.to_json(),
        "converged": converged,
        "sessions_checked": sessions_checked,
        "convergence_problems": problems,
        "server_peak_rss_kib": end_sample.map(|s| s.hwm_kib),
        "errors": errors.iter().take(20).collect::<Vec<_>>(),
        "error_count": errors.len(),
        "ok": converged && errors.is_empty(),
    }))
}

/// The join storm's tutor: connects, writes the board into the session and stays
/// connected. Returns the seconds it took.
async fn seed_board(run: &mut Run<'_>, n: u32, doc_bytes: usize) -> anyhow::Result<f64> {
    let mut seeder = run.spec(0, 0, n + 1)?;
    seeder.writer = None;
    seeder.aware = None;
    seeder.seed_bytes = doc_bytes;
    seeder.sync_timeout = Duration::from_secs(300);
    let t = Instant::now();
    run.connect_all(vec![seeder], 1, Duration::from_secs(60))
        .await?;
    while !run.counters.seeded.load(Ordering::Acquire) {
        if run.counters.failed.load(Ordering::Acquire) > 0 {
            bail!("seeding failed: {:?}", run.errors());
        }
        if t.elapsed() > Duration::from_secs(300) {
            bail!("seeding took longer than 300 s");
        }
        sleep(Duration::from_millis(10)).await;
    }
    let seed_s = t.elapsed().as_secs_f64();
    let seeded_bytes = client::lock(&run.clients[0].1).seeded_bytes;
    eprintln!(
        "  seeded {doc_bytes} bytes of strokes ({seeded_bytes} bytes of updates) in {seed_s:.1} s"
    );
    Ok(seed_s)
}

/// The trivial server's answer to a storm of `doc_bytes`: the sync step 2 message of a
/// board built as the tutor builds it (`client::Board`, in the tutor's chunks, so of the
/// same size), and the update inside it, which every joiner's must equal.
pub(crate) fn storm_answer(doc_bytes: usize) -> anyhow::Result<(Bytes, Bytes)> {
    let doc = yrs::Doc::new();
    let mut board = client::Board::new(&doc, doc_bytes, TUTOR_CHUNK);
    while board.next_update(&doc).is_some() {}
    let update = doc
        .transact()
        .encode_state_as_update_v1(&StateVector::default());
    drop(doc);
    let message = Bytes::from(Message::Sync(SyncMessage::SyncStep2(update)).encode_v1());
    let (start, len) =
        client::step2_bounds(&message).context("a sync step 2 message without its update")?;
    let step2 = message.slice(start..start + len);
    Ok((message, step2))
}

/// Touches `bytes` of fresh memory in this process and frees it, before a storm's clock
/// starts. On a virtual machine the first touch of a guest page the host has not backed
/// yet costs several times a reused one's (the host faults and zeroes it as well): in one
/// run, `clear_page_erms` took 24 % of the load generator's samples in the first storm
/// (easel's) and 4 % in the second (the trivial server's), inflating the same bytes
/// (BENCHMARKS.md, nineteenth round). Whichever storm came first was measured on colder
/// memory; touching as much as a storm's joiners hold first gives both the same start.
/// Returns the MiB touched and the seconds it took.
fn warm_memory(bytes: usize) -> (usize, f64) {
    const BLOCK: usize = 16 << 20;
    let t = Instant::now();
    let mut blocks = Vec::with_capacity(bytes / BLOCK);
    for _ in 0..bytes / BLOCK {
        let mut b = vec![0u8; BLOCK];
        for page in b.iter_mut().step_by(4096) {
            *page = 1;
        }
        blocks.push(std::hint::black_box(b));
    }
    let mib = blocks.len() * (BLOCK >> 20);
    drop(blocks);
    let took = t.elapsed().as_secs_f64();
    if mib > 0 {
        eprintln!("  warmed {mib} MiB of the load generator's memory in {took:.1} s");
    }
    (mib, took)
}

/// A join storm: `n` clients join at once a session holding a board of `doc_bytes`,
/// written by a tutor first unless the server already holds it (the trivial server).
pub(crate) async fn run_storm(
    run: &mut Run<'_>,
    n: u32,
    doc_bytes: usize,
) -> anyhow::Result<Value> {
    let answer = run.target.answer.clone();
    let seed_s = match &answer {
        // Every joiner's step 2 is compared with the known answer, not with the first's.
        Some(step2) => {
            let _ = run.counters.reference_step2.set(step2.clone());
            None
        }
        None => Some(seed_board(run, n, doc_bytes).await?),
    };
    sleep(Duration::from_millis(500)).await;
    let warm_bytes = run.plan.storm_warm_bytes(n, doc_bytes);
    // Seconds of page faults: off the runtime's threads, which keep the tutor connected.
    let warmed = tokio::task::spawn_blocking(move || warm_memory(warm_bytes)).await?;
    let srv0 = run.target.sample();
    // The peak RSS of the storm alone, not of the seeding before it.
    let peak_reset = run.target.reset_peak();
    let me0 = self_cpu();
    let mut specs = Vec::new();
    for i in 1..=n {
        let mut s = run.spec(0, i, n + 1)?;
        s.writer = None;
        s.aware = None;
        s.hash_step2 = true;
        s.sync_timeout = Duration::from_secs(240);
        specs.push(s);
    }
    let t = Instant::now();
    run.connect_all(specs, n as usize, Duration::from_secs(300))
        .await?;
    let storm_s = t.elapsed().as_secs_f64();
    let srv1 = run.target.sample();
    let me1 = self_cpu();
    // What the server keeps once the storm is over (every joiner still connected).
    sleep(Duration::from_secs(3)).await;
    let srv_after = run.target.sample();
    let mut connect = Vec::new();
    let mut synced = Vec::new();
    let mut wire = Vec::new();
    let mut deflate_agreed = 0;
    let mut different = 0;
    let mut step2_len = 0;
    for (spec, s) in &run.clients {
        if !spec.hash_step2 {
            continue;
        }
        let s = client::lock(s);
        connect.extend(s.connect_us);
        synced.extend(s.synced_us);
        wire.extend(s.wire_bytes);
        deflate_agreed += usize::from(s.deflate == Some(true));
        if s.step2_same != Some(true) {
            different += 1;
        }
        step2_len = step2_len.max(s.step2_len);
    }
    let kept = run.counters.reference_step2.get().cloned();
    let connect = Summary::of_us(&mut connect);
    let synced_s = Summary::of_us(&mut synced);
    wire.sort_unstable();
    let wire_p50 = stats::quantile(&wire, 0.5);
    let wire_max = wire.last().copied().unwrap_or(0);
    let per_step2 = |b: u64| b as f64 / step2_len.max(1) as f64;
    eprintln!(
        "  {n} clients joined in {storm_s:.2} s; step 2 of {step2_len} bytes; time to synced {}",
        synced_s.line()
    );
    eprintln!(
        "  wire bytes per joiner p50 {wire_p50} max {wire_max} ({:.3} / {:.3} of the step 2); permessage-deflate {}, agreed by {deflate_agreed}/{n}",
        per_step2(wire_p50),
        per_step2(wire_max),
        if run.plan.offer_deflate { "offered" } else { "not offered" },
    );
    let (mut converged, sessions_checked, mut problems) = run.finish().await;
    if different > 0 {
        converged = false;
        problems.push(format!(
            "{different} joiners got a different (or no) sync step 2"
        ));
    }
    match (&answer, kept) {
        // Every joiner's equals the answer, the board built here: nothing more to check.
        (Some(_), _) => {}
        // The first joiner's, which every other equals: it must be the tutor's document.
        (None, Some(bytes)) => {
            let seeder_digest = client::lock(&run.clients[0].1).digest;
            if let Err(problem) = same_document(&bytes, seeder_digest) {
                converged = false;
                problems.push(problem);
            }
        }
        (None, None) => converged = false,
    }
    let errors = run.errors();
    let end = run.target.sample();
    // The peak since the reset, else the process's (which includes the seeding).
    let storm_peak = end.map(|s| s.hwm_kib);
    let growth = match (srv0, storm_peak) {
        (Some(before), Some(peak)) if step2_len > 0 => {
            Some((peak as f64 - before.rss_kib as f64) * 1024.0 / step2_len as f64)
        }
        _ => None,
    };
    eprintln!(
        "  server RSS before the storm {} KiB, peak during it {} KiB{}: (peak - before) / board = {}",
        srv0.map(|s| s.rss_kib.to_string()).unwrap_or("?".into()),
        storm_peak.map(|p| p.to_string()).unwrap_or("?".into()),
        if peak_reset { "" } else { " (the process's peak: could not reset it)" },
        growth.map(|g| format!("{g:.2}")).unwrap_or("?".into()),
    );
    Ok(json!({
        "clients": n,
        "doc_bytes": doc_bytes,
        "step2_bytes": step2_len,
        "seed_s": seed_s.map(r3),
        "storm_s": r3(storm_s),
        "warmed_mib": warmed.0,
        "warm_s": r3(warmed.1),
        "connect": connect.to_json(),
        "synced": synced_s.to_json(),
        "deflate_offered": run.plan.offer_deflate,
        "deflate_agreed": deflate_agreed,
        "wire_bytes": {
            "p50": wire_p50,
            "max": wire_max,
            "min": wire.first().copied().unwrap_or(0),
            "p50_per_step2": r3(per_step2(wire_p50)),
            "max_per_step2": r3(per_step2(wire_max)),
        },
        "server_cpu_s": match (srv0, srv1) { (Some(a), Some(b)) => Some(r3(b.cpu_s - a.cpu_s)), _ => None },
        "server_rss_kib_before": srv0.map(|s| s.rss_kib),
        "server_rss_kib_after": srv_after.map(|s| s.rss_kib),
        "server_storm_peak_rss_kib": storm_peak,
        "storm_peak_since": if peak_reset { "storm" } else { "server start" },
        "server_peak_rss_kib": match (srv0, storm_peak) {
            (Some(a), Some(b)) => Some(a.hwm_kib.max(b)),
            (_, b) => b,
        },
        "rss_growth_per_board": growth.map(r3),
        "loadgen_cpu_s": r3(me1 - me0),
        "converged": converged,
        "sessions_checked": sessions_checked,
        "convergence_problems": problems,
        "errors": errors.iter().take(20).collect::<Vec<_>>(),
        "error_count": errors.len(),
        "ok": converged && errors.is_empty(),
    }))
}

/// Whether an update, applied to an empty document, gives the document of `digest`.
fn same_document(update: &[u8], digest: Option<u64>) -> Result<(), String> {
    let doc = yrs::Doc::new();
    {
        let mut txn = doc.transact_mut();
        let u = yrs::Update::decode_v1(update)
            .map_err(|e| format!("joiner's step 2 does not decode: {e}"))?;
        txn.apply_update(u)
            .map_err(|e| format!("joiner's step 2 rejected: {e}"))?;
    }
    if Some(workload::digest(&doc)) != digest {
        return Err("a joiner's document differs from the seeder's".into());
    }
    Ok(())
}

/// Join storm: easel's figures beside the trivial server's, printed and returned as JSON.
pub(crate) fn storm_comparison(easel: &Value, trivial: &Value) -> Value {
    let f = |v: &Value, a: &str, b: &str| v[a][b].as_f64();
    let mib = |v: &Value, key: &str| v[key].as_f64().map(|k| k / 1024.0);
    let cell = |x: Option<f64>, digits: usize| {
        x.map(|x| format!("{x:.digits$}"))
            .unwrap_or_else(|| "?".into())
    };
    let ratio = match (f(easel, "synced", "p50_ms"), f(trivial, "synced", "p50_ms")) {
        (Some(e), Some(t)) if t > 0.0 => Some(e / t),
        _ => None,
    };
    eprintln!(
        "== join storm, easel vs the trivial server ({} joiners, step 2 of {} / {} bytes):",
        easel["clients"], easel["step2_bytes"], trivial["step2_bytes"]
    );
    eprintln!("   {:<34} {:>20} {:>20}", "", "easel", "trivial");
    let row = |label: &str, of: &dyn Fn(&Value) -> String| {
        eprintln!("   {label:<34} {:>20} {:>20}", of(easel), of(trivial));
    };
    row("time to synced p50 / p99 (ms)", &|v| {
        format!(
            "{} / {}",
            cell(f(v, "synced", "p50_ms"), 0),
            cell(f(v, "synced", "p99_ms"), 0)
        )
    });
    row("wire bytes per joiner p50", &|v| {
        cell(f(v, "wire_bytes", "p50"), 0)
    });
    row("  of the step 2", &|v| {
        cell(f(v, "wire_bytes", "p50_per_step2"), 3)
    });
    row("deflate agreed", &|v| {
        format!("{}/{}", v["deflate_agreed"], v["clients"])
    });
    row("server RSS before the storm (MiB)", &|v| {
        cell(mib(v, "server_rss_kib_before"), 1)
    });
    row("server peak RSS in the storm (MiB)", &|v| {
        cell(mib(v, "server_storm_peak_rss_kib"), 1)
    });
    eprintln!(
        "   easel p50 / trivial p50 = {}; easel (storm peak - RSS before) / board = {} (target <= 4)",
        cell(ratio, 2),
        cell(easel["rss_growth_per_board"].as_f64(), 2)
    );
    let pick = |v: &Value| {
        json!({
            "synced_p50_ms": v["synced"]["p50_ms"],
            "synced_p99_ms": v["synced"]["p99_ms"],
            "step2_bytes": v["step2_bytes"],
            "wire_bytes_p50": v["wire_bytes"]["p50"],
            "wire_bytes_max": v["wire_bytes"]["max"],
            "deflate_agreed": v["deflate_agreed"],
            "server_rss_kib_before": v["server_rss_kib_before"],
            "server_storm_peak_rss_kib": v["server_storm_peak_rss_kib"],
            "rss_growth_per_board": v["rss_growth_per_board"],
        })
    };
    json!({
        "easel": pick(easel),
        "trivial": pick(trivial),
        "synced_p50_ratio": ratio.map(r3),
    })
}
