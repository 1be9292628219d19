//! `ambit-demo`: Ambit on a simulated two-node cluster, explained as it runs.
//!
//! `demo.sh` builds the workspace and runs this binary as root. It builds a
//! cluster out of network namespaces with the test harness, starts the real
//! `ztunnel` on both nodes, sends real traffic between pods and shows what
//! the mesh did: the identities each side proved, what crossed the wire
//! between the nodes, the access logs, and what happens when ztunnel dies.
//!
//! Topology:
//!
//! ```text
//!   node-a: shop/frontend, shop/cart          shop   is ambient (enrolled)
//!   node-b: shop/payments, legacy/inventory   legacy is not
//!   step 7 adds store/waypoint (node-a) and store/reviews-v1, -v2 (node-b);
//!   store is ambient and uses the waypoint
//! ```
//!
//! cart, payments and inventory serve HTTP on 8080 (`ambit-testapp http`);
//! payments also runs a byte sink on 9000. Every check is printed where it
//! happens and again in a summary; the exit status is 0 only if all passed,
//! 1 otherwise, and 128 + signal when interrupted. The cluster is removed on
//! every path: normal exit, failed checks, errors, panics and Ctrl-C (see
//! `demo_signal.rs`).

#[path = "demo_signal.rs"]
mod signals;
#[path = "demo_ui.rs"]
mod ui;
#[path = "demo_waypoint.rs"]
mod waypoint_step;
#[path = "demo_wire.rs"]
mod wire;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::panic::AssertUnwindSafe;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use harness::ztunnel::{field, field_str, message};
use harness::{Cluster, IpFamilies, Node, Pod, PodSpec, Proc, Ztunnel, ZtunnelOpts};
use serde_json::Value;
use ui::{Report, Ui, bytes, elapsed};
use wire::{BridgeCapture, Wire, tls_name, tls_versions};

const TRUST_DOMAIN: &str = "cluster.local";
/// Written by frontend's app into the payload; must never be seen on the wire.
const MARKER: &str = "TOP-SECRET-ORDER-4711";
/// Size of the cross-node transfer.
const PAYLOAD: u64 = 8 << 20;
/// `ambit-testapp send` starts every block of this size with the marker.
const SEND_BLOCK: u64 = 64 << 10;
const HTTP_PORT: u16 = 8080;
const SINK_PORT: u16 = 9000;
const HBONE_PORT: u16 = 15008;
/// How long ztunnel may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound for single requests and log lines.
const SHORT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    // First: from here on Ctrl-C stops the demo and removes the cluster
    // instead of killing the process with the cluster still up.
    if let Err(e) = signals::install() {
        eprintln!("ambit-demo: {e:#}");
        return ExitCode::from(1);
    }
    if let Err(why) = harness::require_privileges() {
        eprintln!(
            "ambit-demo: cannot build the simulated cluster: {}",
            why.reason
        );
        eprintln!(
            "ambit-demo: run ./demo.sh as root (or as a user with sudo) on Linux with cgroup v2 and BPF"
        );
        return ExitCode::from(1);
    }
    if let Err(e) = preflight() {
        if signals::stopped() {
            return ExitCode::from(signals::exit_code());
        }
        eprintln!("ambit-demo: {e:#}");
        eprintln!("ambit-demo: ./demo.sh installs the tools and builds the binaries first");
        return ExitCode::from(1);
    }
    if signals::stopped() {
        return ExitCode::from(signals::exit_code());
    }
    let ui = Ui::detect();
    // A panic unwinds through the demo, whose drops tear the cluster down;
    // it must still end in a failing exit status, not an abort.
    match std::panic::catch_unwind(AssertUnwindSafe(|| demo(ui))) {
        Ok(code) => code,
        Err(_) if signals::stopped() => ExitCode::from(signals::exit_code()),
        Err(_) => {
            eprintln!("ambit-demo: the demo crashed (see above); the cluster was torn down");
            ExitCode::from(1)
        }
    }
}

/// The tools and binaries the demo runs.
fn preflight() -> Result<()> {
    for tool in ["curl", "tcpdump", "tshark", "ip"] {
        let runs = Command::new(tool)
            .arg(if tool == "ip" { "-V" } else { "--version" })
            .output()
            .is_ok_and(|o| o.status.success());
        ensure!(runs, "`{tool}` is not installed (or does not run)");
    }
    for bin in ["ztunnel", "ambit-testapp"] {
        harness::bin_path(bin)?;
    }
    Ok(())
}

/// Runs the whole demo and removes the cluster; returns the exit status.
fn demo(ui: Ui) -> ExitCode {
    ui.line(ui.bold("Ambit demo: an ambient-mode service mesh on a simulated two-node cluster"));
    ui.line(ui.dim(
        "Real ztunnel processes, real eBPF capture, real TLS, real clients (curl and a small\n\
         test app), all inside network namespaces, cgroups and mounts made for this demo and\n\
         removed when it exits, also on Ctrl-C.",
    ));
    let mut report = Report::new(ui);
    let cluster = match Cluster::with_families(IpFamilies::DualStack) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ambit-demo: creating the simulated cluster failed: {e:#}");
            return ExitCode::from(1);
        }
    };
    signals::watch_cluster(cluster.id());
    run_steps(ui, &cluster, &mut report);
    let interrupted = signals::stopped();
    if !interrupted {
        report.print_summary();
    }

    ui.gap();
    ui.line(format!(
        "  Removing the simulated cluster {}…",
        ui.dim(&format!("({})", cluster.id()))
    ));
    let footprint = cluster.footprint();
    // With AMBIT_KEEP_STATE the harness keeps logs and captures on purpose.
    let kept_state = std::env::var_os(harness::cluster::KEEP_STATE_ENV).is_some();
    let t = Instant::now();
    let teardown = cluster.shutdown();
    let clean = match (teardown, footprint.leftovers()) {
        (Ok(()), Ok(left))
            if left
                .iter()
                .all(|l| kept_state && l.starts_with("state dir")) =>
        {
            let dir = if kept_state {
                format!(
                    "(kept {} for {})",
                    footprint.dir.display(),
                    harness::cluster::KEEP_STATE_ENV
                )
            } else {
                format!("and {}", footprint.dir.display())
            };
            ui.line(format!(
                "  {} removed {} network namespaces, {} mounts, {} processes {dir} in {}: nothing left behind",
                ui.green("✓"),
                footprint.netns.len(),
                footprint.mounts.len(),
                footprint.pids.len(),
                elapsed(t.elapsed())
            ));
            true
        }
        (Ok(()), Ok(left)) => {
            ui.line(format!(
                "  {} left behind: {}",
                ui.red("✗"),
                left.join(", ")
            ));
            false
        }
        (Err(e), _) | (_, Err(e)) => {
            ui.line(format!("  {} tear-down: {e:#}", ui.red("✗")));
            false
        }
    };
    if interrupted {
        ui.line(ui.yellow("  Interrupted: the demo did not finish."));
        return ExitCode::from(signals::exit_code());
    }
    if report.all_passed() && clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The steps. A failed check is recorded and the demo goes on; an error in a
/// step skips the rest of that step. Without a running mesh nothing else
/// can be shown, so a failed start ends the demo.
fn run_steps(ui: Ui, cluster: &Cluster, report: &mut Report) {
    let mesh = match start(ui, cluster, report) {
        Ok(m) => m,
        Err(e) => {
            if !signals::stopped() {
                report.check("the cluster and ztunnel started", Err(format!("{e:#}")));
            }
            return;
        }
    };
    let mut demo = Demo {
        ui,
        cluster,
        m: mesh,
        report,
    };
    type Step<'a, 'c> = fn(&mut Demo<'a, 'c>) -> Result<()>;
    let steps: [(&str, Step); 6] = [
        ("same-node traffic", Demo::same_node),
        ("cross-node traffic", Demo::across_nodes),
        ("IPv6 traffic", Demo::ipv6),
        ("traffic outside the mesh", Demo::outside_mesh),
        ("fail-closed capture", Demo::fail_closed),
        ("L7 with a waypoint", Demo::waypoint),
    ];
    for (what, step) in steps {
        if signals::stopped() {
            return;
        }
        if let Err(e) = step(&mut demo) {
            if signals::stopped() {
                return;
            }
            demo.report.check(
                format!("{what}: step did not complete"),
                Err(format!("{e:#}")),
            );
        }
    }
}

/// Fails once a signal asked the demo to stop.
fn checkpoint() -> Result<()> {
    if signals::stopped() {
        bail!("interrupted");
    }
    Ok(())
}

/// Everything running in the cluster. Dropped (processes killed) before the
/// cluster itself is removed.
struct Mesh {
    /// Processes started by later steps (the waypoint and its backends).
    extra: Vec<Proc>,
    cart_app: Proc,
    payments_app: Proc,
    inventory_app: Proc,
    _sink: Proc,
    zt_a: Ztunnel,
    zt_b: Ztunnel,
    frontend: Pod,
    cart: Pod,
    payments: Pod,
    inventory: Pod,
}

struct Demo<'a, 'c> {
    ui: Ui,
    cluster: &'c Cluster,
    m: Mesh,
    report: &'a mut Report,
}

// === Step 1 ===

/// Builds the topology, starts the apps and ztunnel, and shows enrollment.
fn start(ui: Ui, cluster: &Cluster, report: &mut Report) -> Result<Mesh> {
    ui.heading("1. Start: two nodes, four pods, ztunnel on each node");
    let a = cluster.add_node("node-a")?;
    let b = cluster.add_node("node-b")?;
    let pod = |node: &Node, ns: &str, name: &str| {
        cluster.add_pod(node, PodSpec::new(name).namespace(ns).service_account(name))
    };
    let frontend = pod(&a, "shop", "frontend")?;
    let cart = pod(&a, "shop", "cart")?;
    let payments = pod(&b, "shop", "payments")?;
    let inventory = pod(&b, "legacy", "inventory")?;
    cluster.enroll_namespace("shop")?;
    cluster.add_namespace("legacy", Default::default())?;
    cluster.init_ca(TRUST_DOMAIN)?;
    cluster.write_config()?;
    checkpoint()?;

    for node in [&a, &b] {
        ui.out(format!(
            "{}  {:<13} pod network {}",
            ui.bold(node.name()),
            node.ip().to_string(),
            node.pod_cidr()
        ));
    }
    ui.gap();
    ui.out(ui.dim(&format!(
        "{:<18} {:<13} {:<8} {}",
        "POD", "IP", "NODE", "IDENTITY"
    )));
    for p in [&frontend, &cart, &payments, &inventory] {
        let identity = if p.namespace() == "shop" {
            ui.cyan(&p.identity())
        } else {
            ui.dim("none: namespace legacy is not in the mesh")
        };
        ui.out(format!(
            "{:<18} {:<13} {:<8} {identity}",
            format!("{}/{}", p.namespace(), p.name()),
            p.ip().to_string(),
            p.node().name(),
        ));
    }
    ui.explain(
        "namespace shop is labelled ambit.dev/dataplane-mode=ambient, so its pods join the mesh; \
         legacy is not",
    );

    ui.out(ui.dim(
        "every pod is dual-stack: it also has an IPv6 address (step 4 uses them), \
         and a link-local one on eth0",
    ));
    let http = |p: &Pod| p.spawn_testapp(&["http", "--listen", "[::]:8080", "--name", p.name()]);
    let cart_app = http(&cart)?;
    let payments_app = http(&payments)?;
    let inventory_app = http(&inventory)?;
    let sink = payments.spawn_testapp(&["sink", "--listen", "0.0.0.0:9000"])?;
    ui.explain(
        "apps started: HTTP servers on :8080 in cart, payments and inventory, a byte sink on \
         payments:9000; none of them knows about the mesh",
    );
    checkpoint()?;

    ui.gap();
    ui.sub("Starting ztunnel on node-a and node-b");
    let t = Instant::now();
    let opts = ZtunnelOpts::default();
    let zt_a = a.start_ztunnel(&opts)?;
    let zt_b = b.start_ztunnel(&opts)?;
    zt_a.wait_ready(READY_TIMEOUT)?;
    zt_b.wait_ready(READY_TIMEOUT)?;
    ui.out(format!(
        "both ready in {} (pids {} and {})",
        elapsed(t.elapsed()),
        zt_a.pid().unwrap_or_default(),
        zt_b.pid().unwrap_or_default()
    ));
    let mut enrolled = Ok(());
    for (zt, pods) in [(&zt_a, vec![&frontend, &cart]), (&zt_b, vec![&payments])] {
        for p in pods {
            match enrolled_record(zt, p) {
                Ok(rec) => {
                    let identity = field_str(&rec, "identity");
                    ui.out(format!(
                        "{}  pod enrolled  {:<14} as {}",
                        zt.node().name(),
                        field_str(&rec, "pod"),
                        ui.cyan(identity)
                    ));
                    if identity != p.identity() && enrolled.is_ok() {
                        enrolled = Err(format!(
                            "{} enrolled as {identity}, expected {}",
                            p.name(),
                            p.identity()
                        ));
                    }
                }
                Err(e) => enrolled = Err(format!("{e:#}")),
            }
        }
    }
    ui.explain(
        "each ztunnel opened listeners inside its enrolled pods and attached eBPF capture; \
         the pods were not restarted and have no sidecar",
    );
    report.check(
        "ztunnel ready on both nodes; frontend, cart and payments enrolled, each with its own SPIFFE identity",
        enrolled,
    );
    let inventory_enrolled = zt_b
        .logs()
        .iter()
        .any(|v| message(v) == Some("pod enrolled") && field_str(v, "pod") == "legacy/inventory");
    report.expect(
        "legacy/inventory left out of the mesh (its namespace is not ambient)",
        !inventory_enrolled,
        || "ztunnel on node-b enrolled legacy/inventory".into(),
    );
    Ok(Mesh {
        extra: Vec::new(),
        cart_app,
        payments_app,
        inventory_app,
        _sink: sink,
        zt_a,
        zt_b,
        frontend,
        cart,
        payments,
        inventory,
    })
}

/// The `netns_inode` of a "pod enrolled" record.
fn netns_inode(record: &Value) -> Option<u64> {
    field(record, "netns_inode").and_then(Value::as_u64)
}

/// ztunnel's "pod enrolled" record for `pod` (current run).
fn enrolled_record(zt: &Ztunnel, pod: &Pod) -> Result<Value> {
    let workload = format!("{}/{}", pod.namespace(), pod.name());
    zt.wait_for_log(SHORT, |v| {
        message(v) == Some("pod enrolled") && field_str(v, "pod") == workload
    })
    .with_context(|| format!("ztunnel on {} did not enroll {workload}", zt.node().name()))
}

impl Demo<'_, '_> {
    // === Step 2 ===

    fn same_node(&mut self) -> Result<()> {
        let ui = self.ui;
        ui.heading("2. Same node: frontend → cart (both on node-a)");
        let (frontend, cart) = (self.m.frontend.clone(), self.m.cart.clone());
        let cursor = self.m.zt_a.log_cursor();
        let reply = self.curl(&frontend, &cart)?;
        ui.out(format!(
            "cart saw the connection coming from {}: ztunnel's delivery address, not frontend's {}",
            ui.bold(&reply.peer),
            frontend.ip()
        ));
        let dst = format!("{}:{HTTP_PORT}", cart.ip());
        let out = access_record(&self.m.zt_a, cursor, "outbound", frontend.ip(), &dst);
        let inb = access_record(&self.m.zt_a, cursor, "inbound", frontend.ip(), &dst);
        self.show_records("access log of ztunnel on node-a", [&out, &inb]);
        ui.explain(
            "curl connected to cart's ordinary IP and port; the kernel handed the connection to \
             ztunnel, which carried it in an HBONE tunnel (HTTP/2 CONNECT over mutual TLS) even \
             though both pods share a node",
        );

        self.report.check(
            "same node: frontend → cart answered 200 \"hello from cart\" through ztunnel",
            if reply.status == 200
                && reply.body == "hello from cart\n"
                && reply.peer.starts_with("127.0.0.6:")
            {
                Ok(())
            } else {
                Err(format!(
                    "got {} {:?}, cart saw peer {}",
                    reply.status, reply.body, reply.peer
                ))
            },
        );
        let identities = out.and_then(|o| {
            let i = inb?;
            expect_record(&o, "HBONE", &frontend.identity(), &cart.identity())?;
            expect_record(&i, "HBONE", &frontend.identity(), &cart.identity())
        });
        self.report.check(
            "same node: HBONE both ways in the access log, frontend and cart identities proven by certificates",
            identities.map_err(|e| format!("{e:#}")),
        );
        Ok(())
    }

    // === Step 3 ===

    fn across_nodes(&mut self) -> Result<()> {
        let ui = self.ui;
        ui.heading("3. Across nodes, on the wire: frontend (node-a) → payments (node-b)");
        let (frontend, payments) = (self.m.frontend.clone(), self.m.payments.clone());
        let (cursor_a, cursor_b) = (self.m.zt_a.log_cursor(), self.m.zt_b.log_cursor());
        ui.line(format!(
            "  {}",
            ui.dim("tcpdump records the bridge between node-a and node-b while frontend talks to payments")
        ));
        let capture = BridgeCapture::start(self.cluster, "3-cross-node")?;
        let reply = self.curl(&frontend, &payments);
        let to = format!("{}:{SINK_PORT}", payments.ip());
        ui.command(
            &format!("ambit-testapp send --to {to} --bytes {PAYLOAD} --marker {MARKER}"),
            "from shop/frontend, to the sink on payments",
        );
        let sent = frontend.run_testapp(
            &[
                "send",
                "--to",
                &to,
                "--bytes",
                &PAYLOAD.to_string(),
                "--marker",
                MARKER,
                "--timeout-secs",
                "20",
            ],
            Duration::from_secs(30),
        );
        let pcap = capture.stop()?;
        checkpoint()?;
        let sent = sent.map_err(|e| format!("{e:#}")).and_then(|v| {
            if v["match"].as_bool() == Some(true) {
                Ok(v)
            } else {
                Err(format!(
                    "transfer failed: sink replied {:?}, error {:?}",
                    v["reply"].as_str().unwrap_or_default(),
                    v["error"].as_str().unwrap_or_default()
                ))
            }
        });
        match &sent {
            Ok(v) => {
                let sha = v["sha256"].as_str().unwrap_or_default();
                ui.out(format!(
                    "the sink received {} with SHA-256 {}…{}, the same as frontend sent ({} ms)",
                    bytes(v["bytes"].as_u64().unwrap_or_default()),
                    sha.get(..8).unwrap_or(sha),
                    sha.get(sha.len().saturating_sub(8)..).unwrap_or_default(),
                    v["elapsed_ms"].as_u64().unwrap_or_default()
                ));
            }
            Err(e) => ui.out(ui.red(e)),
        }

        ui.gap();
        ui.sub("What crossed the link between the nodes (tcpdump on the bridge, read with tshark)");
        let analysis = Wire::read(&pcap).and_then(|w| Ok((w, tls_versions(&pcap, HBONE_PORT)?)));
        match &analysis {
            Ok((wire, tls)) => self.show_cross_node_wire(wire, tls),
            Err(e) => ui.out(ui.red(&format!("could not read the capture: {e:#}"))),
        }

        let dst_http = format!("{}:{HTTP_PORT}", payments.ip());
        let records = [
            access_record(&self.m.zt_a, cursor_a, "outbound", frontend.ip(), &dst_http),
            access_record(&self.m.zt_b, cursor_b, "inbound", frontend.ip(), &dst_http),
            access_record(&self.m.zt_a, cursor_a, "outbound", frontend.ip(), &to),
            access_record(&self.m.zt_b, cursor_b, "inbound", frontend.ip(), &to),
        ];
        self.show_records(
            "access logs (outbound: ztunnel on node-a, inbound: ztunnel on node-b)",
            records.iter(),
        );
        ui.explain(
            "between the nodes there is only mutual TLS 1.3 on port 15008: the payload, the HTTP \
             request and the original port never appear; each ztunnel logged the peer identity \
             it verified",
        );

        self.report.check(
            "across nodes: frontend → payments answered 200 \"hello from payments\"",
            match &reply {
                Ok(r) if r.status == 200 && r.body == "hello from payments\n" => Ok(()),
                Ok(r) => Err(format!("got {} {:?}", r.status, r.body)),
                Err(e) => Err(format!("{e:#}")),
            },
        );
        self.report.check(
            format!(
                "across nodes: {} arrived byte-exact (sink's SHA-256 matches)",
                bytes(PAYLOAD)
            ),
            sent.map(|_| ()),
        );
        match &analysis {
            Ok((wire, tls)) => self.check_cross_node_wire(wire, tls),
            Err(e) => {
                self.report.check(
                    "on the wire: only TLS 1.3 on port 15008, nothing in the clear",
                    Err(format!("could not read the capture: {e:#}")),
                );
            }
        }
        let [out_http, in_http, out_sink, in_sink] = records;
        let logged = (|| -> Result<()> {
            for r in [&out_http, &in_http, &out_sink, &in_sink] {
                let r = r.as_ref().map_err(|e| anyhow!("{e:#}"))?;
                expect_record(r, "HBONE", &frontend.identity(), &payments.identity())?;
            }
            for r in [&out_sink, &in_sink] {
                let r = r.as_ref().map_err(|e| anyhow!("{e:#}"))?;
                let n = field(r, "bytes_sent").and_then(Value::as_u64);
                ensure!(
                    n == Some(PAYLOAD),
                    "{} record counts {n:?} bytes sent",
                    field_str(r, "direction")
                );
            }
            Ok(())
        })();
        self.report.check(
            "across nodes: both ztunnels logged the connections with both identities and the exact byte counts",
            logged.map_err(|e| format!("{e:#}")),
        );
        Ok(())
    }

    /// Prints what the capture of step 3 holds.
    fn show_cross_node_wire(&self, wire: &Wire, tls: &[String]) {
        let ui = self.ui;
        let marker_hits = wire.count(MARKER.as_bytes());
        let body_hits = wire.count(b"hello from payments");
        ui.out(segments_line(wire));
        ui.out(format!("TCP ports seen: {}", ports_text(wire)));
        let tls_text = if tls.is_empty() {
            "no TLS ServerHello captured".to_string()
        } else {
            tls.iter()
                .map(|v| tls_name(v))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
                .join(", ")
        };
        ui.out(format!(
            "TLS handshake: {} {}",
            ui.bold(&tls_text),
            ui.dim(&format!(
                "(ServerHello supported_version {})",
                tls.join(", ")
            ))
        ));
        ui.out(format!(
            "\"{MARKER}\" in the clear: {} {}",
            if marker_hits == 0 {
                ui.green("not found")
            } else {
                ui.red(&format!("found ({})", times(marker_hits)))
            },
            ui.dim(&format!(
                "(the app wrote it {} times, once per 64 KiB block)",
                PAYLOAD / SEND_BLOCK
            ))
        ));
        ui.out(format!(
            "\"hello from payments\" in the clear: {}",
            if body_hits == 0 {
                ui.green("not found")
            } else {
                ui.red(&format!("found ({})", times(body_hits)))
            }
        ));
    }

    /// The checks on the capture of step 3.
    fn check_cross_node_wire(&mut self, wire: &Wire, tls: &[String]) {
        let marker_hits = wire.count(MARKER.as_bytes());
        let body_hits = wire.count(b"hello from payments");
        let non_hbone = wire.pairs_without(HBONE_PORT);
        self.report.expect(
            "on the wire: every TCP segment between the nodes was to or from port 15008 (HBONE)",
            !wire.segments.is_empty() && non_hbone.is_empty(),
            || {
                if wire.segments.is_empty() {
                    "no TCP captured on the bridge".into()
                } else {
                    format!("TCP outside HBONE (src, dst ports): {non_hbone:?}")
                }
            },
        );
        self.report.expect(
            format!("on the wire: \"{MARKER}\" and the HTTP body never in the clear"),
            wire.complete() && marker_hits == 0 && body_hits == 0,
            || {
                if wire.complete() {
                    format!("marker seen {marker_hits} times, body {body_hits} times")
                } else {
                    format!(
                        "the capture is incomplete ({} of {} bytes of TCP payload), so this is not proven",
                        wire.payload_captured, wire.payload_sent
                    )
                }
            },
        );
        self.report.expect(
            "on the wire: the tunnel handshake is TLS 1.3",
            !tls.is_empty() && tls.iter().all(|v| v == "0x0304"),
            || format!("ServerHello versions: {tls:?}"),
        );
    }

    // === Step 4 ===

    /// The same mesh over IPv6: a request to payments' IPv6 address is tunnelled exactly as
    /// over IPv4, and link-local, which cannot be tunnelled, is refused at connect.
    fn ipv6(&mut self) -> Result<()> {
        let ui = self.ui;
        ui.heading("4. IPv6: frontend → payments over IPv6, and link-local refused");
        let (frontend, payments, cart) = (
            self.m.frontend.clone(),
            self.m.payments.clone(),
            self.m.cart.clone(),
        );
        ui.out(format!(
            "frontend's IPv6 address is {}, payments' is {}",
            frontend.ip6(),
            ui.bold(&payments.ip6().to_string())
        ));
        let (cursor_a, cursor_b) = (self.m.zt_a.log_cursor(), self.m.zt_b.log_cursor());
        let capture = BridgeCapture::start(self.cluster, "4-ipv6")?;
        let url = format!("http://[{}]:{HTTP_PORT}/", payments.ip6());
        ui.command(&format!("curl -sS -g {url}"), "from shop/frontend");
        let reply = http_get(&frontend, &url);
        let pcap = capture.stop()?;
        match &reply {
            Ok(r) => ui.out(format!(
                "{} · {}",
                r.status_line,
                ui.bold(r.body.trim_end())
            )),
            Err(e) => ui.out(ui.red(&format!("{e:#}"))),
        }
        let dst = format!("[{}]:{HTTP_PORT}", payments.ip6());
        let out = access_record(&self.m.zt_a, cursor_a, "outbound", frontend.ip6(), &dst);
        let inb = access_record(&self.m.zt_b, cursor_b, "inbound", frontend.ip6(), &dst);
        self.show_records("access logs", [&out, &inb]);
        let wire = Wire::read(&pcap)?;
        self.report.check(
            "IPv6: frontend → payments answered 200 \"hello from payments\" through HBONE, both identities proven",
            reply
                .as_ref()
                .map_err(|e| format!("{e:#}"))
                .and_then(|r| {
                    if r.status == 200 && r.body == "hello from payments\n" {
                        Ok(())
                    } else {
                        Err(format!("got {} {:?}", r.status, r.body))
                    }
                })
                .and_then(|()| {
                    let (o, i) = (out.as_ref().map_err(|e| format!("{e:#}"))?, inb.as_ref().map_err(|e| format!("{e:#}"))?);
                    expect_record(o, "HBONE", &frontend.identity(), &payments.identity())
                        .and_then(|()| expect_record(i, "HBONE", &frontend.identity(), &payments.identity()))
                        .map_err(|e| format!("{e:#}"))
                }),
        );
        let non_hbone = wire.pairs_without(HBONE_PORT);
        self.report.expect(
            "IPv6 on the wire: only port 15008 between the nodes, the body never in the clear",
            !wire.segments.is_empty()
                && non_hbone.is_empty()
                && wire.count(b"hello from payments") == 0,
            || {
                format!(
                    "TCP outside HBONE: {non_hbone:?}; body seen {} times",
                    wire.count(b"hello from payments")
                )
            },
        );

        let (cart_ll, _) = cart.link_local()?;
        let (_, eth0) = frontend.link_local()?;
        let to = SocketAddrV6::new(cart_ll, HTTP_PORT, 0, eth0);
        ui.command(
            &format!("ambit-testapp connect --to {to}"),
            "from shop/frontend, to cart's link-local address",
        );
        let refused = frontend.run_testapp(
            &["connect", "--to", &to.to_string(), "--timeout-secs", "3"],
            SHORT,
        );
        let outcome = refused
            .as_ref()
            .map(|v| {
                v["error"]
                    .as_str()
                    .unwrap_or(v["result"].as_str().unwrap_or_default())
                    .to_string()
            })
            .unwrap_or_else(|e| format!("{e:#}"));
        ui.out(format!("connect(): {}", ui.bold(&outcome)));
        ui.explain(
            "link-local addresses cannot be carried in a tunnel and are in no config, so the \
             capture programs refuse them at connect(): nothing leaves the pod",
        );
        self.report.expect(
            "IPv6: a link-local connection from an enrolled pod is refused at connect()",
            outcome.contains("Operation not permitted"),
            || format!("got {outcome}"),
        );
        Ok(())
    }

    // === Step 5 ===

    fn outside_mesh(&mut self) -> Result<()> {
        let ui = self.ui;
        ui.heading("5. Outside the mesh: legacy/inventory is not enrolled");
        let (frontend, cart, inventory) = (
            self.m.frontend.clone(),
            self.m.cart.clone(),
            self.m.inventory.clone(),
        );
        let cursor_a = self.m.zt_a.log_cursor();
        let capture = BridgeCapture::start(self.cluster, "4-outside-mesh")?;

        ui.sub("frontend → inventory: a mesh pod calls a pod outside the mesh");
        let to_inventory = self.curl(&frontend, &inventory);
        if let Ok(r) = &to_inventory {
            ui.out(format!(
                "inventory saw the connection coming from {}: frontend's own address, no tunnel",
                ui.bold(&r.peer)
            ));
        }
        let dst_inv = format!("{}:{HTTP_PORT}", inventory.ip());
        let out = access_record(&self.m.zt_a, cursor_a, "outbound", frontend.ip(), &dst_inv);
        self.show_records("access log of ztunnel on node-a", [&out]);

        ui.gap();
        ui.sub("inventory → cart: a pod outside the mesh calls a mesh pod");
        let to_cart = self.curl(&inventory, &cart);
        if let Ok(r) = &to_cart {
            ui.out(format!(
                "cart saw the connection coming from {}: ztunnel took it on port 15006 and delivered it",
                ui.bold(&r.peer)
            ));
        }
        let dst_cart = format!("{}:{HTTP_PORT}", cart.ip());
        let inb = access_record(&self.m.zt_a, cursor_a, "inbound", inventory.ip(), &dst_cart);
        self.show_records("access log of ztunnel on node-a", [&inb]);

        let pcap = capture.stop()?;
        checkpoint()?;
        ui.gap();
        ui.sub("What crossed the link between the nodes this time");
        let wire = Wire::read(&pcap);
        let visible = match &wire {
            Ok(wire) => {
                let visible = wire.count(b"hello from inventory");
                let requests = wire.count(b"GET / HTTP/1.1");
                ui.out(segments_line(wire));
                ui.out(format!("TCP ports seen: {}", ports_text(wire)));
                ui.out(format!(
                    "\"hello from inventory\" in the clear: {}; HTTP requests readable: {}",
                    if visible > 0 {
                        ui.yellow(&format!("yes ({})", times(visible)))
                    } else {
                        "no".into()
                    },
                    if requests > 0 {
                        ui.yellow(&format!("yes ({requests})"))
                    } else {
                        "no".into()
                    }
                ));
                Ok(visible)
            }
            Err(e) => {
                ui.out(ui.red(&format!("could not read the capture: {e:#}")));
                Err(format!("could not read the capture: {e:#}"))
            }
        };
        ui.explain(
            "that is the contrast with step 3: without the mesh on both ends, traffic is ordinary \
             plaintext TCP that anyone on the link can read; ztunnel lets it through (and logs \
             it) but cannot vouch for a peer that has no identity",
        );

        self.report.check(
            "outside the mesh: frontend → inventory works as plaintext passthrough (protocol TCP, no peer identity)",
            (|| -> Result<()> {
                let r = to_inventory.as_ref().map_err(|e| anyhow!("{e:#}"))?;
                ensure!(
                    r.status == 200 && r.body == "hello from inventory\n",
                    "got {} {:?}",
                    r.status,
                    r.body
                );
                ensure!(
                    r.peer.starts_with(&format!("{}:", frontend.ip())),
                    "inventory saw {}, expected frontend's address",
                    r.peer
                );
                let o = out.as_ref().map_err(|e| anyhow!("{e:#}"))?;
                ensure!(field_str(o, "protocol") == "TCP", "protocol {}", field_str(o, "protocol"));
                ensure!(field_str(o, "dst.identity").is_empty(), "inventory has an identity?");
                Ok(())
            })()
            .map_err(|e| format!("{e:#}")),
        );
        self.report.check(
            "outside the mesh: inventory → cart arrives through ztunnel's port 15006, logged without a source identity",
            (|| -> Result<()> {
                let r = to_cart.as_ref().map_err(|e| anyhow!("{e:#}"))?;
                ensure!(
                    r.status == 200 && r.body == "hello from cart\n",
                    "got {} {:?}",
                    r.status,
                    r.body
                );
                ensure!(r.peer.starts_with("127.0.0.6:"), "cart saw {}", r.peer);
                let i = inb.as_ref().map_err(|e| anyhow!("{e:#}"))?;
                ensure!(field_str(i, "protocol") == "TCP", "protocol {}", field_str(i, "protocol"));
                ensure!(
                    field_str(i, "src.identity").is_empty(),
                    "source identity {}",
                    field_str(i, "src.identity")
                );
                ensure!(
                    field_str(i, "dst.identity") == cart.identity(),
                    "destination identity {}",
                    field_str(i, "dst.identity")
                );
                Ok(())
            })()
            .map_err(|e| format!("{e:#}")),
        );
        self.report.expect(
            "on the wire: traffic outside the mesh is visible in the clear (the contrast)",
            visible.as_ref().is_ok_and(|&n| n > 0),
            || match visible {
                Ok(_) => "\"hello from inventory\" not found in the capture".into(),
                Err(e) => e,
            },
        );
        Ok(())
    }

    // === Step 6 ===

    fn fail_closed(&mut self) -> Result<()> {
        let ui = self.ui;
        ui.heading("6. Fail closed: kill -9 ztunnel on node-a, then restart it");
        let (frontend, payments, cart) = (
            self.m.frontend.clone(),
            self.m.payments.clone(),
            self.m.cart.clone(),
        );
        let app_pids = [
            self.m.cart_app.pid(),
            self.m.payments_app.pid(),
            self.m.inventory_app.pid(),
        ];
        // The network namespaces ztunnel enrolled, to compare after restart.
        let netns_before: Vec<Option<u64>> = [&frontend, &cart]
            .iter()
            .map(|p| {
                enrolled_record(&self.m.zt_a, p)
                    .ok()
                    .and_then(|r| netns_inode(&r))
            })
            .collect();
        let pid = self.m.zt_a.pid().unwrap_or_default();
        ui.command(&format!("kill -9 {pid}"), "ztunnel on node-a");
        self.m.zt_a.kill9()?;
        ui.explain(
            "its eBPF programs and maps stay pinned in the kernel, so frontend's and cart's \
             connections are still captured, with nobody to carry them",
        );
        // Whatever goes wrong while ztunnel is down, it is restarted below.
        let down = self.while_ztunnel_down(&frontend, [&payments, &cart]);
        if let Err(e) = &down {
            ui.out(ui.red(&format!("{e:#}")));
        }
        checkpoint()?;

        ui.gap();
        ui.command(
            "ztunnel run …",
            "restart on node-a; the pods are left alone",
        );
        let t = Instant::now();
        self.m.zt_a.restart()?;
        self.m.zt_a.wait_ready(READY_TIMEOUT)?;
        let ready_in = t.elapsed();
        ui.out(format!(
            "ready in {} (pid {})",
            elapsed(ready_in),
            self.m.zt_a.pid().unwrap_or_default()
        ));
        let netns_after: Vec<Option<u64>> = [&frontend, &cart]
            .iter()
            .map(|p| {
                enrolled_record(&self.m.zt_a, p)
                    .ok()
                    .and_then(|r| netns_inode(&r))
            })
            .collect();
        let same_pods = netns_before.iter().all(Option::is_some) && netns_before == netns_after;
        if same_pods {
            ui.out(format!(
                "re-enrolled shop/frontend and shop/cart in place: the same network namespaces \
                 as before the crash (inodes {})",
                netns_after
                    .iter()
                    .flatten()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        } else {
            ui.out(ui.red(&format!(
                "enrolled network namespaces before {netns_before:?}, after {netns_after:?}"
            )));
        }
        let cursor = self.m.zt_a.log_cursor();
        let t = Instant::now();
        let resumed = retry(Duration::from_secs(15), || {
            self.curl_quiet(&frontend, &payments)
        });
        let dst = format!("{}:{HTTP_PORT}", payments.ip());
        match &resumed {
            Ok(r) => {
                ui.command(&format!("curl -sS http://{dst}/"), "from shop/frontend");
                ui.out(format!("{} · {}", r.status_line, r.body.trim_end()));
                ui.out(format!(
                    "traffic resumed {} after ztunnel was ready",
                    elapsed(t.elapsed())
                ));
            }
            Err(e) => ui.out(ui.red(&format!("traffic did not resume: {e:#}"))),
        }
        let out = access_record(&self.m.zt_a, cursor, "outbound", frontend.ip(), &dst);
        self.show_records("access log of the restarted ztunnel on node-a", [&out]);
        let apps_alive = [
            &mut self.m.cart_app,
            &mut self.m.payments_app,
            &mut self.m.inventory_app,
        ]
        .into_iter()
        .all(|p| matches!(p.try_wait(), Ok(None)));
        ui.out(format!(
            "the apps in cart, payments and inventory kept running throughout (pids {}, {}, {})",
            app_pids[0], app_pids[1], app_pids[2]
        ));
        ui.explain(
            "with ztunnel gone, new connections fail at once instead of leaving in plaintext; \
             a restarted ztunnel picks up where the old one stopped, without restarting any pod",
        );

        match &down {
            Ok((attempts, wire)) => {
                let failures: Vec<String> = attempts
                    .iter()
                    .filter(|(_, r)| !refused(r))
                    .map(|(name, r)| format!("connection to {name} did not fail: {r}"))
                    .collect();
                self.report.expect(
                    "fail closed: with ztunnel on node-a killed, frontend's new connections fail immediately",
                    failures.is_empty(),
                    || failures.join("; "),
                );
                let leaked = wire.segments_with(HTTP_PORT);
                let request_on_wire = wire.count(b"GET / HTTP/1.0") > 0;
                self.report.expect(
                    "fail closed: nothing left node-a in plaintext meanwhile",
                    leaked == 0 && !request_on_wire,
                    || {
                        format!(
                            "{leaked} segments to or from port {HTTP_PORT}; request bytes on the wire: {request_on_wire}"
                        )
                    },
                );
            }
            Err(e) => {
                self.report.check(
                    "fail closed: new connections fail while ztunnel is down, nothing leaves in plaintext",
                    Err(format!("{e:#}")),
                );
            }
        }
        self.report.check(
            "after restart: traffic flows through HBONE again, no pod restarted",
            (|| -> Result<()> {
                let r = resumed.as_ref().map_err(|e| anyhow!("{e:#}"))?;
                ensure!(
                    r.status == 200 && r.body == "hello from payments\n",
                    "got {} {:?}",
                    r.status,
                    r.body
                );
                let o = out.as_ref().map_err(|e| anyhow!("{e:#}"))?;
                expect_record(o, "HBONE", &frontend.identity(), &payments.identity())?;
                ensure!(apps_alive, "an app process exited");
                ensure!(
                    same_pods,
                    "frontend and cart were not re-enrolled in the same network namespaces: \
                     before {netns_before:?}, after {netns_after:?}"
                );
                Ok(())
            })()
            .map_err(|e| format!("{e:#}")),
        );
        Ok(())
    }

    /// Connection attempts from `from` while its node's ztunnel is down,
    /// under a capture of the link between the nodes.
    fn while_ztunnel_down(
        &self,
        from: &Pod,
        targets: [&Pod; 2],
    ) -> Result<(Vec<(String, Value)>, Wire)> {
        let ui = self.ui;
        let capture = BridgeCapture::start(self.cluster, "5-fail-closed")?;
        let mut attempts = Vec::new();
        for target in targets {
            let to = format!("{}:{HTTP_PORT}", target.ip());
            ui.command(
                &format!("ambit-testapp connect --to {to} --timeout-secs 3 --send 'GET / …'"),
                &format!("from shop/frontend to {}", target.name()),
            );
            let r = from.run_testapp(
                &[
                    "connect",
                    "--to",
                    &to,
                    "--timeout-secs",
                    "3",
                    "--send",
                    "GET / HTTP/1.0\r\n\r\n",
                ],
                SHORT,
            )?;
            let ms = r["elapsed_ms"].as_u64().unwrap_or_default();
            let error = r["error"].as_str().unwrap_or("no error");
            ui.out(if refused(&r) {
                format!("{} after {ms} ms: {error}", ui.green("failed"))
            } else {
                ui.red(&format!(
                    "{} after {ms} ms, received {:?}",
                    r["result"].as_str().unwrap_or_default(),
                    r["received"].as_str().unwrap_or_default()
                ))
            });
            attempts.push((target.name().to_string(), r));
        }
        let pcap = capture.stop()?;
        checkpoint()?;
        let wire = Wire::read(&pcap)?;
        ui.out(format!(
            "TCP segments to or from port {HTTP_PORT} on the link between the nodes meanwhile: {}",
            wire.segments_with(HTTP_PORT)
        ));
        Ok((attempts, wire))
    }

    // === helpers ===

    /// `curl` from `from` to `to:8080`, printed as it runs.
    fn curl(&self, from: &Pod, to: &Pod) -> Result<Reply> {
        let url = format!("http://{}:{HTTP_PORT}/", to.ip());
        self.ui.command(
            &format!("curl -sS {url}"),
            &format!("from {}/{}", from.namespace(), from.name()),
        );
        match http_get(from, &url) {
            Ok(r) => {
                self.ui.out(format!(
                    "{} · {}",
                    r.status_line,
                    self.ui.bold(r.body.trim_end())
                ));
                Ok(r)
            }
            Err(e) => {
                self.ui.out(self.ui.red(&format!("{e:#}")));
                Err(e)
            }
        }
    }

    /// `curl` without printing (for retries).
    fn curl_quiet(&self, from: &Pod, to: &Pod) -> Result<Reply> {
        http_get(from, &format!("http://{}:{HTTP_PORT}/", to.ip()))
    }

    /// Prints access-log records, one readable line each.
    fn show_records<'r>(&self, title: &str, records: impl IntoIterator<Item = &'r Result<Value>>) {
        let ui = self.ui;
        ui.out(ui.dim(&format!("{title}:")));
        for r in records {
            match r {
                Ok(v) => ui.out(format!("  {}", render(&ui, v))),
                Err(e) => ui.out(ui.red(&format!("  {e:#}"))),
            }
        }
    }
}

/// An HTTP answer as curl saw it.
struct Reply {
    status_line: String,
    status: u16,
    body: String,
    /// The `x-peer` header: the client address the app saw.
    peer: String,
}

fn http_get(from: &Pod, url: &str) -> Result<Reply> {
    checkpoint()?;
    let out = from.run(
        from.command("curl")
            .args(["-sS", "-m", "5", "-D", "-", url]),
        SHORT,
    )?;
    ensure!(
        out.status.success(),
        "curl {url} from {} failed: {}",
        from.name(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no HTTP header block in curl's output")?;
    let status_line = head.lines().next().unwrap_or_default().trim().to_string();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    let peer = head
        .lines()
        .find_map(|l| l.strip_prefix("x-peer: "))
        .unwrap_or_default()
        .trim()
        .to_string();
    Ok(Reply {
        status_line,
        status,
        body: body.to_string(),
        peer,
    })
}

/// Retries `f` until it succeeds, `timeout` passes or the demo is stopped.
fn retry<T>(timeout: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let e = match f() {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        checkpoint()?;
        if Instant::now() >= deadline {
            return Err(e.context(format!("still failing after {timeout:?}")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for the access-log record of a connection from `src` to `dst`
/// logged after `cursor`.
fn access_record(
    zt: &Ztunnel,
    cursor: usize,
    direction: &str,
    src: impl Into<IpAddr>,
    dst: &str,
) -> Result<Value> {
    let src: IpAddr = src.into();
    // The port is not known: the address as a socket address prints, up to the port.
    let src_prefix = SocketAddr::new(src, 0)
        .to_string()
        .trim_end_matches('0')
        .to_string();
    zt.wait_for_log_since(cursor, SHORT, |v| {
        v.get("target").and_then(Value::as_str) == Some("access")
            && field_str(v, "direction") == direction
            && field_str(v, "src.addr").starts_with(&src_prefix)
            && field_str(v, "dst.addr") == dst
    })
    .map_err(|e| {
        // The harness error carries ztunnel's last log lines; the first
        // line is enough here.
        let first = format!("{e:#}")
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        anyhow!(
            "no {direction} access-log record for {src} -> {dst} from ztunnel on {}: {first}",
            zt.node().name()
        )
    })
}

/// Checks an access-log record's protocol, identities and error.
fn expect_record(v: &Value, protocol: &str, src_identity: &str, dst_identity: &str) -> Result<()> {
    let what = format!("{} record", field_str(v, "direction"));
    ensure!(
        field_str(v, "protocol") == protocol,
        "{what}: protocol {:?}, expected {protocol}",
        field_str(v, "protocol")
    );
    ensure!(
        field_str(v, "src.identity") == src_identity,
        "{what}: source identity {:?}, expected {src_identity}",
        field_str(v, "src.identity")
    );
    ensure!(
        field_str(v, "dst.identity") == dst_identity,
        "{what}: destination identity {:?}, expected {dst_identity}",
        field_str(v, "dst.identity")
    );
    ensure!(
        field_str(v, "error").is_empty(),
        "{what}: error {}",
        field_str(v, "error")
    );
    Ok(())
}

/// One access-log record as one readable line.
fn render(ui: &Ui, v: &Value) -> String {
    let s = |k: &str| field_str(v, k);
    let n = |k: &str| field(v, k).and_then(Value::as_u64).unwrap_or_default();
    let ip = |addr: &str| addr.rsplit_once(':').map_or(addr, |(ip, _)| ip).to_string();
    let direction = s("direction");
    let identity = |id: &str| match id {
        "" => ui.dim("(no identity)"),
        id => format!("({})", ui.cyan(id)),
    };
    // The source by workload name when ztunnel knows it, else by IP.
    let src = match s("src.workload") {
        "" => format!("{} {}", ip(s("src.addr")), identity(s("src.identity"))),
        w => format!("{w} {}", identity(s("src.identity"))),
    };
    let dst = match s("dst.workload") {
        "" => format!("{} {}", s("dst.addr"), identity(s("dst.identity"))),
        w => format!("{} {w} {}", s("dst.addr"), identity(s("dst.identity"))),
    };
    let via = match (s("protocol"), direction) {
        ("HBONE", _) if !s("dst.hbone_addr").is_empty() => format!("HBONE {}", s("dst.hbone_addr")),
        ("HBONE", _) => format!("HBONE (port {HBONE_PORT})"),
        ("TCP", "outbound") => "TCP (plaintext passthrough)".to_string(),
        ("TCP", _) => "TCP (plaintext, port 15006)".to_string(),
        (p, _) => p.to_string(),
    };
    let error = match s("error") {
        "" => String::new(),
        e => ui.red(&format!(", error: {e}")),
    };
    format!(
        "{direction:<8} {src} -> {dst} via {}, {} sent, {} received, {} ms{error}",
        ui.bold(&via),
        bytes(n("bytes_sent")),
        bytes(n("bytes_recv")),
        n("duration_ms"),
    )
}

/// Connection failures a client sees when capture fails closed.
fn refused(v: &Value) -> bool {
    matches!(
        v["result"].as_str().unwrap_or_default(),
        "refused" | "reset" | "eof" | "timeout" | "unreachable" | "error"
    ) && v["received"].as_str().unwrap_or_default().is_empty()
}

/// "N TCP segments, X of TCP payload", and whether the capture has all of it.
fn segments_line(wire: &Wire) -> String {
    let coverage = if wire.complete() {
        "every byte of every stream captured".to_string()
    } else {
        format!(
            "tcpdump missed {} of the {} that went by",
            bytes(wire.payload_sent - wire.payload_captured),
            bytes(wire.payload_sent)
        )
    };
    format!(
        "{} TCP segments carrying {} of TCP payload ({coverage})",
        wire.segments.len(),
        bytes(wire.payload_captured),
    )
}

/// The server-side ports of a capture, named.
fn ports_text(wire: &Wire) -> String {
    let ports = wire.service_ports();
    if ports.is_empty() {
        return "none".into();
    }
    let named: Vec<String> = ports
        .iter()
        .map(|&p| match p {
            HBONE_PORT => format!("{p} (HBONE)"),
            HTTP_PORT => format!("{p} (plain HTTP)"),
            _ => p.to_string(),
        })
        .collect();
    format!(
        "{}, and the clients' ephemeral ports on the other side",
        named.join(", ")
    )
}

/// "1 time", "3 times".
fn times(n: usize) -> String {
    if n == 1 {
        "1 time".into()
    } else {
        format!("{n} times")
    }
}
