"""Turn a CustomResourceDefinition's openAPIV3Schema into the JSON Schema the deploy tests validate against.

Usage: python deploy/k8s/schemas/trim_crd.py CRD.yaml VERSION "SOURCE NOTE" > deploy/k8s/schemas/NAME.json

Kept: the structure of `spec` (properties, types, required, enums, patterns, int-or-string). Dropped:
descriptions, `status`, CEL rules (x-kubernetes-validations cannot be checked offline). Added: the
object metadata fields the manifests use, `apiVersion`/`kind` constants, and `additionalProperties:
false` on every object that lists its properties (what `kubectl apply`'s strict field validation does).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

_DROP = {"description", "x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
         "x-kubernetes-map-type", "nullable", "default", "example"}  # fmt: skip


def convert(node: Any) -> Any:
    if isinstance(node, list):
        return [convert(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: convert(v) for k, v in node.items() if k not in _DROP}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


METADATA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "required": ["name"],
}


def main() -> None:
    crd_path, version, source = sys.argv[1:4]
    crd = yaml.safe_load(Path(crd_path).read_text())
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = served["schema"]["openAPIV3Schema"]
    spec = convert(schema["properties"]["spec"])
    out = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$comment": f"{group}/{version} {kind}, trimmed from {source} by trim_crd.py",
        "type": "object",
        "properties": {
            "apiVersion": {"const": f"{group}/{version}"},
            "kind": {"const": kind},
            "metadata": METADATA,
            "spec": spec,
        },
        "required": ["apiVersion", "kind", "metadata", *(["spec"] if "spec" in schema.get("required", []) else [])],
        "additionalProperties": False,
    }
    json.dump(out, sys.stdout, indent=1, sort_keys=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
