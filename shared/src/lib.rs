//! Ambit's shared library, used by the node tunnel and the waypoint.
//!
//! Dependencies point down this list only:
//! - [`identity`]: SPIFFE identities, parsed once at the boundary.
//! - [`config`]: the configuration model and its YAML file source.
//! - [`ca`]: the local certificate authority for file/dev mode.
//! - [`policy`]: L4 authorization decisions.
//! - [`route`]: L7 routing with Gateway API `HTTPRoute`/`GRPCRoute`: route selection,
//!   weighted backends and filters, as pure functions.
//! - [`tls`]: rustls configurations that check SPIFFE identities.
//! - [`admission`]: what peers may hold on every listener: descriptors (a reserve is
//!   kept), handshakes in flight, connections per source; accept loops that never die.
//! - [`hbone`]: HTTP/2 CONNECT tunnels (client pool, server helpers, stream adapter).
//! - [`copy`]: bidirectional byte copying with counters.
//! - [`signer`]: the central signer's protocol and client (certificates over the network).
//! - [`certs`]: workload certificates renewed at half-life, and the local CA's files
//!   watched for rotation.
//! - [`drain`]: graceful shutdown (trigger and watchers).
//! - [`balance`]: endpoint load counters, passive ejection and power-of-two-choices.
//! - [`trace`]: W3C `traceparent`.
//! - [`telemetry`]: Prometheus encoding and Istio label conventions shared by both proxies.
//! - [`admin`]: the HTTP plumbing of the metrics, readiness and admin endpoints.
//! - [`listen`]: binding listeners on both address families.
//! - [`memory`]: returning freed memory to the OS after a burst.
//! - [`logging`]: stderr logging, text or JSON, with a run-time filter handle.
//!
//! Feature flags: `testing` exposes helpers for tests; `cli` the command-line flags both
//! binaries share ([`admission::flags`]); `kubernetes` the Kubernetes config source;
//! `fuzzing` exposes [`fuzzing`], the entry points of the fuzz targets in `fuzz/`.
#![deny(missing_docs)]

pub mod admin;
pub mod admission;
pub mod balance;
pub mod ca;
pub mod certs;
pub mod config;
pub mod copy;
pub mod drain;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod hbone;
pub mod identity;
pub mod listen;
pub mod logging;
pub mod memory;
pub mod policy;
pub mod rlimit;
pub mod route;
pub mod signer;
pub mod telemetry;
pub mod tls;
pub mod trace;

/// The capture contract (ports, marks, routing table, delivery addresses), re-exported so
/// crates above `shared` take it from one place.
pub use ambit_capture_contract as capture_contract;

/// Well-known ports, the same as Istio's so operators feel at home. The ones the capture
/// programs know are the capture contract's ([`ambit_capture_contract`]), re-exported here so
/// there is one source for each.
pub mod ports {
    /// Outbound capture listener inside each enrolled pod.
    pub const OUTBOUND: u16 = ambit_capture_contract::OUTBOUND_PORT;
    /// Inbound plaintext capture listener inside each enrolled pod.
    pub const INBOUND_PLAINTEXT: u16 = ambit_capture_contract::INBOUND_PORT;
    /// HBONE (HTTP/2 CONNECT over mutual TLS).
    pub const HBONE: u16 = ambit_capture_contract::HBONE_PORT;
    /// DNS proxy.
    pub const DNS: u16 = ambit_capture_contract::DNS_PROXY_PORT;
    /// Readiness.
    pub const READINESS: u16 = 15021;
    /// Prometheus metrics.
    pub const METRICS: u16 = 15020;
    /// Admin (localhost only).
    pub const ADMIN: u16 = 15000;

    /// Ports that belong to the proxy itself: traffic addressed to them by an
    /// application is refused, so a pod can never loop traffic through its own tunnel.
    pub const RESERVED: [u16; 7] = [
        OUTBOUND,
        INBOUND_PLAINTEXT,
        HBONE,
        DNS,
        READINESS,
        METRICS,
        ADMIN,
    ];

    /// True if `port` is one of the proxy's own ports.
    pub fn is_reserved(port: u16) -> bool {
        RESERVED.contains(&port)
    }
}
