//! The simulated cluster: [`Cluster`], its [`Node`]s and [`Pod`]s.
//!
//! A [`Cluster`] owns every kernel object it creates (namespaces, mounts,
//! cgroup directories, the subnet slot) and removes them in
//! [`Cluster::shutdown`] or on drop, so also when a test panics. [`Node`]
//! and [`Pod`] are cheap, cloneable handles; they never own resources, so
//! the cluster's lifetime alone decides when everything goes away.
//!
//! Names embed the test process's PID and a per-process counter
//! (`amb<pid>-<n>`), which makes parallel tests and processes safe and lets
//! [`Cluster::new`] recognise and sweep leftovers of test processes that died
//! without cleaning up (their PID is gone from /proc).

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use parking_lot::Mutex;

use crate::capture::Capture;
use crate::cgroup::{self, Mount};
use crate::config::{self, Config, Labels, Workload};
use crate::netns::{self, NetNs};
use crate::process::{self, Proc};
use crate::sys::{self, Join};

/// First and last value of `S` in the cluster subnet `10.S.0.0/16`.
const SLOTS: std::ops::RangeInclusive<u8> = 100..=199;
/// How long tear-down waits for processes to die and cgroups to empty.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long each command of [`Pod::capture_state`] may take.
const CAPTURE_STATE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Pod::spawn_testapp`] waits for a server to print "listening".
const APP_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// The bridge in the cluster netns joining all nodes.
pub const CLUSTER_BRIDGE: &str = "br0";
/// The bridge in each node netns joining its pods.
pub const NODE_BRIDGE: &str = "cbr0";
/// Set to keep `/run/ambit-tests/<id>/` (logs, captures) after a passing
/// test; it is always kept after a panic. Leftover directories of dead test
/// processes are removed by the next [`Cluster::new`].
pub const KEEP_STATE_ENV: &str = "AMBIT_KEEP_STATE";

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// The address families of a cluster's pods. Nodes always have IPv4 too (the node network
/// is not under test), and every interface has its link-local IPv6 address, as the kernel
/// gives one by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IpFamilies {
    /// Pods have an IPv4 address only (and link-local IPv6).
    #[default]
    V4,
    /// Pods have an IPv4 and a ULA IPv6 address; services may have VIPs of both.
    DualStack,
    /// Pods have a ULA IPv6 address only.
    V6Only,
}

impl IpFamilies {
    fn v4(self) -> bool {
        self != IpFamilies::V6Only
    }

    fn v6(self) -> bool {
        self != IpFamilies::V4
    }
}

/// A simulated cluster. See the [crate docs](crate) for the topology.
pub struct Cluster {
    shared: Arc<ClusterShared>,
    topology: Mutex<Topology>,
    resources: Mutex<Resources>,
}

/// What [`Node`] and [`Pod`] handles need to reach the cluster: names,
/// paths, the config and the PID registry. Owns no kernel objects.
pub(crate) struct ClusterShared {
    pub(crate) id: String,
    pub(crate) families: IpFamilies,
    pub(crate) dir: PathBuf,
    pub(crate) slot: u8,
    pub(crate) netns_name: String,
    pub(crate) cgroup_root: PathBuf,
    pub(crate) bpffs_root: PathBuf,
    pub(crate) config: Mutex<Config>,
    pub(crate) pids: Mutex<Vec<u32>>,
    counter: AtomicU32,
}

#[derive(Default)]
struct Topology {
    nodes: Vec<Node>,
    pods: Vec<Pod>,
}

/// Kernel objects to remove. Removed by [`Resources::teardown`], which
/// `Drop` also runs, so a cluster that fails half-way through
/// [`Cluster::new`] cleans up what it had made.
struct Resources {
    torn_down: bool,
    /// The state directory, `/run/ambit-tests/<id>`.
    dir: PathBuf,
    /// `<cgroup mount>/ambit-<id>`, once created.
    cgroup_root: Option<PathBuf>,
    /// Node and pod namespaces, in creation order; the cluster's own last.
    netns: Vec<NetNs>,
    cluster_netns: Option<NetNs>,
    cgroup_mount: Option<Mount>,
    bpffs_mount: Option<Mount>,
    slot: Option<SlotLock>,
}

/// A node: a netns on the cluster bridge with its own pod bridge, a cgroup
/// subtree and a bpffs pin directory.
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

struct NodeInner {
    name: String,
    index: u8,
    ip: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
    netns_name: String,
    cgroup_dir: PathBuf,
    bpffs_dir: PathBuf,
    cluster: Arc<ClusterShared>,
}

/// A pod: a netns behind a veth on its node's bridge, and a cgroup.
#[derive(Clone)]
pub struct Pod {
    inner: Arc<PodInner>,
}

struct PodInner {
    name: String,
    namespace: String,
    service_account: String,
    ip: Option<Ipv4Addr>,
    ip6: Option<Ipv6Addr>,
    node: Node,
    netns_name: String,
    cgroup_dir: PathBuf,
}

/// What to create with [`Cluster::add_pod`].
#[derive(Debug, Clone)]
pub struct PodSpec {
    name: String,
    namespace: String,
    service_account: String,
    labels: Labels,
}

/// Everything a cluster created, for asserting that tear-down left nothing
/// behind (see [`Footprint::leftovers`]).
#[derive(Debug, Clone)]
pub struct Footprint {
    /// The cluster id, `amb<pid>-<n>`.
    pub id: String,
    /// The state directory.
    pub dir: PathBuf,
    /// Namespace names.
    pub netns: Vec<String>,
    /// Mount points.
    pub mounts: Vec<PathBuf>,
    /// The cluster's cgroup directory, relative to the cgroup2 root.
    pub cgroup: PathBuf,
    /// PIDs of processes the harness started for this cluster.
    pub pids: Vec<u32>,
}

/// The flock reserving one `10.S.0.0/16`; released when dropped (or when
/// the process dies, which is what makes stale slots reusable).
struct SlotLock {
    slot: u8,
    _lock: Flock<File>,
}

// === impl Cluster ===

impl Cluster {
    /// Builds an empty IPv4 cluster: reserves a subnet slot, sweeps leftovers
    /// of dead test processes, mounts a private cgroup2 and bpffs, and
    /// creates the cluster netns with its bridge.
    pub fn new() -> Result<Cluster> {
        Self::with_families(IpFamilies::V4)
    }

    /// Like [`Cluster::new`], with pods of the given address families. IPv6
    /// uses the ULA prefix `fd00:S::/32` of the cluster's slot `S` (hex):
    /// nodes `fd00:S::(i+1)`, pods of node `i` `fd00:S:(i+1)::k`.
    pub fn with_families(families: IpFamilies) -> Result<Cluster> {
        crate::require_privileges().map_err(|e| anyhow!(e))?;
        let root = Path::new(crate::STATE_ROOT);
        std::fs::create_dir_all(root.join("slots"))
            .with_context(|| format!("creating {}", root.display()))?;
        sweep_stale_without_cgroup();

        let id = next_id();
        let slot = SlotLock::acquire()?;
        let dir = root.join(&id);
        std::fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("creating {}", dir.display()))?;

        // Each resource is owned by `resources` as soon as it exists, so a
        // failure half-way drops (and removes) what was already made.
        let mut resources = Resources {
            torn_down: false,
            dir: dir.clone(),
            cgroup_root: None,
            netns: Vec::new(),
            cluster_netns: None,
            cgroup_mount: None,
            bpffs_mount: None,
            slot: None,
        };
        let slot_num = slot.slot;
        resources.slot = Some(slot);
        let cgroup_mount = resources
            .cgroup_mount
            .insert(Mount::new("cgroup2", &dir.join("cgroup"))?);
        sweep_stale_cgroups(cgroup_mount.target());
        let cgroup_root = cgroup_mount.target().join(format!("ambit-{id}"));
        std::fs::create_dir(&cgroup_root)
            .with_context(|| format!("creating cgroup {}", cgroup_root.display()))?;
        resources.cgroup_root = Some(cgroup_root.clone());
        let bpffs_root = resources
            .bpffs_mount
            .insert(Mount::new("bpf", &dir.join("bpffs"))?)
            .target()
            .to_path_buf();

        let netns_name = format!("{id}-c");
        let ns = resources.cluster_netns.insert(NetNs::create(&netns_name)?);
        no_dad(&netns_name)?;
        ns.ip_batch(&[
            // forward_delay 0: ports forward immediately (STP is off anyway),
            // so the first packets of a test are never dropped.
            format!("link add {CLUSTER_BRIDGE} type bridge forward_delay 0"),
            // An address only for debugging from the cluster netns
            // (ping a node from `ip netns exec <id>-c`); nothing routes via it.
            format!("addr add 10.{slot_num}.0.254/24 dev {CLUSTER_BRIDGE}"),
            format!("link set {CLUSTER_BRIDGE} up"),
        ])?;

        let shared = Arc::new(ClusterShared {
            id,
            families,
            dir,
            slot: slot_num,
            netns_name,
            cgroup_root,
            bpffs_root,
            config: Mutex::new(Config::new("cluster.local")),
            pids: Mutex::new(Vec::new()),
            counter: AtomicU32::new(0),
        });
        Ok(Cluster {
            shared,
            topology: Mutex::new(Topology::default()),
            resources: Mutex::new(resources),
        })
    }

    /// The cluster id, `amb<pid>-<n>`; every name the cluster creates starts
    /// with it.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The state directory, `/run/ambit-tests/<id>/`.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Where process logs go: `<dir>/logs/`.
    pub fn logs_dir(&self) -> PathBuf {
        self.shared.dir.join("logs")
    }

    /// The subnet slot `S` of `10.S.0.0/16`.
    pub fn slot(&self) -> u8 {
        self.shared.slot
    }

    /// The cluster's subnet, e.g. `10.123.0.0/16`.
    pub fn subnet(&self) -> String {
        format!("10.{}.0.0/16", self.shared.slot)
    }

    /// The cluster's IPv6 prefix, e.g. `fd00:7b::/32`.
    pub fn subnet6(&self) -> String {
        format!("fd00:{:x}::/32", self.shared.slot)
    }

    /// The address families of the cluster's pods.
    pub fn families(&self) -> IpFamilies {
        self.shared.families
    }

    /// The cluster netns name (`<id>-c`).
    pub fn netns_name(&self) -> &str {
        &self.shared.netns_name
    }

    /// The cluster's cgroup directory (`<mount>/ambit-<id>`); node subtrees
    /// sit below it.
    pub fn cgroup_root(&self) -> &Path {
        &self.shared.cgroup_root
    }

    /// The cluster's private bpffs mount; node pin directories sit below it.
    pub fn bpffs_root(&self) -> &Path {
        &self.shared.bpffs_root
    }

    /// A command that runs `program` in the cluster netns (which sees the
    /// bridge between nodes), e.g. tcpdump.
    pub fn netns_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        netns_command(&self.shared.netns_name, program)
    }

    /// Adds a node named `name` (a DNS label, unique in the cluster).
    ///
    /// Node `i` (0-based) gets `10.S.0.(i+1)` on the cluster bridge and the
    /// pod CIDR `10.S.(i+1).0/24`, and routes to every other node's pods.
    pub fn add_node(&self, name: &str) -> Result<Node> {
        validate_name("node", name)?;
        let mut topo = self.topology.lock();
        if topo.nodes.iter().any(|n| n.name() == name) {
            bail!("node {name} already exists");
        }
        let index = u8::try_from(topo.nodes.len())
            .ok()
            .filter(|i| *i < 250)
            .context("too many nodes")?;
        let s = self.shared.slot;
        let ip = Ipv4Addr::new(10, s, 0, index + 1);
        let netns_name = format!("{}-n-{name}", self.shared.id);
        let ns = self.track_netns(NetNs::create(&netns_name)?);
        no_dad(&netns_name)?;
        let ip6 = self.shared.families.v6().then(|| node_ip6(s, index));
        let peer = format!("vn{index}");
        ns.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &self.shared.netns_name,
        ])?;
        netns::ip(&[
            "-n",
            &self.shared.netns_name,
            "link",
            "set",
            &peer,
            "master",
            CLUSTER_BRIDGE,
            "up",
        ])?;
        ns.ip_batch(&[
            format!("addr add {ip}/24 dev eth0"),
            "link set eth0 up".into(),
            format!("link add {NODE_BRIDGE} type bridge forward_delay 0"),
            format!("addr add 10.{s}.{}.1/24 dev {NODE_BRIDGE}", index + 1),
            format!("link set {NODE_BRIDGE} up"),
        ])?;
        if let Some(ip6) = ip6 {
            ns.ip_batch(&[
                format!("addr add {ip6}/64 dev eth0 nodad"),
                format!(
                    "addr add {}/64 dev {NODE_BRIDGE} nodad",
                    pod_gateway6(s, index)
                ),
            ])?;
            ns.sysctl("net/ipv6/conf/all/forwarding", "1")?;
        }
        // The node routes between its pods and the cluster, like a real
        // node's host network.
        ns.sysctl("net/ipv4/ip_forward", "1")?;

        let cgroup_dir = self.shared.cgroup_root.join(name);
        std::fs::create_dir(&cgroup_dir)
            .with_context(|| format!("creating cgroup {}", cgroup_dir.display()))?;
        let bpffs_dir = self.shared.bpffs_root.join(name);
        std::fs::create_dir(&bpffs_dir)
            .with_context(|| format!("creating {}", bpffs_dir.display()))?;

        let node = Node {
            inner: Arc::new(NodeInner {
                name: name.to_string(),
                index,
                ip,
                ip6,
                netns_name,
                cgroup_dir,
                bpffs_dir,
                cluster: self.shared.clone(),
            }),
        };
        topo.nodes.push(node.clone());
        route_nodes(&topo.nodes)?;
        Ok(node)
    }

    /// Adds a pod on `node` and registers it as a workload in the config
    /// (creating its namespace without labels if needed; see
    /// [`Cluster::enroll_namespace`]).
    ///
    /// The k-th pod on node `i` (from k = 2) gets `10.S.(i+1).k/24`, with a
    /// default route via the node's bridge address `10.S.(i+1).1`.
    pub fn add_pod(&self, node: &Node, spec: PodSpec) -> Result<Pod> {
        validate_name("pod", &spec.name)?;
        validate_name("namespace", &spec.namespace)?;
        if !Arc::ptr_eq(&node.inner.cluster, &self.shared) {
            bail!("node {} belongs to another cluster", node.name());
        }
        let mut topo = self.topology.lock();
        if topo
            .pods
            .iter()
            .any(|p| p.name() == spec.name && p.namespace() == spec.namespace)
        {
            bail!("pod {}/{} already exists", spec.namespace, spec.name);
        }
        let on_node = topo
            .pods
            .iter()
            .filter(|p| p.node().name() == node.name())
            .count();
        let host = u8::try_from(on_node + 2)
            .ok()
            .filter(|h| *h < 255)
            .context("too many pods on this node")?;
        let subnet = node.inner.index + 1;
        let s = self.shared.slot;
        let families = self.shared.families;
        let ip = families.v4().then(|| Ipv4Addr::new(10, s, subnet, host));
        let ip6 = families.v6().then(|| pod_ip6(s, node.inner.index, host));
        let netns_name = format!("{}-p-{}_{}", self.shared.id, spec.namespace, spec.name);
        let ns = self.track_netns(NetNs::create(&netns_name)?);
        no_dad(&netns_name)?;
        // Interface names need only be unique per namespace: `eth0` in
        // every pod, `vp<host>` on the node.
        let peer = format!("vp{host}");
        ns.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &node.inner.netns_name,
        ])?;
        netns::ip(&[
            "-n",
            &node.inner.netns_name,
            "link",
            "set",
            &peer,
            "master",
            NODE_BRIDGE,
            "up",
        ])?;
        let mut setup = Vec::new();
        if let Some(ip) = ip {
            setup.push(format!("addr add {ip}/24 dev eth0"));
        }
        if let Some(ip6) = ip6 {
            setup.push(format!("addr add {ip6}/64 dev eth0 nodad"));
        }
        setup.push("link set eth0 up".into());
        if ip.is_some() {
            setup.push(format!("route add default via 10.{s}.{subnet}.1"));
        }
        if ip6.is_some() {
            // `::/0` rather than `default`: in a batch the family comes from the prefix.
            setup.push(format!(
                "route add ::/0 via {}",
                pod_gateway6(s, node.inner.index)
            ));
        }
        ns.ip_batch(&setup)?;
        let cgroup_dir = node
            .inner
            .cgroup_dir
            .join(format!("{}_{}", spec.namespace, spec.name));
        std::fs::create_dir(&cgroup_dir)
            .with_context(|| format!("creating cgroup {}", cgroup_dir.display()))?;

        let pod = Pod {
            inner: Arc::new(PodInner {
                name: spec.name.clone(),
                namespace: spec.namespace.clone(),
                service_account: spec.service_account.clone(),
                ip,
                ip6,
                node: node.clone(),
                netns_name,
                cgroup_dir,
            }),
        };
        {
            let mut cfg = self.shared.config.lock();
            cfg.namespace_mut(&spec.namespace);
            cfg.workloads.push(Workload {
                name: spec.name,
                namespace: spec.namespace,
                service_account: spec.service_account,
                ips: ip
                    .map(IpAddr::from)
                    .into_iter()
                    .chain(ip6.map(IpAddr::from))
                    .collect(),
                node: node.name().to_string(),
                labels: spec.labels,
            });
        }
        topo.pods.push(pod.clone());
        Ok(pod)
    }

    /// All nodes, in creation order.
    pub fn nodes(&self) -> Vec<Node> {
        self.topology.lock().nodes.clone()
    }

    /// All pods, in creation order.
    pub fn pods(&self) -> Vec<Pod> {
        self.topology.lock().pods.clone()
    }

    /// The pod `namespace/name`, if any.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.topology
            .lock()
            .pods
            .iter()
            .find(|p| p.namespace() == namespace && p.name() == name)
            .cloned()
    }

    /// Adds (or replaces the labels of) a namespace.
    pub fn add_namespace(&self, name: &str, labels: Labels) -> Result<()> {
        validate_name("namespace", name)?;
        self.shared.config.lock().namespace_mut(name).labels = labels;
        Ok(())
    }

    /// Enrolls a namespace: `ambit.dev/dataplane-mode: ambient`.
    pub fn enroll_namespace(&self, name: &str) -> Result<()> {
        self.set_namespace_label(name, config::DATAPLANE_MODE, Some(config::AMBIENT))
    }

    /// Sets (`Some`) or removes (`None`) a namespace label. Call
    /// [`Cluster::write_config`] to publish the change.
    pub fn set_namespace_label(
        &self,
        namespace: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<()> {
        validate_name("namespace", namespace)?;
        let mut cfg = self.shared.config.lock();
        let labels = &mut cfg.namespace_mut(namespace).labels;
        match value {
            Some(v) => labels.insert(key.to_string(), v.to_string()),
            None => labels.remove(key),
        };
        Ok(())
    }

    /// Sets (`Some`) or removes (`None`) a pod label. Call
    /// [`Cluster::write_config`] to publish the change.
    pub fn set_pod_label(&self, pod: &Pod, key: &str, value: Option<&str>) -> Result<()> {
        let mut cfg = self.shared.config.lock();
        let w = cfg
            .workload_mut(pod.namespace(), pod.name())
            .with_context(|| {
                format!(
                    "pod {}/{} is not in the config",
                    pod.namespace(),
                    pod.name()
                )
            })?;
        match value {
            Some(v) => w.labels.insert(key.to_string(), v.to_string()),
            None => w.labels.remove(key),
        };
        Ok(())
    }

    /// Edits the config directly (services, policies, …). Call
    /// [`Cluster::write_config`] to publish the change.
    pub fn edit_config<T>(&self, f: impl FnOnce(&mut Config) -> T) -> T {
        f(&mut self.shared.config.lock())
    }

    /// A copy of the current config.
    pub fn config(&self) -> Config {
        self.shared.config.lock().clone()
    }

    /// `<dir>/config.yaml`.
    pub fn config_path(&self) -> PathBuf {
        self.shared.config_path()
    }

    /// Writes the config atomically (temp file + rename), so a watching
    /// ztunnel sees either the old or the new file, never a partial one.
    pub fn write_config(&self) -> Result<PathBuf> {
        self.shared.write_config()
    }

    /// `<dir>/ca`, where [`Cluster::init_ca`] puts the CA.
    pub fn ca_dir(&self) -> PathBuf {
        self.shared.ca_dir()
    }

    /// Runs `ztunnel ca init` into [`Cluster::ca_dir`] and sets the config's
    /// trust domain to `trust_domain`.
    pub fn init_ca(&self, trust_domain: &str) -> Result<PathBuf> {
        let dir = self.ca_dir();
        let bin = crate::bin_path("ztunnel")?;
        let mut cmd = Command::new(bin);
        cmd.args(["ca", "init", "--dir"])
            .arg(&dir)
            .args(["--trust-domain", trust_domain]);
        process::run_ok(&mut cmd, Duration::from_secs(30)).context("ztunnel ca init")?;
        self.shared.config.lock().trust_domain = trust_domain.to_string();
        Ok(dir)
    }

    /// Issues a workload certificate for `identity` from the cluster CA (`ztunnel ca
    /// issue`, valid 1 h) and returns the paths of (chain, key).
    pub fn issue_cert(&self, identity: &str) -> Result<(PathBuf, PathBuf)> {
        let name: String = identity
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let out = self.dir().join("certs").join(name);
        let (ca, dir) = (
            self.ca_dir().display().to_string(),
            out.display().to_string(),
        );
        crate::ztunnel::cli(&[
            "ca",
            "issue",
            "--dir",
            &ca,
            "--identity",
            identity,
            "--out",
            &dir,
            "--ttl",
            "1h",
        ])
        .context("ztunnel ca issue")?;
        Ok((out.join("cert.pem"), out.join("key.pem")))
    }

    /// Starts capturing on the cluster bridge `br0`, which carries all
    /// node-to-node traffic (but not traffic between pods on one node; use
    /// [`Node::capture`] on `cbr0` for that).
    pub fn capture_bridge(&self) -> Result<Capture> {
        Capture::start(
            &self.shared,
            &self.shared.netns_name,
            CLUSTER_BRIDGE,
            "bridge",
        )
    }

    /// What this cluster created, for leak checks after drop.
    pub fn footprint(&self) -> Footprint {
        let res = self.resources.lock();
        let mut netns: Vec<String> = res.netns.iter().map(|n| n.name().to_string()).collect();
        netns.extend(res.cluster_netns.iter().map(|n| n.name().to_string()));
        let mounts = [&res.cgroup_mount, &res.bpffs_mount]
            .into_iter()
            .flatten()
            .map(|m| m.target().to_path_buf());
        Footprint {
            id: self.shared.id.clone(),
            dir: self.shared.dir.clone(),
            netns,
            mounts: mounts.collect(),
            cgroup: PathBuf::from(format!("ambit-{}", self.shared.id)),
            pids: self.shared.pids.lock().clone(),
        }
    }

    /// Tears the cluster down and reports anything that could not be
    /// removed. Dropping the cluster does the same, printing errors instead.
    pub fn shutdown(self) -> Result<()> {
        let errors = self.teardown();
        if errors.is_empty() {
            Ok(())
        } else {
            bail!(
                "cluster {} tear-down: {}",
                self.shared.id,
                errors.join("; ")
            )
        }
    }

    fn teardown(&self) -> Vec<String> {
        self.resources.lock().teardown()
    }

    /// Hands `ns` to the resources (so tear-down removes it even if the
    /// rest of the set-up fails) and returns a name-only handle to
    /// configure it.
    fn track_netns(&self, ns: NetNs) -> NetNsRef {
        let name = ns.name().to_string();
        self.resources.lock().netns.push(ns);
        NetNsRef(name)
    }
}

// === impl Resources ===

impl Resources {
    /// Removes everything, in an order that never fails on a busy object:
    /// processes first (cgroups, then anything left in our namespaces), then
    /// cgroup directories, namespaces, mounts, the state directory and last
    /// the subnet slot. Idempotent; returns what could not be removed.
    fn teardown(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        let mut errors = Vec::new();
        let mut check = |what: &str, r: Result<()>| {
            if let Err(e) = r {
                errors.push(format!("{what}: {e:#}"));
            }
        };

        if let Some(root) = self.cgroup_root.take() {
            check("cgroups", cgroup::remove_tree(&root, TEARDOWN_TIMEOUT));
        }
        let all_ns: Vec<PathBuf> = self
            .netns
            .iter()
            .chain(self.cluster_netns.iter())
            .map(NetNs::path)
            .collect();
        check("processes", kill_in_netns(&all_ns));
        // Pods before nodes before the cluster: each veth is deleted with
        // the first of its two namespaces to go.
        while let Some(ns) = self.netns.pop() {
            let name = ns.name().to_string();
            check(&format!("netns {name}"), ns.remove());
        }
        if let Some(ns) = self.cluster_netns.take() {
            check("cluster netns", ns.remove());
        }
        if let Some(m) = self.bpffs_mount.take() {
            check("bpffs", m.unmount());
        }
        if let Some(m) = self.cgroup_mount.take() {
            check("cgroup2", m.unmount());
        }
        let keep = std::thread::panicking() || std::env::var_os(KEEP_STATE_ENV).is_some();
        if keep {
            eprintln!("harness: kept cluster state in {}", self.dir.display());
        } else if cgroup::mounts_under(&self.dir).is_empty() {
            check(
                "state dir",
                std::fs::remove_dir_all(&self.dir)
                    .with_context(|| format!("removing {}", self.dir.display())),
            );
        } else {
            errors.push(format!(
                "state dir {} still has mounts; not removed",
                self.dir.display()
            ));
        }
        self.slot.take();
        errors
    }
}

impl Drop for Resources {
    fn drop(&mut self) {
        for e in self.teardown() {
            eprintln!("harness: tear-down of {}: {e}", self.dir.display());
        }
    }
}

/// The name of a namespace owned by `Resources`, for configuring it.
struct NetNsRef(String);

impl NetNsRef {
    fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", &self.0];
        full.extend_from_slice(args);
        netns::ip(&full)
    }

    fn ip_batch(&self, commands: &[String]) -> Result<()> {
        netns::ip_batch(&self.0, commands)
    }

    fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        netns::sysctl(&self.0, key, value)
    }
}

// === impl ClusterShared ===

impl ClusterShared {
    pub(crate) fn config_path(&self) -> PathBuf {
        self.dir.join("config.yaml")
    }

    pub(crate) fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    pub(crate) fn write_config(&self) -> Result<PathBuf> {
        let path = self.config_path();
        // Serialise under the lock so two writers can't interleave renames
        // of older and newer contents.
        let cfg = self.config.lock();
        cfg.write_atomic(&path)?;
        Ok(path)
    }

    /// A fresh log path `<dir>/logs/<stem>.<n>.log`.
    pub(crate) fn log_path(&self, stem: &str) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.dir.join("logs").join(format!("{stem}.{n}.log"))
    }

    /// A fresh file path `<dir>/<sub>/<stem>.<n>.<ext>`.
    pub(crate) fn artifact_path(&self, sub: &str, stem: &str, ext: &str) -> Result<PathBuf> {
        let dir = self.dir.join(sub);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        Ok(dir.join(format!("{stem}.{n}.{ext}")))
    }

    pub(crate) fn record_pid(&self, pid: u32) {
        self.pids.lock().push(pid);
    }

    /// Spawns and records a process.
    pub(crate) fn spawn(&self, cmd: &mut Command, stem: &str) -> Result<Proc> {
        let proc = Proc::spawn(cmd, stem, Some(&self.log_path(stem)))?;
        self.record_pid(proc.pid());
        Ok(proc)
    }
}

// === impl Node ===

impl Node {
    /// The node's name, e.g. `node-a`.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The node's 0-based index in the cluster.
    pub fn index(&self) -> u8 {
        self.inner.index
    }

    /// The node's address on the cluster bridge, `10.S.0.(i+1)`.
    pub fn ip(&self) -> Ipv4Addr {
        self.inner.ip
    }

    /// The node's IPv6 address on the cluster bridge, in a cluster with IPv6 pods.
    pub fn ip6(&self) -> Option<Ipv6Addr> {
        self.inner.ip6
    }

    /// The node's IPv6 pod prefix, e.g. `fd00:7b:1::/64`, in a cluster with IPv6 pods.
    pub fn pod_cidr6(&self) -> Option<String> {
        self.inner
            .ip6
            .map(|_| pod_prefix6(self.inner.cluster.slot, self.inner.index))
    }

    /// The node's pod CIDR, `10.S.(i+1).0/24`.
    pub fn pod_cidr(&self) -> String {
        format!(
            "10.{}.{}.0/24",
            self.inner.cluster.slot,
            self.inner.index + 1
        )
    }

    /// The node's address on its pod bridge (the pods' gateway).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.inner.cluster.slot, self.inner.index + 1, 1)
    }

    /// The node netns name.
    pub fn netns_name(&self) -> &str {
        &self.inner.netns_name
    }

    /// The node's cgroup subtree (where its ztunnel attaches eBPF programs;
    /// every pod of the node has a directory below it).
    pub fn cgroup_dir(&self) -> &Path {
        &self.inner.cgroup_dir
    }

    /// The node's bpffs pin directory.
    pub fn bpffs_dir(&self) -> &Path {
        &self.inner.bpffs_dir
    }

    /// The cluster state directory (config, CA, logs).
    pub fn cluster_dir(&self) -> &Path {
        &self.inner.cluster.dir
    }

    pub(crate) fn cluster(&self) -> &Arc<ClusterShared> {
        &self.inner.cluster
    }

    /// A command that runs `program` in the node netns (and in the test's
    /// own cgroup, so node processes such as ztunnel are not under the
    /// node's capture hooks).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        netns_command(&self.inner.netns_name, program)
    }

    /// Spawns `cmd` (from [`Node::command`]), capturing its output; killed
    /// when the returned [`Proc`] drops.
    pub fn spawn(&self, cmd: &mut Command) -> Result<Proc> {
        let stem = format!("{}.{}", self.name(), program_stem(cmd));
        self.inner.cluster.spawn(cmd, &stem)
    }

    /// Runs `cmd` (from [`Node::command`]) to completion, bounded by
    /// `timeout`.
    pub fn run(&self, cmd: &mut Command, timeout: Duration) -> Result<Output> {
        process::run(cmd, timeout)
    }

    /// Starts a capture on an interface of the node netns, e.g. `cbr0` (all
    /// traffic of the node's pods) or `eth0`.
    pub fn capture(&self, iface: &str) -> Result<Capture> {
        Capture::start(
            &self.inner.cluster,
            &self.inner.netns_name,
            iface,
            &format!("{}-{iface}", self.name()),
        )
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.inner.name)
            .field("ip", &self.inner.ip)
            .finish()
    }
}

// === impl Pod ===

impl Pod {
    /// The pod name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The pod's namespace.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The pod's service account.
    pub fn service_account(&self) -> &str {
        &self.inner.service_account
    }

    /// The pod's SPIFFE identity under the cluster's current trust domain.
    pub fn identity(&self) -> String {
        let td = self.inner.node.cluster().config.lock().trust_domain.clone();
        format!(
            "spiffe://{td}/ns/{}/sa/{}",
            self.inner.namespace, self.inner.service_account
        )
    }

    /// The pod's IPv4 address.
    ///
    /// # Panics
    /// In an [`IpFamilies::V6Only`] cluster, where pods have none: use
    /// [`Pod::ip6`] or [`Pod::addr`] there.
    pub fn ip(&self) -> Ipv4Addr {
        self.inner.ip.unwrap_or_else(|| {
            panic!(
                "pod {} has no IPv4 address (IPv6-only cluster)",
                self.name()
            )
        })
    }

    /// The pod's ULA IPv6 address, in a dual-stack or IPv6-only cluster.
    ///
    /// # Panics
    /// In an [`IpFamilies::V4`] cluster.
    pub fn ip6(&self) -> Ipv6Addr {
        self.inner
            .ip6
            .unwrap_or_else(|| panic!("pod {} has no IPv6 address (IPv4 cluster)", self.name()))
    }

    /// The pod's primary address: IPv4 if it has one, else IPv6.
    pub fn addr(&self) -> IpAddr {
        match (self.inner.ip, self.inner.ip6) {
            (Some(v4), _) => v4.into(),
            (None, Some(v6)) => v6.into(),
            (None, None) => unreachable!("a pod is created with at least one address"),
        }
    }

    /// The link-local address of the pod's eth0 (every pod has one), and
    /// eth0's interface index inside the pod.
    pub fn link_local(&self) -> Result<(Ipv6Addr, u32)> {
        link_local_of(self.netns_name())
    }

    /// The node the pod runs on.
    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    /// The pod netns name.
    pub fn netns_name(&self) -> &str {
        &self.inner.netns_name
    }

    /// The pod netns path, `/var/run/netns/<name>`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new(netns::NETNS_DIR).join(&self.inner.netns_name)
    }

    /// The pod's cgroup directory.
    pub fn cgroup_dir(&self) -> &Path {
        &self.inner.cgroup_dir
    }

    /// A command that runs `program` as a process of this pod: the child
    /// joins the pod's cgroup and netns before exec.
    ///
    /// # Panics
    /// If the pod's cgroup or netns no longer exist, i.e. the cluster was
    /// torn down while the test still uses the pod; that is a test bug.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let procs = self.inner.cgroup_dir.join("cgroup.procs");
        let cgroup_procs = File::options()
            .write(true)
            .open(&procs)
            .unwrap_or_else(|e| {
                panic!(
                    "pod cgroup {} must exist while its cluster lives: {e}",
                    procs.display()
                )
            });
        let netns = netns::open_netns(&self.netns_path())
            .unwrap_or_else(|e| panic!("pod netns must exist while its cluster lives: {e:#}"));
        let mut cmd = Command::new(program);
        sys::join_before_exec(
            &mut cmd,
            Join {
                cgroup_procs: Some(cgroup_procs.into()),
                netns: Some(netns),
            },
        );
        cmd
    }

    /// Spawns `cmd` (from [`Pod::command`]), capturing its output to a log
    /// file; killed when the returned [`Proc`] drops (and, in any case, when
    /// the cluster tears down the pod's cgroup).
    pub fn spawn(&self, cmd: &mut Command) -> Result<Proc> {
        let stem = format!("{}_{}.{}", self.namespace(), self.name(), program_stem(cmd));
        self.inner.node.cluster().spawn(cmd, &stem)
    }

    /// Runs `cmd` (from [`Pod::command`]) to completion; kills it and fails
    /// after `timeout`. A non-zero exit is not an error: check `status`.
    pub fn run(&self, cmd: &mut Command, timeout: Duration) -> Result<Output> {
        process::run(cmd, timeout)
    }

    /// Runs `cmd` and returns its stdout, failing on a non-zero exit.
    pub fn run_ok(&self, cmd: &mut Command, timeout: Duration) -> Result<String> {
        process::run_ok(cmd, timeout)
    }

    /// A command running `ambit-testapp <args>` in this pod.
    pub fn testapp_command(&self, args: &[&str]) -> Result<Command> {
        let mut cmd = self.command(crate::bin_path("ambit-testapp")?);
        cmd.args(args);
        Ok(cmd)
    }

    /// Spawns `ambit-testapp <args>`. For the servers (`echo`, `http`,
    /// `sink`) this returns once the app has printed "listening on".
    pub fn spawn_testapp(&self, args: &[&str]) -> Result<Proc> {
        let mut cmd = self.testapp_command(args)?;
        let proc = self.spawn(&mut cmd)?;
        if matches!(args.first(), Some(&("echo" | "http" | "sink" | "h2c"))) {
            proc.wait_for_line(APP_READY_TIMEOUT, |l| l.starts_with("listening on"))?;
        }
        Ok(proc)
    }

    /// Runs one of the testapp's client commands (`send`, `fanout`,
    /// `connect`) and parses the JSON it prints last. The exit status is
    /// not checked, since `send` and `fanout` exit 1 on a mismatch but
    /// still report it.
    pub fn run_testapp(&self, args: &[&str], timeout: Duration) -> Result<serde_json::Value> {
        let mut cmd = self.testapp_command(args)?;
        let out = process::run(&mut cmd, timeout)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default();
        serde_json::from_str(last).with_context(|| {
            format!(
                "ambit-testapp {} printed no JSON ({}); stdout: {stdout}; stderr: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Everything Ambit keeps about this pod, as bpftool and ip see it, on
    /// both address families: `pods` map entries for any of its addresses
    /// (link-local included), sk_lookup links on its netns, the capture rules
    /// and table-100 routes of IPv4 and IPv6, and ztunnel's listeners in it.
    /// Empty when the pod is not enrolled.
    pub fn capture_state(&self) -> Result<Vec<String>> {
        let mut found = Vec::new();
        let mut addrs: Vec<IpAddr> = self
            .inner
            .ip
            .map(IpAddr::from)
            .into_iter()
            .chain(self.inner.ip6.map(IpAddr::from))
            .collect();
        addrs.push(self.link_local()?.0.into());
        let pods_map = self.inner.node.bpffs_dir().join("maps/pods");
        if pods_map.exists() {
            let dump = process::run_ok(
                Command::new("bpftool")
                    .args(["-j", "map", "dump", "pinned"])
                    .arg(&pods_map),
                CAPTURE_STATE_TIMEOUT,
            )?;
            let entries: serde_json::Value = serde_json::from_str(&dump)?;
            for e in entries.as_array().into_iter().flatten() {
                let key: Vec<u8> = e["key"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|b| {
                        b.as_str()
                            .and_then(|s| u8::from_str_radix(s.trim_start_matches("0x"), 16).ok())
                    })
                    .collect();
                let Ok(octets) = <[u8; 16]>::try_from(key.as_slice()) else {
                    continue;
                };
                if addrs.contains(&Ipv6Addr::from(octets).to_canonical()) {
                    found.push(format!("pods map entry {e}"));
                }
            }
        }
        let inode = std::os::unix::fs::MetadataExt::ino(
            &std::fs::metadata(self.netns_path()).context("pod netns inode")?,
        );
        let links = process::run_ok(
            Command::new("bpftool").args(["-j", "link", "show"]),
            CAPTURE_STATE_TIMEOUT,
        )?;
        let links: serde_json::Value = serde_json::from_str(&links)?;
        for l in links.as_array().into_iter().flatten() {
            if l["netns_ino"].as_u64() == Some(inode) {
                found.push(format!("link {l}"));
            }
        }
        for family in ["-4", "-6"] {
            let rules = self.run_ok(
                self.command("ip").args([family, "rule", "show"]),
                CAPTURE_STATE_TIMEOUT,
            )?;
            if rules.contains("0x1000") {
                found.push(format!("ip {family} rule: {rules}"));
            }
            let out = self.run(
                self.command("ip")
                    .args([family, "route", "show", "table", "100"]),
                CAPTURE_STATE_TIMEOUT,
            )?;
            let routes = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            // A table that was never created is as empty as one that was emptied.
            if !out.status.success() && !stderr.contains("FIB table does not exist") {
                anyhow::bail!(
                    "ip {family} route show table 100 in pod {}: {stderr}",
                    self.name()
                );
            }
            if !routes.trim().is_empty() {
                found.push(format!("ip {family} table 100: {routes}"));
            }
        }
        let ports = netns::run_in_netns(&self.netns_path(), netns::listen_ports_here)??;
        for port in [15001, 15006, 15008, 15053] {
            if ports.contains(&port) {
                found.push(format!("listener on {port}"));
            }
        }
        Ok(found)
    }

    /// Waits until something in the pod listens on TCP `port`.
    pub fn wait_listening(&self, port: u16, timeout: Duration) -> Result<()> {
        let path = self.netns_path();
        crate::wait_until(timeout, || {
            netns::run_in_netns(&path, netns::listen_ports_here)
                .ok()
                .and_then(|r| r.ok())
                .is_some_and(|ports| ports.contains(&port))
        })
        .with_context(|| format!("nothing listens on port {port} in pod {}", self.name()))
    }
}

impl std::fmt::Debug for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pod")
            .field("name", &self.inner.name)
            .field("namespace", &self.inner.namespace)
            .field("ip", &self.inner.ip)
            .field("ip6", &self.inner.ip6)
            .field("node", &self.inner.node.name())
            .finish()
    }
}

// === impl PodSpec ===

impl PodSpec {
    /// A pod named `name` in namespace `default`, service account
    /// `default`, without labels.
    pub fn new(name: impl Into<String>) -> PodSpec {
        PodSpec {
            name: name.into(),
            namespace: "default".into(),
            service_account: "default".into(),
            labels: Labels::new(),
        }
    }

    /// Sets the namespace (default `default`).
    pub fn namespace(mut self, ns: impl Into<String>) -> PodSpec {
        self.namespace = ns.into();
        self
    }

    /// Sets the service account (default `default`).
    pub fn service_account(mut self, sa: impl Into<String>) -> PodSpec {
        self.service_account = sa.into();
        self
    }

    /// Adds a label.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> PodSpec {
        self.labels.insert(key.into(), value.into());
        self
    }
}

// === impl Footprint ===

impl Footprint {
    /// Looks for anything of this cluster still on the system: namespaces
    /// named after its id, mounts under its directory, its cgroup directory
    /// (checked through a temporary private cgroup2 mount), live processes
    /// it started, and the state directory. Empty means clean.
    pub fn leftovers(&self) -> Result<Vec<String>> {
        let mut found = Vec::new();
        let prefix = format!("{}-", self.id);
        for name in netns::list() {
            if name.starts_with(&prefix) || self.netns.contains(&name) {
                found.push(format!("netns {name}"));
            }
        }
        for m in cgroup::mounts_under(&self.dir) {
            found.push(format!("mount {}", m.display()));
        }
        for &pid in &self.pids {
            if process_running(pid as i32) {
                found.push(format!("process {pid}"));
            }
        }
        if self.dir.exists() {
            found.push(format!("state dir {}", self.dir.display()));
        }
        // A probe mount of its own: the cluster's mount is gone, and the
        // host's cgroup2 may be anywhere (or nowhere).
        let probe_dir = Path::new(crate::STATE_ROOT).join(next_id());
        let probe = Mount::new("cgroup2", &probe_dir.join("cgroup"))?;
        if probe.target().join(&self.cgroup).exists() {
            found.push(format!("cgroup {}", self.cgroup.display()));
        }
        probe.unmount()?;
        std::fs::remove_dir_all(&probe_dir)
            .with_context(|| format!("removing {}", probe_dir.display()))?;
        Ok(found)
    }
}

// === impl SlotLock ===

impl SlotLock {
    /// Takes the first free slot, starting at a PID-dependent offset so
    /// parallel processes rarely contend for the same lock file.
    fn acquire() -> Result<SlotLock> {
        let dir = Path::new(crate::STATE_ROOT).join("slots");
        let n = SLOTS.clone().count();
        let start =
            (std::process::id() as usize * 7 + NEXT_ID.load(Ordering::Relaxed) as usize) % n;
        for i in 0..n {
            let slot = *SLOTS.start() + ((start + i) % n) as u8;
            let path = dir.join(format!("{slot}.lock"));
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                return Ok(SlotLock { slot, _lock: lock });
            }
        }
        bail!("all {n} subnet slots in {} are taken", dir.display())
    }
}

/// A command that joins the netns `name` before exec.
fn netns_command(name: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let path = Path::new(netns::NETNS_DIR).join(name);
    let fd = netns::open_netns(&path)
        .unwrap_or_else(|e| panic!("netns must exist while its cluster lives: {e:#}"));
    let mut cmd = Command::new(program);
    sys::join_before_exec(
        &mut cmd,
        Join {
            cgroup_procs: None,
            netns: Some(fd),
        },
    );
    cmd
}

/// Recomputes every node's routes to every other node's pod CIDR.
/// `replace` makes this idempotent, so it can run after each added node.
fn route_nodes(nodes: &[Node]) -> Result<()> {
    for n in nodes {
        let routes: Vec<String> = nodes
            .iter()
            .filter(|o| o.name() != n.name())
            .flat_map(|o| {
                let v4 = format!("route replace {} via {}", o.pod_cidr(), o.ip());
                let v6 = o.ip6().map(|ip6| {
                    format!(
                        "route replace {} via {ip6}",
                        o.pod_cidr6().unwrap_or_default()
                    )
                });
                std::iter::once(v4).chain(v6)
            })
            .collect();
        if !routes.is_empty() {
            netns::ip_batch(n.netns_name(), &routes)?;
        }
    }
    Ok(())
}

/// SIGKILLs every process left in the given namespaces (leaked node
/// processes, captures) and waits until they are gone.
fn kill_in_netns(paths: &[PathBuf]) -> Result<()> {
    let remaining = || {
        paths
            .iter()
            .flat_map(|p| netns::pids_in(p))
            .collect::<Vec<_>>()
    };
    for pid in remaining() {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    crate::wait_until(TEARDOWN_TIMEOUT, || remaining().is_empty())
        .with_context(|| format!("processes still in cluster namespaces: {:?}", remaining()))
}

fn next_id() -> String {
    format!(
        "amb{}-{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// The PID embedded in a harness name (`amb<pid>-…` or `ambit-amb<pid>-…`).
fn owner_pid(name: &str) -> Option<i32> {
    let rest = name
        .strip_prefix("ambit-")
        .unwrap_or(name)
        .strip_prefix("amb")?;
    let (pid, tail) = rest.split_once('-')?;
    let counter = tail.split('-').next()?;
    counter.parse::<u32>().ok()?;
    pid.parse().ok()
}

fn is_stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// True if `pid` exists and is not a zombie.
fn process_running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().chars().next())
        })
        .flatten()
        .is_some_and(|state| state != 'Z')
}

/// Removes namespaces, mounts and state directories left by dead test
/// processes. Errors are ignored: another process may be sweeping the same
/// leftovers concurrently.
fn sweep_stale_without_cgroup() {
    for name in netns::list().into_iter().filter(|n| is_stale(n)) {
        let path = Path::new(netns::NETNS_DIR).join(&name);
        // Processes in a harness namespace were started by the harness;
        // killing them lets the kernel free the namespace.
        for pid in netns::pids_in(&path) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = netns::delete(&name);
    }
    let root = Path::new(crate::STATE_ROOT);
    let mut mounts = cgroup::mounts_under(root);
    // Deepest first, so nested mounts go before their parents.
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in mounts {
        let Ok(rel) = m.strip_prefix(root) else {
            continue;
        };
        let Some(first) = rel.components().next() else {
            continue;
        };
        if is_stale(&first.as_os_str().to_string_lossy()) {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if is_stale(&name) && cgroup::mounts_under(&e.path()).is_empty() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Removes cgroup directories (`ambit-amb<pid>-<n>`) of dead test
/// processes, killing what is left in them.
fn sweep_stale_cgroups(mount: &Path) {
    let Ok(entries) = std::fs::read_dir(mount) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("ambit-amb") && is_stale(&name) {
            let _ = cgroup::remove_tree(&e.path(), Duration::from_secs(5));
        }
    }
}

fn validate_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        bail!(
            "{kind} name {name:?} must be a DNS label (lowercase letters, digits, '-'; at most 63)"
        );
    }
    Ok(())
}

fn program_stem(cmd: &Command) -> String {
    Path::new(cmd.get_program())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Node `index`'s IPv6 address on the cluster bridge: `fd00:S::(index+1)`.
fn node_ip6(slot: u8, index: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, slot.into(), 0, 0, 0, 0, 0, u16::from(index) + 1)
}

/// The IPv6 pod prefix of node `index`: `fd00:S:(index+1)::/64`.
fn pod_prefix6(slot: u8, index: u8) -> String {
    format!("fd00:{slot:x}:{:x}::/64", u16::from(index) + 1)
}

/// Node `index`'s address on its pod bridge, the pods' IPv6 gateway.
fn pod_gateway6(slot: u8, index: u8) -> Ipv6Addr {
    pod_ip6(slot, index, 1)
}

/// The `host`-th IPv6 address of node `index`'s pod prefix.
fn pod_ip6(slot: u8, index: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd00,
        slot.into(),
        u16::from(index) + 1,
        0,
        0,
        0,
        0,
        host.into(),
    )
}

/// Turns off IPv6 duplicate address detection in a new namespace, before
/// any interface exists: every address, link-local included, is usable the
/// moment its link is up instead of about a second later.
fn no_dad(netns_name: &str) -> Result<()> {
    for conf in ["all", "default"] {
        for key in ["accept_dad", "dad_transmits"] {
            netns::sysctl(netns_name, &format!("net/ipv6/conf/{conf}/{key}"), "0")?;
        }
    }
    Ok(())
}

/// The link-local IPv6 address of `eth0` in a namespace, and eth0's index.
fn link_local_of(netns_name: &str) -> Result<(Ipv6Addr, u32)> {
    let out = netns::ip_output(&[
        "-n", netns_name, "-j", "-6", "addr", "show", "dev", "eth0", "scope", "link",
    ])?;
    let json: serde_json::Value = serde_json::from_str(&out)
        .with_context(|| format!("`ip -j addr` in {netns_name} printed no JSON: {out}"))?;
    let iface = json
        .as_array()
        .and_then(|a| a.first())
        .with_context(|| format!("no eth0 in {netns_name}: {out}"))?;
    let index = iface["ifindex"]
        .as_u64()
        .and_then(|i| u32::try_from(i).ok())
        .with_context(|| format!("no ifindex for eth0 in {netns_name}: {out}"))?;
    let addr = iface["addr_info"]
        .as_array()
        .and_then(|a| a.iter().find_map(|a| a["local"].as_str()))
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("no link-local address on eth0 in {netns_name}: {out}"))?;
    Ok((addr, index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_owner_pid() {
        assert_eq!(owner_pid("amb123-0-c"), Some(123));
        assert_eq!(owner_pid("amb123-4-p-shop_web-1"), Some(123));
        assert_eq!(owner_pid("ambit-amb77-2"), Some(77));
        assert_eq!(owner_pid("amb77-2"), Some(77));
        assert_eq!(owner_pid("slots"), None);
        assert_eq!(owner_pid("ambient-1-x"), None);
        assert_eq!(owner_pid("amb12x-1"), None);
    }

    #[test]
    fn validates_names() {
        assert!(validate_name("pod", "web-1").is_ok());
        assert!(validate_name("pod", "Web").is_err());
        assert!(validate_name("pod", "a_b").is_err());
        assert!(validate_name("pod", "-a").is_err());
        assert!(validate_name("pod", "").is_err());
    }
}
