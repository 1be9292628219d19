//! Loads the capture programs, attaches them, and keeps the pinned state on
//! bpffs consistent across ztunnel restarts.
//!
//! Layout under `pin_dir` (bpffs forbids dots in names, hence the `_`s):
//!
//! ```text
//! <pin_dir>/maps/{enrolled,pods,outbound_listeners,inbound_listeners,
//!                 dns_listeners,dns_origins}
//! <pin_dir>/links/{connect,sendmsg,recvmsg,getpeername,getsockname}{4,6}
//!                                                 (cgroup links)
//! <pin_dir>/links/sk_lookup_<netns cookie>         (one netns link per pod)
//! ```
//!
//! bpffs is the source of truth: a `Capture` holds no link fds, so whatever
//! it attached stays attached when it is dropped or the process dies, and a
//! new `Capture` finds it again by path. Adopting a pinned link swaps the
//! freshly loaded program into it with `BPF_LINK_UPDATE`, which is atomic, so
//! capture is never off during a restart or upgrade.

use std::{
    fmt,
    fs::{self, File},
    io,
    net::IpAddr,
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::MapError,
    programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, links::FdLink},
};
use nix::sys::statfs::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, statfs};
use tracing::{debug, info, warn};

use crate::{
    Error,
    error::PodId,
    maps::{self, CaptureMaps, EnrolledValue, IpKey, PodValue},
    sys::{self, LinkTarget},
};

/// The compiled `bpf/capture.bpf.c` (see build.rs).
static CAPTURE_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/capture.bpf.o"));

const SK_LOOKUP: &str = "ambit_sk_lookup";

/// The cgroup programs and the pin names of their links. connect4/6 capture
/// TCP and redirect DNS; sendmsg4/6 redirect DNS datagrams of unconnected
/// sockets; recvmsg4/6 and getpeername4/6 show the DNS server the app asked
/// in place of the proxy's address, and getsockname4/6 the pod IP in place
/// of 127.0.0.1.
const CGROUP_LINKS: [(&str, &str); 10] = [
    ("ambit_connect4", "connect4"),
    ("ambit_connect6", "connect6"),
    ("ambit_sendmsg4", "sendmsg4"),
    ("ambit_sendmsg6", "sendmsg6"),
    ("ambit_recvmsg4", "recvmsg4"),
    ("ambit_recvmsg6", "recvmsg6"),
    ("ambit_getpeername4", "getpeername4"),
    ("ambit_getpeername6", "getpeername6"),
    ("ambit_getsockname4", "getsockname4"),
    ("ambit_getsockname6", "getsockname6"),
];
const SK_LOOKUP_PIN_PREFIX: &str = "sk_lookup_";

/// `BPF_ANY` for map updates: insert or replace.
const BPF_ANY: u64 = 0;

/// Where capture lives: settings of one ztunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
    /// A directory on bpffs owned by this ztunnel (e.g. `/sys/fs/bpf/ambit`);
    /// maps go under `maps/`, links under `links/`. Two ztunnels sharing a
    /// kernel must use different directories.
    pub pin_dir: PathBuf,
    /// The cgroup v2 directory whose subtree is captured (the kubepods
    /// cgroup on a real node; the node's own subtree in the simulated cluster).
    pub cgroup: PathBuf,
}

/// One pod to enroll: its netns and, per address family, its addresses and
/// the listeners ztunnel opened inside its network namespace.
#[derive(Debug, Clone, Copy)]
pub struct PodCapture<'a> {
    /// The pod's network namespace (e.g. an open `/proc/<pid>/ns/net`).
    pub netns: BorrowedFd<'a>,
    /// The netns cookie, e.g. [`crate::netns_cookie`] of a socket made in it.
    pub netns_cookie: u64,
    /// IPv4: `None` when the pod has no IPv4 address (its IPv4 connections
    /// are then refused).
    pub v4: Option<FamilyCapture<'a>>,
    /// IPv6, link-local included: `None` when IPv6 is off in the pod (its
    /// IPv6 connections are then refused).
    pub v6: Option<FamilyCapture<'a>>,
}

/// One address family of a pod.
#[derive(Debug, Clone, Copy)]
pub struct FamilyCapture<'a> {
    /// The address the pod's captured connections of this family come from:
    /// the `src` of the family's capture route. `None` when the pod has no
    /// routable address of the family (only link-local, say): its outbound
    /// connections of this family are then refused, not captured.
    pub primary: Option<IpAddr>,
    /// Every address of the family the pod has, link-local included (the
    /// primary one too): inbound connections to any of them are captured,
    /// and connections from the pod to them are its own business.
    pub addrs: &'a [IpAddr],
    /// The listening loopback:15001 socket of this family (`IP_TRANSPARENT`
    /// or `IPV6_TRANSPARENT`, `SO_MARK`).
    pub outbound_listener: BorrowedFd<'a>,
    /// The listening loopback:15006 socket of this family (`SO_MARK`).
    pub inbound_listener: BorrowedFd<'a>,
}

/// A pod's DNS proxy, for [`Capture::enroll_dns`].
#[derive(Debug, Clone, Copy)]
pub struct DnsCapture<'a> {
    /// The pod's netns cookie (as in [`PodCapture::netns_cookie`]).
    pub netns_cookie: u64,
    /// The pod's primary IPv4 address and its bound `127.0.0.1:15053` UDP
    /// socket (`SO_MARK`), made in the pod netns.
    pub v4: Option<(IpAddr, BorrowedFd<'a>)>,
    /// The pod's primary IPv6 address and its bound `[::1]:15053` UDP socket.
    pub v6: Option<(IpAddr, BorrowedFd<'a>)>,
}

/// A pod found in the pinned maps: its netns cookie and every address
/// registered for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolledPod {
    /// The pod's netns cookie.
    pub netns_cookie: u64,
    /// Its registered addresses, sorted.
    pub addrs: Vec<IpAddr>,
}

/// Loaded capture programs and handles to their pinned maps.
pub struct Capture {
    /// Owns the loaded programs; `SK_LOOKUP` is attached once per pod.
    ebpf: Ebpf,
    maps: CaptureMaps,
    maps_dir: PathBuf,
    links_dir: PathBuf,
}

impl fmt::Debug for Capture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Capture")
            .field("maps_dir", &self.maps_dir)
            .field("links_dir", &self.links_dir)
            .finish_non_exhaustive()
    }
}

impl Capture {
    /// Loads the programs with maps pinned under `<pin_dir>/maps`, reusing
    /// pinned maps left by an earlier ztunnel, and attaches connect4/connect6
    /// to `cgroup` unless pinned links already exist under `<pin_dir>/links`
    /// (then it adopts them, so there is never a window with capture off).
    ///
    /// Adopting means swapping this build's program into the pinned link
    /// atomically; a pinned link that points at another cgroup (the setting
    /// changed) is replaced: the new one is attached before the old one is
    /// detached.
    pub fn load_or_adopt(cfg: &CaptureConfig) -> Result<Capture, Error> {
        let maps_dir = cfg.pin_dir.join("maps");
        let links_dir = cfg.pin_dir.join("links");
        // Check before creating anything, so a wrong setting leaves no
        // stray directories behind on some other filesystem.
        ensure_bpffs(&cfg.pin_dir)?;
        for dir in [&maps_dir, &links_dir] {
            fs::create_dir_all(dir).map_err(|source| Error::PinDir {
                path: dir.clone(),
                source,
            })?;
        }
        let cgroup = open_cgroup(&cfg.cgroup)?;

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(CAPTURE_OBJ)
            .map_err(|source| Error::Load {
                maps_dir: maps_dir.clone(),
                source: Box::new(source),
            })?;
        let maps = CaptureMaps::take(&mut ebpf, &maps_dir)?;

        for (name, _) in CGROUP_LINKS {
            load_program::<CgroupSockAddr>(&mut ebpf, name)?;
        }
        load_program::<SkLookup>(&mut ebpf, SK_LOOKUP)?;

        for (name, pin_name) in CGROUP_LINKS {
            attach_or_adopt_cgroup(&mut ebpf, name, &cgroup, &links_dir.join(pin_name))?;
        }
        info!(
            pin_dir = %cfg.pin_dir.display(),
            cgroup = %cfg.cgroup.display(),
            "capture programs loaded"
        );
        Ok(Capture {
            ebpf,
            maps,
            maps_dir,
            links_dir,
        })
    }

    /// Enrolls a pod (idempotent: re-enrolling replaces its listeners, which
    /// is what a restarted ztunnel does): registers every address of the pod
    /// in `pods` and both sockhashes (each address with the listeners of its
    /// family), attaches + pins the sk_lookup link into the pod netns at
    /// `<pin_dir>/links/sk_lookup_<netns cookie>` unless already pinned for
    /// that netns, and writes `enrolled[cookie]` with the primary address of
    /// each family.
    ///
    /// Order matters: listeners and `pods` first, then the sk_lookup link
    /// (inbound capture on), then `enrolled` (outbound marking on), so no
    /// captured SYN ever finds a half-enrolled pod. The pod's capture rules
    /// and routes must already be in place.
    ///
    /// An address registered for another netns means that pod was replaced
    /// (its address moved while we were down): the old pod is removed
    /// entirely first. A link-local address is the exception, since two
    /// live pods can share one: such an address is registered for neither
    /// (connections to it are dropped in both), and a warning says so.
    pub fn enroll(&mut self, pod: &PodCapture<'_>) -> Result<(), Error> {
        let id = pod_id(pod);
        let families = [(pod.v4, false), (pod.v6, true)];
        for (family, v6) in families {
            let Some(family) = family else { continue };
            check_family(&id, &family, v6)?;
            for (what, fd) in [
                ("outbound (15001)", family.outbound_listener),
                ("inbound (15006)", family.inbound_listener),
            ] {
                let cookie = crate::netns_cookie(fd)?;
                if cookie != pod.netns_cookie {
                    return Err(Error::Pod {
                        pod: id,
                        problem: format!(
                            "the {what} listener belongs to netns cookie {cookie}, not the pod's \
                             {}: create listeners on a thread that has done setns into the pod netns",
                            pod.netns_cookie
                        ),
                    });
                }
            }
        }

        // Who holds each address now.
        let mut replaced = Vec::new();
        let mut shared_link_local = Vec::new();
        for family in families.iter().filter_map(|(f, _)| f.as_ref()) {
            for addr in family.addrs {
                let key = IpKey::from(addr.to_canonical());
                match self.maps.pods.get(&key, 0) {
                    Ok(v) if v.netns_cookie == pod.netns_cookie => {}
                    Ok(v) if is_link_local(*addr) => {
                        shared_link_local.push(*addr);
                        if v.netns_cookie != TOMBSTONE {
                            warn!(%id, %addr, other_netns_cookie = v.netns_cookie,
                                "two pods share a link-local address; connections to it are dropped in both");
                        }
                    }
                    Ok(v) => replaced.push(v.netns_cookie),
                    Err(MapError::KeyNotFound) => {}
                    Err(source) => return Err(pod_map_err(id, maps::PODS, "reading", source)),
                }
            }
        }
        replaced.sort_unstable();
        replaced.dedup();
        for old in replaced {
            warn!(%id, old_netns_cookie = old, "an address of this pod belonged to another netns; removing that pod's capture");
            self.unenroll(old)?;
        }

        const LISTENER_HINT: &str = "inserting the listener (it must be a listening TCP socket)";
        let mut registered = Vec::new();
        for family in families.iter().filter_map(|(f, _)| f.as_ref()) {
            for addr in family.addrs {
                let key = IpKey::from(addr.to_canonical());
                if shared_link_local.contains(addr) {
                    // Neither pod's: a tombstone that no netns cookie matches, and no
                    // listener, so sk_lookup drops what arrives for it.
                    for (map, result) in [
                        (maps::OUTBOUND_LISTENERS, self.maps.outbound.remove(&key)),
                        (maps::INBOUND_LISTENERS, self.maps.inbound.remove(&key)),
                    ] {
                        remove_ignoring_missing(result).map_err(|e| {
                            pod_map_err(id, map, "removing a shared link-local address", e)
                        })?;
                    }
                    self.maps
                        .pods
                        .insert(
                            key,
                            PodValue {
                                netns_cookie: TOMBSTONE,
                            },
                            BPF_ANY,
                        )
                        .map_err(|e| {
                            pod_map_err(id, maps::PODS, "marking a shared link-local address", e)
                        })?;
                    continue;
                }
                self.maps
                    .outbound
                    .insert(key, family.outbound_listener, BPF_ANY)
                    .map_err(|e| pod_map_err(id, maps::OUTBOUND_LISTENERS, LISTENER_HINT, e))?;
                self.maps
                    .inbound
                    .insert(key, family.inbound_listener, BPF_ANY)
                    .map_err(|e| pod_map_err(id, maps::INBOUND_LISTENERS, LISTENER_HINT, e))?;
                self.maps
                    .pods
                    .insert(
                        key,
                        PodValue {
                            netns_cookie: pod.netns_cookie,
                        },
                        BPF_ANY,
                    )
                    .map_err(|e| pod_map_err(id, maps::PODS, "inserting", e))?;
                registered.push(key);
            }
        }
        // Addresses the pod had at its last enrollment but no longer has.
        for key in self.keys_of(pod.netns_cookie)? {
            if !registered.contains(&key) {
                self.remove_address(id, key)?;
            }
        }

        self.attach_or_adopt_sk_lookup(id, pod.netns)?;

        let value = EnrolledValue {
            ip4: IpKey::of(pod.v4.and_then(|f| f.primary)),
            ip6: IpKey::of(pod.v6.and_then(|f| f.primary)),
        };
        self.maps
            .enrolled
            .insert(pod.netns_cookie, value, BPF_ANY)
            .map_err(|e| pod_map_err(id, maps::ENROLLED, "inserting", e))?;
        info!(pod = %id, addrs = registered.len(), ipv4 = ?value.ip4.addr(), ipv6 = ?value.ip6.addr(),
            "pod enrolled in capture");
        Ok(())
    }

    /// Turns DNS redirection on for a pod, per family (idempotent: a new
    /// socket replaces the old one). Call it before [`Capture::enroll`]:
    /// redirection starts when the pod is in `enrolled`, and from then on a
    /// query finds the proxy at once. Afterwards, the pod's UDP and TCP
    /// queries to port 53 (not to loopback or the pod itself, not from
    /// `ZTUNNEL_MARK`ed sockets) reach loopback:15053 of their family in its
    /// netns, and the app sees the replies come from the server it asked.
    ///
    /// The kernel drops the entry when the socket closes; DNS then goes to
    /// the app's own server while the pod's 15001 listener lives, and is
    /// refused (`EPERM`) once that is gone too (ztunnel down).
    pub fn enroll_dns(&mut self, dns: &DnsCapture<'_>) -> Result<(), Error> {
        for (pod_ip, socket) in [dns.v4, dns.v6].into_iter().flatten() {
            let pod_ip = pod_ip.to_canonical();
            let id = PodId {
                netns_cookie: dns.netns_cookie,
                addr: Some(pod_ip),
            };
            let cookie = crate::netns_cookie(socket)?;
            if cookie != dns.netns_cookie {
                return Err(Error::Pod {
                    pod: id,
                    problem: format!(
                        "the DNS (15053) socket belongs to netns cookie {cookie}, not the pod's {}: \
                         create it on a thread that has done setns into the pod netns",
                        dns.netns_cookie
                    ),
                });
            }
            self.maps
                .dns
                .insert(IpKey::from(pod_ip), socket, BPF_ANY)
                .map_err(|e| {
                    pod_map_err(
                        id,
                        maps::DNS_LISTENERS,
                        "inserting the DNS socket (it must be a bound UDP socket)",
                        e,
                    )
                })?;
            info!(pod = %id, "pod DNS redirected to its proxy");
        }
        Ok(())
    }

    /// Removes every trace of the pod with this netns cookie: its `enrolled`
    /// entry, every address it registered (in `pods`, both sockhashes and the
    /// DNS sockhash), and its sk_lookup link (unpin + detach). Removing a pod
    /// that is not enrolled is not an error.
    pub fn unenroll(&mut self, netns_cookie: u64) -> Result<(), Error> {
        let id = PodId {
            netns_cookie,
            addr: None,
        };
        // Outbound marking off first, then inbound redirection, then the
        // listeners themselves.
        remove_ignoring_missing(self.maps.enrolled.remove(&netns_cookie))
            .map_err(|e| pod_map_err(id, maps::ENROLLED, "removing", e))?;
        detach_and_unpin(&self.sk_lookup_pin(netns_cookie))?;
        let keys = self.keys_of(netns_cookie)?;
        for key in &keys {
            self.remove_address(id, *key)?;
        }
        info!(pod = %id, addrs = keys.len(), "pod removed from capture");
        Ok(())
    }

    /// Every address registered for `netns_cookie`.
    fn keys_of(&self, netns_cookie: u64) -> Result<Vec<IpKey>, Error> {
        let mut keys = Vec::new();
        for entry in self.maps.pods.iter() {
            let (key, value) = entry.map_err(|source| Error::Map {
                name: maps::PODS,
                source: Box::new(source),
            })?;
            if value.netns_cookie == netns_cookie {
                keys.push(key);
            }
        }
        Ok(keys)
    }

    fn remove_address(&mut self, id: PodId, key: IpKey) -> Result<(), Error> {
        remove_ignoring_missing(self.maps.outbound.remove(&key))
            .map_err(|e| pod_map_err(id, maps::OUTBOUND_LISTENERS, "removing", e))?;
        remove_ignoring_missing(self.maps.inbound.remove(&key))
            .map_err(|e| pod_map_err(id, maps::INBOUND_LISTENERS, "removing", e))?;
        remove_ignoring_missing(self.maps.dns.remove(&key))
            .map_err(|e| pod_map_err(id, maps::DNS_LISTENERS, "removing", e))?;
        remove_ignoring_missing(self.maps.pods.remove(&key))
            .map_err(|e| pod_map_err(id, maps::PODS, "removing", e))
    }

    /// Holds a pod's netns closed before it is enrolled (a CNI ADD raced
    /// ahead of the config, or an enrollment failed): writes only
    /// `enrolled[cookie]` with the addresses it is known by. With no 15001
    /// listener in the sockhash, the connect hooks refuse every captured
    /// connect() from that netns with EPERM, and DNS the same way, so nothing
    /// leaves uncaptured. A later [`Capture::enroll`] of the same netns
    /// overwrites the entry with the full state. Returns `false` (and
    /// changes nothing) when the cookie is already enrolled or held.
    pub fn hold(&mut self, netns_cookie: u64, addrs: &[IpAddr]) -> Result<bool, Error> {
        let ip4 = addrs.iter().map(|a| a.to_canonical()).find(IpAddr::is_ipv4);
        let ip6 = addrs.iter().map(|a| a.to_canonical()).find(IpAddr::is_ipv6);
        let id = PodId {
            netns_cookie,
            addr: ip4.or(ip6),
        };
        match self.maps.enrolled.get(&netns_cookie, 0) {
            Ok(_) => return Ok(false),
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(pod_map_err(id, maps::ENROLLED, "reading", e)),
        }
        self.maps
            .enrolled
            .insert(
                netns_cookie,
                EnrolledValue {
                    ip4: IpKey::of(ip4),
                    ip6: IpKey::of(ip6),
                },
                BPF_ANY,
            )
            .map_err(|e| pod_map_err(id, maps::ENROLLED, "inserting a hold", e))?;
        info!(pod = %id, "pod netns held closed until enrolled");
        Ok(true)
    }

    /// Releases a hold made by [`Capture::hold`]. A netns that is fully
    /// enrolled (its cookie is in `pods`) is left alone, so a late release
    /// can never switch capture off for a running pod. Returns whether an
    /// entry was removed.
    pub fn release_hold(&mut self, netns_cookie: u64) -> Result<bool, Error> {
        if !self.keys_of(netns_cookie)?.is_empty() {
            return Ok(false);
        }
        match self.maps.enrolled.remove(&netns_cookie) {
            Ok(()) => {
                info!(netns_cookie, "pod netns hold released");
                Ok(true)
            }
            Err(MapError::KeyNotFound) => Ok(false),
            Err(source) => Err(Error::Map {
                name: maps::ENROLLED,
                source: Box::new(source),
            }),
        }
    }

    /// Holds in the pinned maps: `enrolled` entries whose cookie has no
    /// address registered, as (netns cookie, the addresses it was held
    /// with). A restarted ztunnel adopts them.
    pub fn holds(&self) -> Result<Vec<(u64, Vec<IpAddr>)>, Error> {
        let enrolled: Vec<u64> = self
            .enrolled_pods()?
            .into_iter()
            .map(|p| p.netns_cookie)
            .collect();
        let mut out = Vec::new();
        for entry in self.maps.enrolled.iter() {
            let (cookie, value) = entry.map_err(|source| Error::Map {
                name: maps::ENROLLED,
                source: Box::new(source),
            })?;
            if !enrolled.contains(&cookie) {
                let addrs = [value.ip4.addr(), value.ip6.addr()].into_iter().flatten();
                out.push((cookie, addrs.collect()));
            }
        }
        Ok(out)
    }

    /// Pods present in the pinned `pods` map, with their addresses (so a
    /// restarted ztunnel can reconcile pods that left while it was down).
    /// Addresses shared by two pods (see [`Capture::enroll`]) belong to none.
    pub fn enrolled_pods(&self) -> Result<Vec<EnrolledPod>, Error> {
        let mut by_cookie: std::collections::BTreeMap<u64, Vec<IpAddr>> = Default::default();
        for entry in self.maps.pods.iter() {
            let (key, value) = entry.map_err(|source| Error::Map {
                name: maps::PODS,
                source: Box::new(source),
            })?;
            if value.netns_cookie != TOMBSTONE {
                by_cookie
                    .entry(value.netns_cookie)
                    .or_default()
                    .push(IpAddr::from(key));
            }
        }
        Ok(by_cookie
            .into_iter()
            .map(|(netns_cookie, mut addrs)| {
                addrs.sort_unstable();
                EnrolledPod {
                    netns_cookie,
                    addrs,
                }
            })
            .collect())
    }

    /// Detaches everything and removes all pins (used by `ztunnel
    /// uninstall`-style clean-up and tests). Keeps going after a failure and
    /// returns the first one, so as much as possible is cleaned up.
    pub fn remove_all(self) -> Result<(), Error> {
        let mut first_error = None;
        let mut note = |result: Result<(), Error>| {
            if let Err(e) = result {
                warn!(error = %e, "capture clean-up step failed");
                first_error.get_or_insert(e);
            }
        };

        match fs::read_dir(&self.links_dir) {
            Ok(entries) => {
                for entry in entries {
                    let result = entry
                        .map_err(|source| Error::PinDir {
                            path: self.links_dir.clone(),
                            source,
                        })
                        .and_then(|entry| {
                            let name = entry.file_name();
                            let name = name.to_string_lossy();
                            let ours = name.starts_with(SK_LOOKUP_PIN_PREFIX)
                                || CGROUP_LINKS.iter().any(|(_, pin)| *pin == name);
                            if ours {
                                detach_and_unpin(&entry.path())
                            } else {
                                Ok(())
                            }
                        });
                    note(result);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => note(Err(Error::PinDir {
                path: self.links_dir.clone(),
                source,
            })),
        }
        for name in maps::ALL {
            let path = self.maps_dir.join(name);
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    note(Err(Error::PinDir { path, source: e }));
                }
                _ => {}
            }
        }
        for dir in [&self.links_dir, &self.maps_dir] {
            match fs::remove_dir(dir) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => note(Err(Error::PinDir {
                    path: dir.clone(),
                    source: e,
                })),
                _ => {}
            }
        }
        info!(maps_dir = %self.maps_dir.display(), "capture removed");
        first_error.map_or(Ok(()), Err)
    }

    fn sk_lookup_pin(&self, netns_cookie: u64) -> PathBuf {
        self.links_dir.join(sk_lookup_pin_name(netns_cookie))
    }

    fn attach_or_adopt_sk_lookup(&mut self, id: PodId, netns: BorrowedFd<'_>) -> Result<(), Error> {
        let path = self.sk_lookup_pin(id.netns_cookie);
        let netns_ino = File::from(netns.try_clone_to_owned().map_err(|e| Error::Pod {
            pod: id,
            problem: format!("duplicating the netns fd: {e}"),
        })?)
        .metadata()
        .map_err(|e| Error::Pod {
            pod: id,
            problem: format!("fstat of the netns fd: {e}"),
        })?
        .ino();

        let program: &mut SkLookup = program_mut(&mut self.ebpf, SK_LOOKUP)?;
        let stale = match open_pinned_link(&path)? {
            Some(link) => {
                let info = link_info(&path, &link)?;
                if matches!(info.target, LinkTarget::Netns { netns_ino: ino } if u64::from(ino) == netns_ino)
                {
                    update_link(&path, &link, program_fd(program, SK_LOOKUP)?)?;
                    debug!(pod = %id, link_id = info.id, "adopted pinned sk_lookup link");
                    return Ok(());
                }
                // A cookie is never reused, so this is a link whose netns is
                // gone (ino 0): replace it.
                warn!(pod = %id, link_id = info.id, target = ?info.target, "replacing stale sk_lookup link");
                Some(link)
            }
            None => None,
        };

        let link_id = program.attach(netns).map_err(|source| Error::Attach {
            program: SK_LOOKUP,
            target: format!("netns of {id}"),
            source: Box::new(source),
        })?;
        let link: FdLink = program
            .take_link(link_id)
            .map_err(|source| Error::Attach {
                program: SK_LOOKUP,
                target: format!("netns of {id}"),
                source: Box::new(source),
            })?
            .into();
        replace_pin(&path, link, stale)
    }
}

/// The value `pods` holds for an address two live pods share (link-local
/// only): no netns cookie is 0, so it is nobody's, and it has no listeners.
const TOMBSTONE: u64 = 0;

fn is_link_local(addr: IpAddr) -> bool {
    matches!(addr.to_canonical(), IpAddr::V6(v6) if v6.is_unicast_link_local())
}

/// How a pod is named in logs and errors: its cookie and primary address.
fn pod_id(pod: &PodCapture<'_>) -> PodId {
    let primary =
        |f: Option<FamilyCapture<'_>>| f.and_then(|f| f.primary.or(f.addrs.first().copied()));
    PodId {
        netns_cookie: pod.netns_cookie,
        addr: primary(pod.v4).or(primary(pod.v6)),
    }
}

/// Every address of a family is of that family, usable as a pod address, and
/// the primary one among them.
fn check_family(id: &PodId, family: &FamilyCapture<'_>, v6: bool) -> Result<(), Error> {
    let problem = |problem: String| Error::Pod { pod: *id, problem };
    let name = if v6 { "IPv6" } else { "IPv4" };
    if family.addrs.is_empty() {
        return Err(problem(format!(
            "{name} capture needs at least one address"
        )));
    }
    for addr in family.addrs {
        let addr = addr.to_canonical();
        if addr.is_ipv6() != v6 {
            return Err(problem(format!("{addr} is listed as an {name} address")));
        }
        if addr.is_loopback() || addr.is_unspecified() || addr.is_multicast() {
            return Err(problem(format!("{addr} cannot be a pod address")));
        }
    }
    if let Some(primary) = family.primary {
        if !family.addrs.contains(&primary) {
            return Err(problem(format!(
                "the primary {name} address {primary} is not among the pod's addresses"
            )));
        }
        if is_link_local(primary) {
            return Err(problem(format!(
                "the primary {name} address {primary} is link-local; it cannot carry captured connections"
            )));
        }
    }
    Ok(())
}

/// Attaches `name` to the cgroup and pins the link at `path`, or adopts the
/// link already pinned there.
fn attach_or_adopt_cgroup(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &Cgroup,
    path: &Path,
) -> Result<(), Error> {
    let program: &mut CgroupSockAddr = program_mut(ebpf, name)?;
    let stale = match open_pinned_link(path)? {
        Some(link) => {
            let info = link_info(path, &link)?;
            if info.target
                == (LinkTarget::Cgroup {
                    cgroup_id: cgroup.id,
                })
            {
                update_link(path, &link, program_fd(program, name)?)?;
                info!(
                    program = name,
                    link_id = info.id,
                    "adopted pinned cgroup link"
                );
                return Ok(());
            }
            warn!(
                program = name,
                link_id = info.id,
                target = ?info.target,
                cgroup = %cgroup.path.display(),
                "pinned cgroup link targets another cgroup; replacing it"
            );
            Some(link)
        }
        None => None,
    };

    // Cgroup links always run alongside other programs (the kernel treats
    // them as multi-attach); `Single` is the only mode BPF_LINK_CREATE takes.
    let attach_err = |source| Error::Attach {
        program: name,
        target: cgroup.path.display().to_string(),
        source: Box::new(source),
    };
    let link_id = program
        .attach(cgroup.file.as_fd(), CgroupAttachMode::Single)
        .map_err(attach_err)?;
    let link = program.take_link(link_id).map_err(attach_err)?;
    let link = FdLink::try_from(link).map_err(|source| Error::LegacyLink {
        program: name,
        source: Box::new(source),
    })?;
    replace_pin(path, link, stale)?;
    info!(program = name, cgroup = %cgroup.path.display(), "attached");
    Ok(())
}

/// Pins a freshly attached link at `path`. A `stale` link pinned there is
/// unpinned first and detached last, so one of the two is always attached.
fn replace_pin(path: &Path, link: FdLink, stale: Option<OwnedFd>) -> Result<(), Error> {
    if stale.is_some() {
        match fs::remove_file(path) {
            Err(source) if source.kind() != io::ErrorKind::NotFound => {
                return Err(Error::Link {
                    path: path.to_owned(),
                    action: "unpinning the stale link",
                    source,
                });
            }
            _ => {}
        }
    }
    // Dropping the returned PinnedLink only closes our fd; the pin keeps the
    // link attached.
    link.pin(path).map_err(|source| Error::PinLink {
        path: path.to_owned(),
        source: Box::new(source),
    })?;
    if let Some(stale) = stale {
        sys::link_detach(stale.as_fd()).map_err(|source| Error::Link {
            path: path.to_owned(),
            action: "detaching the replaced link",
            source,
        })?;
    }
    Ok(())
}

/// Detaches the link pinned at `path` and removes the pin; nothing pinned
/// there is fine.
fn detach_and_unpin(path: &Path) -> Result<(), Error> {
    let Some(link) = open_pinned_link(path)? else {
        return Ok(());
    };
    // Detach explicitly: unpinning alone leaves the link attached for as
    // long as any other process holds an fd to it.
    sys::link_detach(link.as_fd()).map_err(|source| Error::Link {
        path: path.to_owned(),
        action: "detaching",
        source,
    })?;
    match fs::remove_file(path) {
        Err(source) if source.kind() != io::ErrorKind::NotFound => Err(Error::Link {
            path: path.to_owned(),
            action: "unpinning",
            source,
        }),
        _ => Ok(()),
    }
}

fn open_pinned_link(path: &Path) -> Result<Option<OwnedFd>, Error> {
    match sys::obj_get(path) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Link {
            path: path.to_owned(),
            action: "opening",
            source,
        }),
    }
}

fn link_info(path: &Path, link: &OwnedFd) -> Result<sys::LinkInfo, Error> {
    let info = sys::link_info(link.as_fd()).map_err(|source| Error::Link {
        path: path.to_owned(),
        action: "reading link info",
        source,
    })?;
    debug!(path = %path.display(), link_id = info.id, prog_id = info.prog_id, target = ?info.target, "pinned link");
    Ok(info)
}

fn update_link(path: &Path, link: &OwnedFd, program: BorrowedFd<'_>) -> Result<(), Error> {
    sys::link_update(link.as_fd(), program).map_err(|source| Error::Link {
        path: path.to_owned(),
        action: "swapping in the newly loaded program (BPF_LINK_UPDATE)",
        source,
    })
}

/// Pin file name of a pod's sk_lookup link, by netns cookie (stable for the
/// namespace's life, never reused, and the same for every address family).
fn sk_lookup_pin_name(netns_cookie: u64) -> String {
    format!("{SK_LOOKUP_PIN_PREFIX}{netns_cookie}")
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or(Error::MissingProgram { name })?;
    program.try_into().map_err(|source| Error::LoadProgram {
        name,
        source: Box::new(source),
    })
}

fn program_fd<'a, T: ProgramFdOf>(
    program: &'a T,
    name: &'static str,
) -> Result<BorrowedFd<'a>, Error> {
    program.prog_fd().map_err(|source| Error::LoadProgram {
        name,
        source: Box::new(source),
    })
}

/// The fd of a loaded program, for `BPF_LINK_UPDATE`.
trait ProgramFdOf {
    fn prog_fd(&self) -> Result<BorrowedFd<'_>, aya::programs::ProgramError>;
}

impl ProgramFdOf for CgroupSockAddr {
    fn prog_fd(&self) -> Result<BorrowedFd<'_>, aya::programs::ProgramError> {
        Ok(self.fd()?.as_fd())
    }
}

impl ProgramFdOf for SkLookup {
    fn prog_fd(&self) -> Result<BorrowedFd<'_>, aya::programs::ProgramError> {
        Ok(self.fd()?.as_fd())
    }
}

/// Loads one program into the kernel (the verifier runs here).
fn load_program<T: Loadable>(ebpf: &mut Ebpf, name: &'static str) -> Result<(), Error>
where
    for<'a> &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program: &mut T = program_mut(ebpf, name)?;
    program
        .load_into_kernel()
        .map_err(|source| Error::LoadProgram {
            name,
            source: Box::new(source),
        })
}

trait Loadable {
    fn load_into_kernel(&mut self) -> Result<(), aya::programs::ProgramError>;
}

impl Loadable for CgroupSockAddr {
    fn load_into_kernel(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
}

impl Loadable for SkLookup {
    fn load_into_kernel(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
}

/// An open cgroup v2 directory and its id (= inode number on cgroup2, which
/// is what the kernel reports as a cgroup link's `cgroup_id`).
struct Cgroup {
    path: PathBuf,
    file: File,
    id: u64,
}

fn open_cgroup(path: &Path) -> Result<Cgroup, Error> {
    let cgroup_err = |reason: String| Error::Cgroup {
        path: path.to_owned(),
        reason,
    };
    let fs = statfs(path).map_err(|e| cgroup_err(format!("statfs: {e}")))?;
    if fs.filesystem_type() != CGROUP2_SUPER_MAGIC {
        return Err(cgroup_err(
            "not on a cgroup2 filesystem (on hybrid hosts cgroup2 is usually \
             /sys/fs/cgroup/unified)"
                .to_owned(),
        ));
    }
    let file = File::open(path).map_err(|e| cgroup_err(format!("open: {e}")))?;
    let id = file
        .metadata()
        .map_err(|e| cgroup_err(format!("fstat: {e}")))?
        .ino();
    Ok(Cgroup {
        path: path.to_owned(),
        file,
        id,
    })
}

/// `dir`, or its nearest existing ancestor when it does not exist yet, must
/// be on bpffs.
fn ensure_bpffs(dir: &Path) -> Result<(), Error> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new("/"));
    let fs = statfs(existing).map_err(|e| Error::PinDir {
        path: existing.to_owned(),
        source: e.into(),
    })?;
    if fs.filesystem_type() == BPF_FS_MAGIC {
        Ok(())
    } else {
        Err(Error::NotBpffs {
            path: dir.to_owned(),
        })
    }
}

fn pod_map_err(pod: PodId, map: &'static str, action: &'static str, source: MapError) -> Error {
    Error::PodMap {
        pod,
        map,
        action,
        source: Box::new(source),
    }
}

/// Map deletes are idempotent for us: a missing key is already removed.
fn remove_ignoring_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_are_bpffs_safe() {
        assert_eq!(sk_lookup_pin_name(4097), "sk_lookup_4097");
    }

    #[test]
    fn link_local_is_recognised() {
        assert!(is_link_local("fe80::1".parse().expect("ip")));
        assert!(!is_link_local("fd00::1".parse().expect("ip")));
        assert!(!is_link_local("169.254.0.1".parse().expect("ip")));
    }

    #[test]
    fn embedded_object_has_the_programs_and_maps() {
        let obj = CAPTURE_OBJ;
        assert!(obj.starts_with(b"\x7fELF"), "not an ELF object");
        let programs = CGROUP_LINKS.iter().map(|(program, _)| *program);
        for name in programs.chain([SK_LOOKUP]).chain(maps::ALL) {
            assert!(
                obj.windows(name.len()).any(|w| w == name.as_bytes()),
                "{name} missing from the object"
            );
        }
    }

    #[test]
    fn capture_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Capture>();
    }
}
