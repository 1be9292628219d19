//! Forwarding to the node's resolver: the servers in ztunnel's own `resolv.conf`.
//!
//! The pod's query goes out byte for byte, except its ID, which is replaced by a random one
//! (and restored in the answer), so the upstream's answer comes back exactly as the upstream
//! gave it: flags, EDNS options, DNSSEC records and all. Each query uses a fresh UDP socket
//! connected to the server (a random source port, and only that server's datagrams get in),
//! and a reply counts only if it answers our ID and question.
//!
//! Servers are tried in order, each for at most [`UDP_ATTEMPT`], within [`FORWARD_DEADLINE`]
//! in all, which is less than resolvers' own timeouts (glibc 5 s, dig 5 s), so a pod gets
//! SERVFAIL rather than silence when every server is down. An answer with the TC bit goes back
//! to a UDP client as is (it retries over TCP); for a TCP client the proxy asks again over TCP.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ambit_ebpf::ZTUNNEL_MARK;
use hickory_proto::op::{Query, ResponseCode};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, UdpSocket};
use tokio::time::{Instant, timeout_at};
use tracing::{debug, warn};

use super::message::{
    self, Forwarded, MAX_TCP_MESSAGE, MAX_UDP_RESPONSE, ReplyInfo, Transport, check_reply,
};

/// How long one server gets to answer over UDP.
const UDP_ATTEMPT: Duration = Duration::from_secs(2);
/// How long one TCP exchange (connect, query, answer) may take.
const TCP_ATTEMPT: Duration = Duration::from_secs(3);
/// Everything one query may take before the pod gets SERVFAIL.
pub(crate) const FORWARD_DEADLINE: Duration = Duration::from_millis(4500);
/// At most one "upstream failing" warning per this interval; the rest are debug.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Why one exchange with one server failed.
#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("answer larger than {0} bytes")]
    TooLarge(usize),
}

/// How long forwarding may take.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// One server over UDP.
    pub(crate) udp_attempt: Duration,
    /// One TCP exchange.
    pub(crate) tcp_attempt: Duration,
    /// The whole query.
    pub(crate) deadline: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            udp_attempt: UDP_ATTEMPT,
            tcp_attempt: TCP_ATTEMPT,
            deadline: FORWARD_DEADLINE,
        }
    }
}

/// The node's resolvers.
#[derive(Debug)]
pub(crate) struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeouts: Timeouts,
    last_warning_ms: AtomicU64,
}

impl Forwarder {
    pub(crate) fn new(upstreams: Vec<SocketAddr>, timeouts: Timeouts) -> Self {
        Forwarder {
            upstreams,
            timeouts,
            last_warning_ms: AtomicU64::new(0),
        }
    }

    pub(crate) fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// Asks the upstreams; always returns bytes for the pod (the answer, TC, or SERVFAIL).
    pub(crate) async fn forward(&self, request: &Forwarded, transport: Transport) -> Vec<u8> {
        let limit = match transport {
            Transport::Udp => request.udp_limit,
            Transport::Tcp => MAX_TCP_MESSAGE,
        };
        let Some(question) = request.question() else {
            return message::servfail(&request.query, limit);
        };
        let deadline = Instant::now() + self.timeouts.deadline;
        let mut fallback: Option<Vec<u8>> = None;
        let mut last_error = String::from("no nameserver in resolv.conf");
        for (i, upstream) in self.upstreams.iter().enumerate() {
            let more = i + 1 < self.upstreams.len();
            match self
                .exchange(*upstream, request, question, transport, deadline)
                .await
            {
                Ok((mut answer, info)) => {
                    message::set_id(&mut answer, request.query.metadata.id);
                    // Like a stub resolver, a server that fails or refuses is not the last
                    // word while another may answer.
                    let retry =
                        matches!(info.rcode, ResponseCode::ServFail | ResponseCode::Refused);
                    if retry && more {
                        fallback = Some(answer);
                        continue;
                    }
                    return answer;
                }
                Err(ExchangeError::TooLarge(_)) if transport == Transport::Udp => {
                    return message::truncated(&request.query);
                }
                Err(e) => {
                    debug!(%upstream, question = %request.describe(), error = %e, "upstream failed");
                    last_error = format!("{upstream}: {e}");
                }
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        if let Some(answer) = fallback {
            return answer;
        }
        self.warn_rate_limited(&last_error, &request.describe());
        message::servfail(&request.query, limit)
    }

    /// One server: UDP, then TCP if the answer was truncated and the pod came over TCP.
    async fn exchange(
        &self,
        upstream: SocketAddr,
        request: &Forwarded,
        question: &Query,
        transport: Transport,
        deadline: Instant,
    ) -> Result<(Vec<u8>, ReplyInfo), ExchangeError> {
        let id: u16 = rand::random();
        let mut query = request.raw.clone();
        message::set_id(&mut query, id);
        let Timeouts {
            udp_attempt,
            tcp_attempt,
            ..
        } = self.timeouts;
        let udp = timeout_at(
            deadline.min(Instant::now() + udp_attempt),
            exchange_udp(upstream, &query, id, question, request.udp_limit),
        )
        .await
        .map_err(|_| ExchangeError::Timeout(udp_attempt))?;
        let needs_tcp = transport == Transport::Tcp
            && match &udp {
                Ok((_, info)) => info.truncated,
                Err(ExchangeError::TooLarge(_)) => true,
                Err(_) => false,
            };
        if !needs_tcp {
            return udp;
        }
        timeout_at(
            deadline.min(Instant::now() + tcp_attempt),
            exchange_tcp(upstream, &query, id, question),
        )
        .await
        .map_err(|_| ExchangeError::Timeout(tcp_attempt))?
    }

    fn warn_rate_limited(&self, error: &str, question: &str) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let last = self.last_warning_ms.load(Ordering::Relaxed);
        let interval = u64::try_from(WARN_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        if now_ms.saturating_sub(last) >= interval
            && self
                .last_warning_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            warn!(upstreams = ?self.upstreams, %question, last_error = %error,
                "no upstream DNS server answered; pods get SERVFAIL (further failures in the next 10s are logged at debug)");
        } else {
            debug!(%question, last_error = %error, "no upstream DNS server answered");
        }
    }
}

/// A socket of ztunnel's own (marked, so capture never applies to it), for talking to `to`.
fn socket_for(to: SocketAddr, ty: Type, protocol: Protocol) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(to), ty, Some(protocol))?;
    socket.set_mark(ZTUNNEL_MARK)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

async fn exchange_udp(
    upstream: SocketAddr,
    query: &[u8],
    id: u16,
    question: &Query,
    limit: usize,
) -> Result<(Vec<u8>, ReplyInfo), ExchangeError> {
    let socket = socket_for(upstream, Type::DGRAM, Protocol::UDP)?;
    let any: IpAddr = match upstream {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    socket.bind(&SocketAddr::new(any, 0).into())?;
    let socket = UdpSocket::from_std(socket.into())?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    // One byte more than allowed tells an oversized answer from one that fits exactly.
    let mut buf = vec![0u8; limit.min(MAX_UDP_RESPONSE) + 1];
    loop {
        let n = socket.recv(&mut buf).await?;
        let Some(answer) = buf.get(..n) else {
            continue;
        };
        if n >= buf.len() {
            if check_reply(answer, id, question).is_some() {
                return Err(ExchangeError::TooLarge(buf.len() - 1));
            }
            continue;
        }
        if let Some(info) = check_reply(answer, id, question) {
            return Ok((answer.to_vec(), info));
        }
        // A stray or forged datagram: keep waiting for the real answer.
    }
}

async fn exchange_tcp(
    upstream: SocketAddr,
    query: &[u8],
    id: u16,
    question: &Query,
) -> Result<(Vec<u8>, ReplyInfo), ExchangeError> {
    let socket = socket_for(upstream, Type::STREAM, Protocol::TCP)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    let mut stream = socket.connect(upstream).await?;
    let len = u16::try_from(query.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "query too large for TCP"))?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    let len = usize::from(stream.read_u16().await?);
    let mut answer = vec![0u8; len];
    stream.read_exact(&mut answer).await?;
    let info = check_reply(&answer, id, question).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "TCP answer does not match the query",
        )
    })?;
    Ok((answer, info))
}
