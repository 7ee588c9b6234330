"""Lookups in rendered Kubernetes manifests (lists of plain dicts)."""

from __future__ import annotations

from typing import Any

Doc = dict[str, Any]
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    matches = [doc for doc in of_kind(docs, kind) if doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def maybe(docs: list[Doc], kind: str, name: str) -> Doc | None:
    matches = [doc for doc in of_kind(docs, kind) if doc["metadata"]["name"] == name]
    return matches[0] if matches else None


def pod_spec(workload: Doc) -> Doc:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: Doc) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def containers(workload: Doc) -> list[Doc]:
    spec = pod_spec(workload)
    return spec.get("initContainers", []) + spec["containers"]


def container(workload: Doc, name: str) -> Doc:
    matches = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert len(matches) == 1, f"{workload['metadata']['name']} has no container {name}"
    return matches[0]


def container_port(found: Doc, port: int | str) -> int:
    """A probe's or a Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    if port.isdigit():
        return int(port)
    for declared in found.get("ports", []):
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise AssertionError(f"container {found['name']} has no port named {port}")


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def config_value(docs: list[Doc], found: Doc, variable: str) -> str | None:
    """What a container sees in ``variable``: its env, else its envFrom ConfigMaps."""
    for entry in found.get("env", []):
        if entry["name"] == variable and "value" in entry:
            return str(entry["value"])
    for source in found.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref:
            config = named(docs, "ConfigMap", ref["name"])
            if variable in config.get("data", {}):
                return str(config["data"][variable])
    return None


def secret_ref(found: Doc, variable: str) -> Doc | None:
    for entry in found.get("env", []):
        if entry["name"] == variable:
            return entry.get("valueFrom", {}).get("secretKeyRef")
    return None


def all_secret_refs(docs: list[Doc]) -> list[tuple[str, Doc]]:
    """(where, secretKeyRef) for every container variable read from a Secret."""
    found = []
    for doc in docs:
        if doc["kind"] not in WORKLOAD_KINDS:
            continue
        for item in containers(doc):
            for entry in item.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    found.append((f"{doc['metadata']['name']}/{entry['name']}", ref))
    return found
