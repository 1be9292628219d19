//! The DNS proxy in-process: decisions on crafted and hostile messages, the forwarder against
//! a fake upstream on loopback, and the per-pod servers over real UDP and TCP sockets.
//!
//! Everything listens on 127.0.0.1 with ephemeral ports. Forwarding uses ztunnel's marked
//! sockets, and `SO_MARK` needs root; without it those tests say so and return.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ambit_shared::config::Config;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;

use super::forward::Timeouts;
use super::message::{self, Decision, Transport};
use super::server::{self, MAX_IN_FLIGHT, MAX_TCP_CONNECTIONS, PodDns};
use super::{DnsError, DnsProxy, parse_domain};

const CONFIG: &str = r#"
trustDomain: cluster.local
namespaces: [{ name: shop }, { name: legacy }]
services:
  - { name: web, namespace: shop, vips: [10.96.0.10], ports: [{ port: 80 }], selector: { app: x } }
  - { name: dual, namespace: shop, vips: [10.96.0.11, "fd00::11"], ports: [{ port: 80 }], selector: { app: x } }
  - name: many
    namespace: shop
    ports: [{ port: 80 }]
    selector: { app: many }
    vips: [ 10.96.1.1, 10.96.1.2, 10.96.1.3, 10.96.1.4, 10.96.1.5, 10.96.1.6, 10.96.1.7,
      10.96.1.8, 10.96.1.9, 10.96.1.10, 10.96.1.11, 10.96.1.12, 10.96.1.13, 10.96.1.14,
      10.96.1.15, 10.96.1.16, 10.96.1.17, 10.96.1.18, 10.96.1.19, 10.96.1.20, 10.96.1.21,
      10.96.1.22, 10.96.1.23, 10.96.1.24, 10.96.1.25, 10.96.1.26, 10.96.1.27, 10.96.1.28,
      10.96.1.29, 10.96.1.30, 10.96.1.31, 10.96.1.32, 10.96.1.33, 10.96.1.34, 10.96.1.35 ]
"#;

/// The fake upstream's answer for `external.example.`.
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
/// Short timeouts, so "the upstream never answers" takes a moment, not seconds.
const FAST: Timeouts = Timeouts {
    udp_attempt: Duration::from_millis(300),
    tcp_attempt: Duration::from_millis(500),
    deadline: Duration::from_millis(900),
};

fn config() -> watch::Receiver<Arc<Config>> {
    let config = ambit_shared::config::parse_str(std::path::Path::new("test.yaml"), CONFIG)
        .expect("the test config is valid");
    watch::channel(Arc::new(config)).1
}

fn proxy(upstreams: Vec<SocketAddr>) -> Arc<DnsProxy> {
    Arc::new(
        DnsProxy::with_upstreams("cluster.local", config(), upstreams, FAST).expect("valid domain"),
    )
}

fn pod(proxy: Arc<DnsProxy>) -> PodDns {
    PodDns::new(proxy, "shop".into(), "shop/client".into())
}

fn query(name: &str, qtype: RecordType) -> Message {
    let mut q = Message::query();
    q.metadata.id = 0x1234;
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(
        Name::from_ascii(name).expect("test name parses"),
        qtype,
    ));
    q
}

fn bytes(message: &Message) -> Vec<u8> {
    message.to_vec().expect("test message encodes")
}

fn with_edns(mut message: Message, payload: u16) -> Message {
    let mut edns = Edns::new();
    edns.set_max_payload(payload);
    message.set_edns(edns);
    message
}

fn decide(pod: &PodDns, raw: &[u8], transport: Transport) -> Decision {
    message::decide(
        raw,
        transport,
        &pod.proxy.catalog,
        &pod.proxy.zone,
        &pod.namespace,
    )
}

/// The answer the proxy made itself, parsed.
fn local(pod: &PodDns, q: &Message, transport: Transport) -> Message {
    match decide(pod, &bytes(q), transport) {
        Decision::Reply(reply) => Message::from_vec(&reply.bytes).expect("answers parse"),
        other => panic!("expected a local answer, got {other:?}"),
    }
}

fn a_records(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

fn has_mark_privilege() -> bool {
    let ok = nix::unistd::geteuid().is_root();
    if !ok {
        eprintln!("NOT RUN: forwarding uses SO_MARK, which needs root");
    }
    ok
}

// === decisions ===

#[test]
fn service_names_get_their_vips_with_the_querys_id_and_flags() {
    let pod = pod(proxy(Vec::new()));
    for name in [
        "web.shop.svc.cluster.local.",
        "WEB.shop.svc.Cluster.Local.",
        "web.",
        "web.shop.",
        "web.shop.svc.",
    ] {
        let answer = local(&pod, &query(name, RecordType::A), Transport::Udp);
        assert_eq!(answer.metadata.id, 0x1234, "{name}");
        assert_eq!(answer.metadata.message_type, MessageType::Response);
        assert!(answer.metadata.authoritative && answer.metadata.recursion_desired);
        assert!(answer.metadata.recursion_available);
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert_eq!(
            a_records(&answer),
            vec![Ipv4Addr::new(10, 96, 0, 10)],
            "{name}"
        );
        let record = &answer.answers[0];
        assert_eq!(record.ttl, message::LOCAL_TTL);
        // Owned by the name exactly as asked, so resolvers match it to their question.
        assert!(
            record
                .name
                .eq_case(&Name::from_ascii(name).expect("parses"))
        );
        assert_eq!(answer.queries, query(name, RecordType::A).queries);
    }
}

#[test]
fn aaaa_and_other_types_of_a_service_are_empty_with_the_soa() {
    let pod = pod(proxy(Vec::new()));
    let answer = local(
        &pod,
        &query("web.shop.svc.cluster.local.", RecordType::AAAA),
        Transport::Udp,
    );
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert!(answer.answers.is_empty());
    assert_eq!(answer.authorities.len(), 1);
    assert_eq!(answer.authorities[0].record_type(), RecordType::SOA);
    assert_eq!(answer.authorities[0].name.to_ascii(), "cluster.local.");

    let dual = local(
        &pod,
        &query("dual.shop.svc.cluster.local.", RecordType::AAAA),
        Transport::Udp,
    );
    assert_eq!(dual.answers.len(), 1);
    assert!(matches!(&dual.answers[0].data, RData::AAAA(_)));
    let any = local(&pod, &query("dual.", RecordType::ANY), Transport::Udp);
    assert_eq!(any.answers.len(), 2);
    let mx = local(&pod, &query("web.", RecordType::MX), Transport::Udp);
    assert!(mx.answers.is_empty() && mx.metadata.response_code == ResponseCode::NoError);
}

#[test]
fn unknown_cluster_names_are_nxdomain_and_parents_are_empty() {
    let pod = pod(proxy(Vec::new()));
    for name in [
        "nope.shop.svc.cluster.local.",
        "web.shop.shop.svc.cluster.local.",
        "example.com.shop.svc.cluster.local.",
    ] {
        let answer = local(&pod, &query(name, RecordType::A), Transport::Udp);
        assert_eq!(
            answer.metadata.response_code,
            ResponseCode::NXDomain,
            "{name}"
        );
        assert!(answer.metadata.authoritative);
        assert_eq!(
            answer.authorities.len(),
            1,
            "{name}: SOA for negative caching"
        );
    }
    for name in ["svc.cluster.local.", "shop.svc.cluster.local."] {
        let answer = local(&pod, &query(name, RecordType::A), Transport::Udp);
        assert_eq!(
            answer.metadata.response_code,
            ResponseCode::NoError,
            "{name}"
        );
        assert!(answer.answers.is_empty());
    }
    let soa = local(
        &pod,
        &query("cluster.local.", RecordType::SOA),
        Transport::Udp,
    );
    assert_eq!(soa.answers.len(), 1);
}

#[test]
fn other_names_and_classes_are_forwarded_as_sent() {
    let pod = pod(proxy(Vec::new()));
    for name in ["external.example.", "nope.", "www.example.com."] {
        let q = query(name, RecordType::A);
        match decide(&pod, &bytes(&q), Transport::Udp) {
            Decision::Forward(f) => {
                assert_eq!(f.raw, bytes(&q));
                assert_eq!(f.udp_limit, 512);
            }
            other => panic!("{name}: expected forwarding, got {other:?}"),
        }
    }
    let mut chaos = query("web.shop.svc.cluster.local.", RecordType::TXT);
    chaos.queries[0].set_query_class(DNSClass::CH);
    assert!(matches!(
        decide(&pod, &bytes(&chaos), Transport::Udp),
        Decision::Forward(_)
    ));
    let edns = with_edns(query("external.example.", RecordType::A), 8192);
    match decide(&pod, &bytes(&edns), Transport::Udp) {
        Decision::Forward(f) => assert_eq!(f.udp_limit, message::MAX_UDP_RESPONSE),
        other => panic!("expected forwarding, got {other:?}"),
    }
}

#[test]
fn answers_respect_the_clients_size_limit() {
    let pod = pod(proxy(Vec::new()));
    let q = query("many.shop.svc.cluster.local.", RecordType::A);
    // 35 A records do not fit in 512 bytes: over plain UDP the answer is truncated...
    let udp = match decide(&pod, &bytes(&q), Transport::Udp) {
        Decision::Reply(r) => r.bytes,
        other => panic!("{other:?}"),
    };
    assert!(udp.len() <= 512, "{} bytes", udp.len());
    let udp = Message::from_vec(&udp).expect("parses");
    assert!(udp.metadata.truncation && udp.answers.is_empty());
    assert_eq!(udp.metadata.id, 0x1234);
    // ...with EDNS it fits, and over TCP it always does.
    let edns = local(&pod, &with_edns(q.clone(), 1232), Transport::Udp);
    assert_eq!(edns.answers.len(), 35);
    assert!(!edns.metadata.truncation);
    assert!(edns.edns.is_some(), "EDNS in, EDNS out");
    let tcp = local(&pod, &q, Transport::Tcp);
    assert_eq!(tcp.answers.len(), 35);
}

#[test]
fn malformed_and_unexpected_messages_never_get_more_than_a_header() {
    let pod = pod(proxy(Vec::new()));
    let drop = |raw: &[u8]| matches!(decide(&pod, raw, Transport::Udp), Decision::Drop(_));
    assert!(drop(&[]));
    assert!(drop(&[0x12, 0x34, 0x01]));
    assert!(drop(&[0u8; message::MAX_QUERY + 1]));
    // A response is never answered (no loops between two DNS speakers).
    let mut response = query("web.", RecordType::A);
    response.metadata.message_type = MessageType::Response;
    assert!(drop(&bytes(&response)));

    let rcode = |raw: &[u8]| match decide(&pod, raw, Transport::Udp) {
        Decision::Reply(r) => {
            assert_eq!(r.bytes.get(..2), raw.get(..2), "same ID");
            Message::from_vec(&r.bytes)
                .expect("parses")
                .metadata
                .response_code
        }
        other => panic!("expected an error answer, got {other:?}"),
    };
    let mut notify = query("web.", RecordType::SOA);
    notify.metadata.op_code = OpCode::Notify;
    assert_eq!(rcode(&bytes(&notify)), ResponseCode::NotImp);
    let mut two = query("web.", RecordType::A);
    two.add_query(Query::query(
        Name::from_ascii("dual.").expect("parses"),
        RecordType::A,
    ));
    assert_eq!(rcode(&bytes(&two)), ResponseCode::FormErr);
    let mut none = query("web.", RecordType::A);
    none.queries.clear();
    assert_eq!(rcode(&bytes(&none)), ResponseCode::FormErr);
    // A header that promises a question that is not there.
    let mut cut = bytes(&query("web.", RecordType::A));
    cut.truncate(14);
    assert_eq!(rcode(&cut), ResponseCode::FormErr);
    // A compression pointer to itself.
    let mut looped = bytes(&query("web.", RecordType::A));
    looped.truncate(12);
    looped.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
    assert_eq!(rcode(&looped), ResponseCode::FormErr);
}

#[test]
fn random_and_mutated_input_never_panics_and_stays_bounded() {
    let pod = pod(proxy(Vec::new()));
    let seeds = [
        bytes(&query("web.shop.svc.cluster.local.", RecordType::A)),
        bytes(&with_edns(query("many.", RecordType::ANY), 4096)),
        bytes(&query("external.example.", RecordType::AAAA)),
    ];
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        // xorshift64*: deterministic, so a failure reproduces.
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for i in 0..20_000u32 {
        let mut raw = if i % 4 == 0 {
            let len = (next() % 600) as usize;
            (0..len).map(|_| next() as u8).collect::<Vec<u8>>()
        } else {
            seeds[(i as usize) % seeds.len()].clone()
        };
        for _ in 0..(next() % 6) {
            if raw.is_empty() {
                break;
            }
            let at = (next() as usize) % raw.len();
            match next() % 3 {
                0 => raw[at] = next() as u8,
                1 => raw.truncate(at),
                _ => raw.insert(at, next() as u8),
            }
        }
        for transport in [Transport::Udp, Transport::Tcp] {
            if let Decision::Reply(reply) = decide(&pod, &raw, transport) {
                let limit = match transport {
                    Transport::Udp => message::MAX_UDP_RESPONSE,
                    Transport::Tcp => message::MAX_TCP_MESSAGE,
                };
                assert!(reply.bytes.len() <= limit);
                assert!(reply.bytes.len() >= 12);
            }
        }
    }
}

#[test]
fn the_domain_setting_is_checked() {
    assert_eq!(
        parse_domain("Cluster.Local.").expect("valid").to_ascii(),
        "cluster.local."
    );
    assert_eq!(
        parse_domain("mesh.example").expect("valid").to_ascii(),
        "mesh.example."
    );
    for bad in ["", ".", "a..b", &"x".repeat(70)] {
        assert!(
            matches!(parse_domain(bad), Err(DnsError::Domain { .. })),
            "{bad:?}"
        );
    }
}

// === forwarding ===

/// What the fake upstream does with a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// Answers `EXTERNAL`.
    Answer,
    /// First a datagram with the wrong ID, then the answer.
    StrayThenAnswer,
    /// Never answers.
    Silent,
    /// SERVFAIL.
    ServFail,
    /// Over UDP, a truncated empty answer; over TCP, the full answer.
    TruncateUdp,
    /// Over UDP, an answer larger than the client's limit.
    Oversized,
}

/// A DNS server on 127.0.0.1 (UDP and TCP, same port) that behaves as told and counts the
/// queries it gets.
struct Upstream {
    addr: SocketAddr,
    udp_queries: Arc<AtomicUsize>,
    tcp_queries: Arc<AtomicUsize>,
}

impl Upstream {
    async fn start(behaviour: Behaviour) -> Upstream {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
        let addr = udp.local_addr().expect("local addr");
        let tcp = TcpListener::bind(addr)
            .await
            .expect("bind tcp on the same port");
        let udp_queries = Arc::new(AtomicUsize::new(0));
        let tcp_queries = Arc::new(AtomicUsize::new(0));
        let count = udp_queries.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
                count.fetch_add(1, Ordering::SeqCst);
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                if behaviour == Behaviour::StrayThenAnswer {
                    let mut stray = answer_to(&q, 0);
                    stray.metadata.id = q.metadata.id.wrapping_add(1);
                    let _ = udp.send_to(&bytes(&stray), peer).await;
                }
                let reply = match behaviour {
                    Behaviour::Silent => continue,
                    Behaviour::ServFail => {
                        let mut m = answer_to(&q, 0);
                        m.metadata.response_code = ResponseCode::ServFail;
                        m
                    }
                    Behaviour::TruncateUdp => {
                        let mut m = answer_to(&q, 0);
                        m.metadata.truncation = true;
                        m
                    }
                    Behaviour::Oversized => answer_to(&q, 200),
                    Behaviour::Answer | Behaviour::StrayThenAnswer => answer_to(&q, 1),
                };
                let _ = udp.send_to(&bytes(&reply), peer).await;
            }
        });
        let count = tcp_queries.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = tcp.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    let Ok(len) = stream.read_u16().await else {
                        return;
                    };
                    let mut buf = vec![0u8; usize::from(len)];
                    if stream.read_exact(&mut buf).await.is_err() {
                        return;
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let Ok(q) = Message::from_vec(&buf) else {
                        return;
                    };
                    let reply = bytes(&answer_to(&q, 200));
                    let len = u16::try_from(reply.len()).expect("fits");
                    let _ = stream.write_all(&len.to_be_bytes()).await;
                    let _ = stream.write_all(&reply).await;
                });
            }
        });
        Upstream {
            addr,
            udp_queries,
            tcp_queries,
        }
    }
}

/// An answer to `q` with `n` A records of `EXTERNAL`.
fn answer_to(q: &Message, n: usize) -> Message {
    let mut m = Message::response(q.metadata.id, OpCode::Query);
    m.metadata.recursion_desired = q.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_queries(q.queries.iter().cloned());
    if let Some(question) = q.queries.first() {
        for _ in 0..n {
            m.add_answer(Record::from_rdata(
                question.name().clone(),
                60,
                RData::A(A(EXTERNAL)),
            ));
        }
    }
    m
}

async fn forward(proxy: Arc<DnsProxy>, q: &Message, transport: Transport) -> Message {
    let pod = pod(proxy);
    let request = match decide(&pod, &bytes(q), transport) {
        Decision::Forward(f) => f,
        other => panic!("expected forwarding, got {other:?}"),
    };
    let answer = pod.proxy.forwarder.forward(&request, transport).await;
    Message::from_vec(&answer).expect("forwarded answers parse")
}

#[tokio::test]
async fn forwarded_answers_come_back_unchanged_but_for_the_id() {
    if !has_mark_privilege() {
        return;
    }
    let up = Upstream::start(Behaviour::StrayThenAnswer).await;
    let proxy = proxy(vec![up.addr]);
    let q = query("external.example.", RecordType::A);
    let answer = forward(proxy, &q, Transport::Udp).await;
    assert_eq!(answer.metadata.id, 0x1234, "the pod's ID is restored");
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert_eq!(a_records(&answer), vec![EXTERNAL]);
    assert_eq!(answer.answers[0].ttl, 60, "the upstream's TTL, not ours");
    assert_eq!(up.udp_queries.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_failing_upstream_gives_servfail_within_the_deadline_or_the_next_ones_answer() {
    if !has_mark_privilege() {
        return;
    }
    let silent = Upstream::start(Behaviour::Silent).await;
    let q = query("external.example.", RecordType::A);
    let started = Instant::now();
    let answer = forward(proxy(vec![silent.addr]), &q, Transport::Udp).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(answer.metadata.id, 0x1234);
    assert!(started.elapsed() < FAST.deadline + Duration::from_millis(300));

    let failing = Upstream::start(Behaviour::ServFail).await;
    let good = Upstream::start(Behaviour::Answer).await;
    let answer = forward(
        proxy(vec![silent.addr, failing.addr, good.addr]),
        &q,
        Transport::Udp,
    )
    .await;
    // The silent one used up its attempt and the deadline allows one more: SERVFAIL from the
    // second is kept only as a fallback.
    assert!(
        matches!(
            answer.metadata.response_code,
            ResponseCode::ServFail | ResponseCode::NoError
        ),
        "{answer:?}"
    );
    let answer = forward(proxy(vec![failing.addr, good.addr]), &q, Transport::Udp).await;
    assert_eq!(a_records(&answer), vec![EXTERNAL]);

    let none = forward(proxy(Vec::new()), &q, Transport::Udp).await;
    assert_eq!(none.metadata.response_code, ResponseCode::ServFail);
}

#[tokio::test]
async fn truncation_is_passed_to_udp_clients_and_resolved_over_tcp_for_tcp_clients() {
    if !has_mark_privilege() {
        return;
    }
    let q = query("external.example.", RecordType::A);
    let truncating = Upstream::start(Behaviour::TruncateUdp).await;
    let proxy_t = proxy(vec![truncating.addr]);
    let udp = forward(proxy_t.clone(), &q, Transport::Udp).await;
    assert!(
        udp.metadata.truncation,
        "a UDP client retries over TCP itself"
    );
    assert_eq!(truncating.tcp_queries.load(Ordering::SeqCst), 0);
    let tcp = forward(proxy_t.clone(), &q, Transport::Tcp).await;
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 200);
    assert_eq!(truncating.tcp_queries.load(Ordering::SeqCst), 1);

    // An upstream that ignores the size limit: the UDP client gets TC, not a cut message.
    let oversized = Upstream::start(Behaviour::Oversized).await;
    let udp = forward(proxy(vec![oversized.addr]), &q, Transport::Udp).await;
    assert!(udp.metadata.truncation && udp.answers.is_empty());
    assert_eq!(udp.metadata.id, 0x1234);
}

// === the per-pod servers ===

struct Served {
    udp: SocketAddr,
    tcp: SocketAddr,
}

async fn serve(proxy: Arc<DnsProxy>) -> Served {
    let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let served = Served {
        udp: udp.local_addr().expect("addr"),
        tcp: tcp.local_addr().expect("addr"),
    };
    let pod = Arc::new(pod(proxy));
    tokio::spawn(server::serve_udp(udp, pod.clone()));
    let admission = ambit_shared::admission::Admission::with_budget(
        Default::default(),
        ambit_shared::admission::FdBudget::unlimited(),
        &mut prometheus_client::registry::Registry::default(),
    );
    let listener = admission.gate("dns_tcp", Default::default()).listener(tcp);
    tokio::spawn(server::serve_tcp(listener, pod));
    served
}

async fn ask_udp(server: SocketAddr, q: &Message) -> Option<Message> {
    let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    client.send_to(&bytes(q), server).await.expect("send");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_millis(1500), client.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    Message::from_vec(&buf[..n]).ok()
}

async fn ask_tcp(stream: &mut TcpStream, q: &Message) -> Option<Message> {
    let raw = bytes(q);
    let len = u16::try_from(raw.len()).expect("fits");
    stream.write_all(&len.to_be_bytes()).await.ok()?;
    stream.write_all(&raw).await.ok()?;
    let len = tokio::time::timeout(Duration::from_secs(3), stream.read_u16())
        .await
        .ok()?
        .ok()?;
    let mut buf = vec![0u8; usize::from(len)];
    stream.read_exact(&mut buf).await.ok()?;
    Message::from_vec(&buf).ok()
}

#[tokio::test]
async fn udp_and_tcp_clients_get_local_and_forwarded_answers() {
    if !has_mark_privilege() {
        return;
    }
    let up = Upstream::start(Behaviour::Answer).await;
    let served = serve(proxy(vec![up.addr])).await;
    let web = ask_udp(served.udp, &query("web.", RecordType::A))
        .await
        .expect("answer");
    assert_eq!(a_records(&web), vec![Ipv4Addr::new(10, 96, 0, 10)]);
    let ext = ask_udp(served.udp, &query("external.example.", RecordType::A))
        .await
        .expect("answer");
    assert_eq!(a_records(&ext), vec![EXTERNAL]);

    // TCP: several queries on one connection, answered in order.
    let mut stream = TcpStream::connect(served.tcp).await.expect("connect");
    for (name, want) in [
        ("web.shop.svc.cluster.local.", Ipv4Addr::new(10, 96, 0, 10)),
        ("external.example.", EXTERNAL),
        ("web.shop.", Ipv4Addr::new(10, 96, 0, 10)),
    ] {
        let answer = ask_tcp(&mut stream, &query(name, RecordType::A))
            .await
            .expect("answer");
        assert_eq!(a_records(&answer).first(), Some(&want), "{name}");
    }
    let many = ask_tcp(&mut stream, &query("many.", RecordType::A))
        .await
        .expect("answer");
    assert_eq!(many.answers.len(), 35, "TCP answers are not truncated");
}

#[tokio::test]
async fn hostile_udp_traffic_is_bounded_and_the_server_keeps_answering() {
    if !has_mark_privilege() {
        return;
    }
    let silent = Upstream::start(Behaviour::Silent).await;
    let served = serve(proxy(vec![silent.addr])).await;
    let attacker = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    // Garbage, a 64 KiB datagram, and far more forwarded queries than the pod may have in
    // flight (the upstream never answers, so none completes during the burst).
    attacker.send_to(b"\x00", served.udp).await.expect("send");
    attacker
        .send_to(&vec![0xffu8; 65_000], served.udp)
        .await
        .expect("send");
    for i in 0..(MAX_IN_FLIGHT + 200) {
        let mut q = query(&format!("n{i}.example."), RecordType::A);
        q.metadata.id = i as u16;
        attacker
            .send_to(&bytes(&q), served.udp)
            .await
            .expect("send");
    }
    // Local answers keep flowing while the forwarder is saturated. The burst may overflow the
    // socket's receive buffer, so ask as a resolver would: again after a short wait.
    let mut web = None;
    for _ in 0..5 {
        web = ask_udp(served.udp, &query("web.", RecordType::A)).await;
        if web.is_some() {
            break;
        }
    }
    assert_eq!(
        web.map(|m| a_records(&m)),
        Some(vec![Ipv4Addr::new(10, 96, 0, 10)])
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let forwarded = silent.udp_queries.load(Ordering::SeqCst);
    assert!(
        forwarded <= MAX_IN_FLIGHT,
        "{forwarded} queries in flight, the cap is {MAX_IN_FLIGHT}"
    );
    assert!(forwarded > 0);
}

#[tokio::test]
async fn hostile_tcp_clients_are_bounded_and_cut_off() {
    let served = serve(proxy(Vec::new())).await;
    // A length prefix larger than any query: closed at once.
    let mut big = TcpStream::connect(served.tcp).await.expect("connect");
    big.write_all(&u16::MAX.to_be_bytes()).await.expect("write");
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(2), big.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");

    // Idle connections up to the cap are held; beyond it they are closed at once.
    let mut idle = Vec::new();
    for _ in 0..MAX_TCP_CONNECTIONS {
        idle.push(TcpStream::connect(served.tcp).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = TcpStream::connect(served.tcp).await.expect("connect");
    let read = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut byte)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "over the cap: {read:?}"
    );
    // Closing one frees a slot.
    drop(idle.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fresh = TcpStream::connect(served.tcp).await.expect("connect");
    let web = ask_tcp(&mut fresh, &query("web.", RecordType::A)).await;
    assert_eq!(
        web.map(|m| a_records(&m)),
        Some(vec![Ipv4Addr::new(10, 96, 0, 10)])
    );
}
