"""deploy/kuberay/rayservice.yaml against KubeRay's RayService CRD (deploy/kuberay/crd/, a verbatim copy).

What Kubernetes checks when the manifest is applied, as far as it can be checked offline:

- the CRD's ``openAPIV3Schema`` for the manifest's ``apiVersion`` (types, enums, required fields, quantity
  patterns), with unknown fields refused, as ``kubectl apply``'s strict field validation (its default)
  refuses them: the API server would otherwise drop them silently;
- the CEL rules (``x-kubernetes-validations``) the CRD carries: transition rules (``self == oldSelf``)
  hold on create; ``self in [...]`` is evaluated; any other rule fails the test until it is handled;
- ``x-kubernetes-list-type`` ``map`` / ``set``: no two items with the same keys (after defaults);
- the checks KubeRay's operator makes before it creates anything (ray-operator/controllers/ray/utils/
  validation.go: the name, the upgrade strategy, containers in every group, replica bounds,
  ``rayStartParams['labels']``),
  and the names the API server checks in the pods the operator creates from the templates.
"""

from __future__ import annotations

import ast
import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
CRD = ROOT / "deploy" / "kuberay" / "crd" / "ray.io_rayservices.yaml"

#: KubeRay's MaxRayServiceNameLength (ray-operator/controllers/ray/utils/constant.go: 53 - 6).
MAX_RAYSERVICE_NAME = 47
#: ValidateRayServiceSpec's upgrade strategies (the CRD leaves the type a free string).
UPGRADE_TYPES = ("NewClusterWithIncrementalUpgrade", "NewCluster", "None")
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
IANA_SVC_NAME = re.compile(r"(?=.*[a-z])[a-z0-9]([-a-z0-9]*[a-z0-9])?")
ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")


def _load(path: Path) -> Any:
    with open(path) as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    doc: dict[str, Any] = _load(CRD)
    return doc


@pytest.fixture
def manifest() -> dict[str, Any]:
    doc: dict[str, Any] = _load(MANIFEST)
    return doc


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with unknown fields refused wherever Kubernetes would prune them."""
    out = copy.deepcopy(schema)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(out)
    return out


def _cel(validator: Any, rules: list[dict[str, str]], instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    for rule in rules:
        text = rule["rule"].strip()
        if text == "self == oldSelf":
            continue  # a transition rule: only an update can break it
        member = re.fullmatch(r"self in (\[.*\])", text)
        if member is None:
            yield jsonschema.ValidationError(f"CEL rule not evaluated by this test, check it by hand: {text}")
        elif instance not in ast.literal_eval(member.group(1)):
            yield jsonschema.ValidationError(rule.get("message", text))


def _list_type(validator: Any, kind: str, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    if not isinstance(instance, list) or kind not in ("map", "set"):
        return
    if kind == "set":
        keys = [repr(item) for item in instance]
    else:
        names = schema.get("x-kubernetes-list-map-keys", [])
        props = schema.get("items", {}).get("properties", {})
        keys = [
            repr(tuple(item.get(k, props.get(k, {}).get("default")) for k in names))
            for item in instance
            if isinstance(item, dict)
        ]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        yield jsonschema.ValidationError(f"duplicate items in a list of type {kind}: {', '.join(dupes)}")


KubeValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator,
    {"x-kubernetes-validations": _cel, "x-kubernetes-list-type": _list_type},
)


def _version_schema(crd: dict[str, Any], api_version: str) -> dict[str, Any]:
    group, _, version = api_version.partition("/")
    assert group == crd["spec"]["group"], f"apiVersion {api_version} is not of the CRD's group"
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            assert entry["served"], f"{api_version} is not served by this CRD"
            schema: dict[str, Any] = entry["schema"]["openAPIV3Schema"]
            return schema
    raise AssertionError(f"the CRD has no version {version}")


def _pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    cluster = doc.get("spec", {}).get("rayClusterConfig", {})
    yield "head", cluster.get("headGroupSpec", {}).get("template", {}).get("spec", {})
    for group in cluster.get("workerGroupSpecs", []):
        yield group.get("groupName", "?"), group.get("template", {}).get("spec", {})


def problems(doc: dict[str, Any], crd: dict[str, Any]) -> list[str]:
    """Why Kubernetes or KubeRay's operator would refuse ``doc``; empty when nothing is found."""
    if doc.get("kind") != crd["spec"]["names"]["kind"]:
        return [f"kind {doc.get('kind')!r} is not {crd['spec']['names']['kind']}"]
    schema = _strict(_version_schema(crd, doc.get("apiVersion", "")))
    found = [
        f"{'.'.join(str(p) for p in err.absolute_path) or '(root)'}: {err.message}"
        for err in KubeValidator(schema).iter_errors(doc)
    ]
    name = doc.get("metadata", {}).get("name", "")
    if len(name) > MAX_RAYSERVICE_NAME or not DNS1035_LABEL.fullmatch(name):
        found.append(
            f"metadata.name {name!r}: not a DNS-1035 label of at most {MAX_RAYSERVICE_NAME} characters"
        )
    upgrade = doc.get("spec", {}).get("upgradeStrategy", {}).get("type")
    if upgrade is not None and upgrade not in UPGRADE_TYPES:
        found.append(f"spec.upgradeStrategy.type {upgrade!r} is not one of {', '.join(UPGRADE_TYPES)}")
    cluster = doc.get("spec", {}).get("rayClusterConfig", {})
    groups = [cluster.get("headGroupSpec", {}), *cluster.get("workerGroupSpecs", [])]
    for group in groups:
        if "labels" in group.get("rayStartParams", {}):
            found.append(f"group {group.get('groupName', 'head')}: rayStartParams['labels'] is not supported")
    for group in cluster.get("workerGroupSpecs", []):
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if low is not None and high is not None and low > high:
            found.append(f"worker group {group.get('groupName')}: minReplicas {low} > maxReplicas {high}")
    for where, pod in _pod_specs(doc):
        containers = pod.get("containers") or []
        if not containers:
            found.append(f"{where}: the pod template has no container")
        for c in containers:
            if not DNS1123_LABEL.fullmatch(c.get("name", "")) or len(c.get("name", "")) > 63:
                found.append(f"{where}: container name {c.get('name')!r} is not a DNS-1123 label")
            for port in c.get("ports", []):
                if "name" in port and (len(port["name"]) > 15 or not IANA_SVC_NAME.fullmatch(port["name"])):
                    found.append(f"{where}: port name {port['name']!r} is not an IANA service name")
            for var in c.get("env", []):
                if not ENV_NAME.fullmatch(var.get("name", "")):
                    found.append(f"{where}: env name {var.get('name')!r} is not a valid variable name")
    return found


def test_the_manifest_is_accepted(manifest: dict[str, Any], crd: dict[str, Any]) -> None:
    assert problems(manifest, crd) == []


def test_the_crd_copy_is_the_one_the_readme_names(crd: dict[str, Any]) -> None:
    readme = (CRD.parent / "README.md").read_text()
    assert "ray-operator/config/crd/bases/ray.io_rayservices.yaml" in readme
    assert crd["metadata"]["name"] == "rayservices.ray.io"
    assert (CRD.parent / "LICENSE").read_text().lstrip().startswith("Apache License")


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    keys: list[Any] = [int(k) if k.isdigit() else k for k in path.split(".")]
    node: Any = doc
    for key in keys[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value


_DELETE = object()
_HEAD = "spec.rayClusterConfig.headGroupSpec"
_CPU = "spec.rayClusterConfig.workerGroupSpecs.0"
_HEAD_CONTAINER = f"{_HEAD}.template.spec.containers.0"


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        (f"{_HEAD}.rayStartParam", {}, "Additional properties are not allowed"),  # a typo
        (f"{_HEAD}.template", _DELETE, "'template' is a required property"),
        ("spec.rayClusterConfig.enableInTreeAutoscaling", "yes", "is not of type 'boolean'"),
        (f"{_CPU}.replicas", "2", "is not of type 'integer'"),
        (f"{_HEAD_CONTAINER}.resources.limits.memory", "8 GiB", "does not match"),
        (f"{_HEAD_CONTAINER}.ports.1.containerPort", 6379, "duplicate items"),
        (f"{_HEAD_CONTAINER}.ports.0.name", "global-control-store", "IANA service name"),
        (f"{_CPU}.template.spec.containers.0.name", "Ray_Worker", "DNS-1123 label"),
        ("spec.managedBy", "someone-else", "managedBy field value must be"),
        ("spec.rayClusterConfig.gcsFaultToleranceOptions", {"backend": "etcd"}, "is not one of"),
        ("spec.upgradeStrategy", {"type": "Sometimes"}, "upgradeStrategy.type 'Sometimes'"),
        ("metadata.name", "Image-Search", "DNS-1035"),
        (f"{_CPU}.minReplicas", 20, "minReplicas 20 > maxReplicas 16"),
        (f"{_CPU}.rayStartParams", {"labels": "a=b"}, "rayStartParams['labels']"),
        ("apiVersion", "ray.io/v2", "no version v2"),
    ],
)
def test_a_broken_manifest_is_refused(
    manifest: dict[str, Any], crd: dict[str, Any], path: str, value: Any, reason: str
) -> None:
    assert problems(manifest, crd) == []
    _set(manifest, path, value)
    try:
        found = problems(manifest, crd)
    except AssertionError as exc:
        found = [str(exc)]
    assert any(reason in p for p in found), found
