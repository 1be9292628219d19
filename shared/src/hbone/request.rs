//! CONNECT requests: what the client sends, and what the server accepts.

use std::net::SocketAddr;

use http::{Method, Request, StatusCode, Version};

/// Header carrying the original client address, RFC 7239 style.
pub const FORWARDED: &str = "forwarded";
/// W3C baggage header (source workload metadata).
pub const BAGGAGE: &str = "baggage";
/// W3C trace-context header.
pub const TRACEPARENT: &str = "traceparent";

/// Why a CONNECT request was refused, paired with the status the peer gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Anything but CONNECT.
    #[error("method {0} is not CONNECT")]
    NotConnect(String),
    /// The authority is missing or not `ip:port`.
    #[error("authority {0:?} is not ip:port")]
    BadAuthority(String),
    /// The authority names an address this server does not serve.
    #[error("{0} is not a workload served here")]
    UnknownDestination(SocketAddr),
    /// The authority names one of the proxy's own ports.
    #[error("port {0} belongs to the proxy itself")]
    ReservedPort(u16),
    /// Policy denied the connection.
    #[error("denied by policy: {0}")]
    Denied(String),
    /// The destination application refused or could not be reached.
    #[error("destination {addr} unreachable: {reason}")]
    Unreachable {
        /// The destination.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
}

impl RequestError {
    /// The HTTP status the peer receives.
    pub fn status(&self) -> StatusCode {
        match self {
            RequestError::NotConnect(_)
            | RequestError::BadAuthority(_)
            | RequestError::UnknownDestination(_)
            | RequestError::ReservedPort(_) => StatusCode::BAD_REQUEST,
            RequestError::Denied(_) => StatusCode::UNAUTHORIZED,
            RequestError::Unreachable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Builds the CONNECT request for `dst`, telling the peer the original client `src`.
pub fn connect_request(
    dst: SocketAddr,
    src: SocketAddr,
    baggage: Option<&str>,
    traceparent: &str,
) -> Request<()> {
    let mut builder = Request::builder()
        .method(Method::CONNECT)
        .version(Version::HTTP_2)
        .uri(without_scope(dst).to_string())
        .header(FORWARDED, forwarded_for(src))
        .header(TRACEPARENT, traceparent);
    if let Some(b) = baggage {
        builder = builder.header(BAGGAGE, b);
    }
    // Every part is a valid header value by construction (addresses, hex, our own baggage).
    builder.body(()).unwrap_or_else(|_| Request::new(()))
}

fn forwarded_for(src: SocketAddr) -> String {
    // RFC 7239 §6: the node is quoted; SocketAddr's Display already brackets IPv6.
    format!("for=\"{}\"", without_scope(src))
}

/// `addr` without an IPv6 scope (zone) ID or flow label. A link-local socket carries the
/// index of one of this host's interfaces, which means nothing to the peer (found by the
/// `hbone_request` fuzz target: `[fe80::1%2]:80` went on the wire as it is).
fn without_scope(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip(), addr.port())
}

/// Checks a request is a CONNECT to `ip:port` and returns the destination.
pub fn parse_connect<B>(req: &Request<B>) -> Result<SocketAddr, RequestError> {
    if req.method() != Method::CONNECT {
        return Err(RequestError::NotConnect(req.method().to_string()));
    }
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .unwrap_or_default();
    let addr: SocketAddr = authority
        .parse()
        .map_err(|_| RequestError::BadAuthority(authority.to_string()))?;
    // A zone ID names an interface of the sender's host; honouring it here would let a peer
    // pick one of ours.
    let scoped = matches!(addr, SocketAddr::V6(v6) if v6.scope_id() != 0);
    if addr.port() == 0 || addr.ip().is_unspecified() || scoped {
        return Err(RequestError::BadAuthority(authority.to_string()));
    }
    Ok(addr)
}

/// The client address from a `forwarded: for="ip:port"` header, if present and well formed.
pub fn forwarded_client<B>(req: &Request<B>) -> Option<SocketAddr> {
    let value = req.headers().get(FORWARDED)?.to_str().ok()?;
    value
        .split(';')
        .flat_map(|p| p.split(','))
        .find_map(|part| {
            let v = part.trim().strip_prefix("for=")?;
            v.trim_matches('"').parse().ok()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dst: SocketAddr = "10.1.2.3:8080".parse().expect("addr");
        let src: SocketAddr = "10.1.1.2:45000".parse().expect("addr");
        let req = connect_request(
            dst,
            src,
            Some("k8s.namespace.name=shop"),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        assert_eq!(parse_connect(&req), Ok(dst));
        assert_eq!(forwarded_client(&req), Some(src));
    }

    #[test]
    fn link_local_scopes_stay_on_this_host() {
        let scoped = |s: &str| -> SocketAddr {
            let mut a: std::net::SocketAddrV6 = s.parse().expect("addr");
            a.set_scope_id(17152);
            a.into()
        };
        let req = connect_request(scoped("[fe80::1]:80"), scoped("[fe80::2]:4000"), None, "00");
        assert_eq!(req.uri(), "[fe80::1]:80");
        assert_eq!(
            parse_connect(&req),
            Ok("[fe80::1]:80".parse().expect("addr"))
        );
        assert_eq!(
            forwarded_client(&req),
            Some("[fe80::2]:4000".parse().expect("addr"))
        );
    }

    #[test]
    fn refuses_bad_requests_with_400() {
        let get = Request::get("http://10.1.2.3:80/").body(()).expect("req");
        assert_eq!(
            parse_connect(&get).map_err(|e| e.status()),
            Err(StatusCode::BAD_REQUEST)
        );
        for authority in [
            "example.com:80",
            "10.1.2.3",
            "10.1.2.3:0",
            "0.0.0.0:80",
            "[fe80::1%2]:80",
        ] {
            let req = Request::builder()
                .method(Method::CONNECT)
                .uri(authority)
                .body(())
                .expect("req");
            let err = parse_connect(&req).expect_err(authority);
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{authority}");
        }
    }
}
