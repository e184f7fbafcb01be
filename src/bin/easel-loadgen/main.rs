//! `easel-loadgen`: a y-websocket load generator for easel (and for the baseline fan-out
//! server, to compare against).
//!
//! R sessions × C clients, each a `yrs` document speaking y-websocket through `yrs::sync`;
//! W writers per session add strokes (a `Y.Map` entry of about P bytes) at U per second,
//! and cursor senders move their awareness cursor at A per second. Every stroke and cursor
//! carries its send time, so every receiver measures the fan-out latency. After each step
//! the tool waits until every expected delivery arrived (or a drain timeout), and at the end
//! checks that every client of a session holds the same document.
//!
//! Only loopback addresses are ever targeted; every loop is bounded in count and time.
//! Scenarios (`--scenario`): smoke, a, b, c, d (idle), e (saturation), f (join storm);
//! see BENCHMARKS.md for the commands and results.

mod client;
mod stats;
mod target;
mod workload;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::{sleep, sleep_until, Instant};

use client::{ApplyMode, ClientSpec, ClientStats, Counters, Phase, Shared, Step};
use stats::{r3, Summary};
use target::{Kind, Target};

#[derive(Parser, Debug)]
#[command(
    name = "easel-loadgen",
    about = "Load generator for the easel whiteboard relay (y-websocket over 127.0.0.1)"
)]
struct Cli {
    /// A preset: smoke, a, b, c, d (idle), e (saturation), f (join storm). Flags override it.
    #[arg(long)]
    scenario: Option<String>,
    /// Start this server binary (easel, or baseline-fanout with --baseline) and measure it.
    #[arg(long, conflicts_with = "url")]
    server_bin: Option<PathBuf>,
    /// Target a server already running, e.g. ws://127.0.0.1:8080 (loopback only).
    #[arg(long)]
    url: Option<String>,
    /// The JWT secret of the server at --url.
    #[arg(long, env = "EASEL_JWT_SECRET")]
    secret: Option<String>,
    /// PID of the server at --url, to read its CPU time and memory from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// The target is the baseline fan-out server (no auth, no CRDT).
    #[arg(long)]
    baseline: bool,
    /// After the run, run the same scenario against the baseline and report the ratio.
    #[arg(long)]
    compare_baseline: bool,
    /// The baseline binary for --compare-baseline (default: baseline-fanout next to this one).
    #[arg(long)]
    baseline_bin: Option<PathBuf>,
    /// A TOML config file for the easel server this tool starts.
    #[arg(long)]
    server_config: Option<PathBuf>,
    /// Sessions (R).
    #[arg(long)]
    sessions: Option<u32>,
    /// Clients per session (C).
    #[arg(long)]
    clients: Option<u32>,
    /// Writers per session (W).
    #[arg(long)]
    writers: Option<u32>,
    /// Updates per second per writer (U).
    #[arg(long)]
    rate: Option<f64>,
    /// Approximate bytes of one stroke update (P).
    #[arg(long)]
    payload: Option<usize>,
    /// Cursor (awareness) updates per second per cursor sender.
    #[arg(long)]
    awareness_rate: Option<f64>,
    /// Cursor senders per session (default: the writers).
    #[arg(long)]
    awareness_clients: Option<u32>,
    /// Measured seconds (per step).
    #[arg(long)]
    duration: Option<f64>,
    /// Warm-up seconds before measuring (per step).
    #[arg(long)]
    warmup: Option<f64>,
    /// Longest wait for outstanding deliveries after a step, in seconds.
    #[arg(long)]
    drain_timeout: Option<f64>,
    /// Saturation: per-writer rates to step through, e.g. 10,20,40,80.
    #[arg(long)]
    ramp: Option<String>,
    /// Saturation: stop the ramp once p99 fan-out passes this many milliseconds.
    #[arg(long)]
    p99_limit_ms: Option<f64>,
    /// Idle connections: totals to reach, stage by stage, e.g. 2000,10000.
    #[arg(long)]
    idle_stages: Option<String>,
    /// Join storm: clients joining at once.
    #[arg(long)]
    storm_clients: Option<u32>,
    /// Join storm: size of the session's document (encoded state, bytes).
    #[arg(long)]
    storm_doc_bytes: Option<usize>,
    /// live (apply each update as it arrives), defer (apply between steps) or sample (as
    /// defer for writers and one client per session; the others check and drop updates).
    #[arg(long)]
    apply: Option<String>,
    /// Connections being set up at once.
    #[arg(long)]
    connect_concurrency: Option<usize>,
    /// Do not send an awareness state on connect.
    #[arg(long)]
    no_join_awareness: bool,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Clone)]
enum Mode {
    /// One step, or a ramp of per-writer rates.
    Fanout {
        ramp: Option<Vec<f64>>,
        p99_limit_ms: f64,
    },
    Idle {
        stages: Vec<u32>,
    },
    Storm {
        clients: u32,
        doc_bytes: usize,
    },
}

#[derive(Debug, Clone)]
struct Plan {
    name: String,
    mode: Mode,
    sessions: u32,
    clients: u32,
    writers: u32,
    rate: f64,
    payload: usize,
    aw_rate: f64,
    aw_clients: u32,
    duration: f64,
    warmup: f64,
    drain: f64,
    apply: ApplyMode,
    concurrency: usize,
    join_awareness: bool,
    /// Config the started easel gets (the preset's, unless --server-config).
    server_toml: Option<String>,
    compare_baseline: bool,
}

fn preset(name: &str) -> anyhow::Result<Plan> {
    let base = Plan {
        name: name.to_string(),
        mode: Mode::Fanout {
            ramp: None,
            p99_limit_ms: 50.0,
        },
        sessions: 1,
        clients: 10,
        writers: 2,
        rate: 20.0,
        payload: 500,
        aw_rate: 10.0,
        aw_clients: u32::MAX,
        duration: 20.0,
        warmup: 3.0,
        drain: 10.0,
        apply: ApplyMode::Live,
        concurrency: 128,
        join_awareness: true,
        server_toml: None,
        compare_baseline: false,
    };
    Ok(match name {
        "custom" => base,
        "smoke" => Plan {
            sessions: 2,
            clients: 4,
            writers: 2,
            rate: 20.0,
            aw_rate: 5.0,
            duration: 2.0,
            warmup: 0.5,
            drain: 5.0,
            ..base
        },
        "a" => base,
        "b" => Plan {
            clients: 100,
            writers: 5,
            rate: 10.0,
            duration: 30.0,
            warmup: 5.0,
            ..base
        },
        "c" => Plan {
            sessions: 100,
            clients: 5,
            writers: 1,
            rate: 5.0,
            aw_rate: 5.0,
            duration: 30.0,
            warmup: 5.0,
            ..base
        },
        "d" => Plan {
            mode: Mode::Idle {
                stages: vec![2000, 10000],
            },
            clients: 10,
            writers: 0,
            aw_rate: 0.0,
            concurrency: 256,
            ..base
        },
        "e" => Plan {
            mode: Mode::Fanout {
                // Up to where both easel and the baseline pass 50 ms on this machine.
                ramp: Some(vec![
                    20.0, 40.0, 80.0, 120.0, 160.0, 240.0, 320.0, 480.0, 640.0, 800.0, 960.0,
                    1200.0, 1440.0, 1680.0, 1920.0, 2400.0,
                ]),
                p99_limit_ms: 50.0,
            },
            clients: 100,
            writers: 5,
            aw_rate: 0.0,
            duration: 5.0,
            warmup: 1.0,
            drain: 20.0,
            // Writers and one receiver integrate updates between steps, so that the load
            // generator's CRDT work does not compete with the server for the two cores while
            // measuring; the other receivers check and drop them (memory: see ApplyMode).
            apply: ApplyMode::Sample,
            // The per-connection frame limit (300/s) would throttle one fast writer long
            // before the relay saturates: lift it, measure the relay.
            server_toml: Some(
                "[limits]\nwhiteboard_rate = 1000000.0\nwhiteboard_burst = 1000000\n".into(),
            ),
            compare_baseline: true,
            ..base
        },
        "f" => Plan {
            mode: Mode::Storm {
                clients: 150,
                doc_bytes: 20_000_000,
            },
            clients: 1,
            writers: 0,
            aw_rate: 0.0,
            drain: 5.0,
            // A 20 MB sync step 2 does not fit the default 16 MiB send queue (1013).
            server_toml: Some("[limits]\nmax_send_queue_bytes = 67108864\n".into()),
            ..base
        },
        other => bail!("unknown scenario {other:?} (smoke, a, b, c, d, e, f, custom)"),
    })
}

fn parse_list<T: std::str::FromStr>(s: &str, what: &str) -> anyhow::Result<Vec<T>> {
    s.split(',')
        .map(|v| v.trim().parse::<T>().ok())
        .collect::<Option<Vec<T>>>()
        .filter(|v| !v.is_empty())
        .with_context(|| format!("{what}: expected a comma-separated list, got {s:?}"))
}

fn plan(cli: &Cli) -> anyhow::Result<Plan> {
    let mut p = preset(cli.scenario.as_deref().unwrap_or("custom"))?;
    macro_rules! set {
        ($field:ident, $opt:expr) => {
            if let Some(v) = $opt {
                p.$field = v;
            }
        };
    }
    set!(sessions, cli.sessions);
    set!(clients, cli.clients);
    set!(writers, cli.writers);
    set!(rate, cli.rate);
    set!(payload, cli.payload);
    set!(aw_rate, cli.awareness_rate);
    set!(aw_clients, cli.awareness_clients);
    set!(duration, cli.duration);
    set!(warmup, cli.warmup);
    set!(drain, cli.drain_timeout);
    set!(concurrency, cli.connect_concurrency);
    if let Some(a) = &cli.apply {
        p.apply = match a.as_str() {
            "live" => ApplyMode::Live,
            "defer" => ApplyMode::Defer,
            "sample" => ApplyMode::Sample,
            other => bail!("--apply {other:?}: live, defer or sample"),
        };
    }
    if cli.no_join_awareness {
        p.join_awareness = false;
    }
    if cli.compare_baseline {
        p.compare_baseline = true;
    }
    if let Some(path) = &cli.server_config {
        p.server_toml = Some(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        );
    }
    match &mut p.mode {
        Mode::Fanout { ramp, p99_limit_ms } => {
            if let Some(r) = &cli.ramp {
                *ramp = Some(parse_list(r, "--ramp")?);
            }
            if let Some(l) = cli.p99_limit_ms {
                *p99_limit_ms = l;
            }
        }
        Mode::Idle { stages } => {
            if let Some(s) = &cli.idle_stages {
                *stages = parse_list(s, "--idle-stages")?;
            }
        }
        Mode::Storm { clients, doc_bytes } => {
            if let Some(c) = cli.storm_clients {
                *clients = c;
            }
            if let Some(b) = cli.storm_doc_bytes {
                *doc_bytes = b;
            }
        }
    }
    if p.aw_clients == u32::MAX {
        p.aw_clients = p.writers;
    }
    p.writers = p.writers.min(p.clients);
    p.aw_clients = p.aw_clients.min(p.clients);
    if p.duration <= 0.0 || p.duration > 3600.0 || p.warmup < 0.0 || p.warmup > 600.0 {
        bail!("--duration must be in (0, 3600] s and --warmup in [0, 600] s");
    }
    if p.rate < 0.0 || p.rate > 100_000.0 || p.aw_rate < 0.0 || p.aw_rate > 100_000.0 {
        bail!("rates must be within [0, 100000] per second");
    }
    if p.payload > 4 << 20 {
        bail!("--payload above 4 MiB");
    }
    Ok(p)
}

/// (send time, latency) pairs, in µs.
type Samples = Vec<(u64, u32)>;

/// Everything one run against one server needs.
struct Run<'a> {
    plan: &'a Plan,
    target: &'a mut Target,
    tag: String,
    counters: Arc<Counters>,
    phase: watch::Sender<Phase>,
    clients: Vec<(ClientSpec, Shared)>,
    handles: Vec<tokio::task::JoinHandle<()>>,
    deadline: Instant,
}

fn token(secret: &str, sub: &str, session: &str) -> anyhow::Result<String> {
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
    fn new(plan: &'a Plan, target: &'a mut Target, budget: Duration) -> Self {
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
        let url = match self.target.kind {
            Kind::Easel => format!(
                "{}/ws/v2/session/{sid}/whiteboard?token={}",
                self.target.base,
                token(&self.target.secret, &format!("{sid}-u{index}"), &sid)?
            ),
            Kind::Baseline => format!("{}/ws/v2/session/{sid}/whiteboard", self.target.base),
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
            apply: p.apply,
            join_awareness: p.join_awareness,
            hash_step2: false,
            seed_bytes: 0,
            seed_chunk: 1 << 20,
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

fn self_cpu() -> f64 {
    stats::proc_sample(std::process::id())
        .map(|s| s.cpu_s)
        .unwrap_or(0.0)
}

/// Latency and throughput of one measured window.
fn window_figures(samples: &[(u64, u32)], from_us: u64, to_us: u64) -> (Summary, u64) {
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

async fn run_fanout(
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
        let me0 = self_cpu();
        sleep_until(end).await;
        let srv1 = run.target.sample();
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
        let lost =
            (expected_upd as i64 - received_upd as i64) + (expected_aw as i64 - received_aw as i64);
        all_lost += lost;
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
            "server_rss_kib": srv1.map(|s| s.rss_kib),
            "loadgen_cpu_s": r3(me1 - me0),
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
                "    server CPU {:.2} s in {:.0} s ({:.2} µs per delivery); load generator CPU {:.2} s",
                cpu,
                window,
                cpu * 1e6 / deliveries_in_window.max(1) as f64,
                me1 - me0
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
            "best_under_limit": sustained,
        });
    }
    Ok(report)
}

async fn run_idle(run: &mut Run<'_>, stages: Vec<u32>) -> anyhow::Result<Value> {
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

async fn run_storm(run: &mut Run<'_>, n: u32, doc_bytes: usize) -> anyhow::Result<Value> {
    // The tutor: seeds the document and stays connected.
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
    let seeded_bytes = run.clients[0].1.lock().unwrap().seeded_bytes;
    eprintln!(
        "  seeded {doc_bytes} bytes of strokes ({seeded_bytes} bytes of updates) in {seed_s:.1} s"
    );
    sleep(Duration::from_millis(500)).await;
    let srv0 = run.target.sample();
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
    let mut different = 0;
    let mut step2_len = 0;
    for (spec, s) in &run.clients {
        if !spec.hash_step2 {
            continue;
        }
        let s = s.lock().unwrap();
        connect.extend(s.connect_us);
        synced.extend(s.synced_us);
        if s.step2_same != Some(true) {
            different += 1;
        }
        step2_len = step2_len.max(s.step2_len);
    }
    let kept = run.counters.reference_step2.get().cloned();
    let connect = Summary::of_us(&mut connect);
    let synced_s = Summary::of_us(&mut synced);
    eprintln!(
        "  {n} clients joined in {storm_s:.2} s; step 2 of {step2_len} bytes; time to synced {}",
        synced_s.line()
    );
    let (mut converged, sessions_checked, mut problems) = run.finish().await;
    // Every joiner got the same document, and it is the seeder's.
    let seeder_digest = run.clients[0].1.lock().unwrap().digest;
    if different > 0 {
        converged = false;
        problems.push(format!(
            "{different} joiners got a different (or no) sync step 2"
        ));
    }
    if let Some(bytes) = kept {
        let doc = yrs::Doc::new();
        {
            use yrs::updates::decoder::Decode;
            use yrs::Transact;
            let mut txn = doc.transact_mut();
            match yrs::Update::decode_v1(&bytes) {
                Ok(u) => {
                    if let Err(e) = txn.apply_update(u) {
                        problems.push(format!("joiner's step 2 rejected: {e}"));
                    }
                }
                Err(e) => problems.push(format!("joiner's step 2 does not decode: {e}")),
            }
        }
        if Some(workload::digest(&doc)) != seeder_digest {
            converged = false;
            problems.push("a joiner's document differs from the seeder's".into());
        }
    } else {
        converged = false;
    }
    let errors = run.errors();
    let end = run.target.sample();
    Ok(json!({
        "clients": n,
        "doc_bytes": doc_bytes,
        "step2_bytes": step2_len,
        "seed_s": r3(seed_s),
        "storm_s": r3(storm_s),
        "connect": connect.to_json(),
        "synced": synced_s.to_json(),
        "server_cpu_s": match (srv0, srv1) { (Some(a), Some(b)) => Some(r3(b.cpu_s - a.cpu_s)), _ => None },
        "server_rss_kib_before": srv0.map(|s| s.rss_kib),
        "server_rss_kib_after": srv_after.map(|s| s.rss_kib),
        "server_peak_rss_kib": end.map(|s| s.hwm_kib),
        "loadgen_cpu_s": r3(me1 - me0),
        "converged": converged,
        "sessions_checked": sessions_checked,
        "convergence_problems": problems,
        "errors": errors.iter().take(20).collect::<Vec<_>>(),
        "error_count": errors.len(),
        "ok": converged && errors.is_empty(),
    }))
}

fn plan_json(p: &Plan) -> Value {
    json!({
        "scenario": p.name,
        "mode": format!("{:?}", p.mode),
        "sessions": p.sessions,
        "clients_per_session": p.clients,
        "writers_per_session": p.writers,
        "rate_per_writer": p.rate,
        "payload_bytes": p.payload,
        "points_per_stroke": workload::points_for_payload(p.payload),
        "cursor_senders_per_session": p.aw_clients,
        "cursor_rate": p.aw_rate,
        "duration_s": p.duration,
        "warmup_s": p.warmup,
        "apply": format!("{:?}", p.apply),
        "server_config": p.server_toml,
    })
}

/// Runs the plan once against `target`.
async fn run_once(plan: &Plan, target: &mut Target) -> anyhow::Result<Value> {
    let budget = Duration::from_secs(match &plan.mode {
        Mode::Fanout { ramp, .. } => {
            let steps = ramp.as_ref().map(|r| r.len()).unwrap_or(1) as f64;
            (180.0 + steps * (plan.warmup + plan.duration + plan.drain + 1.0)) as u64
        }
        Mode::Idle { .. } => 900,
        Mode::Storm { .. } => 900,
    });
    let mut run = Run::new(plan, target, budget);
    let result = match plan.mode.clone() {
        Mode::Fanout { ramp, p99_limit_ms } => run_fanout(&mut run, ramp, p99_limit_ms).await,
        Mode::Idle { stages } => run_idle(&mut run, stages).await,
        Mode::Storm { clients, doc_bytes } => run_storm(&mut run, clients, doc_bytes).await,
    };
    if result.is_err() {
        run.phase.send_replace(Phase::Finish);
        for h in run.handles.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
    }
    let mut v = result?;
    v["target"] = json!(run.target.kind.name());
    Ok(v)
}

fn start_target(
    cli: &Cli,
    plan: &Plan,
    kind: Kind,
    bin: Option<&PathBuf>,
) -> anyhow::Result<Target> {
    match (bin, &cli.url) {
        (Some(bin), _) => Target::start(
            kind,
            bin,
            if kind == Kind::Easel {
                plan.server_toml.as_deref()
            } else {
                None
            },
        ),
        (None, Some(url)) => {
            let secret = match kind {
                Kind::Easel => cli
                    .secret
                    .clone()
                    .context("--url needs --secret (or EASEL_JWT_SECRET)")?,
                Kind::Baseline => String::new(),
            };
            Target::external(kind, url, secret, cli.server_pid)
        }
        (None, None) => bail!("give --server-bin PATH or --url ws://127.0.0.1:PORT"),
    }
}

fn print_summary(label: &str, v: &Value) {
    let ok = v["ok"].as_bool().unwrap_or(false);
    eprintln!("== {label}: {}", if ok { "OK" } else { "FAILED" });
    if let Some(steps) = v["steps"].as_array() {
        let last = steps.last().cloned().unwrap_or(Value::Null);
        eprintln!(
            "   connect p50/p99 {}/{} ms, synced p50/p99 {}/{} ms",
            v["connect"]["p50_ms"],
            v["connect"]["p99_ms"],
            v["synced"]["p50_ms"],
            v["synced"]["p99_ms"]
        );
        if steps.len() == 1 {
            eprintln!(
                "   updates: expected {} received {}; cursors: expected {} received {}",
                last["update_deliveries_expected"],
                last["update_deliveries_received"],
                last["awareness_deliveries_expected"],
                last["awareness_deliveries_received"]
            );
        }
    }
    if let Some(s) = v.get("saturation") {
        let best = &s["best_under_limit"];
        if !best.is_null() {
            eprintln!(
                "   best under {} ms p99: {} deliveries/s at {}/s per writer, p99 {} ms, server {} µs CPU per delivery",
                s["p99_limit_ms"], best["deliveries_per_s"], best["rate_per_writer"], best["update_latency"]["p99_ms"], best["server_cpu_us_per_delivery"]
            );
        }
        if !s["reached"].as_bool().unwrap_or(false) {
            eprintln!("   p99 stayed under the limit for the whole ramp");
        }
    }
    eprintln!(
        "   converged: {}  lost: {}  errors: {}  server peak RSS: {} KiB",
        v["converged"],
        v.get("lost").unwrap_or(&json!(0)),
        v["error_count"],
        v["server_peak_rss_kib"]
    );
    if let Some(errs) = v["errors"].as_array() {
        for e in errs.iter().take(5) {
            eprintln!("   error: {}", e.as_str().unwrap_or(""));
        }
    }
    if let Some(p) = v["convergence_problems"].as_array() {
        for e in p.iter().take(5) {
            eprintln!("   not converged: {}", e.as_str().unwrap_or(""));
        }
    }
}

async fn main_async(cli: Cli) -> anyhow::Result<bool> {
    let plan = plan(&cli)?;
    let kind = if cli.baseline {
        Kind::Baseline
    } else {
        Kind::Easel
    };
    eprintln!(
        "easel-loadgen: scenario {} against {} ({})",
        plan.name,
        kind.name(),
        stats::machine()
    );
    let mut target = start_target(&cli, &plan, kind, cli.server_bin.as_ref())?;
    let result = run_once(&plan, &mut target).await;
    if result.is_err() || !target.alive() {
        let tail = target.stderr_tail();
        if !tail.is_empty() {
            eprintln!("server stderr (last lines):\n{tail}");
        }
    }
    target.stop();
    let main = result?;
    print_summary(kind.name(), &main);
    let mut ok = main["ok"].as_bool().unwrap_or(false);
    let mut report = json!({
        "date": stats::now_utc(),
        "machine": stats::machine(),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "plan": plan_json(&plan),
        "result": main,
    });
    if plan.compare_baseline && kind == Kind::Easel {
        let bin = match &cli.baseline_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("no directory for this binary")?
                .join("baseline-fanout"),
        };
        eprintln!(
            "easel-loadgen: the same scenario against the baseline ({})",
            bin.display()
        );
        let mut base = Target::start(Kind::Baseline, &bin, None)?;
        let res = run_once(&plan, &mut base).await;
        base.stop();
        let b = res?;
        print_summary("baseline", &b);
        ok &= b["ok"].as_bool().unwrap_or(false);
        let pick = |v: &Value| -> Option<(f64, f64)> {
            let s = if v.get("saturation").is_some() {
                &v["saturation"]["best_under_limit"]
            } else {
                v["steps"].as_array()?.last()?
            };
            Some((
                s["deliveries_per_s"].as_f64()?,
                s["server_cpu_us_per_delivery"].as_f64()?,
            ))
        };
        if let (Some((e_dps, e_cpu)), Some((b_dps, b_cpu))) = (pick(&report["result"]), pick(&b)) {
            let ratio = e_dps / b_dps.max(1e-9);
            eprintln!(
                "== easel / baseline: {:.0} / {:.0} deliveries/s = {:.2}; CPU per delivery {:.2} / {:.2} µs",
                e_dps, b_dps, ratio, e_cpu, b_cpu
            );
            report["comparison"] = json!({
                "easel_deliveries_per_s": e_dps,
                "baseline_deliveries_per_s": b_dps,
                "ratio": r3(ratio),
                "easel_cpu_us_per_delivery": e_cpu,
                "baseline_cpu_us_per_delivery": b_cpu,
            });
        }
        report["baseline"] = b;
    }
    report["ok"] = json!(ok);
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    Ok(ok)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    client::now_us();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match runtime.block_on(main_async(cli)) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
