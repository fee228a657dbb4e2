"""Deployment files checked without a cluster: KubeRay manifests, core Kubernetes objects, Ray launcher configs.

* ``k8s/*.yaml`` Ray resources against the KubeRay CRDs (their
  ``v1`` openAPIV3Schema turned into a strict JSON Schema: unknown fields rejected as by
  ``kubectl --validate=strict``, int-or-string and list-map keys honoured), plus the admission
  rules the KubeRay operator applies on top of the schema. The CRDs are not part of the
  repository: they are read from ``$SNIPER_KUBERAY_CRDS``, else ``../shared/kuberay-crds`` (where
  CI has them); where neither holds them those checks are skipped with the reason, except under
  CI (``CI`` set), where a missing CRD fails;
* core objects and every pod template inside the Ray resources with ``kubernetes_validate``
  (strict) against the Kubernetes releases in ``K8S_VERSIONS``;
* what the manifests say about this project: image, Ray version, cluster shape, sizing, the
  Serve config of the gateway, RayJob entrypoints parsed by the project's own CLI parser;
* ``ray_configs/`` with the cluster-launcher schema shipped in the Ray wheel and Ray's own
  ``prepare_config``/``validate_config``, and ``runtime_env.yaml`` with ``RuntimeEnv``.

Each validator has a negative test, so a green run means the files passed a check that can fail.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any, Callable, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

import cluster  # before ray: sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (DESIGN.md)
from cluster.cli.parser import build_parser

REPO = Path(__file__).resolve().parents[1]
K8S_DIR = REPO / "k8s"
RAY_CONFIGS = REPO / "ray_configs"
CRD_ENV = "SNIPER_KUBERAY_CRDS"  # a folder holding KubeRay's CRD files (CRD_FILES)
CRD_DIR = Path(os.environ.get(CRD_ENV) or REPO.parent / "shared" / "kuberay-crds")
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
# KubeRay's own name rules (ray-operator/controllers/ray/utils/validation.go): a DNS-1035 label
# (a DNS-1123 label that starts with a letter), short enough for the names derived from it.
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
K8S_VERSIONS = ("1.29", "1.33")   # an old and a recent release that kubernetes-validate ships
IMAGE = f"sniper-cluster:{cluster.__version__}"
MODEL_CLAIM = "sniper-models"
MODEL_MOUNT = "/models"
SERVE_PORT = 8000
GIB = 1 << 30
MIB = 1 << 20
# build_app's arguments (cluster.api.gateway.BUILD_ARGS once that module exists)
GATEWAY_ARGS = ("model", "nodes", "cache_mb", "policy", "namespace", "api_key", "max_tokens_limit",
                "max_prompt_tokens", "max_body_bytes")
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are 3 MB of YAML


@pytest.fixture(autouse=True)
def _no_sniper_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI takes defaults from SNIPER_* variables: parse manifests as written, not as this shell sets."""
    for name in [n for n in os.environ if n.startswith("SNIPER_")]:
        monkeypatch.delenv(name)


# -- loading -------------------------------------------------------------------------------

def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=_LOADER) if doc]


def _all_manifests() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in load_documents(path):
            out.append((f"{path.name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}", doc))
    return out


MANIFESTS = _all_manifests()
RAY_DOCS = [(i, d) for i, d in MANIFESTS if str(d.get("apiVersion", "")).startswith("ray.io/")]
CORE_DOCS = [(i, d) for i, d in MANIFESTS if not str(d.get("apiVersion", "")).startswith("ray.io/")]


def _ids(items: list[tuple[str, Any]]) -> list[str]:
    return [i for i, _ in items]


def _docs(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(i, d) for i, d in MANIFESTS if d["kind"] == kind]


# -- Kubernetes structural schema -> strict JSON Schema ------------------------------------

def structural_to_json_schema(node: Any) -> Any:
    """Translates a CRD openAPIV3Schema so that jsonschema validates it the way the API server does.

    ``x-kubernetes-int-or-string`` becomes ``type: [integer, string]``; ``nullable`` admits null;
    an object schema that lists ``properties`` rejects other fields unless it carries
    ``x-kubernetes-preserve-unknown-fields``. List-type keywords stay for ``_list_map_keys`` /
    ``_list_set``.
    """
    if isinstance(node, list):
        return [structural_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: structural_to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf") and not isinstance(value, bool):
            out[key] = structural_to_json_schema(value)
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        if node.get("anyOf") == [{"type": "integer"}, {"type": "string"}]:
            del out["anyOf"]
        out["type"] = ["integer", "string"]
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-embedded-resource"):
        out.setdefault("properties", {}).update(
            {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}})
    if "properties" in out and not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


def _list_map_keys(validator: Any, keys: list[str], instance: Any, schema: dict[str, Any]) -> Iterator[jsonschema.ValidationError]:
    """``x-kubernetes-list-type: map``: no two items share their key fields (absent keys take their default)."""
    if not validator.is_type(instance, "array"):
        return
    item_props = schema.get("items", {}).get("properties", {})
    seen: dict[tuple[Any, ...], int] = {}
    for index, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k, item_props.get(k, {}).get("default")) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(f"items {seen[key]} and {index} share the key {dict(zip(keys, key))}")
        seen.setdefault(key, index)


def _list_set(validator: Any, list_type: str, instance: Any, schema: dict[str, Any]) -> Iterator[jsonschema.ValidationError]:
    if list_type == "set" and validator.is_type(instance, "array"):
        encoded = [json.dumps(item, sort_keys=True) for item in instance]
        if len(set(encoded)) != len(encoded):
            yield jsonschema.ValidationError(f"x-kubernetes-list-type set holds duplicates: {instance}")


KubeValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    {"x-kubernetes-list-map-keys": _list_map_keys, "x-kubernetes-list-type": _list_set})
FORMATS = jsonschema.FormatChecker(formats=())
FORMATS.checks("int32")(lambda v: not isinstance(v, int) or -(1 << 31) <= v < (1 << 31))
FORMATS.checks("int64")(lambda v: not isinstance(v, int) or -(1 << 63) <= v < (1 << 63))

DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def object_meta_schema(kind: str) -> dict[str, Any]:
    """The CRD says only ``metadata: {type: object}``; this is the part of ObjectMeta a manifest may set."""
    string_map = {"type": "object", "additionalProperties": {"type": "string"}}
    return {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
        "name": {"type": "string", "pattern": DNS1035_LABEL, "maxLength": MAX_NAME_LENGTH[kind]},
        "namespace": {"type": "string", "pattern": DNS1123_LABEL, "maxLength": 63},
        "labels": string_map, "annotations": string_map}}


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str) -> Any:
    path = CRD_DIR / CRD_FILES[kind]
    if not path.is_file():
        reason = (f"KubeRay CRD {path} not found: set {CRD_ENV} to a folder holding {', '.join(CRD_FILES.values())} "
                  "(KubeRay's config/crd/bases), or place them at ../shared/kuberay-crds")
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI must run these checks)")
        pytest.skip(reason)
    crd = yaml.load(path.read_text(), Loader=_LOADER)
    assert crd["spec"]["names"]["kind"] == kind, path
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = structural_to_json_schema(version["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)  # written by the operator, never by a manifest
    schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/v1"}
    schema["properties"]["kind"] = {"const": kind}
    schema["properties"]["metadata"] = object_meta_schema(kind)
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return KubeValidator(schema, format_checker=FORMATS)


def crd_errors(doc: dict[str, Any]) -> list[str]:
    errors = sorted(crd_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def core_errors(doc: dict[str, Any], version: str) -> list[str]:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path))}: {e.message}"]
    return []


# -- what a Ray resource holds ---------------------------------------------------------------

def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    spec = cluster_spec(doc)
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        yield "submitter", doc["spec"]["submitterPodTemplate"]


def ray_container(template: dict[str, Any]) -> dict[str, Any]:
    return template["spec"]["containers"][0]  # KubeRay's RayContainerIndex


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def workers(doc: dict[str, Any]) -> dict[str, Any]:
    (group,) = cluster_spec(doc)["workerGroupSpecs"]
    return group


_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))((?:[KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]+)?$")
_SUFFIXES = {"": 1.0, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
             **{s + "i": float(1 << (10 * (i + 1))) for i, s in enumerate("KMGTPE")}}


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ("12Gi", "500m", "1e3", 4) as a number of base units."""
    match = _QUANTITY.match(str(value))
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    number, suffix = match.groups()
    if suffix and suffix[0] in "eE":
        return float(number + suffix)
    return float(number) * _SUFFIXES[suffix or ""]


# -- the manifest set ------------------------------------------------------------------------

def test_k8s_directory_holds_every_deployment_path() -> None:
    kinds = {d["kind"] for _, d in MANIFESTS}
    assert {"RayCluster", "RayJob", "RayService", "PersistentVolumeClaim", "Secret", "Service"} <= kinds, kinds
    for path in K8S_DIR.glob("*.yaml"):
        assert path.read_text().startswith("#"), f"{path.name} should open with a comment saying its role"


# -- KubeRay CRDs ----------------------------------------------------------------------------

@pytest.mark.parametrize("doc", [d for _, d in RAY_DOCS], ids=_ids(RAY_DOCS))
def test_ray_resource_matches_kuberay_crd(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "ray.io/v1"
    assert crd_errors(doc) == []


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node: Any = doc
        for p in parents:
            node = node[p]
        node[last] = value
    return mutate


def _rename(path: str, new_key: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for p in parents:
            node = node[int(p) if p.isdigit() else p]
        node[new_key] = node.pop(last)
    return mutate


HEAD = "spec.headGroupSpec"
HEAD_CONTAINER = f"{HEAD}.template.spec.containers.0"
BROKEN_RAYCLUSTERS = {
    "misspelled rayStartParams": (_rename(f"{HEAD}.rayStartParams", "rayStartParam"), "rayStartParam"),
    "misspelled container field": (_rename(f"{HEAD_CONTAINER}.imagePullPolicy", "imagePullPolcy"), "imagePullPolcy"),
    "unknown top-level spec field": (_set("spec.workerGroups", []), "workerGroups"),
    "replicas as a string": (_set("spec.workerGroupSpecs.0.replicas", "2"), "is not of type 'integer'"),
    "rayStartParams value not a string": (_set(f"{HEAD}.rayStartParams.num-cpus", 0), "is not of type 'string'"),
    "int-or-string port as a list": (_set(f"{HEAD_CONTAINER}.readinessProbe.httpGet.port", [8000]),
                                     "is not of type 'integer', 'string'"),
    "malformed memory quantity": (_set(f"{HEAD_CONTAINER}.resources.limits.memory", "4 GB"), "does not match"),
    "duplicate env name": (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "SNIPER_MODEL", "value": "/other.gguf"}), "share the key"),
    "int32 out of range": (_set("spec.workerGroupSpecs.0.replicas", 1 << 40), "int32"),
    "name not a DNS-1035 label": (_set("metadata.name", "Sniper_Cluster"), "does not match"),
    "status written by hand": (_set("status", {"state": "ready"}), "status"),
}


@pytest.mark.parametrize("case", list(BROKEN_RAYCLUSTERS), ids=list(BROKEN_RAYCLUSTERS))
def test_crd_validator_rejects_broken_raycluster(case: str) -> None:
    mutate, expected = BROKEN_RAYCLUSTERS[case]
    doc = copy.deepcopy(_docs("RayCluster")[0][1])
    assert crd_errors(doc) == []
    mutate(doc)
    errors = crd_errors(doc)
    assert errors, f"{case}: the validator accepted it"
    assert any(expected in e for e in errors), errors


def test_structural_schema_translation() -> None:
    schema = structural_to_json_schema({"type": "object", "properties": {
        "port": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
        "strict": {"type": "object", "properties": {"a": {"type": "string"}}},
        "open": {"type": "object", "properties": {"a": {"type": "string"}}, "x-kubernetes-preserve-unknown-fields": True},
        "env": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                "items": {"type": "object", "properties": {"name": {"type": "string"}}}}}})
    validator = KubeValidator(schema, format_checker=FORMATS)
    assert validator.is_valid({"port": 8000}) and validator.is_valid({"port": "serve"})
    assert validator.is_valid({"open": {"a": "x", "b": 1}})
    assert not validator.is_valid({"strict": {"a": "x", "b": 1}})
    assert not validator.is_valid({"other": 1})
    assert not validator.is_valid({"env": [{"name": "A"}, {"name": "A"}]})


def test_named_probe_port_is_accepted() -> None:
    doc = copy.deepcopy(_docs("RayCluster")[0][1])
    _set(f"{HEAD_CONTAINER}.readinessProbe.httpGet.port", "serve")(doc)
    assert crd_errors(doc) == []


def kuberay_admission_errors(doc: dict[str, Any]) -> list[str]:
    """The rules KubeRay's operator checks beyond the schema (utils/validation.go), those that apply here."""
    errors = []
    spec = cluster_spec(doc)
    autoscaling = spec.get("enableInTreeAutoscaling", False)
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        if not group["template"]["spec"].get("containers"):
            errors.append(f"{name}: no container")
        params = group.get("rayStartParams", {})
        if group.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errors.append(f"{name}: resources set both in rayStartParams and in resources")
        if "labels" in params:
            errors.append(f"{name}: rayStartParams['labels'] is not supported")
        if name == "head":
            continue
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (low is None or high is None):
            errors.append(f"{name}: minReplicas and maxReplicas are required without autoscaling")
        elif low is not None and high is not None and not low <= group.get("replicas", low) <= high:
            errors.append(f"{name}: replicas outside [minReplicas, maxReplicas]")
    if doc["kind"] == "RayJob":
        job = doc["spec"]
        if job.get("suspend") and not job.get("shutdownAfterJobFinishes"):
            errors.append("a RayJob without shutdownAfterJobFinishes cannot be suspended")
        for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
            if field in job and job[field] <= 0:
                errors.append(f"{field} must be positive")
    return errors


@pytest.mark.parametrize("doc", [d for _, d in RAY_DOCS], ids=_ids(RAY_DOCS))
def test_ray_resource_passes_kuberay_admission_rules(doc: dict[str, Any]) -> None:
    assert kuberay_admission_errors(doc) == []


def test_admission_rules_reject_replicas_outside_bounds() -> None:
    doc = copy.deepcopy(_docs("RayCluster")[0][1])
    doc["spec"]["workerGroupSpecs"][0]["replicas"] = 5
    doc["spec"]["headGroupSpec"]["rayStartParams"]["labels"] = "a=b"
    assert len(kuberay_admission_errors(doc)) == 2


# -- core Kubernetes objects and pod templates -----------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("doc", [d for _, d in CORE_DOCS], ids=_ids(CORE_DOCS))
def test_core_object_is_valid_kubernetes(doc: dict[str, Any], version: str) -> None:
    assert core_errors(doc, version) == []


POD_TEMPLATES = [(f"{i}:{name}", t) for i, d in RAY_DOCS for name, t in pod_templates(d)]


def as_pod_template(template: dict[str, Any]) -> dict[str, Any]:
    """A KubeRay group template is a core PodTemplateSpec: wrap it in a v1 PodTemplate object."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("template", [t for _, t in POD_TEMPLATES], ids=_ids(POD_TEMPLATES))
def test_ray_pod_template_is_valid_kubernetes(template: dict[str, Any], version: str) -> None:
    assert core_errors(as_pod_template(template), version) == []


def test_core_validator_rejects_broken_objects() -> None:
    (_, pvc), = _docs("PersistentVolumeClaim")
    pvc = copy.deepcopy(pvc)
    pvc["spec"]["accessMode"] = pvc["spec"].pop("accessModes")
    assert core_errors(pvc, K8S_VERSIONS[0])
    template = copy.deepcopy(POD_TEMPLATES[0][1])
    template["spec"]["containers"][0]["ports"] = [{"containerPort": "8265"}]
    assert core_errors(as_pod_template(template), K8S_VERSIONS[0])
    template = copy.deepcopy(POD_TEMPLATES[0][1])
    template["spec"]["containers"][0]["volumeMount"] = []
    assert core_errors(as_pod_template(template), K8S_VERSIONS[0])


_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def test_labels_and_selectors_are_valid() -> None:
    maps = [d["metadata"].get("labels", {}) for _, d in MANIFESTS]
    maps += [t.get("metadata", {}).get("labels", {}) for _, t in POD_TEMPLATES]
    maps += [d["spec"]["selector"] for _, d in _docs("Service")]
    for labels in maps:
        for key, value in labels.items():
            prefix, _, name = key.rpartition("/")
            assert len(name) <= 63 and _LABEL_NAME.match(name), key
            assert not prefix or re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", prefix), key
            assert isinstance(value, str) and len(value) <= 63 and _LABEL_VALUE.match(value), (key, value)


# -- what the manifests say about this project ------------------------------------------------

def _dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert match, f"Dockerfile has no ARG {name}=..."
    return match.group(1).strip('"')


def test_every_pod_runs_the_project_image() -> None:
    pods = [t for _, t in POD_TEMPLATES] + [{"spec": d["spec"]} for _, d in _docs("Pod")]
    for template in pods:
        for container in template["spec"]["containers"]:
            assert container["image"] == IMAGE, container["name"]


def test_ray_version_is_the_one_in_the_image() -> None:
    from packaging.requirements import Requirement
    from packaging.version import Version

    ray_version = _dockerfile_arg("RAY_VERSION")
    for _, doc in RAY_DOCS:
        assert cluster_spec(doc)["rayVersion"] == ray_version, doc["metadata"]["name"]
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    deps = [Requirement(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    pins = {r.name: r.specifier for r in deps}
    assert Version(ray_version) in pins["ray"], f"RAY_VERSION {ray_version} outside pyproject's ray{pins['ray']}"
    llama = _dockerfile_arg("LLAMA_CPP_PYTHON_VERSION")
    assert Version(llama) in pins["llama-cpp-python"]
    assert f'"llama-cpp-python=={llama}"' in (REPO / "Makefile").read_text()


def test_dockerfile_installs_like_the_makefile() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert text.count("FROM python:3.11-slim-bookworm") == 1
    assert "wget" in text and "WORKDIR /app" in text
    llama, project = text.index("llama-cpp-python=="), text.index("pip install --no-build-isolation")
    assert llama < project, "llama-cpp-python must be installed before the project is built against it"
    assert not re.search(r"pip install[^\n]*\s-e\s", text), "the image installs the project, not an editable link"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "build", "models", "*.gguf", ".git"} <= set(ignored)


@pytest.mark.parametrize("doc", [d for _, d in RAY_DOCS], ids=_ids(RAY_DOCS))
def test_cluster_shape_keeps_one_node_actor_per_worker_pod(doc: dict[str, Any]) -> None:
    spec = cluster_spec(doc)
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "node actors must never land on the head"
    group = workers(doc)
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"], "a fixed set of nodes"
    assert spec.get("enableInTreeAutoscaling") is False
    anti = group["template"]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    labels = group["template"]["metadata"]["labels"]
    assert any(t["topologyKey"] == "kubernetes.io/hostname" and t["labelSelector"]["matchLabels"].items() <= labels.items()
               for t in anti), "two node actors on one host would share and evict one page cache"


@pytest.mark.parametrize("template", [t for _, t in POD_TEMPLATES], ids=_ids(POD_TEMPLATES))
def test_pod_mounts_the_model_read_only_and_names_the_cache(template: dict[str, Any]) -> None:
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    container = ray_container(template)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    model = volumes[mounts[MODEL_MOUNT]["name"]]
    assert model["persistentVolumeClaim"] == {"claimName": MODEL_CLAIM, "readOnly": True}
    assert mounts[MODEL_MOUNT].get("readOnly") is True
    shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    env = env_of(container)
    assert env["SNIPER_MODEL"].startswith(MODEL_MOUNT + "/") and env["SNIPER_MODEL"].endswith(".gguf")
    assert (env["SNIPER_CACHE_MB"] == "auto" or int(env["SNIPER_CACHE_MB"]) > 0) and env["SNIPER_NAMESPACE"] == "sniper"
    assert env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0", "pods reach each other over real IPs, not loopback"


@pytest.mark.parametrize("doc", [d for _, d in RAY_DOCS], ids=_ids(RAY_DOCS))
def test_pod_resources_cover_cache_budget_and_object_store(doc: dict[str, Any]) -> None:
    for name, template in pod_templates(doc):
        container = ray_container(template)
        res = container["resources"]
        assert res["requests"] == res["limits"], f"{name}: Guaranteed QoS, the budget relies on the memory being there"
        group = cluster_spec(doc)["headGroupSpec"] if name == "head" else workers(doc)
        store = int(group["rayStartParams"]["object-store-memory"])
        shm = [v["emptyDir"] for v in template["spec"]["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert quantity(shm[0]["sizeLimit"]) >= store, f"{name}: /dev/shm smaller than the object store"
    worker = ray_container(workers(doc)["template"])
    cache_mb = env_of(worker)["SNIPER_CACHE_MB"]
    limit = quantity(worker["resources"]["limits"]["memory"])
    if cache_mb == "auto":  # the budget is derived from this limit: leave room for a cache beside ~2 GiB of the rest
        assert limit >= 4 * GIB, "worker memory limit too small to give an auto budget room (k8s/raycluster.yaml)"
    else:
        assert limit >= int(cache_mb) * MIB + GIB, \
            "worker memory limit below cache budget + 1 GiB (see the sizing rule in k8s/raycluster.yaml)"


def test_quantity_parser() -> None:
    assert quantity("12Gi") == 12 * GIB and quantity("500m") == 0.5 and quantity(4) == 4
    assert quantity("1e3") == 1000 and quantity("1.5G") == 1.5e9
    with pytest.raises(ValueError):
        quantity("12 GiB")


def test_model_claim_can_be_mounted_by_many_pods() -> None:
    claims = {d["metadata"]["name"]: d for _, d in _docs("PersistentVolumeClaim")}
    modes = set(claims[MODEL_CLAIM]["spec"]["accessModes"])
    assert modes & {"ReadWriteMany", "ReadOnlyMany"}, "pods on several hosts mount the model at once"


def _http_get(probe: dict[str, Any] | None) -> dict[str, Any] | None:
    return (probe or {}).get("httpGet")


def test_raycluster_head_is_ready_only_when_gateway_is_healthy() -> None:
    for _, doc in _docs("RayCluster"):
        head = ray_container(doc["spec"]["headGroupSpec"]["template"])
        assert _http_get(head.get("readinessProbe")) == {"path": "/health", "port": SERVE_PORT}
        assert {"name": "serve", "containerPort": SERVE_PORT} in head["ports"]
        assert {"name": "dashboard", "containerPort": 8265} in head["ports"]


@pytest.mark.parametrize("doc", [d for _, d in _docs("RayJob") + _docs("RayService")],
                         ids=_ids(_docs("RayJob") + _docs("RayService")))
def test_no_gateway_readiness_probe_where_kuberay_waits_for_ready_pods(doc: dict[str, Any]) -> None:
    """KubeRay submits a RayJob once every pod is Ready and serveConfigV2 once the head is Ready.

    A probe on the gateway (which starts only after that submission) would wait forever
    (rayjob_controller.go: Status.State != Ready; rayservice_controller.go: reconcileServe).
    """
    for name, template in pod_templates(doc):
        for container in template["spec"]["containers"]:
            probe = _http_get(container.get("readinessProbe"))
            assert probe is None or probe["port"] not in (SERVE_PORT, "serve"), f"{name}: {probe}"


def test_http_service_selects_the_raycluster_head() -> None:
    (_, raycluster), = _docs("RayCluster")
    for _, service in _docs("Service"):
        assert service["spec"]["selector"] == {"ray.io/cluster": raycluster["metadata"]["name"], "ray.io/node-type": "head"}
        assert [p["targetPort"] for p in service["spec"]["ports"]] == [SERVE_PORT]


# -- RayService: the gateway's Serve config ---------------------------------------------------

def serve_config(doc: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


@pytest.mark.parametrize("doc", [d for _, d in _docs("RayService")], ids=_ids(_docs("RayService")))
def test_serve_config_deploys_the_gateway(doc: dict[str, Any]) -> None:
    from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    from cluster.routing import POLICY_NAMES

    def fields(model: Any) -> set[str]:
        return set(getattr(model, "model_fields", None) or model.__fields__)

    config = serve_config(doc)
    (getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj)(config)  # Ray's schema
    # it passes unknown keys over in silence: a misspelled one would simply be ignored
    assert set(config) <= fields(ServeDeploySchema), set(config) - fields(ServeDeploySchema)
    assert set(config.get("http_options", {})) <= fields(HTTPOptionsSchema)
    (app,) = config["applications"]
    assert set(app) <= fields(ServeApplicationSchema), set(app) - fields(ServeApplicationSchema)
    assert app["import_path"] == "cluster.api.gateway:build_app" and app["route_prefix"] == "/"
    args = app["args"]
    allowed = set(GATEWAY_ARGS)
    if (REPO / "cluster" / "api" / "gateway.py").is_file():
        from cluster.api.gateway import BUILD_ARGS

        allowed = set(BUILD_ARGS)
    assert set(args) <= allowed, f"unknown gateway args {set(args) - allowed}"
    assert "api_key" not in args, "the key comes from the Secret, never from the resource"
    assert args["policy"] in POLICY_NAMES
    worker = ray_container(workers(doc)["template"])
    assert args["model"] == env_of(worker)["SNIPER_MODEL"]
    assert str(args["cache_mb"]) == env_of(worker)["SNIPER_CACHE_MB"]
    assert 1 <= args["nodes"] <= workers(doc)["replicas"], "one node actor per worker pod"
    assert config["http_options"]["port"] == SERVE_PORT


def test_gateway_import_path_names_a_module_of_the_project() -> None:
    module, _, attribute = serve_config(_docs("RayService")[0][1])["applications"][0]["import_path"].partition(":")
    path = REPO / (module.replace(".", "/") + ".py")
    if not path.is_file():
        pytest.skip(f"{path.relative_to(REPO)} does not exist yet (the HTTP gateway is written separately)")
    assert re.search(rf"^def {attribute}\(", path.read_text(), re.M), f"{path.name} defines no {attribute}()"


def _api_key_pods() -> list[tuple[str, dict[str, Any]]]:
    """Where a gateway process may read SNIPER_API_KEY: with a RayService, its replicas on any pod;
    on the hand-run RayCluster, `serve --http` on the head (it hands the key to the replicas)."""
    pods = [(f"{i}:{name}", t) for i, d in _docs("RayService") for name, t in pod_templates(d)]
    return pods + [(f"{i}:head", d["spec"]["headGroupSpec"]["template"]) for i, d in _docs("RayCluster")]


@pytest.mark.parametrize("template", [t for _, t in _api_key_pods()], ids=_ids(_api_key_pods()))
def test_api_key_comes_from_the_secret(template: dict[str, Any]) -> None:
    secrets = {d["metadata"]["name"]: d for _, d in _docs("Secret")}
    ref = env_of(ray_container(template))["SNIPER_API_KEY"]["secretKeyRef"]
    assert ref == {"name": "sniper-api-key", "key": "api-key"}
    assert ref["key"] in secrets[ref["name"]]["stringData"]


# -- RayJob entrypoints ----------------------------------------------------------------------

_SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ">", ">>", "<", "(", ")"}


def _split_commands(text: str) -> list[list[str]]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in _SHELL_OPERATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def entrypoint_commands(entrypoint: str) -> list[list[str]]:
    """The commands a RayJob entrypoint runs, checked for how KubeRay hands it over.

    KubeRay pastes the entrypoint unquoted into the submitter's shell line
    (``ray job submit ... -- <entrypoint>``, ray-operator/controllers/ray/common/job.go), and
    ``ray job submit`` re-joins its arguments with ``subprocess.list2cmdline``: a sequence of
    commands must be one ``bash -c '...'`` whose body survives double quoting.
    """
    commands = _split_commands(entrypoint)
    assert len(commands) == 1, f"shell operators outside bash -c run in the submitter pod: {entrypoint!r}"
    (tokens,) = commands
    if tokens[:2] == ["bash", "-c"]:
        assert len(tokens) == 3, tokens
        assert not set(tokens[2]) & set('"\\$`'), "list2cmdline double-quotes the body: no \" \\ $ ` inside"
        return _split_commands(tokens[2])
    return [tokens]


def parse_cluster_command(tokens: list[str]) -> Any:
    """``python -m cluster ...`` parsed by the CLI's own parser; a flag that does not exist fails the test."""
    assert tokens[:3] == ["python", "-m", "cluster"], tokens
    try:
        return build_parser().parse_args(tokens[3:])
    except SystemExit:
        pytest.fail(f"`{shlex.join(tokens)}` is rejected by cluster.cli.main.build_parser")


@pytest.mark.parametrize("doc", [d for _, d in _docs("RayJob")], ids=_ids(_docs("RayJob")))
def test_rayjob_entrypoint_is_a_valid_cluster_command(doc: dict[str, Any]) -> None:
    commands = [parse_cluster_command(tokens) for tokens in entrypoint_commands(doc["spec"]["entrypoint"])]
    worker = ray_container(workers(doc)["template"])
    env = env_of(worker)
    serves = [args for args in commands if args.command == "serve"]
    assert serves, "the job deploys the service"
    for args in serves:
        assert args.model == env["SNIPER_MODEL"]
        assert str(args.cache_mb) == env["SNIPER_CACHE_MB"], "an explicit budget (or auto): the default is the whole model"
        assert 1 <= args.nodes <= workers(doc)["replicas"], "one node actor per worker pod"
        assert args.threads == quantity(worker["resources"]["limits"]["cpu"]), "compute threads = the pod's CPUs"
        assert args.namespace == env["SNIPER_NAMESPACE"]
    if commands[-1].command == "serve":
        assert doc["spec"].get("shutdownAfterJobFinishes") is False, \
            "serve returns at once; deleting the cluster after the job would remove the deployment"
    assert doc["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode"


@pytest.mark.parametrize("entrypoint", [
    "python -m cluster serve --modle /models/model.gguf",
    "python -m cluster serve --nodes two",
    "python -m cluster serve --model /models/m.gguf && python -m cluster status",
    "bash -c 'python -m cluster generate \"two words\"'",
])
def test_entrypoint_checks_reject_bad_commands(entrypoint: str) -> None:
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        for tokens in entrypoint_commands(entrypoint):
            parse_cluster_command(tokens)


def documented_cluster_commands(text: str) -> list[str]:
    """``python -m cluster ...`` command lines in prose, code blocks and YAML comments."""
    text = re.sub(r"\\\n[\s#]*", " ", text)  # shell line continuations, also inside YAML comments
    return [m.group(0).strip() for m in re.finditer(r"python -m cluster [^'\"`\n|;&)]*", text)]


DOCUMENTED = [REPO / "docs" / "deploy.md", *sorted(K8S_DIR.glob("*.yaml")), *sorted(RAY_CONFIGS.glob("*.yaml"))]


@pytest.mark.parametrize("path", DOCUMENTED, ids=[p.name for p in DOCUMENTED])
def test_documented_commands_parse(path: Path) -> None:
    commands = documented_cluster_commands(path.read_text())
    for command in commands:
        parse_cluster_command(shlex.split(command))
    if path.name in ("deploy.md", "raycluster.yaml", "local.yaml", "aws.yaml"):
        assert commands, f"{path.name} shows how to start the service"


# -- ray_configs: cluster launcher and runtime_env --------------------------------------------

def _ray_schema() -> dict[str, Any]:
    import ray

    with open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")) as f:
        return json.load(f)


def launcher_errors(config: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(_ray_schema())
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(config)]


LAUNCHER_CONFIGS = ["local.yaml", "aws.yaml"]


def _launcher(name: str) -> dict[str, Any]:
    return yaml.safe_load((RAY_CONFIGS / name).read_text())


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_cluster_launcher_config_is_valid(name: str) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _launcher(name)
    assert (RAY_CONFIGS / name).read_text().startswith("#")
    assert launcher_errors(config) == []
    prepared = prepare_config(config)  # what `ray up` does before it contacts any host
    validate_config(prepared)
    n_workers = sum(t.get("min_workers", 0) for t in prepared["available_node_types"].values())
    assert n_workers >= 2, "the commands in the header serve on 2 nodes"
    start = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in start and "--num-cpus=0" in start, "node actors must never land on the head"
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])
    assert any("make install" in c for c in config["setup_commands"])
    assert {".venv", "build", "models", "*.gguf", ".git"} <= set(config["rsync_exclude"])
    assert list(config["file_mounts"].values()) == ["."]


def test_local_config_lists_hosts_instead_of_node_types() -> None:
    config = _launcher("local.yaml")
    assert config["provider"]["type"] == "local" and "available_node_types" not in config
    assert config["provider"]["head_ip"] not in config["provider"]["worker_ips"]


def test_aws_head_gets_no_cpus() -> None:
    config = _launcher("aws.yaml")
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}


@pytest.mark.parametrize("mutate", [
    lambda c: c["auth"].update(ssh_usr=c["auth"].pop("ssh_user")),
    lambda c: c.pop("provider"),
    lambda c: c.update(setup_commands="make install"),
    lambda c: c.update(head_start_ray_command=c.pop("head_start_ray_commands")),
], ids=["misspelled auth field", "no provider", "commands not a list", "misspelled top-level field"])
def test_launcher_schema_rejects_broken_config(mutate: Callable[[dict[str, Any]], None]) -> None:
    config = _launcher("local.yaml")
    mutate(config)
    assert launcher_errors(config)


def test_launcher_schema_rejects_string_resources() -> None:
    config = _launcher("aws.yaml")
    config["available_node_types"]["sniper_node"]["resources"]["CPU"] = "4"
    assert launcher_errors(config)


def _runtime_env() -> dict[str, Any]:
    return yaml.safe_load((RAY_CONFIGS / "runtime_env.yaml").read_text())


def runtime_env_problems(data: dict[str, Any]) -> list[str]:
    from ray.runtime_env import RuntimeEnv

    unknown = set(data) - set(RuntimeEnv.known_fields)  # RuntimeEnv passes unknown keys on to plugins
    problems = [f"unknown runtime_env fields {sorted(unknown)}"] if unknown else []
    try:
        RuntimeEnv(**data)
    except (TypeError, ValueError) as e:
        problems.append(str(e))
    return problems


def test_runtime_env_is_accepted_by_ray() -> None:
    data = _runtime_env()
    assert runtime_env_problems(data) == []
    assert data["working_dir"] == "."
    assert all(isinstance(v, str) for v in data["env_vars"].values())
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in data["env_vars"]


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(exclude=d.pop("excludes")),
    lambda d: d.update(excludes=".venv/"),
    lambda d: d["env_vars"].update(PYTHONUNBUFFERED=1),
], ids=["misspelled field", "excludes not a list", "env value not a string"])
def test_runtime_env_checks_reject_broken_env(mutate: Callable[[dict[str, Any]], None]) -> None:
    data = _runtime_env()
    mutate(data)
    assert runtime_env_problems(data)


def test_runtime_env_upload_leaves_out_environment_build_and_models(tmp_path: Path) -> None:
    """The files Ray would upload from a checkout, computed with Ray's own exclude matching."""
    packaging = pytest.importorskip("ray._private.runtime_env.packaging")
    if not hasattr(packaging, "_dir_travel") or not hasattr(packaging, "_get_excludes"):
        pytest.skip("this Ray has no ray._private.runtime_env.packaging._dir_travel/_get_excludes")
    for rel in [".venv/bin/python", ".venv/lib/x.py", "build/cp311/_native.so", "models/demo.gguf", "big.gguf",
                ".git/HEAD", "cluster/__init__.py", "cluster/cli/main.py",
                "cluster/_native.cpython-311-x86_64-linux-gnu.so", "csrc/cache-core.cpp", "tests/__pycache__/t.pyc",
                "prompts.jsonl", "docs/routing.md", "README.md"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    uploaded: list[str] = []
    excludes = [packaging._get_excludes(tmp_path, _runtime_env()["excludes"])]
    packaging._dir_travel(tmp_path, excludes, lambda p: p.is_file() and uploaded.append(p.relative_to(tmp_path).as_posix()),
                          include_gitignore=False)
    assert sorted(uploaded) == ["README.md", "cluster/__init__.py", "cluster/cli/main.py", "docs/routing.md", "prompts.jsonl"]
