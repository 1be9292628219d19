//! The DNS proxy's sockets inside a pod: UDP and TCP on loopback:15053, per family.
//!
//! The pod's queries to port 53 reach them because the eBPF connect and sendmsg hooks rewrite
//! the destination (see `ambit_ebpf`, "DNS"); the UDP socket is what registers the pod for
//! that with [`ambit_ebpf::Capture::enroll_dns`]. Both bind loopback, so nothing outside the
//! pod can reach them, and both carry ztunnel's mark like every socket ztunnel owns.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};

use ambit_ebpf::contract::{DNS_PROXY_PORT, LISTEN_ADDR_V4, LISTEN_ADDR_V6, ZTUNNEL_MARK};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};

use super::{CaptureError, Netns, PodAddrs};

/// Listen backlog of the TCP listener: TCP DNS is rare (truncated answers, zone transfers).
const TCP_BACKLOG: i32 = 128;
/// Receive buffer of the UDP socket. A burst of queries from one pod queues here while the
/// proxy works; beyond it the kernel drops datagrams, which resolvers retry.
const UDP_RECV_BUFFER: usize = 256 * 1024;

/// The DNS proxy's two sockets of one family in one pod.
#[derive(Debug)]
pub struct DnsSockets {
    /// UDP loopback:15053.
    pub udp: UdpSocket,
    /// TCP loopback:15053.
    pub tcp: TcpListener,
}

/// The DNS proxy's sockets in one pod, per family the pod is served on.
#[derive(Debug, Default)]
pub struct DnsListeners {
    /// `127.0.0.1:15053`, when the pod has a routable IPv4 address.
    pub v4: Option<DnsSockets>,
    /// `[::1]:15053`, when the pod has a routable IPv6 address.
    pub v6: Option<DnsSockets>,
}

impl DnsListeners {
    /// What to register with [`ambit_ebpf::Capture::enroll_dns`]: each family's primary
    /// address and UDP socket.
    pub fn capture<'a>(
        &'a self,
        addrs: &PodAddrs,
        netns_cookie: u64,
    ) -> ambit_ebpf::DnsCapture<'a> {
        let pair = |sockets: &'a Option<DnsSockets>, primary: Option<IpAddr>| {
            Some((primary?, sockets.as_ref()?.udp_fd()))
        };
        ambit_ebpf::DnsCapture {
            netns_cookie,
            v4: pair(&self.v4, addrs.primary_v4()),
            v6: pair(&self.v6, addrs.primary_v6()),
        }
    }
}

impl DnsSockets {
    /// The socket to register with [`ambit_ebpf::Capture::enroll_dns`].
    pub fn udp_fd(&self) -> BorrowedFd<'_> {
        self.udp.as_fd()
    }
}

/// The address a family's sockets bind inside the pod: where the eBPF hooks send its queries.
pub fn proxy_addr(ipv6: bool) -> SocketAddr {
    let ip: IpAddr = if ipv6 {
        LISTEN_ADDR_V6.into()
    } else {
        LISTEN_ADDR_V4.into()
    };
    SocketAddr::new(ip, DNS_PROXY_PORT)
}

/// Opens the DNS proxy's UDP socket and TCP listener inside the pod's namespace, for each
/// family the pod has a routable address in (the kernel programs refuse the others' queries).
///
/// `SO_REUSEADDR` and `SO_REUSEPORT` let a restarted ztunnel bind next to sockets of the
/// previous one that are still closing; the eBPF side does not care which socket of the group
/// gets a query, since they all belong to ztunnel.
pub fn open_listeners(ns: &Netns, addrs: &PodAddrs) -> Result<DnsListeners, CaptureError> {
    Ok(DnsListeners {
        v4: match addrs.primary_v4() {
            Some(_) => Some(open_family(ns, proxy_addr(false))?),
            None => None,
        },
        v6: match addrs.primary_v6() {
            Some(_) => Some(open_family(ns, proxy_addr(true))?),
            None => None,
        },
    })
}

fn open_family(ns: &Netns, addr: SocketAddr) -> Result<DnsSockets, CaptureError> {
    let err = |source| CaptureError::Listen {
        addr,
        netns: ns.path().display().to_string(),
        source,
    };
    let domain = Domain::for_address(addr);
    let (udp, tcp) = ns
        .run(|| -> io::Result<(Socket, Socket)> {
            let udp = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
            udp.set_mark(ZTUNNEL_MARK)?;
            udp.set_reuse_address(true)?;
            udp.set_reuse_port(true)?;
            if addr.is_ipv6() {
                udp.set_only_v6(true)?;
            }
            // Best effort: the default is enough to work, only less forgiving of bursts.
            let _ = udp.set_recv_buffer_size(UDP_RECV_BUFFER);
            udp.bind(&addr.into())?;
            udp.set_nonblocking(true)?;

            let tcp = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
            tcp.set_mark(ZTUNNEL_MARK)?;
            tcp.set_reuse_address(true)?;
            tcp.set_reuse_port(true)?;
            if addr.is_ipv6() {
                tcp.set_only_v6(true)?;
            }
            tcp.bind(&addr.into())?;
            tcp.listen(TCP_BACKLOG)?;
            tcp.set_nonblocking(true)?;
            Ok((udp, tcp))
        })?
        .map_err(err)?;
    Ok(DnsSockets {
        udp: UdpSocket::from_std(udp.into()).map_err(err)?,
        tcp: TcpListener::from_std(tcp.into()).map_err(err)?,
    })
}
