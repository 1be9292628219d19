//! CPU time and resident memory of processes, from `/proc`.
//!
//! CPU is `utime + stime` of `/proc/<pid>/stat`, which covers every thread of the process,
//! including threads that already exited (stunnel runs one thread per connection), in clock
//! ticks (10 ms on Linux). Memory is `VmRSS` of `/proc/<pid>/status`.

use std::sync::OnceLock;

use anyhow::{Context as _, Result};

/// Clock ticks per second (`USER_HZ`).
fn ticks_per_sec() -> f64 {
    static HZ: OnceLock<f64> = OnceLock::new();
    *HZ.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .filter(|&t| t > 0)
            .map_or(100.0, |t| t as f64)
    })
}

/// User plus system CPU seconds `pid` has used so far.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let (user, system) = cpu_split(pid)?;
    Ok(user + system)
}

/// (user, system) CPU seconds `pid` has used so far: where a proxy's cost per request sits,
/// in its own code or in the kernel's socket work.
pub fn cpu_split(pid: u32) -> Result<(f64, f64)> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let (user, system) = parse_cpu_ticks(&stat).with_context(|| format!("parsing {path}"))?;
    let hz = ticks_per_sec();
    Ok((user as f64 / hz, system as f64 / hz))
}

/// Sum of [`cpu_seconds`] over `pids`.
pub fn cpu_seconds_all(pids: &[u32]) -> Result<f64> {
    pids.iter().map(|&p| cpu_seconds(p)).sum()
}

/// (`utime`, `stime`) from the text of `/proc/<pid>/stat`. The command name (field 2) may
/// contain spaces and parentheses, so fields are counted after the last `)`.
fn parse_cpu_ticks(stat: &str) -> Result<(u64, u64)> {
    let (_, rest) = stat.rsplit_once(')').context("no ')' in stat")?;
    // After ')': field 3 (state) is index 0, so utime (field 14) is index 11.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .context("stat too short")?
            .parse::<u64>()
            .context("not a number")
    };
    Ok((field(11)?, field(12)?))
}

/// Resident set size of `pid` in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_rss(&status).with_context(|| format!("no VmRSS in {path}"))
}

fn parse_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_comm() {
        let stat = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 1 2 3";
        assert_eq!(parse_cpu_ticks(stat).expect("parses"), (250, 75));
    }

    #[test]
    fn parses_rss() {
        let status = "Name:\tztunnel\nVmPeak:\t  1 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_rss(status), Some(12345 * 1024));
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(cpu_seconds(me).expect("own stat") >= 0.0);
        assert!(rss_bytes(me).expect("own status") > 0);
    }
}
