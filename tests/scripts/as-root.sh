# Sourced by the entry scripts (demo.sh, test.sh, tests/bench/run.sh) before anything
# else: they need root (network namespaces, cgroups, eBPF, apt-get). As root they go on
# as they are; otherwise they run themselves again through sudo when sudo is installed,
# keeping the caller's Rust toolchain (PATH, CARGO_HOME, RUSTUP_HOME), and stop with a
# clear message when it is not (a fresh Debian image has no sudo, and its user is root).
#
#   . "$(dirname "$0")/tests/scripts/as-root.sh"; as_root "$0" "$@"
as_root() {
  local script="$1"
  shift
  if [ "$(id -u)" -eq 0 ]; then
    return 0
  fi
  if command -v sudo >/dev/null 2>&1; then
    echo "$(basename "$script"): not root; running it again with sudo" >&2
    exec sudo env "PATH=$PATH" "CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}" \
      "RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}" ${CI:+"CI=$CI"} "$script" "$@"
  fi
  echo "$(basename "$script"): must run as root (network namespaces, cgroups and eBPF need it)," \
    "and sudo is not installed to become root; run it as root" >&2
  exit 1
}
