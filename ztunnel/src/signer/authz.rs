//! Who may hold which identity: pure functions over a reviewed token, so every rule is
//! unit-tested without a server.
//!
//! - A caller whose service account is a node tunnel's (`ambit-system/ztunnel` by
//!   default) may obtain the identity of any pod that runs on the node its token was
//!   issued for (the `authentication.kubernetes.io/node-name` extra of a bound token).
//!   A node tunnel's token without a node is refused: without it the signer cannot tell
//!   which node is asking.
//! - Any other caller (a waypoint) may obtain exactly its own identity,
//!   `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
//! - Nobody obtains an identity outside the signer's trust domain.

use std::collections::BTreeSet;

use ambit_shared::identity::Identity;
use serde::Deserialize;
use serde_json::Value;

/// Extra key carrying the node of a bound service-account token.
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// Extra key carrying the pod of a bound service-account token.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// Extra key carrying the pod UID of a bound service-account token.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// An authenticated caller, from a TokenReview's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `system:serviceaccount:<ns>:<sa>`.
    pub username: String,
    /// The service account's namespace.
    pub namespace: String,
    /// The service account.
    pub service_account: String,
    /// The node the token's pod runs on (bound tokens only).
    pub node: Option<String>,
    /// The token's pod (bound tokens only).
    pub pod_name: Option<String>,
    /// The token's pod UID (bound tokens only).
    pub pod_uid: Option<String>,
}

/// Why a reviewed token does not name a usable caller (answered with 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    /// The API server did not authenticate the token.
    #[error("token not authenticated{}", .0.as_deref().map(|e| format!(": {e}")).unwrap_or_default())]
    NotAuthenticated(Option<String>),
    /// The token is not a service account's.
    #[error("{0} is not a service account")]
    NotServiceAccount(String),
    /// The review answer is not what the API documents.
    #[error("unexpected TokenReview answer: {0}")]
    Malformed(String),
}

#[derive(Debug, Deserialize)]
struct Review {
    status: Option<ReviewStatus>,
}

#[derive(Debug, Deserialize)]
struct ReviewStatus {
    #[serde(default)]
    authenticated: bool,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    user: Option<ReviewUser>,
    #[serde(default)]
    audiences: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct ReviewUser {
    #[serde(default)]
    username: String,
    #[serde(default)]
    extra: std::collections::BTreeMap<String, Value>,
}

/// Turns a TokenReview answer into a caller. `audience` must be among the audiences the
/// API server says the token is valid for, when it lists them.
pub fn caller_from_review(body: &[u8], audience: &str) -> Result<Caller, ReviewError> {
    let review: Review =
        serde_json::from_slice(body).map_err(|e| ReviewError::Malformed(e.to_string()))?;
    let status = review
        .status
        .ok_or_else(|| ReviewError::Malformed("no status".into()))?;
    if !status.authenticated {
        return Err(ReviewError::NotAuthenticated(status.error));
    }
    if let Some(auds) = &status.audiences
        && !auds.iter().any(|a| a == audience)
    {
        return Err(ReviewError::NotAuthenticated(Some(format!(
            "token not valid for audience {audience}"
        ))));
    }
    let user = status
        .user
        .ok_or_else(|| ReviewError::Malformed("authenticated without a user".into()))?;
    let rest = user
        .username
        .strip_prefix("system:serviceaccount:")
        .ok_or_else(|| ReviewError::NotServiceAccount(user.username.clone()))?;
    let (namespace, service_account) = rest
        .split_once(':')
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
        .ok_or_else(|| ReviewError::NotServiceAccount(user.username.clone()))?;
    let extra = |key: &str| -> Option<String> {
        match user.extra.get(key)? {
            Value::Array(values) => values.first()?.as_str().map(str::to_string),
            Value::String(s) => Some(s.clone()),
            _ => None,
        }
        .filter(|s| !s.is_empty())
    };
    Ok(Caller {
        namespace: namespace.to_string(),
        service_account: service_account.to_string(),
        node: extra(EXTRA_NODE_NAME),
        pod_name: extra(EXTRA_POD_NAME),
        pod_uid: extra(EXTRA_POD_UID),
        username: user.username,
    })
}

/// What the signer allows.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The only trust domain it signs for.
    pub trust_domain: String,
    /// `(namespace, service account)` of node tunnels.
    pub node_tunnels: BTreeSet<(String, String)>,
}

impl Policy {
    /// True if `caller` is a node tunnel.
    pub fn is_node_tunnel(&self, caller: &Caller) -> bool {
        self.node_tunnels
            .contains(&(caller.namespace.clone(), caller.service_account.clone()))
    }
}

/// A pod's service account identity, as the API server lists it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodIdentity {
    /// Namespace.
    pub namespace: String,
    /// `spec.serviceAccountName` (`default` when unset).
    pub service_account: String,
}

/// The decision, with the reason logged and returned to the caller on refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Sign.
    Allow(&'static str),
    /// Refuse with 403.
    Deny(String),
}

/// What a node tunnel needs looked up first: the pods on its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Needs {
    /// Decide with [`authorize`] now (no pod list needed).
    Nothing,
    /// List the pods of this node, then decide.
    PodsOn(String),
}

/// Whether [`authorize`] needs the pod list, and for which node. A node tunnel's token
/// without a node gets a denial straight away.
pub fn needs(policy: &Policy, caller: &Caller) -> Result<Needs, Decision> {
    if !policy.is_node_tunnel(caller) {
        return Ok(Needs::Nothing);
    }
    match &caller.node {
        Some(node) => Ok(Needs::PodsOn(node.clone())),
        None => Err(Decision::Deny(format!(
            "{} is a node tunnel but its token names no node (use a bound projected token)",
            caller.username
        ))),
    }
}

/// Decides whether `caller` may hold `requested`. `pods_on_node` is the pod list of the
/// caller's node when [`needs`] asked for it.
pub fn authorize(
    policy: &Policy,
    caller: &Caller,
    requested: &Identity,
    pods_on_node: Option<&[PodIdentity]>,
) -> Decision {
    if requested.trust_domain() != policy.trust_domain {
        return Decision::Deny(format!(
            "trust domain {} is not {}",
            requested.trust_domain(),
            policy.trust_domain
        ));
    }
    if policy.is_node_tunnel(caller) {
        let Some(node) = &caller.node else {
            return Decision::Deny(format!(
                "{} is a node tunnel but its token names no node",
                caller.username
            ));
        };
        let on_node = pods_on_node.unwrap_or_default().iter().any(|p| {
            p.namespace == requested.namespace() && p.service_account == requested.service_account()
        });
        return if on_node {
            Decision::Allow("a pod with this identity runs on the caller's node")
        } else {
            Decision::Deny(format!(
                "no pod with identity {requested} runs on node {node}"
            ))
        };
    }
    if requested.namespace() == caller.namespace
        && requested.service_account() == caller.service_account
    {
        Decision::Allow("the caller's own identity")
    } else {
        Decision::Deny(format!(
            "{} may only obtain its own identity spiffe://{}/ns/{}/sa/{}",
            caller.username, policy.trust_domain, caller.namespace, caller.service_account
        ))
    }
}

/// Service-account identities of the pods in a `PodList` answer, skipping pods that are
/// finished (their identity no longer runs there).
pub fn pods_from_list(body: &[u8]) -> Result<Vec<PodIdentity>, String> {
    #[derive(Deserialize)]
    struct PodList {
        #[serde(default)]
        items: Vec<Pod>,
    }
    #[derive(Deserialize)]
    struct Pod {
        #[serde(default)]
        metadata: Meta,
        #[serde(default)]
        spec: Spec,
        #[serde(default)]
        status: Status,
    }
    #[derive(Deserialize, Default)]
    struct Meta {
        #[serde(default)]
        namespace: String,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    struct Spec {
        #[serde(default)]
        service_account_name: Option<String>,
    }
    #[derive(Deserialize, Default)]
    struct Status {
        #[serde(default)]
        phase: Option<String>,
    }
    let list: PodList = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let mut out: Vec<PodIdentity> = list
        .items
        .into_iter()
        .filter(|p| !matches!(p.status.phase.as_deref(), Some("Succeeded" | "Failed")))
        .filter(|p| !p.metadata.namespace.is_empty())
        .map(|p| PodIdentity {
            namespace: p.metadata.namespace,
            service_account: p
                .spec
                .service_account_name
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
        })
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            trust_domain: "cluster.local".into(),
            node_tunnels: [("ambit-system".to_string(), "ztunnel".to_string())].into(),
        }
    }

    fn review(user: &str, extra: Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "status": {"authenticated": true, "audiences": ["ambit-signer"],
                       "user": {"username": user, "extra": extra}}
        }))
        .expect("json")
    }

    fn id(s: &str) -> Identity {
        s.parse().expect("identity")
    }

    fn ztunnel_on(node: &str) -> Caller {
        caller_from_review(
            &review(
                "system:serviceaccount:ambit-system:ztunnel",
                serde_json::json!({EXTRA_NODE_NAME: [node], EXTRA_POD_NAME: ["ztunnel-abc"], EXTRA_POD_UID: ["u-1"]}),
            ),
            "ambit-signer",
        )
        .expect("caller")
    }

    #[test]
    fn a_review_yields_the_service_account_and_the_bound_extras() {
        let c = ztunnel_on("node-1");
        assert_eq!(
            (c.namespace.as_str(), c.service_account.as_str()),
            ("ambit-system", "ztunnel")
        );
        assert_eq!(c.node.as_deref(), Some("node-1"));
        assert_eq!(c.pod_name.as_deref(), Some("ztunnel-abc"));
        assert_eq!(c.pod_uid.as_deref(), Some("u-1"));
    }

    #[test]
    fn unauthenticated_foreign_audience_and_non_service_account_tokens_are_refused() {
        let no = br#"{"status":{"authenticated":false,"error":"invalid bearer token"}}"#;
        assert_eq!(
            caller_from_review(no, "ambit-signer"),
            Err(ReviewError::NotAuthenticated(Some(
                "invalid bearer token".into()
            )))
        );
        let other_aud = br#"{"status":{"authenticated":true,"audiences":["api"],"user":{"username":"system:serviceaccount:a:b"}}}"#;
        assert!(matches!(
            caller_from_review(other_aud, "ambit-signer"),
            Err(ReviewError::NotAuthenticated(_))
        ));
        let human = review("alice", serde_json::json!({}));
        assert_eq!(
            caller_from_review(&human, "ambit-signer"),
            Err(ReviewError::NotServiceAccount("alice".into()))
        );
        let bad = review("system:serviceaccount:ns", serde_json::json!({}));
        assert!(matches!(
            caller_from_review(&bad, "ambit-signer"),
            Err(ReviewError::NotServiceAccount(_))
        ));
        assert!(matches!(
            caller_from_review(b"{", "ambit-signer"),
            Err(ReviewError::Malformed(_))
        ));
        assert!(matches!(
            caller_from_review(b"{}", "ambit-signer"),
            Err(ReviewError::Malformed(_))
        ));
    }

    #[test]
    fn a_node_tunnel_gets_identities_of_pods_on_its_own_node_only() {
        let p = policy();
        let zt = ztunnel_on("node-1");
        assert_eq!(needs(&p, &zt), Ok(Needs::PodsOn("node-1".into())));
        let pods = vec![PodIdentity {
            namespace: "shop".into(),
            service_account: "web".into(),
        }];
        assert!(matches!(
            authorize(
                &p,
                &zt,
                &id("spiffe://cluster.local/ns/shop/sa/web"),
                Some(&pods)
            ),
            Decision::Allow(_)
        ));
        // Same name in another namespace, another SA, and no list at all.
        for other in [
            "spiffe://cluster.local/ns/bank/sa/web",
            "spiffe://cluster.local/ns/shop/sa/db",
        ] {
            let d = authorize(&p, &zt, &id(other), Some(&pods));
            assert!(
                matches!(&d, Decision::Deny(r) if r.contains("node-1")),
                "{d:?}"
            );
        }
        assert!(matches!(
            authorize(&p, &zt, &id("spiffe://cluster.local/ns/shop/sa/web"), None),
            Decision::Deny(_)
        ));
        // Even a pod on the node does not lend its identity across trust domains.
        assert!(matches!(
            authorize(&p, &zt, &id("spiffe://other.td/ns/shop/sa/web"), Some(&pods)),
            Decision::Deny(r) if r.contains("trust domain")
        ));
    }

    #[test]
    fn a_node_tunnel_token_without_a_node_is_refused() {
        let p = policy();
        let zt = caller_from_review(
            &review(
                "system:serviceaccount:ambit-system:ztunnel",
                serde_json::json!({}),
            ),
            "ambit-signer",
        )
        .expect("caller");
        assert!(matches!(needs(&p, &zt), Err(Decision::Deny(r)) if r.contains("names no node")));
        assert!(matches!(
            authorize(
                &p,
                &zt,
                &id("spiffe://cluster.local/ns/shop/sa/web"),
                Some(&[])
            ),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn any_other_caller_gets_exactly_its_own_identity() {
        let p = policy();
        let wp = caller_from_review(
            &review(
                "system:serviceaccount:shop:shop-waypoint",
                serde_json::json!({EXTRA_NODE_NAME: ["node-1"]}),
            ),
            "ambit-signer",
        )
        .expect("caller");
        assert_eq!(needs(&p, &wp), Ok(Needs::Nothing));
        assert!(matches!(
            authorize(
                &p,
                &wp,
                &id("spiffe://cluster.local/ns/shop/sa/shop-waypoint"),
                None
            ),
            Decision::Allow(_)
        ));
        // Being on a node with other pods lends nothing to a non-tunnel caller.
        let pods = vec![PodIdentity {
            namespace: "shop".into(),
            service_account: "web".into(),
        }];
        assert!(matches!(
            authorize(&p, &wp, &id("spiffe://cluster.local/ns/shop/sa/web"), Some(&pods)),
            Decision::Deny(r) if r.contains("its own identity")
        ));
        // A ztunnel service account in another namespace is not a node tunnel.
        let fake = caller_from_review(
            &review(
                "system:serviceaccount:shop:ztunnel",
                serde_json::json!({EXTRA_NODE_NAME: ["node-1"]}),
            ),
            "ambit-signer",
        )
        .expect("caller");
        assert!(!p.is_node_tunnel(&fake));
        assert!(matches!(
            authorize(
                &p,
                &fake,
                &id("spiffe://cluster.local/ns/shop/sa/web"),
                Some(&pods)
            ),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn pod_lists_default_the_service_account_and_skip_finished_pods() {
        let body = br#"{"kind":"PodList","items":[
            {"metadata":{"name":"a","namespace":"shop"},"spec":{"serviceAccountName":"web","nodeName":"n"},"status":{"phase":"Running"}},
            {"metadata":{"name":"b","namespace":"shop"},"spec":{"nodeName":"n"}},
            {"metadata":{"name":"c","namespace":"bank"},"spec":{"serviceAccountName":"old"},"status":{"phase":"Succeeded"}}
        ]}"#;
        let pods = pods_from_list(body).expect("list");
        assert_eq!(
            pods,
            vec![
                PodIdentity {
                    namespace: "shop".into(),
                    service_account: "default".into()
                },
                PodIdentity {
                    namespace: "shop".into(),
                    service_account: "web".into()
                },
            ]
        );
        assert!(pods_from_list(b"[").is_err());
    }
}
