#!/usr/bin/env bash
# Installs what Ambit's build, tests and demo need on a fresh Debian machine, and nothing
# more. Idempotent: it only calls apt-get when a package is missing.
set -euo pipefail

packages=(
  clang llvm libbpf-dev      # eBPF programs: compiled with clang against libbpf's headers
  bpftool                    # tests inspect pinned maps and links with it
  iproute2 util-linux        # ip netns / veth / bridges; nsenter
  tcpdump tshark             # packet captures on the simulated cluster's links
  curl openssl ca-certificates
  python3
  dnsutils                   # dig, for the DNS proxy scenarios
  nghttp2-client             # h2load, an h2c client for the waypoint scenarios
)

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-host: must run as root (network namespaces, cgroups and eBPF need it); try: sudo $0" >&2
  exit 1
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup-host: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup-host: cargo not found. Install Rust 1.95 or newer (rustup) and re-run." >&2
  exit 1
fi
