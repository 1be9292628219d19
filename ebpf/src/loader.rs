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
//! <pin_dir>/links/sk_lookup_10_1_2_3              (one netns link per pod)
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

/// One pod to enroll: its identity and the listeners ztunnel opened inside
/// its network namespace.
#[derive(Debug, Clone, Copy)]
pub struct PodCapture<'a> {
    /// The pod IP (the `src` of the pod's capture route).
    pub pod_ip: IpAddr,
    /// The pod's network namespace (e.g. an open `/proc/<pid>/ns/net`).
    pub netns: BorrowedFd<'a>,
    /// The netns cookie, e.g. [`crate::netns_cookie`] of a socket made in it.
    pub netns_cookie: u64,
    /// The listening `127.0.0.1:15001` socket (`IP_TRANSPARENT`, `SO_MARK`).
    pub outbound_listener: BorrowedFd<'a>,
    /// The listening `127.0.0.1:15006` socket (`SO_MARK`).
    pub inbound_listener: BorrowedFd<'a>,
}

/// A pod's DNS proxy, for [`Capture::enroll_dns`].
#[derive(Debug, Clone, Copy)]
pub struct DnsCapture<'a> {
    /// The pod IP.
    pub pod_ip: IpAddr,
    /// The pod's netns cookie (as in [`PodCapture::netns_cookie`]).
    pub netns_cookie: u64,
    /// The bound `127.0.0.1:15053` UDP socket (`SO_MARK`), made in the pod
    /// netns. Its presence in the map is what turns redirection on; the TCP
    /// listener on the same address needs no registration.
    pub udp_listener: BorrowedFd<'a>,
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
    /// is what a restarted ztunnel does): writes `enrolled` and `pods`,
    /// inserts both listeners into the sockhashes, and attaches + pins the
    /// sk_lookup link into the pod netns at `<pin_dir>/links/sk_lookup_<ip>`
    /// (dots and colons as `_`) unless already pinned for that netns.
    ///
    /// Order matters: listeners and `pods` first, then the sk_lookup link
    /// (inbound capture on), then `enrolled` (outbound marking on), so no
    /// captured SYN ever finds a half-enrolled pod. The pod's capture rule and
    /// route must already be in place.
    pub fn enroll(&mut self, pod: &PodCapture<'_>) -> Result<(), Error> {
        let pod_ip = pod.pod_ip.to_canonical();
        let key = IpKey::from(pod_ip);
        for (what, fd) in [
            ("outbound (15001)", pod.outbound_listener),
            ("inbound (15006)", pod.inbound_listener),
        ] {
            let cookie = crate::netns_cookie(fd)?;
            if cookie != pod.netns_cookie {
                return Err(Error::Pod {
                    pod_ip,
                    problem: format!(
                        "the {what} listener belongs to netns cookie {cookie}, not the pod's \
                         {}: create listeners on a thread that has done setns into the pod netns",
                        pod.netns_cookie
                    ),
                });
            }
        }

        let previous = match self.maps.pods.get(&key, 0) {
            Ok(value) => Some(value),
            Err(MapError::KeyNotFound) => None,
            Err(source) => {
                return Err(pod_map_err(pod_ip, maps::PODS, "reading", source));
            }
        };

        const LISTENER_HINT: &str = "inserting the listener (it must be a listening TCP socket)";
        self.maps
            .outbound
            .insert(key, pod.outbound_listener, BPF_ANY)
            .map_err(|e| pod_map_err(pod_ip, maps::OUTBOUND_LISTENERS, LISTENER_HINT, e))?;
        self.maps
            .inbound
            .insert(key, pod.inbound_listener, BPF_ANY)
            .map_err(|e| pod_map_err(pod_ip, maps::INBOUND_LISTENERS, LISTENER_HINT, e))?;
        self.maps
            .pods
            .insert(
                key,
                PodValue {
                    netns_cookie: pod.netns_cookie,
                },
                BPF_ANY,
            )
            .map_err(|e| pod_map_err(pod_ip, maps::PODS, "inserting", e))?;

        self.attach_or_adopt_sk_lookup(pod_ip, pod.netns)?;

        // The IP moved to a new netns (pod replaced while we were down):
        // the old cookie must stop being captured as this pod.
        if let Some(previous) = previous.filter(|p| p.netns_cookie != pod.netns_cookie) {
            remove_ignoring_missing(self.maps.enrolled.remove(&previous.netns_cookie))
                .map_err(|e| pod_map_err(pod_ip, maps::ENROLLED, "removing stale cookie", e))?;
        }
        self.maps
            .enrolled
            .insert(pod.netns_cookie, EnrolledValue { pod_ip: key }, BPF_ANY)
            .map_err(|e| pod_map_err(pod_ip, maps::ENROLLED, "inserting", e))?;
        info!(%pod_ip, netns_cookie = pod.netns_cookie, "pod enrolled in capture");
        Ok(())
    }

    /// Turns DNS redirection on for a pod (idempotent: a new socket
    /// replaces the old one). Call it before [`Capture::enroll`]: redirection
    /// starts when the pod is in `enrolled`, and from then on a query finds
    /// the proxy at once. Afterwards, the pod's UDP and TCP queries to port
    /// 53 (not to loopback or the pod itself, not from `ZTUNNEL_MARK`ed
    /// sockets) reach `127.0.0.1:15053` in its netns, and the app sees the
    /// replies come from the server it asked.
    ///
    /// The kernel drops the entry when the socket closes; DNS then goes to
    /// the app's own server while the pod's 15001 listener lives, and is
    /// refused (`EPERM`) once that is gone too (ztunnel down).
    pub fn enroll_dns(&mut self, dns: &DnsCapture<'_>) -> Result<(), Error> {
        let pod_ip = dns.pod_ip.to_canonical();
        let cookie = crate::netns_cookie(dns.udp_listener)?;
        if cookie != dns.netns_cookie {
            return Err(Error::Pod {
                pod_ip,
                problem: format!(
                    "the DNS (15053) socket belongs to netns cookie {cookie}, not the pod's {}: \
                     create it on a thread that has done setns into the pod netns",
                    dns.netns_cookie
                ),
            });
        }
        self.maps
            .dns
            .insert(IpKey::from(pod_ip), dns.udp_listener, BPF_ANY)
            .map_err(|e| {
                pod_map_err(
                    pod_ip,
                    maps::DNS_LISTENERS,
                    "inserting the DNS socket (it must be a bound UDP socket)",
                    e,
                )
            })?;
        info!(%pod_ip, "pod DNS redirected to its proxy");
        Ok(())
    }

    /// Turns DNS redirection off for a pod: its queries go to the servers
    /// it asks. Not an error when it was off.
    pub fn unenroll_dns(&mut self, pod_ip: IpAddr) -> Result<(), Error> {
        let pod_ip = pod_ip.to_canonical();
        remove_ignoring_missing(self.maps.dns.remove(&IpKey::from(pod_ip)))
            .map_err(|e| pod_map_err(pod_ip, maps::DNS_LISTENERS, "removing", e))
    }

    /// Removes every trace of the pod: map entries (the three sockhashes,
    /// pods, enrolled by its cookie), and the sk_lookup link (unpin +
    /// detach).
    /// Removing a pod that is not enrolled is not an error.
    pub fn unenroll(&mut self, pod_ip: IpAddr) -> Result<(), Error> {
        let pod_ip = pod_ip.to_canonical();
        let key = IpKey::from(pod_ip);

        // Outbound marking off first. Scan rather than trust `pods` alone, so
        // a half-written earlier enrollment is cleaned up too.
        let mut cookies = Vec::new();
        match self.maps.pods.get(&key, 0) {
            Ok(value) => cookies.push(value.netns_cookie),
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(pod_map_err(pod_ip, maps::PODS, "reading", e)),
        }
        for entry in self.maps.enrolled.iter() {
            let (cookie, value) =
                entry.map_err(|e| pod_map_err(pod_ip, maps::ENROLLED, "iterating", e))?;
            if value.pod_ip == key && !cookies.contains(&cookie) {
                cookies.push(cookie);
            }
        }
        for cookie in cookies {
            remove_ignoring_missing(self.maps.enrolled.remove(&cookie))
                .map_err(|e| pod_map_err(pod_ip, maps::ENROLLED, "removing", e))?;
        }

        // Then inbound redirection, then the listeners themselves.
        detach_and_unpin(&self.sk_lookup_pin(pod_ip))?;
        remove_ignoring_missing(self.maps.outbound.remove(&key))
            .map_err(|e| pod_map_err(pod_ip, maps::OUTBOUND_LISTENERS, "removing", e))?;
        remove_ignoring_missing(self.maps.inbound.remove(&key))
            .map_err(|e| pod_map_err(pod_ip, maps::INBOUND_LISTENERS, "removing", e))?;
        remove_ignoring_missing(self.maps.dns.remove(&key))
            .map_err(|e| pod_map_err(pod_ip, maps::DNS_LISTENERS, "removing", e))?;
        remove_ignoring_missing(self.maps.pods.remove(&key))
            .map_err(|e| pod_map_err(pod_ip, maps::PODS, "removing", e))?;
        info!(%pod_ip, "pod removed from capture");
        Ok(())
    }

    /// Holds a pod's netns closed before it is enrolled (a CNI ADD raced
    /// ahead of the config): writes only `enrolled[cookie] = pod_ip`. With no
    /// 15001 listener in the sockhash, the connect hooks refuse every
    /// captured connect() from that netns with EPERM, and DNS the same way,
    /// so nothing leaves uncaptured. A later [`Capture::enroll`] of the same
    /// netns overwrites the entry with the full state. Returns `false` (and
    /// changes nothing) when the cookie is already enrolled or held.
    pub fn hold(&mut self, netns_cookie: u64, pod_ip: IpAddr) -> Result<bool, Error> {
        let pod_ip = pod_ip.to_canonical();
        match self.maps.enrolled.get(&netns_cookie, 0) {
            Ok(_) => return Ok(false),
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(pod_map_err(pod_ip, maps::ENROLLED, "reading", e)),
        }
        self.maps
            .enrolled
            .insert(
                netns_cookie,
                EnrolledValue {
                    pod_ip: IpKey::from(pod_ip),
                },
                BPF_ANY,
            )
            .map_err(|e| pod_map_err(pod_ip, maps::ENROLLED, "inserting a hold", e))?;
        info!(%pod_ip, netns_cookie, "pod netns held closed until enrolled");
        Ok(true)
    }

    /// Releases a hold made by [`Capture::hold`]. A netns that is fully
    /// enrolled (its cookie is in `pods`) is left alone, so a late release
    /// can never switch capture off for a running pod. Returns whether an
    /// entry was removed.
    pub fn release_hold(&mut self, netns_cookie: u64) -> Result<bool, Error> {
        if self.enrolled_cookies()?.contains(&netns_cookie) {
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

    /// Holds in the pinned maps: `enrolled` entries whose cookie belongs to
    /// no fully enrolled pod, as (netns cookie, pod IP). A restarted ztunnel
    /// adopts them.
    pub fn holds(&self) -> Result<Vec<(u64, IpAddr)>, Error> {
        let enrolled = self.enrolled_cookies()?;
        let mut out = Vec::new();
        for entry in self.maps.enrolled.iter() {
            let (cookie, value) = entry.map_err(|source| Error::Map {
                name: maps::ENROLLED,
                source: Box::new(source),
            })?;
            if !enrolled.contains(&cookie) {
                out.push((cookie, IpAddr::from(value.pod_ip)));
            }
        }
        Ok(out)
    }

    fn enrolled_cookies(&self) -> Result<Vec<u64>, Error> {
        self.maps
            .pods
            .iter()
            .map(|entry| {
                entry
                    .map(|(_, v)| v.netns_cookie)
                    .map_err(|source| Error::Map {
                        name: maps::PODS,
                        source: Box::new(source),
                    })
            })
            .collect()
    }

    /// Pod IPs present in the pinned `pods` map (so a restarted ztunnel can
    /// reconcile pods that left while it was down).
    pub fn enrolled_pods(&self) -> Result<Vec<IpAddr>, Error> {
        self.maps
            .pods
            .keys()
            .map(|key| {
                key.map(IpAddr::from).map_err(|source| Error::Map {
                    name: maps::PODS,
                    source: Box::new(source),
                })
            })
            .collect()
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

    fn sk_lookup_pin(&self, pod_ip: IpAddr) -> PathBuf {
        self.links_dir.join(sk_lookup_pin_name(pod_ip))
    }

    fn attach_or_adopt_sk_lookup(
        &mut self,
        pod_ip: IpAddr,
        netns: BorrowedFd<'_>,
    ) -> Result<(), Error> {
        let path = self.sk_lookup_pin(pod_ip);
        let netns_ino = File::from(netns.try_clone_to_owned().map_err(|e| Error::Pod {
            pod_ip,
            problem: format!("duplicating the netns fd: {e}"),
        })?)
        .metadata()
        .map_err(|e| Error::Pod {
            pod_ip,
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
                    debug!(%pod_ip, link_id = info.id, "adopted pinned sk_lookup link");
                    return Ok(());
                }
                // Pinned for a netns that is gone (ino 0) or is another pod's
                // that used to have this IP.
                warn!(%pod_ip, link_id = info.id, target = ?info.target, "replacing stale sk_lookup link");
                Some(link)
            }
            None => None,
        };

        let link_id = program.attach(netns).map_err(|source| Error::Attach {
            program: SK_LOOKUP,
            target: format!("netns of pod {pod_ip}"),
            source: Box::new(source),
        })?;
        let link: FdLink = program
            .take_link(link_id)
            .map_err(|source| Error::Attach {
                program: SK_LOOKUP,
                target: format!("netns of pod {pod_ip}"),
                source: Box::new(source),
            })?
            .into();
        replace_pin(&path, link, stale)
    }
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

/// Pin file name of a pod's sk_lookup link: bpffs rejects `.` in names, so
/// `10.1.2.3` pins as `sk_lookup_10_1_2_3` (and `fd00::1` as `sk_lookup_fd00__1`).
fn sk_lookup_pin_name(pod_ip: IpAddr) -> String {
    let ip = pod_ip.to_canonical().to_string().replace(['.', ':'], "_");
    format!("{SK_LOOKUP_PIN_PREFIX}{ip}")
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

fn pod_map_err(pod_ip: IpAddr, map: &'static str, action: &'static str, source: MapError) -> Error {
    Error::PodMap {
        pod_ip,
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
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn pin_names_have_no_dots() {
        assert_eq!(
            sk_lookup_pin_name(IpAddr::V4(Ipv4Addr::new(10, 201, 0, 2))),
            "sk_lookup_10_201_0_2"
        );
        assert_eq!(
            sk_lookup_pin_name(IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1))),
            "sk_lookup_fd00__1"
        );
        // A v4-mapped address is the same pod as its IPv4 form.
        assert_eq!(
            sk_lookup_pin_name(IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped())),
            "sk_lookup_10_0_0_1"
        );
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
