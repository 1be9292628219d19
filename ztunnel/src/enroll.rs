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

use ambit_ebpf::{Capture, DnsCapture, PodCapture};
use ambit_shared::config::{
    Config, DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, WAYPOINT_NAME_LABEL, Workload,
};
use ambit_shared::identity::Identity;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::capture::{self, Netns, PodListeners};
use crate::cni;
use crate::dns::DnsProxy;
use crate::proxy::{self, Pod, ProxyContext};
use ambit_shared::certs::CertManager;

/// A pod this ztunnel serves.
struct RunningPod {
    pod: Arc<Pod>,
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
    netns_dir: PathBuf,
    capture: Capture,
    certs: CertManager,
    ctx: Arc<ProxyContext>,
    dns: Arc<DnsProxy>,
    running: HashMap<IpAddr, RunningPod>,
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

impl Enroller {
    /// Creates the enroller; `capture` may hold state adopted from a previous run.
    pub fn new(
        node: String,
        netns_dir: PathBuf,
        capture: Capture,
        certs: CertManager,
        ctx: Arc<ProxyContext>,
        dns: Arc<DnsProxy>,
    ) -> Self {
        Enroller {
            node,
            netns_dir,
            capture,
            certs,
            ctx,
            dns,
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
        let desired: HashMap<IpAddr, (&Workload, Identity)> = config
            .workloads
            .iter()
            // Waypoint pods speak HBONE themselves; capturing them would loop their traffic.
            .filter(|w| w.node == self.node && config.is_enrolled(w) && !w.labels.contains_key(WAYPOINT_NAME_LABEL))
            .filter_map(|w| match config.identity_of(w) {
                Ok(id) => Some((w, id)),
                Err(e) => {
                    warn!(workload = %format!("{}/{}", w.namespace, w.name), error = %e, "skipping workload");
                    None
                }
            })
            .flat_map(|(w, id)| {
                w.ips.iter().filter(|ip| ip.is_ipv4()).map(move |ip| (*ip, (w, id.clone())))
            })
            .collect();

        // Leave: pods gone from the config, opted out, or whose identity changed.
        let leaving: Vec<IpAddr> = self
            .running
            .iter()
            .filter(|(ip, r)| {
                desired
                    .get(ip)
                    .is_none_or(|(w, id)| *id != r.pod.identity || w.name != r.pod.name)
            })
            .map(|(ip, _)| *ip)
            .collect();
        for ip in leaving {
            if let Some(r) = self.running.remove(&ip) {
                self.unenroll(ip, Some(&r.pod.netns), &r.pod.workload());
            }
        }
        // State pinned by an earlier ztunnel for pods that are no longer ours.
        match self.capture.enrolled_pods() {
            Ok(pinned) => {
                let stale: Vec<IpAddr> = pinned
                    .into_iter()
                    .filter(|ip| !desired.contains_key(ip) && !self.running.contains_key(ip))
                    .collect();
                if !stale.is_empty() {
                    let found = capture::netns::find_by_ip(
                        &self.netns_dir,
                        &stale.iter().copied().collect(),
                    );
                    for ip in stale {
                        self.unenroll(ip, found.get(&ip), "(stale pinned state)");
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot list pinned pods"),
        }

        // Join: pods not running yet.
        let missing: HashSet<IpAddr> = desired
            .keys()
            .filter(|ip| !self.running.contains_key(ip))
            .copied()
            .collect();
        if missing.is_empty() {
            self.certs
                .retain(|id| self.running.values().any(|r| &r.pod.identity == id));
            return Outcome::default();
        }
        let mut found = capture::netns::find_by_ip(&self.netns_dir, &missing);
        let mut pending = 0;
        for ip in missing {
            let Some(netns) = found.remove(&ip) else {
                pending += 1;
                continue;
            };
            let Some((w, id)) = desired.get(&ip) else {
                continue;
            };
            match self.enroll(ip, netns, w, id.clone()).await {
                Ok(r) => {
                    self.running.insert(ip, r);
                }
                Err(e) => {
                    warn!(pod = %format!("{}/{}", w.namespace, w.name), %ip, error = %e, "enrolling pod failed; will retry");
                    pending += 1;
                }
            }
        }
        self.certs
            .retain(|id| self.running.values().any(|r| &r.pod.identity == id));
        Outcome { pending, held: 0 }
    }

    /// Drops pods whose network namespace is gone or was replaced (a pod re-created with the
    /// same IP). Our own handle keeps an old namespace alive, so this is the only way to
    /// notice; the next [`Enroller::reconcile`] enrolls the new namespace.
    pub fn drop_replaced_pods(&mut self) {
        if self.running.is_empty() {
            return;
        }
        let ips: HashSet<IpAddr> = self.running.keys().copied().collect();
        let found = capture::netns::find_by_ip(&self.netns_dir, &ips);
        for ip in ips {
            let Some(running) = self.running.get(&ip) else {
                continue;
            };
            if found
                .get(&ip)
                .is_some_and(|ns| ns.inode() == running.pod.netns.inode())
            {
                continue;
            }
            warn!(pod = %running.pod.workload(), %ip, "pod network namespace is gone or was replaced");
            if let Some(r) = self.running.remove(&ip) {
                self.unenroll(ip, Some(&r.pod.netns), &r.pod.workload());
            }
        }
    }

    async fn enroll(
        &mut self,
        ip: IpAddr,
        netns: Netns,
        w: &Workload,
        identity: Identity,
    ) -> anyhow::Result<RunningPod> {
        let cert = self.certs.get(&identity).await?;
        let netns = Arc::new(netns);
        let PodListeners {
            outbound,
            inbound_plaintext,
            hbone,
        } = capture::open_listeners(&netns)?;
        let dns = capture::dns::open_listeners(&netns)?;
        capture::install_routing(&netns, ip)?;
        let cookie = ambit_ebpf::netns_cookie(hbone.as_fd())?;
        // Before `enroll`: DNS redirection starts when the pod is enrolled, with its proxy ready.
        self.capture.enroll_dns(&DnsCapture {
            pod_ip: ip,
            netns_cookie: cookie,
            udp_listener: dns.udp_fd(),
        })?;
        self.capture.enroll(&PodCapture {
            pod_ip: ip,
            netns: netns.file().as_fd(),
            netns_cookie: cookie,
            outbound_listener: outbound.as_fd(),
            inbound_listener: inbound_plaintext.as_fd(),
        })?;
        let pod = Arc::new(Pod {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            identity,
            ip,
            netns,
            cert,
        });
        let acceptor = proxy::inbound::acceptor(&pod, &self.ctx)?;
        let ctx = self.ctx.clone();
        let (p1, p2, p3) = (pod.clone(), pod.clone(), pod.clone());
        let ctx3 = self.ctx.clone();
        let gates = &self.ctx.gates;
        let tasks = vec![
            tokio::spawn(self.dns.clone().serve(dns, pod.clone(), gates.dns.clone())),
            tokio::spawn(proxy::accept_loop(
                gates.outbound.listener(outbound),
                move |s, peer| proxy::outbound::handle(s, peer, p1.clone(), ctx.clone()),
            )),
            tokio::spawn({
                let ctx = self.ctx.clone();
                proxy::accept_loop(gates.hbone.listener(hbone), move |s, peer| {
                    proxy::inbound::handle(s, peer, acceptor.clone(), p2.clone(), ctx.clone())
                })
            }),
            tokio::spawn(proxy::accept_loop(
                gates.inbound_plaintext.listener(inbound_plaintext),
                move |s, peer| proxy::inbound_plaintext::handle(s, peer, p3.clone(), ctx3.clone()),
            )),
        ];
        info!(pod = %pod.workload(), %ip, identity = %pod.identity, netns = %pod.netns.path().display(),
            netns_inode = pod.netns.inode(), "pod enrolled");
        Ok(RunningPod { pod, tasks })
    }

    fn unenroll(&mut self, ip: IpAddr, netns: Option<&Netns>, workload: &str) {
        // eBPF first, so capture stops before the routing that serves it goes away.
        if let Err(e) = self.capture.unenroll(ip) {
            warn!(pod = workload, %ip, error = %e, "removing eBPF state failed");
        }
        if let Some(ns) = netns
            && let Err(e) = capture::remove_routing(ns)
        {
            warn!(pod = workload, %ip, error = %e, "removing capture routing failed");
        }
        info!(pod = workload, %ip, "pod un-enrolled");
    }
}

/// How long a hold may wait for the config before it is logged loudly (and again after
/// each further period). It is never released for being old: see [`Enroller::resolve_holds`].
const HOLD_WARN_AFTER: Duration = Duration::from_secs(120);

/// A pod's netns held closed by the CNI hook (`enrolled[cookie]` with no listener).
#[derive(Debug)]
struct Hold {
    ip: IpAddr,
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
                for (cookie, ip) in pinned {
                    warn!(%ip, netns_cookie = cookie, "adopting a pod hold left by an earlier ztunnel");
                    self.holds.insert(
                        cookie,
                        Hold {
                            ip,
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
                // A pod without an address is still held: the IP only lets its own
                // address through the hooks, which it cannot use anyway.
                let ip = req
                    .ips
                    .iter()
                    .find(|ip| ip.is_ipv4())
                    .or(req.ips.first())
                    .copied()
                    .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
                if let Err(e) = self.capture.hold(cookie, ip) {
                    warn!(%pod, %ip, error = %e, "CNI ADD: holding the pod failed; refusing");
                    return Response::refuse(format!("pod {pod}: {e}"));
                }
                let now = Instant::now();
                self.holds.insert(
                    cookie,
                    Hold {
                        ip,
                        namespace: req.namespace.clone(),
                        name: req.name.clone(),
                        container_id: req.container_id.clone(),
                        netns: Some((path, netns.inode())),
                        since: now,
                        warned: now,
                    },
                );
                info!(%pod, %ip, netns = %req.netns, netns_cookie = cookie, "CNI ADD: pod held closed until enrolled");
                Response::ok(true, "held until enrolled")
            }
        }
    }

    fn release(&mut self, cookie: u64, why: &str) {
        if let Some(h) = self.holds.remove(&cookie) {
            match self.capture.release_hold(cookie) {
                Ok(_) => {
                    info!(pod = %h.workload(), ip = %h.ip, netns_cookie = cookie, reason = why, "pod hold released")
                }
                Err(e) => {
                    warn!(pod = %h.workload(), ip = %h.ip, error = %e, "releasing a pod hold failed")
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
            if let Some(r) = self.running.get(&h.ip)
                && h.netns
                    .as_ref()
                    .is_none_or(|(_, inode)| *inode == r.pod.netns.inode())
            {
                enrolled.push(*cookie);
                continue;
            }
            let listed = config.workloads.iter().find(|w| {
                w.node == self.node
                    && if h.name.is_empty() {
                        w.ips.contains(&h.ip)
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
            if let Some((path, inode)) = &h.netns
                && std::fs::metadata(path).map(|m| m.ino()).ok() != Some(*inode)
            {
                release.push((*cookie, "the pod's netns is gone"));
                continue;
            }
            if now.duration_since(h.warned) >= HOLD_WARN_AFTER {
                h.warned = now;
                error!(pod = %h.workload(), ip = %h.ip, netns_cookie = *cookie,
                    held_secs = now.duration_since(h.since).as_secs(),
                    "pod is still held closed: the config has not enrolled it yet; its connections fail until it does (or CNI DEL)");
            }
        }
        for cookie in enrolled {
            // Only removes the entry if the running pod is another netns with the same IP.
            if let Some(h) = self.holds.remove(&cookie) {
                let _ = self.capture.release_hold(cookie);
                info!(pod = %h.workload(), ip = %h.ip, "held pod is now enrolled");
            }
        }
        for (cookie, why) in release {
            self.release(cookie, why);
        }
        // Un-enrolling a pod clears every `enrolled` entry with its IP, which may include the
        // hold of a new sandbox that reuses the IP: put those back.
        for (cookie, h) in &self.holds {
            if let Err(e) = self.capture.hold(*cookie, h.ip) {
                warn!(pod = %h.workload(), ip = %h.ip, error = %e, "re-writing a pod hold failed");
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
