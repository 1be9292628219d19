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
  g++                        # libFuzzer (C++), built by the fuzz targets' libfuzzer-sys
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

# kubectl renders the manifests (`kubectl kustomize`) for tests/scenarios/manifests.rs and
# manifest_args.rs. These machines ship the `kubectl` package (v1.32, with kustomize v5);
# Debian's own `kubernetes-client` is v1.20, whose kustomize is too old for deploy/.
if ! command -v kubectl >/dev/null 2>&1; then
  echo "setup-host: installing kubectl"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  if ! apt-get install -y -qq --no-install-recommends kubectl >/dev/null; then
    echo "setup-host: kubectl (1.32 or newer) is not installable from this machine's apt sources;" \
      "install it and re-run (the manifest tests fail under CI=true without it)" >&2
    exit 1
  fi
fi

# Offline validation of the Kubernetes manifests (tests/scripts/validate-manifests.sh):
# kubernetes-validate (Kubernetes' OpenAPI schemas), jsonschema (our CRDs' schemas) and
# cel-python (the CRDs' CEL rules), from PyPI. Pinned, so a new release can't change what
# CI accepts.
py_packages=(kubernetes-validate==1.37.0 "jsonschema>=4.18,<5" "pyyaml>=6,<7" cel-python==0.5.0)
if ! python3 -c 'import kubernetes_validate, jsonschema, yaml, celpy' 2>/dev/null; then
  echo "setup-host: installing ${py_packages[*]} (pip)"
  if ! python3 -m pip --version >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  fi
  pip_install=(python3 -m pip install --quiet --disable-pip-version-check)
  # Debian's own python3 refuses system-wide pip installs (PEP 668) unless told.
  PIP_ROOT_USER_ACTION=ignore "${pip_install[@]}" "${py_packages[@]}" 2>/dev/null ||
    PIP_ROOT_USER_ACTION=ignore "${pip_install[@]}" --break-system-packages "${py_packages[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup-host: cargo not found. Install Rust 1.95 or newer (rustup) and re-run." >&2
  exit 1
fi

# The fuzz targets (tests/scripts/fuzz.sh) run through cargo-fuzz, on the stable toolchain
# with `--sanitizer none`. Pinned, so a new release can't change how CI builds them.
cargo_fuzz_version=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -qx "cargo-fuzz $cargo_fuzz_version"; then
  echo "setup-host: installing cargo-fuzz $cargo_fuzz_version (crates.io)"
  cargo install --locked --quiet cargo-fuzz --version "$cargo_fuzz_version"
fi
