//! Binding a proxy's own listeners on every address of both families.
//!
//! `[::]:port` means "all addresses, IPv4 and IPv6": one dual-stack socket
//! (`IPV6_V6ONLY` off, whatever the host's `net.ipv6.bindv6only` says), so a pod or node of
//! any family reaches it. Where IPv6 is off, the same request falls back to `0.0.0.0:port`.
//! IPv4 peers of a dual-stack socket show up as `::ffff:a.b.c.d`; [`canonical`] turns them
//! back into IPv4, which is what policy (IPv4 `ipBlocks`) and logs must see.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

/// Binds and listens on `addr` (non-blocking), dual-stack for `[::]`.
pub fn bind_tcp(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    match try_bind(addr, backlog) {
        Err(e) if is_any_v6(addr) && ipv6_unavailable(&e) => try_bind(
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port()),
            backlog,
        ),
        other => other,
    }
}

fn try_bind(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if is_any_v6(addr) {
        socket.set_only_v6(false)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

fn is_any_v6(addr: SocketAddr) -> bool {
    matches!(addr.ip(), IpAddr::V6(v6) if v6.is_unspecified())
}

/// IPv6 is off (`ipv6.disable=1`, or no `::` to bind in this namespace).
fn ipv6_unavailable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
    )
}

/// A peer or local address as policy and logs must see it: IPv4-mapped IPv6 as IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_v6_takes_both_families() {
        let l = bind_tcp("[::]:0".parse().expect("addr"), 16).expect("bind");
        let port = l.local_addr().expect("addr").port();
        for to in ["127.0.0.1", "::1"] {
            let to: IpAddr = to.parse().expect("ip");
            std::net::TcpStream::connect((to, port)).expect("connect");
            let (_, peer) = loop {
                match l.accept() {
                    Ok(a) => break a,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(std::time::Duration::from_millis(5))
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            };
            assert_eq!(canonical(peer).ip(), to, "peer {peer}");
        }
    }
}
