//! The command-line flags of admission control and HBONE server timeouts, shared by both
//! binaries so each setting has one name, one default and one help text.

use std::time::Duration;

use humantime::Duration as HumanDuration;

use super::{
    DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_HANDSHAKES, DEFAULT_MAX_HANDSHAKES_PER_SOURCE, Limits,
};
use crate::hbone::server::{
    DEFAULT_IDLE_TIMEOUT, DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_TIMEOUT,
    DEFAULT_PREFACE_TIMEOUT, Timeouts,
};

/// Admission control of every listener.
#[derive(clap::Args, Debug, Clone)]
pub struct AdmissionArgs {
    /// File descriptors no connection may use, kept for the proxy's own work (namespaces,
    /// config, certificates). Default: a sixteenth of the open-files limit, at least 64.
    #[arg(long)]
    pub fd_reserve: Option<u64>,
    /// Accepted connections may use descriptors numbered below this; over it they are
    /// closed at once. Default: half the open-files limit.
    #[arg(long)]
    pub accept_fds: Option<u64>,
    /// TLS handshakes in flight in the process (never more than half of --accept-fds).
    #[arg(long, default_value_t = DEFAULT_MAX_HANDSHAKES)]
    pub max_handshakes: usize,
    /// TLS handshakes in flight from one source address.
    #[arg(long, default_value_t = DEFAULT_MAX_HANDSHAKES_PER_SOURCE)]
    pub max_handshakes_per_source: usize,
    /// Bound on a TLS handshake, from accept (waiting for the first byte included).
    #[arg(long, default_value_t = HumanDuration::from(DEFAULT_HANDSHAKE_TIMEOUT))]
    pub handshake_timeout: HumanDuration,
}

impl AdmissionArgs {
    /// The limits these flags set.
    pub fn limits(&self) -> Limits {
        Limits {
            fd_reserve: self.fd_reserve,
            accept_fds: self.accept_fds,
            max_handshakes: self.max_handshakes,
            max_handshakes_per_source: self.max_handshakes_per_source,
            handshake_timeout: self.handshake_timeout.into(),
        }
    }
}

/// Time bounds of inbound HBONE connections.
#[derive(clap::Args, Debug, Clone)]
pub struct HboneServerArgs {
    /// Time from the end of the TLS handshake to the client's HTTP/2 preface.
    #[arg(long, default_value_t = HumanDuration::from(DEFAULT_PREFACE_TIMEOUT))]
    pub hbone_preface_timeout: HumanDuration,
    /// Interval between keepalive PINGs on inbound HBONE connections.
    #[arg(long, default_value_t = HumanDuration::from(DEFAULT_KEEPALIVE_INTERVAL))]
    pub hbone_keepalive_interval: HumanDuration,
    /// Time a peer has to answer a keepalive PING before its connection is closed.
    #[arg(long, default_value_t = HumanDuration::from(DEFAULT_KEEPALIVE_TIMEOUT))]
    pub hbone_keepalive_timeout: HumanDuration,
    /// Close an inbound HBONE connection that carries no stream for this long (GOAWAY);
    /// 0 never closes it.
    #[arg(long, default_value_t = HumanDuration::from(DEFAULT_IDLE_TIMEOUT))]
    pub hbone_idle_timeout: HumanDuration,
}

impl HboneServerArgs {
    /// The timeouts these flags set.
    pub fn timeouts(&self) -> Timeouts {
        let idle: Duration = self.hbone_idle_timeout.into();
        Timeouts {
            preface: self.hbone_preface_timeout.into(),
            keepalive_interval: self.hbone_keepalive_interval.into(),
            keepalive_timeout: self.hbone_keepalive_timeout.into(),
            idle: (!idle.is_zero()).then_some(idle),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        admission: AdmissionArgs,
        #[command(flatten)]
        hbone: HboneServerArgs,
    }

    #[test]
    fn defaults_are_the_library_defaults_and_flags_override_them() {
        let cli = Cli::parse_from(["x"]);
        assert_eq!(cli.admission.limits(), Limits::default());
        assert_eq!(cli.hbone.timeouts(), Timeouts::default());
        let cli = Cli::parse_from([
            "x",
            "--fd-reserve",
            "100",
            "--handshake-timeout",
            "2s",
            "--hbone-idle-timeout",
            "0",
        ]);
        assert_eq!(cli.admission.limits().fd_reserve, Some(100));
        assert_eq!(
            cli.admission.limits().handshake_timeout,
            Duration::from_secs(2)
        );
        assert_eq!(cli.hbone.timeouts().idle, None);
    }
}
