//! Transparent mTLS between enrolled pods: capture, HBONE, identities, fail-closed capture,
//! enrollment changes, hostile input. Each test builds its own simulated cluster with real
//! ztunnel processes and real eBPF programs, and tears it down even when it fails.
//!
//! Topology (every test): node `a` runs `shop/client` and `shop/web`; node `b` runs
//! `shop/api` and `legacy/plain`. `shop` is ambient, `legacy` is not. Every pod but the
//! client serves HTTP on 8080 (`ambit-testapp http`), which answers `hello from <name>` and
//! reports the peer address it saw in `x-peer`.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use harness::ztunnel::{field, field_str, message};
use harness::{
    Cluster, Node, Pod, PodSpec, Proc, Ztunnel, ZtunnelOpts, pcap_contains, tcp_ports_seen,
    wait_until,
};
use serde_json::Value;

const TRUST_DOMAIN: &str = "cluster.local";
const LONG: Duration = Duration::from_secs(30);
const SHORT: Duration = Duration::from_secs(10);

/// Fields drop in declaration order: processes first, the cluster (netns, mounts) last.
struct Mesh {
    _apps: Vec<Proc>,
    zt_a: Ztunnel,
    zt_b: Ztunnel,
    client: Pod,
    web: Pod,
    api: Pod,
    plain: Pod,
    a: Node,
    b: Node,
    cluster: Cluster,
}

/// Builds the topology, starts the HTTP servers, and starts ztunnel on both nodes.
fn mesh(opts: &ZtunnelOpts) -> Result<Mesh> {
    let cluster = Cluster::new()?;
    let a = cluster.add_node("a")?;
    let b = cluster.add_node("b")?;
    let client = cluster.add_pod(
        &a,
        PodSpec::new("client")
            .namespace("shop")
            .service_account("client"),
    )?;
    let web = cluster.add_pod(
        &a,
        PodSpec::new("web").namespace("shop").service_account("web"),
    )?;
    let api = cluster.add_pod(
        &b,
        PodSpec::new("api").namespace("shop").service_account("api"),
    )?;
    let plain = cluster.add_pod(&b, PodSpec::new("plain").namespace("legacy"))?;
    cluster.enroll_namespace("shop")?;
    cluster.add_namespace("legacy", Default::default())?;
    cluster.write_config()?;
    cluster.init_ca(TRUST_DOMAIN)?;
    let mut apps = Vec::new();
    for pod in [&web, &api, &plain] {
        apps.push(pod.spawn_testapp(&[
            "http",
            "--listen",
            "0.0.0.0:8080",
            "--name",
            pod.name(),
        ])?);
    }
    let zt_a = a.start_ztunnel(opts)?;
    let zt_b = b.start_ztunnel(opts)?;
    zt_a.wait_ready(LONG)?;
    zt_b.wait_ready(LONG)?;
    Ok(Mesh {
        _apps: apps,
        zt_a,
        zt_b,
        client,
        web,
        api,
        plain,
        a,
        b,
        cluster,
    })
}

/// `curl` from `from` to `to:8080`; returns (status, body, x-peer header).
fn http_get(from: &Pod, to: &Pod) -> Result<(u16, String, String)> {
    let url = format!("http://{}:8080/", to.ip());
    let out = from.run(
        from.command("curl")
            .args(["-sS", "-m", "10", "-D", "-", &url]),
        Duration::from_secs(15),
    )?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "curl {url} from {} failed: {}",
        from.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no HTTP header block")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    let peer = head
        .lines()
        .find_map(|l| l.strip_prefix("x-peer: "))
        .unwrap_or_default()
        .trim()
        .to_string();
    Ok((status, body.to_string(), peer))
}

fn is_access(v: &Value) -> bool {
    v.get("target").and_then(Value::as_str) == Some("access")
}

/// Waits for the access-log line of a connection from `src_ip` to `dst`.
fn access_line(zt: &Ztunnel, direction: &str, src_ip: &str, dst: &str) -> Result<Value> {
    access_line_since(zt, 0, direction, src_ip, dst)
}

/// Like [`access_line`], for connections logged after `cursor`.
fn access_line_since(
    zt: &Ztunnel,
    cursor: usize,
    direction: &str,
    src_ip: &str,
    dst: &str,
) -> Result<Value> {
    zt.wait_for_log_since(cursor, SHORT, |v| {
        is_access(v)
            && field_str(v, "direction") == direction
            && field_str(v, "src.addr").starts_with(&format!("{src_ip}:"))
            && field_str(v, "dst.addr") == dst
    })
}

fn result_of(v: &Value) -> &str {
    v.get("result").and_then(Value::as_str).unwrap_or_default()
}

/// Connection failures a client may see when capture fails closed or a port is refused.
fn refused(v: &Value) -> bool {
    matches!(
        result_of(v),
        "refused" | "reset" | "eof" | "timeout" | "unreachable" | "error"
    ) && v
        .get("received")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .is_empty()
}

#[test]
fn same_node_request_is_tunnelled_with_both_identities() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let m = mesh(&ZtunnelOpts::default())?;
    let (status, body, peer) = http_get(&m.client, &m.web)?;
    assert_eq!((status, body.as_str()), (200, "hello from web\n"));
    // The app sees ztunnel's delivery address, proof that the bytes came through the tunnel.
    assert!(peer.starts_with("127.0.0.6:"), "app saw peer {peer}");

    let dst = format!("{}:8080", m.web.ip());
    let out = access_line(&m.zt_a, "outbound", &m.client.ip().to_string(), &dst)?;
    assert_eq!(field_str(&out, "protocol"), "HBONE");
    assert_eq!(
        field_str(&out, "src.identity"),
        "spiffe://cluster.local/ns/shop/sa/client"
    );
    assert_eq!(
        field_str(&out, "dst.identity"),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(
        field_str(&out, "dst.hbone_addr"),
        format!("{}:15008", m.web.ip())
    );
    assert_eq!(field_str(&out, "error"), "");
    let inbound = access_line(&m.zt_a, "inbound", &m.client.ip().to_string(), &dst)?;
    assert_eq!(field_str(&inbound, "protocol"), "HBONE");
    assert_eq!(
        field_str(&inbound, "src.identity"),
        "spiffe://cluster.local/ns/shop/sa/client"
    );
    assert_eq!(
        field_str(&inbound, "dst.identity"),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert!(
        field(&inbound, "bytes_recv")
            .and_then(Value::as_u64)
            .unwrap_or(0)
            >= body.len() as u64
    );
    Ok(())
}

#[test]
fn cross_node_wire_carries_only_tls_on_15008() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let m = mesh(&ZtunnelOpts::default())?;
    let _sink = m.api.spawn_testapp(&["sink", "--listen", "0.0.0.0:9000"])?;
    let capture = m.cluster.capture_bridge()?;
    let marker = "AMBIT-MARKER-7f3a9c";
    let to = format!("{}:9000", m.api.ip());
    let sent = m.client.run_testapp(
        &[
            "send",
            "--to",
            &to,
            "--bytes",
            "4194304",
            "--marker",
            marker,
            "--timeout-secs",
            "20",
        ],
        LONG,
    )?;
    let (status, body, _) = http_get(&m.client, &m.api)?;
    let pcap = capture.stop()?;
    assert_eq!(sent["match"], Value::Bool(true), "sink reply: {sent}");
    assert_eq!((status, body.as_str()), (200, "hello from api\n"));

    // The absence checks below only mean something if the capture holds the stream.
    let captured: u64 = tshark_fields(&pcap, "tcp.port == 15008", "tcp.len")?
        .iter()
        .filter_map(|l| l.parse::<u64>().ok())
        .sum();
    assert!(
        captured >= 4_194_304,
        "capture holds only {captured} bytes of the 4 MiB transfer"
    );
    assert!(
        !pcap_contains(&pcap, marker.as_bytes()),
        "marker seen in the clear on the node link"
    );
    assert!(
        !pcap_contains(&pcap, b"hello from api"),
        "HTTP body seen in the clear"
    );
    let ports = tcp_ports_seen(&pcap);
    assert!(
        ports.contains(&15008),
        "no HBONE traffic captured: {ports:?}"
    );
    // Every TCP segment between the nodes has 15008 on one side.
    let non_hbone = tcp_pairs(&pcap)?
        .into_iter()
        .filter(|(s, d)| *s != 15008 && *d != 15008)
        .collect::<Vec<_>>();
    assert!(
        non_hbone.is_empty(),
        "TCP outside HBONE on the wire: {non_hbone:?}"
    );
    let handshakes = tshark_fields(&pcap, "tls.handshake.type == 1", "tls.handshake.version")?;
    assert!(!handshakes.is_empty(), "no TLS ClientHello captured");
    let versions = tshark_fields(
        &pcap,
        "tls.handshake.type == 2",
        "tls.handshake.extensions.supported_version",
    )?;
    assert!(
        versions.iter().all(|v| v == "0x0304"),
        "ServerHello not TLS 1.3: {versions:?}"
    );

    let out = access_line(&m.zt_a, "outbound", &m.client.ip().to_string(), &to)?;
    assert_eq!(
        field_str(&out, "dst.identity"),
        "spiffe://cluster.local/ns/shop/sa/api"
    );
    assert_eq!(
        field(&out, "bytes_sent").and_then(Value::as_u64),
        Some(4_194_304)
    );
    let inbound = access_line(&m.zt_b, "inbound", &m.client.ip().to_string(), &to)?;
    assert_eq!(
        field_str(&inbound, "src.identity"),
        "spiffe://cluster.local/ns/shop/sa/client"
    );
    assert_eq!(
        field(&inbound, "bytes_sent").and_then(Value::as_u64),
        Some(4_194_304)
    );
    Ok(())
}

/// (src port, dst port) of every TCP segment in the capture.
fn tcp_pairs(pcap: &Path) -> Result<BTreeSet<(u16, u16)>> {
    let lines = tshark_fields(pcap, "tcp", "tcp.srcport")?;
    let dst = tshark_fields(pcap, "tcp", "tcp.dstport")?;
    Ok(lines
        .iter()
        .zip(dst.iter())
        .filter_map(|(s, d)| Some((s.parse().ok()?, d.parse().ok()?)))
        .collect())
}

fn tshark_fields(pcap: &Path, filter: &str, field: &str) -> Result<Vec<String>> {
    let out = Command::new("tshark")
        .arg("-r")
        .arg(pcap)
        .args(["-Y", filter, "-T", "fields", "-e", field])
        .output()
        .context("running tshark")?;
    ensure!(
        out.status.success(),
        "tshark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

#[test]
fn plain_pods_get_passthrough_and_reach_enrolled_pods_through_15006() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let m = mesh(&ZtunnelOpts::default())?;
    let capture = m.cluster.capture_bridge()?;
    // Enrolled → plain: plaintext passthrough, so the body is visible on the wire.
    let (status, body, peer) = http_get(&m.client, &m.plain)?;
    let pcap = capture.stop()?;
    assert_eq!((status, body.as_str()), (200, "hello from plain\n"));
    assert!(
        peer.starts_with(&format!("{}:", m.client.ip())),
        "plain pod saw {peer}"
    );
    assert!(
        pcap_contains(&pcap, b"hello from plain"),
        "passthrough should be plaintext"
    );
    let out = access_line(
        &m.zt_a,
        "outbound",
        &m.client.ip().to_string(),
        &format!("{}:8080", m.plain.ip()),
    )?;
    assert_eq!(field_str(&out, "protocol"), "TCP");
    assert_eq!(field_str(&out, "dst.identity"), "");

    // Plain → enrolled: arrives through 15006 and is delivered by ztunnel.
    let (status, body, peer) = http_get(&m.plain, &m.api)?;
    assert_eq!((status, body.as_str()), (200, "hello from api\n"));
    assert!(peer.starts_with("127.0.0.6:"), "api saw {peer}");
    let inbound = access_line(
        &m.zt_b,
        "inbound",
        &m.plain.ip().to_string(),
        &format!("{}:8080", m.api.ip()),
    )?;
    assert_eq!(field_str(&inbound, "protocol"), "TCP");
    assert_eq!(field_str(&inbound, "src.identity"), "");
    assert_eq!(
        field_str(&inbound, "dst.identity"),
        "spiffe://cluster.local/ns/shop/sa/api"
    );
    Ok(())
}

#[test]
fn unenrolling_a_pod_sends_its_traffic_direct_and_leaves_no_state() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let m = mesh(&ZtunnelOpts::default())?;
    let (_, _, peer) = http_get(&m.client, &m.api)?;
    assert!(peer.starts_with("127.0.0.6:"), "before: api saw {peer}");
    let before = m.client.capture_state()?;
    assert!(
        before.len() >= 4,
        "expected map entry, link, pin, rule and route, got {before:?}"
    );

    // Opt the client out with a pod label, and the api pod with it... no: only the client.
    let cursor = m.zt_a.log_cursor();
    m.cluster
        .set_pod_label(&m.client, "ambit.dev/dataplane-mode", Some("none"))?;
    m.cluster.write_config()?;
    m.zt_a.wait_for_log_since(cursor, LONG, |v| {
        message(v) == Some("pod un-enrolled") && field_str(v, "pod") == "shop/client"
    })?;
    // The listeners close as their tasks are cancelled: give that a moment.
    let _ = harness::wait_until(SHORT, || {
        m.client.capture_state().is_ok_and(|s| s.is_empty())
    });
    let after = m.client.capture_state()?;
    assert!(after.is_empty(), "state left after un-enrolling: {after:?}");

    // Direct now: the client's packets reach node b's 15006 as plaintext from its own IP.
    let cursor = m.zt_b.log_cursor();
    let capture = m.cluster.capture_bridge()?;
    let (status, body, _) = http_get(&m.client, &m.api)?;
    let pcap = capture.stop()?;
    assert_eq!((status, body.as_str()), (200, "hello from api\n"));
    assert!(
        pcap_contains(&pcap, b"hello from api"),
        "un-enrolled traffic should travel as plain TCP"
    );
    assert!(
        !tcp_ports_seen(&pcap).contains(&15008),
        "un-enrolled traffic went through HBONE"
    );
    let inbound = access_line_since(
        &m.zt_b,
        cursor,
        "inbound",
        &m.client.ip().to_string(),
        &format!("{}:8080", m.api.ip()),
    )?;
    assert_eq!(field_str(&inbound, "protocol"), "TCP");
    assert_eq!(field_str(&inbound, "src.identity"), "");

    // Re-enrolling restores the tunnel.
    let cursor = m.zt_a.log_cursor();
    m.cluster
        .set_pod_label(&m.client, "ambit.dev/dataplane-mode", None)?;
    m.cluster.write_config()?;
    m.zt_a.wait_for_log_since(cursor, LONG, |v| {
        message(v) == Some("pod enrolled") && field_str(v, "pod") == "shop/client"
    })?;
    let (_, _, peer) = http_get(&m.client, &m.api)?;
    assert!(
        peer.starts_with("127.0.0.6:"),
        "after re-enrolling: api saw {peer}"
    );
    Ok(())
}

#[test]
fn ztunnel_crash_fails_closed_and_restart_restores_traffic() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let mut m = mesh(&ZtunnelOpts::default())?;
    let to = format!("{}:8080", m.api.ip());
    let (status, _, _) = http_get(&m.client, &m.api)?;
    assert_eq!(status, 200);

    m.zt_a.kill9()?;
    let capture = m.cluster.capture_bridge()?;
    for target in [
        to.clone(),
        format!("{}:8080", m.plain.ip()),
        format!("{}:8080", m.web.ip()),
    ] {
        let r = m.client.run_testapp(
            &[
                "connect",
                "--to",
                &target,
                "--timeout-secs",
                "3",
                "--send",
                "GET / HTTP/1.0\r\n\r\n",
            ],
            SHORT,
        )?;
        assert!(
            refused(&r),
            "with ztunnel down, connect to {target} must fail: {r}"
        );
    }
    let pcap = capture.stop()?;
    let leaked = tcp_pairs(&pcap)?
        .into_iter()
        .filter(|(s, d)| *s == 8080 || *d == 8080)
        .collect::<Vec<_>>();
    assert!(
        leaked.is_empty(),
        "plaintext left the pod while ztunnel was down: {leaked:?}"
    );
    assert!(
        !pcap_contains(&pcap, b"GET / HTTP/1.0"),
        "request bytes on the wire"
    );

    m.zt_a.restart()?;
    m.zt_a.wait_ready(LONG)?;
    wait_until(LONG, || {
        http_get(&m.client, &m.api).is_ok_and(|(s, _, p)| s == 200 && p.starts_with("127.0.0.6:"))
    })
    .context("traffic did not resume through the tunnel after restart")?;
    let (status, body, _) = http_get(&m.client, &m.web)?;
    assert_eq!((status, body.as_str()), (200, "hello from web\n"));
    Ok(())
}

#[test]
fn wrong_identity_foreign_ca_and_missing_client_cert_are_refused() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let mut m = mesh(&ZtunnelOpts::default())?;

    // 1. Node b believes api runs as `impostor`, so it presents that identity; node a
    //    expects `api` and must refuse.
    let impostor_config = m.cluster.dir().join("config-impostor.yaml");
    let text = std::fs::read_to_string(m.cluster.config_path())?;
    let replaced = text.replacen("serviceAccount: api", "serviceAccount: impostor", 1);
    ensure!(
        replaced != text,
        "config has no `serviceAccount: api` to replace:\n{text}"
    );
    std::fs::write(&impostor_config, replaced)?;
    m.zt_b.stop()?;
    let zt_b = m.b.start_ztunnel(
        &ZtunnelOpts::default()
            .arg("--config")
            .arg(impostor_config.display().to_string()),
    )?;
    zt_b.wait_ready(LONG)?;
    let r = m.client.run_testapp(
        &[
            "connect",
            "--to",
            &format!("{}:8080", m.api.ip()),
            "--timeout-secs",
            "5",
            "--send",
            "GET / HTTP/1.0\r\n\r\n",
        ],
        SHORT,
    )?;
    assert!(refused(&r), "impostor must not be reached: {r}");
    let line = m.zt_a.wait_for_log(SHORT, |v| {
        is_access(v)
            && field_str(v, "error").contains("server identity mismatch")
            && field_str(v, "error").contains("expected spiffe://cluster.local/ns/shop/sa/api")
            && field_str(v, "error").contains("got spiffe://cluster.local/ns/shop/sa/impostor")
    })?;
    assert_eq!(field_str(&line, "direction"), "outbound");
    drop(zt_b);

    // 2a. Node b with certificates from another CA: node a refuses it as a server.
    let other_ca = m.cluster.dir().join("other-ca");
    harness::ztunnel::cli(&[
        "ca",
        "init",
        "--dir",
        &other_ca.display().to_string(),
        "--trust-domain",
        TRUST_DOMAIN,
    ])?;
    let zt_b = m.b.start_ztunnel(
        &ZtunnelOpts::default()
            .arg("--ca-dir")
            .arg(other_ca.display().to_string()),
    )?;
    zt_b.wait_ready(LONG)?;
    let r = m.client.run_testapp(
        &[
            "connect",
            "--to",
            &format!("{}:8080", m.api.ip()),
            "--timeout-secs",
            "5",
            "--send",
            "x",
        ],
        SHORT,
    )?;
    assert!(refused(&r), "peer from another CA must not be reached: {r}");
    m.zt_a
        .wait_for_log(SHORT, |v| field_str(v, "error").contains("UnknownIssuer"))?;
    drop(zt_b);

    // 2b. A client certificate from another CA is refused by the server.
    let zt_b = m.b.start_ztunnel(&ZtunnelOpts::default())?;
    zt_b.wait_ready(LONG)?;
    let foreign = m.cluster.dir().join("foreign-cert");
    harness::ztunnel::cli(&[
        "ca",
        "issue",
        "--dir",
        &other_ca.display().to_string(),
        "--identity",
        "spiffe://cluster.local/ns/shop/sa/client",
        "--out",
        &foreign.display().to_string(),
    ])?;
    let r = hbone_probe(
        &m.plain,
        &m.api,
        &foreign.join("cert.pem"),
        &foreign.join("key.pem"),
        &m.cluster.ca_dir().join("bundle.pem"),
        "CONNECT",
        &format!("{}:8080", m.api.ip()),
    )?;
    assert!(
        r.get("status").is_none(),
        "foreign client got an answer: {r}"
    );
    zt_b.wait_for_log(SHORT, |v| {
        message(v) == Some("HBONE TLS handshake failed; connection refused")
            && field_str(v, "error").contains("UnknownIssuer")
    })?;
    drop(zt_b);

    // 3. A client with no certificate at all (curl from the plain pod) is refused.
    let zt_b = m.b.start_ztunnel(&ZtunnelOpts::default())?;
    zt_b.wait_ready(LONG)?;
    let out = m.plain.run(
        m.plain.command("curl").args([
            "-sk",
            "-m",
            "5",
            "--http2",
            &format!("https://{}:15008/", m.web.ip()),
        ]),
        SHORT,
    )?;
    assert!(
        !out.status.success(),
        "curl without a client certificate got through"
    );
    m.zt_a.wait_for_log(SHORT, |v| {
        message(v) == Some("HBONE TLS handshake failed; connection refused")
            && field_str(v, "error").contains("peer sent no certificates")
    })?;
    // And ztunnel still serves.
    assert_eq!(http_get(&m.client, &m.api)?.0, 200);
    Ok(())
}

#[test]
fn a_gibibyte_and_a_thousand_concurrent_connections_arrive_byte_exact() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let m = mesh(&ZtunnelOpts::default())?;
    let _sink = m.api.spawn_testapp(&["sink", "--listen", "0.0.0.0:9000"])?;
    let _echo = m.api.spawn_testapp(&["echo", "--listen", "0.0.0.0:9001"])?;

    let gib = (1u64 << 30).to_string();
    let sent = m.client.run_testapp(
        &[
            "send",
            "--to",
            &format!("{}:9000", m.api.ip()),
            "--bytes",
            &gib,
            "--timeout-secs",
            "240",
        ],
        Duration::from_secs(260),
    )?;
    assert_eq!(
        sent["match"],
        Value::Bool(true),
        "1 GiB transfer corrupted: {sent}"
    );
    assert_eq!(sent["bytes"].as_u64(), Some(1 << 30));

    let fan = m.client.run_testapp(
        &[
            "fanout",
            "--to",
            &format!("{}:9001", m.api.ip()),
            "--conns",
            "1000",
            "--bytes-per-conn",
            "65536",
            "--timeout-secs",
            "120",
        ],
        Duration::from_secs(140),
    )?;
    assert_eq!(fan["ok"].as_u64(), Some(1000), "fanout: {fan}");
    assert_eq!(fan["failed"].as_u64(), Some(0), "fanout: {fan}");
    // All of it went through the tunnel.
    let tunnelled = m
        .zt_b
        .access_logs()
        .into_iter()
        .filter(|v| {
            field_str(v, "direction") == "inbound" && field_str(v, "dst.addr").ends_with(":9001")
        })
        .filter(|v| field_str(v, "src.identity") == "spiffe://cluster.local/ns/shop/sa/client")
        .count();
    wait_until(SHORT, || {
        m.zt_b
            .access_logs()
            .iter()
            .filter(|v| {
                field_str(v, "direction") == "inbound"
                    && field_str(v, "dst.addr").ends_with(":9001")
            })
            .count()
            >= 1000
    })
    .with_context(|| format!("only {tunnelled} inbound HBONE records for the fanout"))?;
    Ok(())
}

/// Sends one hand-made HBONE request from `from` to `to`:15008 with `ambit-hbone-probe`.
#[allow(clippy::too_many_arguments)]
fn hbone_probe(
    from: &Pod,
    to: &Pod,
    cert: &Path,
    key: &Path,
    bundle: &Path,
    method: &str,
    target: &str,
) -> Result<Value> {
    let bin = harness::bin_path("ambit-hbone-probe")?;
    let mut cmd = from.command(bin);
    cmd.args([
        "--to",
        &format!("{}:15008", to.ip()),
        "--server-identity",
        &to.identity(),
    ])
    .arg("--cert")
    .arg(cert)
    .arg("--key")
    .arg(key)
    .arg("--bundle")
    .arg(bundle)
    .args(["--method", method, "--target", target, "--send", "ping\n"]);
    let out = from.run_ok(&mut cmd, SHORT)?;
    serde_json::from_str(out.trim()).with_context(|| format!("probe output {out}"))
}

#[test]
fn malformed_hbone_requests_get_400_and_ztunnel_keeps_serving() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let m = mesh(&ZtunnelOpts::default())?;
    let (cert, key) = m
        .cluster
        .issue_cert("spiffe://cluster.local/ns/shop/sa/client")?;
    let bundle = m.cluster.ca_dir().join("bundle.pem");
    let probe = |method: &str, target: &str| {
        hbone_probe(&m.plain, &m.api, &cert, &key, &bundle, method, target)
    };
    let api = m.api.ip();
    let cases = [
        (
            "GET",
            format!("https://{api}:15008/"),
            400,
            "is not CONNECT",
        ),
        (
            "CONNECT",
            "example.com:8080".to_string(),
            400,
            "is not ip:port",
        ),
        (
            "CONNECT",
            format!("{}:8080", m.web.ip()),
            400,
            "is not a workload served here",
        ),
        (
            "CONNECT",
            format!("{api}:15001"),
            400,
            "belongs to the proxy itself",
        ),
        ("CONNECT", format!("{api}:9"), 503, "unreachable"),
    ];
    for (method, target, status, reason) in cases {
        let r = probe(method, &target)?;
        assert_eq!(r["status"].as_u64(), Some(status), "{method} {target}: {r}");
        m.zt_b.wait_for_log(SHORT, |v| {
            field_str(v, "error").contains(reason)
                && field_str(v, "error").starts_with(&status.to_string())
        })?;
    }
    // A well-formed CONNECT from the same client is served, and so is ordinary traffic.
    let _echo = m.api.spawn_testapp(&["echo", "--listen", "0.0.0.0:9001"])?;
    let r = probe("CONNECT", &format!("{api}:9001"))?;
    assert_eq!(r["status"].as_u64(), Some(200), "{r}");
    assert_eq!(r["received"].as_str(), Some("ping\n"));
    assert_eq!(http_get(&m.client, &m.api)?.0, 200);
    Ok(())
}

#[test]
fn calls_to_ztunnels_own_ports_are_refused() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let m = mesh(&ZtunnelOpts::default())?;
    let own = m.client.ip();
    let targets = [
        "127.0.0.1:15001".to_string(),
        "127.0.0.1:15006".to_string(),
        format!("{own}:15001"),
        format!("{own}:15006"),
        format!("{}:15001", m.api.ip()),
        format!("{}:15006", m.api.ip()),
    ];
    for t in &targets {
        let r = m.client.run_testapp(
            &[
                "connect",
                "--to",
                t,
                "--timeout-secs",
                "3",
                "--send",
                "GET / HTTP/1.0\r\n\r\n",
            ],
            SHORT,
        )?;
        assert!(refused(&r), "call to {t} was not refused: {r}");
    }
    m.zt_a.wait_for_log(SHORT, |v| {
        field_str(v, "error").contains("refused call to ztunnel's own port 15001")
    })?;
    m.zt_a.wait_for_log(SHORT, |v| {
        field_str(v, "error").contains("refused call to ztunnel's own port 15006")
    })?;
    // ztunnel is unharmed.
    assert_eq!(http_get(&m.client, &m.web)?.0, 200);
    Ok(())
}

#[test]
fn tunnels_are_pooled_and_idle_ones_reaped() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let m = mesh(&ZtunnelOpts::default().arg("--pool-idle-timeout").arg("2s"))?;
    for _ in 0..5 {
        assert_eq!(http_get(&m.client, &m.api)?.0, 200);
    }
    let hbone_conns = || -> Result<usize> {
        let out = m.client.run_ok(
            m.client
                .command("ss")
                .args(["-Htn", "state", "established", "( dport = :15008 )"]),
            SHORT,
        )?;
        Ok(out.lines().filter(|l| !l.trim().is_empty()).count())
    };
    assert_eq!(
        hbone_conns()?,
        1,
        "five sequential requests should share one pooled tunnel"
    );
    wait_until(LONG, || hbone_conns().is_ok_and(|n| n == 0))
        .context("idle tunnel was not reaped")?;
    assert_eq!(http_get(&m.client, &m.api)?.0, 200);
    Ok(())
}

#[test]
fn an_invalid_config_is_refused_and_the_last_good_one_stays() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    let m = mesh(&ZtunnelOpts::default())?;
    let path = m.cluster.config_path();
    let good = std::fs::read_to_string(&path)?;
    let cursor = m.zt_a.log_cursor();
    std::fs::write(
        &path,
        good.replacen(&m.web.ip().to_string(), "10.1.2.300", 1),
    )?;
    let err = m.zt_a.wait_for_log_since(cursor, LONG, |v| {
        message(v) == Some("invalid config refused; keeping the last good config")
    })?;
    assert_eq!(field_str(&err, "file"), path.display().to_string());
    assert!(field_str(&err, "field").starts_with("workloads["), "{err}");
    assert!(field_str(&err, "field").ends_with("].ips[0]"), "{err}");
    assert!(
        field_str(&err, "reason").contains("invalid IP address"),
        "{err}"
    );
    // The last good config is still in force: web is still enrolled and reachable.
    let (_, _, peer) = http_get(&m.client, &m.web)?;
    assert!(peer.starts_with("127.0.0.6:"), "web saw {peer}");
    let _ = &m.a;
    Ok(())
}
