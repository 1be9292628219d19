//! The Kubernetes config source: watch the API server and publish [`Config`]s the same
//! way the file source does (a [`ConfigSender`]), so the proxies do not care where their
//! config came from.
//!
//! One kube-runtime watcher per kind keeps a local copy of its objects. The watcher
//! relists after a `410 Gone` and re-watches after a disconnect, backing off while the API
//! server is unreachable; the local copies are only replaced by a complete relist, so the
//! last good state stays in force while the server is away. After every change (debounced)
//! the objects go through [`translate::snapshot`] and validation; the result is published
//! when it differs from the config in force.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource, ResourceExt};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tracing::{debug, error, info, warn};

use super::Config;
use super::watch::{ConfigSender, ReloadOutcome};

pub mod translate;

pub use translate::{ObjectError, Objects};

/// The API group of Ambit's policy kinds.
pub const AMBIT_GROUP: &str = "ambit.dev";
/// The version of Ambit's policy kinds.
pub const AMBIT_VERSION: &str = "v1alpha1";
/// Changes arriving within this long of each other are translated together.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Where and what to watch.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// API server URL (e.g. `http://10.0.0.1:8080`); `None` infers it from the kubeconfig
    /// or the in-cluster service account.
    pub url: Option<http::Uri>,
    /// SPIFFE trust domain of the config (Kubernetes has no object for it).
    pub trust_domain: String,
    /// Watch only this namespace (the waypoint's); `None` watches the whole cluster.
    pub namespace: Option<String>,
}

/// Why the Kubernetes source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// No client could be built (bad URL, no kubeconfig, ...).
    #[error("cannot build a Kubernetes client: {0}")]
    Client(String),
    /// The initial list of every kind did not complete in time.
    #[error("the initial list of {0} did not complete within {1:?}")]
    Sync(&'static str, Duration),
    /// The initial state does not translate into a valid config.
    #[error("the cluster's state is not a valid config: {0}")]
    Invalid(ObjectError),
}

/// Running watchers and their local copies of the cluster.
pub struct KubeSource {
    trust_domain: String,
    stores: Stores,
    changed: Arc<Notify>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The local copy of one kind, keyed by namespace and name.
struct Store<K> {
    objects: Mutex<BTreeMap<(String, String), K>>,
    ready: watch::Sender<bool>,
}

impl<K: Clone> Store<K> {
    fn new() -> Arc<Self> {
        Arc::new(Store {
            objects: Mutex::new(BTreeMap::new()),
            ready: watch::Sender::new(false),
        })
    }

    fn values(&self) -> Vec<K> {
        self.objects.lock().values().cloned().collect()
    }
}

#[derive(Clone)]
struct Stores {
    namespaces: Arc<Store<Namespace>>,
    pods: Arc<Store<Pod>>,
    services: Arc<Store<Service>>,
    endpoint_slices: Arc<Store<EndpointSlice>>,
    authorization_policies: Arc<Store<DynamicObject>>,
    peer_authentications: Arc<Store<DynamicObject>>,
    traffic_policies: Arc<Store<DynamicObject>>,
    gateways: Arc<Store<DynamicObject>>,
    http_routes: Arc<Store<DynamicObject>>,
    grpc_routes: Arc<Store<DynamicObject>>,
}

impl Stores {
    fn objects(&self) -> Objects {
        Objects {
            namespaces: self.namespaces.values(),
            pods: self.pods.values(),
            services: self.services.values(),
            endpoint_slices: self.endpoint_slices.values(),
            authorization_policies: self.authorization_policies.values(),
            peer_authentications: self.peer_authentications.values(),
            traffic_policies: self.traffic_policies.values(),
            gateways: self.gateways.values(),
            http_routes: self.http_routes.values(),
            grpc_routes: self.grpc_routes.values(),
        }
    }
}

/// Builds a client for `url` (plain `http://` works, for tests), or infers one.
pub async fn client(url: Option<&http::Uri>) -> Result<Client, KubeError> {
    let config = match url {
        Some(u) => kube::Config::new(u.clone()),
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeError::Client(e.to_string()))?,
    };
    Client::try_from(config).map_err(|e| KubeError::Client(e.to_string()))
}

impl KubeSource {
    /// Starts watching every kind and waits (up to `timeout`) until each has been listed
    /// once.
    pub async fn start(settings: &KubeSettings, timeout: Duration) -> Result<Self, KubeError> {
        let client = client(settings.url.as_ref()).await?;
        let ns = settings.namespace.as_deref();
        let stores = Stores {
            namespaces: Store::new(),
            pods: Store::new(),
            services: Store::new(),
            endpoint_slices: Store::new(),
            authorization_policies: Store::new(),
            peer_authentications: Store::new(),
            traffic_policies: Store::new(),
            gateways: Store::new(),
            http_routes: Store::new(),
            grpc_routes: Store::new(),
        };
        let changed = Arc::new(Notify::new());
        let mut tasks = Vec::new();
        let mut waits: Vec<(&'static str, watch::Receiver<bool>)> = Vec::new();

        // The waypoint's own Namespace object only, found by name.
        let (ns_api, ns_cfg) = match ns {
            Some(n) => (
                Api::<Namespace>::all(client.clone()),
                watcher::Config::default().fields(&format!("metadata.name={n}")),
            ),
            None => (Api::all(client.clone()), watcher::Config::default()),
        };
        waits.push(("namespaces", stores.namespaces.ready.subscribe()));
        tasks.push(spawn_watch(
            "namespaces",
            ns_api,
            ns_cfg,
            &stores.namespaces,
            &changed,
        ));
        tasks.push(spawn_watch(
            "pods",
            scoped(&client, ns),
            watcher::Config::default(),
            &stores.pods,
            &changed,
        ));
        waits.push(("pods", stores.pods.ready.subscribe()));
        tasks.push(spawn_watch(
            "services",
            scoped(&client, ns),
            watcher::Config::default(),
            &stores.services,
            &changed,
        ));
        waits.push(("services", stores.services.ready.subscribe()));
        tasks.push(spawn_watch(
            "endpointslices",
            scoped(&client, ns),
            watcher::Config::default(),
            &stores.endpoint_slices,
            &changed,
        ));
        waits.push(("endpointslices", stores.endpoint_slices.ready.subscribe()));
        let dynamic = [
            (
                "authorizationpolicies",
                AMBIT_GROUP,
                AMBIT_VERSION,
                "AuthorizationPolicy",
                &stores.authorization_policies,
            ),
            (
                "peerauthentications",
                AMBIT_GROUP,
                AMBIT_VERSION,
                "PeerAuthentication",
                &stores.peer_authentications,
            ),
            (
                "trafficpolicies",
                AMBIT_GROUP,
                AMBIT_VERSION,
                "TrafficPolicy",
                &stores.traffic_policies,
            ),
            (
                "gateways",
                crate::config::model::GATEWAY_API_GROUP,
                "v1",
                "Gateway",
                &stores.gateways,
            ),
            (
                "httproutes",
                crate::config::model::GATEWAY_API_GROUP,
                "v1",
                "HTTPRoute",
                &stores.http_routes,
            ),
            (
                "grpcroutes",
                crate::config::model::GATEWAY_API_GROUP,
                "v1",
                "GRPCRoute",
                &stores.grpc_routes,
            ),
        ];
        for (plural, group, version, kind, store) in dynamic {
            let ar = ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(group, version, kind),
                plural,
            );
            let api = match ns {
                Some(n) => Api::<DynamicObject>::namespaced_with(client.clone(), n, &ar),
                None => Api::all_with(client.clone(), &ar),
            };
            waits.push((plural, store.ready.subscribe()));
            tasks.push(spawn_watch(
                plural,
                api,
                watcher::Config::default(),
                store,
                &changed,
            ));
        }

        let source = KubeSource {
            trust_domain: settings.trust_domain.clone(),
            stores,
            changed,
            tasks,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        for (what, mut rx) in waits {
            let synced = tokio::time::timeout_at(deadline, rx.wait_for(|r| *r)).await;
            if !matches!(synced, Ok(Ok(_))) {
                return Err(KubeError::Sync(what, timeout));
            }
        }
        Ok(source)
    }

    /// Translates the current objects; objects left out are logged.
    fn build(&self) -> Result<Config, ObjectError> {
        let (config, errors) = translate::snapshot(&self.trust_domain, &self.stores.objects())?;
        for e in &errors {
            warn!(kind = %e.kind, namespace = %e.namespace, name = %e.name, field = %e.field,
                reason = %e.reason, "Kubernetes object left out of the config");
        }
        Ok(config)
    }

    /// The initial config, to create the [`ConfigSender`] from.
    pub fn initial(&self) -> Result<ConfigSender, KubeError> {
        let config = self.build().map_err(KubeError::Invalid)?;
        info!(
            namespaces = config.namespaces.len(),
            workloads = config.workloads.len(),
            services = config.services.len(),
            "initial config from Kubernetes"
        );
        Ok(watch::Sender::new(Arc::new(config)))
    }

    /// Publishes a new config on `tx` after every change that yields a different one,
    /// reporting each to `observe`. Runs until every receiver is gone.
    pub async fn run<F>(self, tx: ConfigSender, observe: F)
    where
        F: Fn(ReloadOutcome) + Send + 'static,
    {
        loop {
            self.changed.notified().await;
            tokio::time::sleep(DEBOUNCE).await;
            if tx.is_closed() {
                return;
            }
            match self.build() {
                Ok(c) if c == **tx.borrow() => {}
                Ok(c) => {
                    observe(ReloadOutcome::Applied);
                    info!(
                        workloads = c.workloads.len(),
                        services = c.services.len(),
                        "config updated from Kubernetes"
                    );
                    tx.send_replace(Arc::new(c));
                }
                Err(e) => {
                    observe(ReloadOutcome::Refused);
                    error!(error = %e, "cluster state refused; keeping the last good config");
                }
            }
        }
    }
}

fn scoped<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match ns {
        Some(n) => Api::namespaced(client.clone(), n),
        None => Api::all(client.clone()),
    }
}

/// Runs one watcher, keeping `store` in step and signalling `changed`.
fn spawn_watch<K>(
    what: &'static str,
    api: Api<K>,
    config: watcher::Config,
    store: &Arc<Store<K>>,
    changed: &Arc<Notify>,
) -> tokio::task::JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let store = store.clone();
    let changed = changed.clone();
    tokio::spawn(async move {
        let mut relist: Option<BTreeMap<(String, String), K>> = None;
        let mut stream = watcher::watcher(api, config).default_backoff().boxed();
        while let Some(event) = stream.next().await {
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    // A kind whose CRD is not installed (e.g. no Gateway API) lists as 404:
                    // it counts as synced and empty, so the proxy still starts, and the
                    // watcher keeps trying in case the CRD appears.
                    if let watcher::Error::InitialListFailed(kube::Error::Api(r)) = &e
                        && r.code == 404
                        && !*store.ready.borrow()
                    {
                        info!(
                            kind = what,
                            "not served by the API server (CRD not installed?); treating it as empty"
                        );
                        store.ready.send_replace(true);
                        changed.notify_one();
                    }
                    // The watcher retries (with backoff); the store keeps the last state.
                    warn!(kind = what, error = %e, "Kubernetes watch failed; retrying");
                    continue;
                }
            };
            let key = |o: &K| (o.namespace().unwrap_or_default(), o.name_any());
            match event {
                Event::Init => relist = Some(BTreeMap::new()),
                Event::InitApply(mut o) => {
                    translate::strip_managed_fields(&mut o);
                    relist.get_or_insert_default().insert(key(&o), o);
                }
                Event::InitDone => {
                    let fresh = relist.take().unwrap_or_default();
                    debug!(kind = what, objects = fresh.len(), "listed");
                    *store.objects.lock() = fresh;
                    store.ready.send_replace(true);
                    changed.notify_one();
                }
                Event::Apply(mut o) => {
                    translate::strip_managed_fields(&mut o);
                    store.objects.lock().insert(key(&o), o);
                    changed.notify_one();
                }
                Event::Delete(o) => {
                    store.objects.lock().remove(&key(&o));
                    changed.notify_one();
                }
            }
        }
    })
}
