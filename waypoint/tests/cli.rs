//! The command line of the waypoint as built here: without the `bench-plaintext` feature
//! (the default, and what release and `dist` builds use) the benchmarks' plaintext
//! listener, which trusts source addresses as identities, does not exist.

use std::process::Command;

#[cfg(not(feature = "bench-plaintext"))]
#[test]
fn default_builds_have_no_plaintext_listener() {
    let bin = env!("CARGO_BIN_EXE_waypoint");
    let out = Command::new(bin)
        .args([
            "run",
            "--name",
            "w",
            "--namespace",
            "ns",
            "--ca-dir",
            "/nonexistent",
        ])
        .args(["--plaintext-listen", "127.0.0.1:0=127.0.0.1:80"])
        .output()
        .expect("the waypoint runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a usage error: {stderr}");
    assert!(
        stderr.contains("unexpected argument '--plaintext-listen'"),
        "{stderr}"
    );
    let version = Command::new(bin)
        .arg("--version")
        .output()
        .expect("the waypoint runs");
    assert!(
        !String::from_utf8_lossy(&version.stdout).contains("bench-plaintext"),
        "--version must not claim the feature"
    );
}

#[cfg(feature = "bench-plaintext")]
#[test]
fn bench_builds_say_so() {
    let out = Command::new(env!("CARGO_BIN_EXE_waypoint"))
        .arg("--version")
        .output()
        .expect("the waypoint runs");
    assert!(String::from_utf8_lossy(&out.stdout).contains("bench-plaintext"));
}
