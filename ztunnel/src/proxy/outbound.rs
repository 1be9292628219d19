//! Captured outbound connections (15001): tunnel to enrolled destinations over HBONE,
//! pass everything else through in plaintext.

use std::net::SocketAddr;
use std::sync::Arc;

use ambit_shared::copy;
use ambit_shared::hbone::{self, H2Stream, PoolKey};
use ambit_shared::ports;
use ambit_shared::tls;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{Instrument, debug, info_span, warn};

use super::{AccessLog, Pod, ProxyContext};
use crate::capture::connect_in;

/// Handles one captured connection from `pod`.
pub async fn handle(stream: TcpStream, peer: SocketAddr, pod: Arc<Pod>, ctx: Arc<ProxyContext>) {
    // sk_lookup hands us the SYN unchanged, so the original destination is our local address.
    let dst = match stream.local_addr() {
        Ok(a) => a,
        Err(e) => {
            debug!(error = %e, "captured connection closed before it could be read");
            return;
        }
    };
    let span = info_span!("outbound", src = %peer, dst = %dst, pod = %pod.workload());
    async move {
        let mut log = AccessLog::new("outbound", peer, dst);
        log.source(Some(pod.identity.clone()), Some(pod.workload()));
        if pod.is_self_call(dst) {
            warn!(
                "refused: the app called ztunnel's own port {} directly",
                dst.port()
            );
            log.fail(format!("refused call to ztunnel's own port {}", dst.port()));
            return;
        }
        let config = ctx.config.borrow().clone();
        let target = config
            .workload_by_ip(dst.ip())
            .filter(|w| config.is_enrolled(w));
        let copied = match target {
            Some(w) => {
                let dst_identity = match config.identity_of(w) {
                    Ok(id) => id,
                    Err(e) => return refuse(&stream, &mut log, e),
                };
                let hbone_addr = SocketAddr::new(dst.ip(), ports::HBONE);
                log.destination(
                    Some(dst_identity.clone()),
                    Some(format!("{}/{}", w.namespace, w.name)),
                    Some(hbone_addr),
                );
                match open_tunnel(peer, dst, hbone_addr, dst_identity, &pod, &ctx).await {
                    Ok(tunnel) => copy::bidirectional(stream, tunnel, &log.counters).await,
                    Err(e) => return refuse(&stream, &mut log, e),
                }
            }
            None => match connect_in(&pod.netns, dst, None).await {
                Ok(upstream) => copy::bidirectional(stream, upstream, &log.counters).await,
                Err(e) => return refuse(&stream, &mut log, format!("connect {dst}: {e}")),
            },
        };
        if let Err(e) = copied.or_else(ignore_close) {
            log.fail(e);
        }
    }
    .instrument(span)
    .await
}

/// Fails a connection we could not serve: the app gets a reset, as it would from a host
/// that refused it, rather than a clean close it might mistake for an empty answer.
fn refuse(stream: &TcpStream, log: &mut AccessLog, error: impl std::fmt::Display) {
    warn!(error = %error, "outbound connection failed");
    let _ = stream.set_zero_linger();
    log.fail(error);
}

async fn open_tunnel(
    peer: SocketAddr,
    dst: SocketAddr,
    hbone_addr: SocketAddr,
    dst_identity: ambit_shared::identity::Identity,
    pod: &Arc<Pod>,
    ctx: &ProxyContext,
) -> Result<H2Stream, hbone::Error> {
    let key = PoolKey {
        src: pod.identity.clone(),
        dst: dst_identity.clone(),
        addr: hbone_addr,
        cert_generation: pod.cert.generation(),
    };
    let baggage = format!(
        "k8s.namespace.name={},k8s.pod.name={}",
        pod.namespace, pod.name
    );
    let request = hbone::connect_request(dst, peer, Some(&baggage), &traceparent());
    let dial_pod = pod.clone();
    let bundle = ctx.bundle.clone();
    let dial = move || async move {
        let tcp = connect_in(&dial_pod.netns, hbone_addr, None)
            .await
            .map_err(|source| hbone::Error::Connect {
                addr: hbone_addr,
                source,
            })?;
        let cert = dial_pod.cert.slot.current().certified.clone();
        let config = tls::client_config(cert, &bundle, dst_identity)?;
        TlsConnector::from(Arc::new(config))
            .connect(ServerName::IpAddress(hbone_addr.ip().into()), tcp)
            .await
            .map_err(|source| hbone::Error::Tls {
                addr: hbone_addr,
                source,
            })
    };
    ctx.pool.open(key, request, dial).await
}

/// A peer closing abruptly after the exchange is how many apps end connections.
pub(crate) fn ignore_close(e: std::io::Error) -> std::io::Result<()> {
    if copy::is_closed(&e) { Ok(()) } else { Err(e) }
}

/// A fresh W3C `traceparent` (version 00, random trace and span ids, sampled).
fn traceparent() -> String {
    let mut bytes = [0u8; 24];
    if tls::provider().secure_random.fill(&mut bytes).is_err() {
        // Tracing ids need uniqueness, not secrecy; fall back to the clock.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(1);
        bytes[..16].copy_from_slice(&nanos.to_be_bytes());
        bytes[16..].copy_from_slice(&(nanos as u64).to_le_bytes());
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("00-{}-{}-01", &hex[..32], &hex[32..])
}
