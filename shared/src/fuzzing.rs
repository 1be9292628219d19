//! Entry points for the coverage-guided fuzz targets in `fuzz/` at the repository root
//! (feature `fuzzing`), also built into the unit tests, which replay every saved input
//! under `fuzz/regressions/<target>/`.
//!
//! Each function takes the fuzzer's bytes, must never panic on them, and asserts the
//! properties its parser promises; an assertion failing is a finding like a crash.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::OnceLock;

use http::{Method, Request, StatusCode, Uri};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::config::{Limits, Workload, parse_str_with};
use crate::hbone::{self, request};
use crate::identity::Identity;
use crate::policy::path::{Form, normalize};
use crate::policy::{self, Conn, Decision};

/// A cursor over the fuzzer's bytes that never fails: past the end it yields zeros and
/// empty slices, so every input maps to some structured case.
#[derive(Debug)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Wraps `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// One byte (0 past the end).
    pub fn byte(&mut self) -> u8 {
        let (first, rest) = self.data.split_first().unwrap_or((&0, &[]));
        self.data = rest;
        *first
    }

    /// Two bytes, big-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }

    /// A slice whose length is the next byte (so several fields can share one input).
    pub fn chunk(&mut self) -> &'a [u8] {
        let n = usize::from(self.byte()).min(self.data.len());
        let (chunk, rest) = self.data.split_at(n);
        self.data = rest;
        chunk
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

// === HBONE CONNECT ===

/// The HBONE server side of one connection: the input is either raw HTTP/2 bytes after the
/// client preface, served by [`hbone::server::serve`] with a handler that parses each
/// CONNECT as ztunnel does, or (first byte odd) a request built field by field, checked
/// directly and round-tripped through [`request::connect_request`].
pub fn hbone_request(data: &[u8]) {
    let mut input = Input::new(data);
    if input.byte() & 1 == 1 {
        return connect_fields(&mut input);
    }
    let frames = input.rest();
    let runtime = runtime();
    runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let timeouts = hbone::server::Timeouts::default();
        let serve = hbone::server::serve(server, timeouts, |incoming| async move {
            let verdict = request::parse_connect(&incoming.request);
            let _ = request::forwarded_client(&incoming.request);
            match verdict {
                Ok(addr) => {
                    check_accepted(&incoming.request, addr);
                    incoming.refuse(StatusCode::SERVICE_UNAVAILABLE);
                }
                Err(e) => incoming.refuse(e.status()),
            }
        });
        let peer = async move {
            let _ = client.write_all(H2_PREFACE).await;
            let _ = client.write_all(frames).await;
            let _ = client.shutdown().await;
            // Drain what the server says, so it never blocks on a full pipe.
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        };
        // Bounded: a stuck connection is a hang the fuzzer reports as a timeout.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            tokio::join!(serve, peer)
        })
        .await;
    });
}

/// The HTTP/2 client connection preface (RFC 9113 §3.4), sent before the fuzzer's frames
/// so they reach the frame parser instead of failing the handshake.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn connect_fields(input: &mut Input<'_>) {
    let method = Method::from_bytes(input.chunk());
    let uri = Uri::try_from(input.chunk());
    let forwarded = input.chunk().to_vec();
    if let (Ok(method), Ok(uri)) = (method, uri) {
        let mut builder = Request::builder().method(method).uri(uri);
        if let Ok(value) = http::HeaderValue::from_bytes(&forwarded) {
            builder = builder.header(request::FORWARDED, value);
        }
        if let Ok(req) = builder.body(()) {
            match request::parse_connect(&req) {
                Ok(addr) => check_accepted(&req, addr),
                Err(e) => assert!(
                    e.status() == StatusCode::BAD_REQUEST,
                    "a malformed request is the client's fault: {e}"
                ),
            }
            let _ = request::forwarded_client(&req);
        }
    }
    // Whatever addresses a tunnel carries, the request ztunnel builds for them parses back.
    let dst = socket_addr(input);
    let src = socket_addr(input);
    let req = request::connect_request(dst, src, Some("k8s.namespace.name=shop"), "00-0-0-01");
    if dst.port() != 0 && !dst.ip().is_unspecified() {
        assert_eq!(
            request::parse_connect(&req),
            Ok(SocketAddr::new(dst.ip(), dst.port())),
            "the CONNECT ztunnel sends for {dst:?} must parse back"
        );
    }
    assert_eq!(
        request::forwarded_client(&req),
        Some(SocketAddr::new(src.ip(), src.port())),
        "the forwarded header ztunnel sends for {src:?} must parse back"
    );
}

fn check_accepted<B>(req: &Request<B>, addr: SocketAddr) {
    assert_eq!(req.method(), Method::CONNECT);
    assert!(addr.port() != 0 && !addr.ip().is_unspecified(), "{addr}");
}

fn socket_addr(input: &mut Input<'_>) -> SocketAddr {
    let kind = input.byte();
    let ip = if kind & 1 == 0 {
        IpAddr::V4(Ipv4Addr::from(std::array::from_fn::<u8, 4, _>(|_| {
            input.byte()
        })))
    } else {
        IpAddr::V6(Ipv6Addr::from(std::array::from_fn::<u8, 16, _>(|_| {
            input.byte()
        })))
    };
    let mut addr = SocketAddr::new(ip, input.u16());
    // Link-local IPv6 sockets carry a scope (interface) ID and flow info; accepted sockets
    // report them.
    if let SocketAddr::V6(v6) = &mut addr
        && kind & 2 != 0
    {
        v6.set_scope_id(u32::from(input.u16()));
        v6.set_flowinfo(u32::from(input.byte()));
    }
    addr
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds (fuzzing only)")
    })
}

// === Config ===

/// The config loader: YAML text to a validated [`crate::config::Config`], under small caps
/// so the fuzzer reaches them. Checks that the pre-scan never lets through nesting deeper
/// than it promises, and that an accepted config dumped back to YAML is accepted again as
/// the same config (`config_dump` and the Kubernetes source rely on both directions).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let limits = Limits {
        max_bytes: 1 << 20,
        max_depth: 12,
    };
    let path = Path::new("fuzz.yaml");
    let prescan = limits.check(text);
    if prescan.is_ok() && !text.contains('*') {
        // Aliases (`*a`) can repeat a collection deeper than written; the deserializer
        // bounds those itself. Anything else must be within twice the scanned depth.
        if let Ok(value) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text) {
            let depth = value_depth(&value);
            assert!(
                depth <= 2 * limits.max_depth,
                "the pre-scan let through {depth} levels (limit {})",
                limits.max_depth
            );
        }
    }
    let Ok(config) = parse_str_with(path, text, &limits) else {
        return;
    };
    let dumped = serde_yaml_ng::to_string(&config).expect("a validated config serializes");
    let again = parse_str_with(path, &dumped, &Limits::default())
        .unwrap_or_else(|e| panic!("a dumped config must load again: {e}\n{dumped}"));
    assert!(again == config, "the dump changed the config:\n{dumped}");
}

fn value_depth(v: &serde_yaml_ng::Value) -> usize {
    match v {
        serde_yaml_ng::Value::Sequence(items) => {
            1 + items.iter().map(value_depth).max().unwrap_or(0)
        }
        serde_yaml_ng::Value::Mapping(m) => {
            1 + m
                .iter()
                .map(|(k, v)| value_depth(k).max(value_depth(v)))
                .max()
                .unwrap_or(0)
        }
        serde_yaml_ng::Value::Tagged(t) => value_depth(&t.value),
        _ => 0,
    }
}

// === Paths and policy ===

/// The path normaliser and the policy matcher, differentially:
/// - normalising is idempotent in both forms;
/// - the path the waypoint forwards, normalised for matching, is the path it authorised
///   (a backend, or a second hop, never sees a path that would match other rules);
/// - so a policy decides the forwarded path exactly as it decided the original one.
///
/// The input is `[pattern length][pattern][path]`; the pattern becomes a DENY rule's
/// `paths` entry when it compiles.
pub fn path(data: &[u8]) {
    let mut input = Input::new(data);
    let pattern = String::from_utf8_lossy(input.chunk()).into_owned();
    let raw = String::from_utf8_lossy(input.rest()).into_owned();

    let matched = normalize(&raw, Form::Match);
    let forwarded = normalize(&raw, Form::Forward);
    assert_eq!(
        normalize(&matched, Form::Match),
        matched,
        "Match form of {raw:?}"
    );
    assert_eq!(
        normalize(&forwarded, Form::Forward),
        forwarded,
        "Forward form of {raw:?}"
    );
    let forwarded_matched = normalize(&forwarded, Form::Match);
    assert_eq!(
        forwarded_matched, matched,
        "the forwarded form of {raw:?} ({forwarded:?}) is authorised differently"
    );
    if raw.starts_with('/') {
        for form in [&matched, &forwarded] {
            assert!(form.starts_with('/'), "{raw:?} -> {form:?}");
            assert!(!form.contains(['?', '#']), "{raw:?} -> {form:?}");
            assert!(
                !form.contains("//") && !form.contains("/./") && !form.contains("/../"),
                "{raw:?} -> {form:?}"
            );
        }
    }

    let Some(policy) = deny_path_policy(&pattern) else {
        return;
    };
    let decide = |path: &str| {
        let headers = http::HeaderMap::new();
        let req = policy::Request {
            method: "GET",
            path,
            host: "web",
            headers: &headers,
        };
        let w = workload();
        let conn = Conn {
            src_identity: Some(identity()),
            src: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            dst: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 80),
            dst_workload: &w,
            request: Some(&req),
        };
        policy::evaluate(&conn, std::slice::from_ref(&policy), true).0
    };
    let direct = decide(&matched);
    assert_eq!(
        decide(&forwarded_matched),
        direct,
        "{raw:?} and its forwarded form are decided differently"
    );
    if pattern == "*" {
        assert!(
            matches!(direct, Decision::Deny { .. }),
            "`*` denies {raw:?}"
        );
    }
}

fn deny_path_policy(pattern: &str) -> Option<policy::CompiledPolicy> {
    let p = crate::config::AuthorizationPolicy {
        name: "deny".into(),
        namespace: None,
        selector: None,
        action: crate::config::Action::Deny,
        dry_run: false,
        rules: vec![crate::config::Rule {
            to: vec![crate::config::Operation {
                paths: vec![pattern.to_string()],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    policy::compile(&p).ok()
}

fn workload() -> Workload {
    Workload {
        name: "web-1".into(),
        namespace: "shop".into(),
        service_account: "web".into(),
        ips: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))],
        node: "node-a".into(),
        labels: Default::default(),
    }
}

fn identity() -> &'static Identity {
    static ID: OnceLock<Identity> = OnceLock::new();
    ID.get_or_init(|| Identity::new("cluster.local", "shop", "client").expect("a valid identity"))
}

#[cfg(test)]
mod tests;
