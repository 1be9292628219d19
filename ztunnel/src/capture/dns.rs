//! The DNS proxy's sockets inside a pod: UDP and TCP on `127.0.0.1:15053`.
//!
//! The pod's queries to port 53 reach them because the eBPF connect and sendmsg hooks rewrite
//! the destination (see `ambit_ebpf`, "DNS"); the UDP socket is what registers the pod for
//! that with [`ambit_ebpf::Capture::enroll_dns`]. Both bind loopback, so nothing outside the
//! pod can reach them, and both carry ztunnel's mark like every socket ztunnel owns.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};

use ambit_ebpf::{DNS_PROXY_ADDR, DNS_PROXY_PORT, ZTUNNEL_MARK};
use ambit_shared::ports;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};

use super::{CaptureError, Netns};

/// Listen backlog of the TCP listener: TCP DNS is rare (truncated answers, zone transfers).
const TCP_BACKLOG: i32 = 128;
/// Receive buffer of the UDP socket. A burst of queries from one pod queues here while the
/// proxy works; beyond it the kernel drops datagrams, which resolvers retry.
const UDP_RECV_BUFFER: usize = 256 * 1024;

/// The DNS proxy's two sockets in one pod.
#[derive(Debug)]
pub struct DnsListeners {
    /// UDP `127.0.0.1:15053`.
    pub udp: UdpSocket,
    /// TCP `127.0.0.1:15053`.
    pub tcp: TcpListener,
}

impl DnsListeners {
    /// The socket to register with [`ambit_ebpf::Capture::enroll_dns`].
    pub fn udp_fd(&self) -> BorrowedFd<'_> {
        self.udp.as_fd()
    }
}

// The kernel programs send queries to the port ztunnel documents as its DNS port.
const _: () = assert!(DNS_PROXY_PORT == ports::DNS);

/// The address both sockets bind inside the pod: where the eBPF hooks send its queries.
pub fn proxy_addr() -> SocketAddr {
    SocketAddr::new(DNS_PROXY_ADDR, DNS_PROXY_PORT)
}

/// Opens the DNS proxy's UDP socket and TCP listener inside the pod's namespace.
///
/// `SO_REUSEADDR` and `SO_REUSEPORT` let a restarted ztunnel bind next to sockets of the
/// previous one that are still closing; the eBPF side does not care which socket of the group
/// gets a query, since they all belong to ztunnel.
pub fn open_listeners(ns: &Netns) -> Result<DnsListeners, CaptureError> {
    let addr = proxy_addr();
    let err = |source| CaptureError::Listen {
        addr,
        netns: ns.path().display().to_string(),
        source,
    };
    let (udp, tcp) = ns
        .run(|| -> io::Result<(Socket, Socket)> {
            let udp = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            udp.set_mark(ZTUNNEL_MARK)?;
            udp.set_reuse_address(true)?;
            udp.set_reuse_port(true)?;
            // Best effort: the default is enough to work, only less forgiving of bursts.
            let _ = udp.set_recv_buffer_size(UDP_RECV_BUFFER);
            udp.bind(&addr.into())?;
            udp.set_nonblocking(true)?;

            let tcp = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            tcp.set_mark(ZTUNNEL_MARK)?;
            tcp.set_reuse_address(true)?;
            tcp.set_reuse_port(true)?;
            tcp.bind(&addr.into())?;
            tcp.listen(TCP_BACKLOG)?;
            tcp.set_nonblocking(true)?;
            Ok((udp, tcp))
        })?
        .map_err(err)?;
    Ok(DnsListeners {
        udp: UdpSocket::from_std(udp.into()).map_err(err)?,
        tcp: TcpListener::from_std(tcp.into()).map_err(err)?,
    })
}
