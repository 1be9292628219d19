//! The node tunnel's own HTTP endpoints, served on a single-threaded runtime of their own
//! so a busy data plane never starves them and they never take its threads:
//!
//! | listener | default | paths |
//! |---|---|---|
//! | metrics | `0.0.0.0:15020` | `/metrics` (also `/stats/prometheus`): Prometheus text |
//! | readiness | `0.0.0.0:15021` | `/healthz/ready`: 200 once the first reconcile is done, 503 before |
//! | admin | `127.0.0.1:15000` | `/config_dump`, `/logging`, plus `/metrics` and `/healthz/ready` |
//!
//! `/config_dump` is JSON: the config in force (namespaces, workloads, services,
//! authorization policies, peer authentications), every workload certificate, the issuer
//! and the trust bundle's roots, each with serial, validity and seconds to expiry.
//! `GET /logging` shows the log filter; `POST /logging?level=<filter>` replaces it (any
//! `RUST_LOG` syntax, e.g. `debug` or `info,access=debug`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ambit_shared::admin::{self, Body, respond, text};
use ambit_shared::admission::Admission;
use ambit_shared::certs::Certificates;
use ambit_shared::config::Config;
use ambit_shared::tls::CertInfo;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::watch;
use tracing::info;
use tracing_subscriber::EnvFilter;

use crate::metrics::Traffic;

use ambit_shared::logging::FilterHandle;

/// Whether the node tunnel is ready to serve: set once, after the first reconcile.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the node tunnel ready.
    pub fn mark_ready(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// True once [`Readiness::mark_ready`] was called.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// What the endpoints show and change.
pub struct State {
    /// This node's name.
    pub node: String,
    /// Every metric.
    pub registry: Registry,
    /// Open connections, for the dump.
    pub traffic: Arc<Traffic>,
    /// Set after the first reconcile.
    pub ready: Readiness,
    /// The config in force.
    pub config: watch::Receiver<Arc<Config>>,
    /// Certificates, issuer and bundle in force.
    pub certs: Certificates,
    /// The log filter.
    pub log: FilterHandle,
}

/// The three listeners, bound before anything else starts so a taken port fails startup
/// with a clear error.
#[derive(Debug)]
pub struct Listeners {
    metrics: std::net::TcpListener,
    readiness: std::net::TcpListener,
    admin: std::net::TcpListener,
}

impl Listeners {
    /// Binds the metrics, readiness and admin addresses.
    pub fn bind(
        metrics: SocketAddr,
        readiness: SocketAddr,
        admin: SocketAddr,
    ) -> anyhow::Result<Self> {
        Ok(Listeners {
            metrics: admin::bind(metrics, "metrics")?,
            readiness: admin::bind(readiness, "readiness")?,
            admin: admin::bind(admin, "admin")?,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Metrics,
    Readiness,
    Admin,
}

/// Serves the endpoints on a thread with its own runtime, for the life of the process.
pub fn spawn(state: State, listeners: Listeners, admission: Admission) -> anyhow::Result<()> {
    let state = Arc::new(state);
    let route = Arc::new(move |e: Endpoint, req: &Request<Incoming>| {
        let uri = req.uri();
        route(
            e,
            &state,
            req.method(),
            uri.path(),
            uri.query().unwrap_or_default(),
        )
    });
    admin::spawn_thread(move || async move {
        tokio::join!(
            admin::serve(
                listeners.metrics,
                &admission,
                "metrics",
                Endpoint::Metrics,
                route.clone()
            ),
            admin::serve(
                listeners.readiness,
                &admission,
                "readiness",
                Endpoint::Readiness,
                route.clone()
            ),
            admin::serve(listeners.admin, &admission, "admin", Endpoint::Admin, route),
        );
    })?;
    Ok(())
}

fn route(
    endpoint: Endpoint,
    state: &State,
    method: &Method,
    path: &str,
    query: &str,
) -> Response<Body> {
    match (endpoint, method, path) {
        (Endpoint::Metrics | Endpoint::Admin, &Method::GET, "/metrics" | "/stats/prometheus") => {
            admin::metrics(&state.registry)
        }
        (Endpoint::Readiness | Endpoint::Admin, &Method::GET, "/healthz/ready") => {
            if state.ready.is_ready() {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: first reconcile not done\n".into())
            }
        }
        (Endpoint::Admin, &Method::GET, "/config_dump") => {
            let body = serde_json::to_string_pretty(&config_dump(state)).unwrap_or_default();
            respond(StatusCode::OK, "application/json", body + "\n")
        }
        (Endpoint::Admin, &Method::GET, "/logging") => text(StatusCode::OK, current_filter(state) + "\n"),
        (Endpoint::Admin, &Method::POST | &Method::PUT, "/logging") => {
            let Some(level) = query_param(query, "level") else {
                return text(StatusCode::BAD_REQUEST, "missing ?level=<filter>, e.g. ?level=debug\n".into());
            };
            match set_filter(state, &level) {
                Ok(now) => text(StatusCode::OK, now + "\n"),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("invalid log filter {level:?}: {e}\n")),
            }
        }
        (Endpoint::Admin, &Method::GET, "/") => text(
            StatusCode::OK,
            "GET /config_dump\nGET /logging\nPOST /logging?level=<filter>\nGET /metrics\nGET /healthz/ready\n".into(),
        ),
        (_, _, "/metrics" | "/stats/prometheus" | "/healthz/ready" | "/config_dump" | "/logging" | "/")
            if allowed(endpoint, path) =>
        {
            text(StatusCode::METHOD_NOT_ALLOWED, format!("{method} not allowed on {path}\n"))
        }
        _ => text(StatusCode::NOT_FOUND, format!("no {path} here\n")),
    }
}

fn allowed(endpoint: Endpoint, path: &str) -> bool {
    match endpoint {
        Endpoint::Metrics => matches!(path, "/metrics" | "/stats/prometheus"),
        Endpoint::Readiness => path == "/healthz/ready",
        Endpoint::Admin => true,
    }
}

fn current_filter(state: &State) -> String {
    state
        .log
        .with_current(|f| f.to_string())
        .unwrap_or_else(|e| format!("unavailable: {e}"))
}

fn set_filter(state: &State, directives: &str) -> Result<String, String> {
    let filter = EnvFilter::try_new(directives).map_err(|e| e.to_string())?;
    state.log.reload(filter).map_err(|e| e.to_string())?;
    let now = current_filter(state);
    info!(filter = %now, "log filter changed");
    Ok(now)
}

/// The value of `key` in a query string, percent-decoded.
fn query_param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| percent_decode(v))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn config_dump(state: &State) -> Value {
    let config = state.config.borrow().clone();
    let now = OffsetDateTime::now_utc();
    let certificates: Vec<Value> = state
        .certs
        .leaves()
        .into_iter()
        .map(|(identity, info, generation)| {
            let mut v = cert_json(&info, now);
            v["identity"] = json!(identity.to_string());
            v["generation"] = json!(generation);
            v
        })
        .collect();
    let roots: Vec<Value> = state
        .certs
        .roots()
        .iter()
        .map(|r| cert_json(r, now))
        .collect();
    json!({
        "node": state.node,
        "ready": state.ready.is_ready(),
        "trustDomain": config.trust_domain,
        "namespaces": config.namespaces,
        "workloads": config.workloads,
        "services": config.services,
        "authorizationPolicies": config.authorization_policies,
        "peerAuthentications": config.peer_authentications,
        "certificates": certificates,
        "issuer": state.certs.issuer_info().map(|i| cert_json(&i, now)),
        "trustBundle": roots,
        "openConnections": state.traffic.open_connections(),
        "logFilter": current_filter(state),
    })
}

fn cert_json(info: &CertInfo, now: OffsetDateTime) -> Value {
    let ts = |t: OffsetDateTime| t.format(&Rfc3339).unwrap_or_default();
    json!({
        "subject": info.subject,
        "issuer": info.issuer,
        "serial": info.serial,
        "fingerprint": info.fingerprint,
        "notBefore": ts(info.not_before),
        "notAfter": ts(info.not_after),
        "secondsToExpiry": info.seconds_left(now),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use http_body_util::BodyExt as _;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            query_param("level=debug", "level").as_deref(),
            Some("debug")
        );
        assert_eq!(
            query_param("x=1&level=info%2Caccess%3Ddebug", "level").as_deref(),
            Some("info,access=debug")
        );
        assert_eq!(query_param("level=a+b%", "level").as_deref(), Some("a b%"));
        assert_eq!(query_param("lvl=debug", "level"), None);
    }

    /// The escape boundaries (issue 13 reported an off-by-one here): an escape in the last
    /// three bytes decodes, a `%` with fewer than two bytes after it stays as it is.
    #[test]
    fn escapes_decode_up_to_the_last_byte() {
        for (raw, want) in [
            ("%41", "A"),
            ("a%41", "aA"),
            ("%41%42", "AB"),
            ("%4", "%4"),
            ("a%4", "a%4"),
            ("%", "%"),
            ("%%41", "%A"),
            ("%4%41", "%4A"),
            ("%g1", "%g1"),
            ("%+1", "% 1"),
            ("%2B+", "+ "),
            ("%e2%82%ac", "\u{20ac}"),
        ] {
            assert_eq!(percent_decode(raw), want, "{raw:?}");
        }
        // Every string of up to five bytes over an alphabet with all the cases, against a
        // decoder written from the URL standard's wording.
        let reference = |s: &str| {
            let b = s.as_bytes();
            let mut out = Vec::new();
            let mut i = 0;
            while let Some(&c) = b.get(i) {
                let escape = b
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match (c, escape) {
                    (b'%', Some(v)) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    (b'+', _) => out.push(b' '),
                    (c, _) => out.push(c),
                }
                i += 1;
            }
            String::from_utf8_lossy(&out).into_owned()
        };
        let alphabet = ['%', '4', '1', 'f', 'g', '+', 'x'];
        let mut strings = vec![String::new()];
        for _ in 0..5 {
            strings = strings
                .iter()
                .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                .collect();
            for s in &strings {
                assert_eq!(percent_decode(s), reference(s), "{s:?}");
            }
        }
    }

    #[test]
    fn endpoints_serve_only_their_paths() {
        assert!(allowed(Endpoint::Metrics, "/metrics"));
        assert!(!allowed(Endpoint::Metrics, "/config_dump"));
        assert!(allowed(Endpoint::Readiness, "/healthz/ready"));
        assert!(!allowed(Endpoint::Readiness, "/logging"));
        assert!(allowed(Endpoint::Admin, "/config_dump"));
    }

    async fn call(state: &State, e: Endpoint, m: Method, path: &str, query: &str) -> (u16, String) {
        let resp = route(e, state, &m, path, query);
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("full body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn readiness_dump_and_log_level() {
        use ambit_shared::ca::{self, CaPaths, LocalCa};
        use ambit_shared::tls::{SharedBundle, TrustBundle};

        use crate::metrics::CertMetrics;
        use ambit_shared::certs::{CertManager, LocalIssuer};

        let dir = tempfile::tempdir().expect("tempdir");
        let paths: CaPaths = ca::init(dir.path(), "cluster.local", false).expect("ca");
        let issuer = Arc::new(LocalIssuer::new(LocalCa::load(&paths).expect("load")));
        let certs = CertManager::new(
            issuer.clone(),
            Duration::from_secs(3600),
            Arc::new(CertMetrics::default()),
        );
        let id = "spiffe://cluster.local/ns/shop/sa/web".parse().expect("id");
        certs.get(&id).await.expect("issue");
        let config = ambit_shared::config::parse_str(
            std::path::Path::new("t.yaml"),
            "trustDomain: cluster.local\nnamespaces: [{name: shop}]\nworkloads: [{name: web, namespace: shop, ips: [10.0.0.2], node: a}]\n",
        )
        .expect("config");
        let (_layer, filter) =
            tracing_subscriber::reload::Layer::<_, tracing_subscriber::Registry>::new(
                EnvFilter::new("info"),
            );
        let state = State {
            node: "a".into(),
            registry: Registry::default(),
            traffic: Arc::default(),
            ready: Readiness::default(),
            config: watch::channel(Arc::new(config)).1,
            certs: Certificates {
                certs,
                issuer: Some(issuer),
                bundle: SharedBundle::new(TrustBundle::load(&paths.bundle()).expect("bundle")),
            },
            log: filter,
        };

        let ready = || {
            call(
                &state,
                Endpoint::Readiness,
                Method::GET,
                "/healthz/ready",
                "",
            )
        };
        assert_eq!(ready().await.0, 503);
        state.ready.mark_ready();
        assert_eq!(ready().await, (200, "ready\n".into()));
        assert_eq!(
            call(&state, Endpoint::Readiness, Method::GET, "/config_dump", "")
                .await
                .0,
            404
        );
        assert_eq!(
            call(&state, Endpoint::Metrics, Method::POST, "/metrics", "")
                .await
                .0,
            405
        );

        let (status, body) = call(&state, Endpoint::Admin, Method::GET, "/config_dump", "").await;
        assert_eq!(status, 200);
        let dump: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(dump["workloads"][0]["name"], "web");
        assert_eq!(
            dump["certificates"][0]["identity"],
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        let left = dump["certificates"][0]["secondsToExpiry"]
            .as_i64()
            .expect("expiry");
        assert!((3500..=3660).contains(&left), "{left}");
        assert_eq!(dump["trustBundle"].as_array().map(Vec::len), Some(1));
        assert_eq!(dump["issuer"]["issuer"], dump["trustBundle"][0]["subject"]);

        let logging = |m, q| call(&state, Endpoint::Admin, m, "/logging", q);
        assert_eq!(logging(Method::GET, "").await, (200, "info\n".into()));
        assert_eq!(
            logging(Method::POST, "level=debug").await,
            (200, "debug\n".into())
        );
        assert_eq!(logging(Method::GET, "").await, (200, "debug\n".into()));
        assert_eq!(logging(Method::POST, "").await.0, 400);
        assert_eq!(logging(Method::POST, "level=a%3D%3Db").await.0, 400);
    }
}
