//! The per-pod servers: one UDP loop and one TCP accept loop on the pod's 15053 sockets.
//!
//! Bounds, per pod (a pod can only hurt its own DNS):
//! - forwarded queries in flight: [`MAX_IN_FLIGHT`]; over UDP the rest are dropped (the
//!   resolver retries), over TCP they wait their turn within the forward deadline;
//! - TCP connections: [`MAX_TCP_CONNECTIONS`], each closed after [`TCP_IDLE`] without a
//!   query and given [`TCP_IO`] to deliver one; queries on one connection are answered in
//!   order;
//! - every query is at most [`MAX_QUERY`] bytes.
//!
//! and per node: at most [`super::NODE_MAX_IN_FLIGHT`] forwarded queries in all.
//!
//! Answers made here cost no task and no permit: they are computed in the loop.

use std::sync::Arc;
use std::time::Duration;

use ambit_shared::admission::{Accepted, Listener};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tracing::{Instrument, debug, debug_span, warn};

use super::DnsProxy;
use super::forward::FORWARD_DEADLINE;
use super::message::{self, Decision, MAX_QUERY, Transport};

/// Forwarded queries one pod may have in flight.
pub(crate) const MAX_IN_FLIGHT: usize = 256;
/// TCP connections one pod may hold open to the proxy.
pub(crate) const MAX_TCP_CONNECTIONS: usize = 32;
/// A TCP connection with no query for this long is closed (RFC 7766 suggests seconds).
pub(crate) const TCP_IDLE: Duration = Duration::from_secs(10);
/// Time to read the rest of a query, or to write an answer, on TCP.
pub(crate) const TCP_IO: Duration = Duration::from_secs(5);
/// Pause after a socket error, so a persistent one cannot spin the loop.
const ERROR_PAUSE: Duration = Duration::from_millis(50);

/// One pod, as its DNS servers see it.
#[derive(Debug)]
pub(crate) struct PodDns {
    pub(crate) proxy: Arc<DnsProxy>,
    /// Namespace of the pod: short names resolve relative to it.
    pub(crate) namespace: String,
    /// `namespace/name`, for logs.
    pub(crate) workload: String,
    pub(crate) in_flight: Arc<Semaphore>,
    pub(crate) tcp_connections: Arc<Semaphore>,
}

impl PodDns {
    pub(crate) fn new(proxy: Arc<DnsProxy>, namespace: String, workload: String) -> Self {
        PodDns {
            proxy,
            namespace,
            workload,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            tcp_connections: Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS)),
        }
    }

    fn decide(&self, bytes: &[u8], transport: Transport) -> Decision {
        message::decide(
            bytes,
            transport,
            &self.proxy.catalog,
            &self.proxy.zone,
            &self.namespace,
        )
    }

    /// Both permits a forwarded query needs (the pod's and the node's), without waiting.
    fn try_permits(&self) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let pod = self.in_flight.clone().try_acquire_owned().ok()?;
        let node = self.proxy.in_flight.clone().try_acquire_owned().ok()?;
        Some((pod, node))
    }

    /// Both permits, waiting up to the forward deadline.
    async fn permits(&self) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        timeout(FORWARD_DEADLINE, async {
            let pod = self.in_flight.clone().acquire_owned().await.ok()?;
            let node = self.proxy.in_flight.clone().acquire_owned().await.ok()?;
            Some((pod, node))
        })
        .await
        .ok()
        .flatten()
    }
}

/// Answers datagrams until the task is dropped. Receive errors never end the loop.
pub(crate) async fn serve_udp(socket: UdpSocket, pod: Arc<PodDns>) {
    let socket = Arc::new(socket);
    // One byte more than the largest query tells an oversized datagram from one that fits.
    let mut buf = vec![0u8; MAX_QUERY + 1];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(e) => {
                warn!(pod = %pod.workload, error = %e, "DNS UDP receive failed");
                tokio::time::sleep(ERROR_PAUSE).await;
                continue;
            }
        };
        let Some(bytes) = buf.get(..n) else { continue };
        match pod.decide(bytes, Transport::Udp) {
            Decision::Drop(why) => {
                debug!(pod = %pod.workload, %peer, len = n, why, "DNS datagram dropped");
            }
            Decision::Reply(reply) => {
                debug!(pod = %pod.workload, question = %reply.question, rcode = %reply.rcode, "DNS answered");
                if let Err(e) = socket.send_to(&reply.bytes, peer).await {
                    debug!(pod = %pod.workload, %peer, error = %e, "DNS UDP send failed");
                }
            }
            Decision::Forward(request) => {
                let Some(permits) = pod.try_permits() else {
                    debug!(pod = %pod.workload, question = %request.describe(),
                        "too many DNS queries in flight; dropped (the resolver retries)");
                    continue;
                };
                let socket = socket.clone();
                let pod = pod.clone();
                let span = debug_span!("dns", pod = %pod.workload);
                tokio::spawn(
                    async move {
                        let answer = pod.proxy.forwarder.forward(&request, Transport::Udp).await;
                        debug!(question = %request.describe(), "DNS forwarded");
                        if let Err(e) = socket.send_to(&answer, peer).await {
                            debug!(%peer, error = %e, "DNS UDP send failed");
                        }
                        drop(permits);
                    }
                    .instrument(span),
                );
            }
        }
    }
}

/// Accepts TCP connections until the task is dropped; one task per connection. Admission
/// control decides what is accepted; accept errors never end the loop.
pub(crate) async fn serve_tcp(mut listener: Listener, pod: Arc<PodDns>) {
    loop {
        let Accepted {
            stream,
            peer,
            permit: admitted,
        } = listener.accept().await;
        let Ok(permit) = pod.tcp_connections.clone().try_acquire_owned() else {
            debug!(pod = %pod.workload, %peer, "too many DNS TCP connections; closed");
            continue;
        };
        let pod = pod.clone();
        let span = debug_span!("dns", pod = %pod.workload, %peer);
        tokio::spawn(
            async move {
                if let Err(why) = serve_connection(stream, &pod).await {
                    debug!(why, "DNS TCP connection closed");
                }
                drop((permit, admitted));
            }
            .instrument(span),
        );
    }
}

/// Answers queries on one connection, in order, until the client closes it, idles, or sends
/// something that is not a query.
async fn serve_connection(mut stream: TcpStream, pod: &PodDns) -> Result<(), &'static str> {
    let mut buf = Vec::new();
    loop {
        let len = match timeout(TCP_IDLE, stream.read_u16()).await {
            Err(_) => return Err("idle"),
            Ok(Err(_)) => return Ok(()),
            Ok(Ok(len)) => usize::from(len),
        };
        if len > MAX_QUERY {
            return Err("query larger than any query");
        }
        buf.resize(len, 0);
        match timeout(TCP_IO, stream.read_exact(&mut buf)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Err("closed mid-query"),
            Err(_) => return Err("too slow to send its query"),
        }
        let answer = match pod.decide(&buf, Transport::Tcp) {
            Decision::Drop(why) => return Err(why),
            Decision::Reply(reply) => {
                debug!(question = %reply.question, rcode = %reply.rcode, "DNS answered");
                reply.bytes
            }
            Decision::Forward(request) => {
                let Some(permits) = pod.permits().await else {
                    return Err("no capacity to forward");
                };
                let answer = pod.proxy.forwarder.forward(&request, Transport::Tcp).await;
                drop(permits);
                debug!(question = %request.describe(), "DNS forwarded");
                answer
            }
        };
        let Ok(len) = u16::try_from(answer.len()) else {
            return Err("answer larger than TCP allows");
        };
        let mut framed = Vec::with_capacity(answer.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&answer);
        match timeout(TCP_IO, stream.write_all(&framed)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err("closed before the answer"),
            Err(_) => return Err("too slow to take the answer"),
        }
    }
}
