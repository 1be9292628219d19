#!/usr/bin/env bash
# The whole test suite: prerequisites, formatting, lints, unit tests and the end-to-end
# scenarios on simulated clusters (real binaries, real eBPF). Run as root.
set -euo pipefail
cd "$(dirname "$0")"
. tests/scripts/as-root.sh
as_root "$(pwd)/$(basename "$0")" "$@"
tests/scripts/setup-host.sh
cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The benchmarks' plaintext listener is behind a feature no other build enables; lint it too.
cargo clippy -p ambit-waypoint --all-targets --features bench-plaintext -- -D warnings
cargo build --workspace --bins
cargo test --workspace
# Every fuzz target for 10 s (coverage-guided, libFuzzer); any finding fails the run.
AMBIT_FUZZ_BUILD=dev tests/scripts/fuzz.sh 10
