//! DNS redirection against the real kernel, on the same lab as
//! `capture_end_to_end`: the test plays ztunnel's DNS proxy (a UDP socket
//! and a TCP listener on 127.0.0.1:15053 in the pod netns) and a DNS server
//! behind the peer IP, and checks where each of the pod's queries lands and
//! what address the pod sees its replies come from.
//!
//! The payloads are tokens, not DNS messages: the kernel programs look at
//! addresses and ports only.

use std::net::UdpSocket;

use ambit_ebpf::{DNS_PORT, DNS_PROXY_PORT, DnsCapture};

use super::*;

/// How long a responder waits for the datagram it expects.
const DATAGRAM_TIMEOUT: Duration = Duration::from_secs(5);

#[test]
fn dns_redirect_end_to_end() {
    if let Some(reason) = missing_prerequisite() {
        if env::var("CI").as_deref() == Ok("true") {
            panic!("DNS capture test cannot run under CI=true: {reason}");
        }
        eprintln!("dns_redirect_end_to_end NOT RUN: {reason} (set CI=true to make this a failure)");
        return;
    }
    let lab = Lab::new();
    let cfg = CaptureConfig {
        pin_dir: lab.bpffs.dir.join("ztunnel"),
        cgroup: lab.cgroup.clone(),
    };
    // The pod's DNS server: UDP and TCP on the peer. Nothing may reach it
    // while the pod's DNS is proxied.
    let server_udp = in_netns(&lab.peer.file, || udp_socket("0.0.0.0", DNS_PORT, None));
    let server_udp6 = in_netns(&lab.peer.file, || udp_socket("::", DNS_PORT, None));
    let server_tcp = in_netns(&lab.peer.file, || {
        listener("0.0.0.0", DNS_PORT, None, false)
    });
    let server = SocketAddr::from((PEER_IP, DNS_PORT));
    let server6 = SocketAddr::from((PEER_IP6, DNS_PORT));

    let mut z = Ztunnel::start(&lab, &cfg);

    // (1) Enrolled, but no DNS proxy registered: DNS goes where the app
    // says, over UDP, and over TCP it is captured like any TCP connection.
    let (outcome, seen) = lab.udp_query(&udp(server), &server_udp);
    assert_eq!(seen.map(|s| s.ip()), Some(IpAddr::V4(POD_IP)), "{outcome}");
    assert_reply_from(&outcome, server);
    let (_, local, _) = lab.pod_connect(&Connect::to(server), &z.outbound);
    assert_eq!(local, server, "TCP/53 without a DNS proxy goes to 15001");
    let (outcome, seen) = lab.udp_query(&udp(server6), &server_udp6);
    assert_eq!(seen.map(|s| s.ip()), Some(IpAddr::V6(POD_IP6)), "{outcome}");
    assert_reply_from(&outcome, server6);

    // (2) ztunnel registers the pod's DNS proxy.
    let mut proxy = DnsProxy::open(&lab);
    proxy.enroll(&lab, &mut z);
    assert_eq!(
        bpftool_map_len(&cfg, "dns_listeners"),
        2,
        "dns_listeners after enroll_dns (one socket per family)"
    );

    // Connected UDP (glibc, dig): lands on the proxy; the reply is seen
    // from the server the app asked, and so is the socket's peer, and the
    // socket's own address is the pod IP as it would have been.
    let (outcome, seen) = lab.udp_query(&udp(server), &proxy.udp);
    assert!(seen.is_some_and(|s| s.ip().is_loopback()), "{outcome}");
    let reply = assert_reply_from(&outcome, server);
    assert_eq!(reply.peer.as_deref(), Some(server.to_string().as_str()));
    assert_eq!(
        reply.local.ip(),
        IpAddr::V4(POD_IP),
        "getsockname: {outcome}"
    );
    assert_nothing_received(&server_udp, "server :53 while DNS is proxied");

    // Unconnected UDP (musl): the first datagram of a fresh socket is
    // redirected too.
    let (outcome, _) = lab.udp_query(&udp_sendto(server), &proxy.udp);
    let reply = assert_reply_from(&outcome, server);
    assert_eq!(reply.peer, None, "unconnected socket has no peer");
    assert_nothing_received(&server_udp, "server :53 (sendto)");

    // Dual-stack socket, v4-mapped server: the connect6/sendmsg6 path.
    let mapped = SocketAddr::new(IpAddr::V6(PEER_IP.to_ipv6_mapped()), DNS_PORT);
    for proto in [Proto::Udp, Proto::UdpSendto] {
        let mut query = udp(server);
        query.proto = proto;
        query.ipv6 = true;
        let (outcome, _) = lab.udp_query(&query, &proxy.udp);
        let reply = assert_reply_from(&outcome, mapped);
        if proto == Proto::Udp {
            let pod6 = IpAddr::V6(POD_IP.to_ipv6_mapped());
            assert_eq!(reply.local.ip(), pod6, "getsockname: {outcome}");
        }
    }
    assert_nothing_received(&server_udp, "server :53 (v4-mapped)");

    // A socket bound to the pod IP: the redirected datagram comes from the
    // pod IP, and the proxy's reply still reaches it.
    let mut bound = udp(server);
    bound.bind = Some(IpAddr::V4(POD_IP));
    let (outcome, seen) = lab.udp_query(&bound, &proxy.udp);
    assert_eq!(seen.map(|s| s.ip()), Some(IpAddr::V4(POD_IP)), "{outcome}");
    assert_reply_from(&outcome, server);

    // TCP: the proxy's listener accepts it and the app's peer is the server.
    let (_, local, _) = lab.pod_connect(&Connect::to(server), &proxy.tcp);
    assert_eq!(local, proxy.addr());
    let outcome = lab.run_in_pod(&Connect::to(server));
    assert!(
        outcome.ends_with(&format!(" {server}")),
        "TCP getpeername() must show the server: {outcome}"
    );
    assert!(
        outcome.starts_with(&format!("ok {POD_IP}:")),
        "TCP getsockname() must show the pod IP: {outcome}"
    );
    drain_accepts(&proxy.tcp);
    // Bound to the pod IP: the SYN on lo comes from the pod IP to
    // 127.0.0.1, which sk_lookup must not take for outbound traffic.
    let mut bound_tcp = Connect::to(server);
    bound_tcp.bind = Some(IpAddr::V4(POD_IP));
    let (_, local, remote) = lab.pod_connect(&bound_tcp, &proxy.tcp);
    assert_eq!((local, remote.ip()), (proxy.addr(), IpAddr::V4(POD_IP)));
    assert_nothing_accepted(&z.outbound, "15001 for TCP/53 to the proxy");
    assert_nothing_accepted(&server_tcp, "server TCP :53 while DNS is proxied");

    // Native IPv6: the IPv6 proxy on [::1]:15053; the app sees the reply
    // from the server it asked, and its own address is the pod's IPv6.
    for proto in [Proto::Udp, Proto::UdpSendto] {
        let mut query = udp(server6);
        query.proto = proto;
        let (outcome, seen) = lab.udp_query(&query, &proxy.udp6);
        assert!(seen.is_some_and(|s| s.ip().is_loopback()), "{outcome}");
        let reply = assert_reply_from(&outcome, server6);
        if proto == Proto::Udp {
            assert_eq!(
                reply.local.ip(),
                IpAddr::V6(POD_IP6),
                "getsockname: {outcome}"
            );
            assert_eq!(reply.peer.as_deref(), Some(server6.to_string().as_str()));
        }
    }
    assert_nothing_received(&server_udp6, "server [::]:53 (native IPv6 leaked)");
    let (_, local, _) = lab.pod_connect(&Connect::to(server6), &proxy.tcp6);
    assert_eq!(local, proxy.addr6());

    // Not DNS, or not to be proxied: untouched.
    let mut own = udp(server);
    own.mark = Some(ZTUNNEL_MARK);
    let (outcome, _) = lab.udp_query(&own, &server_udp);
    assert_reply_from(&outcome, server);
    let other_port = in_netns(&lab.peer.file, || udp_socket("0.0.0.0", 5353, None));
    let (outcome, _) = lab.udp_query(&udp(SocketAddr::from((PEER_IP, 5353))), &other_port);
    assert_reply_from(&outcome, SocketAddr::from((PEER_IP, 5353)));
    let pod_dns = in_netns(&lab.pod.file, || udp_socket("0.0.0.0", DNS_PORT, None));
    for dst in [Ipv4Addr::LOCALHOST, POD_IP] {
        let dst = SocketAddr::from((dst, DNS_PORT));
        let (outcome, _) = lab.udp_query(&udp(dst), &pod_dns);
        assert_reply_from(&outcome, dst);
    }
    assert_nothing_received(&proxy.udp, "proxy for traffic it must not get");

    // (3) The proxy's socket closes while ztunnel lives (DNS proxying off):
    // the kernel drops it from the map and DNS goes where the app says.
    drop(proxy);
    wait_until("the closed DNS socket to leave dns_listeners", || {
        bpftool_map_len(&cfg, "dns_listeners") == 0
    });
    let (outcome, _) = lab.udp_query(&udp(server), &server_udp);
    assert_reply_from(&outcome, server);
    let mut proxy = DnsProxy::open(&lab);
    proxy.enroll(&lab, &mut z);
    let (outcome, _) = lab.udp_query(&udp(server), &proxy.udp);
    assert_reply_from(&outcome, server);

    // (4) ztunnel dies: every DNS query fails at once with EPERM, none
    // reaches the server.
    drop(proxy);
    drop(z);
    for (what, query) in [
        ("connected UDP", udp(server)),
        ("unconnected UDP", udp_sendto(server)),
        ("TCP", Connect::to(server)),
        ("native IPv6 UDP", udp(server6)),
        ("native IPv6 TCP", Connect::to(server6)),
    ] {
        let outcome = lab.run_in_pod(&query);
        assert_refused_fast(&outcome, what);
    }
    assert_nothing_received(&server_udp, "server :53 while ztunnel is down");
    assert_nothing_received(&server_udp6, "server [::]:53 while ztunnel is down");
    assert_nothing_accepted(&server_tcp, "server TCP :53 while ztunnel is down");

    // (5) A restarted ztunnel adopts the pins and proxies again.
    let capture = Capture::load_or_adopt(&cfg).expect("load_or_adopt after crash");
    let mut z = Ztunnel::with_capture(&lab, capture);
    let mut proxy = DnsProxy::open(&lab);
    proxy.enroll(&lab, &mut z);
    let (outcome, _) = lab.udp_query(&udp_sendto(server), &proxy.udp);
    assert_reply_from(&outcome, server);

    // (6) Unenroll removes the DNS entry with everything else.
    z.capture.unenroll(z.cookie()).expect("unenroll");
    assert_eq!(bpftool_map_len(&cfg, "dns_listeners"), 0);
    let (outcome, _) = lab.udp_query(&udp(server), &server_udp);
    assert_reply_from(&outcome, server);
    assert_nothing_received(&proxy.udp, "proxy after unenroll");

    let Ztunnel { capture, .. } = z;
    drop(proxy);
    capture.remove_all().expect("remove_all");
    assert!(!cfg.pin_dir.join("maps").exists());
}

/// ztunnel's per-pod DNS sockets, on loopback:15053 of each family in the
/// pod netns.
struct DnsProxy {
    udp: UdpSocket,
    tcp: TcpListener,
    udp6: UdpSocket,
    tcp6: TcpListener,
}

impl DnsProxy {
    fn open(lab: &Lab) -> Self {
        in_netns(&lab.pod.file, || Self {
            udp: udp_socket("127.0.0.1", DNS_PROXY_PORT, Some(ZTUNNEL_MARK)),
            tcp: listener("127.0.0.1", DNS_PROXY_PORT, Some(ZTUNNEL_MARK), false),
            udp6: udp_socket("::1", DNS_PROXY_PORT, Some(ZTUNNEL_MARK)),
            tcp6: listener("::1", DNS_PROXY_PORT, Some(ZTUNNEL_MARK), false),
        })
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, DNS_PROXY_PORT))
    }

    fn addr6(&self) -> SocketAddr {
        SocketAddr::from((Ipv6Addr::LOCALHOST, DNS_PROXY_PORT))
    }

    fn enroll(&mut self, lab: &Lab, z: &mut Ztunnel) {
        let cookie = netns_cookie(self.udp.as_fd()).expect("netns cookie");
        // A socket from another netns is refused, naming the fix.
        let stray = in_netns(&lab.peer.file, || udp_socket("127.0.0.1", 0, None));
        let err = z
            .capture
            .enroll_dns(&DnsCapture {
                netns_cookie: cookie,
                v4: Some((IpAddr::V4(POD_IP), stray.as_fd())),
                v6: None,
            })
            .expect_err("DNS socket from another netns");
        assert!(err.to_string().contains("setns"), "{err}");
        z.capture
            .enroll_dns(&DnsCapture {
                netns_cookie: cookie,
                v4: Some((IpAddr::V4(POD_IP), self.udp.as_fd())),
                v6: Some((IpAddr::V6(POD_IP6), self.udp6.as_fd())),
            })
            .expect("enroll_dns");
    }
}

/// A bound UDP socket with a read timeout, made in the current netns.
fn udp_socket(ip: &str, port: u16, mark: Option<u32>) -> UdpSocket {
    let ip: IpAddr = ip.parse().expect("bind address");
    let addr = SocketAddr::new(ip, port);
    let sock =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).expect("socket");
    if addr.is_ipv6() {
        sock.set_only_v6(true).expect("IPV6_V6ONLY");
    }
    sock.set_reuse_address(true).expect("SO_REUSEADDR");
    if let Some(mark) = mark {
        sock.set_mark(mark).expect("SO_MARK");
    }
    sock.bind(&SockAddr::from(addr))
        .unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
    let sock: UdpSocket = sock.into();
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("read timeout");
    sock
}

fn udp(dst: SocketAddr) -> Connect {
    let mut c = Connect::to(dst);
    c.proto = Proto::Udp;
    c
}

fn udp_sendto(dst: SocketAddr) -> Connect {
    let mut c = Connect::to(dst);
    c.proto = Proto::UdpSendto;
    c
}

/// A child's successful UDP exchange: `ok <local> <from> <peer|-> <reply>`.
#[derive(Debug)]
struct UdpReply {
    local: SocketAddr,
    from: SocketAddr,
    peer: Option<String>,
    reply: String,
}

impl UdpReply {
    fn parse(outcome: &str) -> Option<Self> {
        let mut parts = outcome.strip_prefix("ok ")?.splitn(4, ' ');
        let local = parts.next()?.parse().ok()?;
        let from = parts.next()?.parse().ok()?;
        let peer = parts.next().filter(|p| *p != "-").map(str::to_owned);
        let reply = parts.next()?.to_owned();
        Some(Self {
            local,
            from,
            peer,
            reply,
        })
    }
}

/// The child got the responder's reply, seen as coming from `from`.
fn assert_reply_from(outcome: &str, from: SocketAddr) -> UdpReply {
    let reply = UdpReply::parse(outcome).unwrap_or_else(|| panic!("UDP query failed: {outcome}"));
    assert!(reply.reply.starts_with("re:"), "{outcome}");
    assert_eq!(
        reply.from, from,
        "reply source as the app sees it: {outcome}"
    );
    reply
}

/// The child's query was refused with EPERM, at once.
fn assert_refused_fast(outcome: &str, what: &str) {
    let failure = ConnectFailure::parse(outcome)
        .unwrap_or_else(|| panic!("{what}: expected a refusal, got: {outcome}"));
    assert!(
        failure.errno == libc::EPERM,
        "{what}: expected EPERM, got: {outcome}"
    );
    assert!(
        failure.elapsed < FAIL_FAST,
        "{what}: took {:?}: {outcome}",
        failure.elapsed
    );
}

fn assert_nothing_received(sock: &UdpSocket, what: &str) {
    sock.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 512];
    let got = sock.recv_from(&mut buf);
    sock.set_nonblocking(false).expect("blocking");
    if let Ok((n, from)) = got {
        panic!(
            "{what}: unexpected datagram from {from}: {:?}",
            String::from_utf8_lossy(buf.get(..n).unwrap_or_default())
        );
    }
}

fn drain_accepts(listener: &TcpListener) {
    while accept_within(listener, Duration::from_millis(200)).is_some() {}
}

fn bpftool_map_len(cfg: &CaptureConfig, map: &str) -> usize {
    let path = cfg.pin_dir.join("maps").join(map);
    bpftool(&["map", "dump", "pinned", &path.to_string_lossy()])
        .as_array()
        .map_or(0, Vec::len)
}

impl Lab {
    /// A pod child sends a UDP token as told while `responder` waits for it
    /// and answers `re:<token>`. Returns the child's result line and the
    /// source address the responder saw (None if the token never came).
    fn udp_query(&self, query: &Connect, responder: &UdpSocket) -> (String, Option<SocketAddr>) {
        let mut query = query.clone();
        query.token = format!(
            "d{:x}",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        thread::scope(|s| {
            let token = query.token.clone();
            let seen = s.spawn(move || answer_one(responder, &token));
            let outcome = self.run_in_pod(&query);
            let seen = seen.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
            (outcome, seen)
        })
    }
}

/// Waits for the datagram carrying `token`, answers it, and returns its
/// source. Other datagrams are reported: they are someone else's query
/// landing in the wrong place.
fn answer_one(sock: &UdpSocket, token: &str) -> Option<SocketAddr> {
    let deadline = Instant::now() + DATAGRAM_TIMEOUT;
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let got = buf.get(..n).unwrap_or_default();
                assert_eq!(
                    String::from_utf8_lossy(got),
                    token,
                    "unexpected datagram from {from}"
                );
                sock.send_to(format!("re:{token}").as_bytes(), from)
                    .expect("reply");
                return Some(from);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("recv_from: {e}"),
        }
    }
    None
}
