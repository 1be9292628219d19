//! Replays the inputs saved under `fuzz/regressions/<target>/` (crashes found and fixed,
//! and seeds worth keeping) through the targets, so `cargo test` catches a regression
//! without the fuzzer.

use super::*;

/// Runs `target` on every file in `fuzz/regressions/<name>/`; returns how many ran.
pub(crate) fn replay(name: &str, target: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(name);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut n = 0;
    for entry in entries.flatten() {
        let data = std::fs::read(entry.path()).expect("a regression input is readable");
        let path = entry.path();
        let outcome = std::panic::catch_unwind(|| target(&data));
        assert!(outcome.is_ok(), "{} fails again", path.display());
        n += 1;
    }
    n
}

#[test]
fn hbone_request_regressions() {
    replay("hbone_request", hbone_request);
    // A real client's CONNECT, through the h2 server path.
    hbone_request(&[0]);
    let mut fields = vec![1, 7];
    fields.extend_from_slice(b"CONNECT");
    fields.push(11);
    fields.extend_from_slice(b"10.0.0.1:80");
    hbone_request(&fields);
}

#[test]
fn config_regressions() {
    replay("config", config);
    config(b"trustDomain: cluster.local\nnamespaces: [{name: shop}]\n");
}

#[test]
fn path_regressions() {
    replay("path", path);
    for (pattern, raw) in [
        ("/admin", "/x/..%2fadmin"),
        ("/admin/*", "/admin%2F..%2F..%2Fadmin/x"),
        ("*", "//a/./b/../c?x#y"),
        ("*.json", "/a%2ejson"),
    ] {
        let mut data = vec![u8::try_from(pattern.len()).expect("short pattern")];
        data.extend_from_slice(pattern.as_bytes());
        data.extend_from_slice(raw.as_bytes());
        path(&data);
    }
}
