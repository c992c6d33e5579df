"""deploy/ and jobs/: every manifest parses, fits the KubeRay v1 API, and names the same image, Ray
version, entrypoint and config files as the Dockerfile and jobs/, so none of them can drift alone; and
the image and the pods keep their least-privilege settings (deploy/README.md "Security").

Two schemas check the ray.io/v1 manifests:
- KubeRay's own generated CRDs (ray-operator/config/crd/bases/ray.io_*.yaml, Apache-2.0, about a megabyte
  each), which are not vendored: the folder holding them is named by $SEGBATCH_KUBERAY_CRDS. Their
  openAPIV3Schema covers every field down to the pod templates; `strict` makes it refuse unknown keys too,
  so a misspelt or misplaced field (the mistakes a YAML edit makes) fails here rather than being pruned
  silently by the API server. These tests skip when the CRDs are absent.
- RAY_V1 below, a JSON Schema written for these tests from KubeRay's v1 API types (KubeRay 1.5-1.6): the
  top-level fields of RayCluster, RayJob and RayCronJob with their types, enums and required fields, and
  no unknown fields. The real CRDs cover all of it; it stays as the fallback, so a checkout without the
  CRDs beside it still catches a misspelt top-level field.
The cluster launcher config is validated against the schema that ships with the installed Ray.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from segbatch.cli import build_config, make_parser
from segbatch.config import RunConfig, load_config_file

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"
SECONDS_PER_DAY = 86400
# KubeRay's generated CRDs are large and KubeRay's, so they are not copied in: $SEGBATCH_KUBERAY_CRDS names
# a folder holding them (CI sets it). The tests that need them skip when it is unset or incomplete.
KUBERAY_CRDS = Path(os.environ.get("SEGBATCH_KUBERAY_CRDS", "/nonexistent"))
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}

# -- the KubeRay v1 API, as far as these manifests use it -------------------------------------------------
INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
QUANTITY = {
    "anyOf": [
        {"type": "integer"},
        {
            "type": "string",
            "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
        },
    ]
}
RESOURCES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "requests": {"type": "object", "additionalProperties": QUANTITY},
        "limits": {"type": "object", "additionalProperties": QUANTITY},
        "claims": {"type": "array"},
    },
}
CONTAINER = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "image": {"type": "string"},
        "resources": RESOURCES,
        "command": {"type": "array", "items": {"type": "string"}},
        "args": {"type": "array", "items": {"type": "string"}},
        "env": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "ports": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["containerPort"],
                "properties": {"containerPort": INT32, "name": {"type": "string"}},
            },
        },
        "volumeMounts": {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"]}},
    },
}
POD_TEMPLATE = {
    "type": "object",
    "properties": {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {"type": "array", "minItems": 1, "items": CONTAINER},
                "serviceAccountName": {"type": "string"},
                "volumes": {"type": "array"},
                "tolerations": {"type": "array"},
                "nodeSelector": STRING_MAP,
                "restartPolicy": {"enum": ["Always", "OnFailure", "Never"]},
            },
        },
    },
}
MANAGED_BY = {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]}
RAY_CLUSTER_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "required": ["headGroupSpec"],
    "properties": {
        "suspend": {"type": "boolean"},
        "managedBy": MANAGED_BY,
        "authOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "mode": {"enum": ["disabled", "token"]},
                "secretName": {"type": "string"},
                "enableK8sTokenAuth": {"type": "boolean"},
            },
        },
        "autoscalerOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "resources": RESOURCES,
                "image": {"type": "string"},
                "imagePullPolicy": {"type": "string"},
                "securityContext": {"type": "object"},
                "idleTimeoutSeconds": INT32,
                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                "version": {"enum": ["v1", "v2"]},
                "env": {"type": "array"},
                "envFrom": {"type": "array"},
                "volumeMounts": {"type": "array"},
            },
        },
        "headServiceAnnotations": STRING_MAP,
        "enableInTreeAutoscaling": {"type": "boolean"},
        "gcsFaultToleranceOptions": {"type": "object", "required": ["redisAddress"]},
        "headGroupSpec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["template"],
            "properties": {
                "template": POD_TEMPLATE,
                "headService": {"type": "object"},
                "enableIngress": {"type": "boolean"},
                "rayStartParams": STRING_MAP,
                "serviceType": {"type": "string"},
            },
        },
        "rayVersion": {"type": "string"},
        "workerGroupSpecs": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["groupName", "template"],
                "properties": {
                    "suspend": {"type": "boolean"},
                    "groupName": {"type": "string"},
                    "replicas": INT32,
                    "minReplicas": INT32,
                    "maxReplicas": INT32,
                    "idleTimeoutSeconds": INT32,
                    "rayStartParams": STRING_MAP,
                    "template": POD_TEMPLATE,
                    "scaleStrategy": {"type": "object"},
                    "numOfHosts": INT32,
                },
            },
        },
    },
}
RAY_JOB_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "activeDeadlineSeconds": {**INT32, "minimum": 1},
        "backoffLimit": {**INT32, "minimum": 0},
        "rayClusterSpec": RAY_CLUSTER_SPEC,
        "submitterPodTemplate": POD_TEMPLATE,
        "metadata": STRING_MAP,
        "clusterSelector": STRING_MAP,
        "submitterConfig": {"type": "object", "additionalProperties": False, "properties": {"backoffLimit": INT32}},
        "managedBy": MANAGED_BY,
        "deletionStrategy": {"type": "object"},
        "entrypoint": {"type": "string"},
        "runtimeEnvYAML": {"type": "string"},
        "jobId": {"type": "string"},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "entrypointResources": {"type": "string"},
        "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"},
        "ttlSecondsAfterFinished": {**INT32, "minimum": 0},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "suspend": {"type": "boolean"},
    },
}


def _resource(kind: str, spec: dict) -> dict:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": {"type": "object", "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}]},
            "spec": spec,
        },
    }


RAY_V1 = {
    "RayCluster": _resource("RayCluster", RAY_CLUSTER_SPEC),
    "RayJob": _resource("RayJob", RAY_JOB_SPEC),
    "RayCronJob": _resource(
        "RayCronJob",
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["jobTemplate", "schedule"],
            "properties": {"jobTemplate": RAY_JOB_SPEC, "schedule": {"type": "string"}, "suspend": {"type": "boolean"}},
        },
    ),
}


# -- loading ---------------------------------------------------------------------------------------------
def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifests() -> dict[str, list[dict]]:
    return {p.name: load_all(p) for p in sorted(KUBERAY.glob("*.yaml"))}


def ray_job_specs() -> dict[str, dict]:
    """Every RayJob spec the manifests run, by where it comes from."""
    found = {}
    for name, docs in manifests().items():
        for doc in docs:
            if doc["kind"] == "RayJob":
                found[name] = doc["spec"]
            elif doc["kind"] == "RayCronJob":
                found[name] = doc["spec"]["jobTemplate"]
            elif doc["kind"] == "ConfigMap":
                for key, text in doc["data"].items():
                    inner = yaml.safe_load(text)
                    if isinstance(inner, dict) and inner.get("kind") == "RayJob":
                        found[f"{name}:{key}"] = inner["spec"]
    return found


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def image_name() -> str:
    """The image the Dockerfile's build command tags."""
    found = set(re.findall(r"docker build -f deploy/Dockerfile -t (\S+) \.", dockerfile()))
    assert len(found) == 1, found
    return found.pop()


def images(node) -> list[str]:
    """Every `image:` value anywhere in a parsed manifest, ConfigMap-embedded ones included."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                out.append(value)
            elif key == "data" and isinstance(value, dict):
                out += [i for text in value.values() for i in images(yaml.safe_load(text))]
            else:
                out += images(value)
    elif isinstance(node, list):
        for value in node:
            out += images(value)
    return out


def container_path_to_repo(path: str) -> Path:
    """Map a path inside the image to the repository file the Dockerfile copied there."""
    for src, dest in re.findall(r"^COPY (?:--chown=\S+ )?(\S+/) (/\S+/)$", dockerfile(), re.M):
        if path.startswith(dest):
            return REPO / src / path[len(dest) :]
    raise AssertionError(f"{path} is not inside a folder the Dockerfile copies into the image")


def base_ray_version() -> str:
    """The Ray version in the base image's tag (the tag may be followed by a pinned digest)."""
    (version,) = re.findall(
        r"^ARG RAY_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-py\d+-gpu(?:@sha256:[0-9a-f]{64})?$", dockerfile(), re.M
    )
    return version


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in dockerfile().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        instruction, _, args = pending.strip().partition(" ")
        out.append((instruction.upper(), " ".join(args.split())))
        pending = ""
    return out


def image_user() -> tuple[int, int]:
    """The uid:gid the image's containers run as: its last USER instruction, which must be numeric."""
    users = [args for instruction, args in dockerfile_instructions() if instruction == "USER"]
    match = re.fullmatch(r"(\d+):(\d+)", users[-1]) if users else None
    assert match, f"the image's final USER must be numeric uid:gid, not {users[-1:] or 'the base image default'}"
    return int(match[1]), int(match[2])


# -- KubeRay's CRDs, made strict ---------------------------------------------------------------------------
def strict(schema: dict) -> dict:
    """A CRD's structural schema as a JSON Schema that also refuses unknown keys, at every depth.

    The API server prunes fields a CRD does not declare, silently; so every object schema that lists its
    `properties` gets additionalProperties: false, except where KubeRay asks to keep unknown fields
    (x-kubernetes-preserve-unknown-fields). x-kubernetes-int-or-string (resource quantities, ports)
    means "an integer or a string"; controller-gen already writes that as anyOf, which is kept, and added
    where missing. Other x-kubernetes-* extensions (list types, CEL rules) have no JSON Schema meaning
    and are ignored, as jsonschema ignores unknown keywords.
    """
    schema = dict(schema)
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        schema.pop("type", None)
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in schema:
        schema["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = strict(schema["additionalProperties"])
    if isinstance(schema.get("items"), dict):
        schema["items"] = strict(schema["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [strict(sub) for sub in schema[key]]
    if isinstance(schema.get("not"), dict):
        schema["not"] = strict(schema["not"])
    return schema


@functools.cache
def _crd_validator(kind: str) -> jsonschema.protocols.Validator:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader reads these in a fraction of the time
    crd = yaml.load((KUBERAY_CRDS / CRD_FILES[kind]).read_text(), Loader=loader)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["group"] == "ray.io", CRD_FILES[kind]
    assert crd["spec"]["names"]["kind"] == kind, CRD_FILES[kind]
    (v1,) = [version for version in crd["spec"]["versions"] if version["name"] == "v1"]
    schema = strict(v1["schema"]["openAPIV3Schema"])
    # apiVersion and kind are plain strings in a CRD schema; the API server routes by them, so pin them.
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": kind}
    return jsonschema.Draft202012Validator(schema)


def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    if not all((KUBERAY_CRDS / name).is_file() for name in CRD_FILES.values()):
        pytest.skip(
            f"KubeRay's CRDs are not at SEGBATCH_KUBERAY_CRDS={KUBERAY_CRDS} (set it to a folder of "
            "ray.io_{rayclusters,rayjobs,raycronjobs}.yaml from ray-operator/config/crd/bases/ of ray-project/kuberay)"
        )
    return _crd_validator(kind)


def crd_errors(doc: dict) -> list[str]:
    """Where and why doc breaks the strict CRD schema of its kind; empty if it fits."""
    errors = crd_validator(doc["kind"]).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def ray_documents() -> dict[str, dict]:
    """Every ray.io/v1 object the manifests create, ConfigMap-embedded ones included, by where it is."""
    found = {}
    for name, docs in manifests().items():
        for doc in docs:
            if doc.get("apiVersion") == "ray.io/v1":
                found[name] = doc
            elif doc["kind"] == "ConfigMap":
                for key, text in doc["data"].items():
                    inner = yaml.safe_load(text)
                    if isinstance(inner, dict) and inner.get("apiVersion") == "ray.io/v1":
                        found[f"{name}:{key}"] = inner
    return found


# The submitter pod KubeRay runs for a RayJob without submitterPodTemplate
# (ray-operator/controllers/ray/common/job.go, GetDefaultSubmitterTemplate): no securityContext, the
# namespace's default ServiceAccount, and its token mounted.
KUBERAY_DEFAULT_SUBMITTER = {"spec": {"restartPolicy": "Never", "containers": [{"name": "ray-job-submitter"}]}}


# -- the pods the manifests run ----------------------------------------------------------------------------
def cluster_specs() -> dict[str, dict]:
    """Every RayCluster spec: the long-lived cluster's and each RayJob's."""
    found = {name: doc["spec"] for name, docs in manifests().items() for doc in docs if doc["kind"] == "RayCluster"}
    found.update({where: spec["rayClusterSpec"] for where, spec in ray_job_specs().items()})
    return found


def pod_templates() -> list[tuple[str, str, dict]]:
    """(where, role, pod template) for every pod the manifests run; role: head, worker, submitter, kubectl."""
    found = []
    for where, spec in cluster_specs().items():
        found.append((where, "head", spec["headGroupSpec"]["template"]))
        found += [(f"{where}:{g['groupName']}", "worker", g["template"]) for g in spec.get("workerGroupSpecs", [])]
    for where, spec in ray_job_specs().items():
        found.append((where, "submitter", spec.get("submitterPodTemplate", KUBERAY_DEFAULT_SUBMITTER)))
    for name, docs in manifests().items():
        for doc in docs:
            if doc["kind"] == "CronJob":
                found.append((name, "kubectl", doc["spec"]["jobTemplate"]["spec"]["template"]))
    return found


# The container settings every pod's containers must end up with (pod-level ones are inherited).
POD_LEVEL = ("runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile")


def effective_security_contexts(template: dict, cluster_spec: dict | None = None) -> dict[str, dict]:
    """Each container's securityContext with the pod's inherited fields filled in, by container name.

    For a head pod, the autoscaler sidecar KubeRay adds (its securityContext comes from autoscalerOptions)
    counts too. KubeRay's wait-gcs-ready init container copies the worker container's settings.
    """
    spec = template["spec"]
    pod = {k: v for k, v in spec.get("securityContext", {}).items() if k in POD_LEVEL}
    containers = {c["name"]: c.get("securityContext", {}) for c in spec["containers"] + spec.get("initContainers", [])}
    if cluster_spec is not None and cluster_spec.get("enableInTreeAutoscaling"):
        containers["autoscaler"] = cluster_spec.get("autoscalerOptions", {}).get("securityContext", {})
    return {name: {**pod, **own} for name, own in containers.items()}


# -- NetworkPolicy, as far as these manifests use it --------------------------------------------------------
def kuberay_pod_labels(template: dict, node_type: str, cluster: str = "segbatch") -> dict[str, str]:
    """The labels a Ray pod gets: KubeRay's (ray-operator/controllers/ray/common/pod.go, labelPod), which the
    template's own override, except ray.io/node-type, ray.io/group and ray.io/cluster."""
    labels = {
        "ray.io/is-ray-node": "yes",
        "app.kubernetes.io/name": "kuberay",
        "app.kubernetes.io/created-by": "kuberay-operator",
    }
    labels.update(template.get("metadata", {}).get("labels", {}))
    labels.update({"ray.io/node-type": node_type, "ray.io/cluster": cluster, "ray.io/group": "headgroup"})
    return labels


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"this check understands matchLabels only: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_admits(peer: dict, labels: dict[str, str]) -> bool:
    if "ipBlock" in peer or "podSelector" not in peer:
        return True  # an address range or a whole namespace: could be anyone
    return _selects(peer["podSelector"], labels)


def admitted(policies: list[dict], target: dict[str, str], source: dict[str, str], port: int) -> bool:
    """Whether a TCP connection from a pod labelled `source` to `port` on a pod labelled `target`, in the
    same namespace, is allowed by these NetworkPolicies (a pod no policy selects accepts everything)."""
    selecting = [
        p["spec"]
        for p in policies
        if _selects(p["spec"]["podSelector"], target) and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True
    for spec in selecting:
        for rule in spec.get("ingress", []):
            ports = rule.get("ports") or [{}]
            port_ok = any(
                p.get("protocol", "TCP") == "TCP"
                and ("port" not in p or p["port"] <= port <= p.get("endPort", p["port"]))
                for p in ports
            )
            if port_ok and (not rule.get("from") or any(_peer_admits(peer, source) for peer in rule["from"])):
                return True
    return False


def network_policies() -> list[dict]:
    return [d for docs in manifests().values() for d in docs if d["kind"] == "NetworkPolicy"]


# -- tests -----------------------------------------------------------------------------------------------
def test_every_ray_manifest_fits_the_kuberay_v1_api():
    kinds = []
    for _name, docs in manifests().items():
        for doc in docs:
            if doc["apiVersion"] == "ray.io/v1":
                jsonschema.validate(doc, RAY_V1[doc["kind"]])
                kinds.append(doc["kind"])
    for spec in ray_job_specs().values():
        jsonschema.validate(spec, RAY_JOB_SPEC)
    assert sorted(kinds) == ["RayCluster", "RayCronJob", "RayJob"]


def test_the_schema_rejects_the_mistakes_it_exists_for():
    (doc,) = load_all(KUBERAY / "rayjob-once.yaml")
    for broken in (
        {**doc, "spec": {**doc["spec"], "shutdownAfterJobsFinish": True}},  # misspelt
        {**doc, "spec": {**doc["spec"], "activeDeadlineSeconds": "2d"}},  # wrong type
        {**doc, "spec": {**doc["spec"], "submissionMode": "K8sJob"}},  # not in the enum
        {**doc, "apiVersion": "ray.io/v1alpha1"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, RAY_V1["RayJob"])


def test_the_cluster_spec_is_the_same_everywhere():
    (cluster,) = load_all(KUBERAY / "raycluster.yaml")
    for where, spec in ray_job_specs().items():
        assert spec["rayClusterSpec"] == cluster["spec"], where


def test_the_gpu_worker_group_autoscales_on_nvidia_gpus():
    (cluster,) = load_all(KUBERAY / "raycluster.yaml")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # a CPU head that schedules no work
    head_resources = head["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head_resources["limits"]
    (gpu,) = spec["workerGroupSpecs"]
    assert 0 == gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"] and gpu["maxReplicas"] >= 2
    resources = gpu["template"]["spec"]["containers"][0]["resources"]
    # Kubernetes schedules extended resources by limits, and requests must equal them.
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    assert any(v["name"] == "dshm" and v["emptyDir"]["medium"] == "Memory" for v in gpu["template"]["spec"]["volumes"])


def test_jobs_clean_up_after_themselves_within_bounds():
    for where, spec in ray_job_specs().items():
        assert spec["shutdownAfterJobFinishes"] is True, where
        assert 0 < spec["ttlSecondsAfterFinished"] <= SECONDS_PER_DAY, where
        assert 0 < spec["activeDeadlineSeconds"], where
        assert 0 <= spec["backoffLimit"] <= 3, where


def test_nightly_runs_cannot_overlap():
    (cron,) = load_all(KUBERAY / "raycronjob-nightly.yaml")
    assert len(cron["spec"]["schedule"].split()) == 5
    # RayCronJob has no concurrency policy: the deadline must end a run before the next one starts.
    assert cron["spec"]["jobTemplate"]["activeDeadlineSeconds"] < SECONDS_PER_DAY
    docs = {d["kind"]: d for d in load_all(KUBERAY / "cronjob-rayjob.yaml")}
    assert set(docs) == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}
    cronjob = docs["CronJob"]
    assert cronjob["apiVersion"] == "batch/v1"
    assert cronjob["spec"]["schedule"] == cron["spec"]["schedule"]
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    job = cronjob["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0  # the RayJob retries; a second creator would create a second RayJob
    rayjob = ray_job_specs()["cronjob-rayjob.yaml:rayjob.yaml"]
    assert rayjob == cron["spec"]["jobTemplate"]
    assert rayjob["activeDeadlineSeconds"] < job["activeDeadlineSeconds"] < SECONDS_PER_DAY
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    script = pod["containers"][0]["command"][-1]
    mount = pod["containers"][0]["volumeMounts"][0]["mountPath"]
    assert f"kubectl create -f {mount}/rayjob.yaml" in script  # create: generateName needs it
    assert docs["Role"]["rules"][0]["resources"] == ["rayjobs"] and "create" in docs["Role"]["rules"][0]["verbs"]


def test_manifests_run_the_image_the_dockerfile_builds():
    from segbatch import __version__

    image = image_name()
    assert image.endswith(f":{__version__}")
    ray_images = [i for docs in manifests().values() for d in docs for i in images(d) if "kubectl" not in i]
    assert ray_images and set(ray_images) == {image}
    launcher = yaml.safe_load((DEPLOY / "cluster-launcher.yaml").read_text())
    assert launcher["docker"]["image"] == image
    # rayVersion must be the Ray inside the image, which comes from the base image's tag.
    base_ray = base_ray_version()
    for docs in manifests().values():
        for doc in docs:
            if doc.get("kind") == "RayCluster":
                assert doc["spec"]["rayVersion"] == base_ray
    for spec in ray_job_specs().values():
        assert spec["rayClusterSpec"]["rayVersion"] == base_ray


ENTRYPOINTS = {
    "rayjob-once.yaml": "label-once.yaml",
    "raycronjob-nightly.yaml": "label-nightly.yaml",
    "cronjob-rayjob.yaml:rayjob.yaml": "label-nightly.yaml",
}


@pytest.mark.parametrize("where", sorted(ENTRYPOINTS))
def test_entrypoints_run_segbatch_on_a_jobs_config_the_image_holds(where):
    entrypoint = ray_job_specs()[where]["entrypoint"]
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["segbatch", "run", "--config"] and len(argv) == 4, entrypoint
    config_file = container_path_to_repo(argv[3])
    assert config_file == REPO / "jobs" / ENTRYPOINTS[where]
    # segbatch's own parser accepts the entrypoint, and the file it names is a valid, runnable config.
    args = make_parser().parse_args([*argv[1:3], str(config_file)])
    config = build_config(args)
    config.check_runnable()


@pytest.mark.parametrize("name", ["label-once.yaml", "label-nightly.yaml"])
def test_job_configs_are_valid_and_ready_for_an_autoscaling_gpu_cluster(name):
    values = load_config_file(str(REPO / "jobs" / name))
    config = RunConfig.from_dict(values)
    config.check_runnable()
    # With GPU workers scaled to zero at the start, segbatch would see no GPU and fall back to CPU.
    assert config.gpus_per_actor == 1 and config.actor_bounds[1] > config.actor_bounds[0]
    assert config.progress is False  # job logs are files, not terminals
    # The image pre-stages the weights the configs use.
    (prestaged,) = re.findall(r'^ARG PRESTAGE_WEIGHTS="([^"]*)"$', dockerfile(), re.M)
    if config.weights == "default":
        assert config.model in prestaged.split()
    assert (config.redo_changed is True) == (name == "label-nightly.yaml")


def test_runtime_env_ships_code_but_not_environments_or_outputs():
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    excludes = set(env["excludes"])
    assert {".git/", ".venv/", "bench-data/", "demo-output/", "out/"} <= excludes
    assert all(isinstance(v, str) for v in env.get("env_vars", {}).values())
    secret_words = re.compile(r"secret|password|token|access_key|session", re.I)
    assert not any(secret_words.search(k) for k in env.get("env_vars", {}))


def test_documented_commands_name_files_that_exist():
    text = (REPO / "README.md").read_text() + (DEPLOY / "README.md").read_text()
    configs = set(re.findall(r"segbatch run --config (jobs/[\w.-]+)", text))
    assert {"jobs/label-once.yaml", "jobs/label-nightly.yaml"} <= configs
    for path in configs | set(re.findall(r"(deploy/[\w./-]+\.yaml)", text)):
        assert (REPO / path).is_file(), path
    assert "--runtime-env jobs/runtime_env.yaml" in text
    assert "deploy/README.md" in (REPO / "README.md").read_text()


def test_cluster_launcher_config_fits_rays_own_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((DEPLOY / "cluster-launcher.yaml").read_text())
    jsonschema.validate(config, schema)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    assert "RAY_AUTH_MODE=token" in " ".join(config["docker"]["run_options"])


def test_dockerfile_builds_on_a_cuda_base_and_prestages_with_segbatch_itself():
    text = dockerfile()
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", text, re.M)
    assert re.search(r"^RUN pip install --no-cache-dir -c constraints\.txt \.$", text, re.M)
    assert "from segbatch.models.weights import ensure_default_weights" in text
    from segbatch.models.weights import ensure_default_weights  # noqa: F401  (the name the build calls exists)

    assert re.search(r"^COPY --chown=\S+ jobs/ /app/jobs/$", text, re.M)
    assert "ENTRYPOINT" not in "\n".join(line for line in text.splitlines() if not line.startswith("#"))


# -- KubeRay's real CRDs ------------------------------------------------------------------------------------
def test_every_ray_manifest_fits_kuberays_own_crds_with_no_unknown_keys():
    found = ray_documents()
    assert sorted(doc["kind"] for doc in found.values()) == ["RayCluster", "RayCronJob", "RayJob", "RayJob"]
    for where, doc in found.items():
        assert not crd_errors(doc), f"{where}:\n" + "\n".join(crd_errors(doc))


def test_the_strict_crd_schema_rejects_mistakes_at_any_depth():
    (doc,) = load_all(KUBERAY / "rayjob-once.yaml")
    assert not crd_errors(doc)

    def broken(edit):
        bad = copy.deepcopy(doc)
        edit(bad["spec"])
        return crd_errors(bad)

    def head_pod(spec):
        return spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]

    def worker_container(spec):
        return spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]

    def submitter_pod(spec):
        return spec.setdefault("submitterPodTemplate", copy.deepcopy(KUBERAY_DEFAULT_SUBMITTER))["spec"]

    mistakes = {
        "misspelt top-level field": lambda s: s.update(shutdownAfterJobsFinish=True),
        "misspelt field in a container's securityContext": lambda s: head_pod(s)["containers"][0].update(
            securityContext={"allowPrivilegeEscalaton": False}
        ),
        "pod field put on the container": lambda s: worker_container(s).update(automountServiceAccountToken=False),
        "container field put on the pod": lambda s: head_pod(s).update(allowPrivilegeEscalation=False),
        "misspelt submitter pod field": lambda s: submitter_pod(s).update(automountServiceAcountToken=False),
        "wrong type": lambda s: s.update(activeDeadlineSeconds="2d"),
        "not in the enum": lambda s: s["rayClusterSpec"]["authOptions"].update(mode="Token"),
        "quantity that is not one": lambda s: worker_container(s)["resources"]["limits"].update(memory="32 GB"),
        "quantity of the wrong type": lambda s: worker_container(s)["resources"]["limits"].update(cpu=True),
    }
    for what, edit in mistakes.items():
        assert broken(edit), what
    # int-or-string fields take either form.
    assert not broken(lambda s: worker_container(s)["resources"]["limits"].update(cpu=8))
    assert not broken(lambda s: worker_container(s)["resources"]["limits"].update(cpu="7500m"))
    bad = copy.deepcopy(doc)
    bad["apiVersion"] = "ray.io/v1alpha1"
    assert crd_errors(bad)


def test_strict_keeps_fields_kubernetes_keeps():
    def obj(**properties):
        return {"type": "object", "properties": properties}

    schema = strict(
        obj(
            open={**obj(a={"type": "string"}), "x-kubernetes-preserve-unknown-fields": True},
            map={"type": "object", "additionalProperties": obj(b={"type": "integer"})},
            port={"x-kubernetes-int-or-string": True},
            list={"type": "array", "items": obj(c={"type": "boolean"})},
        )
    )
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid(
        {"open": {"a": "x", "extra": 1}, "map": {"k": {"b": 1}}, "port": "http", "list": [{"c": True}]}
    )
    assert validator.is_valid({"port": 8265})
    for bad in ({"extra": 1}, {"map": {"k": {"b": 1, "extra": 1}}}, {"list": [{"extra": 1}]}, {"port": 1.5}):
        assert not validator.is_valid(bad), bad


# -- the image: no root, no sudo ---------------------------------------------------------------------------
def test_the_image_does_root_steps_as_root_and_leaves_no_sudo_behind():
    steps = dockerfile_instructions()
    runs = [args for instruction, args in steps if instruction == "RUN"]
    # Nothing is run through sudo; the one mention allowed is the check that it no longer works.
    assert not [r for r in runs if re.search(r"(^|&&|\|\||;|\||\bthen|\bdo)\s*sudo\s", r.replace("! sudo -n true", ""))]
    users = [i for i, (instruction, _) in enumerate(steps) if instruction == "USER"]
    assert users and steps[users[0]] == ("USER", "root"), "root steps belong under an explicit USER root"
    as_root = " && ".join(args for instruction, args in steps[users[0] : users[1]] if instruction == "RUN")
    assert "/etc/sudoers" in as_root and "NOPASSWD" in as_root, "the base image's sudo rule must be removed"
    uid, gid = image_user()
    assert uid != 0 and steps[users[-1]] == ("USER", f"{uid}:{gid}")
    # Once back to the unprivileged user, the build proves sudo is gone.
    assert "! sudo -n true 2>/dev/null" in [args for instruction, args in steps[users[-1] :] if instruction == "RUN"]
    # What the image's processes write at run time belongs to that user: the working directory, TORCH_HOME.
    (chown,) = re.findall(r"chown (\S+) ([^&]+)", as_root)
    assert chown[0] in ("ray:users", f"{uid}:{gid}")
    (workdir,) = [args for instruction, args in steps if instruction == "WORKDIR"]
    (torch_home,) = re.findall(r"TORCH_HOME=(\S+)", dockerfile())
    assert {workdir, torch_home} <= set(chown[1].split())


# -- pod security ------------------------------------------------------------------------------------------
def test_every_container_runs_unprivileged_as_the_images_user():
    uid, gid = image_user()
    specs = cluster_specs()
    checked = set()
    for where, role, template in pod_templates():
        cluster = specs.get(where) if role == "head" else None
        contexts = effective_security_contexts(template, cluster)
        for name, sc in contexts.items():
            what = f"{where} {role} {name}"
            assert sc.get("runAsNonRoot") is True, what
            assert isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] > 0, what
            assert sc.get("allowPrivilegeEscalation") is False, what
            assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"), what
            assert sc.get("seccompProfile") == {"type": "RuntimeDefault"}, what
            assert not sc.get("privileged"), what
            if role != "kubectl":  # the segbatch image: run as its own user, which owns /app and the weights
                assert (sc["runAsUser"], sc.get("runAsGroup")) == (uid, gid), what
            if sc.get("readOnlyRootFilesystem"):  # then it needs somewhere to write: HOME on a volume
                (container,) = [c for c in template["spec"]["containers"] if c["name"] == name]
                home = {e["name"]: e.get("value") for e in container.get("env", [])}.get("HOME")
                mounts = {m["mountPath"] for m in container.get("volumeMounts", []) if not m.get("readOnly")}
                assert home in mounts, what
            checked.add((role, name))
    assert {r for r, _ in checked} == {"head", "worker", "submitter", "kubectl"}
    assert ("head", "autoscaler") in checked


# -- service account tokens --------------------------------------------------------------------------------
# What each kubectl subcommand the CronJob's script uses needs, as RBAC verbs on the object it names.
KUBECTL_VERBS = {
    "create": {"create"},
    "get": {"get"},
    "delete": {"delete"},
    "patch": {"patch"},
    "wait": {"get", "list", "watch"},
    "apply": {"get", "create", "patch"},
}


def test_only_pods_that_call_the_kubernetes_api_get_a_token():
    specs = cluster_specs()
    for where, role, template in pod_templates():
        mount = template["spec"].get("automountServiceAccountToken")
        assert isinstance(mount, bool), f"{where} {role}: set automountServiceAccountToken explicitly"
        if role == "head":  # the autoscaler sidecar scales the workers through the API
            assert mount is bool(specs[where].get("enableInTreeAutoscaling")), where
        else:
            assert mount is (role == "kubectl"), f"{where} {role}"


def test_the_cronjob_role_allows_exactly_what_its_script_runs():
    docs = {d["kind"]: d for d in load_all(KUBERAY / "cronjob-rayjob.yaml")}
    pod = docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    script = pod["containers"][0]["command"][-1]
    subcommands = re.findall(r"\bkubectl (\w+)", script)
    assert subcommands and set(subcommands) <= set(KUBECTL_VERBS), subcommands
    needed = set().union(*(KUBECTL_VERBS[s] for s in subcommands))
    (rule,) = docs["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"] and "resourceNames" not in rule
    assert set(rule["verbs"]) == needed
    binding = docs["RoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": docs["Role"]["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"]}]
    # Nothing cluster-wide, and no extra grants to the Ray pods' account: the autoscaler's Role is KubeRay's.
    kinds = [d["kind"] for docs_ in manifests().values() for d in docs_]
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    assert kinds.count("Role") == kinds.count("RoleBinding") == 1


# -- network -----------------------------------------------------------------------------------------------
RAY_PORTS = (6379, 8265, 10001)


def test_only_the_clusters_pods_the_submitter_and_the_operator_reach_ray():
    policies = network_policies()
    assert policies, "no NetworkPolicy covers the Ray pods"
    heads, workers, submitters = [], [], []
    for _where, role, template in pod_templates():
        if role == "head":
            heads.append(kuberay_pod_labels(template, "head"))
        elif role == "worker":
            workers.append(kuberay_pod_labels(template, "worker"))
        elif role == "submitter":
            submitters.append(template.get("metadata", {}).get("labels", {}))
    operator = {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator"}
    strangers = [
        {},
        {"app": "web"},
        # another Ray cluster's pod in the namespace, and a pod that only claims a segbatch label
        {"ray.io/is-ray-node": "yes", "ray.io/node-type": "worker", "app.kubernetes.io/name": "kuberay"},
        {"app.kubernetes.io/name": "segbatch"},
    ]
    for head in heads:
        for port in RAY_PORTS:
            for stranger in strangers:
                assert not admitted(policies, head, stranger, port), (stranger, port)
            for worker in workers:
                assert admitted(policies, head, worker, port)
        for submitter in submitters:
            assert admitted(policies, head, submitter, 8265)
            assert not admitted(policies, head, submitter, 6379) and not admitted(policies, head, submitter, 10001)
        assert admitted(policies, head, operator, 8265) and not admitted(policies, head, operator, 6379)
    for worker in workers:
        for peer in heads + workers:
            assert admitted(policies, worker, peer, 40000)  # Ray's node-to-node ports are chosen at start
        for outsider in strangers + submitters + [operator]:
            assert not admitted(policies, worker, outsider, 40000)
    # The policies sit in the namespace the Ray pods do, and the README says to apply them first.
    assert all("namespace" not in p["metadata"] for p in policies)
    assert "kubectl apply -f deploy/kuberay/networkpolicy.yaml" in (DEPLOY / "README.md").read_text()


# -- reproducible image ------------------------------------------------------------------------------------
def test_the_image_installs_pinned_versions_from_a_lock():
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = DEPLOY / "constraints.txt"
    pins = {}
    for line in lock.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;@]+)", line)
            assert match, f"constraints.txt: not an exact pin: {line!r}"
            pins[canonicalize_name(match[1])] = match[2]
    assert "segbatch" not in pins
    # Every dependency is pinned, within the range pyproject.toml allows.
    for dependency in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(dependency)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not pinned"
        assert requirement.specifier.contains(pins[name], prereleases=True), (dependency, pins[name])
    # The image's Ray comes from the base image; the lock must not swap it for another.
    assert pins["ray"] == base_ray_version()
    steps = dockerfile_instructions()
    installs = [args for instruction, args in steps if instruction == "RUN" and "pip install" in args]
    assert installs == ["pip install --no-cache-dir -c constraints.txt ."]
    (workdir,) = [args for instruction, args in steps if instruction == "WORKDIR"]
    copies = [args.split() for instruction, args in steps if instruction == "COPY"]
    assert any("deploy/constraints.txt" in c and c[-1] in ("./", workdir, workdir + "/") for c in copies)
    # `make lock` regenerates it from the tested environment.
    makefile = (REPO / "Makefile").read_text()
    (recipe,) = re.findall(r"^lock:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert "pip freeze --exclude-editable" in recipe and "> deploy/constraints.txt" in recipe
    # Base images: how to pin them by digest, without a made-up digest.
    readme = (DEPLOY / "README.md").read_text()
    assert "@sha256:<digest>" in readme and "docker buildx imagetools inspect" in readme and "crane digest" in readme
    assert "make lock" in readme
