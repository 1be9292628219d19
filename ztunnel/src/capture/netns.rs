//! Network namespaces of pods: finding them, and creating sockets inside them.
//!
//! ztunnel runs in the node's namespace. Sockets belong to the namespace of the thread that
//! creates them, so to listen or connect "inside" a pod we switch the current thread into the
//! pod's namespace, create the socket, and switch back before doing anything else. The
//! socket keeps the pod's namespace for its whole life.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

/// Errors entering or inspecting a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file could not be opened.
    #[error("open netns {path}: {source}")]
    Open {
        /// Path to the namespace file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// setns failed.
    #[error("enter netns {path}: {source}")]
    Enter {
        /// Path to the namespace file.
        path: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// Could not return to our own namespace: the thread is unusable, so we stop.
    #[error("return to ztunnel's own netns failed: {0}")]
    Return(nix::Error),
    /// Listing addresses failed.
    #[error("list addresses in netns {path}: {source}")]
    Addresses {
        /// Path.
        path: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
}

/// An open handle on a pod's network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    inode: u64,
}

impl Netns {
    /// Opens the namespace at `path` (e.g. `/var/run/netns/x` or `/proc/<pid>/ns/net`).
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.into(),
            source,
        })?;
        let inode = file
            .metadata()
            .map_err(|source| NetnsError::Open {
                path: path.into(),
                source,
            })?
            .ino();
        Ok(Netns {
            file,
            path: path.to_path_buf(),
            inode,
        })
    }

    /// Where it was found.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace's inode (what `bpftool` and `ip netns identify` show).
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// The namespace file, for attaching programs.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Runs `f` with the current thread inside this namespace, then switches back.
    ///
    /// `f` must be short and must not await: it runs on whatever thread calls this.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        let own = File::open("/proc/thread-self/ns/net").map_err(|source| NetnsError::Open {
            path: "/proc/thread-self/ns/net".into(),
            source,
        })?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            path: self.path.clone(),
            source,
        })?;
        let out = f();
        setns(own.as_fd(), CloneFlags::CLONE_NEWNET).map_err(NetnsError::Return)?;
        Ok(out)
    }

    /// Addresses configured in this namespace.
    pub fn addresses(&self) -> Result<Vec<IpAddr>, NetnsError> {
        let path = self.path.clone();
        self.run(|| {
            let addrs = nix::ifaddrs::getifaddrs()
                .map_err(|source| NetnsError::Addresses { path, source })?;
            Ok(addrs
                .filter_map(|a| a.address)
                .filter_map(|s| {
                    s.as_sockaddr_in()
                        .map(|v4| IpAddr::V4(v4.ip()))
                        .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                })
                .collect())
        })?
    }
}

/// Finds the namespaces that hold each of `wanted`, looking at named namespaces under
/// `netns_dir` and at every process's namespace. Namespaces are visited once each (by inode),
/// and our own namespace is skipped, since a pod IP there would be the node's, not a pod's.
pub fn find_by_ip(netns_dir: &Path, wanted: &HashSet<IpAddr>) -> HashMap<IpAddr, Netns> {
    let mut found = HashMap::new();
    if wanted.is_empty() {
        return found;
    }
    let own_inode = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
    let mut seen = HashSet::new();
    for path in candidates(netns_dir) {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if Some(meta.ino()) == own_inode || !seen.insert(meta.ino()) {
            continue;
        }
        let Ok(ns) = Netns::open(&path) else { continue };
        let Ok(addrs) = ns.addresses() else { continue };
        let hits: Vec<IpAddr> = addrs
            .into_iter()
            .filter(|a| wanted.contains(a) && !found.contains_key(a))
            .collect();
        match hits.as_slice() {
            [] => {}
            [ip] => {
                found.insert(*ip, ns);
            }
            _ => {
                for ip in &hits[1..] {
                    if let Ok(again) = Netns::open(&path) {
                        found.insert(*ip, again);
                    }
                }
                found.insert(hits[0], ns);
            }
        }
        if found.len() == wanted.len() {
            break;
        }
    }
    found
}

fn candidates(netns_dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(netns_dir) {
        out.extend(entries.flatten().map(|e| e.path()));
    }
    if let Ok(entries) = std::fs::read_dir("/proc") {
        out.extend(
            entries
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                })
                .map(|e| e.path().join("ns/net")),
        );
    }
    out
}
