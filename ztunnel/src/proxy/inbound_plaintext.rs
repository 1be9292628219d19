//! Inbound plaintext (15006): connections from outside the mesh to an enrolled pod,
//! accepted in permissive mode and delivered to the app.

use std::net::SocketAddr;
use std::sync::Arc;

use ambit_shared::copy;
use tokio::net::TcpStream;
use tracing::{Instrument, info_span, warn};

use super::outbound::ignore_close;
use super::{AccessLog, Pod, ProxyContext};
use crate::capture::{connect_in, delivery_addr};

/// Delivers one plaintext inbound connection.
pub async fn handle(stream: TcpStream, peer: SocketAddr, pod: Arc<Pod>, ctx: Arc<ProxyContext>) {
    let Ok(dst) = stream.local_addr() else { return };
    let span = info_span!("inbound_plaintext", src = %peer, dst = %dst, pod = %pod.workload());
    async move {
        let mut log = AccessLog::new(&ctx, "inbound", peer, dst);
        log.destination(Some(pod.identity.clone()), Some(pod.workload()), None);
        if dst.ip().is_loopback() || ambit_shared::ports::is_reserved(dst.port()) {
            warn!("refused: call to ztunnel's own port {}", dst.port());
            log.fail(format!("refused call to ztunnel's own port {}", dst.port()));
            return;
        }
        let snapshot = ctx.snapshot.borrow().clone();
        if let Err(reason) = super::authorize(&snapshot, None, peer.ip(), dst) {
            let _ = stream.set_zero_linger();
            log.deny(format!("denied: {reason}"));
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
                warn!(error = %e, "inbound delivery failed");
                let _ = stream.set_zero_linger();
                log.fail(format!("connect {dst}: {e}"));
                return;
            }
        };
        log.established();
        let revoked = super::revoked(ctx.snapshot.clone(), None, peer.ip(), dst);
        tokio::select! {
            copied = copy::bidirectional(stream, app, &log.counters) => {
                if let Err(e) = copied.or_else(ignore_close) {
                    log.fail(e);
                }
            }
            reason = revoked => log.deny(format!("closed by policy change: {reason}")),
        }
    }
    .instrument(span)
    .await
}
