//! Traffic that is not HTTP, forwarded at L4: one endpoint per connection (least
//! connections, power of two choices), bytes copied both ways, one access-log line and
//! Istio's TCP metrics per connection.

use std::sync::Arc;
use std::time::Instant;

use ambit_shared::copy::{self, Counters};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

use super::Downstream;
use crate::metrics::Peers;

/// Forwards `io` to one of the target's endpoints until both sides are done.
pub async fn forward<IO>(io: IO, down: Arc<Downstream>)
where
    IO: AsyncRead + AsyncWrite + Send + Unpin,
{
    let start = Instant::now();
    let snap = down.ctx.snapshot.borrow().clone();
    let client = crate::authz::Client {
        identity: down.source.principal.as_ref(),
        ip: down.peer.ip(),
    };
    let metrics = &down.ctx.metrics;
    if crate::authz::authorize_connection(&snap, metrics, client, &down.target).is_err() {
        return;
    }
    let endpoints = super::endpoints(&snap, &down.target);
    let counters = Counters::default();
    let opened = down.ctx.upstream.open_stream(&endpoints).await;
    let (endpoint, flags, error) = match opened {
        Ok((upstream, endpoint, _in_flight)) => {
            let peers = labels(&down, &snap, Some(&endpoint));
            down.ctx.metrics.tcp_opened(peers);
            let copied = copy::bidirectional(io, upstream, &counters).await;
            let error = match copied {
                Err(e) if !copy::is_closed(&e) => Some(e.to_string()),
                _ => None,
            };
            (Some(endpoint), "-", error)
        }
        Err(e) => {
            warn!(destination = %down.target.key(), error = %e, "L4 forward failed: no endpoint reachable");
            let flags = if e.error.is_none() { "UH" } else { "UF" };
            down.ctx
                .metrics
                .tcp_opened(labels(&down, &snap, e.endpoint.as_ref()));
            (e.endpoint.clone(), flags, Some(e.to_string()))
        }
    };
    let (received, sent) = counters.get();
    down.ctx.metrics.tcp_closed(
        labels(&down, &snap, endpoint.as_ref()),
        flags,
        received,
        sent,
    );
    let src_identity = down
        .source
        .principal
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    info!(target: "access",
        protocol = "TCP",
        request_protocol = "tcp",
        destination = %down.target.key(),
        dialled = %down.dialled,
        upstream = %endpoint.as_ref().map(|e| e.addr.to_string()).unwrap_or_default(),
        response_flags = flags,
        bytes_received = received,
        bytes_sent = sent,
        duration_ms = start.elapsed().as_millis() as u64,
        src.addr = %down.peer,
        src.forwarded_for = %down.forwarded.map(|f| f.to_string()).unwrap_or_default(),
        src.identity = %src_identity,
        src.workload = %down.source.workload.as_deref().unwrap_or(""),
        error = %error.as_deref().unwrap_or(""),
        "connection");
}

fn labels(
    down: &Downstream,
    snap: &ambit_shared::config::index::Snapshot,
    endpoint: Option<&crate::upstream::Endpoint>,
) -> crate::metrics::PeerLabels {
    Peers {
        source: &down.source,
        target: &down.target,
        endpoint: endpoint.map(|e| e.addr.ip()),
        endpoint_identity: endpoint.and_then(|e| e.identity.as_ref()),
    }
    .labels(snap)
}
