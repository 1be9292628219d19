//! The signer's CA bootstrap (`ztunnel signer --ca-secret --trust-bundle-config-map`)
//! against the in-repo fake API server (no real API server can run here).
//!
//! The real `ztunnel signer` binary runs on loopback against `harness::fake_apiserver`,
//! which stores Secrets and ConfigMaps and answers `get`, `create` (409 AlreadyExists) and
//! `replace` (409 Conflict) as the real one does. Checked:
//! - the first start creates the CA Secret (a root and an issuer) and the trust-bundle
//!   ConfigMap from it, and a second start reuses the same CA without writing the Secret;
//! - a replica that loses the create race uses the winner's CA;
//! - an existing Secret that is not a usable CA stops the signer with an error naming the
//!   Secret and the key, and is left exactly as it was;
//! - a new version of the Secret (a root added by `ztunnel ca add-root`) reaches the
//!   ConfigMap.
//!
//! Needs no privileges: everything is on 127.0.0.1.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use harness::fake_apiserver::FakeApiServer;
use harness::process::Proc;
use serde_json::{Value, json};

const NS: &str = "ambit-system";
const SECRET: &str = "ambit-signer-ca";
const CONFIG_MAP: &str = "ambit-trust-bundle";
const LONG: Duration = Duration::from_secs(60);

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!(
            "ambit-signer-bootstrap-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts `ztunnel signer` with the CA in the fake's Secret, writing it to `ca_dir`.
fn signer(api: &FakeApiServer, ca_dir: &Path) -> Result<Proc> {
    let listen = format!("127.0.0.1:{}", free_port()?);
    let mut cmd = Command::new(harness::bin_path("ztunnel")?);
    cmd.args(["signer", "--listen", &listen, "--ca-dir"])
        .arg(ca_dir)
        .args(["--kube-url", &api.url()])
        .args(["--kube-token-file", "/nonexistent/token"])
        .args(["--ca-secret", &format!("{NS}/{SECRET}")])
        .args(["--trust-bundle-config-map", &format!("{NS}/{CONFIG_MAP}")])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    Proc::spawn(&mut cmd, "signer", None)
}

fn wait_serving(p: &Proc) -> Result<()> {
    p.wait_for_line(LONG, |l| l.contains("signer serving"))
        .map(|_| ())
        .with_context(|| format!("the signer did not start:\n{}", p.output_text()))
}

/// The Secret's files, decoded, and its resourceVersion.
fn secret_files(api: &FakeApiServer) -> Result<(BTreeMap<String, Vec<u8>>, String)> {
    let s = api
        .get("v1", "Secret", NS, SECRET)
        .context("no CA Secret in the API")?;
    let mut files = BTreeMap::new();
    for (k, v) in s["data"].as_object().context("Secret without data")? {
        files.insert(
            k.clone(),
            BASE64.decode(v.as_str().context("data value not a string")?)?,
        );
    }
    let rv = s["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    Ok((files, rv))
}

fn config_map_bundle(api: &FakeApiServer) -> Option<String> {
    api.get("v1", "ConfigMap", NS, CONFIG_MAP)?["data"]["bundle.pem"]
        .as_str()
        .map(str::to_string)
}

fn writes(api: &FakeApiServer, resource: &str) -> Vec<String> {
    api.requests()
        .into_iter()
        .filter(|r| (r.starts_with("POST ") || r.starts_with("PUT ")) && r.contains(resource))
        .collect()
}

/// A Secret holding the CA in `dir` (from `ztunnel ca init`), as `kubectl create secret
/// generic --from-file=DIR` makes it.
fn secret_from_dir(dir: &Path) -> Result<Value> {
    let mut data = serde_json::Map::new();
    for name in [
        "root.pem",
        "root.key",
        "issuer.pem",
        "issuer.key",
        "bundle.pem",
    ] {
        let bytes = std::fs::read(dir.join(name)).with_context(|| name.to_string())?;
        data.insert(name.into(), json!(BASE64.encode(bytes)));
    }
    Ok(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": SECRET, "namespace": NS},
        "type": "Opaque", "data": data,
    }))
}

#[test]
fn first_start_creates_the_ca_and_bundle_and_a_restart_reuses_them() -> Result<()> {
    let scratch = Scratch::new("first")?;
    let api = FakeApiServer::start("127.0.0.1:0".parse()?)?;
    ensure!(api.get("v1", "Secret", NS, SECRET).is_none());

    let first_dir = scratch.0.join("ca-1");
    let mut first = signer(&api, &first_dir)?;
    wait_serving(&first)?;
    let (files, rv) = secret_files(&api)?;
    let keys: Vec<&str> = files.keys().map(String::as_str).collect();
    ensure!(
        keys == [
            "bundle.pem",
            "issuer.key",
            "issuer.pem",
            "root.key",
            "root.pem"
        ],
        "Secret keys: {keys:?}"
    );
    ensure!(
        writes(&api, "/secrets").len() == 1,
        "expected one create of the Secret: {:?}",
        api.requests()
    );
    // The CA directory holds exactly the Secret's CA, and the ConfigMap its public roots.
    for (name, bytes) in &files {
        ensure!(
            std::fs::read(first_dir.join(name))? == *bytes,
            "{name} in the CA directory differs from the Secret's"
        );
    }
    let bundle = String::from_utf8(files["bundle.pem"].clone())?;
    ensure!(bundle.contains("BEGIN CERTIFICATE"));
    ensure!(
        config_map_bundle(&api).as_deref() == Some(bundle.as_str()),
        "the ConfigMap does not hold the CA's bundle"
    );
    ensure!(
        first
            .output_text()
            .contains("created the CA Secret with a new root and issuer")
    );
    first.stop(LONG)?;

    // A restart (or a second replica) with an empty CA directory reuses the Secret.
    let second_dir = scratch.0.join("ca-2");
    let second = signer(&api, &second_dir)?;
    wait_serving(&second)?;
    let (again, rv_again) = secret_files(&api)?;
    ensure!(again == files, "the Secret changed on the second start");
    ensure!(
        rv_again == rv,
        "the Secret was written again ({rv} -> {rv_again})"
    );
    ensure!(
        writes(&api, "/secrets").len() == 1,
        "the second start wrote the Secret: {:?}",
        api.requests()
    );
    ensure!(
        writes(&api, "/configmaps").len() == 1,
        "the unchanged bundle was written again: {:?}",
        api.requests()
    );
    ensure!(std::fs::read(second_dir.join("issuer.pem"))? == files["issuer.pem"]);
    ensure!(second.output_text().contains("origin=Existing"));
    Ok(())
}

#[test]
fn a_replica_that_loses_the_create_race_uses_the_winners_ca() -> Result<()> {
    let scratch = Scratch::new("race")?;
    let winner_dir = scratch.0.join("winner");
    harness::ztunnel::cli(&["ca", "init", "--dir", &winner_dir.display().to_string()])?;
    let api = FakeApiServer::start("127.0.0.1:0".parse()?)?;
    // The signer's GET finds nothing; its create then finds the winner's Secret stored.
    api.race_next_create(secret_from_dir(&winner_dir)?);
    let ca_dir = scratch.0.join("ca");
    let p = signer(&api, &ca_dir)?;
    wait_serving(&p)?;
    ensure!(
        p.output_text()
            .contains("another signer created the CA Secret first"),
        "{}",
        p.output_text()
    );
    for name in ["issuer.pem", "issuer.key", "bundle.pem"] {
        ensure!(
            std::fs::read(ca_dir.join(name))? == std::fs::read(winner_dir.join(name))?,
            "{name} is not the winner's"
        );
    }
    ensure!(
        config_map_bundle(&api).map(String::into_bytes)
            == Some(std::fs::read(winner_dir.join("bundle.pem"))?)
    );
    Ok(())
}

#[test]
fn a_malformed_secret_stops_the_signer_and_is_left_alone() -> Result<()> {
    let scratch = Scratch::new("malformed")?;
    let api = FakeApiServer::start("127.0.0.1:0".parse()?)?;
    // An issuer key that does not parse, and no root key (which is allowed).
    let good = scratch.0.join("good");
    harness::ztunnel::cli(&["ca", "init", "--dir", &good.display().to_string()])?;
    let mut secret = secret_from_dir(&good)?;
    secret["data"]["issuer.key"] = json!(BASE64.encode("-----BEGIN PRIVATE KEY-----\nnope\n"));
    if let Some(data) = secret["data"].as_object_mut() {
        data.remove("root.key");
    }
    api.apply(secret)?;
    let before = api.get("v1", "Secret", NS, SECRET);

    let mut p = signer(&api, &scratch.0.join("ca"))?;
    let status = p.wait(LONG)?;
    let out = p.output_text();
    ensure!(
        !status.success(),
        "the signer started on a broken CA:\n{out}"
    );
    for part in [
        "Secret ambit-system/ambit-signer-ca is not a usable CA",
        "issuer.key",
        "never overwritten",
    ] {
        ensure!(out.contains(part), "{part:?} missing from:\n{out}");
    }
    ensure!(
        api.get("v1", "Secret", NS, SECRET) == before,
        "the malformed Secret was changed"
    );
    ensure!(writes(&api, "/secrets").is_empty(), "{:?}", api.requests());
    ensure!(
        api.get("v1", "ConfigMap", NS, CONFIG_MAP).is_none(),
        "a bundle was published from a broken CA"
    );

    // A Secret missing a required key is refused the same way, naming the key.
    let mut secret = secret_from_dir(&good)?;
    if let Some(data) = secret["data"].as_object_mut() {
        data.remove("bundle.pem");
    }
    api.apply(secret)?;
    let mut p = signer(&api, &scratch.0.join("ca-2"))?;
    ensure!(!p.wait(LONG)?.success());
    let out = p.output_text();
    ensure!(
        out.contains("no data key \"bundle.pem\""),
        "the missing key is not named:\n{out}"
    );
    Ok(())
}

#[test]
fn a_rotated_secret_reaches_the_trust_bundle_config_map() -> Result<()> {
    let scratch = Scratch::new("rotate")?;
    let api = FakeApiServer::start("127.0.0.1:0".parse()?)?;
    let p = signer(&api, &scratch.0.join("ca"))?;
    wait_serving(&p)?;
    let (files, _) = secret_files(&api)?;

    // The operator's rotation step 1, on a copy of the Secret, applied back.
    let copy = scratch.0.join("copy");
    std::fs::create_dir_all(&copy)?;
    for (name, bytes) in &files {
        std::fs::write(copy.join(name), bytes)?;
    }
    harness::ztunnel::cli(&["ca", "add-root", "--dir", &copy.display().to_string()])?;
    let rotated = std::fs::read_to_string(copy.join("bundle.pem"))?;
    ensure!(rotated.matches("BEGIN CERTIFICATE").count() == 2);
    api.apply(secret_from_dir(&copy)?)?;

    harness::wait_until(LONG, || {
        config_map_bundle(&api).as_deref() == Some(rotated.as_str())
    })
    .with_context(|| {
        format!(
            "the ConfigMap never got the rotated bundle:\n{}",
            p.output_text()
        )
    })?;
    ensure!(p.output_text().contains("CA Secret changed; installed"));
    Ok(())
}
