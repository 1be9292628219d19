//! `ztunnel cni-install`: puts the plugin on a node (run from the DaemonSet's init
//! container with the host's CNI directories mounted). Copies this binary as `ambit-cni`
//! and appends the plugin to the node's chained network config, last, after the main
//! network plugin. Idempotent: an existing `ambit-cni` entry is updated, not duplicated.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// The plugin's file name in the CNI binary directory.
pub const PLUGIN_NAME: &str = "ambit-cni";

/// Why installing failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file could not be read, written or renamed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No chained config to join yet (the main network plugin writes it); retry later.
    #[error("no *.conflist in {0} yet: the node's network plugin has not written its config")]
    NoConflist(PathBuf),
    /// The config is not what the CNI spec describes.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically (temporary file, then rename).
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("ambit-tmp");
    fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// The config the runtime uses: the first `*.conflist` by name, as runtimes pick it.
pub fn find_conflist(net_dir: &Path) -> Result<PathBuf, InstallError> {
    let mut lists: Vec<PathBuf> = fs::read_dir(net_dir)
        .map_err(io_err(net_dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
        .collect();
    lists.sort();
    lists
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoConflist(net_dir.to_path_buf()))
}

/// Adds (or updates) the `ambit-cni` entry at the end of `conflist`'s plugins.
pub fn chain_into(conflist: &Path, socket: &Path) -> Result<bool, InstallError> {
    let text = fs::read(conflist).map_err(io_err(conflist))?;
    let invalid = |reason: &str| InstallError::Invalid {
        path: conflist.to_path_buf(),
        reason: reason.to_string(),
    };
    let mut conf: Value =
        serde_json::from_slice(&text).map_err(|e| invalid(&format!("not JSON: {e}")))?;
    let plugins = conf
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| invalid("field `plugins` is missing or not a list"))?;
    let entry = json!({"type": PLUGIN_NAME, "ztunnelSocket": socket});
    let before = plugins.clone();
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_NAME));
    plugins.push(entry);
    if *plugins == before {
        return Ok(false);
    }
    let out = serde_json::to_vec_pretty(&conf).map_err(|e| invalid(&e.to_string()))?;
    write_atomic(conflist, &out, 0o644)?;
    Ok(true)
}

/// Installs the plugin binary and chains it into the node's network config.
pub fn install(bin_dir: &Path, net_dir: &Path, socket: &Path) -> Result<PathBuf, InstallError> {
    let conflist = find_conflist(net_dir)?;
    let exe = Path::new("/proc/self/exe");
    let bin = fs::read(exe).map_err(io_err(exe))?;
    write_atomic(&bin_dir.join(PLUGIN_NAME), &bin, 0o755)?;
    chain_into(&conflist, socket)?;
    Ok(conflist)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_last_once_and_keeps_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let list = dir.path().join("10-net.conflist");
        fs::write(
            &list,
            r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"ptp","ipam":{"type":"host-local"}},{"type":"portmap"}]}"#,
        )
        .expect("write");
        fs::write(dir.path().join("99-other.conflist"), "{}").expect("write");
        assert_eq!(find_conflist(dir.path()).expect("found"), list);
        let socket = Path::new("/var/run/ambit/cni.sock");
        assert!(chain_into(&list, socket).expect("chained"));
        assert!(
            !chain_into(&list, socket).expect("again"),
            "second run changes nothing"
        );
        let conf: Value = serde_json::from_slice(&fs::read(&list).expect("read")).expect("json");
        let types: Vec<&str> = conf["plugins"]
            .as_array()
            .expect("plugins")
            .iter()
            .filter_map(|p| p["type"].as_str())
            .collect();
        assert_eq!(types, ["ptp", "portmap", PLUGIN_NAME]);
        assert_eq!(
            conf["plugins"][2]["ztunnelSocket"],
            "/var/run/ambit/cni.sock"
        );
        assert_eq!(conf["plugins"][0]["ipam"]["type"], "host-local");
    }

    #[test]
    fn missing_or_broken_config_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            find_conflist(dir.path()),
            Err(InstallError::NoConflist(_))
        ));
        let list = dir.path().join("10-net.conflist");
        fs::write(&list, r#"{"plugins":3}"#).expect("write");
        let e = chain_into(&list, Path::new("/s")).expect_err("invalid");
        assert!(e.to_string().contains("plugins"), "{e}");
    }
}
