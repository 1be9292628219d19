//! What a benchmark measures and how runs are scheduled: contenders, metrics, samples, and
//! the interleaved runner shared by every suite (L4 now, L7 once the waypoint exists).

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Result, bail};

/// One way of carrying pod-to-pod traffic. The order here is the column order of every
/// table and the order of every interleaved round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Kind {
    /// Plain TCP between the pods, no mesh: the baseline every ratio is against.
    Direct,
    /// Both pods enrolled: captured by eBPF and carried in HBONE between two ztunnels.
    Ztunnel,
    /// "DIY TLS without a mesh": stunnel4 in client mode in the source pod, in server mode
    /// in the destination pod.
    Stunnel,
    /// HAProxy in TCP mode doing TLS origination in the source pod and termination in the
    /// destination pod.
    Haproxy,
    /// The hop floor, not a competitor: an HAProxy pair in plain TCP mode (no TLS), so the
    /// same two extra processes sit in the path doing nothing but copying. What it adds is
    /// what the hops themselves cost on this machine (wake-ups and context switches).
    Relay,
    /// L7: nginx as a reverse proxy.
    Nginx,
    /// L7: Envoy with the equivalent filter chain.
    Envoy,
    /// L7: Ambit's waypoint.
    Waypoint,
}

impl Kind {
    #[cfg(test)]
    pub const ALL: [Kind; 4] = [Kind::Direct, Kind::Ztunnel, Kind::Stunnel, Kind::Haproxy];

    /// True for the contenders of the L4 suite.
    pub fn is_l4(self) -> bool {
        matches!(
            self,
            Kind::Direct | Kind::Ztunnel | Kind::Stunnel | Kind::Haproxy | Kind::Relay
        )
    }

    /// The name in tables and pod names.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Ztunnel => "ztunnel",
            Kind::Stunnel => "stunnel",
            Kind::Haproxy => "haproxy",
            Kind::Relay => "relay",
            Kind::Nginx => "nginx",
            Kind::Envoy => "envoy",
            Kind::Waypoint => "waypoint",
        }
    }

    /// True for the contenders that run proxy processes (CPU and memory apply).
    pub fn has_proxy(self) -> bool {
        self != Kind::Direct
    }
}

/// Which direction is an improvement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// A figure a scenario reports.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// Key in [`Sample::values`].
    pub id: &'static str,
    /// Row label in the table.
    pub label: &'static str,
    pub unit: &'static str,
    pub better: Better,
    /// Digits after the decimal point when printed.
    pub decimals: usize,
}

/// The figures of one run of one scenario for one contender.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub values: BTreeMap<&'static str, f64>,
    /// Anything odd about the run (errors seen by the client, …), reported as warnings.
    pub notes: Vec<String>,
}

impl Sample {
    pub fn set(&mut self, id: &'static str, v: f64) {
        self.values.insert(id, v);
    }

    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }
}

/// A scenario: measured once per (repetition, contender).
pub trait Scenario<B> {
    /// Short id, e.g. `throughput` (used by `--only`).
    fn id(&self) -> &'static str;
    /// Table heading.
    fn title(&self) -> String;
    /// How it is measured, with the exact commands.
    fn method(&self) -> String;
    fn metrics(&self) -> Vec<Metric>;
    /// Contenders this scenario applies to (default: all that were selected).
    fn applies_to(&self, _kind: Kind) -> bool {
        true
    }
    /// Runs once for `kind`.
    fn run_once(&self, bench: &mut B, kind: Kind) -> Result<Sample>;
}

/// All samples of one scenario.
#[derive(Debug, Clone)]
pub struct ScenarioResult {
    pub id: &'static str,
    pub title: String,
    pub method: String,
    pub metrics: Vec<Metric>,
    pub kinds: Vec<Kind>,
    pub samples: BTreeMap<Kind, Vec<Sample>>,
    /// Runs that failed outright, with why.
    pub failures: Vec<(Kind, String)>,
    pub reps: usize,
    pub elapsed_secs: f64,
}

impl ScenarioResult {
    /// The values of `metric` for `kind`, one per successful run that reported it.
    pub fn values(&self, kind: Kind, metric: &str) -> Vec<f64> {
        self.samples
            .get(&kind)
            .into_iter()
            .flatten()
            .filter_map(|s| s.values.get(metric).copied())
            .filter(|v| v.is_finite())
            .collect()
    }

    pub fn median(&self, kind: Kind, metric: &str) -> Option<f64> {
        median(&self.values(kind, metric))
    }

    pub fn min_max(&self, kind: Kind, metric: &str) -> Option<(f64, f64)> {
        let v = self.values(kind, metric);
        let min = v.iter().copied().reduce(f64::min)?;
        let max = v.iter().copied().reduce(f64::max)?;
        Some((min, max))
    }
}

/// The median (mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Runs `scenario` `reps` times for every contender, interleaved: round 1 runs A B C D,
/// round 2 runs A B C D again, and so on, so slow drift of the machine (thermal, page cache,
/// noisy neighbours) spreads over all contenders instead of biasing one.
///
/// A failed run is recorded and reported, not fatal, unless a contender fails more than
/// half of its runs; `should_stop` is polled between runs (Ctrl-C).
pub fn run_interleaved<B>(
    bench: &mut B,
    scenario: &dyn Scenario<B>,
    kinds: &[Kind],
    reps: usize,
    should_stop: &dyn Fn() -> bool,
) -> Result<ScenarioResult> {
    let started = Instant::now();
    let kinds: Vec<Kind> = kinds
        .iter()
        .copied()
        .filter(|k| scenario.applies_to(*k))
        .collect();
    let mut result = ScenarioResult {
        id: scenario.id(),
        title: scenario.title(),
        method: scenario.method(),
        metrics: scenario.metrics(),
        kinds: kinds.clone(),
        samples: BTreeMap::new(),
        failures: Vec::new(),
        reps,
        elapsed_secs: 0.0,
    };
    for rep in 1..=reps {
        for &kind in &kinds {
            if should_stop() {
                bail!("interrupted");
            }
            let t0 = Instant::now();
            match scenario.run_once(bench, kind) {
                Ok(sample) => {
                    let shown: Vec<String> = result
                        .metrics
                        .iter()
                        .filter_map(|m| {
                            let v = sample.values.get(m.id)?;
                            Some(format!("{}={v:.*}", m.id, m.decimals))
                        })
                        .collect();
                    eprintln!(
                        "[{}] run {rep}/{reps} {:<8} {:>5.1}s  {}",
                        scenario.id(),
                        kind.name(),
                        t0.elapsed().as_secs_f64(),
                        shown.join(" ")
                    );
                    for n in &sample.notes {
                        eprintln!("[{}]   note: {n}", scenario.id());
                    }
                    result.samples.entry(kind).or_default().push(sample);
                }
                Err(e) => {
                    if should_stop() {
                        bail!("interrupted");
                    }
                    eprintln!(
                        "[{}] run {rep}/{reps} {} FAILED: {e:#}",
                        scenario.id(),
                        kind.name()
                    );
                    result.failures.push((kind, format!("{e:#}")));
                    let failed = result.failures.iter().filter(|(k, _)| *k == kind).count();
                    if failed * 2 > reps {
                        return Err(e.context(format!(
                            "{}: {} failed {failed} of {reps} runs",
                            scenario.id(),
                            kind.name()
                        )));
                    }
                }
            }
        }
    }
    result.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
    }

    struct Counter {
        order: Vec<Kind>,
    }

    struct Fake;

    impl Scenario<Counter> for Fake {
        fn id(&self) -> &'static str {
            "fake"
        }
        fn title(&self) -> String {
            "Fake".into()
        }
        fn method(&self) -> String {
            String::new()
        }
        fn metrics(&self) -> Vec<Metric> {
            vec![Metric {
                id: "x",
                label: "x",
                unit: "",
                better: Better::Higher,
                decimals: 0,
            }]
        }
        fn applies_to(&self, kind: Kind) -> bool {
            kind != Kind::Haproxy
        }
        fn run_once(&self, bench: &mut Counter, kind: Kind) -> Result<Sample> {
            bench.order.push(kind);
            let mut s = Sample::default();
            s.set("x", bench.order.len() as f64);
            Ok(s)
        }
    }

    #[test]
    fn runs_are_interleaved() {
        let mut c = Counter { order: Vec::new() };
        let r = run_interleaved(&mut c, &Fake, &Kind::ALL, 2, &|| false).expect("runs");
        use Kind::*;
        assert_eq!(
            c.order,
            [Direct, Ztunnel, Stunnel, Direct, Ztunnel, Stunnel]
        );
        assert_eq!(r.values(Ztunnel, "x"), [2.0, 5.0]);
        assert_eq!(r.median(Ztunnel, "x"), Some(3.5));
        assert!(!r.samples.contains_key(&Haproxy));
    }
}
