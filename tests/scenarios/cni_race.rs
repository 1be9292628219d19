//! The enrollment race for new pods, closed by the CNI hook (`ztunnel cni`).
//!
//! A pod's sandbox exists (netns, address) before the config lists it: that is the window in
//! which a new pod's first connections could leave uncaptured. Each test runs the real
//! `ztunnel cni` plugin the way a kubelet's runtime would (CNI environment, network config
//! with `prevResult` on stdin) against real ztunnels with real eBPF capture, and checks what
//! the pod's connections do and what reaches the wire.
//!
//! Topology: node `a` runs the new pods (left out of the config at first); node `b` runs
//! `shop/web` (ambient) and `legacy/plain` (not ambient), both serving HTTP on 8080. Traffic
//! from `a` to `b` crosses the cluster bridge, where the tests capture.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use harness::config::{DATAPLANE_MODE, NONE, Workload};
use harness::ztunnel::{field_str, message};
use harness::{
    Cluster, Node, Pod, PodSpec, Proc, Ztunnel, ZtunnelOpts, pcap_contains, tcp_ports_seen,
    wait_until,
};
use serde_json::{Value, json};

const TRUST_DOMAIN: &str = "cluster.local";
const LONG: Duration = Duration::from_secs(30);
const SHORT: Duration = Duration::from_secs(10);
const REQUEST: &str = "GET / HTTP/1.0\r\n\r\n";

/// Fields drop in declaration order: processes first, the cluster (netns, mounts) last.
struct Mesh {
    _apps: Vec<Proc>,
    zt_a: Ztunnel,
    zt_b: Ztunnel,
    web: Pod,
    plain: Pod,
    a: Node,
    socket: PathBuf,
    cluster: Cluster,
}

/// Builds the topology. `new_pods` (namespace, name) go on node `a` with a netns and an
/// address but stay out of the config, as between CNI ADD and the API server knowing the IP.
fn mesh(new_pods: &[(&str, &str)]) -> Result<(Mesh, Vec<Pod>)> {
    let cluster = Cluster::new()?;
    let a = cluster.add_node("a")?;
    let b = cluster.add_node("b")?;
    let web = cluster.add_pod(
        &b,
        PodSpec::new("web").namespace("shop").service_account("web"),
    )?;
    let plain = cluster.add_pod(&b, PodSpec::new("plain").namespace("legacy"))?;
    let mut fresh = Vec::new();
    for (ns, name) in new_pods {
        fresh.push(cluster.add_pod(
            &a,
            PodSpec::new(*name).namespace(*ns).service_account(*name),
        )?);
    }
    cluster.edit_config(|c| {
        c.workloads
            .retain(|w| !new_pods.contains(&(w.namespace.as_str(), w.name.as_str())))
    });
    cluster.enroll_namespace("shop")?;
    cluster.add_namespace("legacy", Default::default())?;
    cluster.write_config()?;
    cluster.init_ca(TRUST_DOMAIN)?;
    let mut apps = Vec::new();
    for pod in [&web, &plain] {
        apps.push(pod.spawn_testapp(&[
            "http",
            "--listen",
            "0.0.0.0:8080",
            "--name",
            pod.name(),
        ])?);
    }
    let socket = cluster.dir().join("a-cni.sock");
    let socket_arg = socket.display().to_string();
    let zt_a = a.start_ztunnel(&ZtunnelOpts::default().arg("--cni-socket").arg(socket_arg))?;
    let zt_b = b.start_ztunnel(&ZtunnelOpts::default())?;
    zt_a.wait_ready(LONG)?;
    zt_b.wait_ready(LONG)?;
    Ok((
        Mesh {
            _apps: apps,
            zt_a,
            zt_b,
            web,
            plain,
            a,
            socket,
            cluster,
        },
        fresh,
    ))
}

/// The network config a runtime would pass, with the main plugin's result for `pod`.
fn net_conf(socket: &Path, pod: &Pod) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "ambit-cni",
        "ztunnelSocket": socket,
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": pod.netns_path()}],
            "ips": [{"address": format!("{}/24", pod.ip()), "interface": 0}],
        },
    })
}

/// Runs the real plugin binary from the node netns, as the runtime does: `CNI_*` in the
/// environment, the network config on stdin.
fn run_cni(node: &Node, command: &str, pod: &Pod, conf: &Value) -> Result<Output> {
    let dir = node.cluster_dir().join("cni-input");
    std::fs::create_dir_all(&dir)?;
    let input = dir.join(format!("{}-{}-{command}.json", pod.namespace(), pod.name()));
    std::fs::write(&input, conf.to_string())?;
    let mut cmd = node.command("sh");
    cmd.arg("-c")
        .arg(r#"exec "$0" cni < "$1""#)
        .arg(harness::bin_path("ztunnel")?)
        .arg(&input)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("sandbox-{}", pod.name()))
        .env("CNI_NETNS", pod.netns_path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID=uid-{}",
                pod.namespace(),
                pod.name(),
                pod.name()
            ),
        );
    node.run(&mut cmd, Duration::from_secs(30))
}

fn stdout_json(out: &Output) -> Result<Value> {
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "plugin stdout is not JSON: {:?} (stderr: {})",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn connect(from: &Pod, to: &Pod) -> Result<Value> {
    from.run_testapp(
        &[
            "connect",
            "--to",
            &format!("{}:8080", to.ip()),
            "--timeout-secs",
            "3",
            "--send",
            REQUEST,
            // No half-close: the HTTP/1.0 server answers and closes. (A half-close races the
            // server's own shutdown on a direct, uncaptured connection.)
            "--hold",
        ],
        SHORT,
    )
}

/// A connect refused by the connect hook: EPERM, nothing received.
fn refused_by_hook(v: &Value) -> bool {
    v["result"] == "error"
        && v["error"]
            .as_str()
            .is_some_and(|e| e.contains("os error 1"))
        && v["received"].as_str().unwrap_or_default().is_empty()
}

fn answered_by(v: &Value, name: &str) -> bool {
    v["result"] == "ok"
        && v["received"]
            .as_str()
            .is_some_and(|r| r.contains(&format!("hello from {name}")))
}

fn add_to_config(cluster: &Cluster, pod: &Pod, labels: &[(&str, &str)]) -> Result<()> {
    cluster.edit_config(|c| {
        c.workloads.push(Workload {
            name: pod.name().into(),
            namespace: pod.namespace().into(),
            service_account: pod.service_account().into(),
            ips: vec![pod.ip().into()],
            node: pod.node().name().into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    });
    cluster.write_config()?;
    Ok(())
}

fn log_has(zt: &Ztunnel, text: &str, pod: &Pod) -> Result<Value> {
    let workload = format!("{}/{}", pod.namespace(), pod.name());
    zt.wait_for_log(LONG, |v| {
        message(v) == Some(text) && field_str(v, "pod") == workload
    })
}

#[test]
fn new_pod_is_held_closed_until_enrolled_then_tunnelled() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let (m, fresh) = mesh(&[("shop", "late"), ("shop", "nohook")])?;
    let (late, nohook) = (&fresh[0], &fresh[1]);

    // The race, shown on a pod whose ADD never reached the hook: its namespace is ambient,
    // but until the config lists it, its connection leaves uncaptured, in plaintext.
    let capture = m.cluster.capture_bridge()?;
    let r = connect(nohook, &m.web)?;
    let pcap = capture.stop()?;
    assert!(answered_by(&r, "web"), "{r}");
    assert!(
        tcp_ports_seen(&pcap).contains(&8080),
        "the race did not show"
    );
    assert!(
        pcap_contains(&pcap, REQUEST.as_bytes()),
        "the race did not show"
    );

    let conf = net_conf(&m.socket, late);
    let out = run_cni(&m.a, "ADD", late, &conf)?;
    ensure!(
        out.status.success(),
        "ADD failed: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A chained plugin hands the previous result on unchanged.
    assert_eq!(stdout_json(&out)?, conf["prevResult"]);
    log_has(&m.zt_a, "CNI ADD: pod held closed until enrolled", late)?;

    // Held: the pod's sandbox exists, the config does not know it yet, and still nothing
    // leaves in plaintext. Every captured connect fails at once with EPERM.
    let capture = m.cluster.capture_bridge()?;
    let mut refusals = 0;
    for to in [&m.web, &m.plain, &m.web] {
        let r = connect(late, to)?;
        assert!(
            refused_by_hook(&r),
            "held pod's connect to {} must be refused: {r}",
            to.name()
        );
        refusals += 1;
    }
    let pcap = capture.stop()?;
    assert_eq!(refusals, 3);
    let ports = tcp_ports_seen(&pcap);
    assert!(
        !ports.contains(&8080),
        "a SYN to 8080 left the held pod: {ports:?}"
    );
    assert!(
        !pcap_contains(&pcap, REQUEST.as_bytes()),
        "request bytes on the wire"
    );

    // The config catches up: the normal reconcile enrolls the pod, replacing the hold.
    add_to_config(&m.cluster, late, &[])?;
    log_has(&m.zt_a, "held pod is now enrolled", late)?;
    let capture = m.cluster.capture_bridge()?;
    let mut last = Value::Null;
    wait_until(LONG, || {
        last = connect(late, &m.web).unwrap_or(Value::Null);
        answered_by(&last, "web")
    })
    .with_context(|| format!("enrolled pod never reached web: {last}"))?;
    let pcap = capture.stop()?;
    assert!(
        !pcap_contains(&pcap, b"hello from web"),
        "the answer crossed the wire in plaintext"
    );
    assert!(
        tcp_ports_seen(&pcap).contains(&15008),
        "no HBONE on the wire"
    );
    let src = format!("{}:", late.ip());
    let inbound = m.zt_b.wait_for_log(LONG, |v| {
        v.get("target").and_then(Value::as_str) == Some("access")
            && field_str(v, "direction") == "inbound"
            && field_str(v, "src.addr").starts_with(&src)
    })?;
    assert_eq!(field_str(&inbound, "protocol"), "HBONE");
    assert_eq!(field_str(&inbound, "src.identity"), late.identity());
    assert_eq!(
        field_str(&inbound, "dst.identity"),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    Ok(())
}

#[test]
fn pod_in_a_non_ambient_namespace_is_not_held() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let (m, fresh) = mesh(&[("legacy", "newplain")])?;
    let pod = &fresh[0];
    let out = run_cni(&m.a, "ADD", pod, &net_conf(&m.socket, pod))?;
    ensure!(
        out.status.success(),
        "ADD failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    log_has(&m.zt_a, "CNI ADD: namespace is not ambient; not held", pod)?;

    let capture = m.cluster.capture_bridge()?;
    let r = connect(pod, &m.plain)?;
    let pcap = capture.stop()?;
    assert!(answered_by(&r, "plain"), "direct traffic must flow: {r}");
    // Not captured: plaintext, straight to the destination port.
    assert!(pcap_contains(&pcap, b"hello from plain"));
    assert!(tcp_ports_seen(&pcap).contains(&8080));
    Ok(())
}

#[test]
fn add_fails_with_a_cni_error_when_ztunnel_is_down() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let (mut m, fresh) = mesh(&[("shop", "orphan")])?;
    let pod = &fresh[0];
    m.zt_a.stop()?;
    let out = run_cni(&m.a, "ADD", pod, &net_conf(&m.socket, pod))?;
    assert!(!out.status.success(), "ADD must fail without ztunnel");
    let err = stdout_json(&out)?;
    assert_eq!(err["cniVersion"], "1.0.0");
    assert_eq!(err["code"], 11, "{err}");
    assert!(
        err["msg"]
            .as_str()
            .is_some_and(|m| m.contains("not reachable")),
        "{err}"
    );
    // DEL stays idempotent and succeeds even so.
    let out = run_cni(&m.a, "DEL", pod, &net_conf(&m.socket, pod))?;
    assert!(
        out.status.success(),
        "DEL: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

#[test]
fn del_and_opt_out_release_holds_and_version_answers() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let (m, fresh) = mesh(&[("shop", "gone"), ("shop", "optout")])?;
    let (gone, optout) = (&fresh[0], &fresh[1]);

    let out = run_cni(&m.a, "VERSION", gone, &json!({"cniVersion": "1.0.0"}))?;
    assert!(out.status.success());
    let versions = stdout_json(&out)?;
    let supported: Vec<&str> = versions["supportedVersions"]
        .as_array()
        .context("supportedVersions")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(supported.contains(&"1.0.0"), "{versions}");

    for pod in [gone, optout] {
        let out = run_cni(&m.a, "ADD", pod, &net_conf(&m.socket, pod))?;
        ensure!(
            out.status.success(),
            "ADD: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        log_has(&m.zt_a, "CNI ADD: pod held closed until enrolled", pod)?;
        let r = connect(pod, &m.web)?;
        assert!(refused_by_hook(&r), "{} must be held: {r}", pod.name());
    }

    // CNI DEL of a sandbox releases its hold (twice: DEL is idempotent).
    for _ in 0..2 {
        let out = run_cni(&m.a, "DEL", gone, &net_conf(&m.socket, gone))?;
        assert!(
            out.status.success(),
            "DEL: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    m.zt_a.wait_for_log(LONG, |v| {
        message(v) == Some("pod hold released") && field_str(v, "reason") == "CNI DEL"
    })?;
    let r = connect(gone, &m.plain)?;
    assert!(
        answered_by(&r, "plain"),
        "released pod is no longer held: {r}"
    );

    // The config lists the other pod as opted out: the hold is released, not enrolled.
    add_to_config(&m.cluster, optout, &[(DATAPLANE_MODE, NONE)])?;
    m.zt_a.wait_for_log(LONG, |v| {
        message(v) == Some("pod hold released")
            && field_str(v, "reason") == "the config lists the pod as not enrolled"
    })?;
    let r = connect(optout, &m.plain)?;
    assert!(
        answered_by(&r, "plain"),
        "opted-out pod must not stay held: {r}"
    );
    Ok(())
}

#[test]
fn holds_survive_a_ztunnel_restart() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let (mut m, fresh) = mesh(&[("shop", "early")])?;
    let pod = &fresh[0];
    let out = run_cni(&m.a, "ADD", pod, &net_conf(&m.socket, pod))?;
    ensure!(
        out.status.success(),
        "ADD: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    log_has(&m.zt_a, "CNI ADD: pod held closed until enrolled", pod)?;

    // The hold lives in the pinned maps: it stays in force while ztunnel is down and after
    // it comes back (the restarted ztunnel also replaces its own stale socket).
    m.zt_a.stop()?;
    let r = connect(pod, &m.web)?;
    assert!(refused_by_hook(&r), "held while ztunnel is down: {r}");
    m.zt_a.restart()?;
    m.zt_a.wait_ready(LONG)?;
    m.zt_a.wait_for_log(LONG, |v| {
        message(v) == Some("adopting a pod hold left by an earlier ztunnel")
    })?;
    let r = connect(pod, &m.web)?;
    assert!(refused_by_hook(&r), "held after the restart: {r}");
    // The restarted ztunnel answers on the same socket path.
    let out = run_cni(&m.a, "CHECK", pod, &net_conf(&m.socket, pod))?;
    assert!(
        out.status.success(),
        "CHECK after restart: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    add_to_config(&m.cluster, pod, &[])?;
    let mut last = Value::Null;
    wait_until(LONG, || {
        last = connect(pod, &m.web).unwrap_or(Value::Null);
        answered_by(&last, "web")
    })
    .with_context(|| format!("adopted hold never became an enrollment: {last}"))?;
    m.zt_a
        .wait_for_log(LONG, |v| message(v) == Some("held pod is now enrolled"))?;
    Ok(())
}
