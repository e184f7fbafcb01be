//! What to run: the command line, the scenario presets (smoke, a–f) and the plan they
//! resolve to. Pure data; nothing here opens a socket.

use std::path::PathBuf;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use easel_bench::workload;

use clap::Parser;

use crate::client::ApplyMode;

#[derive(Parser, Debug)]
#[command(
    name = "easel-loadgen",
    about = "Load generator for the easel whiteboard relay (y-websocket over 127.0.0.1)"
)]
pub(crate) struct Cli {
    /// A preset: smoke, a, b, c, d (idle), e (saturation), f (join storm). Flags override it.
    #[arg(long)]
    pub(crate) scenario: Option<String>,
    /// Start this server binary (easel, or baseline-fanout with --baseline) and measure it.
    #[arg(long, conflicts_with = "url")]
    pub(crate) server_bin: Option<PathBuf>,
    /// Target a server already running, e.g. ws://127.0.0.1:8080 (loopback only); several
    /// nodes of a cluster comma-separated (clients are spread over them).
    #[arg(long, alias = "urls")]
    pub(crate) url: Option<String>,
    /// The JWT secret of the server at --url.
    #[arg(long, env = "EASEL_JWT_SECRET")]
    pub(crate) secret: Option<String>,
    /// PID of the server at --url (comma-separated for several nodes), to read CPU time
    /// and memory from /proc.
    #[arg(long, value_delimiter = ',')]
    pub(crate) server_pid: Vec<u32>,
    /// Cluster mode (SPEC 9): start this many easel nodes (with --server-bin) on one Redis
    /// and spread the clients over them round-robin; a comma-separated list of ws:// URLs
    /// works as --url.
    #[arg(long)]
    pub(crate) nodes: Option<String>,
    /// The Redis for --nodes N (loopback); default: start redis-server here.
    #[arg(long)]
    pub(crate) redis_url: Option<String>,
    /// PID of the Redis at --redis-url, to read its CPU time.
    #[arg(long)]
    pub(crate) redis_pid: Option<u32>,
    /// appendfsync of the Redis this tool starts: everysec (default), always or no.
    #[arg(long, default_value = "everysec")]
    pub(crate) redis_fsync: String,
    /// After a --nodes run, run the same scenario on one easel node on sled (the default
    /// store) and print both side by side.
    #[arg(long)]
    pub(crate) compare_single: bool,
    /// The target is the baseline fan-out server (no auth, no CRDT).
    #[arg(long)]
    pub(crate) baseline: bool,
    /// After the run, run the same scenario against the baseline and report the ratio.
    #[arg(long)]
    pub(crate) compare_baseline: bool,
    /// The baseline binary for --compare-baseline (default: baseline-fanout next to this one).
    #[arg(long)]
    pub(crate) baseline_bin: Option<PathBuf>,
    /// Join storm: after the run, run the same storm against the trivial server (one cached
    /// answer per connection, the floor) and print both side by side. Scenario f's default.
    #[arg(long, overrides_with = "no_compare_trivial")]
    pub(crate) compare_trivial: bool,
    /// Join storm: no trivial-server run.
    #[arg(long, overrides_with = "compare_trivial")]
    pub(crate) no_compare_trivial: bool,
    /// Run the server this tool starts on one CPU and this tool on the others (scenario e's
    /// default; see pin.rs). Not with --url or --nodes.
    #[arg(long, overrides_with = "no_pin")]
    pub(crate) pin: bool,
    /// The server and this tool share every core.
    #[arg(long, overrides_with = "pin")]
    pub(crate) no_pin: bool,
    /// The trivial server for --compare-trivial (default: trivial-join next to this one).
    #[arg(long)]
    pub(crate) trivial_bin: Option<PathBuf>,
    /// Join storm: the joiners do not offer permessage-deflate (by default they offer it,
    /// as a browser does).
    #[arg(long)]
    pub(crate) no_deflate: bool,
    /// A TOML config file for the easel server this tool starts.
    #[arg(long)]
    pub(crate) server_config: Option<PathBuf>,
    /// Sessions (R).
    #[arg(long)]
    pub(crate) sessions: Option<u32>,
    /// Clients per session (C).
    #[arg(long)]
    pub(crate) clients: Option<u32>,
    /// Writers per session (W).
    #[arg(long)]
    pub(crate) writers: Option<u32>,
    /// Updates per second per writer (U).
    #[arg(long)]
    pub(crate) rate: Option<f64>,
    /// Approximate bytes of one stroke update (P).
    #[arg(long)]
    pub(crate) payload: Option<usize>,
    /// Each writer erases its stroke from this many updates before in the same update, so
    /// the board stays at about writers × N strokes however long the run (0: never erase).
    #[arg(long)]
    pub(crate) keep_strokes: Option<u32>,
    /// Cursor (awareness) updates per second per cursor sender.
    #[arg(long)]
    pub(crate) awareness_rate: Option<f64>,
    /// Cursor senders per session (default: the writers).
    #[arg(long)]
    pub(crate) awareness_clients: Option<u32>,
    /// Measured seconds (per step).
    #[arg(long)]
    pub(crate) duration: Option<f64>,
    /// Warm-up seconds before measuring (per step).
    #[arg(long)]
    pub(crate) warmup: Option<f64>,
    /// Longest wait for outstanding deliveries after a step, in seconds.
    #[arg(long)]
    pub(crate) drain_timeout: Option<f64>,
    /// Saturation: per-writer rates to step through, e.g. 10,20,40,80.
    #[arg(long)]
    pub(crate) ramp: Option<String>,
    /// Saturation: stop the ramp once p99 fan-out passes this many milliseconds.
    #[arg(long)]
    pub(crate) p99_limit_ms: Option<f64>,
    /// Idle connections: totals to reach, stage by stage, e.g. 2000,10000.
    #[arg(long)]
    pub(crate) idle_stages: Option<String>,
    /// Join storm: clients joining at once.
    #[arg(long)]
    pub(crate) storm_clients: Option<u32>,
    /// Join storm: size of the session's document (encoded state, bytes).
    #[arg(long)]
    pub(crate) storm_doc_bytes: Option<usize>,
    /// Join storm: MiB of this tool's memory touched and freed before each storm's clock
    /// starts (default: clients × document, at most half the memory available; 0: none).
    #[arg(long)]
    pub(crate) storm_warm_mib: Option<usize>,
    /// live (apply each update as it arrives), defer (apply between steps) or sample (as
    /// defer for writers and one client per session; the others check and drop updates).
    #[arg(long)]
    pub(crate) apply: Option<String>,
    /// Connections being set up at once.
    #[arg(long)]
    pub(crate) connect_concurrency: Option<usize>,
    /// Do not send an awareness state on connect.
    #[arg(long)]
    pub(crate) no_join_awareness: bool,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub(crate) enum Mode {
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
pub(crate) struct Plan {
    pub(crate) name: String,
    pub(crate) mode: Mode,
    pub(crate) sessions: u32,
    pub(crate) clients: u32,
    pub(crate) writers: u32,
    pub(crate) rate: f64,
    pub(crate) payload: usize,
    /// See `Cli::keep_strokes` (0: the board only grows).
    pub(crate) keep_strokes: u32,
    pub(crate) aw_rate: f64,
    pub(crate) aw_clients: u32,
    pub(crate) duration: f64,
    pub(crate) warmup: f64,
    pub(crate) drain: f64,
    pub(crate) apply: ApplyMode,
    pub(crate) concurrency: usize,
    pub(crate) join_awareness: bool,
    /// Config the started easel gets (the preset's, unless --server-config).
    pub(crate) server_toml: Option<String>,
    pub(crate) compare_baseline: bool,
    /// Join storm: also run the storm against the trivial server.
    pub(crate) compare_trivial: bool,
    /// Join storm: the joiners offer permessage-deflate.
    pub(crate) offer_deflate: bool,
    /// Join storm: MiB to warm before each storm (`None`: clients × document).
    pub(crate) storm_warm_mib: Option<usize>,
    /// The started server on one CPU, this tool on the others (see pin.rs).
    pub(crate) pin: bool,
}

impl Plan {
    /// Bytes to warm before a storm of `clients` joining a board of `doc_bytes` (see
    /// `scenarios::warm_memory`): what their inflated answers hold, at most half the memory
    /// available now.
    pub(crate) fn storm_warm_bytes(&self, clients: u32, doc_bytes: usize) -> usize {
        let wanted = match self.storm_warm_mib {
            Some(mib) => mib << 20,
            None => (clients as usize).saturating_mul(doc_bytes),
        };
        wanted.min(crate::stats::mem_available_bytes() / 2)
    }
}

pub(crate) fn preset(name: &str) -> anyhow::Result<Plan> {
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
        keep_strokes: 0,
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
        pin: false,
        compare_trivial: false,
        offer_deflate: true,
        storm_warm_mib: None,
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
            // Every client keeps what it receives and integrates it after the run (all 100
            // documents are still compared). Applied live, 100 clients' CRDT work runs on
            // the load generator's two threads, on the cores the server uses: a client reads
            // its frame only after the clients before it have integrated theirs, and that
            // queue, not the server, set the p99 (the raw baseline measured 2.9–6.9 ms live,
            // 1.8–2.5 ms deferred in five runs of six, 2026-12-02/03). `--apply live` still
            // measures it.
            apply: ApplyMode::Defer,
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
                // Up to where both easel and the baseline pass 50 ms on this machine (the
                // baseline passed 2,400 under 50 ms on 2026-12-02: 2,880 and 3,360 added).
                ramp: Some(vec![
                    20.0, 40.0, 80.0, 120.0, 160.0, 240.0, 320.0, 480.0, 640.0, 800.0, 960.0,
                    1200.0, 1440.0, 1680.0, 1920.0, 2400.0, 2880.0, 3360.0,
                ]),
                p99_limit_ms: 50.0,
            },
            clients: 100,
            writers: 5,
            aw_rate: 0.0,
            duration: 5.0,
            warmup: 1.0,
            drain: 20.0,
            // A board that only grew passed `limits.max_doc_bytes` (64 MiB) at 1,200 updates/s
            // per writer, where easel refused the writers (1007) as it must: the ramp then
            // measured the limit, not the relay. A live board erases as it is drawn on:
            // 1,000 strokes per writer keep it at about 2.5 MB.
            keep_strokes: 1000,
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
            // As the issue that set e's target measured it: one core for the server, one for
            // the load generator (see pin.rs).
            pin: true,
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
            compare_trivial: true,
            ..base
        },
        other => bail!("unknown scenario {other:?} (smoke, a, b, c, d, e, f, custom)"),
    })
}

pub(crate) fn parse_list<T: std::str::FromStr>(s: &str, what: &str) -> anyhow::Result<Vec<T>> {
    s.split(',')
        .map(|v| v.trim().parse::<T>().ok())
        .collect::<Option<Vec<T>>>()
        .filter(|v| !v.is_empty())
        .with_context(|| format!("{what}: expected a comma-separated list, got {s:?}"))
}

pub(crate) fn resolve(cli: &Cli) -> anyhow::Result<Plan> {
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
    set!(keep_strokes, cli.keep_strokes);
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
    if cli.compare_trivial || cli.no_compare_trivial {
        p.compare_trivial = cli.compare_trivial;
        if p.compare_trivial && !matches!(p.mode, Mode::Storm { .. }) {
            bail!("--compare-trivial is for the join storm (scenario f)");
        }
    }
    if cli.storm_warm_mib.is_some() {
        p.storm_warm_mib = cli.storm_warm_mib;
    }
    if cli.no_deflate {
        p.offer_deflate = false;
    }
    if cli.pin || cli.no_pin {
        p.pin = cli.pin;
    }
    if cli.url.is_some() || cli.nodes.is_some() {
        // A server this tool does not start alone is not pinned by it.
        if cli.pin {
            bail!("--pin is for one server this tool starts (not with --url or --nodes)");
        }
        p.pin = false;
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

pub(crate) fn plan_json(p: &Plan) -> Value {
    json!({
        "scenario": p.name,
        "mode": format!("{:?}", p.mode),
        "sessions": p.sessions,
        "clients_per_session": p.clients,
        "writers_per_session": p.writers,
        "rate_per_writer": p.rate,
        "payload_bytes": p.payload,
        "keep_strokes_per_writer": p.keep_strokes,
        "points_per_stroke": workload::points_for_payload(p.payload),
        "cursor_senders_per_session": p.aw_clients,
        "cursor_rate": p.aw_rate,
        "duration_s": p.duration,
        "warmup_s": p.warmup,
        "apply": format!("{:?}", p.apply),
        "offer_deflate": p.offer_deflate,
        "storm_warm_mib": p.storm_warm_mib,
        "compare_trivial": p.compare_trivial,
        "pin": p.pin,
        "server_config": p.server_toml,
    })
}
