//! A fake Kubernetes API server: `list` and `watch` over plain HTTP/1.1 with real
//! resourceVersion semantics, enough for kube-rs watchers; `get` of one object, `create`
//! (`POST`, 409 AlreadyExists when it exists) and `replace` (`PUT`, 409 Conflict on a stale
//! resourceVersion), enough for the signer's CA Secret and trust-bundle ConfigMap.
//!
//! - One global, monotonically increasing resourceVersion; every write bumps it.
//! - `list` returns the objects and `metadata.resourceVersion`.
//! - `watch` from a version replays the retained events after it, then streams
//!   `ADDED`/`MODIFIED`/`DELETED` live; `BOOKMARK`s when `allowWatchBookmarks=true`.
//! - A version older than the retained window gets an `ERROR` event carrying a `Status`
//!   with code 410 (`Expired`), as the real server does; the client must relist.
//! - Tests write objects through [`FakeApiServer::apply`] / [`FakeApiServer::delete`], drop
//!   every watch with [`FakeApiServer::disconnect_watches`], force 410s with
//!   [`FakeApiServer::compact_and_disconnect`], and stop it with [`FakeApiServer::stop`].
//!
//! Objects are stored as JSON by (group, version, resource, namespace, name). Label
//! selectors are ignored; `fieldSelector=metadata.name=<n>` is honoured. No discovery is
//! served: the Ambit source builds its `ApiResource`s itself.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

/// Events kept for resuming watches; older versions get 410 Gone.
const RETAINED_EVENTS: usize = 1000;
/// How often a watch that asked for bookmarks gets one.
const BOOKMARK_EVERY: Duration = Duration::from_secs(2);

/// A kind the server knows: where it lives and what it is called.
#[derive(Debug, Clone, Copy)]
struct Kind {
    group: &'static str,
    version: &'static str,
    resource: &'static str,
    kind: &'static str,
    namespaced: bool,
}

const KINDS: &[Kind] = &[
    Kind {
        group: "",
        version: "v1",
        resource: "namespaces",
        kind: "Namespace",
        namespaced: false,
    },
    Kind {
        group: "",
        version: "v1",
        resource: "secrets",
        kind: "Secret",
        namespaced: true,
    },
    Kind {
        group: "",
        version: "v1",
        resource: "configmaps",
        kind: "ConfigMap",
        namespaced: true,
    },
    Kind {
        group: "",
        version: "v1",
        resource: "pods",
        kind: "Pod",
        namespaced: true,
    },
    Kind {
        group: "",
        version: "v1",
        resource: "services",
        kind: "Service",
        namespaced: true,
    },
    Kind {
        group: "discovery.k8s.io",
        version: "v1",
        resource: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
    },
    Kind {
        group: "ambit.dev",
        version: "v1alpha1",
        resource: "authorizationpolicies",
        kind: "AuthorizationPolicy",
        namespaced: true,
    },
    Kind {
        group: "ambit.dev",
        version: "v1alpha1",
        resource: "peerauthentications",
        kind: "PeerAuthentication",
        namespaced: true,
    },
    Kind {
        group: "ambit.dev",
        version: "v1alpha1",
        resource: "trafficpolicies",
        kind: "TrafficPolicy",
        namespaced: true,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        version: "v1",
        resource: "gateways",
        kind: "Gateway",
        namespaced: true,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        version: "v1",
        resource: "httproutes",
        kind: "HTTPRoute",
        namespaced: true,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        version: "v1",
        resource: "grpcroutes",
        kind: "GRPCRoute",
        namespaced: true,
    },
];

impl Kind {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn by_type(api_version: &str, kind: &str) -> Option<&'static Kind> {
        KINDS
            .iter()
            .find(|k| k.kind == kind && k.api_version() == api_version)
    }

    fn by_path(group: &str, version: &str, resource: &str) -> Option<&'static Kind> {
        KINDS
            .iter()
            .find(|k| k.group == group && k.version == version && k.resource == resource)
    }
}

/// (resource, namespace, name); the resource names group and version uniquely here.
type Key = (&'static str, String, String);

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    resource: &'static str,
    namespace: String,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    ty: &'static str,
    object: Value,
}

struct Watcher {
    resource: &'static str,
    namespace: Option<String>,
    name: Option<String>,
    tx: mpsc::UnboundedSender<Bytes>,
}

impl Watcher {
    fn wants(&self, e: &Event) -> bool {
        e.resource == self.resource
            && self.namespace.as_ref().is_none_or(|n| *n == e.namespace)
            && self.name.as_ref().is_none_or(|n| {
                e.object.pointer("/metadata/name").and_then(Value::as_str) == Some(n.as_str())
            })
    }
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Event>,
    /// Watches from a version below this get 410 Gone.
    oldest: u64,
    watchers: Vec<Watcher>,
}

#[derive(Default)]
struct Counters {
    lists: AtomicU64,
    watches: AtomicU64,
    gone: AtomicU64,
    bookmarks: AtomicU64,
}

struct Shared {
    state: Mutex<State>,
    counters: Counters,
    /// Every request's path and query, in order.
    requests: Mutex<Vec<String>>,
    /// Resources answered with 404.
    unserved: Mutex<Vec<String>>,
    /// Stored just before the next create of the same object is handled, which then gets
    /// 409 AlreadyExists: another client winning a create race.
    race_next_create: Mutex<Option<Value>>,
}

/// A running fake API server; stops on drop.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

// === impl FakeApiServer ===

impl FakeApiServer {
    /// Serves on `listener` (already bound, e.g. inside a cluster netns) from a thread of
    /// its own.
    pub fn serve(listener: std::net::TcpListener) -> Result<FakeApiServer> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            counters: Counters::default(),
            requests: Mutex::new(Vec::new()),
            unserved: Mutex::new(Vec::new()),
            race_next_create: Mutex::new(None),
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("building the fake API server's runtime")?;
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || rt.block_on(accept_loop(listener, s, stop_rx)))?;
        Ok(FakeApiServer {
            shared,
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Binds `addr` in the current network namespace and serves.
    pub fn start(addr: SocketAddr) -> Result<FakeApiServer> {
        FakeApiServer::serve(std::net::TcpListener::bind(addr)?)
    }

    /// Serves on `10.S.0.254:<free port>` inside the cluster netns, the bridge address
    /// every node reaches directly.
    pub fn start_in_cluster(cluster: &crate::Cluster) -> Result<FakeApiServer> {
        let addr: SocketAddr = format!("10.{}.0.254:0", cluster.slot()).parse()?;
        let path = std::path::Path::new(crate::netns::NETNS_DIR).join(cluster.netns_name());
        let listener =
            crate::netns::run_in_netns(&path, move || std::net::TcpListener::bind(addr))?
                .with_context(|| format!("binding {addr} in the cluster netns"))?;
        FakeApiServer::serve(listener)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, for `--kube-url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates or replaces an object (`apiVersion`, `kind`, `metadata.name` required);
    /// returns its new resourceVersion.
    pub fn apply(&self, object: Value) -> Result<u64> {
        store(&self.shared, object).map(|(rv, _)| rv)
    }

    /// Makes the next create (`POST`) of the same object lose a race: `object` is stored
    /// first, as if another client had created it a moment earlier, and the request gets
    /// 409 AlreadyExists.
    pub fn race_next_create(&self, object: Value) {
        *self.shared.race_next_create.lock() = Some(object);
    }

    /// Changes an existing object in place (e.g. its labels) and stores it as a new version.
    pub fn update(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> Result<u64> {
        let mut obj = self
            .get(api_version, kind, namespace, name)
            .with_context(|| format!("no {kind} {namespace}/{name}"))?;
        f(&mut obj);
        self.apply(obj)
    }

    /// The stored object, if any.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let k = Kind::by_type(api_version, kind)?;
        let ns = if k.namespaced { namespace } else { "" };
        self.shared
            .state
            .lock()
            .objects
            .get(&(k.resource, ns.to_string(), name.to_string()))
            .cloned()
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        let Some(k) = Kind::by_type(api_version, kind) else {
            return false;
        };
        let ns = if k.namespaced { namespace } else { "" };
        let mut st = self.shared.state.lock();
        let Some(mut obj) = st
            .objects
            .remove(&(k.resource, ns.to_string(), name.to_string()))
        else {
            return false;
        };
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        st.record("DELETED", k, ns.to_string(), obj);
        true
    }

    /// Ends every open watch stream, as an API server restart or a load balancer would.
    pub fn disconnect_watches(&self) {
        self.shared.state.lock().watchers.clear();
    }

    /// Forgets the event history (as etcd compaction does) and ends every watch, so each
    /// watcher resumes from a version that is gone and gets 410.
    ///
    /// The resourceVersion moves on first, as another object's write would, so no watcher
    /// can already be at the compacted version.
    pub fn compact_and_disconnect(&self) {
        let mut st = self.shared.state.lock();
        st.rv += 1;
        st.oldest = st.rv;
        st.history.clear();
        st.watchers.clear();
    }

    /// `list` requests served so far.
    pub fn lists(&self) -> u64 {
        self.shared.counters.lists.load(Ordering::Relaxed)
    }

    /// `watch` requests served so far.
    pub fn watches(&self) -> u64 {
        self.shared.counters.watches.load(Ordering::Relaxed)
    }

    /// Watches answered with 410 Gone so far.
    pub fn gone(&self) -> u64 {
        self.shared.counters.gone.load(Ordering::Relaxed)
    }

    /// `BOOKMARK` events sent so far.
    pub fn bookmarks(&self) -> u64 {
        self.shared.counters.bookmarks.load(Ordering::Relaxed)
    }

    /// Stops serving `resource` (plural, e.g. `grpcroutes`): its requests get 404, as for
    /// a CRD that is not installed.
    pub fn unserve(&self, resource: &str) {
        self.shared.unserved.lock().push(resource.to_string());
    }

    /// Every request served so far, as `path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().clone()
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.state.lock().rv
    }

    /// Stops serving: closes the listener and every connection.
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.shared.state.lock().watchers.clear();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Creates or replaces an object; its new resourceVersion and the stored object.
fn store(shared: &Shared, mut object: Value) -> Result<(u64, Value)> {
    let api_version = object["apiVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let kind_name = object["kind"].as_str().unwrap_or_default().to_string();
    let Some(kind) = Kind::by_type(&api_version, &kind_name) else {
        bail!("the fake API server does not serve {api_version} {kind_name}");
    };
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .context("metadata.name is required")?
        .to_string();
    let namespace = if kind.namespaced {
        object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string()
    } else {
        String::new()
    };
    let mut st = shared.state.lock();
    st.rv += 1;
    let rv = st.rv;
    let key: Key = (kind.resource, namespace.clone(), name.clone());
    let existing = st.objects.get(&key).cloned();
    let meta = object
        .as_object_mut()
        .context("an object is a JSON object")?
        .entry("metadata")
        .or_insert_with(|| json!({}));
    meta["resourceVersion"] = json!(rv.to_string());
    if kind.namespaced {
        meta["namespace"] = json!(namespace);
    }
    let (uid, created) = match &existing {
        Some(old) => (
            old.pointer("/metadata/uid").cloned(),
            old.pointer("/metadata/creationTimestamp").cloned(),
        ),
        None => (None, None),
    };
    meta["uid"] = uid.unwrap_or_else(|| json!(format!("uid-{rv}")));
    meta["creationTimestamp"] = created.unwrap_or_else(|| json!("2026-01-01T00:00:00Z"));
    let ty = if existing.is_some() {
        "MODIFIED"
    } else {
        "ADDED"
    };
    st.objects.insert(key, object.clone());
    st.record(ty, kind, namespace, object.clone());
    Ok((rv, object))
}

// === impl State ===

impl State {
    fn record(&mut self, ty: &'static str, kind: &'static Kind, namespace: String, object: Value) {
        let e = Event {
            rv: self.rv,
            resource: kind.resource,
            namespace,
            ty,
            object,
        };
        let line = event_line(ty, &e.object);
        self.watchers
            .retain(|w| !w.wants(&e) || w.tx.send(line.clone()).is_ok());
        self.history.push_back(e);
        while self.history.len() > RETAINED_EVENTS {
            if let Some(old) = self.history.pop_front() {
                self.oldest = old.rv + 1;
            }
        }
    }
}

fn event_line(ty: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": ty, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

// === serving ===

async fn accept_loop(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(serve(&shared, req).await) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                });
            }
        }
    }
    // Dropping the set aborts every connection, watch streams included.
    conns.abort_all();
}

/// A response body fed by a channel: one watch event per chunk.
enum Reply {
    Full(Full<Bytes>),
    Stream(mpsc::UnboundedReceiver<Bytes>),
}

impl Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Reply::Full(f) => Pin::new(f).poll_frame(cx),
            Reply::Stream(rx) => rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        }
    }
}

fn json_reply(status: StatusCode, v: &Value) -> Response<Reply> {
    let mut resp = Response::new(Reply::Full(Full::new(Bytes::from(v.to_string()))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code})
}

fn not_found(what: &str) -> Response<Reply> {
    json_reply(
        StatusCode::NOT_FOUND,
        &status(404, "NotFound", &format!("{what} not found")),
    )
}

/// Where a request path points: the kind, the namespace and the object's name, if any.
struct Route {
    kind: &'static Kind,
    namespace: Option<String>,
    name: Option<String>,
}

/// `/api/v1/[namespaces/<ns>/]<resource>[/<name>]` or the same under `/apis/<g>/<v>/`.
#[allow(clippy::result_large_err)]
fn route(shared: &Shared, path: &str) -> Result<Route, Response<Reply>> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(not_found(path)),
    };
    let (namespace, resource, name) = match rest {
        [r] => (None, *r, None),
        ["namespaces", ns, r] => (Some(ns.to_string()), *r, None),
        ["namespaces", ns, r, n] => (Some(ns.to_string()), *r, Some(n.to_string())),
        _ => return Err(not_found(path)),
    };
    let Some(kind) = Kind::by_path(group, version, resource) else {
        return Err(not_found(path));
    };
    if shared.unserved.lock().iter().any(|r| r == resource) {
        return Err(not_found(path));
    }
    Ok(Route {
        kind,
        namespace,
        name,
    })
}

/// GETs are answered from the store; creates (`POST`) and replaces (`PUT`) write to it.
async fn serve(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Reply> {
    if req.method() == hyper::Method::GET {
        return handle(shared, req);
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    shared
        .requests
        .lock()
        .push(format!("{method} {}", req.uri()));
    let body = match http_body_util::Limited::new(req.into_body(), 1 << 20)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return json_reply(
                StatusCode::BAD_REQUEST,
                &status(400, "BadRequest", &format!("reading the body: {e}")),
            );
        }
    };
    let route = match route(shared, &path) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let object: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return json_reply(
                StatusCode::BAD_REQUEST,
                &status(400, "BadRequest", &format!("the body is not JSON: {e}")),
            );
        }
    };
    write(shared, &method, route, object)
}

fn write(
    shared: &Shared,
    method: &hyper::Method,
    route: Route,
    mut object: Value,
) -> Response<Reply> {
    let bad = |msg: String| json_reply(StatusCode::BAD_REQUEST, &status(400, "BadRequest", &msg));
    let kind = route.kind;
    if object["kind"] != kind.kind || object["apiVersion"] != kind.api_version().as_str() {
        return bad(format!(
            "the body is not a {} {}",
            kind.api_version(),
            kind.kind
        ));
    }
    let Some(name) = object["metadata"]["name"].as_str().map(str::to_string) else {
        return bad("metadata.name is required".into());
    };
    let namespace = route.namespace.clone().unwrap_or_default();
    if kind.namespaced {
        object["metadata"]["namespace"] = json!(namespace);
    }
    let key: Key = (kind.resource, namespace.clone(), name.clone());
    let what = format!("{} \"{name}\"", kind.resource);
    match (method, route.name) {
        (&hyper::Method::POST, None) => {
            if let Some(winner) = shared.race_next_create.lock().take()
                && winner["metadata"]["name"] == name.as_str()
            {
                let _ = store(shared, winner);
            }
            if shared.state.lock().objects.contains_key(&key) {
                return json_reply(
                    StatusCode::CONFLICT,
                    &status(409, "AlreadyExists", &format!("{what} already exists")),
                );
            }
            match store(shared, object) {
                Ok((_, stored)) => json_reply(StatusCode::CREATED, &stored),
                Err(e) => bad(format!("{e:#}")),
            }
        }
        (&hyper::Method::PUT, Some(path_name)) if path_name == name => {
            let current = shared.state.lock().objects.get(&key).cloned();
            let Some(current) = current else {
                return not_found(&what);
            };
            let sent = &object["metadata"]["resourceVersion"];
            if !sent.is_null() && *sent != current["metadata"]["resourceVersion"] {
                return json_reply(
                    StatusCode::CONFLICT,
                    &status(
                        409,
                        "Conflict",
                        &format!(
                            "Operation cannot be fulfilled on {what}: the object has been modified; please apply your changes to the latest version and try again"
                        ),
                    ),
                );
            }
            match store(shared, object) {
                Ok((_, stored)) => json_reply(StatusCode::OK, &stored),
                Err(e) => bad(format!("{e:#}")),
            }
        }
        _ => json_reply(
            StatusCode::METHOD_NOT_ALLOWED,
            &status(
                405,
                "MethodNotAllowed",
                "the fake API server creates with POST on a collection and replaces with PUT on an object",
            ),
        ),
    }
}

fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Reply> {
    let path = req.uri().path().to_string();
    shared.requests.lock().push(req.uri().to_string());
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), percent_decode(v))
        })
        .collect();
    let Route {
        kind,
        namespace,
        name: one,
    } = match route(shared, &path) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    if let Some(one) = one {
        let key: Key = (kind.resource, namespace.unwrap_or_default(), one.clone());
        return match shared.state.lock().objects.get(&key) {
            Some(obj) => json_reply(StatusCode::OK, obj),
            None => not_found(&format!("{} \"{one}\"", kind.resource)),
        };
    }
    let name = query
        .get("fieldSelector")
        .and_then(|f| f.strip_prefix("metadata.name="))
        .map(str::to_string);
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    if watching {
        let from = query.get("resourceVersion").cloned().unwrap_or_default();
        let bookmarks = query
            .get("allowWatchBookmarks")
            .is_some_and(|v| v == "true");
        watch(shared, kind, namespace, name, &from, bookmarks)
    } else {
        list(shared, kind, namespace.as_deref(), name.as_deref())
    }
}

fn list(
    shared: &Shared,
    kind: &Kind,
    namespace: Option<&str>,
    name: Option<&str>,
) -> Response<Reply> {
    shared.counters.lists.fetch_add(1, Ordering::Relaxed);
    let st = shared.state.lock();
    let items: Vec<Value> = st
        .objects
        .iter()
        .filter(|((r, ns, n), _)| {
            *r == kind.resource
                && namespace.is_none_or(|want| want == ns)
                && name.is_none_or(|want| want == n)
        })
        .map(|(_, v)| v.clone())
        .collect();
    json_reply(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", kind.kind),
            "apiVersion": kind.api_version(),
            "metadata": {"resourceVersion": st.rv.to_string()},
            "items": items,
        }),
    )
}

fn watch(
    shared: &Arc<Shared>,
    kind: &'static Kind,
    namespace: Option<String>,
    name: Option<String>,
    from: &str,
    bookmarks: bool,
) -> Response<Reply> {
    shared.counters.watches.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::unbounded_channel();
    let w = Watcher {
        resource: kind.resource,
        namespace,
        name,
        tx,
    };
    let mut st = shared.state.lock();
    match from.parse::<u64>() {
        // "0" or absent: "any version": the current state as ADDED, then live.
        Err(_) | Ok(0) => {
            for ((r, ns, _), obj) in &st.objects {
                let e = Event {
                    rv: 0,
                    resource: r,
                    namespace: ns.clone(),
                    ty: "ADDED",
                    object: obj.clone(),
                };
                if w.wants(&e) {
                    let _ = w.tx.send(event_line("ADDED", obj));
                }
            }
        }
        Ok(v) if v < st.oldest => {
            shared.counters.gone.fetch_add(1, Ordering::Relaxed);
            let gone = status(
                410,
                "Expired",
                &format!("too old resource version: {v} ({})", st.oldest),
            );
            let _ = w.tx.send(event_line("ERROR", &gone));
            // The stream ends here: the sender is dropped with `w`.
            return json_reply_stream(rx);
        }
        Ok(v) => {
            for e in st.history.iter().filter(|e| e.rv > v && w.wants(e)) {
                let _ = w.tx.send(event_line(e.ty, &e.object));
            }
        }
    }
    if bookmarks {
        let shared = shared.clone();
        // Weak: a disconnect drops the registered sender, and this must not keep the
        // stream open.
        let weak = w.tx.downgrade();
        let api_version = kind.api_version();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(BOOKMARK_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(tx) = weak.upgrade() else { return };
                // Sent under the lock, so it is ordered after every event it covers.
                let st = shared.state.lock();
                let mark = json!({"kind": kind.kind, "apiVersion": api_version,
                    "metadata": {"resourceVersion": st.rv.to_string()}});
                if tx.send(event_line("BOOKMARK", &mark)).is_err() {
                    return;
                }
                shared.counters.bookmarks.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    st.watchers.push(w);
    json_reply_stream(rx)
}

fn json_reply_stream(rx: mpsc::UnboundedReceiver<Bytes>) -> Response<Reply> {
    let mut resp = Response::new(Reply::Stream(rx));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
