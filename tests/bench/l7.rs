//! The L7 suite. TODO(waypoint): it needs the `waypoint` binary, which does not exist yet.
//!
//! How to add it, reusing what the L4 suite built:
//! 1. Topology: extend [`crate::topology::Bench`] (or add an `L7Bench`) with a namespace that
//!    carries `ambit.dev/use-waypoint=<name>`, a waypoint process started the way the harness
//!    starts ztunnel (a `Node::start_waypoint` in `tests/harness` is the natural place), and
//!    one destination pod pair per L7 contender.
//! 2. Contenders: add variants to [`crate::model::Kind`] (e.g. `Waypoint`: ztunnel → waypoint
//!    → ztunnel) and whatever L7 proxy pair the issue names as the comparison; `direct` stays
//!    the baseline so ratios stay comparable with the L4 tables.
//! 3. Scenarios: implement [`crate::model::Scenario`] for each entry of [`PLANNED`]; the
//!    runner ([`crate::model::run_interleaved`]), the report and `--quick`/`--reps` work
//!    unchanged. The HTTP generators in [`crate::load`] (fixed-rate, conn-rate, hold) and
//!    `wrk` (`tools::wrk`) cover the request/response figures.
//! 4. Targets: add the L7 targets to [`crate::report::verdicts`], and a "L7" part to the
//!    README's Benchmarks section.

use anyhow::{Result, bail};

/// The L7 scenarios to build once the waypoint exists.
pub const PLANNED: &[&str] = &[
    "HTTP request/response latency p50/p90/p99 at a fixed rate through the waypoint",
    "HTTP requests per second at saturation through the waypoint, with CPU per 1,000 requests",
    "new connections per second through the waypoint (connection ceiling)",
    "waypoint resident memory: idle, with 1,000 open connections, with a large route table",
    "retries and timeouts: added latency when a route retries a failing upstream",
];

/// Runs the L7 suite: not available until the waypoint is built.
pub fn run() -> Result<()> {
    let mut msg = String::from(
        "the L7 suite waits for the waypoint (TODO in tests/bench/l7.rs); planned scenarios:",
    );
    for p in PLANNED {
        msg.push_str("\n  - ");
        msg.push_str(p);
    }
    bail!(msg)
}
