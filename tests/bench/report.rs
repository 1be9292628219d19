//! Markdown output: the machine, one table per scenario (median, min–max, ratio to direct),
//! and the targets with whether each is met.

use std::fmt::Write as _;
use std::process::Command;

use crate::l4::thousands;
use crate::model::{Better, Kind, Metric, ScenarioResult};

/// What the run was: shown above the tables.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub started_utc: String,
    pub command: String,
    pub reps: usize,
    pub secs: u64,
    pub total_secs: f64,
    pub ztunnel_log: String,
    pub machine: String,
    pub versions: String,
    /// 1-minute load average before and after the run: other work on the machine skews
    /// every figure, so the report says how busy it was.
    pub load: (String, String),
}

/// A target from the issue and whether it is met.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub target: String,
    pub figure: String,
    /// `None` when the figure could not be measured in this run.
    pub met: Option<bool>,
}

pub fn render(info: &RunInfo, results: &[ScenarioResult], verdicts: &[Verdict]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### L4 results ({})\n", info.started_utc);
    header(&mut out, info, true);
    for r in results {
        out.push_str(&table(r));
    }
    out.push_str(&targets(verdicts));
    out
}

/// The L7 part: the same layout, cells with a second ratio, to Envoy.
pub fn render_l7(
    info: &RunInfo,
    results: &[ScenarioResult],
    verdicts: &[Verdict],
    chain_notes: &[String],
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### L7 results ({})\n", info.started_utc);
    header(&mut out, info, false);
    let _ = writeln!(
        out,
        "- L7 cells also carry, after `E`, the ratio to Envoy. Every proxy runs on one core \
         (`taskset`), with one worker; \"proxy CPU\" is that one process.\n"
    );
    if !chain_notes.is_empty() {
        let _ = writeln!(out, "Chain check before measuring:\n");
        for n in chain_notes {
            let _ = writeln!(out, "- {n}");
        }
        out.push('\n');
    }
    for r in results {
        out.push_str(&table(r));
    }
    out.push_str(&targets(verdicts));
    out
}

fn header(out: &mut String, info: &RunInfo, l4: bool) {
    let _ = writeln!(out, "- Machine: {}", info.machine);
    let _ = writeln!(out, "- Software: {}", info.versions);
    let _ = writeln!(out, "- Command: `{}`", info.command);
    let _ = writeln!(
        out,
        "- Load average (1 min) before / after: {} / {}",
        info.load.0, info.load.1
    );
    let _ = writeln!(
        out,
        "- {} repetition(s) of {} s per scenario and contender, interleaved (A B C D A B C D …); \
         whole suite {}; {} `RUST_LOG={}` (no per-connection or per-request access log, like \
         the other contenders).",
        info.reps,
        info.secs,
        minutes(info.total_secs),
        if l4 { "ztunnel" } else { "waypoint" },
        info.ztunnel_log
    );
    let _ = writeln!(
        out,
        "- Cells: median (min–max over the runs) and, after `·`, the ratio to direct.{}",
        if l4 {
            " \"Proxy CPU\" is user+system CPU of both proxy processes (both ztunnels, or both \
             sides of a pair).\n"
        } else {
            ""
        }
    );
}

fn table(r: &ScenarioResult) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "#### {}\n", r.title);
    let mut header = String::from("| figure |");
    let mut rule = String::from("|---|");
    for k in &r.kinds {
        let _ = write!(header, " {} |", k.name());
        rule.push_str("---:|");
    }
    let _ = writeln!(out, "{header}\n{rule}");
    for m in &r.metrics {
        if r.kinds.iter().all(|k| r.median(*k, m.id).is_none()) {
            continue;
        }
        let _ = write!(out, "| {} ({}) |", m.label, m.unit);
        let base = r.median(Kind::Direct, m.id);
        let envoy = r.median(Kind::Envoy, m.id);
        for &k in &r.kinds {
            let mut c = cell(r, k, m, base);
            if k != Kind::Envoy
                && k != Kind::Direct
                && let (Some(e), Some(v)) = (envoy.filter(|e| *e != 0.0), r.median(k, m.id))
            {
                let _ = write!(c, " · {:.2}× E", v / e);
            }
            let _ = write!(out, " {c} |");
        }
        out.push('\n');
    }
    let _ = writeln!(out, "\n{} ({})", r.method, minutes(r.elapsed_secs));
    let notes: Vec<String> = r
        .kinds
        .iter()
        .flat_map(|k| {
            r.samples
                .get(k)
                .into_iter()
                .flatten()
                .flat_map(move |s| s.notes.iter().map(move |n| format!("{}: {n}", k.name())))
        })
        .chain(
            r.failures
                .iter()
                .map(|(k, e)| format!("{}: run failed: {e}", k.name())),
        )
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(out, "\nWarnings:");
        for n in notes {
            let _ = writeln!(out, "- {n}");
        }
    }
    out.push('\n');
    out
}

fn cell(r: &ScenarioResult, k: Kind, m: &Metric, base: Option<f64>) -> String {
    let Some(med) = r.median(k, m.id) else {
        return "–".into();
    };
    let mut s = fmt(med, m.decimals);
    let n = r.values(k, m.id).len();
    if n > 1
        && let Some((lo, hi)) = r.min_max(k, m.id)
    {
        let _ = write!(s, " ({}–{})", fmt(lo, m.decimals), fmt(hi, m.decimals));
    }
    if n < r.reps {
        let _ = write!(s, " n={n}");
    }
    if let Some(b) = base.filter(|b| *b != 0.0) {
        let _ = write!(s, " · {:.2}×", med / b);
    }
    s
}

/// A value with `decimals` digits; whole numbers of 1,000 or more get separators.
pub fn fmt(v: f64, decimals: usize) -> String {
    if decimals == 0 && v.abs() >= 1000.0 {
        thousands(v)
    } else {
        format!("{v:.decimals$}")
    }
}

fn targets(verdicts: &[Verdict]) -> String {
    let mut out = String::from("#### Targets\n\n| target | measured | met |\n|---|---|---|\n");
    for v in verdicts {
        let met = match v.met {
            Some(true) => "**yes**",
            Some(false) => "**NO**",
            None if v.figure == "–" => "not measured",
            None => "no verdict",
        };
        let _ = writeln!(out, "| {} | {} | {met} |", v.target, v.figure);
    }
    out.push('\n');
    out
}

fn find<'a>(results: &'a [ScenarioResult], id: &str) -> Option<&'a ScenarioResult> {
    results.iter().find(|r| r.id == id)
}

fn med(results: &[ScenarioResult], scenario: &str, kind: Kind, metric: &str) -> Option<f64> {
    find(results, scenario)?.median(kind, metric)
}

/// Checks the targets against the medians.
pub fn verdicts(results: &[ScenarioResult]) -> Vec<Verdict> {
    let mut v = Vec::new();
    let zt = Kind::Ztunnel;

    let (d, z) = (
        med(results, "throughput", Kind::Direct, "gbps"),
        med(results, "throughput", zt, "gbps"),
    );
    v.push(match (d, z) {
        (Some(d), Some(z)) => Verdict {
            target: "HBONE single-stream throughput ≥ 30 % of direct".into(),
            figure: format!("{:.0} % ({z:.2} vs {d:.2} Gbit/s)", z / d * 100.0),
            met: Some(z / d >= 0.30),
        },
        _ => unmeasured("HBONE single-stream throughput ≥ 30 % of direct"),
    });

    for (p, limit) in [("p50_us", 100.0), ("p99_us", 500.0)] {
        let name = format!(
            "added latency (both ztunnels) ≤ {limit:.0} µs {} at 1,000 rps",
            &p[..3]
        );
        let (d, z) = (
            med(results, "latency", Kind::Direct, p),
            med(results, "latency", zt, p),
        );
        v.push(match (d, z) {
            (Some(d), Some(z)) => Verdict {
                target: name,
                figure: format!("{:+.0} µs ({z:.0} vs {d:.0} µs)", z - d),
                met: Some(z - d <= limit),
            },
            _ => unmeasured(&name),
        });
    }

    for (metric, limit, name) in [
        ("idle_mb", 15.0, "ztunnel idle memory ≤ 15 MB"),
        (
            "conns_mb",
            40.0,
            "ztunnel memory ≤ 40 MB with 1,000 open connections",
        ),
    ] {
        v.push(match med(results, "memory", zt, metric) {
            Some(m) => Verdict {
                target: name.into(),
                figure: format!("{m:.1} MB (larger of the two ztunnels)"),
                met: Some(m <= limit),
            },
            None => unmeasured(name),
        });
    }

    // Better than the stunnel pair on every figure both report.
    let mut worse = Vec::new();
    let mut compared = 0;
    for r in results {
        for m in &r.metrics {
            let (Some(z), Some(s)) = (r.median(zt, m.id), r.median(Kind::Stunnel, m.id)) else {
                continue;
            };
            compared += 1;
            let better = match m.better {
                Better::Higher => z > s,
                Better::Lower => z < s,
            };
            if !better {
                worse.push(format!(
                    "{} {}: {} vs {} {}",
                    r.id,
                    m.label,
                    fmt(z, m.decimals),
                    fmt(s, m.decimals),
                    m.unit
                ));
            }
        }
    }
    let name = "ztunnel better than the stunnel pair on every figure";
    v.push(if compared == 0 {
        unmeasured(name)
    } else if worse.is_empty() {
        Verdict {
            target: name.into(),
            figure: format!("better on all {compared} figures"),
            met: Some(true),
        }
    } else {
        Verdict {
            target: name.into(),
            figure: format!(
                "worse on {} of {compared}: {}",
                worse.len(),
                worse.join("; ")
            ),
            met: Some(false),
        }
    });
    v
}

/// Checks the L7 targets against the medians.
pub fn verdicts_l7(results: &[ScenarioResult]) -> Vec<Verdict> {
    let (wp, envoy) = (Kind::Waypoint, Kind::Envoy);
    let mut v = Vec::new();
    for r in results.iter().filter(|r| r.id.starts_with("l7-h")) {
        let name = format!(
            "waypoint ≥ 2× Envoy's requests per core, full chain ({})",
            r.id.trim_start_matches("l7-")
        );
        v.push(
            match (
                r.median(wp, "rps_per_core"),
                r.median(envoy, "rps_per_core"),
            ) {
                (Some(w), Some(e)) if e > 0.0 => {
                    let mut figure =
                        format!("{:.2}× ({} vs {} req/CPU-s)", w / e, fmt(w, 0), fmt(e, 0));
                    // Where the difference lies: the proxy's own code, or the kernel's
                    // socket work that every proxy pays alike.
                    let split = |id| Some((r.median(wp, id)?, r.median(envoy, id)?));
                    if let (Some((wu, eu)), Some((ws, es))) =
                        (split("user_ms_per_1k"), split("sys_ms_per_1k"))
                    {
                        let _ = write!(
                            figure,
                            "; per 1,000 requests, user space {} vs {} CPU ms, kernel {} vs {}",
                            fmt(wu, 1),
                            fmt(eu, 1),
                            fmt(ws, 1),
                            fmt(es, 1)
                        );
                    }
                    Verdict {
                        target: name,
                        figure,
                        met: Some(w >= 2.0 * e),
                    }
                }
                _ => unmeasured(&name),
            },
        );
    }
    for r in results.iter().filter(|r| r.id.starts_with("l7-latency")) {
        let name = format!(
            "waypoint p99 ≤ Envoy's at a fixed rate ({})",
            r.id.trim_start_matches("l7-latency-")
        );
        // A proxy that could not keep up with the rate was starved, not slow: its
        // percentiles measure the queue, so no verdict.
        let starved: Vec<&str> = [wp, envoy]
            .into_iter()
            .filter(|k| {
                r.samples
                    .get(k)
                    .into_iter()
                    .flatten()
                    .any(|s| s.notes.iter().any(|n| n.starts_with("achieved only")))
            })
            .map(Kind::name)
            .collect();
        v.push(match (r.median(wp, "p99_us"), r.median(envoy, "p99_us")) {
            (Some(w), Some(e)) if starved.is_empty() => Verdict {
                target: name,
                figure: format!("{} vs {} µs", fmt(w, 0), fmt(e, 0)),
                met: Some(w <= e),
            },
            (Some(w), Some(e)) => Verdict {
                target: name,
                figure: format!(
                    "{} vs {} µs, but {} fell short of the rate (CPU-starved): no verdict",
                    fmt(w, 0),
                    fmt(e, 0),
                    starved.join(" and ")
                ),
                met: None,
            },
            _ => unmeasured(&name),
        });
    }
    let name = "waypoint memory ≤ 30 MB at 1,000 rps";
    let peak = results
        .iter()
        .filter(|r| r.id.starts_with("l7-latency"))
        .filter_map(|r| r.median(wp, "rss_mb"))
        .reduce(f64::max);
    v.push(match peak {
        Some(m) => Verdict {
            target: name.into(),
            figure: format!("{m:.1} MB (peak VmRSS, median over runs)"),
            met: Some(m <= 30.0),
        },
        None => unmeasured(name),
    });
    v
}

fn unmeasured(name: &str) -> Verdict {
    Verdict {
        target: name.into(),
        figure: "–".into(),
        met: None,
    }
}

fn minutes(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 60 {
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        format!("{s} s")
    }
}

/// The 1-minute load average.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// CPU model, CPU count, memory, kernel and distribution.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|x| x.1))
        .map_or("unknown CPU", str::trim)
        .to_string();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kb: f64 = m
                .lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some(kb / 1024.0 / 1024.0)
        })
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let distro = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|s| s.trim_matches('"').to_string())
        })
        .unwrap_or_default();
    format!("{model}, nproc {nproc}, {mem_gib:.0} GiB RAM, Linux {kernel}, {distro}")
}

/// Versions of the binaries involved, and the commit ztunnel was built from.
pub fn versions(repo: &std::path::Path) -> String {
    let first_line = |prog: &str, args: &[&str], pick: &dyn Fn(&str) -> Option<String>| {
        let out = Command::new(prog).args(args).output().ok()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        text.lines().find_map(pick)
    };
    let word_after = |prefix: &'static str| {
        move |l: &str| {
            l.find(prefix).map(|i| {
                l[i + prefix.len()..]
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
        }
    };
    let mut parts = Vec::new();
    let commit = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let dirty = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    if let Some(c) = commit {
        parts.push(format!(
            "Ambit {c}{}",
            if dirty {
                " (with uncommitted changes)"
            } else {
                ""
            }
        ));
    }
    let tools: [(&str, &str, &[&str], &'static str); 6] = [
        ("iperf3", "iperf3", &["--version"], "iperf "),
        ("wrk", "wrk", &["-v"], "wrk "),
        ("nginx", "nginx", &["-v"], "nginx/"),
        ("stunnel", "stunnel4", &["-version"], "stunnel "),
        ("HAProxy", "haproxy", &["-v"], "version "),
        ("OpenSSL", "openssl", &["version"], "OpenSSL "),
    ];
    for (name, prog, args, prefix) in tools {
        if let Some(v) = first_line(prog, args, &word_after(prefix)) {
            parts.push(format!("{name} {v}"));
        }
    }
    parts.join(", ")
}

/// Now, as `YYYY-MM-DD HH:MM UTC`, and as `YYYY-MM-DD-HHMM` for file names.
pub fn now_utc() -> (String, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
    let (h, mi) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    (
        format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02} UTC"),
        format!("{y:04}-{mo:02}-{d:02}-{h:02}{mi:02}"),
    )
}

/// Days since 1970-01-01 to (year, month, day), after Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Sample;
    use std::collections::BTreeMap;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_513), (2026, 3, 1));
    }

    fn result(values: &[(Kind, &[f64])]) -> ScenarioResult {
        let mut samples = BTreeMap::new();
        for (k, vs) in values {
            let v: Vec<Sample> = vs
                .iter()
                .map(|x| {
                    let mut s = Sample::default();
                    s.set("gbps", *x);
                    s
                })
                .collect();
            samples.insert(*k, v);
        }
        ScenarioResult {
            id: "throughput",
            title: "T".into(),
            method: "M".into(),
            metrics: vec![Metric {
                id: "gbps",
                label: "throughput",
                unit: "Gbit/s",
                better: Better::Higher,
                decimals: 2,
            }],
            kinds: values.iter().map(|(k, _)| *k).collect(),
            samples,
            failures: Vec::new(),
            reps: 3,
            elapsed_secs: 1.0,
        }
    }

    #[test]
    fn table_has_median_range_and_ratio() {
        let r = result(&[
            (Kind::Direct, &[10.0, 12.0, 11.0]),
            (Kind::Ztunnel, &[4.0, 3.0, 5.5]),
            (Kind::Stunnel, &[2.0, 2.0]),
        ]);
        let t = table(&r);
        assert!(t.contains("| 11.00 (10.00–12.00) · 1.00× |"), "{t}");
        assert!(t.contains("| 4.00 (3.00–5.50) · 0.36× |"), "{t}");
        assert!(t.contains("| 2.00 (2.00–2.00) n=2 · 0.18× |"), "{t}");
        let v = verdicts(&[r]);
        assert_eq!(v[0].met, Some(true), "{:?}", v[0]);
        assert!(v[0].figure.starts_with("36 %"));
        let last = v.last().expect("stunnel verdict");
        assert_eq!(last.met, Some(true), "{last:?}");
    }
}
