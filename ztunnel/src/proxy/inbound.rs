//! Inbound HBONE (15008): verify the client certificate, check the CONNECT, deliver to the
//! app inside the pod.

use std::net::SocketAddr;
use std::sync::Arc;

use ambit_shared::admission::HandshakeError;
use ambit_shared::copy;
use ambit_shared::hbone::parse_connect;
use ambit_shared::hbone::request::{RequestError, forwarded_client};
use ambit_shared::hbone::server::{self, Incoming};
use ambit_shared::identity::Identity;
use ambit_shared::ports;
use ambit_shared::tls;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info_span, warn};

use super::outbound::ignore_close;
use super::{AccessLog, Pod, ProxyContext};
use crate::capture::{connect_in, delivery_addr};

/// The listener's name in metrics and logs.
pub const LISTENER: &str = "hbone";

/// Builds the TLS acceptor for `pod`: its certificate, client certificates required.
pub fn acceptor(pod: &Pod, ctx: &ProxyContext) -> Result<TlsAcceptor, tls::TlsError> {
    // The shared bundle is read at every handshake, so a rotated trust anchor takes effect
    // without rebuilding the acceptor.
    let config = tls::server_config(pod.cert.slot.clone(), &ctx.bundle, &ctx.trust_domain)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves one HBONE connection.
pub async fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    pod: Arc<Pod>,
    ctx: Arc<ProxyContext>,
) {
    let span = info_span!("inbound", peer = %peer, pod = %pod.workload());
    async move {
        let tls = match ctx
            .admission
            .tls_handshake(LISTENER, &acceptor, tcp, peer.ip())
            .await
        {
            Ok(tls) => tls,
            // Shed and timed-out connections are counted in the admission metrics; logging
            // each would let a flood of idle connections flood the log too.
            Err(
                e @ (HandshakeError::Shed(_) | HandshakeError::Timeout(_) | HandshakeError::Closed),
            ) => {
                debug!(error = %e, "HBONE connection closed before its handshake");
                return;
            }
            Err(e) => {
                warn!(error = %e, "HBONE TLS handshake failed; connection refused");
                return;
            }
        };
        let peer_identity = match tls::peer_identity(tls.get_ref().1.peer_certificates()) {
            Ok(id) => id,
            Err(e) => {
                // The verifier already demanded a SPIFFE identity; this is belt and braces.
                warn!(error = %e, "HBONE peer has no usable identity; connection refused");
                return;
            }
        };
        debug!(peer_identity = %peer_identity, "HBONE connection established");
        let result = server::serve(tls, ctx.hbone_timeouts, |incoming| {
            stream(
                incoming,
                peer,
                peer_identity.clone(),
                pod.clone(),
                ctx.clone(),
            )
            .in_current_span()
        })
        .await;
        match result {
            Ok(closed) => debug!(?closed, "HBONE connection closed"),
            Err(e) => {
                if let Some(phase) = e.timeout_phase() {
                    ctx.admission.count_timeout(LISTENER, phase);
                }
                debug!(error = %e, "HBONE connection ended with an error");
            }
        }
    }
    .instrument(span)
    .await
}

async fn stream(
    incoming: Incoming,
    peer: SocketAddr,
    peer_identity: Identity,
    pod: Arc<Pod>,
    ctx: Arc<ProxyContext>,
) {
    let src = forwarded_client(&incoming.request).unwrap_or(peer);
    let dst = parse_connect(&incoming.request)
        .unwrap_or_else(|_| SocketAddr::new(pod.primary().unwrap_or(peer.ip()), 0));
    let mut log = AccessLog::new(&ctx, "inbound", src, dst);
    log.via_hbone();
    log.source(Some(peer_identity.clone()), None);
    log.destination(Some(pod.identity.clone()), Some(pod.workload()), None);
    let dst = match check(&incoming, &pod) {
        Ok(dst) => dst,
        Err(e) => {
            warn!(status = e.status().as_u16(), error = %e, authority = ?incoming.request.uri().authority().map(|a| a.as_str()),
                method = %incoming.request.method(), "HBONE request refused");
            log.fail(format!("{} {}", e.status().as_u16(), e));
            incoming.refuse(e.status());
            return;
        }
    };
    // Policy sees the address the TLS connection came from, not the `forwarded` header a
    // peer could write anything into.
    let snapshot = ctx.snapshot.borrow().clone();
    if let Err(reason) = super::authorize(&snapshot, Some(&peer_identity), peer.ip(), dst) {
        let e = RequestError::Denied(reason);
        log.deny(format!("{} {}", e.status().as_u16(), e));
        incoming.refuse(e.status());
        return;
    }
    let app = match connect_in(
        &pod.netns,
        dst,
        Some(delivery_addr(dst)),
        &ctx.admission.fds(),
    )
    .await
    {
        Ok(app) => app,
        Err(e) => {
            let e = RequestError::Unreachable {
                addr: dst,
                reason: e.to_string(),
            };
            warn!(status = e.status().as_u16(), error = %e, "HBONE destination unreachable");
            log.fail(format!("{} {}", e.status().as_u16(), e));
            incoming.refuse(e.status());
            return;
        }
    };
    let tunnel = match incoming.accept() {
        Ok(t) => t,
        Err(e) => {
            log.fail(e);
            return;
        }
    };
    log.established();
    let revoked = super::revoked(ctx.snapshot.clone(), Some(peer_identity), peer.ip(), dst);
    tokio::select! {
        copied = copy::tunnel(app, tunnel, &log.counters.b_to_a, &log.counters.a_to_b) => {
            if let Err(e) = copied.or_else(ignore_close) {
                log.fail(e);
            }
        }
        reason = revoked => log.deny(format!("closed by policy change: {reason}")),
    }
}

fn check(incoming: &Incoming, pod: &Pod) -> Result<SocketAddr, RequestError> {
    let dst = parse_connect(&incoming.request)?;
    if !pod.has_addr(dst.ip()) {
        return Err(RequestError::UnknownDestination(dst));
    }
    if ports::is_reserved(dst.port()) {
        return Err(RequestError::ReservedPort(dst.port()));
    }
    Ok(dst)
}
