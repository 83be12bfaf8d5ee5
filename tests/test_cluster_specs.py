"""Cluster specs: every YAML under ``cluster/`` loads and has what a real deployment needs (no network, no cloud).

Ray autoscaler files (``ray up``) are validated against the schema Ray itself ships
(``ray/autoscaler/ray-schema.json``), then for what that schema cannot say: a CPU head, an autoscaling GPU
worker type, worker bounds, an install of this package, results on storage every node shares, room for one
trial. KubeRay manifests are validated against the schema below, written from the KubeRay v1 CRD types
(``ray-operator/apis/ray/v1/raycluster_types.go``, ``rayjob_types.go``) and the core/v1 Pod fields they embed:
an unknown key is an error (so ``workerGroupSpec`` fails), as are missing required keys and wrong types.
A field that is real but missing here gets added to the schema, not waved through.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import yaml

from anyorder_ray.config import ConfigError, ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
CLUSTER_YAMLS = sorted(p for pattern in ("*.yaml", "*.yml") for p in CLUSTER.rglob(pattern))
GPU_CONFIG = ROOT / "tune_configs" / "llada2_mini_gpu.yaml"  # the sweep the cluster specs are sized for
RAY_SCHEMA = Path(importlib.util.find_spec("ray").origin).parent / "autoscaler" / "ray-schema.json"
_PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# "2.60" from "ray[...]>=2.60,<2.61": images and rayVersion must run the Ray this package pins.
RAY_MINOR = next(re.search(r">=\s*(\d+\.\d+)", d).group(1) for d in _PYPROJECT["project"]["dependencies"]
                 if d.startswith("ray["))  # fmt: skip

# ---------------------------------------------------------------------------------------------------------
# A small schema language: a type or tuple of types (bool is never an int), a frozenset of allowed values,
# [item] for a list, mapping(values) for free keys, obj(required..., field=schema) for fixed keys, ANY.

ANY = object()


def obj(*required: str, **fields: object) -> dict:
    return {"fields": fields, "required": required}


def mapping(values: object) -> dict:
    return {"map": values}


def one_of(*values: str) -> frozenset:
    return frozenset(values)


def validate(node: object, schema: object, path: str) -> list[str]:
    """Every way ``node`` departs from ``schema``, each naming its path."""
    if schema is ANY:
        return []
    if isinstance(schema, list):
        if not isinstance(node, list):
            return [f"{path}: expected a list, got {node!r}"]
        return [p for i, item in enumerate(node) for p in validate(item, schema[0], f"{path}[{i}]")]
    if isinstance(schema, frozenset):
        return [] if node in schema else [f"{path}: {node!r} is not one of {sorted(schema)}"]
    if isinstance(schema, dict):
        if not isinstance(node, dict):
            return [f"{path}: expected a mapping, got {node!r}"]
        if "map" in schema:
            return [p for k, v in node.items() for p in validate(v, schema["map"], f"{path}.{k}")]
        fields, problems = schema["fields"], []
        for key, value in node.items():
            if key in fields:
                problems += validate(value, fields[key], f"{path}.{key}")
            else:
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{path}: unknown key {key!r}{hint}")
        problems += [f"{path}: missing required key {key!r}" for key in schema["required"] if key not in node]
        return problems
    types = schema if isinstance(schema, tuple) else (schema,)
    if isinstance(node, types) and (bool in types or not isinstance(node, bool)):
        return []
    return [f"{path}: expected {'/'.join(t.__name__ for t in types)}, got {node!r}"]


QUANTITY = (str, int, float)
NUM = (int, float)
PULL_POLICY = one_of("Always", "IfNotPresent", "Never")
MANAGED_BY = one_of("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue")
METADATA = obj("name", name=str, namespace=str, labels=mapping(str), annotations=mapping(str))
ENV_VAR = obj("name", name=str, value=str, valueFrom=ANY)
RESOURCES = obj(limits=mapping(QUANTITY), requests=mapping(QUANTITY), claims=ANY)
VOLUME_MOUNT = obj("name", "mountPath", name=str, mountPath=str, readOnly=bool, recursiveReadOnly=str,
                   mountPropagation=str, subPath=str, subPathExpr=str)  # fmt: skip
CONTAINER = obj(
    "name", name=str, image=str, imagePullPolicy=PULL_POLICY, command=[str], args=[str], workingDir=str,
    ports=[obj("containerPort", containerPort=int, name=str, protocol=one_of("TCP", "UDP", "SCTP"), hostPort=int,
               hostIP=str)],
    env=[ENV_VAR], envFrom=ANY, resources=RESOURCES, resizePolicy=ANY, restartPolicy=str,
    volumeMounts=[VOLUME_MOUNT], volumeDevices=ANY, livenessProbe=ANY, readinessProbe=ANY, startupProbe=ANY,
    lifecycle=ANY, terminationMessagePath=str, terminationMessagePolicy=str, securityContext=ANY, stdin=bool,
    stdinOnce=bool, tty=bool,
)  # fmt: skip
VOLUME = obj(
    "name", name=str, persistentVolumeClaim=obj("claimName", claimName=str, readOnly=bool),
    emptyDir=obj(medium=str, sizeLimit=QUANTITY), hostPath=ANY, nfs=ANY, configMap=ANY, secret=ANY, csi=ANY,
    ephemeral=ANY, projected=ANY, downwardAPI=ANY, image=ANY,
)  # fmt: skip
POD_SPEC = obj(
    "containers", containers=[CONTAINER], initContainers=[CONTAINER], ephemeralContainers=ANY, volumes=[VOLUME],
    nodeSelector=mapping(str), nodeName=str, affinity=ANY, schedulerName=str, runtimeClassName=str,
    tolerations=[obj(key=str, operator=one_of("Exists", "Equal"), value=str, tolerationSeconds=int,
                     effect=one_of("NoSchedule", "PreferNoSchedule", "NoExecute"))],
    priorityClassName=str, priority=int, preemptionPolicy=str, topologySpreadConstraints=ANY,
    restartPolicy=one_of("Always", "OnFailure", "Never"), terminationGracePeriodSeconds=int,
    activeDeadlineSeconds=int, readinessGates=ANY, hostname=str, setHostnameAsFQDN=bool, subdomain=str,
    hostAliases=ANY, dnsConfig=ANY, dnsPolicy=str, hostNetwork=bool, hostPID=bool, hostIPC=bool, hostUsers=bool,
    shareProcessNamespace=bool, serviceAccountName=str, serviceAccount=str, automountServiceAccountToken=bool,
    securityContext=ANY, imagePullSecrets=ANY, enableServiceLinks=bool, os=ANY, overhead=ANY,
    schedulingGates=ANY, resourceClaims=ANY, resources=ANY,
)  # fmt: skip
POD_TEMPLATE = obj("spec", metadata=obj(name=str, labels=mapping(str), annotations=mapping(str)), spec=POD_SPEC)

# KubeRay v1. Kept required here though the CRD defaults them: rayStartParams (required by older releases),
# minReplicas/maxReplicas (an autoscaling group states its bounds), a RayJob's entrypoint and rayClusterSpec.
AUTOSCALER_OPTIONS = obj(
    resources=RESOURCES, image=str, imagePullPolicy=PULL_POLICY, securityContext=ANY, idleTimeoutSeconds=int,
    upscalingMode=one_of("Default", "Aggressive", "Conservative"), version=one_of("v1", "v2"), env=[ENV_VAR],
    envFrom=ANY, volumeMounts=[VOLUME_MOUNT], command=[str], args=[str],
)  # fmt: skip
HEAD_GROUP_SPEC = obj(
    "template", "rayStartParams", template=POD_TEMPLATE, rayStartParams=mapping(str), serviceType=str,
    headService=ANY, enableIngress=bool, ingressOptions=ANY, resources=mapping(str), labels=mapping(str),
)  # fmt: skip
WORKER_GROUP_SPEC = obj(
    "groupName", "template", "rayStartParams", "minReplicas", "maxReplicas", groupName=str, replicas=int,
    minReplicas=int, maxReplicas=int, numOfHosts=int, idleTimeoutSeconds=int, priority=int,
    rayStartParams=mapping(str), template=POD_TEMPLATE, scaleStrategy=obj(workersToDelete=[str]),
    resources=mapping(str), labels=mapping(str), suspend=bool,
)  # fmt: skip
RAY_CLUSTER_SPEC = obj(
    "headGroupSpec", headGroupSpec=HEAD_GROUP_SPEC, workerGroupSpecs=[WORKER_GROUP_SPEC], rayVersion=str,
    enableInTreeAutoscaling=bool, autoscalerOptions=AUTOSCALER_OPTIONS, headServiceAnnotations=mapping(str),
    suspend=bool, managedBy=MANAGED_BY, gcsFaultToleranceOptions=ANY,
    upgradeStrategy=obj(type=one_of("Recreate", "None")),
    authOptions=obj(mode=one_of("disabled", "token"), secretName=str, enableK8sTokenAuth=bool),
)  # fmt: skip
RAY_JOB_SPEC = obj(
    "entrypoint", "rayClusterSpec", entrypoint=str, runtimeEnvYAML=str, rayClusterSpec=RAY_CLUSTER_SPEC,
    clusterSelector=mapping(str), submissionMode=one_of("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"),
    submitterPodTemplate=POD_TEMPLATE, submitterConfig=obj(backoffLimit=int), shutdownAfterJobFinishes=bool,
    ttlSecondsAfterFinished=int, activeDeadlineSeconds=int, backoffLimit=int, jobId=str, metadata=mapping(str),
    entrypointNumCpus=NUM, entrypointNumGpus=NUM, entrypointResources=str, managedBy=MANAGED_BY,
    deletionStrategy=ANY, suspend=bool,
)  # fmt: skip
PVC_SPEC = obj(
    "accessModes", "resources",
    accessModes=[one_of("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod")],
    resources=obj(limits=mapping(QUANTITY), requests=mapping(QUANTITY)), storageClassName=str,
    volumeMode=one_of("Filesystem", "Block"), volumeName=str, selector=ANY, dataSource=ANY, dataSourceRef=ANY,
    volumeAttributesClassName=str,
)  # fmt: skip
MANIFESTS = {"RayCluster": ("ray.io/v1", RAY_CLUSTER_SPEC), "RayJob": ("ray.io/v1", RAY_JOB_SPEC),
             "PersistentVolumeClaim": ("v1", PVC_SPEC)}  # fmt: skip
# Public runtime_env fields of the pinned Ray (ray.runtime_env.RuntimeEnv.known_fields).
RUNTIME_ENV_KEYS = {"working_dir", "py_modules", "py_executable", "excludes", "pip", "uv", "conda", "env_vars",
                    "image_uri", "container", "config", "java_jars", "worker_process_setup_hook"}  # fmt: skip
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


# ---------------------------------------------------------------------------------------------------------
# Checks shared by both kinds


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def strings_in(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings_in(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings_in(v)]
    return []


def invocations(command: str) -> list[dict]:
    """``python -m M --config X a.b=c ...`` inside a shell command: each with its module, config, overrides."""
    try:
        tokens = shlex.split(command)
    except ValueError:
        tokens = command.split()
    found = []
    for i, tok in enumerate(tokens[:-1]):
        if tok == "-m" and re.search(r"python[\d.]*$", tokens[i - 1] if i else ""):
            rest = tokens[i + 2 :]
            end = next((j for j, t in enumerate(rest) if t in (";", "&&", "||", "|")), len(rest))
            rest, config = rest[:end], None
            for j, t in enumerate(rest):
                if t == "--config" and j + 1 < len(rest):
                    config = rest[j + 1]
                elif t.startswith("--config="):
                    config = t.partition("=")[2]
            overrides = [t for t in rest if re.match(r"^[a-z_]+\.[a-z_]+=", t)]
            found.append({"module": tokens[i + 1], "config": config, "overrides": overrides})
    return found


def invocation_problems(doc: object) -> tuple[list[str], list[ExperimentConfig]]:
    """Every ``python -m`` module must be importable and every ``--config`` must exist and load."""
    problems, configs = [], []
    for command in strings_in(doc):
        for inv in invocations(command):
            if importlib.util.find_spec(inv["module"]) is None:
                problems.append(f"`python -m {inv['module']}`: no such module")
            if inv["config"] is None:
                continue
            path = ROOT / inv["config"]
            if not path.is_file():
                problems.append(f"--config {inv['config']}: no such file in the repository")
                continue
            try:
                configs.append(load_config(path, inv["overrides"]))
            except ConfigError as e:
                problems.append(f"--config {inv['config']} {' '.join(inv['overrides'])}: {e}")
    return problems, configs


def shared_paths(cfg: ExperimentConfig) -> dict[str, str]:
    """Paths every node must see: where results land, and the checkpoint the trainers load."""
    paths = {"results (sweep.storage_path or train.output_dir)": cfg.sweep.storage_path or cfg.train.output_dir}
    paths.update({f"model.{k}": getattr(cfg.model, k) for k in ("model_path", "tokenizer_path")
                  if getattr(cfg.model, k)})  # fmt: skip
    return paths


def under(path: str, dirs: set[str]) -> bool:
    p = PurePosixPath(path)
    return any(p == PurePosixPath(d) or PurePosixPath(d) in p.parents for d in dirs)


def trainers_fit(nodes: list[tuple[float, float, int]], cfg: ExperimentConfig) -> bool:
    """Whether (cpus, gpus, max count) GPU nodes can hold one trial's ``num_workers`` x (cpus, 1 GPU) workers."""
    per_node = [count * min(gpus, cpus // cfg.train.cpus_per_worker) for cpus, gpus, count in nodes]
    return sum(per_node) >= cfg.train.num_workers


# ---------------------------------------------------------------------------------------------------------
# Ray autoscaler (`ray up`) files


def _mounted_dirs(commands: list[str]) -> set[str]:
    """Directories that a ``mount`` command in ``commands`` mounts (its last argument)."""
    return {c.split()[-1].rstrip("/") for c in commands if re.search(r"\bmount\s", c)}


def autoscaler_problems(doc: dict, cfg: ExperimentConfig) -> list[str]:
    schema = json.loads(RAY_SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.validators.validator_for(schema)(schema)
    problems = [f"ray-schema.json: {'.'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}"
                for e in validator.iter_errors(doc)]  # fmt: skip
    if problems:
        return problems
    types, head, cluster_max = doc.get("available_node_types", {}), doc.get("head_node_type"), doc.get("max_workers")
    if head not in types:
        return [f"head_node_type {head!r} is not one of available_node_types {sorted(types)}"]
    head_res = types[head]["resources"]
    if head_res.get("GPU") != 0 or not head_res.get("CPU"):
        problems.append(f"head type {head}: resources must be a CPU head {{CPU: N, GPU: 0}}, got {head_res}")
    if cluster_max is None:
        problems.append("max_workers (the cluster-wide cap on worker nodes) is not set")
    workers = {name: t for name, t in types.items() if name != head}
    for name, t in workers.items():
        lo, hi = t.get("min_workers"), t.get("max_workers")
        if lo is None or hi is None or not 0 <= lo <= hi <= (cluster_max or 0):
            problems.append(f"{name}: need 0 <= min_workers ({lo}) <= max_workers ({hi}) <= cluster max_workers "
                            f"({cluster_max})")  # fmt: skip
    gpu_types = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    if not gpu_types:
        problems.append("no worker node type has GPU resources > 0")
    # This package: the checkout is synced by file_mounts and pip-installed on every node type.
    mounts = doc.get("file_mounts") or {}
    checkout = [remote.rstrip("/") for remote, local in mounts.items()
                if (ROOT / Path(local).expanduser()).resolve() == ROOT.resolve()]  # fmt: skip
    if not checkout:
        problems.append("file_mounts syncs no folder that is this checkout (local path: the repository root)")

    def installs(commands: list[str]) -> bool:
        return any("pip install" in c and any(r in c.split() for r in checkout) for c in commands)

    setup = doc.get("setup_commands", [])
    runs = {head: setup + doc.get("head_setup_commands", [])}
    runs.update({name: t.get("worker_setup_commands", setup + doc.get("worker_setup_commands", []))
                 for name, t in workers.items()})  # fmt: skip
    problems += [f"{name}: no setup command pip-installs the synced checkout {checkout}"
                 for name, commands in runs.items() if checkout and not installs(commands)]  # fmt: skip
    image = (doc.get("docker") or {}).get("image")
    if image and f":{RAY_MINOR}." not in image:
        problems.append(f"docker.image {image} does not run Ray {RAY_MINOR}.x, the version pyproject.toml pins")
    if not any("ray start --head" in c and "--autoscaling-config=~/ray_bootstrap_config.yaml" in c
               for c in doc.get("head_start_ray_commands", [])):  # fmt: skip
        problems.append("head_start_ray_commands: no `ray start --head` with "
                        "--autoscaling-config=~/ray_bootstrap_config.yaml")  # fmt: skip
    if not any("ray start --address=$RAY_HEAD_IP:6379" in c for c in doc.get("worker_start_ray_commands", [])):
        problems.append("worker_start_ray_commands: no `ray start --address=$RAY_HEAD_IP:6379`")
    # Shared storage: results go to a network file system mounted on every host (and bound into the
    # container); the checkpoint may also be a file mount (a copy on every node).
    host_shared = _mounted_dirs(doc.get("initialization_commands", []) + setup)
    if image:
        binds = [o.split()[1].split(":") for o in doc["docker"].get("run_options", []) if o.startswith("-v ")]
        shared = {dst for src, dst, *_ in binds if under(src, host_shared)}
    else:
        shared = host_shared
    copied = {str(Path(remote)) for remote in mounts}
    for what, path in shared_paths(cfg).items():
        dirs = shared if what.startswith("results") else shared | copied
        if not under(path, dirs):
            problems.append(f"{what} = {path} is not on storage every node sees (shared: {sorted(dirs)})")
    nodes = [
        (t["resources"].get("CPU", 0), t["resources"]["GPU"], t.get("max_workers") or 0) for t in gpu_types.values()
    ]
    if cfg.train.use_gpu and not trainers_fit(nodes, cfg):
        problems.append(f"GPU node types cannot hold one trial's {cfg.train.num_workers} workers x "
                        f"({cfg.train.cpus_per_worker:g} CPUs, 1 GPU)")  # fmt: skip
    return problems


# ---------------------------------------------------------------------------------------------------------
# KubeRay manifests


def _qty(value: object) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def ray_cluster_problems(spec: dict, cfg: ExperimentConfig, claims: set[str], where: str) -> list[str]:
    problems = []
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{where}.enableInTreeAutoscaling must be true (the autoscaler adds the GPU pods)")
    if not str(spec.get("rayVersion", "")).startswith(f"{RAY_MINOR}."):
        problems.append(f"{where}.rayVersion {spec.get('rayVersion')!r} is not Ray {RAY_MINOR}.x (pyproject.toml)")
    groups = spec.get("workerGroupSpecs", [])
    pods = {"headGroupSpec": spec["headGroupSpec"]}
    pods.update({f"workerGroupSpecs[{g['groupName']}]": g for g in groups})
    for name, group in pods.items():
        pod = group["template"]["spec"]
        ray = pod["containers"][0]  # KubeRay runs Ray in the first container
        image = ray.get("image", "")
        if f"{RAY_MINOR}." not in image.rpartition(":")[2] or "anyorder-ray" not in image:
            problems.append(f"{where}.{name}: image {image!r} is not this package's image at Ray {RAY_MINOR}.x "
                            "(build cluster/Dockerfile)")  # fmt: skip
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mount_paths = set()
        for m in ray.get("volumeMounts", []):
            mount_paths.add(m["mountPath"])
            if m["name"] not in volumes:
                problems.append(f"{where}.{name}: volumeMount {m['name']!r} has no volume of that name")
        for v in volumes.values():
            claim = v.get("persistentVolumeClaim", {}).get("claimName")
            if claim is not None and claim not in claims:
                problems.append(f"{where}.{name}: claim {claim!r} is defined in no cluster/kuberay manifest")
        for what, path in shared_paths(cfg).items():
            if not under(path, mount_paths):
                problems.append(f"{where}.{name}: {what} = {path} is on no volume mounted in {ray['name']}")
    head_gpus = spec["headGroupSpec"]["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    if _qty(head_gpus.get("nvidia.com/gpu", 0)) > 0:
        problems.append(f"{where}.headGroupSpec: the head asks for GPUs; GPUs belong to worker groups")
    nodes = []
    for g in groups:
        label = f"{where}.workerGroupSpecs[{g['groupName']}]"
        if not DNS_LABEL.match(g["groupName"]):
            problems.append(f"{label}: groupName must be a DNS label (lower case, digits, '-')")
        lo, hi = g["minReplicas"], g["maxReplicas"]
        replicas = g.get("replicas", lo)
        if not 0 <= lo <= replicas <= hi:
            problems.append(f"{label}: need 0 <= minReplicas ({lo}) <= replicas ({replicas}) <= maxReplicas ({hi})")
        res = g["template"]["spec"]["containers"][0].get("resources", {})
        limits, requests = res.get("limits", {}), res.get("requests", {})
        gpus = _qty(limits.get("nvidia.com/gpu", 0))
        if "nvidia.com/gpu" in requests and _qty(requests["nvidia.com/gpu"]) != gpus:
            problems.append(f"{label}: nvidia.com/gpu requests must equal limits (an extended resource)")
        if gpus > 0:
            nodes.append((_qty(limits.get("cpu", 0)), gpus, hi))
    if not nodes:
        problems.append(f"{where}: no worker group has nvidia.com/gpu in its Ray container's limits")
    elif cfg.train.use_gpu and not trainers_fit(nodes, cfg):
        problems.append(f"{where}: GPU groups cannot hold one trial's {cfg.train.num_workers} workers x "
                        f"({cfg.train.cpus_per_worker:g} CPUs, 1 GPU)")  # fmt: skip
    return problems


def manifest_problems(doc: dict, claims: set[str]) -> list[str]:
    kind = doc.get("kind")
    if kind not in MANIFESTS:
        return [f"kind {kind!r} has no schema in this test: add one to MANIFESTS"]
    api, spec_schema = MANIFESTS[kind]
    schema = obj("apiVersion", "kind", "metadata", "spec", apiVersion=one_of(api), kind=one_of(kind),
                 metadata=METADATA, spec=spec_schema)  # fmt: skip
    problems = validate(doc, schema, kind)
    if problems:
        return problems
    if not DNS_LABEL.match(doc["metadata"]["name"]):
        problems.append(f"{kind}: metadata.name {doc['metadata']['name']!r} is not a DNS label")
    spec = doc["spec"]
    found, configs = invocation_problems(spec)
    problems += found
    cfg = configs[0] if configs else load_config(GPU_CONFIG)
    if kind == "RayCluster":
        problems += ray_cluster_problems(spec, cfg, claims, "spec")
    elif kind == "RayJob":
        if not configs:
            problems.append("RayJob.spec.entrypoint runs no `python -m ... --config <file>`")
        env = yaml.safe_load(spec.get("runtimeEnvYAML", "")) or {}
        if not isinstance(env, dict) or set(env) - RUNTIME_ENV_KEYS:
            problems.append(f"RayJob.spec.runtimeEnvYAML: keys must be runtime_env fields {sorted(RUNTIME_ENV_KEYS)}")
        elif not all(isinstance(v, str) for v in (env.get("env_vars") or {}).values()):
            problems.append("RayJob.spec.runtimeEnvYAML: env_vars values must be strings")
        if spec.get("shutdownAfterJobFinishes") is not True or "ttlSecondsAfterFinished" not in spec:
            problems.append("RayJob.spec: set shutdownAfterJobFinishes: true and ttlSecondsAfterFinished "
                            "(or the GPU pods outlive the sweep)")  # fmt: skip
        problems += ray_cluster_problems(spec["rayClusterSpec"], cfg, claims, "spec.rayClusterSpec")
    return problems


def kuberay_claims() -> set[str]:
    return {d["metadata"]["name"] for p in CLUSTER_YAMLS for d in load_docs(p)
            if d.get("kind") == "PersistentVolumeClaim"}  # fmt: skip


def doc_problems(doc: object, claims: set[str]) -> list[str]:
    if not isinstance(doc, dict):
        return [f"top level must be a mapping, got {type(doc).__name__}"]
    if "apiVersion" in doc or "kind" in doc:
        return manifest_problems(doc, claims)
    if "provider" in doc and "available_node_types" in doc:
        found, configs = invocation_problems(doc)
        return found + autoscaler_problems(doc, configs[0] if configs else load_config(GPU_CONFIG))
    return ["neither a Ray autoscaler cluster config (provider, available_node_types) nor a Kubernetes manifest"]


# ---------------------------------------------------------------------------------------------------------
# Tests


def test_cluster_holds_the_specs_the_readme_describes():
    names = {str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*") if p.is_file()}
    assert {"aws-gpu.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/pvc.yaml",
            "Dockerfile", "README.md"} <= names  # fmt: skip


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_cluster_yaml_is_deployable(path):
    docs = load_docs(path)
    assert docs, f"{path} holds no YAML document"
    claims = kuberay_claims()
    problems = [f"doc {i}: {p}" for i, doc in enumerate(docs) for p in doc_problems(doc, claims)]
    assert problems == []


def test_rayjob_runs_on_the_raycluster_spec():
    (cluster,) = load_docs(CLUSTER / "kuberay" / "raycluster.yaml")
    (job,) = load_docs(CLUSTER / "kuberay" / "rayjob.yaml")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]


def test_rayjob_entrypoint_is_the_sweep_on_the_gpu_config_with_shared_storage():
    (job,) = load_docs(CLUSTER / "kuberay" / "rayjob.yaml")
    (inv,) = invocations(job["spec"]["entrypoint"])
    assert inv["module"] == "anyorder_ray.sweep"
    assert importlib.util.find_spec(inv["module"]) is not None
    assert ROOT / inv["config"] == GPU_CONFIG
    cfg = load_config(GPU_CONFIG, inv["overrides"])
    assert cfg.sweep.storage_path == "/mnt/shared/runs"


def test_gpu_config_is_real_size():
    cfg = load_config(GPU_CONFIG)
    assert cfg.model.model_path and PurePosixPath(cfg.model.model_path).is_absolute()
    assert cfg.train.use_gpu and cfg.train.enable_mixed_precision and cfg.train.enable_gradient_checkpointing
    assert cfg.train.data_parallel_mode == "fsdp2"  # 16B params x 16 bytes does not fit one GPU (README)
    assert cfg.train.num_workers == 8 and cfg.sweep.max_concurrent_trials >= 1


def test_dockerfile_installs_this_package_on_the_pinned_ray():
    text = (CLUSTER / "Dockerfile").read_text(encoding="utf-8")
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert base.startswith("rayproject/ray:") and f":{RAY_MINOR}." in base
    copied = {src for line in re.findall(r"^COPY\s+(.+)$", text, flags=re.M)
              for src in line.split()[:-1] if not src.startswith("--")}  # fmt: skip
    packages = {p.rstrip("*") for p in _PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert {"pyproject.toml", "README.md"} | packages <= copied
    assert re.search(r"^RUN pip install .*-e \.$", text, flags=re.M)


# Negative tests: a mutated copy of a good spec must be rejected with a message naming the problem.


def _spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _gpu_resources(doc: dict) -> dict:
    return _spec(doc)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]


def _misspell_worker_groups(doc):
    _spec(doc)["workerGroupSpec"] = _spec(doc).pop("workerGroupSpecs")


def _min_above_max(doc):
    _spec(doc)["workerGroupSpecs"][0].update(minReplicas=5, replicas=5, maxReplicas=2)


def _drop_gpus(doc):
    for part in _gpu_resources(doc).values():
        part.pop("nvidia.com/gpu")


def _int_ray_start_param(doc):
    _spec(doc)["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def _no_autoscaling(doc):
    _spec(doc)["enableInTreeAutoscaling"] = False


def _unmount_shared(doc):
    mounts = _spec(doc)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["volumeMounts"]
    mounts[:] = [m for m in mounts if m["mountPath"] != "/mnt/shared"]


def _job_typo(doc):
    doc["spec"]["shutdownAfterJobFinish"] = doc["spec"].pop("shutdownAfterJobFinishes")


def _job_missing_config(doc):
    doc["spec"]["entrypoint"] = "python -m anyorder_ray.sweep --config tune_configs/no_such.yaml"


def _job_unknown_module(doc):
    doc["spec"]["entrypoint"] = "python -m anyorder_ray.swep --config tune_configs/llada2_mini_gpu.yaml"


def _job_bad_override(doc):
    doc["spec"]["entrypoint"] += " train.use_gpus=true"


KUBERAY_MUTATIONS = [
    ("raycluster.yaml", _misspell_worker_groups, "unknown key 'workerGroupSpec' (did you mean 'workerGroupSpecs'?)"),
    ("raycluster.yaml", _min_above_max, "0 <= minReplicas (5) <= replicas (5) <= maxReplicas (2)"),
    ("raycluster.yaml", _drop_gpus, "no worker group has nvidia.com/gpu"),
    ("raycluster.yaml", _int_ray_start_param, "rayStartParams.num-cpus: expected str, got 0"),
    ("raycluster.yaml", _no_autoscaling, "enableInTreeAutoscaling must be true"),
    ("raycluster.yaml", _unmount_shared, "= /mnt/shared/runs is on no volume mounted"),
    ("rayjob.yaml", _misspell_worker_groups, "unknown key 'workerGroupSpec'"),
    ("rayjob.yaml", _drop_gpus, "no worker group has nvidia.com/gpu"),
    ("rayjob.yaml", _job_typo, "unknown key 'shutdownAfterJobFinish' (did you mean 'shutdownAfterJobFinishes'?)"),
    ("rayjob.yaml", _job_missing_config, "--config tune_configs/no_such.yaml: no such file"),
    ("rayjob.yaml", _job_unknown_module, "`python -m anyorder_ray.swep`: no such module"),
    ("rayjob.yaml", _job_bad_override, "unknown key train.use_gpus"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("file", "mutate", "expected"),
    KUBERAY_MUTATIONS,
    ids=[f"{f}-{m.__name__.strip('_')}" for f, m, _ in KUBERAY_MUTATIONS],
)
def test_kuberay_validator_rejects_a_broken_copy(file, mutate, expected):
    (doc,) = load_docs(CLUSTER / "kuberay" / file)
    claims = kuberay_claims()
    assert doc_problems(doc, claims) == []
    broken = copy.deepcopy(doc)
    mutate(broken)
    problems = doc_problems(broken, claims)
    assert any(expected in p for p in problems), problems


def _head_type_missing(doc):
    doc["head_node_type"] = "head.gpu"


def _workers_inverted(doc):
    doc["available_node_types"]["gpu.p5"].update(min_workers=3, max_workers=1)


def _workers_over_cap(doc):
    doc["available_node_types"]["gpu.p5"]["max_workers"] = doc["max_workers"] + 1


def _no_gpu_workers(doc):
    for name, t in doc["available_node_types"].items():
        if name != doc["head_node_type"]:
            t["resources"]["GPU"] = 0


def _no_install(doc):
    doc["setup_commands"] = ["echo nothing to install"]


def _misspelt_top_key(doc):
    doc["max_worker"] = doc.pop("max_workers")


def _results_not_shared(doc):
    doc["docker"]["run_options"] = [o for o in doc["docker"]["run_options"] if not o.startswith("-v ")]


AUTOSCALER_MUTATIONS = [
    (_head_type_missing, "head_node_type 'head.gpu' is not one of"),
    (_workers_inverted, "need 0 <= min_workers (3) <= max_workers (1)"),
    (_workers_over_cap, "need 0 <= min_workers (0) <= max_workers (5) <= cluster max_workers (4)"),
    (_no_gpu_workers, "no worker node type has GPU resources > 0"),
    (_no_install, "no setup command pip-installs the synced checkout"),
    (_misspelt_top_key, "'max_worker' was unexpected"),
    (_results_not_shared, "= /mnt/shared/runs is not on storage every node sees"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("mutate", "expected"), AUTOSCALER_MUTATIONS, ids=[m.__name__.strip("_") for m, _ in AUTOSCALER_MUTATIONS]
)
def test_autoscaler_validator_rejects_a_broken_copy(mutate, expected):
    (doc,) = load_docs(CLUSTER / "aws-gpu.yaml")
    assert doc_problems(doc, set()) == []
    broken = copy.deepcopy(doc)
    mutate(broken)
    problems = doc_problems(broken, set())
    assert any(expected in p for p in problems), problems
