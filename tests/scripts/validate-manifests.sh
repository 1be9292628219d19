#!/usr/bin/env bash
# Offline validation of Ambit's Kubernetes manifests; no API server needed.
#
#   tests/scripts/validate-manifests.sh [DIR...]      (default: deploy/)
#
# Every kustomization under each DIR (a directory with kustomization.yaml, except
# `kind: Component`s, which only build inside another kustomization) is rendered with
# `kubectl kustomize` and then:
#   1. built-in kinds are checked by `kubernetes-validate --strict` against the Kubernetes
#      1.32 OpenAPI schemas (unknown fields, types, required fields);
#   2. validate_manifests.py checks what it does not know: our CRDs (structural schemas,
#      printer columns, CEL syntax), our custom resources against the CRDs' schemas (strict,
#      with the CEL rules evaluated), Gateway API objects against a hand-written subset
#      schema, and deploy invariants (nothing privileged, no Secret access but the signer's
#      own CA).
# Exit status: 0 all valid; 1 something is invalid (each problem printed as
# `ERROR <dir>: <kind> <namespace>/<name>: <field>: <reason>`); 3 a prerequisite is missing
# (install them with tests/scripts/setup-host.sh).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
k8s_version=1.32

# missing WHAT HINT
missing() {
  echo "validate-manifests: missing prerequisite: $1" >&2
  echo "validate-manifests: $2" >&2
  exit 3
}
setup_hint="run tests/scripts/setup-host.sh (as root) to install it"

kubectl="${KUBECTL:-}"
if [ -z "$kubectl" ]; then
  if [ -x /usr/bin/kubectl ]; then
    kubectl=/usr/bin/kubectl
  else
    kubectl="$(command -v kubectl || true)"
  fi
fi
[ -n "$kubectl" ] && [ -x "$kubectl" ] ||
  missing "kubectl (v$k8s_version, expected at /usr/bin/kubectl or in PATH, or named by \$KUBECTL)" \
    "$setup_hint"
# The console script, or the module when pip put the script outside PATH.
if command -v kubernetes-validate >/dev/null 2>&1; then
  kv=(kubernetes-validate)
elif python3 -c 'import kubernetes_validate' 2>/dev/null; then
  kv=(python3 -m kubernetes_validate)
else
  missing "kubernetes-validate (pip install kubernetes-validate)" "$setup_hint"
fi
python3 -c 'import jsonschema, yaml' 2>/dev/null ||
  missing "python3 modules jsonschema and yaml (pip install jsonschema pyyaml)" "$setup_hint"

client="$("$kubectl" version --client 2>/dev/null | sed -n 's/^Client Version: //p')"
case "$client" in
  v"$k8s_version".*) ;;
  *) echo "validate-manifests: warning: kubectl is ${client:-of unknown version}, expected v$k8s_version.x" >&2 ;;
esac

[ $# -gt 0 ] || set -- "$repo/deploy"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

dirs=()
for root in "$@"; do
  [ -d "$root" ] || { echo "ERROR $root: not a directory" >&2; exit 1; }
  while IFS= read -r file; do
    if grep -qE '^kind:[[:space:]]*Component[[:space:]]*$' "$file"; then
      continue
    fi
    dirs+=("$(dirname "$file")")
  done < <(find "$root" -name kustomization.yaml -o -name kustomization.yml -o -name Kustomization | sort)
done
[ ${#dirs[@]} -gt 0 ] || { echo "ERROR: no kustomization found under $*" >&2; exit 1; }

echo "validate-manifests: $kubectl ($client), $("${kv[@]}" --version 2>&1 | head -1 | sed 's/^/kubernetes-validate /'), Kubernetes $k8s_version schemas"
failed=0
rendered=()
: >"$tmp/unknown-kinds"
i=0
for dir in "${dirs[@]}"; do
  i=$((i + 1))
  label="${dir#"$repo"/}"
  out="$tmp/$i.yaml"
  if ! "$kubectl" kustomize "$dir" >"$out" 2>"$tmp/$i.err"; then
    # kubectl wraps the reason in a klog line: keep the err="..." part when there is one.
    reason="$(tr '\n' ' ' <"$tmp/$i.err" | sed -n 's/.*err="\(.*\)".*/\1/p')"
    echo "ERROR $label: kubectl kustomize failed: ${reason:-$(tr '\n' ' ' <"$tmp/$i.err")}"
    failed=1
    continue
  fi
  objects="$(grep -c '^kind:' "$out" || true)"
  # kubernetes-validate names the input `-`; put the kustomization there instead. Its exit
  # status is not enough (it is 0 when a kind has no schema), so its lines are read.
  "${kv[@]}" --strict --kubernetes-version "$k8s_version" --quiet - <"$out" >"$tmp/$i.kv" 2>&1 || true
  verdict="built-in kinds valid"
  if grep -qE '^(ERROR|FATAL)' "$tmp/$i.kv" || grep -q Traceback "$tmp/$i.kv"; then
    grep -E '^(ERROR|FATAL)' "$tmp/$i.kv" |
      sed -e "s#^ERROR - did not validate for resource \([^ ]*\) against version [0-9.]*: #ERROR $label: \1: #" \
        -e "s#^\(ERROR\|FATAL\) - #\1 $label: #" || cat "$tmp/$i.kv"
    verdict="built-in kinds INVALID"
    failed=1
  fi
  sed -n 's/^WARN .*Couldn.t find schema for kind \([^ ]*\) with api version \([^ ]*\) .*/\1 \2/p' \
    "$tmp/$i.kv" >>"$tmp/unknown-kinds"
  unknown="$(sed -n 's/^WARN .*Couldn.t find schema for kind \([^ ]*\) .*/\1/p' "$tmp/$i.kv" | sort | uniq -c | awk '{printf "%s%s x%s", sep, $2, $1; sep=", "}')"
  echo "$label: $objects objects rendered; kubernetes-validate: $verdict${unknown:+; no schema for $unknown (checked below)}"
  rendered+=("$label=$out")
done

if [ ${#rendered[@]} -gt 0 ]; then
  python3 "$here/validate_manifests.py" --crd-fallback "$repo/deploy/base/crds" \
    --unknown-kinds "$tmp/unknown-kinds" "${rendered[@]}" || failed=1
fi

if [ "$failed" -ne 0 ]; then
  echo "validate-manifests: FAILED (see the ERROR lines above)"
  exit 1
fi
echo "validate-manifests: all ${#dirs[@]} kustomizations valid"
