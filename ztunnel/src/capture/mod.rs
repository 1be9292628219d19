//! Capture control: everything ztunnel does inside a pod's network namespace so that the
//! eBPF programs can steer the pod's traffic to it.
//!
//! For each enrolled pod, on each address family it has:
//! - listeners on 15001 (outbound, transparent), 15006 (inbound plaintext) and 15008
//!   (HBONE), all carrying ztunnel's mark so ztunnel never captures itself;
//! - a policy-routing rule and route that send capture-marked SYNs to `lo`, where the pod's
//!   `sk_lookup` program hands them to the 15001 listener ([`routing`]);
//! - the eBPF map entries and link ([`ambit_ebpf::Capture`]);
//! - the DNS proxy's sockets on 15053 ([`dns`]).
//!
//! The numbers (ports, marks, table, addresses) all come from [`ambit_ebpf::contract`].

pub mod addrs;
pub mod dns;
pub mod netns;
pub mod routing;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};

use ambit_ebpf::FamilyCapture;
use ambit_ebpf::contract::{
    DELIVERY_ADDR_V4, HBONE_PORT, INBOUND_PORT, LISTEN_ADDR_V4, LISTEN_ADDR_V6, OUTBOUND_PORT,
    ZTUNNEL_MARK,
};
use ambit_shared::admission::FdBudget;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

pub use addrs::PodAddrs;
pub use netns::{Netns, NetnsError};

/// Listen backlog of the pod listeners.
const BACKLOG: i32 = 1024;

/// Errors setting up capture for a pod.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Entering the pod namespace failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A listener could not be created.
    #[error("listener {addr} in netns {netns}: {source}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Namespace path.
        netns: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An rtnetlink socket could not be opened in the pod.
    #[error("opening an rtnetlink socket in netns {netns}: {source}")]
    Netlink {
        /// Namespace path.
        netns: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A capture rule or route could not be changed.
    #[error("{what} in netns {netns}: {source}")]
    Routing {
        /// What was being done.
        what: &'static str,
        /// Namespace path.
        netns: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
    /// The eBPF side failed.
    #[error(transparent)]
    Ebpf(#[from] ambit_ebpf::Error),
}

/// The three listeners ztunnel holds inside one pod, for one address family.
#[derive(Debug)]
pub struct FamilyListeners {
    /// 15001: captured outbound connections.
    pub outbound: TcpListener,
    /// 15006: plaintext inbound connections.
    pub inbound_plaintext: TcpListener,
    /// 15008: HBONE.
    pub hbone: TcpListener,
}

/// A pod's listeners, per address family it has.
#[derive(Debug, Default)]
pub struct PodListeners {
    /// IPv4, when the pod has an IPv4 address.
    pub v4: Option<FamilyListeners>,
    /// IPv6, when IPv6 is on in the pod (link-local counts).
    pub v6: Option<FamilyListeners>,
}

impl PodListeners {
    /// What [`ambit_ebpf::Capture::enroll`] needs of one family.
    pub fn family<'a>(
        listeners: &'a Option<FamilyListeners>,
        primary: Option<IpAddr>,
        addrs: &'a [IpAddr],
    ) -> Option<FamilyCapture<'a>> {
        let l = listeners.as_ref()?;
        (!addrs.is_empty()).then(|| FamilyCapture {
            primary,
            addrs,
            outbound_listener: l.outbound.as_fd(),
            inbound_listener: l.inbound_plaintext.as_fd(),
        })
    }

    /// Any one of the listeners, to read the pod's netns cookie from.
    pub fn any_fd(&self) -> Option<BorrowedFd<'_>> {
        self.v4
            .as_ref()
            .or(self.v6.as_ref())
            .map(|l| l.hbone.as_fd())
    }
}

/// Opens the pod's listeners inside its namespace, for each family it has.
///
/// 15001 and 15006 bind to loopback: only `sk_lookup` steers traffic to them, and loopback
/// keeps them off the pod's network. 15008 binds to all addresses of the family, since peers
/// reach it directly. IPv6 sockets are `IPV6_V6ONLY`, so each family has its own.
pub fn open_listeners(ns: &Netns, addrs: &PodAddrs) -> Result<PodListeners, CaptureError> {
    let family = |listen: IpAddr, any: IpAddr| -> Result<FamilyListeners, CaptureError> {
        Ok(FamilyListeners {
            outbound: listen_in(ns, SocketAddr::new(listen, OUTBOUND_PORT), true)?,
            inbound_plaintext: listen_in(ns, SocketAddr::new(listen, INBOUND_PORT), false)?,
            hbone: listen_in(ns, SocketAddr::new(any, HBONE_PORT), false)?,
        })
    };
    let v4 = if addrs.has_v4() {
        Some(family(
            LISTEN_ADDR_V4.into(),
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        )?)
    } else {
        None
    };
    let v6 = if !addrs.v6().is_empty() {
        Some(family(
            LISTEN_ADDR_V6.into(),
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        )?)
    } else {
        None
    };
    Ok(PodListeners { v4, v6 })
}

fn listen_in(ns: &Netns, addr: SocketAddr, transparent: bool) -> Result<TcpListener, CaptureError> {
    let err = |source| CaptureError::Listen {
        addr,
        netns: ns.path().display().to_string(),
        source,
    };
    let socket = ns
        .run(|| -> io::Result<Socket> {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            s.set_mark(ZTUNNEL_MARK)?;
            // A restarted ztunnel rebinds while old connections may sit in TIME_WAIT.
            s.set_reuse_address(true)?;
            if addr.is_ipv6() {
                // One listener per family: a dual-stack socket would also take IPv4.
                s.set_only_v6(true)?;
            }
            if transparent {
                // Accepted sockets take the original destination as their local address,
                // which is not local to the pod; replies from it need transparency.
                if addr.is_ipv6() {
                    s.set_ip_transparent_v6(true)?;
                } else {
                    s.set_ip_transparent_v4(true)?;
                }
            }
            s.bind(&addr.into())?;
            s.listen(BACKLOG)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })?
        .map_err(err)?;
    TcpListener::from_std(socket.into()).map_err(err)
}

/// The source address ztunnel binds to deliver inbound traffic to `dst` inside its pod; the
/// `sk_lookup` program lets connections from it through instead of capturing them again:
/// `127.0.0.6` over IPv4, and over IPv6 the destination itself (the pod's own address; see
/// [`ambit_ebpf::contract::DELIVERY_ADDR_V4`] for why not `::1`).
pub fn delivery_addr(dst: SocketAddr) -> SocketAddr {
    let ip: IpAddr = match dst {
        SocketAddr::V4(_) => DELIVERY_ADDR_V4.into(),
        SocketAddr::V6(v6) => (*v6.ip()).into(),
    };
    SocketAddr::new(ip, 0)
}

/// Opens a TCP connection from inside the pod's namespace, marked so it is never captured.
///
/// Fails without connecting when the socket would sit in the descriptor reserve (`fds`):
/// the last descriptors are for ztunnel's own work (opening a pod's namespace, reading the
/// config), which must never fail because peers made us open too many connections.
pub async fn connect_in(
    ns: &Netns,
    dst: SocketAddr,
    bind: Option<SocketAddr>,
    fds: &FdBudget,
) -> io::Result<TcpStream> {
    let socket = ns
        .run(|| -> io::Result<Socket> {
            let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
            fds.check_opened(&s)?;
            s.set_mark(ZTUNNEL_MARK)?;
            s.set_nonblocking(true)?;
            s.set_tcp_nodelay(true)?;
            Ok(s)
        })
        .map_err(io::Error::other)??;
    let socket = TcpSocket::from_std_stream(socket.into());
    if let Some(bind) = bind {
        socket.bind(bind)?;
    }
    socket.connect(dst).await
}
