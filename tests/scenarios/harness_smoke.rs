//! Proves the simulated-cluster harness without the mesh: cross-node
//! traffic, bulk transfer, packet capture, process handling, clean-up (also
//! after a panic), and isolation between clusters running at once.

use std::os::unix::fs::MetadataExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use harness::config::{self, labels};
use harness::{Cluster, Footprint, PodSpec, ZtunnelOpts, pcap_contains, tcp_ports_seen};

const T: Duration = Duration::from_secs(30);

/// Asserts nothing of `fp`'s cluster is left, both through
/// [`Footprint::leftovers`] and by reading the system tables directly.
fn assert_clean(fp: &Footprint) -> Result<()> {
    let leftovers = fp.leftovers()?;
    ensure!(
        leftovers.is_empty(),
        "cluster {} left behind: {leftovers:?}",
        fp.id
    );
    let netns: Vec<String> = std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    ensure!(
        !netns.iter().any(|n| n.starts_with(&fp.id)),
        "netns left: {netns:?}"
    );
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    ensure!(
        !mounts.contains(&format!("/{}/", fp.id)),
        "mounts left:\n{mounts}"
    );
    for m in mounts
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
    {
        let root = Path::new(
            m.split_whitespace()
                .nth(1)
                .context("mount line has a target")?,
        );
        ensure!(
            !root.join(&fp.cgroup).exists(),
            "cgroup {} left under {}",
            fp.cgroup.display(),
            root.display()
        );
    }
    for pid in &fp.pids {
        ensure!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} left"
        );
    }
    ensure!(!fp.dir.exists(), "state dir {} left", fp.dir.display());
    Ok(())
}

#[test]
fn two_nodes_http_bulk_capture_and_cleanup() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let cluster = Cluster::new()?;
    let a = cluster.add_node("node-a")?;
    let b = cluster.add_node("node-b")?;
    cluster.add_namespace("shop", labels([(config::DATAPLANE_MODE, config::AMBIENT)]))?;
    let client = cluster.add_pod(
        &a,
        PodSpec::new("client")
            .namespace("shop")
            .service_account("client"),
    )?;
    let web = cluster.add_pod(
        &b,
        PodSpec::new("web-1")
            .namespace("shop")
            .service_account("web")
            .label("app", "web"),
    )?;
    let sink = cluster.add_pod(&b, PodSpec::new("sink").namespace("shop"))?;
    let neighbour = cluster.add_pod(&a, PodSpec::new("neighbour"))?;

    // Addressing follows the documented plan.
    let s = cluster.slot();
    assert_eq!(a.ip().octets(), [10, s, 0, 1]);
    assert_eq!(b.pod_cidr(), format!("10.{s}.2.0/24"));
    assert_eq!(client.ip().octets(), [10, s, 1, 2]);
    assert_eq!(neighbour.ip().octets(), [10, s, 1, 3]);
    assert_eq!(web.ip().octets(), [10, s, 2, 2]);

    // Pod processes run in the pod's cgroup (what the eBPF hooks key on).
    let cg = client.run_ok(client.command("cat").arg("/proc/self/cgroup"), T)?;
    let want = format!("0::/ambit-{}/node-a/shop_client", cluster.id());
    assert!(
        cg.lines().any(|l| l == want),
        "cgroup of a pod process: {cg}"
    );

    // HTTP across nodes; the app sees the client's own address.
    let http = web.spawn_testapp(&["http", "--listen", "0.0.0.0:8080", "--name", "web-1"])?;
    web.wait_listening(8080, T)?;
    let url = format!("http://{}:8080/", web.ip());
    let out = client.run_ok(
        client
            .command("curl")
            .args(["-sS", "-i", "--max-time", "10", &url]),
        T,
    )?;
    assert!(out.ends_with("hello from web-1\n"), "curl output: {out}");
    let peer = out
        .lines()
        .find_map(|l| l.strip_prefix("x-peer: "))
        .context("x-peer header")?
        .trim();
    assert!(
        peer.starts_with(&format!("{}:", client.ip())),
        "x-peer {peer}"
    );

    // Same-node traffic works too.
    let echo = neighbour.spawn_testapp(&["echo", "--listen", "0.0.0.0:7000"])?;
    let to = format!("{}:7000", neighbour.ip());
    let r = client.run_testapp(
        &[
            "connect",
            "--to",
            &to,
            "--send",
            "ping",
            "--timeout-secs",
            "5",
        ],
        T,
    )?;
    assert_eq!(r["result"], "ok", "{r}");
    assert_eq!(r["received"], "ping", "{r}");
    let r = client.run_testapp(
        &[
            "fanout",
            "--to",
            &to,
            "--conns",
            "50",
            "--bytes-per-conn",
            "65536",
            "--timeout-secs",
            "20",
        ],
        T,
    )?;
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(r["ok"], 50, "{r}");
    let r = client.run_testapp(
        &[
            "connect",
            "--to",
            &format!("{}:7001", neighbour.ip()),
            "--timeout-secs",
            "5",
        ],
        T,
    )?;
    assert_eq!(r["result"], "refused", "{r}");

    // 8 MiB across nodes, captured on the cluster bridge: no mesh yet, so
    // the marker is on the wire in the clear.
    let sink_app = sink.spawn_testapp(&["sink", "--listen", "0.0.0.0:9000"])?;
    let capture = cluster.capture_bridge()?;
    let marker = format!("AMBIT-MARKER-{}", cluster.id());
    let to = format!("{}:9000", sink.ip());
    let r = client.run_testapp(
        &[
            "send",
            "--to",
            &to,
            "--bytes",
            "8388608",
            "--seed",
            "42",
            "--marker",
            &marker,
            "--timeout-secs",
            "30",
        ],
        T,
    )?;
    assert_eq!(r["match"], true, "{r}");
    assert_eq!(r["bytes"], 8_388_608, "{r}");
    let pcap = capture.stop()?;
    assert!(
        pcap_contains(&pcap, marker.as_bytes()),
        "marker not in {}",
        pcap.display()
    );
    assert!(!pcap_contains(&pcap, b"AMBIT-MARKER-never-sent"));
    let ports = tcp_ports_seen(&pcap);
    assert!(ports.contains(&9000), "ports seen: {ports:?}");
    // The capture saw only cross-node traffic: the same-node echo is absent.
    assert!(!ports.contains(&7000), "ports seen: {ports:?}");

    // The config reflects the pods and can be rewritten after a change.
    cluster.set_pod_label(&web, "version", Some("v2"))?;
    let path = cluster.write_config()?;
    let written: harness::Config = serde_yaml_ng::from_str(&std::fs::read_to_string(&path)?)?;
    assert_eq!(written.workloads.len(), 4);
    let w = written
        .workloads
        .iter()
        .find(|w| w.name == "web-1")
        .context("web-1 in config")?;
    assert_eq!(w.labels.get("version").map(String::as_str), Some("v2"));
    assert_eq!(w.node, "node-b");
    assert_eq!(web.identity(), "spiffe://cluster.local/ns/shop/sa/web");

    // Everything goes on drop. The apps are still running; the cluster
    // kills them first (through the pod cgroups), and their handles reap
    // them.
    let fp = cluster.footprint();
    assert!(fp.pids.contains(&echo.pid()));
    drop(cluster);
    drop((http, echo, sink_app));
    assert_clean(&fp)
}

#[test]
fn two_clusters_at_once_do_not_overlap() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let build = || -> Result<(Cluster, harness::Pod, harness::Pod)> {
        let c = Cluster::new()?;
        let a = c.add_node("node-a")?;
        let b = c.add_node("node-b")?;
        let client = c.add_pod(&a, PodSpec::new("client"))?;
        let server = c.add_pod(&b, PodSpec::new("server"))?;
        Ok((c, client, server))
    };
    let (one, two) = std::thread::scope(|s| {
        let h1 = s.spawn(build);
        let h2 = s.spawn(build);
        (h1.join(), h2.join())
    });
    let (c1, client1, server1) = one.map_err(|_| anyhow::anyhow!("builder thread panicked"))??;
    let (c2, client2, server2) = two.map_err(|_| anyhow::anyhow!("builder thread panicked"))??;
    assert_ne!(c1.slot(), c2.slot());
    assert_ne!(c1.id(), c2.id());
    // Same node names in both clusters, distinct namespaces and cgroups.
    assert_ne!(client1.netns_name(), client2.netns_name());
    assert_ne!(client1.cgroup_dir(), client2.cgroup_dir());

    let _e1 = server1.spawn_testapp(&["echo", "--listen", "0.0.0.0:7000"])?;
    let _e2 = server2.spawn_testapp(&["echo", "--listen", "0.0.0.0:7000"])?;
    let run = |client: &harness::Pod, server: &harness::Pod| {
        let to = format!("{}:7000", server.ip());
        client.run_testapp(
            &[
                "fanout",
                "--to",
                &to,
                "--conns",
                "100",
                "--bytes-per-conn",
                "32768",
                "--timeout-secs",
                "20",
            ],
            T,
        )
    };
    let (r1, r2) = std::thread::scope(|s| {
        let h1 = s.spawn(|| run(&client1, &server1));
        let h2 = s.spawn(|| run(&client2, &server2));
        (h1.join(), h2.join())
    });
    for r in [r1, r2] {
        let r = r.map_err(|_| anyhow::anyhow!("traffic thread panicked"))??;
        assert_eq!(r["ok"], 100, "{r}");
    }

    // No path between the clusters: cluster 2's pod IP is unroutable from
    // cluster 1 (nodes have no default route), so this fails fast.
    let to = format!("{}:7000", server2.ip());
    let r = client1.run_testapp(&["connect", "--to", &to, "--timeout-secs", "3"], T)?;
    assert_ne!(r["result"], "ok", "{r}");

    let (fp1, fp2) = (c1.footprint(), c2.footprint());
    c1.shutdown()?;
    c2.shutdown()?;
    drop((_e1, _e2));
    assert_clean(&fp1)?;
    assert_clean(&fp2)
}

#[test]
fn cleanup_after_panic() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let footprint = parking_lot::Mutex::new(None);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let cluster = Cluster::new().expect("cluster builds");
        let node = cluster.add_node("node-a").expect("node builds");
        let pod = cluster
            .add_pod(&node, PodSpec::new("p"))
            .expect("pod builds");
        let app = pod
            .spawn_testapp(&["echo", "--listen", "0.0.0.0:7000"])
            .expect("echo starts");
        // Leak the process handle: only the cluster's cgroup kill stops it.
        std::mem::forget(app);
        *footprint.lock() = Some(cluster.footprint());
        panic!("deliberate panic with a live cluster");
    }));
    assert!(result.is_err());
    let fp = footprint
        .lock()
        .take()
        .context("footprint recorded before the panic")?;
    // After a panic the state dir (logs, captures) is kept for debugging;
    // everything else must be gone. The leaked child is a zombie until reaped.
    let leftovers = fp.leftovers()?;
    let dir = format!("state dir {}", fp.dir.display());
    let unexpected: Vec<_> = leftovers
        .iter()
        .filter(|l| **l != dir && !l.starts_with("process "))
        .collect();
    assert!(unexpected.is_empty(), "left after panic: {unexpected:?}");
    for pid in &fp.pids {
        // Reap the leaked child so it does not linger as a zombie.
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(*pid as i32), None);
    }
    std::fs::remove_dir_all(&fp.dir)?;
    assert_clean(&fp)
}

/// Exercises the [`harness::Ztunnel`] handle with a stand-in script, since
/// the point here is the harness, not ztunnel.
#[test]
fn ztunnel_handle_with_stand_in() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let cluster = Cluster::new()?;
    let node = cluster.add_node("node-a")?;
    cluster.add_pod(&node, PodSpec::new("p"))?;
    std::fs::create_dir_all(cluster.ca_dir())?;
    let script = cluster.dir().join("fake-ztunnel.sh");
    std::fs::write(
        &script,
        r#"#!/bin/sh
node=""; config=""
while [ $# -gt 0 ]; do
  case "$1" in --node) node="$2"; shift;; --config) config="$2"; shift;; esac; shift
done
ns=$(readlink /proc/self/ns/net)
echo "not json, on stderr" >&2
printf '{"level":"INFO","fields":{"message":"starting","node":"%s","netns":"%s","log":"%s"},"target":"ztunnel"}\n' "$node" "$ns" "$RUST_LOG"
grep -q "name: p" "$config" && printf '{"level":"INFO","fields":{"message":"config loaded"},"target":"ztunnel"}\n'
printf '{"level":"INFO","fields":{"message":"ztunnel ready"},"target":"ztunnel"}\n'
printf '{"level":"INFO","fields":{"message":"complete","src.addr":"10.0.0.1:1","direction":"outbound"},"target":"access"}\n'
exec sleep 60
"#,
    )?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;

    let opts = ZtunnelOpts::default().binary(&script).rust_log("debug");
    let mut zt = node.start_ztunnel(&opts)?;
    zt.wait_ready(T)?;
    let start = zt.wait_for_log(T, |v| harness::ztunnel::message(v) == Some("starting"))?;
    assert_eq!(
        harness::ztunnel::field(&start, "node").and_then(|v| v.as_str()),
        Some("node-a")
    );
    assert_eq!(
        harness::ztunnel::field(&start, "log").and_then(|v| v.as_str()),
        Some("debug")
    );
    // It ran in the node's netns.
    let ino = std::fs::metadata(format!("/var/run/netns/{}", node.netns_name()))?.ino();
    assert_eq!(
        harness::ztunnel::field(&start, "netns").and_then(|v| v.as_str()),
        Some(&*format!("net:[{ino}]"))
    );
    zt.wait_for_log(T, |v| harness::ztunnel::message(v) == Some("config loaded"))?;
    harness::wait_until(T, || zt.access_logs().len() == 1)?;
    assert_eq!(zt.access_logs()[0]["fields"]["direction"], "outbound");
    // stdout and stderr are read by separate threads: the stderr line may land later.
    harness::wait_until(T, || {
        zt.output().iter().any(|l| l.text == "not json, on stderr")
    })?;

    // A timeout reports the tail of the log.
    let err = zt
        .wait_for_log(Duration::from_millis(200), |_| false)
        .expect_err("nothing matches");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("ztunnel ready") && msg.contains("not json"),
        "{msg}"
    );

    // kill -9, then restart: waits apply to the new run only.
    let old_pid = zt.pid().context("running")?;
    zt.kill9()?;
    assert!(!zt.is_running());
    let cursor = zt.log_cursor();
    zt.restart()?;
    assert_ne!(zt.pid(), Some(old_pid));
    zt.wait_ready(T)?;
    zt.wait_for_log_since(cursor, T, |v| {
        harness::ztunnel::message(v) == Some("ztunnel ready")
    })?;
    harness::wait_until(T, || zt.logs().len() == 4)?;
    assert!(
        std::fs::read_to_string(zt.log_path().context("log file")?)?
            .matches("ztunnel ready")
            .count()
            == 2
    );

    let fp = cluster.footprint();
    drop(zt);
    drop(cluster);
    assert_clean(&fp)
}
