//! The crate's one error type. Each variant carries what a human needs to
//! act: the path, map, program or pod involved, and the underlying cause.

use std::{fmt, io, net::IpAddr, path::PathBuf};

use aya::{
    EbpfError,
    maps::MapError,
    pin::PinError,
    programs::{ProgramError, links::LinkError},
};

/// Why loading, enrolling or cleaning up capture failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A pin directory could not be created or read.
    #[error("pin directory {path}: {source}")]
    PinDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// The pin directory is not on a BPF filesystem, so nothing could be pinned.
    #[error(
        "{path} is not on a bpf filesystem; mount one (`mount -t bpf bpf {path}`) \
         or point pin_dir at /sys/fs/bpf/<name>"
    )]
    NotBpffs {
        /// The directory.
        path: PathBuf,
    },

    /// The cgroup to attach to could not be opened or is not cgroup v2.
    #[error(
        "cgroup {path}: {reason}; capture attaches to a cgroup v2 directory \
         (e.g. the kubepods subtree under a cgroup2 mount)"
    )]
    Cgroup {
        /// The configured cgroup directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// aya could not load the embedded object or create/open its pinned maps.
    #[error("loading the capture object with maps pinned under {maps_dir} failed: {source}")]
    Load {
        /// `<pin_dir>/maps`.
        maps_dir: PathBuf,
        /// The cause (boxed: aya's error is large).
        #[source]
        source: Box<EbpfError>,
    },

    /// A program is missing from the embedded object (a build problem).
    #[error("program {name} is missing from the embedded BPF object (rebuild ambit-ebpf)")]
    MissingProgram {
        /// Program (function) name.
        name: &'static str,
    },

    /// A map is missing from the embedded object (a build problem).
    #[error("map {name} is missing from the embedded BPF object (rebuild ambit-ebpf)")]
    MissingMap {
        /// Map name.
        name: &'static str,
    },

    /// A program was rejected by the kernel; the message includes the verifier log.
    #[error("loading program {name} into the kernel failed: {source}")]
    LoadProgram {
        /// Program name.
        name: &'static str,
        /// The cause, with the verifier output.
        #[source]
        source: Box<ProgramError>,
    },

    /// A map operation failed outside any one pod.
    #[error("map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// The cause (boxed: aya's error is large).
        #[source]
        source: Box<MapError>,
    },

    /// A pinned map was created by an incompatible build.
    #[error(
        "pinned map {path} has {what} {found}, this build expects {expected}: it was \
         created by another ztunnel version; run the uninstall clean-up (or remove the \
         pins under that directory) and restart"
    )]
    IncompatiblePinnedMap {
        /// Pin path of the map.
        path: PathBuf,
        /// Which property differs.
        what: &'static str,
        /// What the kernel reports.
        found: String,
        /// What this build needs.
        expected: String,
    },

    /// Attaching a program failed.
    #[error("attaching {program} to {target}: {source}")]
    Attach {
        /// Program name.
        program: &'static str,
        /// What it was attached to (cgroup path, or pod netns).
        target: String,
        /// The cause.
        #[source]
        source: Box<ProgramError>,
    },

    /// The kernel attached without a BPF link (pre-5.7), which cannot be pinned.
    #[error(
        "attaching {program} did not produce a pinnable BPF link (Linux >= 5.7 needed): {source}"
    )]
    LegacyLink {
        /// Program name.
        program: &'static str,
        /// The cause.
        #[source]
        source: Box<LinkError>,
    },

    /// Pinning a freshly attached link failed.
    #[error("pinning link at {path}: {source}")]
    PinLink {
        /// Pin path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<PinError>,
    },

    /// Opening, inspecting, updating, detaching or unpinning a pinned link failed.
    #[error("pinned link {path}: {action}: {source}")]
    Link {
        /// Pin path.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// A map update for one pod failed.
    #[error("{pod}: {action} in map {map}: {source}")]
    PodMap {
        /// The pod.
        pod: PodId,
        /// Map name.
        map: &'static str,
        /// What was being done (and any hint).
        action: &'static str,
        /// The cause (boxed: aya's error is large).
        #[source]
        source: Box<MapError>,
    },

    /// A pod's listener, address or netns handle is not what enrollment needs.
    #[error("{pod}: {problem}")]
    Pod {
        /// The pod.
        pod: PodId,
        /// What is wrong.
        problem: String,
    },

    /// `getsockopt(SO_NETNS_COOKIE)` failed.
    #[error("reading SO_NETNS_COOKIE of a socket: {source}")]
    NetnsCookie {
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Names a pod in errors: its netns cookie, and an address when one is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodId {
    /// The pod's netns cookie.
    pub netns_cookie: u64,
    /// One of its addresses (the primary one where there is one).
    pub addr: Option<IpAddr>,
}

impl fmt::Display for PodId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            Some(addr) => write!(f, "pod {addr} (netns cookie {})", self.netns_cookie),
            None => write!(f, "pod with netns cookie {}", self.netns_cookie),
        }
    }
}
