//! The overload manager: global and per-identity caps on what clients hold at once.
//!
//! Per-connection limits (HTTP/2 streams per connection, header sizes) do not bound a
//! client that opens many connections; these caps do. Two resources are counted, each
//! against a global cap and a cap per client identity (the one mutual TLS proved, so a
//! client cannot spread its load over names it makes up):
//!
//! - **HBONE streams**: every tunnel, from its CONNECT until it ends (HTTP connections and
//!   L4 forwarding inside it included). Over a cap the CONNECT is answered 503.
//! - **Requests**: every HTTP request from its head until its response body ends, and an
//!   upgraded stream (WebSocket) until it closes. Each costs tens of kilobytes of buffers
//!   and may hold an upstream connection. Over a cap the request is answered 503 with
//!   response flag `OM` (Envoy's "overload manager") and `x-envoy-overloaded: true`.
//!
//! Every refusal is counted in `ambit_waypoint_overload_shed_total{resource, scope}`
//! (`scope` is `global` or `identity`), and `ambit_waypoint_overload_in_flight{resource}`
//! shows the current counts. The per-identity caps default to a quarter of the global
//! ones, so one client, however busy or compromised, leaves room for at least three
//! others. Shedding happens before any other work on the request.

use std::collections::HashMap;
use std::sync::Arc;

use ambit_shared::identity::Identity;
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Default cap on HBONE streams open at once. Tunnels share TLS connections, so they cost
/// no file descriptor, but one with an idle HTTP/2 connection inside costs about 32 KB
/// (10,000 measured at 323 MB of waypoint RSS): this is a backstop near 2 GB, to be sized
/// to the pod's memory. One client may legitimately hold ten thousand
/// (`tests/scenarios/waypoint_drain.rs`), so the per-identity share (16,384) stays above
/// that.
pub const DEFAULT_MAX_HBONE_STREAMS: usize = 65_536;
/// Default cap on requests in flight at once. A request in flight costs tens of kilobytes
/// (about 50 KB against a slow backend, more for a client that does not read), so this
/// bounds that memory near a gigabyte; a quarter of it (4,096) per identity still lets one
/// busy client, such as an ingress gateway, keep 4,096 slow requests open.
pub const DEFAULT_MAX_REQUESTS: usize = 16_384;
/// The per-identity caps default to the global ones divided by this.
pub const PER_IDENTITY_SHARE: usize = 4;

/// The caps. Zero is not allowed (it would refuse everything): use the flags' minimum 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverloadConfig {
    /// HBONE streams open at once, all clients together.
    pub max_hbone_streams: usize,
    /// HBONE streams open at once per client identity.
    pub max_hbone_streams_per_identity: usize,
    /// Requests in flight at once, all clients together.
    pub max_requests: usize,
    /// Requests in flight at once per client identity.
    pub max_requests_per_identity: usize,
}

impl Default for OverloadConfig {
    fn default() -> Self {
        OverloadConfig {
            max_hbone_streams: DEFAULT_MAX_HBONE_STREAMS,
            max_hbone_streams_per_identity: DEFAULT_MAX_HBONE_STREAMS / PER_IDENTITY_SHARE,
            max_requests: DEFAULT_MAX_REQUESTS,
            max_requests_per_identity: DEFAULT_MAX_REQUESTS / PER_IDENTITY_SHARE,
        }
    }
}

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    /// HBONE streams (tunnels).
    HboneStreams,
    /// HTTP requests and upgraded streams.
    Requests,
}

impl Resource {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::HboneStreams => "hbone_streams",
            Resource::Requests => "requests",
        }
    }

    fn index(self) -> usize {
        match self {
            Resource::HboneStreams => 0,
            Resource::Requests => 1,
        }
    }
}

/// Which cap refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The global cap.
    Global,
    /// The client identity's cap.
    Identity,
}

impl Scope {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::Identity => "identity",
        }
    }
}

/// A refusal: the cap on `resource` in `scope` was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("overloaded: {} {} in flight reach the {} cap", .limit, .resource.as_str(), .scope.as_str())]
pub struct Shed {
    /// What ran out.
    pub resource: Resource,
    /// Which cap.
    pub scope: Scope,
    /// The cap.
    pub limit: usize,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShedLabels {
    resource: &'static str,
    scope: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    resource: &'static str,
}

/// Counts in flight, per resource: `[hbone streams, requests]`.
type Counts = [usize; 2];

#[derive(Debug, Default)]
struct State {
    global: Counts,
    /// Only identities with something in flight, so the map is bounded by what is open.
    per_identity: HashMap<Arc<str>, Counts>,
}

/// The overload manager; see the module docs.
#[derive(Debug)]
pub struct Overload {
    cfg: OverloadConfig,
    state: Mutex<State>,
    shed: Family<ShedLabels, Counter>,
    in_flight: Family<ResourceLabels, Gauge>,
    /// The two `in_flight` gauges, indexed by [`Resource::index`], so admitting a request
    /// looks no label set up.
    gauges: [Gauge; 2],
}

/// One stream or request admitted; given back when dropped.
#[derive(Debug)]
pub struct Permit {
    overload: Arc<Overload>,
    resource: Resource,
    identity: Arc<str>,
}

/// The key of clients without a proven identity (the benchmarks' plaintext listener has
/// none to offer); they share one cap.
const ANONYMOUS: &str = "-";

// === impl Overload ===

impl Overload {
    /// Creates the manager and registers its metrics under `ambit_waypoint_overload_`.
    pub fn new(cfg: OverloadConfig, registry: &mut Registry) -> Arc<Self> {
        let in_flight = Family::<ResourceLabels, Gauge>::default();
        let gauge = |resource: Resource| {
            in_flight.get_or_create_owned(&ResourceLabels {
                resource: resource.as_str(),
            })
        };
        // In `Resource::index` order.
        let gauges = [Resource::HboneStreams, Resource::Requests].map(gauge);
        let o = Overload {
            cfg,
            state: Mutex::default(),
            shed: Family::default(),
            in_flight,
            gauges,
        };
        for resource in [Resource::HboneStreams, Resource::Requests] {
            for scope in [Scope::Global, Scope::Identity] {
                let _ = o.shed.get_or_create(&ShedLabels {
                    resource: resource.as_str(),
                    scope: scope.as_str(),
                });
            }
        }
        let ambit = registry.sub_registry_with_prefix("ambit");
        ambit.register(
            "waypoint_overload_shed",
            "HBONE streams and requests refused with 503 because a cap was reached, by resource (hbone_streams, requests) and scope (global, identity)",
            o.shed.clone(),
        );
        ambit.register(
            "waypoint_overload_in_flight",
            "HBONE streams and requests in flight, as the overload caps count them",
            o.in_flight.clone(),
        );
        Arc::new(o)
    }

    /// The caps in force.
    pub fn config(&self) -> OverloadConfig {
        self.cfg
    }

    fn limits(&self, resource: Resource) -> (usize, usize) {
        match resource {
            Resource::HboneStreams => (
                self.cfg.max_hbone_streams,
                self.cfg.max_hbone_streams_per_identity,
            ),
            Resource::Requests => (self.cfg.max_requests, self.cfg.max_requests_per_identity),
        }
    }

    /// Takes one `resource` for `identity`, or refuses (and counts the refusal) when a cap
    /// is reached.
    pub fn admit(
        self: &Arc<Self>,
        resource: Resource,
        identity: Option<&Identity>,
    ) -> Result<Permit, Shed> {
        let key: Arc<str> = identity.map_or_else(|| ANONYMOUS.into(), |id| id.to_string().into());
        self.admit_key(resource, key)
    }

    /// [`Overload::admit`] for the client that holds `held` (a tunnel's permit), without
    /// spelling its identity out again: the per-request path.
    pub fn admit_same_client(
        self: &Arc<Self>,
        resource: Resource,
        held: &Permit,
    ) -> Result<Permit, Shed> {
        self.admit_key(resource, held.identity.clone())
    }

    fn admit_key(self: &Arc<Self>, resource: Resource, key: Arc<str>) -> Result<Permit, Shed> {
        let (global_cap, identity_cap) = self.limits(resource);
        let i = resource.index();
        let refused = {
            let mut state = self.state.lock();
            if state.global[i] >= global_cap {
                Some((Scope::Global, global_cap))
            } else {
                let mine = state.per_identity.entry(key.clone()).or_default();
                if mine[i] >= identity_cap {
                    Some((Scope::Identity, identity_cap))
                } else {
                    mine[i] += 1;
                    state.global[i] += 1;
                    self.gauge(resource).set(state.global[i] as i64);
                    None
                }
            }
        };
        if let Some((scope, limit)) = refused {
            self.shed
                .get_or_create(&ShedLabels {
                    resource: resource.as_str(),
                    scope: scope.as_str(),
                })
                .inc();
            return Err(Shed {
                resource,
                scope,
                limit,
            });
        }
        Ok(Permit {
            overload: self.clone(),
            resource,
            identity: key,
        })
    }

    fn gauge(&self, resource: Resource) -> &Gauge {
        &self.gauges[resource.index()]
    }

    fn release(&self, resource: Resource, identity: &Arc<str>) {
        let i = resource.index();
        let mut state = self.state.lock();
        state.global[i] = state.global[i].saturating_sub(1);
        self.gauge(resource).set(state.global[i] as i64);
        if let Some(mine) = state.per_identity.get_mut(identity) {
            mine[i] = mine[i].saturating_sub(1);
            if *mine == [0, 0] {
                state.per_identity.remove(identity);
            }
        }
    }

    /// In flight now: `(global, for identity)`, for tests and diagnostics.
    pub fn in_flight(&self, resource: Resource, identity: Option<&Identity>) -> (usize, usize) {
        let key = identity.map_or_else(|| ANONYMOUS.to_string(), ToString::to_string);
        let state = self.state.lock();
        let i = resource.index();
        let mine = state.per_identity.get(key.as_str()).map_or(0, |c| c[i]);
        (state.global[i], mine)
    }
}

// === impl Permit ===

impl Drop for Permit {
    fn drop(&mut self) {
        self.overload.release(self.resource, &self.identity);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_shared::telemetry::encode;

    fn id(sa: &str) -> Identity {
        format!("spiffe://cluster.local/ns/shop/sa/{sa}")
            .parse()
            .expect("identity")
    }

    #[test]
    fn caps_are_per_identity_and_global_and_given_back() {
        let mut registry = Registry::default();
        let o = Overload::new(
            OverloadConfig {
                max_hbone_streams: 10,
                max_hbone_streams_per_identity: 10,
                max_requests: 3,
                max_requests_per_identity: 2,
            },
            &mut registry,
        );
        let (a, b, c) = (id("a"), id("b"), id("c"));
        let a1 = o.admit(Resource::Requests, Some(&a)).expect("a 1");
        let a2 = o.admit(Resource::Requests, Some(&a)).expect("a 2");
        let shed = o.admit(Resource::Requests, Some(&a)).expect_err("a 3");
        assert_eq!((shed.scope, shed.limit), (Scope::Identity, 2));
        // Streams are counted apart from requests, and a stream's client is its requests'.
        let s = o.admit(Resource::HboneStreams, Some(&a)).expect("stream");
        let shed = o
            .admit_same_client(Resource::Requests, &s)
            .expect_err("a's cap, through its tunnel");
        assert_eq!(shed.scope, Scope::Identity);
        // Another identity is still served, up to the global cap.
        let b1 = o.admit(Resource::Requests, Some(&b)).expect("b 1");
        let shed = o.admit(Resource::Requests, Some(&c)).expect_err("global");
        assert_eq!((shed.scope, shed.limit), (Scope::Global, 3));
        assert_eq!(o.in_flight(Resource::Requests, Some(&a)), (3, 2));
        drop(a1);
        let c1 = o.admit(Resource::Requests, Some(&c)).expect("room again");
        drop((a2, b1, c1, s));
        assert_eq!(o.in_flight(Resource::Requests, None), (0, 0));
        assert!(
            o.state.lock().per_identity.is_empty(),
            "idle identities are forgotten"
        );
        let text = encode(&registry).expect("encodes");
        for want in [
            r#"ambit_waypoint_overload_shed_total{resource="requests",scope="identity"} 2"#,
            r#"ambit_waypoint_overload_shed_total{resource="requests",scope="global"} 1"#,
            r#"ambit_waypoint_overload_shed_total{resource="hbone_streams",scope="global"} 0"#,
            r#"ambit_waypoint_overload_in_flight{resource="requests"} 0"#,
        ] {
            assert!(text.contains(want), "{want} missing in\n{text}");
        }
    }

    #[test]
    fn defaults_leave_room_for_four_identities() {
        let d = OverloadConfig::default();
        assert_eq!(
            d.max_requests_per_identity * PER_IDENTITY_SHARE,
            d.max_requests
        );
        assert_eq!(
            d.max_hbone_streams_per_identity * PER_IDENTITY_SHARE,
            d.max_hbone_streams
        );
    }
}
