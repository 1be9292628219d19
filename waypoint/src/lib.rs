//! Ambit's waypoint: the per-namespace L7 proxy.
//!
//! A source ztunnel tunnels a client's connection to the waypoint over HBONE (port
//! 15008), presenting the client workload's certificate, with `:authority` naming the
//! service `VIP:port` (or the workload `IP:port`) the client dialled. The waypoint serves
//! the HTTP/1.1, HTTP/2 or gRPC inside the tunnel, routes each request (Gateway API
//! semantics), and sends it on over HBONE, with its own identity, to an endpoint picked per
//! request. Traffic that is not HTTP is forwarded at L4.
//!
//! Modules, from the edge inwards; dependencies point down this list only, and only
//! [`app`] knows them all:
//! - [`listener`]: HBONE accept, CONNECT resolution, protocol detection, the HTTP proxy
//!   and L4 forwarding.
//! - [`overload`]: global and per-identity caps on HBONE streams and requests in flight.
//! - [`head`]: the request head authorization and the backend both see (one host, path
//!   parameters refused or allowed).
//! - [`authz`]: authorization policies, per request and per L4 connection.
//! - [`route`]: the route model the proxy works on, and the tables that select routes.
//! - [`filters`]: header modifiers, redirects and URL rewrites.
//! - [`upstream`]: endpoint selection, connections, retries and the retry budget.
//! - [`metrics`]: Istio's request and TCP metrics, and the waypoint's own.
//! - [`admin`]: metrics (15020) and readiness (15021) endpoints.

pub mod admin;
pub mod app;
pub mod authz;
pub mod filters;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod head;
pub mod listener;
pub mod metrics;
pub mod overload;
pub mod resilience;
pub mod route;
pub mod upstream;
