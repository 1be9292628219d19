#!/usr/bin/env bash
# The demo: installs prerequisites, builds Ambit, starts a simulated two-node cluster in
# network namespaces, sends real traffic and shows what the mesh did. Cleans up on exit.
set -euo pipefail
cd "$(dirname "$0")"
. tests/scripts/as-root.sh
as_root "$(pwd)/$(basename "$0")" "$@"
tests/scripts/setup-host.sh
cargo build --release --workspace --bins
exec target/release/ambit-demo "$@"
