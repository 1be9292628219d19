#!/usr/bin/env bash
# Ambit's benchmark suite: installs the tools it drives (if missing), builds the release
# binaries, and runs `target/release/ambit-bench` with the given arguments, e.g.
#
#   sudo tests/bench/run.sh            # the whole L4 suite: 5 interleaved repetitions
#   sudo tests/bench/run.sh --quick    # 1 repetition of 2 s runs, for development
#
# The table goes to stdout and to bench-results/l4-<date>.md. Run as root (the simulated
# cluster needs network namespaces, cgroups and eBPF), on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
tests/scripts/setup-host.sh

packages=(
  iperf3                     # single-stream bulk throughput
  wrk                        # request/response at saturation
  nginx-light                # the HTTP server in the destination pods
  stunnel4                   # contender: a stunnel TLS tunnel pair
  haproxy                    # contender: an HAProxy TLS origination/termination pair
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

cargo build --release --workspace --bins
AMBIT_BENCH_COMMAND="tests/bench/run.sh${*:+ $*}" exec target/release/ambit-bench "$@"
