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
//! see BENCHMARKS.md for the commands and results. A run can be repeated against other
//! servers to compare: the baseline fan-out server (e), the trivial join server (f), one
//! node (a cluster run).

mod client;
mod plan;
mod raw;
mod scenarios;
mod stats;
mod target;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use easel_bench::pin;
use serde_json::{json, Value};

use client::Phase;
use plan::{plan_json, Cli, Mode, Plan};
use scenarios::{run_fanout, run_idle, run_storm, storm_answer, storm_comparison, Run};
use stats::r3;
use target::{Kind, RedisChoice, Target};

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

/// How many nodes `--nodes` asks this tool to start (None: a list of URLs, or absent).
fn nodes_to_start(cli: &Cli) -> anyhow::Result<Option<u32>> {
    match cli.nodes.as_deref() {
        Some(n) if n.chars().all(|c| c.is_ascii_digit()) => {
            let n: u32 = n.parse().context("--nodes")?;
            if !(1..=16).contains(&n) {
                bail!("--nodes: 1 to 16 nodes");
            }
            Ok(Some(n))
        }
        _ => Ok(None),
    }
}

fn start_target(
    cli: &Cli,
    plan: &Plan,
    kind: Kind,
    bin: Option<&PathBuf>,
    server_cpus: Option<&[usize]>,
) -> anyhow::Result<Target> {
    let urls = cli
        .url
        .clone()
        .or_else(|| cli.nodes.clone().filter(|n| n.starts_with("ws://")));
    let toml = if kind == Kind::Easel {
        plan.server_toml.as_deref()
    } else {
        None
    };
    match (bin, urls, nodes_to_start(cli)?) {
        (Some(bin), _, Some(nodes)) if kind == Kind::Easel => {
            let redis = match &cli.redis_url {
                Some(url) => RedisChoice::Url {
                    url: url.clone(),
                    pid: cli.redis_pid,
                },
                None => RedisChoice::Start {
                    fsync: cli.redis_fsync.clone(),
                },
            };
            Target::start_cluster(bin, toml, nodes, &redis)
        }
        (Some(bin), _, _) => Target::start(kind, bin, toml, server_cpus),
        (None, Some(urls), _) => {
            let secret = match kind {
                Kind::Easel => cli
                    .secret
                    .clone()
                    .context("--url needs --secret (or EASEL_JWT_SECRET)")?,
                Kind::Baseline | Kind::Trivial => String::new(),
            };
            Target::external(kind, &urls, secret, cli.server_pid.clone(), cli.redis_pid)
        }
        (None, None, _) => bail!("give --server-bin PATH or --url ws://127.0.0.1:PORT"),
    }
}

/// Runs the plan once against `target`, then stops it (printing its log's tail if the run
/// failed or the server died) and prints the summary under `label`.
async fn run_against(plan: &Plan, label: &str, mut target: Target) -> anyhow::Result<Value> {
    let result = run_once(plan, &mut target).await;
    if result.is_err() || !target.alive() {
        let tail = target.stderr_tail();
        if !tail.is_empty() {
            eprintln!("server stderr (last lines):\n{tail}");
        }
    }
    target.stop();
    let v = result?;
    print_summary(label, &v);
    Ok(v)
}

/// `given`, else the binary `name` in this one's directory.
fn sibling_bin(given: Option<&PathBuf>, name: &str) -> anyhow::Result<PathBuf> {
    match given {
        Some(bin) => Ok(bin.clone()),
        None => Ok(std::env::current_exe()?
            .parent()
            .context("no directory for this binary")?
            .join(name)),
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

/// `machine` describes the machine (taken before this process pinned itself) and the split.
async fn main_async(
    cli: Cli,
    plan: Plan,
    split: Option<pin::Split>,
    machine: String,
) -> anyhow::Result<bool> {
    let kind = if cli.baseline {
        Kind::Baseline
    } else {
        Kind::Easel
    };
    let server_cpus = split.as_ref().map(|s| s.server.as_slice());
    eprintln!(
        "easel-loadgen: scenario {} against {} ({machine})",
        plan.name,
        kind.name(),
    );
    let target = start_target(&cli, &plan, kind, cli.server_bin.as_ref(), server_cpus)?;
    let target_nodes = target.nodes();
    if target_nodes > 1 {
        eprintln!(
            "easel-loadgen: clients spread over {} nodes: {}",
            target_nodes,
            target.bases.join(", ")
        );
    }
    let main = run_against(&plan, kind.name(), target).await?;
    let mut ok = main["ok"].as_bool().unwrap_or(false);
    let mut report = json!({
        "date": stats::now_utc(),
        "machine": machine,
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "plan": plan_json(&plan),
        "result": main,
    });
    if cli.compare_single && target_nodes > 1 {
        let bin = cli
            .server_bin
            .as_ref()
            .context("--compare-single needs --server-bin")?;
        eprintln!("easel-loadgen: the same scenario on one easel node on sled");
        let target = Target::start(Kind::Easel, bin, plan.server_toml.as_deref(), server_cpus)?;
        let single = run_against(&plan, "single node (sled)", target).await?;
        ok &= single["ok"].as_bool().unwrap_or(false);
        report["single_node"] = single;
    }
    if plan.compare_baseline && kind == Kind::Easel {
        let bin = sibling_bin(cli.baseline_bin.as_ref(), "baseline-fanout")?;
        eprintln!(
            "easel-loadgen: the same scenario against the baseline ({})",
            bin.display()
        );
        let target = Target::start(Kind::Baseline, &bin, None, server_cpus)?;
        let b = run_against(&plan, "baseline", target).await?;
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
            // A knee where this tool was saturated may be its own limit: say so.
            let loadgen_knee = |v: &Value| v["saturation"]["knee_loadgen_saturated"] == json!(true);
            let (e_lg, b_lg) = (loadgen_knee(&report["result"]), loadgen_knee(&b));
            let caveat = match (e_lg, b_lg) {
                (false, false) => String::new(),
                (true, false) => " (easel's knee: the load generator saturated)".into(),
                (false, true) => " (the baseline's knee: the load generator saturated)".into(),
                (true, true) => " (both knees: the load generator saturated)".into(),
            };
            eprintln!(
                "== easel / baseline: {:.0} / {:.0} deliveries/s = {:.2}; CPU per delivery {:.2} / {:.2} µs{caveat}",
                e_dps, b_dps, ratio, e_cpu, b_cpu
            );
            report["comparison"] = json!({
                "easel_deliveries_per_s": e_dps,
                "baseline_deliveries_per_s": b_dps,
                "ratio": r3(ratio),
                "easel_cpu_us_per_delivery": e_cpu,
                "baseline_cpu_us_per_delivery": b_cpu,
                "easel_knee_loadgen_saturated": e_lg,
                "baseline_knee_loadgen_saturated": b_lg,
            });
        }
        report["baseline"] = b;
    }
    if let (true, Kind::Easel, Mode::Storm { doc_bytes, .. }) =
        (plan.compare_trivial, kind, &plan.mode)
    {
        let bin = sibling_bin(cli.trivial_bin.as_ref(), "trivial-join")?;
        eprintln!("easel-loadgen: building a {doc_bytes}-byte board for the trivial server");
        let (message, step2) = storm_answer(*doc_bytes)?;
        eprintln!(
            "easel-loadgen: the same storm against the trivial server ({}), answering a {}-byte message",
            bin.display(),
            message.len()
        );
        let target = Target::start_trivial(&bin, &message, step2, plan.offer_deflate)?;
        let t = run_against(&plan, "trivial", target).await?;
        ok &= t["ok"].as_bool().unwrap_or(false);
        report["trivial_comparison"] = storm_comparison(&report["result"], &t);
        report["trivial"] = t;
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
    let plan = match plan::resolve(&cli) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    // Before the runtime starts: its threads inherit this thread's CPUs.
    let split = match plan.pin.then(pin::Split::of_allowed).transpose() {
        Ok(split) => split.flatten(),
        Err(e) => {
            eprintln!("error: cannot read this process's CPUs: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let machine = match &split {
        Some(split) => format!("{}; {}", stats::machine(), split.describe()),
        None if plan.pin => format!("{}; one CPU: nothing pinned", stats::machine()),
        None => stats::machine(),
    };
    if let Some(split) = &split {
        if let Err(e) = pin::pin_current_thread(&split.loadgen) {
            eprintln!("error: cannot pin the load generator: {e}");
            return std::process::ExitCode::from(2);
        }
    }
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
    match runtime.block_on(main_async(cli, plan, split, machine)) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
