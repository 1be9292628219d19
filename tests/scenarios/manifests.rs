//! The Kubernetes manifests under `deploy/`, validated offline.
//!
//! No API server runs here. These tests run `tests/scripts/validate-manifests.sh` (kubectl
//! kustomize + kubernetes-validate + our CRD/Gateway API checks) on the real `deploy/` tree
//! and on copies with one deliberate mistake each, and check that the ambit.dev CRDs and
//! the config model agree field for field: every object level of each CRD's `spec` must
//! have exactly the fields of the matching model struct (minus `name`/`namespace`, which
//! come from `metadata`), and the worked example, rendered and translated into the file
//! config model, must pass the mesh's own config validation.
//!
//! They need kubectl, kubernetes-validate, jsonschema and cel-python (installed by
//! `tests/scripts/setup-host.sh`). Missing tools
//! skip the tests with a printed reason; under `CI=true` they fail instead.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ambit_shared::config::model::{AuthorizationPolicy, PeerAuthentication, TrafficPolicy};
use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

/// Exit status of the script when a prerequisite is missing.
const MISSING_PREREQUISITE: i32 = 3;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Prints why the calling test is skipped, or panics under CI where skipping is a failure.
fn skip(test: &str, reason: &str) {
    if harness::skip::in_ci() {
        panic!("{test}: {reason} (CI=true, so this is a failure, not a skip)");
    }
    // Straight to stderr: libtest hides eprintln! output of passing tests.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}

/// The script's output, or `None` (after reporting the skip) when a tool is missing.
fn validate(test: &str, dirs: &[&Path]) -> Result<Option<(Output, String)>> {
    let script = repo().join("tests/scripts/validate-manifests.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(dirs)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.code() == Some(MISSING_PREREQUISITE) {
        skip(test, text.trim());
        return Ok(None);
    }
    Ok(Some((out, text)))
}

/// A copy of `deploy/` in a fresh directory, removed on drop.
struct DeployCopy {
    root: PathBuf,
}

impl DeployCopy {
    fn new(name: &str) -> Result<Self> {
        let root =
            std::env::temp_dir().join(format!("ambit-manifests-{}-{name}", std::process::id()));
        if root.exists() {
            std::fs::remove_dir_all(&root)?;
        }
        copy_dir(&repo().join("deploy"), &root.join("deploy"))?;
        Ok(Self { root })
    }

    fn deploy(&self) -> PathBuf {
        self.root.join("deploy")
    }

    /// Replaces the one occurrence of `from` in `file` (relative to `deploy/`) with `to`.
    fn edit(&self, file: &str, from: &str, to: &str) -> Result<()> {
        let path = self.deploy().join(file);
        let text = std::fs::read_to_string(&path)?;
        ensure!(
            text.matches(from).count() == 1,
            "{file}: expected exactly one `{from}` to replace"
        );
        std::fs::write(&path, text.replacen(from, to, 1))?;
        Ok(())
    }
}

impl Drop for DeployCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// The number before `what` on the script's summary line for kustomization `label`.
fn count_on_line(text: &str, label: &str, what: &str) -> Option<usize> {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{label}: ")) && l.contains(what))?;
    let before = &line[..line.find(what)?];
    before.split_whitespace().last()?.parse().ok()
}

/// Runs the script on a copy of `deploy/` broken by `edit` (only on the kustomization that
/// holds `file`, to keep the test short), and checks that it fails and that one ERROR line
/// names every part of `expect`.
fn assert_rejected(
    test: &str,
    file: &str,
    from: &str,
    to: &str,
    expect: &[&str],
) -> Result<Option<String>> {
    let copy = DeployCopy::new(test)?;
    copy.edit(file, from, to)?;
    let mut dir = copy.deploy().join(file);
    while !dir.join("kustomization.yaml").exists() {
        dir = dir
            .parent()
            .with_context(|| format!("{file} is in no kustomization"))?
            .to_path_buf();
    }
    let Some((out, text)) = validate(test, &[&dir])? else {
        return Ok(None);
    };
    ensure!(
        out.status.code() == Some(1),
        "expected exit status 1 for the broken manifest, got {:?}:\n{text}",
        out.status.code()
    );
    let hit = text
        .lines()
        .filter(|l| l.starts_with("ERROR"))
        .any(|l| expect.iter().all(|e| l.contains(e)));
    ensure!(hit, "no ERROR line names all of {expect:?}:\n{text}");
    Ok(Some(text))
}

#[test]
fn deploy_tree_is_valid() -> Result<()> {
    let Some((out, text)) = validate("deploy_tree_is_valid", &[&repo().join("deploy")])? else {
        return Ok(());
    };
    ensure!(out.status.success(), "validate-manifests failed:\n{text}");
    ensure!(
        !text.contains("\nERROR"),
        "ERROR lines in a passing run:\n{text}"
    );
    for dir in [
        "deploy/base",
        "deploy/waypoint",
        "deploy/overlays/kind",
        "deploy/overlays/production",
        "deploy/examples",
    ] {
        ensure!(
            text.contains(&format!("\n{dir}: ")),
            "{dir} was not rendered:\n{text}"
        );
    }
    // The checks beyond kubernetes-validate really ran, on the objects they are for.
    let crds = count_on_line(&text, "deploy/base", "CRDs structurally checked");
    ensure!(
        crds == Some(3),
        "expected the 3 CRDs checked in deploy/base:\n{text}"
    );
    let crs = count_on_line(
        &text,
        "deploy/examples",
        "custom resources against their CRD",
    );
    ensure!(
        crs.is_some_and(|n| n >= 3),
        "expected the example's AuthorizationPolicy, PeerAuthentication and TrafficPolicy checked:\n{text}"
    );
    let gw = count_on_line(&text, "deploy/examples", "Gateway API objects");
    ensure!(
        gw.is_some_and(|n| n >= 2),
        "expected the example's Gateway and HTTPRoute checked:\n{text}"
    );
    ensure!(
        text.contains("CEL) checks evaluated with cel-python"),
        "CEL rules were not evaluated:\n{text}"
    );
    Ok(())
}

#[test]
fn daemonset_with_containers_object_is_rejected() -> Result<()> {
    assert_rejected(
        "daemonset_with_containers_object_is_rejected",
        "base/ztunnel-daemonset.yaml",
        "      containers:\n        - name: ztunnel\n",
        "      containers: {}\n      ephemeralContainers:\n        - name: ztunnel\n",
        &[
            "deploy/base",
            "daemonset/ztunnel",
            "spec.template.spec.containers",
            "is not of type 'array'",
        ],
    )?;
    Ok(())
}

#[test]
fn authorization_policy_with_unknown_action_is_rejected() -> Result<()> {
    assert_rejected(
        "authorization_policy_with_unknown_action_is_rejected",
        "examples/shop/policies.yaml",
        "action: ALLOW",
        "action: PERMIT",
        &[
            "AuthorizationPolicy shop/api-allow-frontend",
            "spec.action",
            "'PERMIT' is not one of",
        ],
    )?;
    Ok(())
}

#[test]
fn unknown_policy_field_is_rejected() -> Result<()> {
    // A typo must not be pruned silently, as it would be without strict field validation.
    assert_rejected(
        "unknown_policy_field_is_rejected",
        "examples/shop/policies.yaml",
        "        - methods: [GET]",
        "        - method: [GET]",
        &[
            "AuthorizationPolicy shop/api-allow-frontend",
            "spec.rules[0].to[0]",
            "'method' was unexpected",
        ],
    )?;
    Ok(())
}

#[test]
fn traffic_policy_cel_rule_is_enforced() -> Result<()> {
    // Connection-pool limits on a route target: every field is well-formed, only the
    // CRD's CEL rule (the same check as the file config's validation) refuses it.
    assert_rejected(
        "traffic_policy_cel_rule_is_enforced",
        "examples/shop/policies.yaml",
        "  rateLimit:\n",
        "  connectionPool: { maxRequests: 10 }\n  rateLimit:\n",
        &[
            "TrafficPolicy shop/api-canary-rate-limit",
            "spec.connectionPool",
            "target a Service, not a route",
        ],
    )?;
    Ok(())
}

#[test]
fn out_of_range_values_are_rejected() -> Result<()> {
    assert_rejected(
        "out_of_range_values_are_rejected",
        "examples/shop/policies.yaml",
        "maxEjectionPercent: 50",
        "maxEjectionPercent: 150",
        &[
            "TrafficPolicy shop/api-resilience",
            "spec.outlierDetection.maxEjectionPercent",
            "150 is greater than the maximum of 100",
        ],
    )?;
    assert_rejected(
        "out_of_range_values_are_rejected",
        "examples/shop/route.yaml",
        "weight: 10 }",
        "weight: -1 }",
        &[
            "HTTPRoute shop/api-canary",
            "spec.rules[0].backendRefs[1].weight",
            "-1 is less than the minimum of 0",
        ],
    )?;
    Ok(())
}

#[test]
fn non_structural_crd_is_rejected() -> Result<()> {
    assert_rejected(
        "non_structural_crd_is_rejected",
        "base/crds/ambit.dev_peerauthentications.yaml",
        "                mode:\n                  type: string\n",
        "                mode:\n",
        &[
            "CustomResourceDefinition peerauthentications.ambit.dev",
            "properties.spec.properties.mode",
            "has no `type`",
        ],
    )?;
    Ok(())
}

#[test]
fn privileged_container_and_secret_reader_are_rejected() -> Result<()> {
    assert_rejected(
        "privileged_container_and_secret_reader_are_rejected",
        "base/ztunnel-daemonset.yaml",
        "            privileged: false",
        "            privileged: true",
        &[
            "DaemonSet ambit-system/ztunnel",
            "securityContext.privileged",
            "no Ambit component runs privileged",
        ],
    )?;
    assert_rejected(
        "privileged_container_and_secret_reader_are_rejected",
        "base/rbac.yaml",
        "resources: [namespaces, pods, services]",
        "resources: [namespaces, pods, services, secrets]",
        &["ClusterRole ambit-ztunnel", "rules[0].resources", "Secret"],
    )?;
    Ok(())
}

// === CRDs against the config model ===

/// The `spec` schema of a CRD file under `deploy/base/crds`.
fn crd_spec_schema(file: &str) -> Result<Value> {
    let path = repo().join("deploy/base/crds").join(file);
    let text = std::fs::read_to_string(&path)?;
    let crd: Value = serde_yaml_ng::from_str(&text).with_context(|| path.display().to_string())?;
    crd.pointer("/spec/versions/0/schema/openAPIV3Schema/properties/spec")
        .cloned()
        .with_context(|| format!("{file}: no spec schema"))
}

/// A value that sets every field the schema declares, each within its constraints.
fn fill(schema: &Value) -> Value {
    if let Some(v) = schema.get("enum").and_then(|e| e.get(0)) {
        return v.clone();
    }
    if let Some(v) = schema.get("default") {
        return v.clone();
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                Value::Object(props.iter().map(|(k, s)| (k.clone(), fill(s))).collect())
            } else if let Some(ap) = schema.get("additionalProperties") {
                json!({ "app": fill(ap) })
            } else {
                json!({})
            }
        }
        Some("array") => json!([fill(schema.get("items").unwrap_or(&Value::Null))]),
        Some("integer") => schema.get("minimum").cloned().unwrap_or(json!(1)),
        Some("number") => schema.get("minimum").cloned().unwrap_or(json!(1.5)),
        Some("boolean") => json!(true),
        _ => {
            let pattern = schema.get("pattern").and_then(Value::as_str).unwrap_or("");
            if pattern.contains("(h|m|s|ms)") {
                json!("10s")
            } else if pattern.contains("request") {
                json!("request.headers[x-tenant]")
            } else if pattern.contains('/') {
                json!("shop/web")
            } else {
                json!("x")
            }
        }
    }
}

/// JSON pointers (into a filled instance) of every object level that has `properties`.
fn object_levels(schema: &Value, at: String, out: &mut Vec<(String, BTreeSet<String>)>) {
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                out.push((at.clone(), props.keys().cloned().collect()));
                for (k, s) in props {
                    object_levels(s, format!("{at}/{k}"), out);
                }
            }
        }
        Some("array") => {
            if let Some(items) = schema.get("items") {
                object_levels(items, format!("{at}/0"), out);
            }
        }
        _ => {}
    }
}

/// The field names serde expected, from its "unknown field" error.
fn expected_fields(error: &str) -> BTreeSet<String> {
    let Some(list) = error.split("expected").nth(1) else {
        return BTreeSet::new();
    };
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// Checks that the CRD's spec and the model struct `T` agree: a fully filled spec (plus
/// `name`/`namespace`) deserializes into `T`, and at every object level an extra field is
/// refused by serde with exactly the CRD's field list as the expected ones.
fn check_crd_matches_model<T: serde::de::DeserializeOwned>(file: &str) -> Result<()> {
    let schema = crd_spec_schema(file)?;
    let mut instance = fill(&schema);
    let Some(obj) = instance.as_object_mut() else {
        bail!("{file}: spec is not an object");
    };
    obj.insert("name".into(), json!("example"));
    obj.insert("namespace".into(), json!("shop"));
    serde_json::from_value::<T>(instance.clone()).map_err(|e| {
        anyhow::anyhow!("{file}: a spec with every CRD field set does not fit the model: {e}")
    })?;

    let mut levels = Vec::new();
    object_levels(&schema, String::new(), &mut levels);
    let mut problems = Vec::new();
    for (pointer, crd_fields) in levels {
        let mut probe = instance.clone();
        let Some(Value::Object(level)) = probe.pointer_mut(&pointer) else {
            bail!("{file}: no object at {pointer} in the filled instance");
        };
        level.insert("zzNotAField".into(), json!(1));
        let err = match serde_json::from_value::<T>(probe) {
            Ok(_) => {
                problems.push(format!(
                    "spec{pointer}: the model accepts unknown fields here"
                ));
                continue;
            }
            Err(e) => e.to_string(),
        };
        let mut model_fields = expected_fields(&err);
        if pointer.is_empty() {
            model_fields.remove("name");
            model_fields.remove("namespace");
        }
        if model_fields != crd_fields {
            let only_model: Vec<_> = model_fields.difference(&crd_fields).collect();
            let only_crd: Vec<_> = crd_fields.difference(&model_fields).collect();
            problems.push(format!(
                "spec{pointer}: fields only in the model {only_model:?}, only in the CRD {only_crd:?}"
            ));
        }
    }
    ensure!(
        problems.is_empty(),
        "{file} and the config model disagree:\n  {}",
        problems.join("\n  ")
    );
    Ok(())
}

#[test]
fn crds_match_the_config_model() -> Result<()> {
    check_crd_matches_model::<AuthorizationPolicy>("ambit.dev_authorizationpolicies.yaml")?;
    check_crd_matches_model::<PeerAuthentication>("ambit.dev_peerauthentications.yaml")?;
    check_crd_matches_model::<TrafficPolicy>("ambit.dev_trafficpolicies.yaml")?;
    Ok(())
}

/// Drops `null`s (absent Kubernetes fields), which the model's `#[serde(default)]` fields
/// want missing rather than null.
fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// Renders the worked example and translates it into the file config model the way the
/// Kubernetes source does (metadata name/namespace + spec), then runs the mesh's own
/// validation on it: the example must mean something valid, not just be well-formed.
#[test]
fn worked_example_is_a_valid_mesh_config() -> Result<()> {
    let test = "worked_example_is_a_valid_mesh_config";
    let Some(objects) = render(test, "examples")? else {
        return Ok(());
    };
    let mut namespaces = Vec::new();
    let mut services = Vec::new();
    let mut waypoints = Vec::new();
    let mut routes = Vec::new();
    let mut policies: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for obj in &objects {
        let kind = obj["kind"].as_str().unwrap_or_default().to_string();
        let name = obj["metadata"]["name"].clone();
        let ns = obj["metadata"]["namespace"].clone();
        match kind.as_str() {
            "Namespace" => namespaces.push(json!({
                "name": name,
                "labels": obj["metadata"]["labels"],
            })),
            "Service" => {
                let ports: Vec<Value> = obj["spec"]["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| json!({ "name": p["name"], "port": p["port"], "targetPort": p["targetPort"] }))
                    .collect();
                services.push(json!({
                    "name": name,
                    "namespace": ns,
                    "ports": ports,
                    "selector": obj["spec"]["selector"],
                    "labels": obj["metadata"]["labels"],
                }));
            }
            "Gateway" if obj["spec"]["gatewayClassName"] == "ambit-waypoint" => {
                waypoints.push(json!({ "name": name, "namespace": ns }));
            }
            "HTTPRoute" | "GRPCRoute" => routes.push(obj.clone()),
            "AuthorizationPolicy" | "PeerAuthentication" | "TrafficPolicy" => {
                let mut spec = obj["spec"].clone();
                if let Some(s) = spec.as_object_mut() {
                    s.insert("name".into(), name);
                    s.insert("namespace".into(), ns);
                }
                let key = match kind.as_str() {
                    "AuthorizationPolicy" => "authorizationPolicies",
                    "PeerAuthentication" => "peerAuthentications",
                    _ => "trafficPolicies",
                };
                policies.entry(key).or_default().push(spec);
            }
            _ => {}
        }
    }
    ensure!(
        !routes.is_empty() && !waypoints.is_empty() && policies.len() == 3,
        "the example lacks a route, a waypoint or a policy kind"
    );
    let mut config = json!({
        "trustDomain": "cluster.local",
        "namespaces": namespaces,
        "services": services,
        "waypoints": waypoints,
        "routes": routes,
    });
    if let Some(c) = config.as_object_mut() {
        for (k, v) in policies {
            c.insert(k.into(), Value::Array(v));
        }
    }
    strip_nulls(&mut config);
    let text = serde_yaml_ng::to_string(&config)?;
    let parsed = ambit_shared::config::parse_str(Path::new("deploy/examples (rendered)"), &text)
        .map_err(|e| anyhow::anyhow!("{e}\n--- translated config ---\n{text}"))?;
    ensure!(parsed.authorization_policies.len() == 2, "{text}");
    ensure!(parsed.traffic_policies.len() == 2, "{text}");
    ensure!(parsed.routes.len() == 1, "{text}");
    Ok(())
}

/// Renders `deploy/<dir>` with kubectl; `None` after reporting the skip when kubectl is
/// missing.
fn render(test: &str, dir: &str) -> Result<Option<Vec<Value>>> {
    let kubectl = match std::env::var("KUBECTL") {
        Ok(k) if !k.is_empty() => k,
        _ if Path::new("/usr/bin/kubectl").exists() => "/usr/bin/kubectl".to_string(),
        _ => "kubectl".to_string(),
    };
    let out = match Command::new(&kubectl)
        .arg("kustomize")
        .arg(repo().join("deploy").join(dir))
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            skip(test, &format!("kubectl ({kubectl}) not runnable: {e}"));
            return Ok(None);
        }
    };
    ensure!(
        out.status.success(),
        "kubectl kustomize deploy/{dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let mut objects = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        objects.push(serde::Deserialize::deserialize(doc)?);
    }
    Ok(Some(objects))
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name}"))
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The privileges the install grants are exactly the ones capture and signing need.
#[test]
fn installed_privileges_are_least() -> Result<()> {
    let test = "installed_privileges_are_least";
    let Some(base) = render(test, "overlays/production")? else {
        return Ok(());
    };
    let ds = find(&base, "DaemonSet", "ztunnel")?;
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    ensure!(sc["privileged"] != json!(true), "ztunnel is privileged");
    ensure!(
        strings(&sc["capabilities"]["add"]) == set(&["NET_ADMIN", "SYS_ADMIN", "BPF"]),
        "ztunnel capabilities: {}",
        sc["capabilities"]
    );
    ensure!(strings(&sc["capabilities"]["drop"]) == set(&["ALL"]));
    ensure!(pod["hostNetwork"] == json!(true));
    let host_paths: BTreeSet<String> = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["hostPath"]["path"].as_str().map(str::to_string))
        .collect();
    // Capture: /proc, bpffs, cgroup2. The CNI hook: the runtime's plugin and config
    // directories (written only by the init container), the hook's socket directory and the
    // pod network namespaces the runtime names in its requests.
    ensure!(
        host_paths
            == set(&[
                "/proc",
                "/sys/fs/bpf",
                "/sys/fs/cgroup",
                "/opt/cni/bin",
                "/etc/cni/net.d",
                "/var/run/ambit/cni",
                "/var/run/netns",
            ]),
        "ztunnel hostPaths: {host_paths:?}"
    );
    // Only the init container writes the CNI directories, and it holds no capability.
    let init = &pod["initContainers"][0];
    ensure!(init["name"] == json!("install-cni"), "no CNI installer");
    ensure!(strings(&init["securityContext"]["capabilities"]["drop"]) == set(&["ALL"]));
    ensure!(init["securityContext"]["capabilities"].get("add").is_none());
    let ztunnel_mounts: BTreeSet<String> = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["name"].as_str().map(str::to_string))
        .collect();
    ensure!(
        !ztunnel_mounts.contains("cni-bin") && !ztunnel_mounts.contains("cni-net"),
        "the ztunnel container mounts the CNI directories: {ztunnel_mounts:?}"
    );
    ensure!(c["readinessProbe"]["httpGet"] == json!({ "path": "/healthz/ready", "port": 15021 }));
    ensure!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == json!(1));
    ensure!(pod["priorityClassName"] == json!("system-node-critical"));
    let token = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|v| v["projected"]["sources"][0].get("serviceAccountToken"))
        .context("ztunnel has no projected token")?;
    ensure!(token["audience"] == json!("ambit-signer"));

    // The CA Secret: no pod mounts it; the signer reads it through the API into a
    // directory in memory.
    let mut ca_mounts = Vec::new();
    for o in &base {
        let spec = &o["spec"]["template"]["spec"];
        for v in spec["volumes"].as_array().into_iter().flatten() {
            if v["secret"]["secretName"] == "ambit-signer-ca" {
                ca_mounts.push(o["metadata"]["name"].clone());
            }
        }
    }
    ensure!(ca_mounts.is_empty(), "CA Secret mounted by {ca_mounts:?}");
    let signer = &find(&base, "Deployment", "ambit-signer")?["spec"];
    let ca_volume = signer["template"]["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == "ca")
        .context("the signer has no ca volume")?;
    ensure!(
        ca_volume["emptyDir"]["medium"] == json!("Memory"),
        "the signer's CA directory is not in memory: {ca_volume}"
    );
    ensure!(signer["replicas"].as_u64().is_some_and(|n| n >= 2));
    ensure!(signer["template"]["spec"]["securityContext"]["runAsNonRoot"] == json!(true));
    ensure!(
        signer["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"]
            == json!(true)
    );

    // ztunnel reads; the signer creates TokenReviews and reads pods; only the signer's own
    // Role touches a Secret, by name.
    for role in base
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
    {
        let name = role["metadata"]["name"].as_str().unwrap_or_default();
        for rule in role["rules"].as_array().into_iter().flatten() {
            let verbs = strings(&rule["verbs"]);
            let resources = strings(&rule["resources"]);
            ensure!(
                !resources.contains("*") && !verbs.contains("*"),
                "{name}: wildcard"
            );
            let names = strings(&rule["resourceNames"]);
            let signer_ca_role = name == "ambit-signer-ca" && role["kind"] == "Role";
            // Creating the CA Secret and the bundle ConfigMap on the first start: RBAC
            // cannot restrict create by name, so these rules name no object.
            let creates_own = signer_ca_role && names.is_empty() && verbs == set(&["create"]);
            if resources.contains("secrets") {
                ensure!(signer_ca_role, "{name} touches Secrets");
                ensure!(
                    names == set(&["ambit-signer-ca"]) || creates_own,
                    "{name}: Secret rule {rule}"
                );
            }
            let read_only = verbs.is_subset(&set(&["get", "list", "watch"]));
            let token_review = resources == set(&["tokenreviews"]) && verbs == set(&["create"]);
            let bundle_update = signer_ca_role
                && resources == set(&["configmaps"])
                && names == set(&["ambit-trust-bundle"])
                && verbs == set(&["get", "update"]);
            ensure!(
                read_only
                    || (name == "ambit-signer" && token_review)
                    || creates_own
                    || bundle_update,
                "{name} may {verbs:?} {resources:?}"
            );
        }
    }

    let Some(waypoint) = render(test, "waypoint")? else {
        return Ok(());
    };
    ensure!(
        !waypoint
            .iter()
            .any(|o| o["kind"] == "ClusterRole" || o["kind"] == "ClusterRoleBinding"),
        "the waypoint template grants cluster-wide access"
    );
    let labels =
        &find(&waypoint, "Deployment", "waypoint")?["spec"]["template"]["metadata"]["labels"];
    ensure!(labels["gateway.networking.k8s.io/gateway-name"] == json!("waypoint"));
    ensure!(labels["ambit.dev/dataplane-mode"] == json!("none"));
    let hpa = &find(&waypoint, "HorizontalPodAutoscaler", "waypoint")?["spec"];
    ensure!(hpa["minReplicas"] == json!(2) && hpa["maxReplicas"] == json!(10));
    Ok(())
}
