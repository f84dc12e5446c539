#!/usr/bin/env python3
"""Validates rendered Kubernetes manifests offline, strictly (an unknown
field is an error, as with `kubectl apply --validate=strict`):

- built-in kinds against the Kubernetes OpenAPI schemas that
  kubernetes-validate ships, for every --k8s-version given; a kind with no
  schema fails instead of being skipped;
- the one custom resource, prometheus-operator's ServiceMonitor, against the
  schema of its pydantic models (PyPI cloudcoil-models-prometheus-operator,
  generated from the operator's CRD) with unknown fields forbidden, which is
  what the API server's structural-schema validation does;
- every pod template against the parts of Pod Security "restricted" that a
  manifest decides (common/namespace.yaml enforces it, so a pod that misses
  one would be refused at admission, not here).

Usage: validate_manifests.py --k8s-version 1.31.0 [--k8s-version …] FILE…
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml


def strict(schema: object) -> None:
    """Forbids properties an object schema does not name (in place)."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)


def custom_resource_validators() -> dict[tuple[str, str], jsonschema.Draft202012Validator]:
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    schema = ServiceMonitor.model_json_schema(by_alias=True, mode="validation")
    strict(schema)
    return {("monitoring.coreos.com/v1", "ServiceMonitor"): jsonschema.Draft202012Validator(schema)}


def pod_spec(doc: dict) -> dict | None:
    spec = doc.get("spec", {})
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        return spec.get("template", {}).get("spec")
    if doc["kind"] == "CronJob":
        return spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    if doc["kind"] == "Pod":
        return spec
    return None


def restricted_violations(pod: dict) -> Iterator[str]:
    pod_ctx = pod.get("securityContext", {})
    if pod_ctx.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
        yield "securityContext.seccompProfile.type must be RuntimeDefault"
    for container in pod.get("initContainers", []) + pod.get("containers", []):
        name, ctx = container["name"], container.get("securityContext", {})
        if not (ctx.get("runAsNonRoot") or pod_ctx.get("runAsNonRoot")):
            yield f"container {name}: runAsNonRoot is not set"
        if ctx.get("allowPrivilegeEscalation") is not False:
            yield f"container {name}: allowPrivilegeEscalation must be false"
        if "ALL" not in ctx.get("capabilities", {}).get("drop", []):
            yield f"container {name}: capabilities must drop ALL"
        if ctx.get("privileged"):
            yield f"container {name}: privileged"
    for volume in pod.get("volumes", []):
        if "hostPath" in volume:
            yield f"volume {volume['name']}: hostPath"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k8s-version", action="append", required=True)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()

    custom = custom_resource_validators()
    failures, checked = [], 0
    for path in args.files:
        for doc in (d for d in yaml.safe_load_all(path.read_text()) if d):
            checked += 1
            where = f"{path.name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            key = (doc.get("apiVersion"), doc.get("kind"))
            if key in custom:
                for error in custom[key].iter_errors(doc):
                    failures.append(f"{where}: {'.'.join(map(str, error.path))}: {error.message}")
            elif "." in key[0].split("/")[0] and not key[0].split("/")[0].endswith("k8s.io"):
                failures.append(f"{where}: custom resource {key[0]} has no schema here")
            else:
                for version in args.k8s_version:
                    try:
                        kubernetes_validate.validate(doc, version, strict=True)
                    except kubernetes_validate.ValidationError as e:
                        field = ".".join(map(str, e.path))
                        failures.append(f"{where}: Kubernetes {version}: {field}: {e.message}")
                    except kubernetes_validate.SchemaNotFoundError as e:
                        failures.append(f"{where}: Kubernetes {version}: {e.message}")
            pod = pod_spec(doc)
            if pod is not None:
                failures += [f"{where}: Pod Security restricted: {v}" for v in restricted_violations(pod)]
    print(
        f"[manifests] {checked} resources in {len(args.files)} renderings, strict, "
        f"against Kubernetes {' and '.join(args.k8s_version)} (+ ServiceMonitor of prometheus-operator 0.80)",
        flush=True,
    )
    for failure in failures:
        print(f"[manifests] FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
