//! The CA kept in a Kubernetes Secret (`--ca-secret`), created on the first start, and its
//! public roots published in a ConfigMap (`--trust-bundle-config-map`) for the node tunnels
//! and waypoints, which verify the signer's serving certificate with them.
//!
//! At start, before anything is served:
//! 1. `GET` the Secret. If it exists it is used as it is: a Secret without the issuer, its
//!    key or the bundle, or whose issuer does not load, is an error naming the Secret and
//!    the key; it is never overwritten (it may hold an operator's own CA).
//! 2. If it does not exist, a new root and issuer (`ztunnel ca init`) are generated and
//!    `POST`ed. Replicas starting together race here; the API server lets exactly one
//!    create succeed and the others get `409 AlreadyExists`, read the winner's Secret and
//!    use that, so every replica signs with the same issuer.
//! 3. The Secret's files are written to `--ca-dir` (an in-memory `emptyDir` in the
//!    manifests), which the signer loads and watches as before.
//! 4. `bundle.pem` is written to the ConfigMap (created, or updated when it differs).
//!
//! Afterwards the Secret is read again every [`SYNC_PERIOD`]: a new version (a rotation
//! with `ztunnel ca add-root|activate|remove-root` on a copy, then `kubectl apply`) is
//! checked and installed into `--ca-dir`, where the signer's CA watch picks it up, and the
//! ConfigMap follows the bundle. A version that does not load is refused and the last good
//! CA kept; a deleted Secret is not re-created while running (that would replace the CA
//! every proxy trusts).
//!
//! RBAC needs `get` on the Secret and `get`, `update` on the ConfigMap, by name, and
//! `create` on secrets and configmaps in the signer's namespace: Kubernetes cannot restrict
//! `create` by name (the object's name is not part of the request URL it authorizes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambit_shared::ca::{self, CaPaths, LocalCa, Validity};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::kube::{Kube, KubeError};

/// How often the Secret is read again.
pub const SYNC_PERIOD: Duration = Duration::from_secs(10);
/// Keys the Secret must have: the issuer the signer signs with and the roots it serves.
pub const REQUIRED_KEYS: [&str; 3] = ["issuer.pem", "issuer.key", "bundle.pem"];
/// Keys it may have (`ztunnel ca init` writes them; an operator may keep the root key
/// offline and leave `root.key` out).
pub const OPTIONAL_KEYS: [&str; 2] = ["root.pem", "root.key"];
/// The ConfigMap key of the roots (mounted as `<dir>/bundle.pem`).
pub const BUNDLE_KEY: &str = "bundle.pem";

/// A namespaced object's `namespace/name`, as the flags give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl std::str::FromStr for ObjectRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (namespace, name) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected namespace/name"))?;
        for (what, v) in [("namespace", namespace), ("name", name)] {
            ambit_shared::identity::validate_component(what, v)
                .map_err(|e| format!("{s:?}: {e}"))?;
        }
        Ok(ObjectRef {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl ObjectRef {
    fn path(&self, resource: &str) -> String {
        format!(
            "/api/v1/namespaces/{}/{resource}/{}",
            self.namespace, self.name
        )
    }

    fn collection(&self, resource: &str) -> String {
        format!("/api/v1/namespaces/{}/{resource}", self.namespace)
    }
}

/// Why the CA could not be had from, or put into, the API.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// The API server could not be asked, or refused.
    #[error(transparent)]
    Kube(#[from] KubeError),
    /// The Secret exists but is not a usable CA; it is left as it is.
    #[error(
        "Secret {secret} is not a usable CA: {reason}; it is never overwritten: fix it, or \
         delete it to have a new CA created (every proxy must then trust the new root)"
    )]
    Malformed {
        /// The Secret.
        secret: ObjectRef,
        /// What is wrong, naming the key.
        reason: String,
    },
    /// Generating a new CA failed.
    #[error("generating a new CA: {0}")]
    Generate(#[from] ca::CaError),
    /// Writing the CA directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The CA as the Secret holds it: file name to contents, and the version read.
#[derive(Debug, Clone)]
pub struct CaSecret {
    /// `issuer.pem`, `issuer.key`, `bundle.pem` and perhaps `root.pem`, `root.key`.
    pub files: BTreeMap<String, Vec<u8>>,
    /// `metadata.resourceVersion`.
    pub resource_version: String,
}

/// How the CA was had at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This signer created the Secret.
    Created,
    /// It existed (another replica, an earlier start, or the operator made it).
    Existing,
}

/// Reads a Secret's CA files from the API's JSON.
fn parse_secret(secret: &ObjectRef, body: &[u8]) -> Result<CaSecret, BootstrapError> {
    let malformed = |reason: String| BootstrapError::Malformed {
        secret: secret.clone(),
        reason,
    };
    let v: Value =
        serde_json::from_slice(body).map_err(|e| malformed(format!("unreadable JSON: {e}")))?;
    let data = v["data"].as_object();
    let mut files = BTreeMap::new();
    for key in REQUIRED_KEYS.iter().chain(&OPTIONAL_KEYS) {
        let Some(encoded) = data.and_then(|d| d.get(*key)) else {
            if REQUIRED_KEYS.contains(key) {
                return Err(malformed(format!(
                    "no data key {key:?} (it needs {})",
                    REQUIRED_KEYS.join(", ")
                )));
            }
            continue;
        };
        let bytes = encoded
            .as_str()
            .and_then(|s| BASE64.decode(s).ok())
            .ok_or_else(|| malformed(format!("data key {key:?} is not base64")))?;
        files.insert((*key).to_string(), bytes);
    }
    Ok(CaSecret {
        files,
        resource_version: v["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    })
}

/// The Secret, or `None` if it does not exist.
async fn get_secret(kube: &Kube, secret: &ObjectRef) -> Result<Option<CaSecret>, BootstrapError> {
    let (status, body) = kube
        .call(Method::GET, &secret.path("secrets"), None, "Secret get")
        .await?;
    match status {
        StatusCode::OK => parse_secret(secret, &body).map(Some),
        StatusCode::NOT_FOUND => Ok(None),
        status => Err(KubeError::status("Secret get", status, &body).into()),
    }
}

/// The CA from the Secret, which is created with a new CA if it does not exist. `scratch`
/// is a directory to generate the new CA in (removed afterwards).
pub async fn ensure_secret(
    kube: &Kube,
    secret: &ObjectRef,
    trust_domain: &str,
    scratch: &Path,
) -> Result<(CaSecret, Origin), BootstrapError> {
    if let Some(existing) = get_secret(kube, secret).await? {
        return Ok((existing, Origin::Existing));
    }
    let files = generate(trust_domain, scratch)?;
    let data: serde_json::Map<String, Value> = files
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(BASE64.encode(v))))
        .collect();
    let object = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": secret.name,
            "namespace": secret.namespace,
            "labels": {"app.kubernetes.io/part-of": "ambit", "app.kubernetes.io/name": "ambit-signer"},
        },
        "type": "Opaque",
        "data": data,
    });
    let (status, body) = kube
        .call(
            Method::POST,
            &secret.collection("secrets"),
            Some(object),
            "Secret create",
        )
        .await?;
    match status {
        StatusCode::CREATED | StatusCode::OK => {
            let created = parse_secret(secret, &body)?;
            info!(%secret, trust_domain, "created the CA Secret with a new root and issuer");
            Ok((created, Origin::Created))
        }
        // Another replica created it between our GET and POST: use its CA.
        StatusCode::CONFLICT => match get_secret(kube, secret).await? {
            Some(winner) => {
                info!(%secret, "another signer created the CA Secret first; using it");
                Ok((winner, Origin::Existing))
            }
            None => Err(KubeError::status("Secret create", status, &body).into()),
        },
        status => Err(KubeError::status("Secret create", status, &body).into()),
    }
}

/// A new root and issuer, as `ztunnel ca init` makes them, read back as files.
fn generate(
    trust_domain: &str,
    scratch: &Path,
) -> Result<BTreeMap<String, Vec<u8>>, BootstrapError> {
    let _ = std::fs::remove_dir_all(scratch);
    let result = (|| {
        ca::init_with(scratch, trust_domain, true, Validity::default())?;
        let mut files = BTreeMap::new();
        for key in REQUIRED_KEYS.iter().chain(&OPTIONAL_KEYS) {
            let path = scratch.join(key);
            let bytes =
                std::fs::read(&path).map_err(|source| BootstrapError::Io { path, source })?;
            files.insert((*key).to_string(), bytes);
        }
        Ok(files)
    })();
    let _ = std::fs::remove_dir_all(scratch);
    result
}

/// Checks the Secret's CA and writes it into `ca_dir`. Nothing in `ca_dir` changes unless
/// the whole CA loads: the issuer with its key, and at least one root in the bundle.
pub fn install(
    ca_dir: &Path,
    secret_ref: &ObjectRef,
    secret: &CaSecret,
) -> Result<(), BootstrapError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BootstrapError::Io { path, source }
    };
    std::fs::create_dir_all(ca_dir).map_err(io(ca_dir))?;
    let staging = ca_dir.join(".incoming");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir(&staging).map_err(io(&staging))?;
    let result = (|| {
        for (name, bytes) in &secret.files {
            write_private(&staging.join(name), bytes)?;
        }
        let malformed = |reason: String| BootstrapError::Malformed {
            secret: secret_ref.clone(),
            reason,
        };
        let paths = CaPaths::new(&staging);
        LocalCa::load(&paths).map_err(|e| malformed(format!("issuer.pem/issuer.key: {e}")))?;
        let bundle = secret
            .files
            .get(BUNDLE_KEY)
            .ok_or_else(|| malformed(format!("no data key {BUNDLE_KEY:?}")))?;
        let roots = ambit_shared::tls::parse_certs(&paths.bundle(), bundle)
            .map_err(|e| malformed(format!("bundle.pem: {e}")))?;
        if roots.is_empty() {
            return Err(malformed("bundle.pem: no certificate".into()));
        }
        // The key before its certificate, as `ztunnel ca` does: the CA watch refuses a
        // certificate whose key does not match and retries, so it never signs with a pair
        // that is half old and half new.
        let order = [
            "issuer.key",
            "issuer.pem",
            "root.key",
            "root.pem",
            BUNDLE_KEY,
        ];
        for name in order {
            let target = ca_dir.join(name);
            if secret.files.contains_key(name) {
                std::fs::rename(staging.join(name), &target).map_err(io(&target))?;
            } else if target.exists() {
                std::fs::remove_file(&target).map_err(io(&target))?;
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// Writes `bytes` to `path`, readable by this user only (the CA keys are in there).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), BootstrapError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| BootstrapError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

/// What publishing the bundle did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// The ConfigMap was created.
    Created,
    /// Its bundle was replaced.
    Updated,
    /// It already held this bundle.
    Unchanged,
}

/// Makes the ConfigMap hold `bundle` under `bundle.pem`, creating it if needed. Only that
/// key is touched; other keys an operator added stay.
pub async fn publish_bundle(
    kube: &Kube,
    config_map: &ObjectRef,
    bundle: &str,
) -> Result<Published, BootstrapError> {
    let (status, body) = kube
        .call(
            Method::GET,
            &config_map.path("configmaps"),
            None,
            "ConfigMap get",
        )
        .await?;
    match status {
        StatusCode::NOT_FOUND => {
            let object = json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": config_map.name,
                    "namespace": config_map.namespace,
                    "labels": {"app.kubernetes.io/part-of": "ambit", "app.kubernetes.io/name": "ambit-signer"},
                },
                "data": {BUNDLE_KEY: bundle},
            });
            let (status, body) = kube
                .call(
                    Method::POST,
                    &config_map.collection("configmaps"),
                    Some(object),
                    "ConfigMap create",
                )
                .await?;
            match status {
                StatusCode::CREATED | StatusCode::OK => Ok(Published::Created),
                status => Err(KubeError::status("ConfigMap create", status, &body).into()),
            }
        }
        StatusCode::OK => {
            let mut current: Value =
                serde_json::from_slice(&body).map_err(|e| KubeError::Malformed {
                    what: "ConfigMap get",
                    reason: e.to_string(),
                })?;
            if current["data"][BUNDLE_KEY].as_str() == Some(bundle) {
                return Ok(Published::Unchanged);
            }
            if !current["data"].is_object() {
                current["data"] = json!({});
            }
            current["data"][BUNDLE_KEY] = Value::String(bundle.to_string());
            // The resourceVersion read stays in the object: a concurrent writer makes this
            // a 409, and the next sync tries again from a fresh read.
            let (status, body) = kube
                .call(
                    Method::PUT,
                    &config_map.path("configmaps"),
                    Some(current),
                    "ConfigMap update",
                )
                .await?;
            match status {
                StatusCode::OK => Ok(Published::Updated),
                status => Err(KubeError::status("ConfigMap update", status, &body).into()),
            }
        }
        status => Err(KubeError::status("ConfigMap get", status, &body).into()),
    }
}

/// The Secret and ConfigMap the signer keeps, and where the CA files go.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// `--ca-secret`.
    pub secret: ObjectRef,
    /// `--trust-bundle-config-map`, if any.
    pub config_map: Option<ObjectRef>,
    /// `--ca-dir`, written here.
    pub ca_dir: PathBuf,
    /// The trust domain of a CA created here.
    pub trust_domain: String,
}

impl Bootstrap {
    /// Step 1 to 4 of the module docs; the Secret's version installed.
    pub async fn start(&self, kube: &Kube) -> Result<String, BootstrapError> {
        let scratch = self.ca_dir.join(".generate");
        let (secret, origin) =
            ensure_secret(kube, &self.secret, &self.trust_domain, &scratch).await?;
        install(&self.ca_dir, &self.secret, &secret)?;
        info!(secret = %self.secret, ?origin, ca_dir = %self.ca_dir.display(), "CA loaded from its Secret");
        self.publish(kube).await?;
        Ok(secret.resource_version)
    }

    async fn publish(&self, kube: &Kube) -> Result<(), BootstrapError> {
        let Some(cm) = &self.config_map else {
            return Ok(());
        };
        let path = CaPaths::new(&self.ca_dir).bundle();
        let bundle = std::fs::read_to_string(&path).map_err(|source| BootstrapError::Io {
            path: path.clone(),
            source,
        })?;
        match publish_bundle(kube, cm, &bundle).await? {
            Published::Unchanged => {}
            done => info!(config_map = %cm, ?done, "trust bundle published"),
        }
        Ok(())
    }

    /// Re-reads the Secret every [`SYNC_PERIOD`] and installs a new version; keeps the
    /// ConfigMap equal to the installed bundle. Errors are logged and retried.
    pub async fn sync(self, kube: std::sync::Arc<Kube>, mut version: String) {
        let mut tick = tokio::time::interval(SYNC_PERIOD);
        tick.tick().await;
        loop {
            tick.tick().await;
            match get_secret(&kube, &self.secret).await {
                Ok(Some(secret)) if secret.resource_version != version => {
                    match install(&self.ca_dir, &self.secret, &secret) {
                        Ok(()) => {
                            info!(secret = %self.secret, version = %secret.resource_version, "CA Secret changed; installed");
                            version = secret.resource_version;
                        }
                        Err(e) => warn!(error = %e, "keeping the last good CA"),
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => warn!(secret = %self.secret,
                    "the CA Secret was deleted; signing on with the CA in memory (it is not re-created while running)"),
                Err(e) => warn!(error = %e, "reading the CA Secret; retrying"),
            }
            if let Err(e) = self.publish(&kube).await {
                warn!(error = %e, "publishing the trust bundle; retrying");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_refs_parse_and_refuse_bad_names() {
        let r: ObjectRef = "ambit-system/ambit-signer-ca".parse().expect("parses");
        assert_eq!(
            r.path("secrets"),
            "/api/v1/namespaces/ambit-system/secrets/ambit-signer-ca"
        );
        for bad in ["ambit-signer-ca", "/x", "x/", "a/b/c", "A/b", "a/b?watch=1"] {
            assert!(bad.parse::<ObjectRef>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_secret_without_the_issuer_key_is_malformed_and_named() {
        let r: ObjectRef = "ns/ca".parse().expect("parses");
        let body = json!({"metadata": {"resourceVersion": "1"},
            "data": {"issuer.pem": BASE64.encode("x"), "bundle.pem": BASE64.encode("y")}});
        let err = parse_secret(&r, body.to_string().as_bytes()).expect_err("malformed");
        let msg = err.to_string();
        assert!(
            msg.contains("Secret ns/ca") && msg.contains("\"issuer.key\""),
            "{msg}"
        );
    }

    #[test]
    fn a_secret_that_does_not_load_changes_nothing_in_the_ca_dir() {
        let dir = std::env::temp_dir().join(format!("ambit-bootstrap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let r: ObjectRef = "ns/ca".parse().expect("parses");
        let good = CaSecret {
            files: generate("cluster.local", &dir.join("gen")).expect("generates"),
            resource_version: "1".into(),
        };
        install(&dir.join("ca"), &r, &good).expect("installs");
        let before = std::fs::read(dir.join("ca/issuer.pem")).expect("issuer");
        let mut bad = good.clone();
        bad.files.insert("issuer.key".into(), b"not a key".to_vec());
        let err = install(&dir.join("ca"), &r, &bad).expect_err("refused");
        assert!(err.to_string().contains("issuer"), "{err}");
        assert_eq!(
            std::fs::read(dir.join("ca/issuer.pem")).expect("issuer"),
            before
        );
        assert!(LocalCa::load(&CaPaths::new(dir.join("ca"))).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
