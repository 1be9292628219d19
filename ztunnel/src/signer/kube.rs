//! The two API server calls the signer makes: a TokenReview per request, and the pod list
//! of a node tunnel's node (cached briefly; a denial from the cache is re-checked against a
//! fresh list so a pod that just started is not refused).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_shared::signer::http::{Endpoint, HttpError};
use http::{Method, StatusCode};
use parking_lot::Mutex;

use super::authz::{self, Caller, PodIdentity, ReviewError};

/// Largest API server answer read (a node's pod list).
const MAX_KUBE_BODY: usize = 8 * 1024 * 1024;

/// The API server could not answer (503 to the caller).
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// Unreachable, timed out or TLS failed.
    #[error("API server: {0}")]
    Http(#[from] HttpError),
    /// It answered with an error status.
    #[error("API server answered {status} to {what}: {body}")]
    Status {
        /// What was asked.
        what: &'static str,
        /// The status.
        status: StatusCode,
        /// The start of its body.
        body: String,
    },
    /// It answered something unreadable.
    #[error("API server answer to {what}: {reason}")]
    Malformed {
        /// What was asked.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The node name is not a valid name (it comes from a token: never put it in a URL
    /// unchecked).
    #[error("invalid node name {0:?}")]
    BadNode(String),
}

impl KubeError {
    /// An error status answered to `what`, with the start of the answer.
    pub fn status(what: &'static str, status: StatusCode, body: &[u8]) -> KubeError {
        KubeError::Status {
            what,
            status,
            body: String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
        }
    }
}

/// Pod lists by node, with when they were fetched.
type PodCache = HashMap<String, (Instant, Arc<Vec<PodIdentity>>)>;

/// API server access.
#[derive(Debug)]
pub struct Kube {
    endpoint: Endpoint,
    token_file: Option<PathBuf>,
    audience: String,
    pod_cache_ttl: Duration,
    pods: Mutex<PodCache>,
}

impl Kube {
    /// Talks to `endpoint`, authenticating with the token in `token_file` if it exists
    /// (re-read per call: kubelet rotates it).
    pub fn new(
        endpoint: Endpoint,
        token_file: Option<PathBuf>,
        audience: String,
        pod_cache_ttl: Duration,
    ) -> Self {
        Kube {
            endpoint,
            token_file,
            audience,
            pod_cache_ttl,
            pods: Mutex::default(),
        }
    }

    fn own_token(&self) -> Option<String> {
        let path = self.token_file.as_ref()?;
        let token = std::fs::read_to_string(path).ok()?;
        let token = token.trim();
        (!token.is_empty()).then(|| token.to_string())
    }

    /// One request as the signer (its own token), with a JSON body; the status and the
    /// answer, whatever the status. `what` names the call in errors.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
        what: &'static str,
    ) -> Result<(StatusCode, bytes::Bytes), KubeError> {
        let body = match body {
            Some(v) => Some(serde_json::to_vec(&v).map_err(|e| KubeError::Malformed {
                what,
                reason: e.to_string(),
            })?),
            None => None,
        };
        Ok(self
            .endpoint
            .send(method, path, self.own_token().as_deref(), body)
            .await?)
    }

    /// Reviews `token`: the outer error is the API server's, the inner one the token's.
    pub async fn review(&self, token: &str) -> Result<Result<Caller, ReviewError>, KubeError> {
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.audience]},
        });
        let body = serde_json::to_vec(&body).map_err(|e| KubeError::Malformed {
            what: "TokenReview",
            reason: e.to_string(),
        })?;
        let (status, answer) = self
            .endpoint
            .send(
                Method::POST,
                "/apis/authentication.k8s.io/v1/tokenreviews",
                self.own_token().as_deref(),
                Some(body),
            )
            .await?;
        if !status.is_success() {
            return Err(KubeError::Status {
                what: "TokenReview",
                status,
                body: String::from_utf8_lossy(&answer[..answer.len().min(200)]).into_owned(),
            });
        }
        match authz::caller_from_review(&answer, &self.audience) {
            Err(ReviewError::Malformed(reason)) => Err(KubeError::Malformed {
                what: "TokenReview",
                reason,
            }),
            other => Ok(other),
        }
    }

    /// The identities of the pods on `node`; from the cache unless `fresh`.
    pub async fn pods_on(
        &self,
        node: &str,
        fresh: bool,
    ) -> Result<Arc<Vec<PodIdentity>>, KubeError> {
        if !valid_node_name(node) {
            return Err(KubeError::BadNode(node.to_string()));
        }
        if !fresh
            && let Some((at, pods)) = self.pods.lock().get(node)
            && at.elapsed() < self.pod_cache_ttl
        {
            return Ok(pods.clone());
        }
        let path = format!("/api/v1/pods?fieldSelector=spec.nodeName%3D{node}");
        let (status, answer) = self
            .endpoint
            .send(Method::GET, &path, self.own_token().as_deref(), None)
            .await?;
        if !status.is_success() {
            return Err(KubeError::Status {
                what: "pod list",
                status,
                body: String::from_utf8_lossy(&answer[..answer.len().min(200)]).into_owned(),
            });
        }
        let pods =
            Arc::new(
                authz::pods_from_list(&answer).map_err(|reason| KubeError::Malformed {
                    what: "pod list",
                    reason,
                })?,
            );
        let mut cache = self.pods.lock();
        cache.retain(|_, (at, _)| at.elapsed() < self.pod_cache_ttl);
        cache.insert(node.to_string(), (Instant::now(), pods.clone()));
        Ok(pods)
    }
}

/// A DNS subdomain name, as Kubernetes requires of node names.
fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// Endpoint plus the timeout and body limit the signer uses against the API server.
pub fn endpoint(url: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Endpoint, HttpError> {
    Endpoint::new(url, tls, Duration::from_secs(5), MAX_KUBE_BODY)
}

#[cfg(test)]
mod tests {
    #[test]
    fn node_names_that_could_change_the_query_are_refused() {
        assert!(super::valid_node_name("node-1.example"));
        for bad in ["", "a&b", "a=b", "a/b", "A", "a b", "a%3D"] {
            assert!(!super::valid_node_name(bad), "{bad}");
        }
    }
}
