//! Enrollment: keeping the set of captured pods on this node equal to what the config says.
//!
//! A pod is enrolled when it runs on this node, its namespace is ambient and it does not opt
//! out. Enrolling opens its listeners, installs routing, then writes the eBPF state, in that
//! order, so capture never starts before there is somewhere for traffic to go. Un-enrolling
//! runs the reverse order and removes every trace. Pods whose namespace is not found yet
//! (not started) are retried on the next pass.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_ebpf::{Capture, PodCapture};
use ambit_shared::config::{
    Config, DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, WAYPOINT_NAME_LABEL, Workload,
};
use ambit_shared::identity::Identity;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::capture::netns::{NetnsSearch, Presence};
use crate::capture::routing::{self, Sources};
use crate::capture::{self, FamilyListeners, Netns, PodAddrs, PodListeners};
use crate::cni;
use crate::dns::DnsProxy;
use crate::metrics::CaptureMetrics;
use crate::proxy::{self, Pod, ProxyContext};
use ambit_shared::certs::CertManager;

/// A workload by `(namespace, name)`: what a running pod is keyed by, whatever addresses it
/// has.
type PodKey = (String, String);

/// A pod this ztunnel serves.
struct RunningPod {
    pod: Arc<Pod>,
    netns_cookie: u64,
    /// The workload's addresses in the config when it was enrolled: a change re-enrolls it.
    configured: Vec<IpAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for RunningPod {
    fn drop(&mut self) {
        // Aborting the accept loops closes the listeners; established connections run on
        // their own tasks and finish normally.
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Owns capture state and the per-pod proxy tasks.
pub struct Enroller {
    node: String,
    netns: NetnsSearch,
    capture: Capture,
    certs: CertManager,
    ctx: Arc<ProxyContext>,
    dns: Arc<DnsProxy>,
    metrics: CaptureMetrics,
    running: HashMap<PodKey, RunningPod>,
    /// Pods held closed by the CNI hook until the config says what they are, by netns cookie.
    holds: HashMap<u64, Hold>,
}

/// What a reconcile pass left undone.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Local enrolled pods not running yet (no netns found, or enrolling failed).
    pub pending: usize,
    /// Pods held closed by the CNI hook, waiting for the config.
    pub held: usize,
}

fn key_of(w: &Workload) -> PodKey {
    (w.namespace.clone(), w.name.clone())
}

impl Enroller {
    /// Creates the enroller; `capture` may hold state adopted from a previous run.
    pub fn new(
        node: String,
        netns: NetnsSearch,
        capture: Capture,
        certs: CertManager,
        ctx: Arc<ProxyContext>,
        dns: Arc<DnsProxy>,
        metrics: CaptureMetrics,
    ) -> Self {
        Enroller {
            node,
            netns,
            capture,
            certs,
            ctx,
            dns,
            metrics,
            running: HashMap::new(),
            holds: HashMap::new(),
        }
        .adopting_holds()
    }

    /// Brings capture in line with `config`, then settles the CNI hook's holds.
    pub async fn reconcile(&mut self, config: &Config) -> Outcome {
        let mut outcome = self.reconcile_pods(config).await;
        outcome.held = self.resolve_holds(config);
        outcome
    }

    async fn reconcile_pods(&mut self, config: &Config) -> Outcome {
        let mut unusable = HashSet::new();
        let desired: HashMap<PodKey, (&Workload, Identity)> = config
            .workloads
            .iter()
            // Waypoint pods speak HBONE themselves; capturing them would loop their traffic.
            .filter(|w| w.node == self.node && config.is_enrolled(w) && !w.labels.contains_key(WAYPOINT_NAME_LABEL))
            .filter_map(|w| match config.identity_of(w) {
                Ok(id) => Some((key_of(w), (w, id))),
                Err(e) => {
                    warn!(workload = %format!("{}/{}", w.namespace, w.name), error = %e, "cannot enroll workload; a running pod keeps its capture");
                    unusable.insert(key_of(w));
                    None
                }
            })
            .collect();

        // Leave: pods the config no longer enrolls here. A running pod whose workload is
        // still listed but unusable right now (its identity cannot be derived) is not one of
        // them: an error never turns capture off.
        let leaving: Vec<PodKey> = self
            .running
            .keys()
            .filter(|k| !desired.contains_key(*k) && !unusable.contains(*k))
            .cloned()
            .collect();
        for key in leaving {
            if let Some(r) = self.running.remove(&key) {
                self.unenroll(&r).await;
            }
        }
        // Re-enroll in place: pods whose identity or addresses changed. Dropping the running
        // pod closes its listeners but keeps its eBPF state, so until the new enrollment
        // below replaces it the pod's connections are refused, never sent uncaptured.
        let changed: Vec<PodKey> = self
            .running
            .iter()
            .filter(|(k, r)| {
                desired
                    .get(*k)
                    .is_some_and(|(w, id)| *id != r.pod.identity || w.ips != r.configured)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in changed {
            if let Some(r) = self.running.remove(&key) {
                info!(pod = %r.pod.workload(), "pod identity or addresses changed; re-enrolling");
            }
        }
        self.remove_stale_pinned(&desired).await;

        // Join: pods not running yet.
        let missing: Vec<&PodKey> = desired
            .keys()
            .filter(|k| !self.running.contains_key(*k))
            .collect();
        if missing.is_empty() {
            self.certs
                .retain(|id| self.running.values().any(|r| &r.pod.identity == id));
            return Outcome::default();
        }
        let wanted: HashSet<IpAddr> = missing
            .iter()
            .filter_map(|k| desired.get(*k))
            .flat_map(|(w, _)| w.ips.iter().map(IpAddr::to_canonical))
            .collect();
        let scan = capture::netns::find_by_ip(&self.netns, &wanted);
        self.count_lookup_errors(&scan);
        let mut found = scan.found;
        let mut pending = 0;
        for key in missing {
            let Some((w, id)) = desired.get(key) else {
                continue;
            };
            let pod = format!("{}/{}", w.namespace, w.name);
            // The namespace holding the workload's first address found; every other one
            // found must be in the same namespace, or the config and the node disagree.
            let handles: Vec<Netns> = w
                .ips
                .iter()
                .filter_map(|ip| found.remove(&ip.to_canonical()))
                .collect();
            let Some(netns) = handles.first() else {
                pending += 1;
                continue;
            };
            if let Some(other) = handles.iter().find(|n| n.inode() != netns.inode()) {
                warn!(%pod, netns = %netns.path().display(), other = %other.path().display(),
                    "the workload's addresses are in different network namespaces; not enrolling it");
                pending += 1;
                continue;
            }
            let Ok(netns) = netns.try_clone() else {
                pending += 1;
                continue;
            };
            // Kept for the hold below: `enroll` consumes its handle.
            let held = netns.try_clone();
            match self.enroll(netns, w, id.clone()).await {
                Ok(r) => {
                    self.running.insert(key.clone(), r);
                }
                Err(e) => {
                    warn!(%pod, error = %format!("{e:#}"), "enrolling pod failed; holding it closed and retrying");
                    pending += 1;
                    match held {
                        Ok(ns) => self.hold_failed(&ns, w),
                        Err(e) => error!(%pod, error = %e,
                            "cannot hold the pod closed after a failed enrollment; retrying"),
                    }
                }
            }
        }
        self.certs
            .retain(|id| self.running.values().any(|r| &r.pod.identity == id));
        Outcome { pending, held: 0 }
    }

    /// State pinned by an earlier ztunnel for pods that are no longer ours: neither running
    /// nor about to be (none of their addresses is wanted by the config).
    async fn remove_stale_pinned(&mut self, desired: &HashMap<PodKey, (&Workload, Identity)>) {
        let pinned = match self.capture.enrolled_pods() {
            Ok(pinned) => pinned,
            Err(e) => {
                warn!(error = %e, "cannot list pinned pods");
                return;
            }
        };
        let running: HashSet<u64> = self.running.values().map(|r| r.netns_cookie).collect();
        let wanted: HashSet<IpAddr> = desired
            .values()
            .flat_map(|(w, _)| w.ips.iter().map(IpAddr::to_canonical))
            .collect();
        let stale: Vec<_> = pinned
            .into_iter()
            .filter(|p| {
                !running.contains(&p.netns_cookie) && !p.addrs.iter().any(|a| wanted.contains(a))
            })
            .collect();
        if stale.is_empty() {
            return;
        }
        let scan = capture::netns::find_by_ip(
            &self.netns,
            &stale.iter().flat_map(|p| p.addrs.iter().copied()).collect(),
        );
        self.count_lookup_errors(&scan);
        for p in stale {
            let pod = format!("(stale pinned state) {:?}", p.addrs);
            if let Err(e) = self.capture.unenroll(p.netns_cookie) {
                warn!(%pod, error = %e, "removing eBPF state failed");
            }
            if let Some(ns) = p.addrs.iter().find_map(|a| scan.found.get(a))
                && let Err(e) = routing::remove(ns).await
            {
                warn!(%pod, error = %e, "removing capture routing failed");
            }
            info!(%pod, netns_cookie = p.netns_cookie, "pod un-enrolled");
        }
    }

    /// Drops pods whose network namespace is gone or was replaced (a pod re-created with the
    /// same IP). Our own handle keeps an old namespace alive, so this is the only way to
    /// notice; the next [`Enroller::reconcile`] enrolls the new namespace.
    ///
    /// Only positive evidence un-enrolls: the path we found the pod by names another
    /// namespace or nothing, *and* its address is in another namespace or a complete scan
    /// found it nowhere. A lookup that fails (out of file descriptors, say) keeps the pod
    /// enrolled, is counted, and is tried again at the next check.
    pub async fn drop_replaced_pods(&mut self) {
        // The cheap check first: it needs no file descriptor.
        let checks: HashMap<PodKey, std::io::Result<bool>> = self
            .running
            .iter()
            .map(|(k, r)| (k.clone(), capture::netns::path_still_names(&r.pod.netns)))
            .collect();
        let uncertain: Vec<PodKey> = checks
            .iter()
            .filter(|(_, check)| !matches!(check, Ok(true)))
            .map(|(k, _)| k.clone())
            .collect();
        if uncertain.is_empty() {
            return;
        }
        let wanted: HashSet<IpAddr> = uncertain
            .iter()
            .filter_map(|k| self.running.get(k)?.pod.primary())
            .collect();
        let scan = capture::netns::find_by_ip(&self.netns, &wanted);
        self.count_lookup_errors(&scan);
        for key in uncertain {
            let (Some(running), Some(check)) = (self.running.get(&key), checks.get(&key)) else {
                continue;
            };
            let Some(ip) = running.pod.primary() else {
                continue;
            };
            match capture::netns::presence(&running.pod.netns, ip, check, &scan) {
                Presence::Present => {}
                Presence::Unknown { reason } => {
                    warn!(pod = %running.pod.workload(), %ip, %reason,
                        "cannot tell whether the pod's network namespace still exists; keeping it enrolled");
                }
                gone_or_replaced => {
                    warn!(pod = %running.pod.workload(), %ip, presence = ?gone_or_replaced,
                        "pod network namespace is gone or was replaced");
                    if let Some(r) = self.running.remove(&key) {
                        self.unenroll(&r).await;
                    }
                }
            }
        }
    }

    fn count_lookup_errors(&self, scan: &capture::netns::Scan) {
        if let Some(first) = scan.errors.first() {
            self.metrics
                .netns_lookup_errors
                .inc_by(scan.errors.len() as u64);
            debug!(errors = scan.errors.len(), %first, "netns lookup incomplete");
        }
    }

    /// After a failed enrollment, holds the pod's netns closed (as the CNI hook does) so
    /// that its connections are refused rather than sent uncaptured until a retry succeeds.
    fn hold_failed(&mut self, netns: &Netns, w: &Workload) {
        let pod = format!("{}/{}", w.namespace, w.name);
        let cookie = match netns_cookie_of(netns) {
            Ok(c) => c,
            Err(e) => {
                error!(%pod, error = %e, "cannot hold the pod closed after a failed enrollment (netns cookie); retrying");
                return;
            }
        };
        match self.capture.hold(cookie, &w.ips) {
            Ok(true) => {
                let now = Instant::now();
                self.holds.insert(
                    cookie,
                    Hold {
                        ips: w.ips.clone(),
                        namespace: w.namespace.clone(),
                        name: w.name.clone(),
                        container_id: String::new(),
                        netns: Some((netns.path().to_path_buf(), netns.inode())),
                        since: now,
                        warned: now,
                    },
                );
            }
            // Already enrolled or held: its capture stays as it is.
            Ok(false) => {}
            Err(e) => {
                error!(%pod, error = %e, "cannot hold the pod closed after a failed enrollment; retrying")
            }
        }
    }

    async fn enroll(
        &mut self,
        netns: Netns,
        w: &Workload,
        identity: Identity,
    ) -> anyhow::Result<RunningPod> {
        let cert = self.certs.get(&identity).await?;
        let netns = Arc::new(netns);
        let addrs = PodAddrs::new(&netns.addresses()?, &w.ips);
        let workload = format!("{}/{}", w.namespace, w.name);
        for ip in addrs.missing(&w.ips) {
            warn!(pod = %workload, %ip, "the config lists an address the pod does not have; peers dialling it will fail");
        }
        if addrs.v4().is_empty() && addrs.v6().is_empty() {
            anyhow::bail!("the pod has no address in its network namespace yet");
        }
        // An address another running pod is served on: the kernel programs would move it
        // (and that pod's capture with it) to this one. Two live pods cannot both have it, so
        // one of them is not what the config says; this one waits, held closed.
        let ours: Vec<IpAddr> = addrs
            .all()
            .into_iter()
            .filter(|a| !capture::addrs::is_link_local(*a))
            .collect();
        if let Some((other, ip)) = self.running.values().find_map(|r| {
            let ip = ours.iter().find(|a| r.pod.has_addr(**a))?;
            (r.pod.netns.inode() != netns.inode()).then(|| (r.pod.workload(), *ip))
        }) {
            anyhow::bail!("address {ip} is already served for running pod {other}");
        }
        // A family the pod has no routable address in is refused, not left uncaptured.
        if addrs.primary_v4().is_none() {
            info!(pod = %workload, "the pod has no IPv4 address: its IPv4 connections are refused");
        }
        if addrs.ipv6_on() && addrs.primary_v6().is_none() {
            info!(pod = %workload, link_local = ?addrs.v6(),
                "the pod has no routable IPv6 address: its IPv6 connections are refused (link-local always is)");
        }
        let listeners = capture::open_listeners(&netns, &addrs)?;
        let dns = capture::dns::open_listeners(&netns, &addrs)?;
        let sources = Sources {
            v4: addrs.primary_v4().and_then(|ip| match ip {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            }),
            v6: addrs.primary_v6().and_then(|ip| match ip {
                IpAddr::V6(v6) => Some(v6),
                IpAddr::V4(_) => None,
            }),
        };
        routing::install(&netns, sources, addrs.ipv6_on()).await?;
        let cookie = ambit_ebpf::netns_cookie(
            listeners
                .any_fd()
                .ok_or_else(|| anyhow::anyhow!("no listener was opened"))?,
        )?;
        // Before `enroll`: DNS redirection starts when the pod is enrolled, with its proxy ready.
        self.capture.enroll_dns(&dns.capture(&addrs, cookie))?;
        self.capture.enroll(&PodCapture {
            netns: netns.file().as_fd(),
            netns_cookie: cookie,
            v4: PodListeners::family(&listeners.v4, addrs.primary_v4(), addrs.v4()),
            v6: PodListeners::family(&listeners.v6, addrs.primary_v6(), addrs.v6()),
        })?;
        let pod = Arc::new(Pod {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            identity,
            addrs: addrs.all(),
            netns,
            cert,
        });
        let mut tasks = vec![tokio::spawn(self.dns.clone().serve(
            dns,
            pod.clone(),
            self.ctx.gates.dns.clone(),
        ))];
        for family in [listeners.v4, listeners.v6].into_iter().flatten() {
            tasks.extend(self.serve(family, &pod)?);
        }
        info!(pod = %pod.workload(), addrs = ?pod.addrs, identity = %pod.identity, netns = %pod.netns.path().display(),
            netns_inode = pod.netns.inode(), netns_cookie = cookie, "pod enrolled");
        Ok(RunningPod {
            pod,
            netns_cookie: cookie,
            configured: w.ips.clone(),
            tasks,
        })
    }

    /// The accept loops of one family's listeners.
    fn serve(&self, l: FamilyListeners, pod: &Arc<Pod>) -> anyhow::Result<Vec<JoinHandle<()>>> {
        let acceptor = proxy::inbound::acceptor(pod, &self.ctx)?;
        let (p1, p2, p3) = (pod.clone(), pod.clone(), pod.clone());
        let (c1, c2, c3) = (self.ctx.clone(), self.ctx.clone(), self.ctx.clone());
        Ok(vec![
            tokio::spawn(proxy::accept_loop(
                self.ctx.gates.outbound.listener(l.outbound),
                move |s, peer| proxy::outbound::handle(s, peer, p1.clone(), c1.clone()),
            )),
            tokio::spawn(proxy::accept_loop(
                self.ctx.gates.hbone.listener(l.hbone),
                move |s, peer| {
                    proxy::inbound::handle(s, peer, acceptor.clone(), p2.clone(), c2.clone())
                },
            )),
            tokio::spawn(proxy::accept_loop(
                self.ctx
                    .gates
                    .inbound_plaintext
                    .listener(l.inbound_plaintext),
                move |s, peer| proxy::inbound_plaintext::handle(s, peer, p3.clone(), c3.clone()),
            )),
        ])
    }

    async fn unenroll(&mut self, r: &RunningPod) {
        let workload = r.pod.workload();
        // eBPF first, so capture stops before the routing that serves it goes away.
        if let Err(e) = self.capture.unenroll(r.netns_cookie) {
            warn!(pod = %workload, error = %e, "removing eBPF state failed");
        }
        if let Err(e) = routing::remove(&r.pod.netns).await {
            warn!(pod = %workload, error = %e, "removing capture routing failed");
        }
        info!(pod = %workload, addrs = ?r.pod.addrs, "pod un-enrolled");
    }
}

/// How long a hold may wait for the config before it is logged loudly (and again after
/// each further period). It is never released for being old: see [`Enroller::resolve_holds`].
const HOLD_WARN_AFTER: Duration = Duration::from_secs(120);

/// A pod's netns held closed by the CNI hook (`enrolled[cookie]` with no listener).
#[derive(Debug)]
struct Hold {
    /// The addresses the pod was held with (from the CNI request or the config).
    ips: Vec<IpAddr>,
    /// Empty for holds adopted from a previous ztunnel's pinned maps.
    namespace: String,
    name: String,
    container_id: String,
    /// The sandbox's netns path and inode; no handle is kept, so a hold never keeps a dead
    /// sandbox's namespace alive.
    netns: Option<(PathBuf, u64)>,
    since: Instant,
    warned: Instant,
}

impl Hold {
    fn workload(&self) -> String {
        if self.name.is_empty() {
            "(adopted hold)".to_string()
        } else {
            format!("{}/{}", self.namespace, self.name)
        }
    }
}

fn namespace_ambient(config: &Config, namespace: &str) -> bool {
    config
        .namespace(namespace)
        .and_then(|n| n.labels.get(DATAPLANE_MODE_LABEL))
        .is_some_and(|v| v == DATAPLANE_MODE_AMBIENT)
}

// === CNI hook ===

impl Enroller {
    /// Holds a restarted ztunnel finds pinned stay in force; the config resolves them by IP.
    fn adopting_holds(mut self) -> Self {
        match self.capture.holds() {
            Ok(pinned) => {
                let now = Instant::now();
                for (cookie, ips) in pinned {
                    warn!(
                        ?ips,
                        netns_cookie = cookie,
                        "adopting a pod hold left by an earlier ztunnel"
                    );
                    self.holds.insert(
                        cookie,
                        Hold {
                            ips,
                            namespace: String::new(),
                            name: String::new(),
                            container_id: String::new(),
                            netns: None,
                            since: now,
                            warned: now,
                        },
                    );
                }
            }
            Err(e) => warn!(error = %e, "cannot list pinned pod holds"),
        }
        self
    }

    /// Answers one CNI hook request. ADD holds the pod's netns closed when its namespace is
    /// ambient and the config does not already say otherwise; the answer is sent only after
    /// the eBPF state is written.
    pub fn cni(&mut self, req: &cni::proto::Request, config: &Config) -> cni::proto::Response {
        use cni::proto::{Command, Response};
        let pod = format!("{}/{}", req.namespace, req.name);
        match req.command {
            Command::Check => Response::ok(false, "ztunnel is serving"),
            Command::Del => {
                let cookies: Vec<u64> = self
                    .holds
                    .iter()
                    .filter(|(_, h)| {
                        (!req.container_id.is_empty() && h.container_id == req.container_id)
                            || (!req.netns.is_empty()
                                && h.netns
                                    .as_ref()
                                    .is_some_and(|(p, _)| p.as_os_str() == req.netns.as_str()))
                    })
                    .map(|(c, _)| *c)
                    .collect();
                let n = cookies.len();
                for cookie in cookies {
                    self.release(cookie, "CNI DEL");
                }
                Response::ok(false, format!("released {n} hold(s)"))
            }
            Command::Add => {
                if !namespace_ambient(config, &req.namespace) {
                    info!(%pod, "CNI ADD: namespace is not ambient; not held");
                    return Response::ok(false, "namespace is not ambient");
                }
                let known = config.workloads.iter().find(|w| {
                    w.namespace == req.namespace && w.name == req.name && w.node == self.node
                });
                if let Some(w) = known
                    && (!config.is_enrolled(w) || w.labels.contains_key(WAYPOINT_NAME_LABEL))
                {
                    info!(%pod, "CNI ADD: pod is not enrolled (opted out or a waypoint); not held");
                    return Response::ok(false, "pod is not enrolled");
                }
                let path = PathBuf::from(&req.netns);
                let netns = match Netns::open(&path) {
                    Ok(ns) => ns,
                    Err(e) => return Response::refuse(format!("pod {pod}: {e}")),
                };
                let cookie = match netns_cookie_of(&netns) {
                    Ok(c) => c,
                    Err(e) => return Response::refuse(format!("pod {pod}: netns cookie: {e}")),
                };
                // A pod without an address is still held: the addresses only tell its own
                // from everyone else's, which it cannot use anyway.
                let ips: Vec<IpAddr> = req.ips.iter().map(IpAddr::to_canonical).collect();
                if let Err(e) = self.capture.hold(cookie, &ips) {
                    warn!(%pod, ?ips, error = %e, "CNI ADD: holding the pod failed; refusing");
                    return Response::refuse(format!("pod {pod}: {e}"));
                }
                let now = Instant::now();
                self.holds.insert(
                    cookie,
                    Hold {
                        ips: ips.clone(),
                        namespace: req.namespace.clone(),
                        name: req.name.clone(),
                        container_id: req.container_id.clone(),
                        netns: Some((path, netns.inode())),
                        since: now,
                        warned: now,
                    },
                );
                info!(%pod, ?ips, netns = %req.netns, netns_cookie = cookie, "CNI ADD: pod held closed until enrolled");
                Response::ok(true, "held until enrolled")
            }
        }
    }

    fn release(&mut self, cookie: u64, why: &str) {
        if let Some(h) = self.holds.remove(&cookie) {
            match self.capture.release_hold(cookie) {
                Ok(_) => {
                    info!(pod = %h.workload(), ips = ?h.ips, netns_cookie = cookie, reason = why, "pod hold released")
                }
                Err(e) => {
                    warn!(pod = %h.workload(), ips = ?h.ips, error = %e, "releasing a pod hold failed")
                }
            }
        }
    }

    /// Settles holds against the config: a pod now enrolled replaced its hold with the full
    /// state; a pod the config lists as not enrolled (opted out, a waypoint, namespace no
    /// longer ambient) is released; a sandbox whose netns is gone is released. Anything else
    /// stays held, however long it takes: releasing on a timer would let a pod that is meant
    /// to be captured talk in plaintext, so an old hold is only logged loudly. Returns how many
    /// holds remain.
    fn resolve_holds(&mut self, config: &Config) -> usize {
        let now = Instant::now();
        let mut release = Vec::new();
        let mut enrolled = Vec::new();
        for (cookie, h) in &mut self.holds {
            // The running pod must be this sandbox: an old pod with the same IP that the
            // config still lists does not end the new one's hold.
            let running = self.running.values().any(|r| match &h.netns {
                Some((_, inode)) => *inode == r.pod.netns.inode(),
                None => h.ips.iter().any(|ip| r.pod.has_addr(*ip)),
            });
            if running {
                enrolled.push(*cookie);
                continue;
            }
            let listed = config.workloads.iter().find(|w| {
                w.node == self.node
                    && if h.name.is_empty() {
                        w.ips.iter().any(|ip| h.ips.contains(&ip.to_canonical()))
                    } else {
                        w.namespace == h.namespace && w.name == h.name
                    }
            });
            if let Some(w) = listed
                && (!config.is_enrolled(w) || w.labels.contains_key(WAYPOINT_NAME_LABEL))
            {
                release.push((*cookie, "the config lists the pod as not enrolled"));
                continue;
            }
            if !h.namespace.is_empty() && !namespace_ambient(config, &h.namespace) {
                release.push((*cookie, "the namespace is no longer ambient"));
                continue;
            }
            // Positive evidence only: the path names nothing or another namespace. A failed
            // check (any other error) keeps the hold.
            if let Some((path, inode)) = &h.netns
                && match std::fs::metadata(path) {
                    Ok(meta) => meta.ino() != *inode,
                    Err(e) => e.kind() == std::io::ErrorKind::NotFound,
                }
            {
                release.push((*cookie, "the pod's netns is gone"));
                continue;
            }
            if now.duration_since(h.warned) >= HOLD_WARN_AFTER {
                h.warned = now;
                error!(pod = %h.workload(), ips = ?h.ips, netns_cookie = *cookie,
                    held_secs = now.duration_since(h.since).as_secs(),
                    "pod is still held closed: the config has not enrolled it yet; its connections fail until it does (or CNI DEL)");
            }
        }
        for cookie in enrolled {
            // Only removes the entry if the running pod is another netns with the same IP.
            if let Some(h) = self.holds.remove(&cookie) {
                let _ = self.capture.release_hold(cookie);
                info!(pod = %h.workload(), ips = ?h.ips, "held pod is now enrolled");
            }
        }
        for (cookie, why) in release {
            self.release(cookie, why);
        }
        // Un-enrolling a pod whose address moved to a new sandbox removes that sandbox's
        // state too: put the holds back (a no-op for those still in place).
        for (cookie, h) in &self.holds {
            if let Err(e) = self.capture.hold(*cookie, &h.ips) {
                warn!(pod = %h.workload(), ips = ?h.ips, error = %e, "re-writing a pod hold failed");
            }
        }
        self.holds.len()
    }
}

/// The netns cookie of `ns`, read from a throwaway socket made inside it.
fn netns_cookie_of(ns: &Netns) -> anyhow::Result<u64> {
    let sock =
        ns.run(|| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None))??;
    Ok(ambit_ebpf::netns_cookie(sock.as_fd())?)
}
