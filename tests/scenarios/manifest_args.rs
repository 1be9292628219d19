//! Every container command line in every rendered manifest is accepted by its binary.
//!
//! Each kustomization under `deploy/` is rendered with `kubectl kustomize`; every container
//! and init container of every workload (Deployment, DaemonSet, StatefulSet, ReplicaSet,
//! Job, CronJob, Pod) is then run as the kubelet would start it, through the real binary
//! (`ztunnel`, `waypoint`, `ambit-testapp`) with the hidden `--check-args` flag appended:
//! the binary parses its command line with its own parser, makes the checks it makes before
//! touching anything, and exits 0 without starting. A flag that drifts from its binary
//! (renamed, removed, newly required, a value it refuses) fails here, not on a node.
//!
//! The container's environment is built from its `env` list the way the kubelet does:
//! literal values as they are, downward-API values (`fieldRef`) as placeholders for the
//! node name, namespace and pod name, labels from the pod template's own labels; `$(VAR)`
//! in command and args is expanded from it. Nothing from this host's environment leaks in.
//!
//! Needs kubectl (`tests/scripts/setup-host.sh`); without it the tests skip with a printed
//! reason, and fail under `CI=true`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

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
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}

fn kubectl() -> String {
    match std::env::var("KUBECTL") {
        Ok(k) if !k.is_empty() => k,
        _ if Path::new("/usr/bin/kubectl").exists() => "/usr/bin/kubectl".to_string(),
        _ => "kubectl".to_string(),
    }
}

/// Every kustomization directory under `root` (not `kind: Component`s, which only build
/// inside another kustomization), sorted.
fn kustomizations(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else if entry.file_name() == "kustomization.yaml" {
                let text = std::fs::read_to_string(&path)?;
                if !text.lines().any(|l| l.trim() == "kind: Component") {
                    out.push(dir.clone());
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The objects `kubectl kustomize dir` renders; `Err` with kubectl's message if it fails.
fn render(kubectl: &str, dir: &Path) -> Result<Vec<Value>> {
    let out = harness::process::run(
        Command::new(kubectl).arg("kustomize").arg(dir),
        Duration::from_secs(60),
    )?;
    ensure!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8(out.stdout)?;
    let mut objects = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        if !v.is_null() {
            objects.push(v);
        }
    }
    Ok(objects)
}

/// The pod template of a workload: `(template metadata, pod spec)`.
fn pod_template(obj: &Value) -> Option<(&Value, &Value)> {
    let template = match obj["kind"].as_str()? {
        "Deployment" | "DaemonSet" | "StatefulSet" | "ReplicaSet" | "Job" => {
            &obj["spec"]["template"]
        }
        "CronJob" => &obj["spec"]["jobTemplate"]["spec"]["template"],
        "Pod" => obj,
        _ => return None,
    };
    Some((&template["metadata"], &template["spec"]))
}

/// Placeholder values for the downward API, as a kubelet would fill them.
const PLACEHOLDER_NODE: &str = "node-1";
const PLACEHOLDER_NAMESPACE: &str = "placeholder-ns";
const PLACEHOLDER_POD: &str = "pod-0";

/// The value the kubelet would give an `env` entry. `namespace` is the workload's
/// (a placeholder for templates applied into a namespace later).
fn env_value(entry: &Value, labels: &Value, namespace: &str) -> Result<String> {
    if let Some(v) = entry.get("value") {
        return Ok(v.as_str().unwrap_or_default().to_string());
    }
    let from = &entry["valueFrom"];
    if let Some(path) = from["fieldRef"]["fieldPath"].as_str() {
        return Ok(match path {
            "spec.nodeName" => PLACEHOLDER_NODE.into(),
            "metadata.namespace" => namespace.into(),
            "metadata.name" => PLACEHOLDER_POD.into(),
            "spec.serviceAccountName" => "default".into(),
            "status.podIP" | "status.hostIP" => "10.0.0.1".into(),
            p => match p
                .strip_prefix("metadata.labels['")
                .and_then(|l| l.strip_suffix("']"))
            {
                // The label of the pod itself: a missing one is a manifest bug.
                Some(label) => labels[label]
                    .as_str()
                    .with_context(|| {
                        format!("fieldRef {p}: the pod template has no label {label}")
                    })?
                    .to_string(),
                None => bail!("fieldRef {p}: no placeholder for this field"),
            },
        });
    }
    if from.get("resourceFieldRef").is_some() {
        return Ok("1".into());
    }
    // Secret and ConfigMap keys: any non-empty value.
    Ok("placeholder".into())
}

/// Kubernetes' `$(VAR)` expansion in command and args: a defined variable is replaced,
/// `$$` is a literal `$`, an undefined reference is left as written.
fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some(v) = env.get(&inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The binary a container's `command[0]` names.
fn binary(command: &str) -> Result<PathBuf> {
    let name = Path::new(command)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(command);
    match name {
        "ztunnel" | "waypoint" | "ambit-testapp" => harness::bin_path(name),
        other => bail!("runs {other:?}, which no Ambit binary provides"),
    }
}

/// What one run of the check covered.
#[derive(Debug, Default)]
struct Checked {
    /// Command lines accepted, by binary name.
    accepted: BTreeMap<String, usize>,
    /// One line per refusal, naming kustomization, object, container and reason.
    refused: Vec<String>,
}

/// Runs every container command line of every kustomization under `root` through its
/// binary. `label_root` is cut from directory names in messages.
fn check_tree(kubectl: &str, root: &Path, label_root: &Path) -> Result<Checked> {
    let mut checked = Checked::default();
    let dirs = kustomizations(root)?;
    ensure!(
        !dirs.is_empty(),
        "no kustomization under {}",
        root.display()
    );
    for dir in dirs {
        let label = dir
            .strip_prefix(label_root)
            .unwrap_or(&dir)
            .display()
            .to_string();
        let objects = render(kubectl, &dir)?;
        for obj in &objects {
            let Some((meta, spec)) = pod_template(obj) else {
                continue;
            };
            let kind = obj["kind"].as_str().unwrap_or_default();
            let ns = obj["metadata"]["namespace"].as_str();
            let what = format!(
                "{label}: {kind} {}/{}",
                ns.unwrap_or("(namespace set at apply)"),
                obj["metadata"]["name"].as_str().unwrap_or_default()
            );
            let containers: Vec<&Value> = ["initContainers", "containers"]
                .iter()
                .flat_map(|k| spec[*k].as_array().into_iter().flatten())
                .collect();
            if containers.is_empty() {
                checked.refused.push(format!("{what}: no containers"));
            }
            for c in containers {
                let name = c["name"].as_str().unwrap_or_default();
                let at = format!("{what} container {name}");
                match check_container(c, &meta["labels"], ns.unwrap_or(PLACEHOLDER_NAMESPACE)) {
                    Ok(bin) => *checked.accepted.entry(bin).or_default() += 1,
                    Err(e) => checked.refused.push(format!("{at}: {e:#}")),
                }
            }
        }
    }
    Ok(checked)
}

/// Runs one container's command line with `--check-args`; the binary's name if accepted.
fn check_container(c: &Value, labels: &Value, namespace: &str) -> Result<String> {
    let mut env = BTreeMap::new();
    for entry in c["env"].as_array().into_iter().flatten() {
        let name = entry["name"].as_str().context("env entry without a name")?;
        let value = env_value(entry, labels, namespace).with_context(|| format!("env {name}"))?;
        env.insert(name.to_string(), value);
    }
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|s| expand(s.as_str().unwrap_or_default(), &env))
            .collect()
    };
    let command = strings(&c["command"]);
    let args = strings(&c["args"]);
    let Some(program) = command.first() else {
        bail!("no `command`: the image's entrypoint is not known to this test; name the binary");
    };
    let bin = binary(program)?;
    let mut cmd = Command::new(&bin);
    cmd.env_clear()
        .envs(&env)
        .args(&command[1..])
        .args(&args)
        .arg("--check-args");
    let line = [command.clone(), args].concat().join(" ");
    let out = harness::process::run(&mut cmd, Duration::from_secs(30))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.contains("arguments accepted") {
        bail!(
            "`{line}` was refused ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(Path::new(program)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default())
}

/// kubectl, or `None` after reporting the skip.
fn kubectl_or_skip(test: &str) -> Option<String> {
    let kubectl = kubectl();
    match Command::new(&kubectl)
        .args(["version", "--client"])
        .output()
    {
        Ok(o) if o.status.success() => Some(kubectl),
        Ok(o) => {
            skip(
                test,
                &format!(
                    "{kubectl} version --client failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            );
            None
        }
        Err(e) => {
            skip(
                test,
                &format!(
                    "kubectl ({kubectl}) not runnable: {e}; install it with tests/scripts/setup-host.sh"
                ),
            );
            None
        }
    }
}

#[test]
fn every_manifest_command_line_is_accepted_by_its_binary() -> Result<()> {
    let test = "every_manifest_command_line_is_accepted_by_its_binary";
    let Some(kubectl) = kubectl_or_skip(test) else {
        return Ok(());
    };
    let root = repo();
    let checked = check_tree(&kubectl, &root.join("deploy"), &root)?;
    ensure!(
        checked.refused.is_empty(),
        "{} command line(s) in the manifests are refused by their binaries:\n  {}",
        checked.refused.len(),
        checked.refused.join("\n  ")
    );
    // Every binary the install runs was really exercised: the DaemonSet (ztunnel run and
    // cni-install), the signer, the waypoint template and the example's apps.
    for bin in ["ztunnel", "waypoint", "ambit-testapp"] {
        ensure!(
            checked.accepted.get(bin).is_some_and(|n| *n > 0),
            "no command line of {bin} was checked: {:?}",
            checked.accepted
        );
    }
    let _ = writeln!(
        std::io::stderr(),
        "{test}: accepted command lines by binary: {:?}",
        checked.accepted
    );
    Ok(())
}

/// The check itself catches drift: a flag the binary does not know, added to the
/// DaemonSet in a copy of the tree, is refused with the binary's own message.
#[test]
fn a_flag_the_binary_does_not_know_is_caught() -> Result<()> {
    let test = "a_flag_the_binary_does_not_know_is_caught";
    let Some(kubectl) = kubectl_or_skip(test) else {
        return Ok(());
    };
    let copy = std::env::temp_dir().join(format!("ambit-manifest-args-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&copy);
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(copy.clone());
    let base = copy.join("deploy/base");
    std::fs::create_dir_all(&base)?;
    for entry in std::fs::read_dir(repo().join("deploy/base"))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), base.join(entry.file_name()))?;
        }
    }
    // The CRDs are not needed to render the workloads.
    let kustomization = std::fs::read_to_string(base.join("kustomization.yaml"))?;
    let kustomization: String = kustomization
        .lines()
        .filter(|l| !l.trim_start().starts_with("- crds/"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(base.join("kustomization.yaml"), kustomization)?;
    let ds = base.join("ztunnel-daemonset.yaml");
    let text = std::fs::read_to_string(&ds)?;
    let anchor = "            - run\n";
    ensure!(
        text.matches(anchor).count() == 1,
        "no `- run` in the DaemonSet's args"
    );
    std::fs::write(
        &ds,
        text.replacen(
            anchor,
            "            - run\n            - --no-such-flag\n",
            1,
        ),
    )?;
    let checked = check_tree(&kubectl, &copy.join("deploy"), &copy)?;
    ensure!(
        checked.refused.len() == 1,
        "expected exactly the broken ztunnel container refused: {:#?}",
        checked.refused
    );
    let line = &checked.refused[0];
    for part in [
        "deploy/base: DaemonSet ambit-system/ztunnel container ztunnel",
        "--no-such-flag",
        "unexpected argument",
    ] {
        ensure!(line.contains(part), "{part:?} missing from: {line}");
    }
    Ok(())
}

#[test]
fn dollar_references_expand_like_the_kubelet() {
    let env: BTreeMap<String, String> = [("A".to_string(), "x".to_string())].into_iter().collect();
    assert_eq!(expand("$(A)", &env), "x");
    assert_eq!(expand("pre-$(A)-post", &env), "pre-x-post");
    assert_eq!(expand("$$(A)", &env), "$(A)");
    assert_eq!(expand("$(B)", &env), "$(B)");
    assert_eq!(expand("$(A", &env), "$(A");
    assert_eq!(expand("cost $5", &env), "cost $5");
}
