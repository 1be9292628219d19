//! `RequestMirror`: a copy of the request goes to the mirror service, its `Host` (or
//! `:authority`) suffixed with `-shadow` as Envoy does; the answer is read and discarded.
//!
//! The original never waits for the mirror: the copy is sent from a task of its own, with
//! no retries. Bounds: at most [`MAX_IN_FLIGHT`] copies at once (more are skipped), a copy
//! is made only of a body that fits the retry buffer and has arrived within
//! [`BODY_WAIT`] (otherwise it is skipped rather than holding the original), and each copy
//! ends within [`MIRROR_TIMEOUT`].

use std::sync::Arc;
use std::time::Duration;

use ambit_shared::config::index::Snapshot;
use ambit_shared::route::Mirror;
use http::{HeaderValue, Request, Version};
use http_body_util::BodyExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::debug;

use crate::listener::{Context, endpoints};
use crate::route::Target;
use crate::upstream::body::{CopyState, ReplayBody};
use crate::upstream::retry::{Failure, RetryPolicy};
use crate::upstream::{HttpVersion, Plan, RetryObserver};

/// Mirror copies in flight at once, over all routes.
pub const MAX_IN_FLIGHT: usize = 256;
/// How long a copy waits for the original's body to be complete.
pub const BODY_WAIT: Duration = Duration::from_secs(1);
/// Bound on one copy, answer included.
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);
const BODY_POLL: Duration = Duration::from_millis(5);

/// Bounds the copies in flight.
#[derive(Debug)]
pub struct MirrorGate(Arc<Semaphore>);

impl Default for MirrorGate {
    fn default() -> Self {
        MirrorGate(Arc::new(Semaphore::new(MAX_IN_FLIGHT)))
    }
}

impl MirrorGate {
    fn try_enter(&self) -> Option<OwnedSemaphorePermit> {
        self.0.clone().try_acquire_owned().ok()
    }

    /// Copies in flight now.
    pub fn in_flight(&self) -> usize {
        MAX_IN_FLIGHT.saturating_sub(self.0.available_permits())
    }
}

struct Quiet;

impl RetryObserver for Quiet {
    fn retry(&self, _destination: &str, _failure: Failure, _admitted: bool) {}
}

/// `host[:port]` with `-shadow` after the host.
pub fn shadow_host(host: &str) -> String {
    // An IPv6 literal's colons are inside brackets; the port follows the last `]`.
    let split = match host.rfind(':') {
        Some(i) if !host[i..].contains(']') && host.matches(':').count() == 1 => Some(i),
        Some(i) if host.starts_with('[') && host[..i].ends_with(']') => Some(i),
        _ => None,
    };
    match split {
        Some(i) => format!("{}-shadow{}", &host[..i], &host[i..]),
        None => format!("{host}-shadow"),
    }
}

/// Starts a copy of the request to `mirror`'s service; returns at once.
pub fn start(
    ctx: &Arc<Context>,
    snap: &Snapshot,
    mirror: &Mirror,
    head: &http::request::Parts,
    body: &ReplayBody,
) {
    let metrics = ctx.upstream.destinations.metrics.clone();
    let key = format!("{}/{}", mirror.namespace, mirror.name);
    let Some((svc, _)) = snap.service(&mirror.namespace, &mirror.name) else {
        metrics.mirrored(&key, "failed");
        debug!(mirror = %key, "mirror service not found");
        return;
    };
    let Some(port) = svc.ports.iter().find(|p| p.port == mirror.port) else {
        metrics.mirrored(&key, "failed");
        debug!(mirror = %key, port = mirror.port, "mirror service has no such port");
        return;
    };
    let target = Target::Service {
        namespace: mirror.namespace.as_str().into(),
        name: mirror.name.as_str().into(),
        port: mirror.port,
        target_port: port.target_port.unwrap_or(port.port),
        port_name: port.name.as_deref().map(Into::into),
    };
    let eps = endpoints(snap, &target);
    if eps.is_empty() {
        metrics.mirrored(&key, "failed");
        return;
    }
    let Some(permit) = ctx.upstream.resilience.mirrors.try_enter() else {
        metrics.mirrored(&key, "skipped_busy");
        return;
    };
    let mut copy = Request::new(());
    *copy.method_mut() = head.method.clone();
    *copy.uri_mut() = head.uri.clone();
    *copy.version_mut() = head.version;
    *copy.headers_mut() = head.headers.clone();
    let (mut parts, ()) = copy.into_parts();
    if let Some(host) = parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        && let Ok(v) = HeaderValue::from_str(&shadow_host(host))
    {
        parts.headers.insert(http::header::HOST, v);
    }
    if let Some(a) = parts.uri.authority() {
        let mut uri = parts.uri.clone().into_parts();
        if let Ok(shadow) = shadow_host(a.as_str()).parse() {
            uri.authority = Some(shadow);
            if let Ok(u) = http::Uri::from_parts(uri) {
                parts.uri = u;
            }
        }
    }
    let version = if head.version == Version::HTTP_2 {
        HttpVersion::Http2
    } else {
        HttpVersion::Http1
    };
    let grpc = crate::listener::http::is_grpc(&head.headers);
    let source = body.copy_handle();
    let ctx = ctx.clone();
    let dest: Arc<str> = key.into();
    tokio::spawn(async move {
        let _permit = permit;
        let deadline = tokio::time::Instant::now() + BODY_WAIT;
        let chunks = loop {
            match source.state() {
                CopyState::Complete(c) => break Some(c),
                CopyState::Unavailable => break None,
                CopyState::Pending if tokio::time::Instant::now() >= deadline => break None,
                CopyState::Pending => tokio::time::sleep(BODY_POLL).await,
            }
        };
        drop(source);
        let Some(chunks) = chunks else {
            metrics.mirrored(&dest, "skipped_body");
            return;
        };
        let body = ReplayBody::from_chunks(chunks);
        let retry = RetryPolicy::none();
        let plan = Plan {
            destination: &dest,
            endpoints: &eps,
            version,
            retry: &retry,
            attempt_timeout: None,
            grpc,
        };
        let exchange = async {
            let reply = ctx.upstream.send(&parts, &body, &plan, &Quiet).await.ok()?;
            let status = reply.response.status();
            let mut incoming = reply.response.into_body();
            while let Some(frame) = incoming.frame().await {
                frame.ok()?;
            }
            Some(status)
        };
        match tokio::time::timeout(MIRROR_TIMEOUT, exchange).await {
            Ok(Some(status)) => {
                metrics.mirrored(&dest, "sent");
                debug!(mirror = %dest, %status, "mirror answered");
            }
            _ => metrics.mirrored(&dest, "failed"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_host_keeps_the_port() {
        assert_eq!(shadow_host("reviews.shop"), "reviews.shop-shadow");
        assert_eq!(shadow_host("reviews.shop:8080"), "reviews.shop-shadow:8080");
        assert_eq!(shadow_host("10.0.0.1:80"), "10.0.0.1-shadow:80");
        assert_eq!(shadow_host("[fd00::1]:80"), "[fd00::1]-shadow:80");
        assert_eq!(shadow_host("[fd00::1]"), "[fd00::1]-shadow");
    }
}
