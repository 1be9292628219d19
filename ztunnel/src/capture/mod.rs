//! Capture control: everything ztunnel does inside a pod's network namespace so that the
//! eBPF programs can steer the pod's traffic to it.
//!
//! For each enrolled pod:
//! - listeners on 15001 (outbound, `IP_TRANSPARENT`), 15006 (inbound plaintext) and 15008
//!   (HBONE), all carrying ztunnel's mark so ztunnel never captures itself;
//! - a policy-routing rule and route that send capture-marked SYNs to `lo`, where the pod's
//!   `sk_lookup` program hands them to the 15001 listener;
//! - the eBPF map entries and link ([`ambit_ebpf::Capture`]);
//! - the DNS proxy's sockets on 15053 ([`dns`]).

pub mod dns;
pub mod netns;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::Command;

use ambit_ebpf::{CAPTURE_MARK, ZTUNNEL_MARK};
use ambit_shared::admission::FdBudget;
use ambit_shared::ports;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

pub use netns::{Netns, NetnsError};

/// Source address ztunnel uses to deliver inbound traffic to an app inside its pod; the
/// `sk_lookup` program lets it through instead of capturing it again.
pub const DELIVERY_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// Routing table for captured SYNs.
const CAPTURE_TABLE: &str = "100";
/// Priority of the capture rule: before `main` (32766), after `local` (0).
const CAPTURE_RULE_PRIORITY: &str = "100";
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
    /// An `ip` command failed.
    #[error("`{command}` in netns {netns} failed: {output}")]
    Routing {
        /// The command line.
        command: String,
        /// Namespace path.
        netns: String,
        /// Its stderr, or the spawn error.
        output: String,
    },
    /// The eBPF side failed.
    #[error(transparent)]
    Ebpf(#[from] ambit_ebpf::Error),
}

/// The three listeners ztunnel holds inside one pod.
#[derive(Debug)]
pub struct PodListeners {
    /// 15001: captured outbound connections.
    pub outbound: TcpListener,
    /// 15006: plaintext inbound connections.
    pub inbound_plaintext: TcpListener,
    /// 15008: HBONE.
    pub hbone: TcpListener,
}

/// Opens the pod's listeners inside its namespace.
///
/// 15001 and 15006 bind to loopback: only `sk_lookup` steers traffic to them, and loopback
/// keeps them off the pod's network. 15008 binds to all addresses, since peers reach it
/// directly.
pub fn open_listeners(ns: &Netns) -> Result<PodListeners, CaptureError> {
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let outbound = listen_in(ns, SocketAddr::new(localhost, ports::OUTBOUND), true)?;
    let inbound_plaintext = listen_in(
        ns,
        SocketAddr::new(localhost, ports::INBOUND_PLAINTEXT),
        false,
    )?;
    let hbone = listen_in(
        ns,
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), ports::HBONE),
        false,
    )?;
    Ok(PodListeners {
        outbound,
        inbound_plaintext,
        hbone,
    })
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
            if transparent {
                // Accepted sockets take the original destination as their local address,
                // which is not local to the pod; replies from it need IP_TRANSPARENT.
                s.set_ip_transparent_v4(true)?;
            }
            s.bind(&addr.into())?;
            s.listen(BACKLOG)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })?
        .map_err(err)?;
    TcpListener::from_std(socket.into()).map_err(err)
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

/// Installs the capture rule and route in the pod (idempotent).
pub fn install_routing(ns: &Netns, pod_ip: IpAddr) -> Result<(), CaptureError> {
    // A rule left by a crashed ztunnel would otherwise be duplicated.
    let _ = ip(ns, &rule_args("del"));
    ip(ns, &rule_args("add"))?;
    let src = pod_ip.to_string();
    ip(
        ns,
        &[
            "route",
            "replace",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            CAPTURE_TABLE,
            "src",
            &src,
        ],
    )?;
    Ok(())
}

/// Removes the capture rule and route from the pod. Missing pieces are not an error.
pub fn remove_routing(ns: &Netns) -> Result<(), CaptureError> {
    while ip(ns, &rule_args("del")).is_ok() {}
    let _ = ip(ns, &["route", "flush", "table", CAPTURE_TABLE]);
    Ok(())
}

fn rule_args(verb: &str) -> Vec<String> {
    let mark = format!("{CAPTURE_MARK:#x}/{CAPTURE_MARK:#x}");
    [
        "rule",
        verb,
        "fwmark",
        &mark,
        "lookup",
        CAPTURE_TABLE,
        "priority",
        CAPTURE_RULE_PRIORITY,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn ip<S: AsRef<str>>(ns: &Netns, args: &[S]) -> Result<(), CaptureError> {
    let netns = ns.path().display().to_string();
    // Our open handle, not the discovery path: a /proc/<pid> path dies with its process.
    let handle = format!("/proc/{}/fd/{}", std::process::id(), ns.file().as_raw_fd());
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let command = format!("ip {}", args.join(" "));
    // nsenter runs `ip` in the pod's namespace without touching any thread of ours.
    let output = Command::new("nsenter")
        .arg(format!("--net={handle}"))
        .arg("--")
        .arg("ip")
        .args(&args)
        .output()
        .map_err(|e| CaptureError::Routing {
            command: command.clone(),
            netns: netns.clone(),
            output: e.to_string(),
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(CaptureError::Routing {
            command,
            netns,
            output: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}
