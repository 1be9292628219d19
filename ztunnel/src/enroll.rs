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
use std::path::PathBuf;
use std::sync::Arc;

use ambit_ebpf::{Capture, DnsCapture, PodCapture};
use ambit_shared::config::{Config, WAYPOINT_NAME_LABEL, Workload};
use ambit_shared::identity::Identity;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::capture::{self, Netns, PodListeners};
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
}

/// What a reconcile pass left undone.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Local enrolled pods not running yet (no netns found, or enrolling failed).
    pub pending: usize,
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
        }
    }

    /// Brings capture in line with `config`.
    pub async fn reconcile(&mut self, config: &Config) -> Outcome {
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
        Outcome { pending }
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
        let tasks = vec![
            tokio::spawn(self.dns.clone().serve(dns, pod.clone())),
            tokio::spawn(proxy::accept_loop(
                outbound,
                "outbound",
                pod.clone(),
                move |s, peer| proxy::outbound::handle(s, peer, p1.clone(), ctx.clone()),
            )),
            tokio::spawn({
                let ctx = self.ctx.clone();
                proxy::accept_loop(hbone, "hbone", pod.clone(), move |s, peer| {
                    proxy::inbound::handle(s, peer, acceptor.clone(), p2.clone(), ctx.clone())
                })
            }),
            tokio::spawn(proxy::accept_loop(
                inbound_plaintext,
                "inbound_plaintext",
                pod.clone(),
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
