//! A plaintext HTTP listener for benchmarks (`waypoint run --plaintext-listen`).
//!
//! It lets a load generator speak HTTP to the waypoint directly, the way it would to Envoy
//! or nginx, so an L7 comparison measures the proxies' HTTP work rather than TLS and HBONE
//! in front of them. Every connection is treated as a tunnel to one fixed `VIP:port`
//! (`--plaintext-listen LISTEN=VIP:PORT`), and the client is *assumed* to be the workload that owns its
//! source address: nothing proves it, so this listener must never face untrusted
//! networks. Past the accept, requests take exactly the HBONE path's code: protocol
//! detection, routing, filters, authorization, retries and metrics.

use std::net::SocketAddr;
use std::sync::Arc;

use ambit_shared::admission::Listener;
use ambit_shared::drain::DrainWatcher;
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, info, info_span, warn};

use super::{Context, Downstream, resolve, serve_stream};
use crate::metrics::Source;
use crate::overload::Resource;

/// Where the plaintext listener listens and what its connections dial.
#[derive(Debug, Clone, Copy)]
pub struct PlaintextListen {
    /// Listening address.
    pub listen: SocketAddr,
    /// The service `VIP:port` (or workload `IP:port`) every connection is a tunnel to.
    pub target: SocketAddr,
}

impl std::str::FromStr for PlaintextListen {
    type Err = String;

    /// `LISTEN=TARGET`, e.g. `0.0.0.0:8080=10.96.0.10:80`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (listen, target) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not LISTEN=TARGET"))?;
        let parse = |what: &str, v: &str| {
            v.parse::<SocketAddr>()
                .map_err(|e| format!("{what} {v:?} is not ip:port: {e}"))
        };
        Ok(PlaintextListen {
            listen: parse("listen address", listen)?,
            target: parse("target", target)?,
        })
    }
}

/// Binds the listener; [`serve`] runs it.
pub async fn bind(cfg: PlaintextListen) -> std::io::Result<TcpListener> {
    TcpListener::bind(cfg.listen).await
}

/// Accepts plaintext connections until a drain starts; one task per connection.
pub async fn serve(
    mut listener: Listener,
    target: SocketAddr,
    ctx: Arc<Context>,
    drain: DrainWatcher,
) {
    if let Ok(addr) = listener.local_addr() {
        warn!(%addr, %target, "serving plaintext HTTP for benchmarks: clients are identified by source address only");
    }
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = drain.signaled() => {
                info!("draining: no longer accepting plaintext connections");
                return;
            }
        };
        let span = info_span!("plaintext", peer = %accepted.peer);
        let task = connection(
            accepted.stream,
            accepted.peer,
            target,
            ctx.clone(),
            drain.clone(),
        );
        let permit = accepted.permit;
        tokio::spawn(
            async move {
                task.await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    dialled: SocketAddr,
    ctx: Arc<Context>,
    drain: DrainWatcher,
) {
    let snap = ctx.snapshot.borrow().clone();
    let principal = snap
        .workload_by_ip(peer.ip())
        .and_then(|w| snap.config.identity_of(w).ok());
    let Some(principal) = principal else {
        warn!(%peer, "plaintext client is not a known workload; connection refused");
        return;
    };
    let admission = match ctx.overload.admit(Resource::HboneStreams, Some(&principal)) {
        Ok(p) => p,
        Err(shed) => {
            warn!(%peer, error = %shed, "plaintext connection refused: overloaded");
            return;
        }
    };
    let local = tcp
        .local_addr()
        .ok()
        .map(|a| ambit_shared::listen::canonical(a).ip());
    let target = match resolve(&snap, &ctx.waypoint, dialled, local) {
        Ok(t) => t,
        Err(e) => {
            warn!(error = %e, "plaintext target is not served here; connection refused");
            return;
        }
    };
    let source = Source::new(&snap, &principal, peer.ip(), None);
    let down = Arc::new(Downstream {
        ctx: ctx.clone(),
        target,
        source,
        peer,
        forwarded: None,
        dialled,
        admission: Some(admission),
    });
    serve_stream(tcp, down, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_and_target() {
        let p: PlaintextListen = "0.0.0.0:8080=10.96.0.10:80".parse().expect("valid");
        assert_eq!(p.listen, SocketAddr::from(([0, 0, 0, 0], 8080)));
        assert_eq!(p.target, SocketAddr::from(([10, 96, 0, 10], 80)));
        assert!("0.0.0.0:8080".parse::<PlaintextListen>().is_err());
        assert!("0.0.0.0:8080=web:80".parse::<PlaintextListen>().is_err());
    }
}
