//! `ambit-bench`: Ambit's benchmark runner.
//!
//! Two suites, each on a simulated cluster built with the test harness, each measuring every
//! scenario for every contender interleaved (A B C D A B C D …) and printing one markdown
//! table per scenario (median, min–max, ratio to direct) plus the targets; a full run writes
//! both to `bench-results/bench-<date>.md`. Nothing here asserts on timings: the figures are
//! reported, never tested.
//!
//! - L4 ([`l4`]): pod to pod across two nodes: direct TCP, ztunnel, a stunnel4 pair, an
//!   HAProxy pair.
//! - L7 ([`l7`]): HTTP/1.1 and h2c through one proxy pinned to one core: direct, nginx,
//!   Envoy and the waypoint, each with a route, retries, outlier detection, authorization
//!   and metrics; cells also carry the ratio to Envoy.
//!
//! ```text
//! tests/bench/run.sh            # installs tools, builds release binaries, runs both suites
//! ambit-bench --quick           # 1 repetition of 2 s runs, for development
//! ambit-bench --suite l4 --only latency --contenders direct,ztunnel
//! ambit-bench --suite l7 --only l7-h1-tiny,l7-latency-tiny
//! ```
//!
//! Modules: [`model`] (contenders, metrics, the interleaved runner), [`topology`] (the L4
//! cluster), [`tunnels`] (stunnel/HAProxy pairs), [`l4`] and [`l7`] (the scenarios),
//! [`tools`] (iperf3, wrk), [`load`] (the in-pod generators behind the hidden `load`
//! subcommand), [`procfs`] (CPU and memory), [`report`] (markdown).

mod l4;
mod l7;
mod load;
mod model;
mod procfs;
mod report;
mod tools;
mod topology;
mod tunnels;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::model::Kind;

#[derive(Debug, Parser)]
#[command(
    name = "ambit-bench",
    about = "Benchmarks Ambit's data plane (L4: ztunnel against direct TCP, stunnel and \
             HAProxy; L7: the waypoint against Envoy, nginx and direct) on a simulated \
             cluster (needs root)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Load generators run inside pods by the benchmark itself.
    #[command(hide = true, subcommand)]
    Load(load::LoadCmd),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Suite {
    /// L4 then L7, into one results file.
    All,
    /// Pod to pod through ztunnel, stunnel, HAProxy.
    L4,
    /// HTTP through the waypoint, Envoy and nginx, each pinned to one core.
    L7,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Which suite to run.
    #[arg(long, value_enum, default_value_t = Suite::All)]
    suite: Suite,
    /// Development mode: 1 repetition of 2 s runs (overridden by --reps / --secs).
    #[arg(long)]
    quick: bool,
    /// Repetitions per scenario and contender [default: 5].
    #[arg(long)]
    reps: Option<usize>,
    /// Seconds per measured L4 run [default: 3].
    #[arg(long)]
    secs: Option<u64>,
    /// Seconds per measured L7 run [default: 3].
    #[arg(long)]
    l7_secs: Option<u64>,
    /// Run only these scenarios (L4: throughput, latency, saturation, connrate, memory;
    /// L7: l7-h1-tiny, l7-h1-16k, l7-h2c-tiny, l7-h2c-16k, l7-latency-tiny,
    /// l7-latency-16k). A suite none of whose scenarios is named is skipped.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// L4 contenders; direct (the baseline) is always included.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,ztunnel,stunnel,haproxy,relay"
    )]
    contenders: Vec<Kind>,
    /// L7 contenders; direct is always included.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,nginx,envoy,waypoint"
    )]
    l7_contenders: Vec<Kind>,
    /// The CPU the L7 proxy is pinned to (the load generator and upstream take another).
    #[arg(long, default_value_t = 1)]
    proxy_cpu: usize,
    /// Where the markdown results file goes.
    #[arg(long, default_value = "bench-results")]
    results_dir: PathBuf,
    /// RUST_LOG for ztunnel. The default turns off the per-connection access log, since no
    /// other contender logs per connection either.
    #[arg(long, default_value = "info,access=off")]
    ztunnel_log: String,
    /// Total request rate of the fixed-rate latency scenario.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Keep-alive connections sharing that rate (each on its own schedule).
    #[arg(long, default_value_t = 10)]
    rate_conns: usize,
    /// For profiling: after set-up, print how to reach each pod and keep the cluster up for
    /// this many seconds (or until Ctrl-C) instead of measuring.
    #[arg(long, value_name = "SECS")]
    linger: Option<u64>,
}

/// Set by the signal thread on SIGINT, SIGTERM or SIGHUP.
static STOP: AtomicBool = AtomicBool::new(false);

fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// Turns SIGINT, SIGTERM and SIGHUP into the [`STOP`] flag, so the run stops between
/// measurements and the cluster is torn down by the normal drop path. The handlers live on
/// a small tokio runtime of their own; signal *masks* are left alone, since children inherit
/// them across exec (a blocked SIGTERM would make every `stop()` wait for its SIGKILL).
fn handle_signals() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("starting the signal runtime")?;
    let install = |kind: SignalKind, name: &str| {
        runtime
            .block_on(async { signal(kind) })
            .with_context(|| format!("installing the {name} handler"))
    };
    let mut int = install(SignalKind::interrupt(), "SIGINT")?;
    let mut term = install(SignalKind::terminate(), "SIGTERM")?;
    let mut hup = install(SignalKind::hangup(), "SIGHUP")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            runtime.block_on(async move {
                loop {
                    let name = tokio::select! {
                        _ = int.recv() => "SIGINT",
                        _ = term.recv() => "SIGTERM",
                        _ = hup.recv() => "SIGHUP",
                    };
                    eprintln!(
                        "ambit-bench: {name}: stopping after the current run, then cleaning up"
                    );
                    STOP.store(true, Ordering::Relaxed);
                }
            });
        })
        .context("starting the signal thread")?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Some(Cmd::Load(cmd)) => load::run(cmd),
        None => handle_signals().and_then(|()| run(&cli.run)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ambit-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The tools every contender needs, and the package that provides each.
const TOOLS: [(&str, &str); 6] = [
    ("iperf3", "iperf3"),
    ("wrk", "wrk"),
    ("nginx", "nginx-light"),
    ("stunnel4", "stunnel4"),
    ("haproxy", "haproxy"),
    ("curl", "curl"),
];

/// What the L7 suite needs besides Envoy.
const L7_TOOLS: [(&str, &str); 5] = [
    ("wrk", "wrk"),
    ("h2load", "nghttp2-client"),
    ("nginx", "nginx-light"),
    ("taskset", "util-linux"),
    ("curl", "curl"),
];

fn check_tools(tools: &[(&str, &str)]) -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<String> = tools
        .iter()
        .filter(|(bin, _)| !std::env::split_paths(&path).any(|d| d.join(bin).is_file()))
        .map(|(bin, pkg)| format!("{bin} (apt-get install {pkg})"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing tools: {}; tests/bench/run.sh installs them",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Which suites run: those selected by `--suite` that `--only` leaves something of.
fn suites(args: &RunArgs) -> Result<(bool, bool)> {
    for id in &args.only {
        if !l4::SCENARIO_IDS.contains(&id.as_str()) && !l7::SCENARIO_IDS.contains(&id.as_str()) {
            bail!(
                "unknown scenario {id:?}; known: {}, {}",
                l4::SCENARIO_IDS.join(", "),
                l7::SCENARIO_IDS.join(", ")
            );
        }
    }
    let named =
        |ids: &[&str]| args.only.is_empty() || args.only.iter().any(|o| ids.contains(&o.as_str()));
    let l4 = matches!(args.suite, Suite::All | Suite::L4) && named(&l4::SCENARIO_IDS);
    let l7 = matches!(args.suite, Suite::All | Suite::L7) && named(&l7::SCENARIO_IDS);
    ensure!(l4 || l7, "--only names no scenario of the selected suite");
    Ok((l4, l7))
}

fn run(args: &RunArgs) -> Result<()> {
    let started = Instant::now();
    let (run_l4_suite, run_l7_suite) = suites(args)?;
    harness::require_privileges().map_err(|e| anyhow::anyhow!("{e} (run as root)"))?;
    // Children inherit the limit: nginx, the tunnels and the generators hold many sockets.
    load::raise_nofile_limit();
    let (_, stamp) = report::now_utc();
    let mut text = String::new();
    let mut error = None;
    if run_l4_suite {
        let (t, e) = run_l4(args)?;
        text.push_str(&t);
        error = e;
    }
    if run_l7_suite && error.is_none() && !stopped() {
        let (t, e) = run_l7(args)?;
        text.push_str(&t);
        error = e;
    }
    println!("{text}");
    let prefix = match (run_l4_suite, run_l7_suite) {
        (true, true) => "bench",
        (true, false) => "l4",
        _ => "l7",
    };
    let name = format!(
        "{prefix}-{}{stamp}.md",
        if args.quick { "quick-" } else { "" }
    );
    let path = args.results_dir.join(name);
    write_results(&path, &text)?;
    eprintln!(
        "ambit-bench: wrote {} ({})",
        path.display(),
        report_minutes(started.elapsed())
    );
    match error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn command_line() -> String {
    std::env::var("AMBIT_BENCH_COMMAND").unwrap_or_else(|_| {
        std::iter::once("ambit-bench".to_string())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" ")
    })
}

/// Runs the L7 suite; returns its markdown and the error that stopped it early, if any.
fn run_l7(args: &RunArgs) -> Result<(String, Option<anyhow::Error>)> {
    let started = Instant::now();
    let (started_utc, _) = report::now_utc();
    let load_before = report::loadavg();
    let reps = args.reps.unwrap_or(if args.quick { 1 } else { 5 }).max(1);
    let secs = args
        .l7_secs
        .unwrap_or(if args.quick { 2 } else { 3 })
        .max(1);
    let mut kinds = args.l7_contenders.clone();
    kinds.push(Kind::Direct);
    kinds.sort();
    kinds.dedup();
    if let Some(k) = kinds.iter().find(|k| !l7::KINDS.contains(k)) {
        bail!(
            "{} is not an L7 contender (those are direct, nginx, envoy, waypoint)",
            k.name()
        );
    }
    check_tools(&L7_TOOLS)?;
    if kinds.contains(&Kind::Waypoint) {
        l7::check_waypoint_has_plaintext(&harness::bin_path("waypoint")?)?;
    }
    let envoy = if kinds.contains(&Kind::Envoy) {
        Some(l7::envoy_bin()?)
    } else {
        None
    };
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    ensure!(
        ncpu >= 2,
        "the L7 suite pins the proxy and the load to different CPUs: needs 2"
    );
    let proxy_cpu = args.proxy_cpu.min(ncpu - 1);
    let settings = l7::L7Settings {
        secs,
        rate: args.rate,
        rate_conns: args.rate_conns.max(1),
        wrk_conns: 32,
        h2_clients: 8,
        h2_streams: 10,
        proxy_cpu,
        load_cpu: if proxy_cpu == 0 { 1 } else { 0 },
    };
    eprintln!(
        "ambit-bench: L7 suite, contenders {}, {reps} repetition(s) of {secs} s",
        kinds
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut bench = l7::L7Bench::new(&settings, &kinds)?;
    eprintln!(
        "ambit-bench: L7 cluster {} ready ({:.1} s)",
        bench.cluster.id(),
        started.elapsed().as_secs_f64()
    );
    for n in &bench.chain_notes {
        eprintln!("ambit-bench: {n}");
    }
    if let Some(secs) = args.linger {
        bench.linger(secs, &stopped)?;
        return Ok((String::new(), None));
    }
    // One short unmeasured pass per contender: connection pools, caches, CPU frequency.
    let warm = l7::L7Settings {
        secs: 1,
        ..settings.clone()
    };
    for scenario in l7::scenarios(&warm).iter().take(1) {
        model::run_interleaved(&mut bench, scenario.as_ref(), &kinds, 1, &stopped)?;
    }
    let mut results = Vec::new();
    let mut error = None;
    for scenario in l7::scenarios(&settings) {
        if !args.only.is_empty() && !args.only.iter().any(|o| o == scenario.id()) {
            continue;
        }
        match model::run_interleaved(&mut bench, scenario.as_ref(), &kinds, reps, &stopped) {
            Ok(r) => results.push(r),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    let notes = std::mem::take(&mut bench.chain_notes);
    drop(bench);
    let mut versions = report::versions(&repo_dir());
    for (name, prog, args) in [
        ("Envoy", envoy.map(|p| p.display().to_string()), "--version"),
        ("h2load", Some("h2load".to_string()), "--version"),
    ] {
        if let Some(v) = prog
            .and_then(|p| std::process::Command::new(p).arg(args).output().ok())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .and_then(|t| t.split_whitespace().last().map(str::to_string))
        {
            versions.push_str(&format!(", {name} {v}"));
        }
    }
    let info = report::RunInfo {
        started_utc,
        command: command_line(),
        reps,
        secs,
        total_secs: started.elapsed().as_secs_f64(),
        ztunnel_log: "info,access=off".into(),
        machine: report::machine(),
        versions,
        load: (load_before, report::loadavg()),
    };
    let mut text = report::render_l7(&info, &results, &report::verdicts_l7(&results), &notes);
    if let Some(e) = &error {
        text.push_str(&format!("**INCOMPLETE: the run stopped early: {e:#}**\n"));
    }
    Ok((text, error))
}

/// Runs the L4 suite; returns its markdown and the error that stopped it early, if any.
fn run_l4(args: &RunArgs) -> Result<(String, Option<anyhow::Error>)> {
    let started = Instant::now();
    let (started_utc, _) = report::now_utc();
    let load_before = report::loadavg();
    let reps = args.reps.unwrap_or(if args.quick { 1 } else { 5 }).max(1);
    let secs = args.secs.unwrap_or(if args.quick { 2 } else { 3 }).max(1);
    let mut kinds = args.contenders.clone();
    kinds.push(Kind::Direct);
    kinds.sort();
    kinds.dedup();
    if let Some(k) = kinds.iter().find(|k| !k.is_l4()) {
        bail!("{} is not an L4 contender", k.name());
    }
    check_tools(&TOOLS)?;

    let settings = l4::L4Settings {
        secs,
        rate: args.rate,
        rate_conns: args.rate_conns.max(1),
        wrk_threads: 1,
        wrk_conns: 32,
        conn_workers: 4,
        hold_conns: 1000,
        fake_workloads: 10_000,
        settle: Duration::from_secs(1),
    };
    eprintln!(
        "ambit-bench: L4 suite, contenders {}, {reps} repetition(s) of {secs} s",
        kinds
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprintln!("ambit-bench: building the simulated cluster");
    let mut bench = topology::Bench::new(&topology::TopologyOpts {
        kinds: kinds.clone(),
        ztunnel_log: args.ztunnel_log.clone(),
    })?;
    eprintln!(
        "ambit-bench: cluster {} ready ({:.1} s); warming up",
        bench.cluster.id(),
        started.elapsed().as_secs_f64()
    );
    warm_up(&bench, &settings)?;
    if let Some(secs) = args.linger {
        linger(&bench, secs)?;
        return Ok((String::new(), None));
    }

    let mut results = Vec::new();
    let mut error = None;
    for scenario in l4::scenarios(&settings) {
        if !args.only.is_empty() && !args.only.iter().any(|o| o == scenario.id()) {
            continue;
        }
        match model::run_interleaved(&mut bench, scenario.as_ref(), &kinds, reps, &stopped) {
            Ok(r) => results.push(r),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    drop(bench);

    let info = report::RunInfo {
        started_utc,
        command: command_line(),
        reps,
        secs,
        total_secs: started.elapsed().as_secs_f64(),
        ztunnel_log: args.ztunnel_log.clone(),
        machine: report::machine(),
        versions: report::versions(&repo_dir()),
        load: (load_before, report::loadavg()),
    };
    let mut text = report::render(&info, &results, &report::verdicts(&results));
    if let Some(e) = &error {
        text.push_str(&format!("**INCOMPLETE: the run stopped early: {e:#}**\n"));
    }
    Ok((text, error))
}

/// One short unmeasured pass over every contender: TLS session caches, HBONE pools, page
/// cache and CPU frequency settle before the first measured run.
fn warm_up(bench: &topology::Bench, s: &l4::L4Settings) -> Result<()> {
    for c in &bench.contenders {
        if stopped() {
            bail!("interrupted");
        }
        tools::iperf3(&c.client, c.iperf, 1)
            .with_context(|| format!("warm-up iperf3 through {}", c.kind.name()))?;
        tools::wrk(&c.client, c.http, s.wrk_threads, s.wrk_conns, 1)
            .with_context(|| format!("warm-up wrk through {}", c.kind.name()))?;
    }
    Ok(())
}

/// Prints where everything is and keeps the cluster up (for perf, tcpdump, strace).
fn linger(bench: &topology::Bench, secs: u64) -> Result<()> {
    let exe = std::env::current_exe().context("locating ambit-bench")?;
    for (zt, node) in bench
        .ztunnels
        .iter()
        .zip(["a (sources)", "b (destinations)"])
    {
        eprintln!("ztunnel on node {node}: pid {:?}", zt.pid());
    }
    for c in &bench.contenders {
        eprintln!(
            "{}: proxy pids {:?}; in the client pod:\n  nsenter --net={} sh -c 'echo $$ > {}/cgroup.procs; \
             exec {} load fixed-rate --to {} --rate 1000 --secs 10'",
            c.kind.name(),
            bench.proxy_pids(c.kind)?,
            c.client.netns_path().display(),
            c.client.cgroup_dir().display(),
            exe.display(),
            c.http,
        );
    }
    eprintln!("ambit-bench: lingering for {secs} s (Ctrl-C ends it and cleans up)");
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until && !stopped() {
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn write_results(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The workspace root (for the commit shown in the report).
fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn report_minutes(d: Duration) -> String {
    let s = d.as_secs();
    format!("{} min {:02} s", s / 60, s % 60)
}
