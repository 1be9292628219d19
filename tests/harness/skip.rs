//! Privilege checks, and the rule that a test never skips silently.
//!
//! The simulated cluster needs root: network namespaces, a cgroup2 mount and
//! a bpffs mount. Developers without those see a loud "SKIPPED" line on
//! stderr; under `CI=true` (CI always runs as root) a missing privilege is a
//! failure, so a broken CI machine can't turn the suite green by skipping.

use std::fmt;
use std::io::Write as _;
use std::sync::OnceLock;

use nix::sched::{CloneFlags, unshare};

/// Why the simulated cluster can't run here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    /// A human-readable reason, e.g. "not running as root (euid 1000)".
    pub reason: String,
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "simulated cluster unavailable: {}", self.reason)
    }
}

impl std::error::Error for Unavailable {}

/// Checks that this process can build a simulated cluster: root, `ip` from
/// iproute2, network namespaces, and cgroup2 and bpf filesystems.
///
/// The probe runs once per process; later calls return the cached answer.
pub fn require_privileges() -> Result<(), Unavailable> {
    static RESULT: OnceLock<Result<(), Unavailable>> = OnceLock::new();
    RESULT.get_or_init(probe).clone()
}

/// True when running under CI (`CI=true` or `CI=1`), where skipping is a
/// failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Reports an unavailable environment: panics under CI, otherwise prints
/// why the current test is skipped. Used by
/// [`skip_or_fail!`](crate::skip_or_fail).
///
/// libtest names each test's thread after the test, so that name is used;
/// `fallback` (the caller's module path) covers other threads.
pub fn report_unavailable(fallback: &str, why: &Unavailable) {
    let thread = std::thread::current();
    let test = thread.name().filter(|n| *n != "main").unwrap_or(fallback);
    if in_ci() {
        panic!("{test}: {why} (CI=true, so this is a failure, not a skip)");
    }
    // Written to the stderr handle rather than with eprintln!, which libtest
    // captures and hides for passing tests: a skip must be visible.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

fn probe() -> Result<(), Unavailable> {
    let fail = |reason: String| Err(Unavailable { reason });
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        return fail(format!("not running as root (euid {euid})"));
    }
    match std::process::Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return fail(format!(
                "`ip -V` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Err(e) => return fail(format!("iproute2 `ip` not runnable: {e}")),
    }
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    for fs in ["cgroup2", "bpf"] {
        if !filesystems
            .lines()
            .any(|l| l.split_whitespace().last() == Some(fs))
        {
            return fail(format!("kernel lacks the {fs} filesystem"));
        }
    }
    // Creating a namespace is the real test of CAP_SYS_ADMIN (containers may
    // run as uid 0 without it). Do it on a throwaway thread: unshare affects
    // only the calling thread, which then exits.
    let netns = std::thread::spawn(|| unshare(CloneFlags::CLONE_NEWNET))
        .join()
        .map_err(|_| Unavailable {
            reason: "netns probe thread panicked".into(),
        })?;
    if let Err(e) = netns {
        return fail(format!("cannot create a network namespace: {e}"));
    }
    if let Err(e) = std::fs::create_dir_all(crate::STATE_ROOT) {
        return fail(format!("cannot create {}: {e}", crate::STATE_ROOT));
    }
    Ok(())
}

/// Returns early from a test when the simulated cluster can't run here,
/// after printing why; panics instead under `CI=true`.
///
/// Use `skip_or_fail!()` in tests returning `()`, and
/// `skip_or_fail!(Ok(()))` in tests returning a `Result`.
#[macro_export]
macro_rules! skip_or_fail {
    () => {
        $crate::skip_or_fail!(())
    };
    ($ret:expr) => {
        if let Err(why) = $crate::require_privileges() {
            $crate::skip::report_unavailable(module_path!(), &why);
            return $ret;
        }
    };
}
