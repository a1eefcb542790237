"""Cluster manifests, the kustomization, the launcher YAML, the image and the job configs, checked without a cluster.

- KubeRay objects (RayCluster, RayJob, RayCronJob) validate against KubeRay's own CRD schemas, vendored from the
  v1.7.0 release under tests/crds/ (tests/crds/README.md): each `openAPIV3Schema` becomes a JSON Schema in which an
  object with `properties` refuses unknown fields, as `kubectl apply` (strict field validation) does.
- Kubernetes core objects (CronJob, ServiceAccount, Role, RoleBinding, ConfigMap) go through the official
  `kubernetes` client's models: unknown fields and wrong types are errors, then the models enforce required fields.
- `kubectl kustomize cluster/` (when kubectl is installed) builds what a user applies; that output is validated too.
- The cluster launcher YAML validates against the ray-schema.json of the installed Ray wheel and Ray's own
  `fillout_defaults` + `validate_config`, plus what a schema cannot see: the AMI's NVIDIA driver against the torch
  build that the setup commands install, and an instance profile on every node type (all of them touch S3).
- Every job config loads through `pipeline.config.load_config`, every entrypoint resolves through cluster/run-job.sh
  to a config that loads, and the plan of each (pipeline.placement) fits the worker groups that run it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes.client.models as k8s_models
import pytest
import ray
import yaml
from kubernetes.client import ApiClient

from pipeline.audit import parse_thresholds
from pipeline.config import load_config
from pipeline.placement import check_placement, plan_demand

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CONFIGS = REPO / "jobs" / "configs"
CRDS = Path(__file__).resolve().parent / "crds"
LAUNCHER = CLUSTER / "cluster-launcher-aws.yaml"
KUSTOMIZATION = CLUSTER / "kustomization.yaml"
CLUSTER_YAMLS = sorted(CLUSTER.glob("*.yaml"))
K8S_YAMLS = [p for p in CLUSTER_YAMLS if p not in (LAUNCHER, KUSTOMIZATION)]
RUN_JOB = "/home/ray/bbpurify/cluster/run-job.sh"  # where cluster/Dockerfile puts cluster/run-job.sh
RUN_ID = "20261125-030000"
IMAGE_PLACEHOLDER = "REGISTRY/bbpurify:0.1.0"
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed (it bundles kustomize)")

CORE_KINDS = {
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding",
    ("batch/v1", "CronJob"): "V1CronJob",
}
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}


# ---------------------------------------------------------------------------------------------------------------
# KubeRay CRDs -> JSON Schema
# ---------------------------------------------------------------------------------------------------------------

_COPIED = ("enum", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
           "minItems", "maxItems", "minProperties", "maxProperties", "required", "format")


def crd_to_json_schema(node: dict) -> dict:
    """One structural OpenAPI v3 schema node of a CRD -> JSON Schema (draft 7).

    An object with `properties` and no `x-kubernetes-preserve-unknown-fields` refuses other fields; an object with
    neither (e.g. a free-form `metadata` at the top) takes anything. `x-kubernetes-int-or-string` is an integer or a
    string; `nullable` adds null. CEL rules (`x-kubernetes-validations`) are not evaluated."""
    out: dict[str, Any] = {k: node[k] for k in _COPIED if k in node}
    nullable = node.get("nullable", False)
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"] + (["null"] if nullable else [])
    elif "type" in node:
        out["type"] = [node["type"], "null"] if nullable else node["type"]
    if nullable and "enum" in out:
        out["enum"] = [*out["enum"], None]
    if "properties" in node:
        out["properties"] = {k: crd_to_json_schema(v) for k, v in node["properties"].items()}
    if "items" in node:
        out["items"] = crd_to_json_schema(node["items"])
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        out["additionalProperties"] = crd_to_json_schema(extra)
    elif isinstance(extra, bool):
        out["additionalProperties"] = extra
    elif "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    for combinator in ("allOf", "anyOf", "oneOf"):
        if combinator in node:
            out[combinator] = [crd_to_json_schema(s) for s in node[combinator]]
    if "not" in node:
        out["not"] = crd_to_json_schema(node["not"])
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.load((CRDS / CRD_FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"] and version["storage"]
    schema = crd_to_json_schema(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def validate_ray(obj: dict, where: str) -> None:
    """A KubeRay object as the API server with KubeRay 1.7's CRDs would take it (strict field validation)."""
    assert obj.get("apiVersion") == "ray.io/v1", f"{where}: apiVersion must be ray.io/v1"
    assert obj.get("kind") in CRD_FILES, f"{where}: unexpected kind {obj.get('kind')}"
    errors = [f"{where}.{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
              for e in crd_validator(obj["kind"]).iter_errors(obj)]
    assert not errors, "\n".join(errors[:20])
    validate_k8s(obj.get("metadata") or {}, "V1ObjectMeta", f"{where}.metadata")
    assert obj.get("metadata", {}).get("name"), f"{where}: metadata.name required"


# ---------------------------------------------------------------------------------------------------------------
# Kubernetes core objects: the client's models
# ---------------------------------------------------------------------------------------------------------------

_PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "datetime": (str,), "date": (str,),
}


def _k8s_walk(value: Any, type_name: str, path: str, errors: list[str]) -> None:
    if value is None:  # an explicit null is an unset optional field (kubectl itself writes creationTimestamp: null)
        return
    if type_name.startswith("list["):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list ({type_name}), got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _k8s_walk(item, type_name[5:-1], f"{path}[{i}]", errors)
        return
    m = re.fullmatch(r"dict[\[(]\s*str,\s*(.+)[\])]", type_name)
    if m:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping ({type_name}), got {type(value).__name__}")
            return
        for k, v in value.items():
            _k8s_walk(v, m.group(1), f"{path}.{k}", errors)
        return
    if type_name == "object":
        return
    if type_name in _PRIMITIVES:
        ok = isinstance(value, _PRIMITIVES[type_name]) and not (type_name != "bool" and isinstance(value, bool))
        if not ok:
            errors.append(f"{path}: expected {type_name}, got {type(value).__name__} {value!r}")
        return
    cls = getattr(k8s_models, type_name)
    if not isinstance(value, dict):
        errors.append(f"{path}: expected an object ({type_name}), got {type(value).__name__}")
        return
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    for key, v in value.items():
        if key not in by_json:
            errors.append(f"{path}.{key}: unknown field for {type_name}")
        else:
            _k8s_walk(v, cls.openapi_types[by_json[key]], f"{path}.{key}", errors)


def validate_k8s(data: Any, type_name: str, path: str) -> None:
    """Unknown fields / wrong types (our walk), then required fields (the client's own model constructors)."""
    errors: list[str] = []
    _k8s_walk(data, type_name, path, errors)
    assert not errors, "\n".join(errors)
    ApiClient()._ApiClient__deserialize(data, type_name)  # raises ValueError on a missing required field


def validate_doc(doc: dict, where: str) -> None:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CORE_KINDS:
        validate_k8s(doc, CORE_KINDS[key], where)
    elif doc.get("kind") in CRD_FILES:
        validate_ray(doc, where)
    else:
        pytest.fail(f"{where}: {key} is not a kind this test knows how to validate")


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def copy(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_docs() -> list[tuple[str, dict]]:
    return [(f"{p.name}#{i}", d) for p in K8S_YAMLS for i, d in enumerate(load_docs(p))]


def find(kind: str, file: str | None = None) -> list[dict]:
    return [d for name, d in all_docs() if d.get("kind") == kind and (file is None or name.startswith(file))]


def audit_template(image: str = IMAGE_PLACEHOLDER) -> dict:
    cm = next(d for d in find("ConfigMap", "audit-cronjob.yaml") if d["metadata"]["name"] == "bbpurify-audit-template")
    return yaml.safe_load(cm["data"]["rayjob.yaml"].replace("__RUN_ID__", RUN_ID).replace("__IMAGE__", image))


def rayjob_specs() -> list[tuple[str, dict]]:
    """Every RayJob spec we ship, wherever it is embedded."""
    out = [("rayjob-sanitize.yaml", d["spec"]) for d in find("RayJob")]
    out += [("raycronjob-audit.yaml", d["spec"]["jobTemplate"]) for d in find("RayCronJob")]
    out.append(("audit-cronjob.yaml template", audit_template()["spec"]))
    return out


def ray_cluster_specs() -> list[tuple[str, dict]]:
    return [("raycluster.yaml", d["spec"]) for d in find("RayCluster")] + [
        (where, spec["rayClusterSpec"]) for where, spec in rayjob_specs()]


def pod_specs(cluster_spec: dict) -> list[tuple[str, dict]]:
    pods = [("head", cluster_spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in cluster_spec.get("workerGroupSpecs", [])]
    return pods


def _quantity(value: Any) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def ray_resources(group: dict) -> dict[str, float]:
    """What KubeRay makes `ray start` advertise for a group: rayStartParams, else the Ray container's limits."""
    params = group.get("rayStartParams") or {}
    res = group["template"]["spec"]["containers"][0].get("resources", {})
    limits = {**res.get("requests", {}), **res.get("limits", {})}
    cpu = params.get("num-cpus", limits.get("cpu", 0))
    gpu = params.get("num-gpus", limits.get("nvidia.com/gpu", 0))
    return {"CPU": _quantity(cpu), "GPU": _quantity(gpu)}


def dockerfile_arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert m, f"cluster/Dockerfile has no ARG {name}=..."
    return m.group(1).strip('"')


def kustomize_settings() -> dict[str, str]:
    (gen,) = [g for g in yaml.safe_load(KUSTOMIZATION.read_text())["configMapGenerator"]
              if g["name"] == "bbpurify-settings"]
    return dict(lit.split("=", 1) for lit in gen["literals"])


FAKE_PYTHON = r'''#!{python}
"""Stands in for `python` on the head: records the argv run-job.sh ends with."""
import json, os, sys
with open(os.environ["FAKE_ARGV"], "w") as f:
    json.dump(sys.argv[1:], f)
'''


def resolve_entrypoint(entrypoint: str, tmp_path: Path, env: dict[str, str]
                       ) -> tuple[str, list[str], dict[str, str]]:
    """Run an entrypoint as the head would (through a shell, cluster/run-job.sh from this checkout, the config from
    the ConfigMap), with a stand-in `python` that records its argv: -> (verb, overrides, --options)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    config = tmp_path / "cluster.yaml"
    config.write_text(configmap_file("/configs/cluster.yaml"))
    assert RUN_JOB in entrypoint, f"entrypoint {entrypoint!r} does not run {RUN_JOB}"
    script = entrypoint.replace(RUN_JOB, str(CLUSTER / "run-job.sh"))
    argv_file = tmp_path / "argv.json"
    full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_ARGV": str(argv_file),
                "BBPURIFY_CONFIG": str(config), **env}
    proc = subprocess.run(["sh", "-c", script], env=full_env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(argv_file.read_text())
    assert argv[:2] == ["-m", "pipeline"] and argv[3] == "--config" and argv[4] == str(config), argv
    rest, options, overrides = argv[5:], {}, []
    while rest:
        if rest[0].startswith("--"):
            options[rest[0]], rest = rest[1], rest[2:]
        else:
            overrides.append(rest.pop(0))
    return argv[2], overrides, options


def configmap_file(mount_path: str) -> str:
    """/configs/cluster.yaml -> the text of that key in the bbpurify-configs ConfigMap."""
    assert mount_path.startswith("/configs/"), mount_path
    (cm,) = [d for d in find("ConfigMap", "configmap.yaml") if d["metadata"]["name"] == "bbpurify-configs"]
    return cm["data"][mount_path.removeprefix("/configs/")]


# ---------------------------------------------------------------------------------------------------------------
# Every file validates
# ---------------------------------------------------------------------------------------------------------------


def test_cluster_dir_has_the_expected_files() -> None:
    names = {p.name for p in CLUSTER.iterdir()}
    expected = {
        "Dockerfile", "README.md", "kustomization.yaml", "serviceaccount.yaml", "configmap.yaml", "raycluster.yaml",
        "rayjob-sanitize.yaml", "audit-cronjob.yaml", "raycronjob-audit.yaml", "cluster-launcher-aws.yaml",
        "run-job.sh", "prefetch_models.py",
    }
    assert expected <= names, expected - names


def test_vendored_crds_are_kuberay_v1_7() -> None:
    readme = (CRDS / "README.md").read_text()
    assert "v1.7.0" in readme and "github.com/ray-project/kuberay" in readme
    for name in CRD_FILES.values():
        digest = hashlib.sha256((CRDS / name).read_bytes()).hexdigest()
        assert f"{digest}  {name}" in readme, f"{name} differs from the copy the README records"
    for kind in CRD_FILES:
        crd_validator(kind)  # converts, and the result is a valid draft-7 schema


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_every_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{path.name} is empty or not mappings"


@pytest.mark.parametrize("path", K8S_YAMLS, ids=lambda p: p.name)
def test_kubernetes_objects_validate(path: Path) -> None:
    for i, doc in enumerate(load_docs(path)):
        validate_doc(doc, f"{path.name}#{i}")


def test_audit_template_validates() -> None:
    validate_ray(audit_template(), "audit template")


def test_validators_catch_mistakes_and_accept_valid_fields() -> None:
    """Each mistake below was accepted by hand-written field lists (or valid fields refused); the CRDs decide."""
    (job,) = find("RayJob", "rayjob-sanitize.yaml")
    (rc,) = find("RayCluster")

    def rejects(obj: dict, match: str) -> None:
        with pytest.raises(AssertionError, match=match):
            validate_ray(obj, "mutated")

    bad = copy(job)
    bad["spec"]["schedule"] = "0 3 * * *"  # RayJob has no schedule (RayCronJob has)
    rejects(bad, "'schedule' was unexpected")
    bad = copy(job)
    bad["spec"]["deletionStrategy"] = {"onSucess": {"policy": "DeleteCluster"}}
    rejects(bad, "'onSucess' was unexpected")
    bad = copy(job)
    bad["spec"]["submitterConfig"] = {"backoffLimitt": 2}
    rejects(bad, "'backoffLimitt' was unexpected")
    bad = copy(rc)
    bad["spec"]["gcsFaultToleranceOptions"] = {"redisAdress": "redis:6379"}
    rejects(bad, "'redisAdress' was unexpected")
    bad = copy(rc)
    bad["spec"]["workerGroupSpecs"][0]["template"]["metadata"]["generateName"] = "gpu-"
    rejects(bad, "'generateName' was unexpected")
    bad = copy(rc)
    bad["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["volumeMount"] = []
    rejects(bad, "'volumeMount' was unexpected")
    bad = copy(rc)
    bad["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0  # map[string]string
    rejects(bad, "0 is not of type 'string'")
    bad = copy(rc)
    del bad["spec"]["workerGroupSpecs"][0]["groupName"]
    rejects(bad, "'groupName' is a required property")

    good = copy(job)
    good["spec"]["preRunningDeadlineSeconds"] = 1800
    good["spec"]["submitterConfig"] = {"backoffLimit": 2}
    good["spec"]["deletionStrategy"] = {"onSuccess": {"policy": "DeleteCluster"},
                                        "onFailure": {"policy": "DeleteNone"}}
    group = good["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["labels"] = {"accelerator": "a10g"}
    group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 8  # int-or-string
    good["spec"]["rayClusterSpec"]["gcsFaultToleranceOptions"] = {"redisAddress": "redis:6379"}
    validate_ray(good, "valid")

    cron = copy(find("CronJob")[0])
    cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] = 10
    with pytest.raises(AssertionError, match="expected str"):
        validate_k8s(cron, "V1CronJob", "env")
    cron = copy(find("CronJob")[0])
    del cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(ValueError, match="name"):
        validate_k8s(cron, "V1CronJob", "noname")


# ---------------------------------------------------------------------------------------------------------------
# The Ray clusters and jobs we ship
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where,spec", ray_cluster_specs(), ids=[w for w, _ in ray_cluster_specs()])
def test_ray_cluster_shape(where: str, spec: dict) -> None:
    # Same Ray everywhere: KubeRay's rayVersion, the image's base, and the Ray this project is tested with.
    assert spec["rayVersion"] == dockerfile_arg("RAY_VERSION") == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True

    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0" and head["rayStartParams"].get("num-cpus") == "0"
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    assert any(ray_resources(g)["GPU"] > 0 for g in groups), "a GPU worker group is required"
    assert any(ray_resources(g)["GPU"] == 0 and ray_resources(g)["CPU"] >= 1 for g in groups), "a CPU group too"
    for g in groups:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]
        if ray_resources(g)["GPU"] > 0:
            assert g["minReplicas"] == 0, "GPU workers scale from zero"
            res = g["template"]["spec"]["containers"][0]["resources"]
            assert res["limits"]["nvidia.com/gpu"] == res.get("requests", res["limits"])["nvidia.com/gpu"]

    images = {c["image"] for _, pod in pod_specs(spec) for c in pod["containers"]}
    assert images == {IMAGE_PLACEHOLDER}, f"every Ray pod runs the image kustomize overrides: {images}"

    for name, pod in pod_specs(spec):
        # IRSA / Pod Identity bind a role to a ServiceAccount; a private registry needs the pull Secret. KubeRay
        # binds its autoscaler's Role (pods, RayClusters) to the head's: the workers run without it.
        account = "bbpurify" if name == "head" else "bbpurify-worker"
        assert pod.get("serviceAccountName") == account, f"{where} {name}: serviceAccountName"
        assert {"name": "bbpurify-registry"} in pod.get("imagePullSecrets", []), f"{where} {name}: imagePullSecrets"
        for c in pod["containers"]:
            assert {"configMapRef": {"name": "bbpurify-settings", "optional": True}} in c.get("envFrom", [])
            env = {e["name"]: e for e in c.get("env", [])}
            for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "BB_TOKEN"):
                assert env[var]["valueFrom"]["secretKeyRef"]["name"], f"{where} {name}: {var} from a Secret"
            for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # absent with IRSA: the pod must still start
                assert env[var]["valueFrom"]["secretKeyRef"].get("optional") is True
            for e in c.get("env", []):
                if re.search(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY", e["name"]):
                    assert "value" not in e, f"{where} {name}: {e['name']} is a literal; use secretKeyRef"

    head_pod = head["template"]["spec"]
    vols = {v["name"]: v for v in head_pod.get("volumes", [])}
    mounts = [m for c in head_pod["containers"] for m in c.get("volumeMounts", []) if m["mountPath"] == "/configs"]
    assert mounts and vols[mounts[0]["name"]]["configMap"]["name"] == "bbpurify-configs", where


@pytest.mark.parametrize("where,spec", rayjob_specs(), ids=[w for w, _ in rayjob_specs()])
def test_rayjob_submitter_runs_as_the_service_account(where: str, spec: dict) -> None:
    pod = spec["submitterPodTemplate"]["spec"]
    assert pod["serviceAccountName"] == "bbpurify-worker"  # it reaches the head's dashboard, not the Kubernetes API
    assert {"name": "bbpurify-registry"} in pod["imagePullSecrets"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    head_image = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert container["image"] == head_image, "the submitter runs `ray job submit`: the same Ray as the head"
    assert spec["submissionMode"] == "K8sJobMode" and spec["shutdownAfterJobFinishes"] is True


def test_service_account_is_shipped() -> None:
    accounts = find("ServiceAccount", "serviceaccount.yaml")
    assert [sa["metadata"]["name"] for sa in accounts] == ["bbpurify", "bbpurify-worker"]


def test_rayjob_sanitize(tmp_path: Path) -> None:
    (job,) = find("RayJob", "rayjob-sanitize.yaml")
    spec = job["spec"]
    assert spec["ttlSecondsAfterFinished"] >= 0 and spec["activeDeadlineSeconds"] > 0
    assert spec["backoffLimit"] >= 1, "retries are what checkpointed resume is for"
    settings = kustomize_settings()
    verb, overrides, _ = resolve_entrypoint(spec["entrypoint"], tmp_path, settings)
    assert verb == "sanitize"
    cfg = load_config(tmp_path / "cluster.yaml", overrides)
    data = settings["BBPURIFY_DATA"].rstrip("/")
    assert cfg.source.uri == f"{data}/shards/" and cfg.output.uri == f"{data}/sanitized/"
    assert cfg.blackbox.uri == settings["BBPURIFY_BLACKBOX_URI"]
    assert cfg.output.resume is True


def test_run_job_defaults_are_the_config_and_bad_input_is_refused(tmp_path: Path) -> None:
    """Without settings (the Ray cluster launcher, a plain `kubectl apply -f`) the config's own values apply."""
    _, overrides, _ = resolve_entrypoint(f"sh {RUN_JOB} sanitize", tmp_path, {})
    cfg = load_config(tmp_path / "cluster.yaml", overrides)
    plain = load_config(CONFIGS / "cluster.yaml")
    assert (cfg.source.uri, cfg.output.uri, cfg.blackbox.uri) == (plain.source.uri, plain.output.uri,
                                                                   plain.blackbox.uri)
    for args, env, match in ((["nope"], {}, "unknown verb"), ([], {}, "usage"),
                             (["sanitize"], {"BBPURIFY_DATA": "bbpurify-data"}, "must be s3://")):
        proc = subprocess.run(["sh", str(CLUSTER / "run-job.sh"), *args], capture_output=True, text=True,
                              env={"PATH": os.environ["PATH"], **env}, timeout=30)
        assert proc.returncode == 2 and match in proc.stderr


def test_configmap_matches_cluster_yaml() -> None:
    assert configmap_file("/configs/cluster.yaml") == (CONFIGS / "cluster.yaml").read_text(), (
        "cluster/configmap.yaml drifted from jobs/configs/cluster.yaml; regenerate it (cluster/README.md)")


@needs_kubectl
def test_readme_configmap_command_yields_the_shipped_file(tmp_path: Path) -> None:
    """The regeneration command of cluster/README.md, run as written: its output is the file we ship, and valid."""
    readme = (CLUSTER / "README.md").read_text()
    m = re.search(r"^(kubectl create configmap bbpurify-configs .*?)\s*>\s*cluster/configmap\.yaml$", readme,
                  re.M | re.S)
    assert m, "cluster/README.md lost its ConfigMap regeneration command"
    cmd = m.group(1).replace("\\\n", " ")
    out = subprocess.run(["sh", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout
    assert out == (CLUSTER / "configmap.yaml").read_text()
    (doc,) = yaml.safe_load_all(out)
    validate_doc(doc, "regenerated configmap")


# ---------------------------------------------------------------------------------------------------------------
# GPU sizing: what each shipped job config asks for vs the worker groups that run it
# ---------------------------------------------------------------------------------------------------------------


def _entrypoint_configs(tmp_path: Path) -> list[tuple[str, Any, dict]]:
    """(where, job config as the head resolves it, the Ray cluster spec it runs on) for every job we ship."""
    out = []
    settings = kustomize_settings()
    for i, (where, spec) in enumerate(rayjob_specs()):
        sub = tmp_path / f"job{i}"
        sub.mkdir()
        entry = re.sub(r"\$\(date[^)]*\)", RUN_ID, spec["entrypoint"])
        _, overrides, _ = resolve_entrypoint(entry, sub, settings)
        out.append((where, load_config(sub / "cluster.yaml", overrides), spec["rayClusterSpec"]))
    # The long-lived RayCluster runs what README section 5 submits: the sanitize job as configured.
    for where, spec in [(w, s) for w, s in ray_cluster_specs() if w == "raycluster.yaml"]:
        out.append((where, load_config(CONFIGS / "cluster.yaml"), spec))
    return out


def test_every_shipped_plan_fits_its_worker_groups(tmp_path: Path) -> None:
    for where, cfg, spec in _entrypoint_configs(tmp_path):
        head = ray_resources(spec["headGroupSpec"])
        assert head == {"CPU": 0.0, "GPU": 0.0}, where
        demand = plan_demand(cfg, cluster_has_gpus=True)
        # Every actor asks for something: a 0-CPU, 0-GPU actor may land on the 0-CPU head, which runs the driver.
        assert demand.gpus_per_purifier > 0, f"{where}: purifiers need a GPU on a GPU cluster"
        assert demand.cpus_per_blackbox > 0, f"{where}: black-box actors with 0 CPUs land on the head"
        groups = [(ray_resources(g), g["maxReplicas"]) for g in spec["workerGroupSpecs"]]
        gpus = sum(shape["GPU"] * n for shape, n in groups)
        assert demand.gpus <= gpus, (
            f"{where}: {demand.describe()} asks for {demand.gpus:g} GPUs, the GPU groups can have {gpus:g}")
        # Every purifier and black-box actor fits on the workers alone (first-fit over maxReplicas pods).
        check_placement(demand, nodes=[head], can_add=groups, min_purifiers=demand.purifiers)


def test_launcher_fits_the_cluster_config() -> None:
    launcher = yaml.safe_load(LAUNCHER.read_text())
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    workers = [({k: float(v) for k, v in t["resources"].items()}, t["max_workers"])
               for name, t in types.items() if name != launcher["head_node_type"]]
    demand = plan_demand(load_config(CONFIGS / "cluster.yaml"), cluster_has_gpus=True)
    assert demand.cpus_per_blackbox > 0
    assert demand.gpus <= sum(s.get("GPU", 0) * n for s, n in workers)
    check_placement(demand, nodes=[{k: float(v) for k, v in head["resources"].items()}], can_add=workers,
                    min_purifiers=demand.purifiers)


# ---------------------------------------------------------------------------------------------------------------
# Scheduled audits
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["audit-cronjob.yaml template", "raycronjob-audit.yaml"])
def test_scheduled_audit_has_thresholds_and_a_trend(where: str, tmp_path: Path) -> None:
    """A scheduled audit that crosses a threshold must fail, and compare itself with the previous run's report."""
    spec = dict(rayjob_specs())[where]
    assert spec["backoffLimit"] == 0
    settings = kustomize_settings()
    verb, overrides, options = resolve_entrypoint(spec["entrypoint"], tmp_path,
                                                  {**settings, "BBPURIFY_RUN_ID": RUN_ID})
    assert verb == "audit"
    # a long-lived head runs many audits: each its own local report folder (the audit refuses one in use)
    assert options == {"--report": f"out/audit-report/{RUN_ID}"}
    cfg = load_config(tmp_path / "cluster.yaml", overrides)
    thresholds = parse_thresholds(cfg.audit.thresholds).as_dict()
    assert {"max_class_replaced_rate", "max_error_rate", "min_rows", "max_flip_rate_increase"} <= set(thresholds)
    data = settings["BBPURIFY_DATA"].rstrip("/")
    assert cfg.output.uri == f"{data}/audits/{RUN_ID}/", "each audit writes under its own prefix"
    latest = f"{data}/audits/latest/report.json"
    assert cfg.audit.previous == cfg.audit.publish_latest == latest
    assert not latest.startswith(cfg.output.uri)
    assert cfg.audit.sample and cfg.source.uri == f"{data}/shards/"
    # run_audit turns these on whatever the config says; the entrypoint need not.
    assert cfg.resources.max_purify_actors == 2


def test_cluster_readme_states_how_an_audit_fails() -> None:
    readme = (CLUSTER / "README.md").read_text()
    assert "audit.thresholds" in readme and "audits/latest/report.json" in readme


def test_audit_cronjob_rbac_and_policy() -> None:
    (cron,) = find("CronJob", "audit-cronjob.yaml")
    (sa,) = [d for d in find("ServiceAccount", "audit-cronjob.yaml")]
    (role,) = find("Role", "audit-cronjob.yaml")
    (binding,) = find("RoleBinding", "audit-cronjob.yaml")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid" and len(spec["schedule"].split()) == 5
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0
    pod = job["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"] and pod["restartPolicy"] == "Never"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert {"kind": "ServiceAccount", "name": sa["metadata"]["name"]} in binding["subjects"]
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert {"create", "get"} <= set(rule["verbs"])
    vols = {v["name"]: v for v in pod["volumes"]}
    (container,) = pod["containers"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/template")
    assert vols[mount["name"]]["configMap"]["name"] == "bbpurify-audit-template"
    script = container["args"][0]
    assert "/template/rayjob.yaml" in script and "kubectl create" in script
    check = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


FAKE_KUBECTL = r'''#!{python}
"""Stands in for kubectl: answers from env vars, records what it was asked to create and delete."""
import os, sys
from pathlib import Path
state = Path(os.environ["FAKE_STATE"])
args = sys.argv[1:]
if args[:2] == ["create", "-f"]:
    (state / "created.yaml").write_text(sys.stdin.read())
    print("rayjob.ray.io/created")
elif args[:2] == ["get", "rayjobs"] and "--sort-by=.metadata.creationTimestamp" in args:
    print("\n".join(f"rayjob.ray.io/bbpurify-audit-{{i:02d}}" for i in range(12)))
elif args[:2] == ["get", "rayjobs"] and any("bbpurify.io/scheduled-by=" in a for a in args):
    (state / "own-asked").write_text(" ".join(args))
    own = os.environ.get("FAKE_OWN", "")
    print(f"rayjob.ray.io/{{own}}" if own else "", end="")
elif args[:2] == ["get", "rayjobs"]:
    sys.stdout.write(os.environ.get("FAKE_EXISTING", ""))
elif args[:2] == ["get", "rayjob"] and "jsonpath={{.status.jobDeploymentStatus}}" in args:
    polls = state / "polls"
    n = int(polls.read_text()) if polls.exists() else 0
    polls.write_text(str(n + 1))
    if n > 20:  # the scheduler would wait forever: record it and end the scheduler's shell
        (state / "stuck").write_text("polled 20 times")
        os.kill(os.getppid(), 9)
    print(["", "Initializing", "Running"][n] if n < 3 else os.environ["FAKE_DEPLOYMENT"], end="")
elif args[:2] == ["get", "rayjob"] and "jsonpath={{.status.jobStatus}}" in args:
    print(os.environ["FAKE_JOB_STATUS"], end="")
elif args[:2] == ["get", "rayjob"] and "jsonpath={{.status.message}}" in args:
    print(os.environ.get("FAKE_MESSAGE", ""), end="")
elif args[:2] == ["get", "rayjob"]:
    print("reason: message")
elif args[0] == "delete":
    with open(state / "deleted", "a") as f:
        f.write(" ".join(args[1:]) + "\n")
else:
    sys.exit(f"unexpected kubectl call: {{args}}")
'''


# Ray's message for an entrypoint that exited non-zero (job_supervisor.py), which KubeRay copies into the RayJob.
RAY_EXIT = "Job entrypoint command failed with exit code {}, last available logs (truncated to 20,000 chars):\n..."


def fake_kubectl(tmp_path: Path) -> Path:
    """A folder holding FAKE_KUBECTL as `kubectl`, to put first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.format(python=sys.executable))
    kubectl.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize(
    "existing,deployment,job_status,message,rc,creates",
    [
        ("", "Complete", "SUCCEEDED", "", 0, True),
        # The audit's exit code comes through: a crossed threshold (3) and a retryable remainder (75) are not an
        # outage (1), so alerting can tell them apart.
        ("", "Complete", "FAILED", RAY_EXIT.format(3), 3, True),
        ("", "Complete", "FAILED", RAY_EXIT.format(75), 75, True),
        ("", "Failed", "FAILED", RAY_EXIT.format(3), 3, True),
        ("", "Complete", "FAILED", RAY_EXIT.format(2), 1, True),  # a config error
        ("", "Complete", "FAILED", "", 1, True),
        ("", "Failed", "", "", 1, True),  # e.g. the RayJob's activeDeadlineSeconds
        ("", "ValidationFailed", "", "", 1, True),  # ends the wait instead of polling forever
        ("", "Suspended", "", "", 1, True),
        # Still running: skip, and fail (this run audited nothing; a RayJob stuck there must not look green).
        ("bbpurify-audit-old=Complete\nbbpurify-audit-prev=Running\n", "", "", "", 1, False),
        ("bbpurify-audit-new=\n", "", "", "", 1, False),  # created, not yet seen by the operator: running
        # Stuck RayJobs never leave these states: they must not make every later run skip.
        ("bbpurify-audit-old=ValidationFailed\n", "Complete", "SUCCEEDED", "", 0, True),
        ("bbpurify-audit-old=Suspended\nbbpurify-audit-x=Failed\n", "Complete", "SUCCEEDED", "", 0, True),
    ],
)
def test_audit_scheduler_script(
    tmp_path: Path, existing: str, deployment: str, job_status: str, message: str, rc: int, creates: bool
) -> None:
    (cron,) = find("CronJob", "audit-cronjob.yaml")
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    template = next(d for d in find("ConfigMap", "audit-cronjob.yaml") if d["metadata"]["name"].endswith("template"))
    (tmp_path / "rayjob.yaml").write_text(template["data"]["rayjob.yaml"])
    bin_dir = fake_kubectl(tmp_path)
    script = container["args"][0].replace("/template/", f"{tmp_path}/").replace("sleep 30", "sleep 0")
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_STATE": str(tmp_path), "FAKE_EXISTING": existing,
        "FAKE_DEPLOYMENT": deployment, "FAKE_JOB_STATUS": job_status, "FAKE_MESSAGE": message,
        **{e["name"]: e["value"] for e in container["env"] if "value" in e},
        "JOB_NAME": "bbpurify-audit-29512345",  # the downward API's batch.kubernetes.io/job-name
    }
    env["BBPURIFY_IMAGE"] = "registry.example.com/team/bbpurify:1.2.3"
    proc = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert not (tmp_path / "stuck").exists(), "the scheduler kept waiting on a RayJob that will not change"
    assert proc.returncode == rc, proc.stdout + proc.stderr
    created = tmp_path / "created.yaml"
    assert created.exists() == creates, proc.stdout + proc.stderr
    if creates:
        text = created.read_text()
        assert "__RUN_ID__" not in text and "__IMAGE__" not in text and "__JOB__" not in text
        job = yaml.safe_load(text)
        assert re.fullmatch(r"bbpurify-audit-\d{8}-\d{6}", job["metadata"]["name"])
        assert job["metadata"]["labels"]["bbpurify.io/scheduled-by"] == env["JOB_NAME"]
        validate_ray(job, "created")
        images = {c["image"] for _, pod in pod_specs(job["spec"]["rayClusterSpec"]) for c in pod["containers"]}
        assert images == {env["BBPURIFY_IMAGE"]}
        deleted = (tmp_path / "deleted").read_text().split()
        assert deleted == ["rayjob.ray.io/bbpurify-audit-00", "rayjob.ray.io/bbpurify-audit-01"]


def test_a_scheduler_pod_replacing_a_disrupted_one_waits_on_its_audit(tmp_path: Path) -> None:
    """A node drain evicts the scheduler pod mid-audit: the Job ignores the disruption and starts another pod, which
    finds the audit its Job created (by label) and waits on it: no second audit, no false failure."""
    (cron,) = find("CronJob", "audit-cronjob.yaml")
    job_spec = cron["spec"]["jobTemplate"]["spec"]
    assert job_spec["podFailurePolicy"]["rules"] == [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]
    container = job_spec["template"]["spec"]["containers"][0]
    source = next(e for e in container["env"] if e["name"] == "JOB_NAME")["valueFrom"]["fieldRef"]["fieldPath"]
    assert source == "metadata.labels['batch.kubernetes.io/job-name']"
    bin_dir = fake_kubectl(tmp_path)
    script = container["args"][0].replace("sleep 30", "sleep 0")
    own = "bbpurify-audit-20261204-030000"
    base = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_STATE": str(tmp_path), "FAKE_DEPLOYMENT": "Complete",
            "FAKE_JOB_STATUS": "SUCCEEDED", "BBPURIFY_IMAGE": "x", "KEEP_AUDITS": "10", "HOME": str(tmp_path),
            # the audit it created is still running: the check that would skip this run must not see it as another's
            "FAKE_EXISTING": f"{own}=Running\n"}
    proc = subprocess.run(["sh", "-c", script], env={**base, "JOB_NAME": "bbpurify-audit-29512345", "FAKE_OWN": own},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"rayjob/{own} was created by this run" in proc.stdout and not (tmp_path / "created.yaml").exists()
    assert "bbpurify.io/scheduled-by=bbpurify-audit-29512345" in (tmp_path / "own-asked").read_text()
    # Without the label's value (a cluster older than 1.27), no RayJob is taken for its own: the usual checks run.
    (tmp_path / "own-asked").unlink()
    proc = subprocess.run(["sh", "-c", script], env={**base, "JOB_NAME": "", "FAKE_OWN": own},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "an audit is still running" in proc.stderr
    assert not (tmp_path / "own-asked").exists()


# ---------------------------------------------------------------------------------------------------------------
# The kustomization: what a user applies
# ---------------------------------------------------------------------------------------------------------------


def _kustomize(directory: Path) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@needs_kubectl
def test_shipped_kustomization_overrides_every_image() -> None:
    docs = _kustomize(CLUSTER)
    text = yaml.safe_dump_all(docs)
    assert IMAGE_PLACEHOLDER not in text, "an image the kustomization's `images:` does not reach"
    (new,) = yaml.safe_load(KUSTOMIZATION.read_text())["images"]
    assert f"{new['newName']}:{new['newTag']}" in text


@needs_kubectl
def test_kustomization_builds_valid_objects_with_the_users_values(tmp_path: Path) -> None:
    work = tmp_path / "cluster"
    shutil.copytree(CLUSTER, work)
    k = yaml.safe_load(KUSTOMIZATION.read_text())
    k["images"] = [{"name": "REGISTRY/bbpurify", "newName": "ghcr.io/acme/bbpurify", "newTag": "9.9.9"}]
    (gen,) = k["configMapGenerator"]
    gen["literals"] = [f"{lit.split('=')[0]}=" + {"BBPURIFY_DATA": "s3://acme-data/x",
                                                  "S3_ENDPOINT_URL": "https://minio.acme:9000",
                                                  "BBPURIFY_BLACKBOX_URI": "v2+https://bb.acme/models/m"}.get(
        lit.split("=")[0], lit.split("=", 1)[1]) for lit in gen["literals"]]
    k["patches"][0]["patch"] = k["patches"][0]["patch"].replace('"0 3 * * *"', '"30 1 * * 1"')
    (work / "kustomization.yaml").write_text(yaml.safe_dump(k))

    docs = _kustomize(work)
    for i, doc in enumerate(docs):
        validate_doc(doc, f"kustomize#{i}")
    image = "ghcr.io/acme/bbpurify:9.9.9"
    ray_images = set()
    for doc in docs:
        if doc["kind"] == "RayJob":
            spec = doc["spec"]
            ray_images |= {c["image"] for _, pod in pod_specs(spec["rayClusterSpec"]) for c in pod["containers"]}
            ray_images |= {c["image"] for c in spec["submitterPodTemplate"]["spec"]["containers"]}
    assert ray_images == {image}
    (cron,) = [d for d in docs if d["kind"] == "CronJob"]
    assert cron["spec"]["schedule"] == "30 1 * * 1"
    env = {e["name"]: e.get("value") for e in cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
           ["env"]}
    assert env["BBPURIFY_IMAGE"] == image, "the audit template gets the same image"
    (settings,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "bbpurify-settings"]
    assert settings["data"]["BBPURIFY_DATA"] == "s3://acme-data/x"
    assert settings["data"]["BBPURIFY_BLACKBOX_URI"] == "v2+https://bb.acme/models/m"
    assert settings["data"]["S3_ENDPOINT_URL"] == "https://minio.acme:9000"
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("ServiceAccount", "bbpurify"), ("ServiceAccount", "bbpurify-worker"), ("ConfigMap", "bbpurify-configs"),
            ("RayJob", "bbpurify-sanitize"), ("CronJob", "bbpurify-audit")} <= names
    assert IMAGE_PLACEHOLDER not in yaml.safe_dump_all(docs)


# ---------------------------------------------------------------------------------------------------------------
# Cluster launcher, Dockerfile
# ---------------------------------------------------------------------------------------------------------------

# NVIDIA's minimum Linux driver for each CUDA major.minor (CUDA toolkit release notes, table 3).
CUDA_MIN_DRIVER = {"12.4": 550, "12.6": 560, "12.8": 570, "12.9": 575, "13.0": 580}
# The AMIs the launcher may name, with the oldest NVIDIA driver they have shipped with (AWS DLAMI release notes).
KNOWN_AMIS = {
    "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id": 570,
}
TORCH_INDEX_CUDA = {"https://download.pytorch.org/whl/cu128": "12.8", "https://download.pytorch.org/whl/cu126": "12.6",
                    "https://download.pytorch.org/whl/cu130": "13.0"}
PYPI_TORCH_CUDA = "13.0"  # PyPI's Linux wheel of torch 2.13


def torch_cuda_of(setup: str) -> str:
    m = re.search(r"pip install[^\n]*?(?:--index-url|-i)\s+(\S+)[^\n]*torch==", setup)
    index = m.group(1) if m else None
    return TORCH_INDEX_CUDA[index] if index else PYPI_TORCH_CUDA


def test_cluster_launcher_validates_against_rays_schema() -> None:
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(fillout_defaults(copy(config)))  # what `ray up` runs: also checks head_node_type, max_workers

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU", 0) == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(t.get("min_workers", 0) == 0 for t in gpu_types)
    assert config["provider"]["type"] == "aws"
    setup = "\n".join(config["setup_commands"])
    assert "pip install" in setup and "~/bbpurify" in setup and f"ray=={ray.__version__}" in setup
    assert config["file_mounts"].get("~/bbpurify") == "."
    assert f"rayproject/ray:{ray.__version__}-" in config["docker"]["image"]


def test_cluster_launcher_ami_driver_fits_the_torch_build() -> None:
    """Without an ImageId Ray boots its default AMI (a CUDA 11.2 era driver): torch sees no GPU, the purifiers
    quietly compute on CPU. Every node type names an AMI whose driver the installed torch build accepts."""
    config = yaml.safe_load(LAUNCHER.read_text())
    need = CUDA_MIN_DRIVER[torch_cuda_of("\n".join(config["setup_commands"]))]
    for name, t in config["available_node_types"].items():
        ami = t["node_config"].get("ImageId")
        assert ami, f"{name}: no ImageId, Ray would pick its default (CUDA 11.2 era) AMI"
        assert ami in KNOWN_AMIS, f"{name}: {ami} is not an AMI whose driver this test knows"
        assert KNOWN_AMIS[ami] >= need, f"{name}: AMI driver {KNOWN_AMIS[ami]} < {need} that torch needs"
    # What each worker type runs, as Ray computes it: the global setup_commands + worker_setup_commands, unless the
    # node type has worker_setup_commands of its own, which replace them (autoscaler `_get_node_type_specific_fields`).
    from ray.autoscaler._private.util import prepare_config

    prepared = prepare_config(copy(config))
    for name, t in prepared["available_node_types"].items():
        if name == prepared["head_node_type"]:
            continue
        runs = t.get("worker_setup_commands", prepared["worker_setup_commands"])
        assert runs[:len(config["setup_commands"])] == config["setup_commands"], f"{name} skips the setup"
        if t["resources"].get("GPU", 0) >= 1:  # a GPU node whose torch sees no GPU must not join
            check = " ".join(runs[len(config["setup_commands"]):])
            assert "torch.cuda.is_available()" in check and "sys.exit" in check and "driver" in check


def test_cluster_launcher_gives_every_node_s3_access() -> None:
    """The driver reads and writes on the head, every actor on the workers: all of them need the instance profile."""
    config = yaml.safe_load(LAUNCHER.read_text())
    for name, t in config["available_node_types"].items():
        profile = t["node_config"].get("IamInstanceProfile") or {}
        assert profile.get("Name") or profile.get("Arn"), f"{name}: no IamInstanceProfile, no S3 access"
    readme = (CLUSTER / "README.md").read_text()
    for t in config["available_node_types"].values():
        assert t["node_config"]["IamInstanceProfile"]["Name"] in readme, "README section 7 creates each profile"


def test_cluster_launcher_hands_the_token_to_the_container_not_to_a_runtime_env(tmp_path: Path) -> None:
    """Ray logs a job's runtime env on every node and shows it in `ray job list`: the token goes from SSM to an
    owner-only env file on each host, and docker passes that file to the container. The node command runs here
    against a stand-in `aws` that answers like the real one."""
    config = yaml.safe_load(LAUNCHER.read_text())
    (init,) = config["initialization_commands"]
    env_file = next(o.split(" ", 1)[1] for o in config["docker"]["run_options"] if o.startswith("--env-file "))
    assert env_file in init and "--with-decryption" in init
    readme = (CLUSTER / "README.md").read_text()
    assert '"env_vars": {"BB_TOKEN"' not in readme and "aws ssm put-parameter" in readme
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    aws = bin_dir / "aws"
    aws.write_text("#!/bin/sh\n[ -n \"$FAKE_TOKEN\" ] && printf '%s\\n' \"$FAKE_TOKEN\" || exit 254\n")
    aws.chmod(0o755)
    target = tmp_path / "secrets.env"
    command = init.replace(env_file, str(target))
    for token, want in (("tok/en+9==", "BB_TOKEN=tok/en+9==\n"), ("", "BB_TOKEN=\n")):  # absent: an empty token
        env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_TOKEN": token}
        proc = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert target.read_text() == want and (target.stat().st_mode & 0o077) == 0
        target.unlink()


def _dockerfile_steps() -> list[str]:
    text = (CLUSTER / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_layers_and_python() -> None:
    steps = _dockerfile_steps()
    text = "\n".join(steps)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-gpu$", text, re.M)
    assert dockerfile_arg("RAY_VERSION") == ray.__version__
    assert "whl/cpu" not in text, "the CPU-only torch index is for CI, not for the GPU image"
    # A code change must not download the weights again: the prefetch runs before the package is copied.
    prefetch = next(i for i, s in enumerate(steps) if s.startswith("RUN") and "prefetch_models.py" in s)
    code = next(i for i, s in enumerate(steps) if re.match(r"COPY .*\spipeline\s+\./pipeline$", s))
    assert prefetch < code
    copied_before = " ".join(s for s in steps[:prefetch] if s.startswith("COPY"))
    assert "pipeline/purify/models.py" in copied_before and not re.search(r"COPY \S* ?pipeline ", copied_before)
    assert re.search(r"pip install .*\s\.(\s|$)", text), "the project is installed with `pip install .`"
    assert re.search(r"COPY .*cluster/run-job\.sh \./cluster/run-job\.sh", text)
    assert "ENV APP_DIR=/home/ray/bbpurify" in text and RUN_JOB.startswith("/home/ray/bbpurify/")
    # PYTHON_TAG is a knob: nothing may need a Python newer than the project's floor (tomllib is 3.11+).
    assert "tomllib" not in text
    floor = re.search(r'requires-python = ">=3\.(\d+)"', (REPO / "pyproject.toml").read_text())
    assert floor and int(floor.group(1)) <= 10
    assert re.fullmatch(r"py3\d\d?", dockerfile_arg("PYTHON_TAG"))


def test_prefetch_runs_without_the_package(tmp_path: Path) -> None:
    """As in the image: models.py beside the script, no `pipeline` imported; a local preset is found, not fetched."""
    shutil.copy(REPO / "pipeline" / "purify" / "models.py", tmp_path / "models.py")
    shutil.copy(CLUSTER / "prefetch_models.py", tmp_path / "prefetch_models.py")
    probe = ("import sys; import prefetch_models as p; p.main(['fmnist-tiny']); "
             "assert not any(m == 'pipeline' or m.startswith('pipeline.') for m in sys.modules), 'imported pipeline'")
    env = {**os.environ, "PIPELINE_MODELS_DIR": str(REPO / "models"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already local" in proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# Job configs, README, `ray job submit`
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_job_configs_load(path: Path) -> None:
    cfg = load_config(path)
    parse_thresholds(cfg.audit.thresholds)


def test_job_config_contents() -> None:
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert {"demo.yaml", "s3-v2.yaml", "cluster.yaml", "audit.yaml"} <= names

    demo = load_config(CONFIGS / "demo.yaml")
    assert demo.source.uri == "out/demo/shards" and demo.source.format == "parquet"
    assert demo.model.name == "fmnist-tiny" and demo.blackbox.uri == "onnx:models/victims/badnets.onnx"
    assert demo.output.uri == "out/demo/sanitized"

    s3 = load_config(CONFIGS / "s3-v2.yaml")
    assert s3.source.uri.startswith("s3://") and s3.output.uri.startswith("s3://")
    assert s3.source.endpoint_url and s3.output.endpoint_url
    assert s3.blackbox.uri.startswith(("v2+http://", "v2+https://")) and s3.blackbox.auth_env == "BB_TOKEN"

    cluster = load_config(CONFIGS / "cluster.yaml")
    res = cluster.resources
    assert res.gpus_per_actor == 1 and res.purify_actors >= 2 and res.max_purify_actors >= res.purify_actors
    assert res.purify_batch_size > demo.resources.purify_batch_size and res.query_cpus >= 1
    assert cluster.model.name == "ddpm-cifar10-32" and (cluster.blackbox.channels, cluster.blackbox.size) == (3, 32)
    assert cluster.blackbox.auth_env == "BB_TOKEN"

    audit = load_config(CONFIGS / "audit.yaml")
    assert audit.output.keep_original is True and audit.audit.sample

    from pipeline.blackbox.v2 import parse_v2_uri  # the URIs must parse the way the client will parse them

    for uri in (s3.blackbox.uri, cluster.blackbox.uri, kustomize_settings()["BBPURIFY_BLACKBOX_URI"]):
        parse_v2_uri(uri)


def test_cluster_readme_names_only_what_exists() -> None:
    """Followed top to bottom, the README creates every object the manifests reference and names real files."""
    readme = (CLUSTER / "README.md").read_text()
    for path in set(re.findall(r"\bcluster/[\w.-]+", readme)):
        assert (REPO / path).exists(), f"README names {path}, which does not exist"
    assert "sed -i" not in readme, "values are set in cluster/kustomization.yaml, not by editing manifests"
    assert "kubectl apply -k cluster/" in readme and "kubectl create namespace bbpurify" in readme
    assert yaml.safe_load(KUSTOMIZATION.read_text())["namespace"] == "bbpurify"
    # Every Secret a pod reads is created in the README (the pull Secret only for a private registry).
    secrets = set()
    for _, spec in ray_cluster_specs():
        for _, pod in pod_specs(spec):
            secrets |= {p["name"] for p in pod.get("imagePullSecrets", [])}
            for c in pod["containers"]:
                secrets |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                            if "secretKeyRef" in e.get("valueFrom", {})}
    for name in secrets:
        assert re.search(rf"kubectl (-n bbpurify )?create secret [\w-]+ {name}\b", readme), f"{name} not created"
    for value in kustomize_settings():
        assert value in readme, f"README does not explain the setting {value}"
    assert 'pip install -e ".[cluster]"' in readme


# ray[default] adds the dashboard's job server, which `ray job submit` talks to.
RAY_DEFAULT = all(importlib.util.find_spec(m) is not None for m in ("aiohttp_cors", "opencensus"))


def test_cluster_extra_is_ray_default_at_the_pinned_version() -> None:
    text = (REPO / "pyproject.toml").read_text()
    m = re.search(r'^cluster = \["ray\[default\]==([\d.]+)"\]', text, re.M)
    assert m and m.group(1) == ray.__version__
    assert f'"ray[data]=={ray.__version__}"' in text


@pytest.mark.skipif(not RAY_DEFAULT, reason='ray[default] not installed (pip install -e ".[cluster]")')
def test_ray_job_submit_to_a_running_cluster() -> None:
    """The launcher / RayCluster path: `ray job submit` from this install runs a pipeline command on a cluster.

    The cluster is this test's own (a driver process holding a local Ray with its dashboard), stopped with it."""
    port = "8299"
    temp = tempfile.mkdtemp(prefix="bbp-ray-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    # The job's `python` is this interpreter, as on a cluster node where the project is installed.
    env = {**os.environ, "RAY_ADDRESS": "", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           # Ray 2.60 turns token auth on for a local cluster; this test's own token, never ~/.ray/auth_token.
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import ray, sys, time; ray.init(num_cpus=1, include_dashboard=True, "
         f"dashboard_port={port}, _temp_dir=sys.argv[1]); print('up', flush=True); time.sleep(900)",
         temp], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "up"
        # `ray job submit`, as the `ray` console script runs it.
        sub = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address",
                              f"http://127.0.0.1:{port}", "--", "python", "-m", "pipeline", "--help"],
                             capture_output=True, text=True, timeout=300, env=env)
        assert sub.returncode == 0, sub.stdout[-2000:] + sub.stderr[-2000:]
        assert "sanitize" in sub.stdout and "succeeded" in sub.stdout
    finally:
        holder.send_signal(signal.SIGINT)  # the driver's atexit shuts down the Ray it started, nothing else
        holder.wait(timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
