#!/usr/bin/env python3
"""Offline checks of rendered manifests that kubernetes-validate cannot do.

Called by validate-manifests.sh after kubernetes-validate has checked every built-in kind.
It checks:

* CustomResourceDefinitions: structural schemas (every node has a `type`, objects have
  `properties` or `additionalProperties`, arrays have `items`, no forbidden keywords,
  `required` names existing properties, defaults and enums match their types), printer
  columns pointing at schema fields, and CEL rules that compile (with cel-python, when
  installed).
* Custom resources (ambit.dev): against the openAPIV3Schema of their CRD, with unknown
  fields rejected as kubectl's strict field validation does, defaults applied, and the
  CRD's x-kubernetes-validations rules evaluated with cel-python (when installed).
* Gateway API objects: against the hand-written subset schema next to this script.
* Deploy invariants: no privileged container, no Role/ClusterRole reading Secrets except
  the signer's Role for its own CA Secret (which may also create it), and that CA Secret
  mounted by the signer only, if at all.

Usage: validate_manifests.py --crd-fallback DIR --unknown-kinds FILE LABEL=RENDERED.yaml...
Prints one `ERROR <label>: <kind> <namespace>/<name>: <field>: <reason>` line per problem
and exits 1 if there was any.
"""

from __future__ import annotations

import argparse
import copy
import glob
import os
import re
import sys

import jsonschema
import yaml

try:
    import celpy  # cel-python

    CEL = celpy.Environment()
except ImportError:  # optional: without it CEL rules are reported as not evaluated
    celpy = None
    CEL = None

HERE = os.path.dirname(os.path.abspath(__file__))
GATEWAY_GROUP = "gateway.networking.k8s.io"
AMBIT_GROUP = "ambit.dev"

# Keywords the API server refuses in a structural schema.
FORBIDDEN = {"$ref", "definitions", "dependencies", "id", "$schema", "patternProperties",
             "additionalItems"}
TYPES = {"object", "array", "string", "integer", "number", "boolean"}


class Report:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.labels: dict[str, list[str]] = {}

    def error(self, label: str, obj: dict | None, field: str, reason: str) -> None:
        problem = f"{describe(obj)}: {field or '(object)'}: {reason}"
        if problem not in self.labels:
            self.errors.append(problem)
            self.labels[problem] = []
        if label not in self.labels[problem]:
            self.labels[problem].append(label)

    def lines(self) -> list[str]:
        # A kustomization included by another is rendered twice: say the problem once,
        # naming every rendering it appeared in.
        return [f"ERROR {', '.join(self.labels[p])}: {p}" for p in self.errors]


def describe(obj: dict | None) -> str:
    if not isinstance(obj, dict):
        return "(document)"
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    name = meta.get("name", "<no name>")
    return f"{obj.get('kind', '<no kind>')} {ns + '/' if ns else ''}{name}"


def path_str(parts) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


def group_of(obj: dict) -> str:
    api = obj.get("apiVersion", "")
    return api.split("/")[0] if "/" in api else ""


def version_of(obj: dict) -> str:
    return obj.get("apiVersion", "").split("/")[-1]


# === CRDs ===


def check_structural(label: str, crd: dict, schema, at: str, rep: Report, top=True) -> None:
    if not isinstance(schema, dict):
        rep.error(label, crd, at, "schema node is not an object")
        return
    for k in FORBIDDEN & schema.keys():
        rep.error(label, crd, at, f"`{k}` is not allowed in a structural schema")
    if schema.get("uniqueItems") is True:
        rep.error(label, crd, at, "uniqueItems: true is not allowed in a structural schema")
    for k in ("allOf", "anyOf", "oneOf", "not"):
        if k in schema:
            rep.error(label, crd, at, f"`{k}` is not used by Ambit's CRDs (keep schemas simple)")
    escape = schema.get("x-kubernetes-int-or-string") or schema.get(
        "x-kubernetes-preserve-unknown-fields")
    t = schema.get("type")
    if t is None and not escape:
        rep.error(label, crd, at, "has no `type` (structural schemas need one on every node)")
    elif t is not None and t not in TYPES:
        rep.error(label, crd, at, f"unknown type `{t}`")
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        rep.error(label, crd, at, "x-kubernetes-preserve-unknown-fields would let typos through")
    props = schema.get("properties")
    if t == "object":
        if props is not None and "additionalProperties" in schema:
            rep.error(label, crd, at, "`properties` and `additionalProperties` are exclusive")
        for name, sub in (props or {}).items():
            check_structural(label, crd, sub, f"{at}.properties.{name}", rep, top=False)
        ap = schema.get("additionalProperties")
        if isinstance(ap, dict):
            check_structural(label, crd, ap, f"{at}.additionalProperties", rep, top=False)
        for req in schema.get("required", []):
            if req not in (props or {}):
                rep.error(label, crd, f"{at}.required", f"`{req}` is required but not a property")
    elif props is not None:
        rep.error(label, crd, at, f"`properties` on a node of type {t}")
    if t == "array":
        items = schema.get("items")
        if not isinstance(items, dict):
            rep.error(label, crd, at, "an array needs a single `items` schema")
        else:
            check_structural(label, crd, items, f"{at}.items", rep, top=False)
    if "default" in schema:
        try:
            jsonschema.validate(schema["default"], strip_extensions(schema))
        except jsonschema.ValidationError as e:
            rep.error(label, crd, f"{at}.default", f"does not match its own schema: {e.message}")
    if "enum" in schema and t:
        try:
            for v in schema["enum"]:
                jsonschema.validate(v, {"type": t})
        except jsonschema.ValidationError as e:
            rep.error(label, crd, f"{at}.enum", e.message)
    if "pattern" in schema:
        try:
            re.compile(schema["pattern"])
        except re.error as e:
            rep.error(label, crd, f"{at}.pattern", f"not a regular expression: {e}")
    for i, v in enumerate(schema.get("x-kubernetes-validations", [])):
        rule = v.get("rule")
        if not rule:
            rep.error(label, crd, f"{at}.x-kubernetes-validations[{i}]", "has no rule")
        elif CEL is not None:
            try:
                CEL.compile(rule)
            except Exception as e:  # celpy raises its own parse errors
                detail = " ".join(str(e).split())
                rep.error(label, crd, f"{at}.x-kubernetes-validations[{i}].rule",
                          f"`{rule}` does not compile as CEL: {detail}")
    if top:
        meta = (props or {}).get("metadata")
        if meta is not None and set(meta.keys()) - {"type"}:
            rep.error(label, crd, f"{at}.properties.metadata",
                      "only `type: object` may be said about metadata")


def strip_extensions(schema):
    if isinstance(schema, dict):
        return {k: strip_extensions(v) for k, v in schema.items()
                if not k.startswith("x-kubernetes") and k not in ("default", "description")}
    if isinstance(schema, list):
        return [strip_extensions(v) for v in schema]
    return schema


def schema_has_path(schema: dict, json_path: str) -> bool:
    node = schema
    for part in re.findall(r"\.([A-Za-z0-9_]+)|\[[^\]]*\]", json_path):
        if part == "":  # an index: step into the array's items
            if node.get("type") != "array":
                return False
            node = node.get("items", {})
            continue
        if part == "metadata" and node is schema:
            return True
        props = node.get("properties")
        if props is None or part not in props:
            return False
        node = props[part]
    return True


def check_crd(label: str, crd: dict, rep: Report) -> None:
    spec = crd.get("spec", {})
    group = spec.get("group", "")
    names = spec.get("names", {})
    name = crd.get("metadata", {}).get("name", "")
    if name != f"{names.get('plural')}.{group}":
        rep.error(label, crd, "metadata.name", f"must be <plural>.<group> = "
                  f"{names.get('plural')}.{group}")
    versions = spec.get("versions", [])
    if sum(1 for v in versions if v.get("storage")) != 1:
        rep.error(label, crd, "spec.versions", "exactly one version must be the storage version")
    for i, v in enumerate(versions):
        at = f"spec.versions[{i}]"
        schema = (v.get("schema") or {}).get("openAPIV3Schema")
        if schema is None:
            rep.error(label, crd, f"{at}.schema.openAPIV3Schema", "missing")
            continue
        check_structural(label, crd, schema, f"{at}.schema.openAPIV3Schema", rep)
        for j, col in enumerate(v.get("additionalPrinterColumns", [])):
            if not schema_has_path(schema, col.get("jsonPath", "")):
                rep.error(label, crd, f"{at}.additionalPrinterColumns[{j}].jsonPath",
                          f"`{col.get('jsonPath')}` is not a field of the schema")


# === Custom resources ===


def strict(schema):
    """A copy of an OpenAPI schema for jsonschema: unknown fields rejected (kubectl's strict
    field validation), Kubernetes extensions dropped."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()
           if not k.startswith("x-kubernetes") and k not in ("default", "description")}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema:
            out["additionalProperties"] = False
    return out


def apply_defaults(value, schema):
    if isinstance(value, dict) and schema.get("type") == "object":
        for name, sub in (schema.get("properties") or {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                apply_defaults(value[name], sub)
        ap = schema.get("additionalProperties")
        if isinstance(ap, dict):
            for v in value.values():
                apply_defaults(v, ap)
    elif isinstance(value, list) and schema.get("type") == "array":
        for v in value:
            apply_defaults(v, schema.get("items") or {})


def run_cel(label, obj, value, schema, at, rep: Report, counts: dict) -> None:
    if not isinstance(schema, dict):
        return
    for v in schema.get("x-kubernetes-validations", []):
        counts["cel"] += 1
        if CEL is None:
            continue
        try:
            ok = CEL.program(CEL.compile(v["rule"])).evaluate({"self": celpy.json_to_cel(value)})
        except Exception as e:
            rep.error(label, obj, path_str(at), f"CEL rule `{v['rule']}` failed to run: {e}")
            continue
        if ok is not True and str(ok) != "True":
            field = path_str(at + [v["fieldPath"].lstrip(".")]) if v.get("fieldPath") else path_str(at)
            rep.error(label, obj, field, v.get("message") or f"violates `{v['rule']}`")
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in value:
                run_cel(label, obj, value[name], sub, at + [name], rep, counts)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            run_cel(label, obj, item, schema.get("items") or {}, at + [i], rep, counts)


def check_against(label, obj, schema, rep: Report) -> bool:
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    for e in errors:
        rep.error(label, obj, path_str(e.absolute_path), e.message)
    return not errors


def check_custom_resource(label, obj, crds, rep: Report, counts: dict) -> None:
    key = (group_of(obj), obj.get("kind"))
    crd = crds.get(key)
    if crd is None:
        rep.error(label, obj, "apiVersion",
                  f"no CustomResourceDefinition for {key[1]} in group {key[0]}")
        return
    version = next((v for v in crd["spec"].get("versions", [])
                    if v.get("name") == version_of(obj)), None)
    if version is None or not version.get("served"):
        rep.error(label, obj, "apiVersion", f"version {version_of(obj)} is not served by "
                  f"{crd['metadata']['name']}")
        return
    schema = version["schema"]["openAPIV3Schema"]
    value = copy.deepcopy(obj)
    apply_defaults(value, schema)
    counts["cr"] += 1
    if check_against(label, obj, strict(schema), rep):
        run_cel(label, obj, value, schema, [], rep, counts)


# === Gateway API ===


def gateway_schemas() -> dict:
    with open(os.path.join(HERE, "gateway-api-subset.schema.yaml")) as f:
        doc = yaml.safe_load(f)
    definitions = strict_gateway(doc["definitions"])
    out = {}
    for kind, schema in doc["kinds"].items():
        root = strict_gateway(schema)
        root["properties"].update({
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "status": {"type": "object"},
        })
        root["definitions"] = definitions
        out[kind] = root
    return out


def strict_gateway(schema):
    if isinstance(schema, list):
        return [strict_gateway(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_gateway(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


# === Deploy invariants ===


def pod_spec(obj: dict):
    kind = obj.get("kind")
    if kind == "Pod":
        return obj.get("spec") or {}, "spec"
    if kind in ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"):
        return ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}, "spec.template.spec"
    return None, ""


def check_invariants(label, obj, rep: Report) -> None:
    spec, at = pod_spec(obj)
    if isinstance(spec, dict):
        for field in ("initContainers", "containers"):
            for i, c in enumerate(spec.get(field) or []):
                sc = (c or {}).get("securityContext") or {}
                if isinstance(sc, dict) and sc.get("privileged") is True:
                    rep.error(label, obj, f"{at}.{field}[{i}].securityContext.privileged",
                              "no Ambit component runs privileged; add only the capabilities it needs")
        for i, v in enumerate(spec.get("volumes") or []):
            secret = (v or {}).get("secret") or {}
            if secret.get("secretName") == "ambit-signer-ca" and not (
                    obj.get("kind") == "Deployment"
                    and obj.get("metadata", {}).get("name") == "ambit-signer"):
                rep.error(label, obj, f"{at}.volumes[{i}].secret.secretName",
                          "the signer CA is mounted into the signer only")
    if obj.get("kind") in ("Role", "ClusterRole"):
        meta = obj.get("metadata") or {}
        for i, r in enumerate(obj.get("rules") or []):
            resources = set(r.get("resources") or [])
            if not resources & {"secrets", "*"}:
                continue
            # The signer's Role: get its CA Secret by name, and create it on the first
            # start (RBAC cannot restrict create by name).
            verbs = set(r.get("verbs") or [])
            own_ca = (obj.get("kind") == "Role" and meta.get("namespace") == "ambit-system"
                      and meta.get("name") == "ambit-signer-ca"
                      and resources == {"secrets"}
                      and ((r.get("resourceNames") == ["ambit-signer-ca"] and verbs <= {"get", "watch"})
                           or (not r.get("resourceNames") and verbs == {"create"})))
            if not own_ca:
                rep.error(label, obj, f"rules[{i}].resources",
                          "only the signer's Role may read a Secret, and only ambit-signer-ca")


# === main ===


def load(path: str) -> list:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--crd-fallback", help="directory of CRD YAML used when a rendering has none")
    ap.add_argument("--unknown-kinds", help="file of `kind apiVersion` lines kubernetes-validate had no schema for")
    ap.add_argument("rendered", nargs="+", help="LABEL=FILE")
    args = ap.parse_args()
    rep = Report()

    rendered = []
    for item in args.rendered:
        label, _, path = item.partition("=")
        try:
            rendered.append((label, load(path)))
        except yaml.YAMLError as e:
            rep.error(label, None, "", f"not YAML: {e}")

    unknown = set()
    if args.unknown_kinds and os.path.exists(args.unknown_kinds):
        with open(args.unknown_kinds) as f:
            unknown = {tuple(line.split()) for line in f if line.strip()}

    crds = {}
    for label, docs in rendered:
        for obj in docs:
            if obj.get("kind") == "CustomResourceDefinition":
                crds[(obj["spec"]["group"], obj["spec"]["names"]["kind"])] = obj
    if args.crd_fallback:
        for path in sorted(glob.glob(os.path.join(args.crd_fallback, "*.yaml"))):
            for obj in load(path):
                key = (obj["spec"]["group"], obj["spec"]["names"]["kind"])
                crds.setdefault(key, obj)

    gateway = gateway_schemas()
    total = {"crd": 0, "cr": 0, "gw": 0, "cel": 0}
    for label, docs in rendered:
        counts = {"crd": 0, "cr": 0, "gw": 0, "cel": 0}
        for obj in docs:
            if not isinstance(obj, dict) or "kind" not in obj or "apiVersion" not in obj:
                rep.error(label, obj, "", "not a Kubernetes object (no kind/apiVersion)")
                continue
            group = group_of(obj)
            check_invariants(label, obj, rep)
            if obj["kind"] == "CustomResourceDefinition":
                counts["crd"] += 1
                check_crd(label, obj, rep)
            elif group == AMBIT_GROUP:
                check_custom_resource(label, obj, crds, rep, counts)
            elif group == GATEWAY_GROUP:
                schema = gateway.get(obj["kind"])
                if schema is None or version_of(obj) != "v1":
                    rep.error(label, obj, "apiVersion", f"{obj['apiVersion']} {obj['kind']} is "
                              "outside the Gateway API subset this script knows")
                else:
                    counts["gw"] += 1
                    check_against(label, obj, schema, rep)
            elif (obj["kind"], obj["apiVersion"]) in unknown:
                rep.error(label, obj, "apiVersion", "no schema known for this kind: cannot validate it")
        for k in total:
            total[k] += counts[k]
        print(f"  {label}: {counts['crd']} CRDs structurally checked, {counts['cr']} custom "
              f"resources against their CRD, {counts['gw']} Gateway API objects against the subset schema")

    if total["gw"]:
        print("note: Gateway API objects were checked against a hand-written subset of the v1 "
              "schemas (tests/scripts/gateway-api-subset.schema.yaml), not the upstream CRDs")
    if total["cel"]:
        if CEL is None:
            print(f"note: {total['cel']} x-kubernetes-validations (CEL) checks were NOT evaluated: "
                  "cel-python is not installed")
        else:
            print(f"note: {total['cel']} x-kubernetes-validations (CEL) checks evaluated with cel-python")
    for line in rep.lines():
        print(line)
    return 1 if rep.errors else 0


if __name__ == "__main__":
    sys.exit(main())
