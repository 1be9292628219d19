//! Resilience features a `TrafficPolicy` (and the `RequestMirror` route filter) turn on,
//! decided per request before it is forwarded:
//!
//! - circuit breaking and outlier detection (`connectionPool`, `outlierDetection` on a
//!   Service): enforced by [`crate::upstream`] per destination service; [`admit`] hands it
//!   the settings in force ([`crate::upstream::destination`]).
//! - local rate limiting (`rateLimit` on a Service or route): a token bucket per target,
//!   or per (target, source identity); over the limit, 429 with `retry-after` and flag
//!   `RL` ([`bucket`]).
//! - fault injection (`fault` on a Service or route): a delay (flag `DI`) and/or an abort
//!   (flag `FI`), each for its own random share of requests.
//! - request mirroring: a copy of a share of requests goes to another service, its answer
//!   discarded, never holding up the original ([`mirror`]).
//!
//! A Service target means the destination service the request is sent to (the backend a
//! route picked, or the dialled service with no route). A route target means the route
//! (`HTTPRoute` or `GRPCRoute` of that name; the waypoint does not tell the kinds apart),
//! or one named rule of it with `sectionName`. When several policies match, every rate
//! limit applies, and the first fault found applies, route policies before Service ones.

pub mod bucket;
pub mod metrics;
pub mod mirror;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_shared::config::index::Snapshot;
use ambit_shared::config::model::{RateLimit, TrafficPolicy};
use http::{HeaderMap, HeaderValue, StatusCode};
use parking_lot::Mutex;

use self::bucket::{Bucket, PerSource, retry_after_secs};
use crate::filters::Filter;
use crate::listener::Context;
use crate::metrics::Source;
use crate::route::{Route, Target};
use crate::upstream::body::ReplayBody;
use crate::upstream::destination::Limits;
use crate::upstream::outlier::OutlierConfig;

/// Per-source buckets per rate-limited target.
pub const MAX_SOURCES_PER_TARGET: usize = 10_000;
/// Rate-limited targets tracked; beyond, those of policies no longer in force go first.
const MAX_LIMITERS: usize = 4096;

/// State the resilience features keep between requests.
#[derive(Debug, Default)]
pub struct Resilience {
    limiters: Mutex<HashMap<LimiterKey, Limiter>>,
    /// Mirror copies in flight.
    pub mirrors: mirror::MirrorGate,
}

/// A rate-limited target of a policy: (`namespace/policy`, target index).
type LimiterKey = (Arc<str>, usize);

#[derive(Debug)]
struct Limiter {
    cfg: RateLimit,
    shared: Bucket,
    per_source: PerSource,
    last_used: Instant,
}

impl Limiter {
    fn new(cfg: &RateLimit, now: Instant) -> Self {
        let bucket = Bucket::new(
            cfg.requests,
            cfg.interval.as_duration(),
            cfg.burst.unwrap_or(cfg.requests),
            now,
        );
        Limiter {
            cfg: cfg.clone(),
            per_source: PerSource::new(bucket.clone(), MAX_SOURCES_PER_TARGET),
            shared: bucket,
            last_used: now,
        }
    }
}

/// A request answered without being forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The status.
    pub status: StatusCode,
    /// Response flags (`RL`, `FI`, `DI,FI`).
    pub flags: &'static str,
    /// One line for the body.
    pub reason: String,
    /// `retry-after` seconds, for a rate limit.
    pub retry_after: Option<u64>,
}

impl Refusal {
    /// Adds the refusal's headers to the local answer.
    pub fn decorate(&self, headers: &mut HeaderMap) {
        if let Some(s) = self.retry_after {
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(s));
        }
    }
}

/// A request that goes ahead.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admitted {
    /// Response flags to record (`DI` after an injected delay).
    pub flags: Vec<&'static str>,
}

/// What a request is, for policy matching.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    /// The matched route rule.
    pub route: &'a Route,
    /// The chosen backend's own filters.
    pub backend_filters: &'a [Filter],
    /// The destination (the backend service, or the dialled workload).
    pub dest: &'a Target,
    /// The client.
    pub source: &'a Source,
    /// The request head, after the route's filters.
    pub head: &'a http::request::Parts,
    /// The request body as it will be sent.
    pub body: &'a ReplayBody,
}

/// Applies the resilience settings in force to a request about to be forwarded: hands
/// the destination's circuit-breaking and outlier settings to the upstream, takes rate
/// limit tokens, injects faults, and starts mirrors.
pub async fn admit(
    ctx: &Arc<Context>,
    snap: &Snapshot,
    req: RequestInfo<'_>,
) -> Result<Admitted, Refusal> {
    let policies = &snap.config.traffic_policies;
    let route_ref = RouteRef::parse(&req.route.name);
    let service = match req.dest {
        Target::Service {
            namespace, name, ..
        } => Some((&**namespace, &**name)),
        Target::Workload { .. } => None,
    };
    let state = &ctx.upstream.resilience;
    let metrics = &ctx.upstream.destinations.metrics;

    // Route policies first, then the destination service's.
    let mut matched: Vec<(usize, usize, &TrafficPolicy)> = Vec::new();
    for (pi, p) in policies.iter().enumerate() {
        for (ti, t) in p.target_refs.iter().enumerate() {
            if t.is_route()
                && let Some(r) = &route_ref
                && r.namespace == p.namespace
                && r.name == t.name
                && t.section_name.as_deref().is_none_or(|s| r.rule == Some(s))
            {
                matched.push((pi, ti, p));
            }
        }
    }
    let routes_end = matched.len();
    for (pi, p) in policies.iter().enumerate() {
        for (ti, t) in p.target_refs.iter().enumerate() {
            if t.is_service() && service == Some((p.namespace.as_str(), t.name.as_str())) {
                matched.push((pi, ti, p));
            }
        }
    }

    if let Target::Service { .. } = req.dest {
        let svc = &matched[routes_end..];
        let limits = svc
            .iter()
            .find_map(|(_, _, p)| p.connection_pool.as_ref())
            .map(|c| Limits {
                max_connections: c.max_connections,
                max_pending_requests: c.max_pending_requests,
                max_requests: c.max_requests,
                max_retries: c.max_retries,
            })
            .unwrap_or_default();
        let outliers = svc
            .iter()
            .find_map(|(_, _, p)| p.outlier_detection.as_ref())
            .map(|o| OutlierConfig {
                consecutive_5xx: o.consecutive_5xx_errors,
                consecutive_gateway: o.consecutive_gateway_errors,
                interval: o.interval.as_duration(),
                base_ejection: o.base_ejection_time.as_duration(),
                max_ejection_percent: o.max_ejection_percent,
            });
        ctx.upstream
            .destinations
            .configure(&req.dest.key(), &limits, outliers);
    }

    let source_id = req.source.principal.as_ref().map(ToString::to_string);
    let now = Instant::now();
    for (_, ti, p) in &matched {
        let Some(rl) = &p.rate_limit else { continue };
        let key: LimiterKey = (format!("{}/{}", p.namespace, p.name).into(), *ti);
        if let Err(wait) = state.take_token(&key, rl, source_id.as_deref(), now) {
            metrics.rate_limited(&key.0);
            return Err(Refusal {
                status: StatusCode::TOO_MANY_REQUESTS,
                flags: "RL",
                reason: format!("local rate limit of traffic policy {}", key.0),
                retry_after: Some(retry_after_secs(wait)),
            });
        }
    }

    let mut admitted = Admitted::default();
    if let Some(p) = matched
        .iter()
        .map(|(_, _, p)| p)
        .find(|p| p.fault.is_some())
        && let Some(fault) = &p.fault
    {
        let policy = format!("{}/{}", p.namespace, p.name);
        if let Some(d) = &fault.delay
            && draw(d.percentage)
        {
            metrics.fault(&policy, "delay");
            admitted.flags.push("DI");
            tokio::time::sleep(d.fixed_delay.as_duration()).await;
        }
        if let Some(a) = &fault.abort
            && draw(a.percentage)
        {
            metrics.fault(&policy, "abort");
            let delayed = !admitted.flags.is_empty();
            return Err(Refusal {
                status: StatusCode::from_u16(a.http_status)
                    .unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                flags: if delayed { "DI,FI" } else { "FI" },
                reason: format!("fault injected by traffic policy {policy}"),
                retry_after: None,
            });
        }
    }

    for f in req.route.filters.iter().chain(req.backend_filters) {
        if let Filter::RequestMirror(m) = f
            && m.selects(fastrand::u32(..m.denominator.max(1)))
        {
            mirror::start(ctx, snap, m, req.head, req.body);
        }
    }
    Ok(admitted)
}

/// True for `percentage` percent of calls, independently.
fn draw(percentage: f64) -> bool {
    percentage > 0.0 && fastrand::f64() * 100.0 < percentage
}

impl Resilience {
    fn take_token(
        &self,
        key: &LimiterKey,
        cfg: &RateLimit,
        source: Option<&str>,
        now: Instant,
    ) -> Result<(), Duration> {
        let mut map = self.limiters.lock();
        if map.len() >= MAX_LIMITERS && !map.contains_key(key) {
            // Limiters untouched for a minute are full again: forgetting them is harmless.
            map.retain(|_, l| now.saturating_duration_since(l.last_used) < Duration::from_secs(60));
        }
        let limiter = map
            .entry(key.clone())
            .or_insert_with(|| Limiter::new(cfg, now));
        if limiter.cfg != *cfg {
            *limiter = Limiter::new(cfg, now);
        }
        limiter.last_used = now;
        if cfg.per_source {
            // Clients without a proved identity share one bucket.
            limiter.per_source.take(source.unwrap_or("-"), now)
        } else {
            limiter.shared.take(now)
        }
    }
}

/// A route name as the route table gives it: `namespace/name` or `namespace/name/rule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RouteRef<'a> {
    namespace: &'a str,
    name: &'a str,
    rule: Option<&'a str>,
}

impl<'a> RouteRef<'a> {
    fn parse(s: &'a str) -> Option<Self> {
        let mut parts = s.splitn(3, '/');
        let namespace = parts.next()?;
        let name = parts.next()?;
        Some(RouteRef {
            namespace,
            name,
            rule: parts.next(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_names_parse() {
        assert_eq!(RouteRef::parse("default"), None);
        assert_eq!(
            RouteRef::parse("shop/reviews"),
            Some(RouteRef {
                namespace: "shop",
                name: "reviews",
                rule: None
            })
        );
        assert_eq!(
            RouteRef::parse("shop/reviews/canary").and_then(|r| r.rule),
            Some("canary")
        );
    }

    #[test]
    fn draws_are_independent_and_near_the_percentage() {
        assert!(!(0..1000).any(|_| draw(0.0)));
        assert!((0..1000).all(|_| draw(100.0)));
        let n = 20_000;
        let hits = (0..n).filter(|_| draw(10.0)).count();
        // 99.9 % interval of Binomial(20000, 0.1): 2000 ± 3.29 × 42.4.
        assert!((1860..=2140).contains(&hits), "{hits}");
    }

    #[test]
    fn rate_limit_state_follows_config_changes() {
        let r = Resilience::default();
        let now = Instant::now();
        let key: LimiterKey = ("ns/p".into(), 0);
        let second = "1s".parse().expect("a duration");
        let cfg = RateLimit {
            requests: 2,
            interval: second,
            burst: None,
            per_source: false,
        };
        assert!(r.take_token(&key, &cfg, None, now).is_ok());
        assert!(r.take_token(&key, &cfg, None, now).is_ok());
        assert!(r.take_token(&key, &cfg, None, now).is_err());
        let per_source = RateLimit {
            requests: 1,
            per_source: true,
            ..cfg.clone()
        };
        assert!(r.take_token(&key, &per_source, Some("a"), now).is_ok());
        assert!(r.take_token(&key, &per_source, Some("a"), now).is_err());
        assert!(r.take_token(&key, &per_source, Some("b"), now).is_ok());
    }
}
