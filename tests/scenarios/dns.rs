//! The DNS proxy end to end: real ztunnel, real eBPF, real `getent` (glibc's resolver) and
//! `dig` inside pods.
//!
//! Topology: one node `a` with `shop/client` (enrolled), `legacy/plain` (not enrolled) and
//! `infra/upstream`, where the test itself serves DNS on port 53 (UDP and TCP) as the node's
//! resolver: ztunnel is pointed at it with `--dns-resolv-conf`. The upstream answers
//! `external.example` with 198.51.100.7, `big.example` with 40 records (truncated over UDP
//! without EDNS), `web.shop.svc.cluster.local` with a decoy 198.51.100.99 (what a cluster DNS
//! that is not the mesh might say), and NXDOMAIN for the rest, and it records who asked what.
//!
//! Each pod process runs in a private mount namespace with its own `/etc/resolv.conf`
//! bind-mounted (Kubernetes style: search path and `ndots:5`). The client's nameserver is
//! `10.S.0.53`, an address nobody has inside the cluster's namespaces: its answers can only
//! come from the proxy. The plain pod's nameserver is the upstream itself. No query leaves the
//! namespaces the test made.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use harness::{Cluster, Node, Pod, PodSpec, Ztunnel, ZtunnelOpts, wait_for};
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use parking_lot::Mutex;

const TRUST_DOMAIN: &str = "cluster.local";
const LONG: Duration = Duration::from_secs(30);
/// Bound on every command run in a pod.
const COMMAND: Duration = Duration::from_secs(30);
/// The VIPs of the services in the config.
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const DB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const LATE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
/// The upstream's answers.
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const DECOY: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 99);
/// Records in the upstream's answer for `big.example`: more than 512 bytes.
const BIG: u8 = 40;
/// `getent` exits with 2 when the name is not found.
const GETENT_NOT_FOUND: i32 = 2;

/// Fields drop in declaration order: ztunnel and the upstream first, the cluster last.
struct Setup {
    zt: Ztunnel,
    upstream: Upstream,
    client: Pod,
    plain: Pod,
    node: Node,
    /// `10.S.0.53`: the client's nameserver, which nobody serves.
    cluster_dns: Ipv4Addr,
    client_resolv: PathBuf,
    plain_resolv: PathBuf,
    cluster: Cluster,
}

fn setup() -> Result<Setup> {
    let cluster = Cluster::new()?;
    let node = cluster.add_node("a")?;
    let client = cluster.add_pod(&node, PodSpec::new("client").namespace("shop"))?;
    let plain = cluster.add_pod(&node, PodSpec::new("plain").namespace("legacy"))?;
    let upstream_pod = cluster.add_pod(&node, PodSpec::new("upstream").namespace("infra"))?;
    cluster.enroll_namespace("shop")?;
    cluster.add_namespace("legacy", Default::default())?;
    cluster.add_namespace("infra", Default::default())?;
    for service in [
        service("web", "shop", WEB_VIP),
        service("db", "legacy", DB_VIP),
    ] {
        let service = service?;
        cluster.edit_config(|c| c.services.push(service));
    }
    cluster.write_config()?;
    cluster.init_ca(TRUST_DOMAIN)?;

    let upstream = Upstream::start(&upstream_pod)?;
    let cluster_dns = Ipv4Addr::new(10, cluster.slot(), 0, 53);
    let node_resolv = write(
        &cluster,
        "node-resolv.conf",
        &format!("nameserver {}\n", upstream_pod.ip()),
    )?;
    let client_resolv = write(
        &cluster,
        "client-resolv.conf",
        &pod_resolv("shop", cluster_dns),
    )?;
    let plain_resolv = write(
        &cluster,
        "plain-resolv.conf",
        &pod_resolv("legacy", upstream_pod.ip()),
    )?;

    let opts = ZtunnelOpts::default()
        .arg("--dns-resolv-conf")
        .arg(node_resolv.display().to_string());
    let zt = node.start_ztunnel(&opts)?;
    zt.wait_ready(LONG)?;
    Ok(Setup {
        zt,
        upstream,
        client,
        plain,
        node,
        cluster_dns,
        client_resolv,
        plain_resolv,
        cluster,
    })
}

fn service(name: &str, namespace: &str, vip: Ipv4Addr) -> Result<serde_yaml_ng::Value> {
    serde_yaml_ng::from_str(&format!(
        "{{ name: {name}, namespace: {namespace}, vips: [{vip}], \
         ports: [{{ port: 80 }}], selector: {{ app: {name} }} }}"
    ))
    .context("service YAML")
}

/// A pod's resolv.conf as Kubernetes writes it.
fn pod_resolv(namespace: &str, nameserver: Ipv4Addr) -> String {
    format!(
        "search {namespace}.svc.cluster.local svc.cluster.local cluster.local\n\
         nameserver {nameserver}\n\
         options ndots:5 timeout:3 attempts:2\n"
    )
}

fn write(cluster: &Cluster, name: &str, text: &str) -> Result<PathBuf> {
    let path = cluster.dir().join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// `program args` as a process of `pod` that sees `resolv` as its `/etc/resolv.conf` (a
/// private mount namespace, so nothing else sees the bind mount).
fn with_resolv(pod: &Pod, resolv: &Path, program: &str, args: &[&str]) -> Command {
    let mut cmd = pod.command("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        r#"mount --bind "$0" /etc/resolv.conf && exec "$@""#,
    ]);
    cmd.arg(resolv).arg(program).args(args);
    cmd
}

/// `getent hosts <name>` in `pod`: Ok(addresses) or Err(exit code).
fn getent(pod: &Pod, resolv: &Path, name: &str) -> Result<std::result::Result<Vec<String>, i32>> {
    let out = pod.run(
        &mut with_resolv(pod, resolv, "getent", &["hosts", name]),
        COMMAND,
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match out.status.code() {
        Some(0) => Ok(Ok(stdout
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect())),
        Some(code) => Ok(Err(code)),
        None => bail!("getent hosts {name} was killed: {out:?}"),
    }
}

/// What `dig` reported.
#[derive(Debug)]
struct Dig {
    status: String,
    answers: Vec<String>,
    /// The `;; SERVER:` line: which server dig accepted the answer from, and over what.
    server: String,
    output: String,
    elapsed: Duration,
    code: Option<i32>,
}

fn dig(pod: &Pod, resolv: &Path, args: &[&str]) -> Result<Dig> {
    let mut all = vec!["+time=3", "+tries=1"];
    all.extend_from_slice(args);
    let started = Instant::now();
    let out: Output = pod.run(&mut with_resolv(pod, resolv, "dig", &all), COMMAND)?;
    let elapsed = started.elapsed();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let status = output
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_default()
        .to_owned();
    let answers = output
        .split(";; ANSWER SECTION:\n")
        .nth(1)
        .map(|section| {
            section
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .filter_map(|l| l.split_whitespace().last())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let server = output
        .lines()
        .find_map(|l| l.strip_prefix(";; SERVER: "))
        .unwrap_or_default()
        .to_owned();
    Ok(Dig {
        status,
        answers,
        server,
        output,
        elapsed,
        code: out.status.code(),
    })
}

impl Setup {
    fn client_getent(&self, name: &str) -> Result<std::result::Result<Vec<String>, i32>> {
        getent(&self.client, &self.client_resolv, name)
    }

    /// `dig @10.S.0.53 <args>` in the client.
    fn client_dig(&self, args: &[&str]) -> Result<Dig> {
        let server = format!("@{}", self.cluster_dns);
        let mut all = vec![server.as_str()];
        all.extend_from_slice(args);
        dig(&self.client, &self.client_resolv, &all)
    }

    /// The node's address on its pod bridge: where ztunnel's forwarded queries come from.
    fn node_source(&self) -> Ipv4Addr {
        self.node.gateway()
    }
}

#[test]
fn service_names_resolve_to_vips_and_other_names_are_forwarded() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    require_tools()?;
    let s = setup()?;
    let web = vec![WEB_VIP.to_string()];

    // glibc (getent): the full name and the short forms, through the search path.
    for name in [
        "web.shop.svc.cluster.local",
        "web",
        "web.shop",
        "web.shop.svc",
    ] {
        assert_eq!(
            s.client_getent(name)?,
            Ok(web.clone()),
            "getent hosts {name}"
        );
    }
    assert_eq!(
        s.client_getent("db.legacy")?,
        Ok(vec![DB_VIP.to_string()]),
        "another namespace's service"
    );
    assert_eq!(
        s.client_getent("nope.shop.svc.cluster.local")?,
        Err(GETENT_NOT_FOUND),
        "unknown cluster name"
    );
    assert_eq!(
        s.client_getent("external.example")?,
        Ok(vec![EXTERNAL.to_string()]),
        "external names are forwarded"
    );

    // dig: the answer is accepted as coming from the server it asked, over UDP and TCP.
    let d = s.client_dig(&["web.shop.svc.cluster.local", "A"])?;
    assert_eq!(
        (d.status.as_str(), d.answers.clone()),
        ("NOERROR", web.clone()),
        "{d:?}"
    );
    assert!(
        d.server.starts_with(&format!("{}#53", s.cluster_dns)) && d.server.contains("(UDP)"),
        "{d:?}"
    );
    assert!(d.output.contains(" aa "), "authoritative: {d:?}");
    let d = s.client_dig(&["+tcp", "web.shop.svc.cluster.local", "A"])?;
    assert_eq!(d.answers, web, "{d:?}");
    assert!(d.server.contains("(TCP)"), "{d:?}");
    for short in ["web", "web.shop"] {
        let d = s.client_dig(&[short, "A"])?;
        assert_eq!(
            d.answers, web,
            "dig {short} (sent as is, no search list): {d:?}"
        );
    }
    let d = s.client_dig(&["+search", "web", "A"])?;
    assert_eq!(d.answers, web, "dig +search web: {d:?}");
    let d = s.client_dig(&["web.shop.svc.cluster.local", "AAAA"])?;
    assert_eq!(
        (d.status.as_str(), d.answers.len()),
        ("NOERROR", 0),
        "no IPv6 VIP: {d:?}"
    );
    let d = s.client_dig(&["nope.shop.svc.cluster.local", "A"])?;
    assert_eq!(d.status, "NXDOMAIN", "{d:?}");
    let d = s.client_dig(&["external.example", "A"])?;
    assert_eq!(d.answers, vec![EXTERNAL.to_string()], "{d:?}");
    let d = s.client_dig(&["+tcp", "external.example", "A"])?;
    assert_eq!(d.answers, vec![EXTERNAL.to_string()], "{d:?}");
    let d = s.client_dig(&["unknown.example", "A"])?;
    assert_eq!(
        d.status, "NXDOMAIN",
        "the upstream's NXDOMAIN is passed on: {d:?}"
    );
    // Too big for UDP without EDNS: TC from the upstream reaches dig, which retries over TCP,
    // which the proxy forwards over TCP.
    let d = s.client_dig(&["+noedns", "big.example", "A"])?;
    assert_eq!(d.answers.len(), usize::from(BIG), "{d:?}");
    assert!(
        d.output.contains("Truncated, retrying in TCP mode"),
        "{d:?}"
    );

    // What the upstream saw from ztunnel: only the forwarded names, never a cluster name,
    // and nothing straight from the enrolled pod.
    let node_ip = s.node_source();
    let from_node = s.upstream.names_from(node_ip);
    assert!(from_node.contains("external.example."), "{from_node:?}");
    assert!(
        from_node.iter().all(|n| !n.ends_with("cluster.local.")),
        "cluster names must be answered by the proxy: {from_node:?}"
    );
    assert!(
        s.upstream.names_from(s.client.ip()).is_empty(),
        "the enrolled pod reached the upstream directly: {:?}",
        s.upstream.log()
    );
    assert!(s.upstream.tcp_from(node_ip), "big.example went over TCP");

    // The pod that is not enrolled is untouched: its queries go straight to its nameserver,
    // which knows nothing of the mesh's VIPs.
    assert_eq!(
        getent(&s.plain, &s.plain_resolv, "web.shop.svc.cluster.local")?,
        Ok(vec![DECOY.to_string()]),
    );
    let d = dig(
        &s.plain,
        &s.plain_resolv,
        &["+tcp", "web.shop.svc.cluster.local", "A"],
    )?;
    assert_eq!(d.answers, vec![DECOY.to_string()], "{d:?}");
    assert!(
        s.upstream
            .names_from(s.plain.ip())
            .contains("web.shop.svc.cluster.local."),
        "{:?}",
        s.upstream.log()
    );
    Ok(())
}

#[test]
fn dns_follows_config_changes_fails_fast_without_ztunnel_and_recovers() -> Result<()> {
    harness::skip_or_fail!(Ok(()));
    require_tools()?;
    let mut s = setup()?;

    // A new service resolves once the config is saved.
    let late = service("late", "shop", LATE_VIP)?;
    s.cluster.edit_config(|c| c.services.push(late));
    s.cluster.write_config()?;
    let answer = wait_for(LONG, || {
        s.client_dig(&["late.shop.svc.cluster.local", "A"])
            .ok()
            .filter(|d| d.answers == vec![LATE_VIP.to_string()])
    });
    ensure!(answer.is_ok(), "late.shop never resolved to {LATE_VIP}");

    // Hostile input straight at the proxy's socket in the pod: garbage, a datagram larger
    // than any query, a flood of queries; ztunnel stays up and keeps answering.
    flood(&s.client)?;
    ensure!(s.zt.is_running(), "ztunnel died: {}", s.zt.tail(40));
    // The flood may still fill the socket's receive buffer, where a query can be dropped like
    // any datagram; a resolver asks again, and so does this.
    let answer = wait_for(LONG, || {
        s.client_dig(&["web", "A"])
            .ok()
            .filter(|d| d.answers == vec![WEB_VIP.to_string()])
    });
    ensure!(
        answer.is_ok(),
        "no answer after the flood: {}",
        s.zt.tail(40)
    );
    ensure!(s.zt.is_running(), "ztunnel died: {}", s.zt.tail(40));

    // ztunnel dies: DNS fails at once (EPERM from the kernel), it does not time out.
    s.zt.kill9()?;
    let d = s.client_dig(&["web.shop.svc.cluster.local", "A"])?;
    assert!(d.answers.is_empty() && d.code != Some(0), "{d:?}");
    assert!(
        d.elapsed < Duration::from_secs(2),
        "dig took {:?}: {d:?}",
        d.elapsed
    );
    let started = Instant::now();
    let getent = s.client_getent("web.shop.svc.cluster.local")?;
    assert!(getent.is_err(), "{getent:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "getent took {:?}: it must fail fast, not wait out timeouts",
        started.elapsed()
    );
    assert!(
        s.upstream.names_from(s.client.ip()).is_empty(),
        "a query left the pod while ztunnel was down: {:?}",
        s.upstream.log()
    );

    // A restarted ztunnel serves DNS again.
    s.zt.restart()?;
    s.zt.wait_ready(LONG)?;
    let answer = wait_for(LONG, || {
        s.client_dig(&["web", "A"])
            .ok()
            .filter(|d| d.answers == vec![WEB_VIP.to_string()])
    });
    ensure!(answer.is_ok(), "DNS did not come back after the restart");
    assert_eq!(s.client_getent("web")?, Ok(vec![WEB_VIP.to_string()]));

    // Opting the pod out hands its DNS back: a query to the upstream goes straight there.
    let upstream_ip = s.upstream.addr.ip().to_string();
    let at_upstream = format!("@{upstream_ip}");
    let d = dig(
        &s.client,
        &s.client_resolv,
        &[&at_upstream, "web.shop.svc.cluster.local"],
    )?;
    assert_eq!(
        d.answers,
        vec![WEB_VIP.to_string()],
        "enrolled: the proxy answers: {d:?}"
    );
    s.cluster
        .set_pod_label(&s.client, "ambit.dev/dataplane-mode", Some("none"))?;
    s.cluster.write_config()?;
    let answer = wait_for(LONG, || {
        dig(
            &s.client,
            &s.client_resolv,
            &[&at_upstream, "web.shop.svc.cluster.local"],
        )
        .ok()
        .filter(|d| d.answers == vec![DECOY.to_string()])
    });
    ensure!(answer.is_ok(), "the opted-out pod's DNS is still proxied");
    Ok(())
}

/// Sends hostile datagrams and connections to the proxy from inside `pod`'s namespace.
fn flood(pod: &Pod) -> Result<()> {
    harness::netns::run_in_netns(&pod.netns_path(), || -> Result<()> {
        let proxy: SocketAddr = "127.0.0.1:15053".parse()?;
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        udp.send_to(b"\x00\x01", proxy)?;
        udp.send_to(&[0xff; 60_000], proxy)?;
        let mut query = Message::query();
        query.metadata.recursion_desired = true;
        for i in 0..2_000u16 {
            query.metadata.id = i;
            query.queries.clear();
            query.add_query(hickory_proto::op::Query::query(
                format!("flood{i}.example.").parse()?,
                RecordType::A,
            ));
            udp.send_to(&query.to_vec()?, proxy)?;
        }
        // TCP: a lying length prefix, and more idle connections than the proxy keeps.
        let mut conns = Vec::new();
        for _ in 0..100 {
            if let Ok(mut c) = std::net::TcpStream::connect(proxy) {
                let _ = std::io::Write::write_all(&mut c, &[0xff, 0xff, 1, 2, 3]);
                conns.push(c);
            }
        }
        Ok(())
    })?
}

fn require_tools() -> Result<()> {
    for (tool, arg) in [
        ("dig", "-v"),
        ("getent", "--version"),
        ("unshare", "--version"),
    ] {
        let ok = Command::new(tool)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            bail!(
                "`{tool}` is needed for the DNS scenarios (dig: apt-get install dnsutils; \
                 getent: libc-bin; unshare: util-linux)"
            );
        }
    }
    Ok(())
}

// === the upstream DNS server ===

/// One query the upstream got.
#[derive(Debug, Clone)]
struct Seen {
    name: String,
    from: SocketAddr,
    tcp: bool,
}

/// A DNS server on port 53 in a pod of the cluster, run by test threads.
struct Upstream {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Upstream {
    fn start(pod: &Pod) -> Result<Upstream> {
        let (udp, tcp) = harness::netns::run_in_netns(&pod.netns_path(), || {
            Ok::<_, std::io::Error>((
                UdpSocket::bind("0.0.0.0:53")?,
                TcpListener::bind("0.0.0.0:53")?,
            ))
        })??;
        udp.set_read_timeout(Some(Duration::from_millis(100)))?;
        tcp.set_nonblocking(true)?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            let (log, stop) = (log.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = udp.recv_from(&mut buf) else {
                        continue;
                    };
                    if let Some(reply) = answer(&buf[..n], from, false, &log) {
                        let _ = udp.send_to(&reply, from);
                    }
                }
            }));
        }
        {
            let (log, stop) = (log.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((stream, from)) => serve_tcp(stream, from, &log),
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            }));
        }
        Ok(Upstream {
            addr: SocketAddr::from((pod.ip(), 53)),
            log,
            stop,
            threads,
        })
    }

    fn log(&self) -> Vec<Seen> {
        self.log.lock().clone()
    }

    /// Names asked from `ip`, lowercase, with the root dot.
    fn names_from(&self, ip: Ipv4Addr) -> BTreeSet<String> {
        self.log()
            .into_iter()
            .filter(|s| s.from.ip() == ip)
            .map(|s| s.name)
            .collect()
    }

    fn tcp_from(&self, ip: Ipv4Addr) -> bool {
        self.log().iter().any(|s| s.tcp && s.from.ip() == ip)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One TCP connection: queries answered in order until the client closes it.
fn serve_tcp(mut stream: std::net::TcpStream, from: SocketAddr, log: &Mutex<Vec<Seen>>) {
    use std::io::{Read, Write};
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    loop {
        let mut len = [0u8; 2];
        if stream.read_exact(&mut len).is_err() {
            return;
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if stream.read_exact(&mut query).is_err() {
            return;
        }
        let Some(reply) = answer(&query, from, true, log) else {
            return;
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        if stream.write_all(&len.to_be_bytes()).is_err() || stream.write_all(&reply).is_err() {
            return;
        }
    }
}

/// The upstream's answer to one query, recorded in `log`.
fn answer(query: &[u8], from: SocketAddr, tcp: bool, log: &Mutex<Vec<Seen>>) -> Option<Vec<u8>> {
    let query = Message::from_vec(query).ok()?;
    let question = query.queries.first()?.clone();
    let name = question.name().to_lowercase().to_ascii();
    log.lock().push(Seen {
        name: name.clone(),
        from,
        tcp,
    });
    let mut reply = Message::response(query.metadata.id, OpCode::Query);
    reply.metadata.message_type = MessageType::Response;
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(question.clone());
    if let Some(edns) = &query.edns {
        reply.set_edns(edns.clone());
    }
    let a = |ip: Ipv4Addr| Record::from_rdata(question.name().clone(), 60, RData::A(A(ip)));
    let is_a = question.query_type() == RecordType::A;
    match name.as_str() {
        "external.example." if is_a => {
            reply.add_answer(a(EXTERNAL));
        }
        "web.shop.svc.cluster.local." if is_a => {
            reply.add_answer(a(DECOY));
        }
        "big.example." if is_a => {
            for i in 0..BIG {
                reply.add_answer(a(Ipv4Addr::new(198, 51, 100, i + 1)));
            }
        }
        "external.example." | "web.shop.svc.cluster.local." | "big.example." => {}
        _ => reply.metadata.response_code = ResponseCode::NXDomain,
    }
    let bytes = reply.to_vec().ok()?;
    let limit = usize::from(query.max_payload());
    if !tcp && bytes.len() > limit {
        return reply.truncate().to_vec().ok();
    }
    Some(bytes)
}
