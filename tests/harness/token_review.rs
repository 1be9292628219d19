//! A fake Kubernetes API server for the certificate signer's tests: the TokenReview
//! endpoint and the pod list by node, on loopback inside a namespace the test created.
//!
//! Tokens are mapped to users (with the `extra` of bound projected tokens) and carry an
//! audience, like real ones; the pod list is whatever the test sets. The server itself
//! insists on the signer's own bearer token, as an API server would.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde_json::{Value, json};

/// What a known token authenticates as.
#[derive(Debug, Clone)]
pub struct TokenUser {
    /// `system:serviceaccount:<ns>:<sa>`.
    pub username: String,
    /// Audiences the token was minted for.
    pub audiences: Vec<String>,
    /// `extra`, e.g. `authentication.kubernetes.io/node-name`.
    pub extra: BTreeMap<String, Vec<String>>,
}

impl TokenUser {
    /// A bound token of service account `ns/sa` for `audience`, from pod `pod` on `node`.
    pub fn bound(ns: &str, sa: &str, audience: &str, pod: &str, node: &str) -> TokenUser {
        let extra = [
            ("authentication.kubernetes.io/node-name", node),
            ("authentication.kubernetes.io/pod-name", pod),
            (
                "authentication.kubernetes.io/pod-uid",
                "00000000-0000-0000-0000-000000000001",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
        .collect();
        TokenUser {
            username: format!("system:serviceaccount:{ns}:{sa}"),
            audiences: vec![audience.to_string()],
            extra,
        }
    }
}

/// A pod as the fake lists it.
#[derive(Debug, Clone)]
pub struct FakePod {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// `spec.serviceAccountName`.
    pub service_account: String,
    /// `spec.nodeName`.
    pub node: String,
}

#[derive(Default)]
struct State {
    tokens: HashMap<String, TokenUser>,
    pods: Vec<FakePod>,
    caller_token: Option<String>,
    reviews: Vec<String>,
    pod_lists: Vec<String>,
    unavailable: bool,
}

/// The running fake; stops when dropped.
pub struct FakeKube {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeKube {
    /// Serves plain HTTP on `127.0.0.1:<free port>` inside the network namespace at
    /// `netns` (where the signer runs). `caller_token` is what the signer must present.
    pub fn start_in(netns: &Path, caller_token: &str) -> Result<FakeKube> {
        let listener =
            crate::netns::run_in_netns(netns, || std::net::TcpListener::bind("127.0.0.1:0"))?
                .context("binding the fake API server")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            caller_token: Some(caller_token.to_string()),
            ..State::default()
        }));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let shared = state.clone();
        let thread = std::thread::Builder::new()
            .name("fake-kube".into())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    loop {
                        let conn = tokio::select! {
                            _ = &mut stopped => return,
                            c = listener.accept() => c,
                        };
                        let Ok((tcp, _)) = conn else { continue };
                        let state = shared.clone();
                        tokio::spawn(async move {
                            let svc = service_fn(move |req| {
                                let state = state.clone();
                                async move {
                                    Ok::<_, std::convert::Infallible>(serve(&state, req).await)
                                }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tcp), svc)
                                .await;
                        });
                    }
                });
            })?;
        Ok(FakeKube {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Makes `token` authenticate as `user`.
    pub fn add_token(&self, token: &str, user: TokenUser) {
        self.state.lock().tokens.insert(token.to_string(), user);
    }

    /// Replaces the pods the API server knows.
    pub fn set_pods(&self, pods: Vec<FakePod>) {
        self.state.lock().pods = pods;
    }

    /// TokenReviews answered so far.
    pub fn reviews(&self) -> usize {
        self.state.lock().reviews.len()
    }

    /// The tokens reviewed so far, in order.
    pub fn reviewed_tokens(&self) -> Vec<String> {
        self.state.lock().reviews.clone()
    }

    /// While set, every call gets 500, as from an API server in trouble.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.state.lock().unavailable = unavailable;
    }

    /// Nodes whose pods were listed, in order.
    pub fn pod_lists(&self) -> Vec<String> {
        self.state.lock().pod_lists.clone()
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(state: &Mutex<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let authorized = {
        let st = state.lock();
        let presented = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        st.caller_token.as_deref() == presented
    };
    if state.lock().unavailable {
        return reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"kind": "Status", "code": 500, "message": "etcdserver: request timed out"}),
        );
    }
    if !authorized {
        return reply(
            StatusCode::UNAUTHORIZED,
            json!({"kind": "Status", "code": 401, "message": "Unauthorized"}),
        );
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::POST, "/apis/authentication.k8s.io/v1/tokenreviews") => {
            let Ok(body) = req.into_body().collect().await else {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"message": "unreadable body"}),
                );
            };
            let Ok(review) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
                return reply(StatusCode::BAD_REQUEST, json!({"message": "not JSON"}));
            };
            let token = review["spec"]["token"].as_str().unwrap_or_default();
            let wanted: Vec<String> = review["spec"]["audiences"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let mut st = state.lock();
            st.reviews.push(token.to_string());
            let status = match st.tokens.get(token) {
                Some(user) if wanted.iter().all(|w| user.audiences.contains(w)) => json!({
                    "authenticated": true,
                    "user": {"username": user.username, "uid": "uid-1",
                             "groups": ["system:serviceaccounts", "system:authenticated"],
                             "extra": user.extra},
                    "audiences": wanted,
                }),
                Some(_) => {
                    json!({"authenticated": false, "error": "token audiences do not match", "user": {}})
                }
                None => {
                    json!({"authenticated": false, "error": "invalid bearer token", "user": {}})
                }
            };
            reply(
                StatusCode::CREATED,
                json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}),
            )
        }
        (Method::GET, "/api/v1/pods") => {
            let node = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("fieldSelector="))
                .map(|s| s.replace("%3D", "=").replace("%3d", "="))
                .and_then(|s| s.strip_prefix("spec.nodeName=").map(str::to_string));
            let Some(node) = node else {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"message": "expected fieldSelector=spec.nodeName=<node>"}),
                );
            };
            let mut st = state.lock();
            st.pod_lists.push(node.clone());
            let items: Vec<Value> = st
                .pods
                .iter()
                .filter(|p| p.node == node)
                .map(|p| {
                    json!({
                        "metadata": {"name": p.name, "namespace": p.namespace},
                        "spec": {"serviceAccountName": p.service_account, "nodeName": p.node},
                        "status": {"phase": "Running"},
                    })
                })
                .collect();
            reply(
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "PodList", "items": items}),
            )
        }
        _ => reply(StatusCode::NOT_FOUND, json!({"message": "not found"})),
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp
}
