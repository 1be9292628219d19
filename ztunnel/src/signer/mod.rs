//! `ztunnel signer`: the central certificate signer.
//!
//! Node tunnels and waypoints in a cluster hold no CA key. They generate a key pair,
//! send a PKCS#10 request with their projected service-account token, and receive a
//! short-lived leaf signed by the issuer in `--ca-dir` (the layout `ztunnel ca init`
//! writes, re-read when it changes, so `ztunnel ca add-root|activate|remove-root` rotate
//! the signer's issuer and bundle like a file-mode node's). The issuer key never leaves
//! this process.
//!
//! # Running it
//!
//! ```text
//! ztunnel signer --listen 0.0.0.0:15012 --ca-dir /var/run/ambit/ca \
//!   [--kube-url https://kubernetes.default.svc] [--kube-ca <ca.crt>] [--kube-token-file <token>] \
//!   [--trust-domain cluster.local] [--node-tunnel ambit-system/ztunnel]... \
//!   [--max-ttl 1h] [--serving-name ambit-signer.ambit-system.svc]... [--serving-ip 127.0.0.1]...
//! ```
//!
//! It serves TLS with a certificate it issues itself from the same issuer for
//! `--serving-name`/`--serving-ip` (re-issued at half-life and when the issuer changes), so
//! clients verify it with the CA's `bundle.pem` (`--signer-ca`). The API server defaults
//! are the in-cluster ones (service-account token and CA under
//! `/var/run/secrets/kubernetes.io/serviceaccount/`); an `http://` `--kube-url` is for tests.
//! The signer's service account needs `create` on `tokenreviews` and `list` on `pods`.
//!
//! Clients: `ztunnel run` and `waypoint run` take `--signer https://…:15012`,
//! `--signer-ca <bundle.pem>` (default `<ca-dir>/bundle.pem`; one of the two is required)
//! and `--token-file` (default `/var/run/secrets/ambit/token`, a projected token with
//! audience `ambit-signer`). They ask for `--cert-ttl` (capped here), renew at half-life,
//! and re-fetch the trust bundle every 10 s besides receiving it with every certificate, so
//! each `ztunnel ca` rotation step run against the signer's CA directory reaches every
//! proxy within about 12 s.
//!
//! # Protocol
//!
//! See [`ambit_shared::signer`]: `POST /v1/certificates` (`{identity, csr, ttlSeconds}` →
//! `{certChain, roots, notAfter}`), `GET /v1/bundle`, `GET /healthz`.
//!
//! # Decisions
//!
//! Connections are admitted through [`ambit_shared::admission`]: at most
//! [`MAX_CONNECTIONS_PER_SOURCE`] (`--max-connections-per-source`) from one address and
//! [`MAX_CONNECTIONS`] in all, TLS handshakes bounded per process and per source and in
//! time, and request heads read within [`HEADER_READ_TIMEOUT`]. An unauthenticated
//! client therefore holds a connection for seconds, never a permit.
//!
//! In order, every request is:
//! 1. refused `401` without a bearer token (before its body is read), `413` if its body is
//!    over [`ambit_shared::signer::MAX_BODY`], `408` if the body does not arrive within
//!    [`BODY_TIMEOUT`], then `429` if [`MAX_IN_FLIGHT`] requests are already being
//!    handled, `400` if it is not the JSON above or names no valid SPIFFE identity;
//! 2. authenticated with a TokenReview (audience `ambit-signer`): `401` without a bearer
//!    token, or for a token the API server does not authenticate or that is not a service
//!    account's; `503` if the API server cannot be asked;
//! 3. checked: the CSR must parse, carry a valid self-signature and name exactly the
//!    requested identity as its only SAN, else `400`;
//! 4. authorized by [`authz`]: a node tunnel (`--node-tunnel`, default
//!    `ambit-system/ztunnel`) only for identities of pods on its token's node (the pod list
//!    comes from `GET /api/v1/pods?fieldSelector=spec.nodeName=<node>`, cached
//!    [`POD_CACHE_TTL`], re-listed before a denial); anyone else only its own identity;
//!    never outside `--trust-domain`. Refusals are `403` with the reason;
//! 5. signed for `min(ttlSeconds, --max-ttl)` (default and cap 1 h, at least 1 min) over the
//!    CSR's public key, with the names, usages and lifetime set by the signer, never copied
//!    from the CSR.
//!
//! Every decision is logged with the caller (service account, node, pod) and identity.

pub mod authz;
pub mod bootstrap;
pub mod kube;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_shared::admission::{self, Accepted, Admission, ListenerLimits};
use ambit_shared::ca::{CaPaths, LocalCa};
use ambit_shared::identity::Identity;
use ambit_shared::signer::{
    self, BUNDLE_PATH, BundleResponse, CERTIFICATES_PATH, ErrorBody, IssueRequest, IssueResponse,
    MAX_BODY, csr,
};
use ambit_shared::tls::{self, CertInfo};
use anyhow::Context;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, error, info, warn};

use self::authz::{Decision, Needs, Policy};
use self::kube::{Kube, KubeError};

/// Requests handled at once; more get 429. Taken only once the request is complete, so a
/// client that stalls its upload never holds one.
pub const MAX_IN_FLIGHT: usize = 64;
/// Connections open at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Default connections open at once from one source address (`--max-connections-per-source`).
/// A node's ztunnel asks for certificates one connection per request.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 32;
/// Time for a client to send its request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for a client to send its request body (at most [`MAX_BODY`] bytes).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// The listener's name in metrics and logs.
const LISTENER: &str = "signer";
/// How long a node's pod list is reused.
pub const POD_CACHE_TTL: Duration = Duration::from_secs(2);
/// Shortest leaf the signer issues.
const MIN_TTL: Duration = Duration::from_secs(60);
/// Lifetime of the signer's own serving certificate (re-issued at half-life).
const SERVING_TTL: Duration = Duration::from_secs(24 * 3600);
/// How often the CA directory is checked for a new issuer or bundle.
const CA_POLL: Duration = Duration::from_secs(2);
/// Time allowed for a client to finish its TLS handshake and request.
const CONN_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of `ztunnel signer`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The CA directory (issuer, key and bundle).
    pub ca_dir: PathBuf,
    /// API server base URL.
    pub kube_url: String,
    /// PEM roots for an https API server.
    pub kube_ca: Option<PathBuf>,
    /// The signer's own token for the API server (used if the file exists).
    pub kube_token_file: Option<PathBuf>,
    /// The only trust domain signed for.
    pub trust_domain: String,
    /// `(namespace, service account)` of node tunnels.
    pub node_tunnels: BTreeSet<(String, String)>,
    /// Longest leaf lifetime, also the default.
    pub max_ttl: Duration,
    /// DNS names of the serving certificate.
    pub serving_names: Vec<String>,
    /// IP addresses of the serving certificate.
    pub serving_ips: Vec<IpAddr>,
    /// Admission control of the listener.
    pub admission: admission::Limits,
    /// Connections one source address may hold open.
    pub max_connections_per_source: usize,
    /// The CA's Secret (and the bundle's ConfigMap), when the CA comes from the API
    /// ([`bootstrap`]); `None`: `ca_dir` is read as it is.
    pub bootstrap: Option<bootstrap::Bootstrap>,
}

struct State {
    settings: Settings,
    policy: Policy,
    kube: Kube,
    ca: ArcSwap<LocalCa>,
    /// PEM roots of `bundle.pem`, as served.
    roots: ArcSwap<Vec<String>>,
    in_flight: Semaphore,
}

/// Serves until the process is stopped.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let kube_tls = match &settings.kube_ca {
        Some(path) if settings.kube_url.starts_with("https://") => {
            let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let roots = tls::parse_certs(path, &pem)?;
            Some(signer::http::client_config_with_roots(&roots)?)
        }
        _ => None,
    };
    let endpoint = kube::endpoint(&settings.kube_url, kube_tls).context("--kube-url")?;
    let new_kube = || {
        Kube::new(
            endpoint.clone(),
            settings.kube_token_file.clone(),
            signer::AUDIENCE.to_string(),
            POD_CACHE_TTL,
        )
    };
    if let Some(boot) = &settings.bootstrap {
        let kube = Arc::new(new_kube());
        let version = boot
            .start(&kube)
            .await
            .with_context(|| format!("bootstrapping the CA from Secret {}", boot.secret))?;
        tokio::spawn(boot.clone().sync(kube, version));
    }
    let paths = CaPaths::new(&settings.ca_dir);
    let ca =
        LocalCa::load(&paths).context("loading the issuer (create one with `ztunnel ca init`)")?;
    let roots = read_roots(&paths).context("loading the trust bundle")?;
    let serving = Arc::new(ServingCert(ArcSwap::from_pointee(serving_cert(
        &ca, &settings,
    )?)));
    let state = Arc::new(State {
        policy: Policy {
            trust_domain: settings.trust_domain.clone(),
            node_tunnels: settings.node_tunnels.clone(),
        },
        kube: new_kube(),
        ca: ArcSwap::from_pointee(ca),
        roots: ArcSwap::from_pointee(roots),
        in_flight: Semaphore::new(MAX_IN_FLIGHT),
        settings,
    });
    let mut server = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(serving.clone());
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let admission = Admission::new(
        state.settings.admission,
        &mut prometheus_client::registry::Registry::default(),
    )?;
    let tcp = TcpListener::bind(state.settings.listen)
        .await
        .with_context(|| format!("binding {}", state.settings.listen))?;
    let mut listener = admission
        .gate(
            LISTENER,
            ListenerLimits {
                max_connections: Some(MAX_CONNECTIONS),
                max_per_source: Some(state.settings.max_connections_per_source),
            },
        )
        .listener(tcp);
    tokio::spawn(watch_ca(paths, state.clone(), serving));
    info!(listen = %listener.local_addr()?, kube = %state.kube_url(), trust_domain = %state.policy.trust_domain,
        node_tunnels = ?state.policy.node_tunnels, max_ttl = ?state.settings.max_ttl, "signer serving");
    loop {
        let Accepted {
            stream: tcp,
            peer,
            permit,
        } = listener.accept().await;
        let (acceptor, state, admission) = (acceptor.clone(), state.clone(), admission.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let serve = async {
                let stream = match admission
                    .tls_handshake(LISTENER, &acceptor, tcp, peer.ip())
                    .await
                {
                    Ok(s) => s,
                    Err(e) => {
                        debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                };
                let service = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(&state, peer, req).await) }
                });
                // One request per connection (the client opens one per request), and its
                // head must arrive within HEADER_READ_TIMEOUT.
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    info!(%peer, error = %e, "connection ended with an error");
                }
            };
            if tokio::time::timeout(CONN_TIMEOUT, serve).await.is_err() {
                info!(%peer, "connection closed after {CONN_TIMEOUT:?}");
            }
        });
    }
}

impl State {
    fn kube_url(&self) -> &str {
        &self.settings.kube_url
    }
}

/// A refusal: status and reason.
struct Refusal(StatusCode, String);

async fn handle(state: &State, peer: SocketAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, BUNDLE_PATH) => json(
            StatusCode::OK,
            &BundleResponse {
                roots: state.roots.load().as_ref().clone(),
            },
        ),
        (&Method::POST, CERTIFICATES_PATH) => {
            // Cheap checks first: an unauthenticated or stalled upload must cost neither a
            // permit nor more than BODY_TIMEOUT of a connection.
            let Some(token) = bearer(&req) else {
                warn!(%peer, decision = "refused", status = 401, "no bearer token");
                return refusal(StatusCode::UNAUTHORIZED, "a bearer token is required");
            };
            let body = match read_body(peer, req).await {
                Ok(body) => body,
                Err(Refusal(status, reason)) => return refusal(status, &reason),
            };
            let Ok(_permit) = state.in_flight.try_acquire() else {
                warn!(%peer, "too many requests in flight; refusing");
                return refusal(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many requests in flight; retry later",
                );
            };
            match issue(state, peer, token, body).await {
                Ok(answer) => json(StatusCode::OK, &answer),
                Err(Refusal(status, reason)) => refusal(status, &reason),
            }
        }
        (_, CERTIFICATES_PATH | BUNDLE_PATH | "/healthz") => {
            refusal(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => refusal(StatusCode::NOT_FOUND, "not found"),
    }
}

/// The request body: at most [`MAX_BODY`] bytes within [`BODY_TIMEOUT`].
async fn read_body(peer: SocketAddr, req: Request<Incoming>) -> Result<Bytes, Refusal> {
    let read = Limited::new(req.into_body(), MAX_BODY).collect();
    match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) => {
            let too_big = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            let status = if too_big {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            warn!(%peer, decision = "refused", status = status.as_u16(), error = %e, "unreadable request body");
            Err(Refusal(status, format!("reading the request: {e}")))
        }
        Err(_) => {
            warn!(%peer, decision = "refused", status = 408, timeout = ?BODY_TIMEOUT, "request body too slow");
            Err(Refusal(
                StatusCode::REQUEST_TIMEOUT,
                format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
            ))
        }
    }
}

async fn issue(
    state: &State,
    peer: SocketAddr,
    token: String,
    body: Bytes,
) -> Result<IssueResponse, Refusal> {
    let started = Instant::now();
    let request: IssueRequest = serde_json::from_slice(&body).map_err(|e| {
        warn!(%peer, decision = "refused", status = 400, error = %e, "malformed request");
        Refusal(StatusCode::BAD_REQUEST, format!("malformed request: {e}"))
    })?;
    let identity: Identity = request.identity.parse().map_err(|e| {
        warn!(%peer, decision = "refused", status = 400, identity = %request.identity, error = %e, "bad identity");
        Refusal(StatusCode::BAD_REQUEST, format!("identity {}: {e}", request.identity))
    })?;
    let caller = match state.kube.review(&token).await {
        Ok(Ok(caller)) => caller,
        Ok(Err(e)) => {
            warn!(%peer, decision = "refused", status = 401, %identity, reason = %e, "token refused");
            return Err(Refusal(StatusCode::UNAUTHORIZED, e.to_string()));
        }
        Err(e) => {
            error!(%peer, decision = "refused", status = 503, %identity, error = %e, "cannot review the token");
            return Err(Refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot reach the API server; retry later".into(),
            ));
        }
    };
    let who = caller.username.as_str();
    let node = caller.node.as_deref().unwrap_or("");
    let pod = caller.pod_name.as_deref().unwrap_or("");
    let csr = csr::check(&request.csr, &identity).map_err(|e| {
        warn!(%peer, caller = who, node, pod, %identity, decision = "refused", status = 400, reason = %e, "CSR refused");
        Refusal(StatusCode::BAD_REQUEST, e.to_string())
    })?;
    let decision = match authz::needs(&state.policy, &caller) {
        Err(deny) => deny,
        Ok(Needs::Nothing) => authz::authorize(&state.policy, &caller, &identity, None),
        Ok(Needs::PodsOn(on)) => {
            let (on, caller, identity) = (on.as_str(), &caller, &identity);
            let decide = |fresh| async move {
                let pods = state.kube.pods_on(on, fresh).await?;
                Ok::<_, KubeError>(authz::authorize(
                    &state.policy,
                    caller,
                    identity,
                    Some(&pods),
                ))
            };
            // A cached list may predate the pod: confirm a denial with a fresh one.
            let first = decide(false).await;
            let decided = match first {
                Ok(Decision::Deny(_)) => decide(true).await,
                other => other,
            };
            decided.map_err(|e| {
                error!(%peer, caller = who, node, %identity, decision = "refused", status = 503, error = %e,
                    "cannot list the caller's node's pods");
                Refusal(StatusCode::SERVICE_UNAVAILABLE, "cannot reach the API server; retry later".into())
            })?
        }
    };
    let reason = match decision {
        Decision::Allow(reason) => reason,
        Decision::Deny(reason) => {
            warn!(%peer, caller = who, node, pod, %identity, decision = "denied", status = 403, %reason, "identity refused");
            return Err(Refusal(StatusCode::FORBIDDEN, reason));
        }
    };
    let ttl = request
        .ttl_seconds
        .map(Duration::from_secs)
        .unwrap_or(state.settings.max_ttl)
        .clamp(MIN_TTL, state.settings.max_ttl.max(MIN_TTL));
    let signed = state
        .ca
        .load()
        .sign_request(&csr, &identity, ttl)
        .map_err(|e| {
            error!(%peer, caller = who, %identity, error = %e, "signing failed");
            Refusal(StatusCode::INTERNAL_SERVER_ERROR, "signing failed".into())
        })?;
    let not_after = signed
        .not_after
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let serial = CertInfo::parse(&signed.chain[0])
        .map(|i| i.serial)
        .unwrap_or_default();
    info!(%peer, caller = who, node, pod, %identity, decision = "signed", reason, %not_after, %serial,
        took_ms = started.elapsed().as_millis() as u64, "certificate signed");
    Ok(IssueResponse {
        cert_chain: signed.chain.iter().map(|c| signer::to_pem(c)).collect(),
        roots: state.roots.load().as_ref().clone(),
        not_after,
    })
}

fn bearer(req: &Request<Incoming>) -> Option<String> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_string())
}

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn refusal(status: StatusCode, reason: &str) -> Response<Full<Bytes>> {
    json(
        status,
        &ErrorBody {
            error: reason.to_string(),
        },
    )
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}

fn read_roots(paths: &CaPaths) -> anyhow::Result<Vec<String>> {
    let path = paths.bundle();
    let pem = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let roots = tls::parse_certs(&path, &pem)?;
    anyhow::ensure!(!roots.is_empty(), "{}: no certificate", path.display());
    Ok(roots.iter().map(|r| signer::to_pem(r)).collect())
}

/// The signer's serving certificate, swapped on renewal.
#[derive(Debug)]
struct ServingCert(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

fn serving_cert(ca: &LocalCa, settings: &Settings) -> anyhow::Result<CertifiedKey> {
    let (chain, key) = ca
        .issue_serving(&settings.serving_names, &settings.serving_ips, SERVING_TTL)
        .context("issuing the serving certificate")?;
    let key = tls::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| anyhow::anyhow!("loading the serving key: {e}"))?;
    Ok(CertifiedKey::new(chain, key))
}

/// Re-reads the issuer and bundle when they change (a rotation with `ztunnel ca …`), and
/// re-issues the serving certificate at half-life or with a new issuer. A file that does
/// not load is refused and the last good one kept.
async fn watch_ca(paths: CaPaths, state: Arc<State>, serving: Arc<ServingCert>) {
    let mut tick = tokio::time::interval(CA_POLL);
    let mut serving_issued = Instant::now();
    loop {
        tick.tick().await;
        match read_roots(&paths) {
            Ok(roots) if roots != **state.roots.load() => {
                info!(roots = roots.len(), "trust bundle reloaded");
                state.roots.store(Arc::new(roots));
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "trust bundle unreadable; keeping the last good one"),
        }
        let mut renew_serving = serving_issued.elapsed() >= SERVING_TTL / 2;
        match LocalCa::load(&paths) {
            Ok(ca) if ca.issuer_cert() != state.ca.load().issuer_cert() => {
                let name = CertInfo::parse(ca.issuer_cert())
                    .map(|i| i.common_name)
                    .unwrap_or_default();
                info!(issuer = %name, "issuer changed; signing with the new one");
                state.ca.store(Arc::new(ca));
                renew_serving = true;
            }
            Ok(_) => {}
            // Perhaps between the key's rename and the certificate's: next tick.
            Err(e) => warn!(error = %e, "issuer unreadable; keeping the last good one"),
        }
        if renew_serving {
            match serving_cert(&state.ca.load(), &state.settings) {
                Ok(cert) => {
                    serving.0.store(Arc::new(cert));
                    serving_issued = Instant::now();
                    info!("serving certificate re-issued");
                }
                Err(e) => {
                    warn!(error = %e, "re-issuing the serving certificate failed; keeping the current one")
                }
            }
        }
    }
}
