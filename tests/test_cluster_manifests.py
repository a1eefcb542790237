"""Cluster manifests and job configs, checked without a cluster.

- Kubernetes core objects (CronJob, ServiceAccount, Role, RoleBinding, ConfigMap) and every pod template inside the
  KubeRay objects go through the official `kubernetes` client's models: unknown fields and wrong types are errors
  (a typo like `volumeMount:` would otherwise be dropped silently by the API server), then the client builds the
  model, which enforces required fields.
- KubeRay CRD fields (ray.io/v1 RayCluster, RayJob, RayCronJob) are checked against the field lists of KubeRay's
  Go API types (apis/ray/v1/*_types.go, v1.7); the nested Kubernetes types inside them go through the models.
- The cluster launcher YAML validates against the ray-schema.json shipped in the installed Ray wheel, and through
  Ray's own `fillout_defaults` + `validate_config`, as `ray up` would do.
- Every job config (jobs/configs/*.yaml, the ConfigMap copy, and the audit entrypoints' overrides) loads through
  `pipeline.config.load_config`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes.client.models as k8s_models
import pytest
import ray
import yaml
from kubernetes.client import ApiClient

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CONFIGS = REPO / "jobs" / "configs"
LAUNCHER = CLUSTER / "cluster-launcher-aws.yaml"
CLUSTER_YAMLS = sorted(CLUSTER.glob("*.yaml"))
K8S_YAMLS = [p for p in CLUSTER_YAMLS if p != LAUNCHER]
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_ENDPOINT_URL", "BB_TOKEN")
RUN_ID = "20261125-030000"

# Core kinds validated through the kubernetes client models.
CORE_KINDS = {
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding",
    ("batch/v1", "CronJob"): "V1CronJob",
}
RAY_KINDS = {"RayCluster", "RayJob", "RayCronJob"}


# ---------------------------------------------------------------------------------------------------------------
# Kubernetes models: strict structural validation
# ---------------------------------------------------------------------------------------------------------------

_PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "datetime": (str,),
    "date": (str,),
}


def _k8s_walk(value: Any, type_name: str, path: str, errors: list[str]) -> None:
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
            # Quantities and env values must be quoted in YAML: `value: 10` is rejected by the API server.
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


# ---------------------------------------------------------------------------------------------------------------
# KubeRay CRDs: field lists of the v1 Go types
# ---------------------------------------------------------------------------------------------------------------

STR_MAP = "str-map"  # map[string]string: every value must be a YAML string


def S(fields: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:  # noqa: N802 - a type constructor
    return {"fields": fields, "required": required}


AUTOSCALER_OPTIONS = S({
    "resources": "V1ResourceRequirements", "image": str, "imagePullPolicy": str, "securityContext": "V1SecurityContext",
    "idleTimeoutSeconds": int, "upscalingMode": {"enum": ("Default", "Aggressive", "Conservative")},
    "version": {"enum": ("v1", "v2")}, "env": "list[V1EnvVar]", "envFrom": "list[V1EnvFromSource]",
    "volumeMounts": "list[V1VolumeMount]",
})
HEAD_GROUP = S({
    "template": "V1PodTemplateSpec", "headService": "V1Service", "enableIngress": bool, "rayStartParams": STR_MAP,
    "serviceType": str,
}, required=("template", "rayStartParams"))
WORKER_GROUP = S({
    "suspend": bool, "groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int,
    "idleTimeoutSeconds": int, "rayStartParams": STR_MAP, "template": "V1PodTemplateSpec", "scaleStrategy": dict,
    "numOfHosts": int,
}, required=("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"))
RAY_CLUSTER_SPEC = S({
    "suspend": bool, "managedBy": str, "autoscalerOptions": AUTOSCALER_OPTIONS, "headServiceAnnotations": STR_MAP,
    "enableInTreeAutoscaling": bool, "gcsFaultToleranceOptions": dict, "headGroupSpec": HEAD_GROUP,
    "rayVersion": str, "workerGroupSpecs": [WORKER_GROUP], "authOptions": dict, "upgradeStrategy": dict,
}, required=("headGroupSpec",))
RAY_JOB_SPEC = S({
    "activeDeadlineSeconds": int, "backoffLimit": int, "rayClusterSpec": RAY_CLUSTER_SPEC,
    "submitterPodTemplate": "V1PodTemplateSpec", "metadata": STR_MAP, "clusterSelector": STR_MAP,
    "submitterConfig": dict, "managedBy": str, "deletionStrategy": dict, "entrypoint": str, "runtimeEnvYAML": str,
    "jobId": str, "submissionMode": {"enum": ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")},
    "entrypointResources": str, "entrypointNumCpus": (int, float), "entrypointNumGpus": (int, float),
    "ttlSecondsAfterFinished": int, "shutdownAfterJobFinishes": bool, "suspend": bool, "schedule": str,
})
RAY_CRON_JOB_SPEC = S({
    "jobTemplate": RAY_JOB_SPEC, "schedule": str, "suspend": bool, "timeZone": str,
}, required=("jobTemplate", "schedule"))
RAY_SPECS = {"RayCluster": RAY_CLUSTER_SPEC, "RayJob": RAY_JOB_SPEC, "RayCronJob": RAY_CRON_JOB_SPEC}


def _ray_walk(value: Any, spec: Any, path: str, errors: list[str]) -> None:
    if isinstance(spec, str) and spec != STR_MAP:  # a Kubernetes type: the client models take over
        sub: list[str] = []
        _k8s_walk(value, spec, path, sub)
        errors += sub
        if not sub:
            try:
                ApiClient()._ApiClient__deserialize(value, spec)
            except ValueError as e:
                errors.append(f"{path}: {e}")
    elif spec == STR_MAP:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            errors.append(f"{path}: must be a map of strings (quote numbers: num-gpus: \"0\"), got {value!r}")
    elif isinstance(spec, list):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list")
            return
        for i, item in enumerate(value):
            _ray_walk(item, spec[0], f"{path}[{i}]", errors)
    elif isinstance(spec, dict) and "enum" in spec:
        if value not in spec["enum"]:
            errors.append(f"{path}: {value!r} not one of {spec['enum']}")
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected an object")
            return
        for key in spec["required"]:
            if key not in value:
                errors.append(f"{path}.{key}: required")
        for key, v in value.items():
            if key not in spec["fields"]:
                errors.append(f"{path}.{key}: unknown field")
            else:
                _ray_walk(v, spec["fields"][key], f"{path}.{key}", errors)
    else:
        types = spec if isinstance(spec, tuple) else (spec,)
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            errors.append(f"{path}: expected {spec}, got {type(value).__name__} {value!r}")


def validate_ray(obj: dict, path: str) -> None:
    assert obj.get("apiVersion") == "ray.io/v1", f"{path}: apiVersion must be ray.io/v1"
    assert obj.get("kind") in RAY_KINDS, f"{path}: unexpected kind {obj.get('kind')}"
    assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}, f"{path}: unexpected top-level keys {set(obj)}"
    validate_k8s(obj.get("metadata") or {}, "V1ObjectMeta", f"{path}.metadata")
    assert obj.get("metadata", {}).get("name"), f"{path}: metadata.name required"
    errors: list[str] = []
    _ray_walk(obj.get("spec"), RAY_SPECS[obj["kind"]], f"{path}.spec", errors)
    assert not errors, "\n".join(errors)


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_docs() -> list[tuple[str, dict]]:
    return [(f"{p.name}#{i}", d) for p in K8S_YAMLS for i, d in enumerate(load_docs(p))]


def find(kind: str, file: str | None = None) -> list[dict]:
    return [d for name, d in all_docs() if d.get("kind") == kind and (file is None or name.startswith(file))]


def audit_template() -> dict:
    cm = next(d for d in find("ConfigMap", "audit-cronjob.yaml") if d["metadata"]["name"] == "bbpurify-audit-template")
    return yaml.safe_load(cm["data"]["rayjob.yaml"].replace("__RUN_ID__", RUN_ID))


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec we ship, wherever it is embedded."""
    out = [("raycluster.yaml", d["spec"]) for d in find("RayCluster")]
    out += [("rayjob-sanitize.yaml", d["spec"]["rayClusterSpec"]) for d in find("RayJob")]
    out += [("raycronjob-audit.yaml", d["spec"]["jobTemplate"]["rayClusterSpec"]) for d in find("RayCronJob")]
    out.append(("audit-cronjob.yaml template", audit_template()["spec"]["rayClusterSpec"]))
    return out


def pod_specs(cluster_spec: dict) -> list[tuple[str, dict]]:
    pods = [("head", cluster_spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in cluster_spec.get("workerGroupSpecs", [])]
    return pods


def gpu_limit(pod: dict) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in pod["containers"])


def dockerfile_arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert m, f"cluster/Dockerfile has no ARG {name}=..."
    return m.group(1).strip('"')


def entrypoint_config(entrypoint: str, verb: str) -> tuple[str, list[str]]:
    """'python -m pipeline VERB --config PATH a.b=c ...' -> (PATH, overrides)."""
    argv = shlex.split(entrypoint)
    assert argv[:4] == ["python", "-m", "pipeline", verb], argv
    i = argv.index("--config")
    return argv[i + 1], [a for a in argv[4:] if "=" in a and not a.startswith("-")]


def configmap_file(mount_path: str) -> str:
    """/configs/cluster.yaml -> the text of that key in the bbpurify-configs ConfigMap."""
    assert mount_path.startswith("/configs/"), mount_path
    (cm,) = [d for d in find("ConfigMap", "configmap.yaml") if d["metadata"]["name"] == "bbpurify-configs"]
    return cm["data"][mount_path.removeprefix("/configs/")]


# ---------------------------------------------------------------------------------------------------------------
# Tests: every file
# ---------------------------------------------------------------------------------------------------------------


def test_cluster_dir_has_the_expected_files() -> None:
    names = {p.name for p in CLUSTER.iterdir()}
    expected = {
        "Dockerfile", "README.md", "raycluster.yaml", "rayjob-sanitize.yaml", "audit-cronjob.yaml",
        "raycronjob-audit.yaml", "cluster-launcher-aws.yaml", "configmap.yaml",
    }
    assert expected <= names, expected - names


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_every_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path.name} is empty"
    assert all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", K8S_YAMLS, ids=lambda p: p.name)
def test_kubernetes_objects_validate(path: Path) -> None:
    for i, doc in enumerate(load_docs(path)):
        where = f"{path.name}#{i}"
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in CORE_KINDS:
            validate_k8s(doc, CORE_KINDS[key], where)
        elif doc.get("kind") in RAY_KINDS:
            validate_ray(doc, where)
        else:
            pytest.fail(f"{where}: {key} is not a kind this test knows how to validate")


def test_validators_catch_mistakes() -> None:
    """The checks above are only worth something if they fail on the usual slips."""
    rc = find("RayCluster")[0]
    bad = json.loads(json.dumps(rc))
    bad["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["volumeMount"] = []  # typo
    with pytest.raises(AssertionError, match="volumeMount: unknown field"):
        validate_ray(bad, "typo")
    bad = json.loads(json.dumps(rc))
    bad["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0  # unquoted
    with pytest.raises(AssertionError, match="map of strings"):
        validate_ray(bad, "unquoted")
    bad = json.loads(json.dumps(rc))
    del bad["spec"]["workerGroupSpecs"][0]["maxReplicas"]
    with pytest.raises(AssertionError, match="maxReplicas: required"):
        validate_ray(bad, "missing")
    cron = json.loads(json.dumps(find("CronJob")[0]))
    cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] = 10
    with pytest.raises(AssertionError, match="expected str"):
        validate_k8s(cron, "V1CronJob", "env")
    cron = json.loads(json.dumps(find("CronJob")[0]))
    del cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(ValueError, match="name"):
        validate_k8s(cron, "V1CronJob", "noname")


# ---------------------------------------------------------------------------------------------------------------
# Tests: the Ray clusters we ship
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where,spec", ray_cluster_specs(), ids=[w for w, _ in ray_cluster_specs()])
def test_ray_cluster_shape(where: str, spec: dict) -> None:
    errors: list[str] = []
    _ray_walk(spec, RAY_CLUSTER_SPEC, where, errors)
    assert not errors, "\n".join(errors)

    # Same Ray everywhere: KubeRay's rayVersion, the image's base, and the Ray this project is tested with.
    assert spec["rayVersion"] == dockerfile_arg("RAY_VERSION") == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True

    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0", "no GPU work on the head"
    assert gpu_limit(head["template"]["spec"]) == 0

    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    gpu_groups = [g for g in groups if gpu_limit(g["template"]["spec"]) > 0]
    assert gpu_groups, "a GPU worker group is required"
    for g in groups:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]
    for g in gpu_groups:
        assert g["minReplicas"] == 0 < g["maxReplicas"], "GPU workers scale from zero"
        for c in g["template"]["spec"]["containers"]:
            res = c["resources"]
            # Extended resources must have requests == limits when both are given.
            assert res["limits"]["nvidia.com/gpu"] == res.get("requests", res["limits"])["nvidia.com/gpu"]

    images = {c["image"] for _, pod in pod_specs(spec) for c in pod["containers"]}
    assert len(images) == 1, f"every Ray pod must run the same image: {images}"
    assert not next(iter(images)).endswith(":latest")

    for name, pod in pod_specs(spec):
        for c in pod["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            for var in SECRET_ENV:
                assert var in env, f"{where} {name}: {var} missing"
                assert "value" not in env[var] and env[var]["valueFrom"]["secretKeyRef"]["name"], (
                    f"{where} {name}: {var} must come from a Secret"
                )
            for e in c.get("env", []):
                if re.search(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY", e["name"]):
                    assert "value" not in e, f"{where} {name}: {e['name']} is a literal; use secretKeyRef"


def test_head_mounts_the_job_configmap() -> None:
    for where, spec in ray_cluster_specs():
        head = spec["headGroupSpec"]["template"]["spec"]
        vols = {v["name"]: v for v in head.get("volumes", [])}
        mounts = [m for c in head["containers"] for m in c.get("volumeMounts", []) if m["mountPath"] == "/configs"]
        assert mounts, f"{where}: the head must mount the job config at /configs"
        assert vols[mounts[0]["name"]]["configMap"]["name"] == "bbpurify-configs", where


def test_max_purify_actors_fit_the_gpu_group() -> None:
    cfg = load_config(CONFIGS / "cluster.yaml")
    (rc,) = find("RayCluster")
    gpus = sum(g["maxReplicas"] * gpu_limit(g["template"]["spec"]) for g in rc["spec"]["workerGroupSpecs"])
    per_actor = cfg.resources.gpus_per_actor
    assert per_actor == 1
    assert (cfg.resources.max_purify_actors or cfg.resources.purify_actors) * per_actor <= gpus


def test_rayjob_sanitize() -> None:
    (job,) = find("RayJob", "rayjob-sanitize.yaml")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] >= 0
    assert spec["backoffLimit"] >= 1, "retries are what checkpointed resume is for"
    assert spec["activeDeadlineSeconds"] > 0
    path, overrides = entrypoint_config(spec["entrypoint"], "sanitize")
    assert path == "/configs/cluster.yaml" and overrides == []


def test_configmap_matches_cluster_yaml(tmp_path: Path) -> None:
    text = configmap_file("/configs/cluster.yaml")
    assert text == (CONFIGS / "cluster.yaml").read_text(), (
        "cluster/configmap.yaml drifted from jobs/configs/cluster.yaml; regenerate it (see the file's header)"
    )
    (tmp_path / "cluster.yaml").write_text(text)
    cfg = load_config(tmp_path / "cluster.yaml")
    assert cfg.model.name == "ddpm-cifar10-32"


# ---------------------------------------------------------------------------------------------------------------
# Tests: scheduled audits
# ---------------------------------------------------------------------------------------------------------------


def test_audit_cronjob_rbac_and_policy() -> None:
    (cron,) = find("CronJob", "audit-cronjob.yaml")
    (sa,) = find("ServiceAccount", "audit-cronjob.yaml")
    (role,) = find("Role", "audit-cronjob.yaml")
    (binding,) = find("RoleBinding", "audit-cronjob.yaml")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert len(spec["schedule"].split()) == 5
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0
    pod = job["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert pod["restartPolicy"] == "Never"
    # The binding ties exactly that ServiceAccount to that Role, and the Role may create RayJobs (and no more).
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert {"kind": "ServiceAccount", "name": sa["metadata"]["name"]} in binding["subjects"]
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert {"create", "get"} <= set(rule["verbs"])
    # The template the pod reads is the ConfigMap in the same file.
    vols = {v["name"]: v for v in pod["volumes"]}
    (container,) = pod["containers"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/template")
    assert vols[mount["name"]]["configMap"]["name"] == "bbpurify-audit-template"
    script = container["args"][0]
    assert "/template/rayjob.yaml" in script and "kubectl create" in script
    if shutil.which("sh"):
        check = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr


def test_audit_rayjob_template(tmp_path: Path) -> None:
    job = audit_template()
    validate_ray(job, "audit template")
    name = job["metadata"]["name"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "audit"  # what the scheduler selects on
    _check_audit_entrypoint(job["spec"]["entrypoint"], tmp_path)


def test_raycronjob_audit(tmp_path: Path) -> None:
    (cron,) = find("RayCronJob", "raycronjob-audit.yaml")
    spec = cron["spec"]
    assert len(spec["schedule"].split()) == 5
    assert spec["jobTemplate"]["shutdownAfterJobFinishes"] is True
    entry = re.sub(r"\$\(date[^)]*\)", RUN_ID, spec["jobTemplate"]["entrypoint"])
    _check_audit_entrypoint(entry, tmp_path)


def _check_audit_entrypoint(entrypoint: str, tmp_path: Path) -> None:
    path, overrides = entrypoint_config(entrypoint, "audit")
    (tmp_path / "cluster.yaml").write_text(configmap_file(path))
    cfg = load_config(tmp_path / "cluster.yaml", overrides)  # the overrides name real config keys
    assert cfg.output.keep_original is True, "the report's before/after grid needs the originals"
    assert cfg.source.limit is not None
    assert RUN_ID in cfg.output.uri, "each audit writes under its own prefix"


# ---------------------------------------------------------------------------------------------------------------
# Tests: cluster launcher, Dockerfile
# ---------------------------------------------------------------------------------------------------------------


def test_cluster_launcher_validates_against_rays_schema() -> None:
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(fillout_defaults(config))  # what `ray up` runs: also checks head_node_type, max_workers

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for t in types.values() if t is not head and t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(t.get("min_workers", 0) == 0 for t in gpu_types)
    assert config["provider"]["type"] == "aws"
    setup = "\n".join(config["setup_commands"])
    assert "pip install" in setup and "~/bbpurify" in setup and f"ray=={ray.__version__}" in setup
    assert config["file_mounts"].get("~/bbpurify") == "."
    assert f"rayproject/ray:{ray.__version__}-" in config["docker"]["image"]


def test_dockerfile() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-gpu$", text, re.M)
    assert dockerfile_arg("RAY_VERSION") == ray.__version__
    assert re.search(r"pip install .*\s\.(\s|$)", text), "the project is installed with `pip install .`"
    assert "whl/cpu" not in text, "the CPU-only torch index is for CI, not for the GPU image"
    assert (CLUSTER / "prefetch_models.py").exists()


# ---------------------------------------------------------------------------------------------------------------
# Tests: job configs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_job_configs_load(path: Path) -> None:
    load_config(path)


def test_job_config_contents() -> None:
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert {"demo.yaml", "s3-v2.yaml", "cluster.yaml", "audit.yaml"} <= names

    demo = load_config(CONFIGS / "demo.yaml")
    assert demo.source.uri == "out/demo/shards" and demo.source.format == "parquet"
    assert demo.model.name == "fmnist-tiny"
    assert demo.blackbox.uri == "onnx:models/victims/badnets.onnx"
    assert demo.output.uri == "out/demo/sanitized"

    s3 = load_config(CONFIGS / "s3-v2.yaml")
    assert s3.source.uri.startswith("s3://") and s3.output.uri.startswith("s3://")
    assert s3.source.endpoint_url and s3.output.endpoint_url
    assert s3.blackbox.uri.startswith(("v2+http://", "v2+https://")) and s3.blackbox.auth_env == "BB_TOKEN"

    cluster = load_config(CONFIGS / "cluster.yaml")
    assert cluster.resources.gpus_per_actor == 1
    res = cluster.resources
    assert res.purify_actors >= 2 and res.max_purify_actors >= res.purify_actors
    assert cluster.resources.purify_batch_size > demo.resources.purify_batch_size
    assert cluster.model.name == "ddpm-cifar10-32"
    assert (cluster.blackbox.channels, cluster.blackbox.size) == (3, 32)
    assert cluster.blackbox.auth_env == "BB_TOKEN"

    audit = load_config(CONFIGS / "audit.yaml")
    assert audit.output.keep_original is True and audit.source.limit

    from pipeline.blackbox.v2 import parse_v2_uri  # the URIs must parse the way the client will parse them

    for cfg in (s3, cluster):
        parse_v2_uri(cfg.blackbox.uri)


# ---------------------------------------------------------------------------------------------------------------
# The audit scheduler's shell script, run against a fake kubectl
# ---------------------------------------------------------------------------------------------------------------

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
elif args[:2] == ["get", "rayjobs"]:
    sys.stdout.write(os.environ.get("FAKE_EXISTING", ""))
elif args[:2] == ["get", "rayjob"] and "jsonpath={{.status.jobDeploymentStatus}}" in args:
    polls = state / "polls"
    n = int(polls.read_text()) if polls.exists() else 0
    polls.write_text(str(n + 1))
    print(["", "Running"][min(n, 1)] if n < 2 else os.environ["FAKE_DEPLOYMENT"], end="")
elif args[:2] == ["get", "rayjob"]:
    print(os.environ["FAKE_JOB_STATUS"], end="")
elif args[0] == "delete":
    with open(state / "deleted", "a") as f:
        f.write(" ".join(args[1:]) + "\n")
else:
    sys.exit(f"unexpected kubectl call: {{args}}")
'''


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
@pytest.mark.parametrize(
    "existing,deployment,job_status,rc,creates",
    [
        ("", "Complete", "SUCCEEDED", 0, True),
        ("", "Complete", "FAILED", 1, True),  # a crossed audit threshold fails the CronJob's Job
        ("", "Failed", "", 1, True),  # e.g. the RayJob's activeDeadlineSeconds
        ("bbpurify-audit-old=Complete\nbbpurify-audit-prev=Running\n", "", "", 0, False),  # still running: skip
    ],
)
def test_audit_scheduler_script(
    tmp_path: Path, existing: str, deployment: str, job_status: str, rc: int, creates: bool
) -> None:
    (cron,) = find("CronJob", "audit-cronjob.yaml")
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    template = next(d for d in find("ConfigMap", "audit-cronjob.yaml") if d["metadata"]["name"].endswith("template"))
    (tmp_path / "rayjob.yaml").write_text(template["data"]["rayjob.yaml"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.format(python=sys.executable))
    kubectl.chmod(0o755)
    script = container["args"][0].replace("/template/", f"{tmp_path}/").replace("sleep 30", "sleep 0")
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_STATE": str(tmp_path), "FAKE_EXISTING": existing,
        "FAKE_DEPLOYMENT": deployment, "FAKE_JOB_STATUS": job_status,
        **{e["name"]: e["value"] for e in container["env"]},
    }
    proc = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert (proc.returncode != 0) == bool(rc), proc.stdout + proc.stderr
    created = tmp_path / "created.yaml"
    assert created.exists() == creates
    if creates:
        job = yaml.safe_load(created.read_text())
        assert "__RUN_ID__" not in created.read_text()
        assert re.fullmatch(r"bbpurify-audit-\d{8}-\d{6}", job["metadata"]["name"])
        validate_ray(job, "created")
        # Keeps the newest KEEP_AUDITS (10) of the 12 listed: deletes the 2 oldest.
        deleted = (tmp_path / "deleted").read_text().split()
        assert deleted == ["rayjob.ray.io/bbpurify-audit-00", "rayjob.ray.io/bbpurify-audit-01"]
