"""Strict, offline validation of the deployment manifests: what an API server and the KubeRay operator would refuse.

- Kubernetes kinds (ServiceAccount, RBAC, ConfigMap, CronJob): the strict Kubernetes schemas bundled by the
  kubernetes-validate package, unknown fields rejected.
- RayCluster and RayJob: infra/schemas/kuberay-<version>.schema.json, written from KubeRay's API reference, whose
  pod templates refer to the same strict Kubernetes schemas.
- infra/cluster.yaml: the cluster launcher's own schema, ray/autoscaler/ray-schema.json from the installed Ray.
- Rules the servers enforce that no schema expresses (`server_side_problems`).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES_VERSION = "1.33"
KUBERAY_SCHEMA = ROOT / "infra" / "schemas" / "kuberay-v1.5.1.schema.json"
KUBERAY_KINDS = ("RayCluster", "RayJob")
# Kubernetes refuses any other restart policy for a Job's pods.
JOB_RESTART_POLICIES = ("Never", "OnFailure")


@cache
def kuberay_schema() -> dict:
    return json.loads(KUBERAY_SCHEMA.read_text())


@cache
def _kuberay_validator() -> jsonschema.Draft202012Validator:
    strict = f"kubernetes-json-schema/v{KUBERNETES_VERSION}.0-local-strict/_definitions.json"
    definitions = json.loads((resources.files("kubernetes_validate") / strict).read_text())
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    return jsonschema.Draft202012Validator(kuberay_schema(), registry=registry)


def schema_problems(document: dict) -> list[str]:
    """Where `document` breaks its strict schema, one line per fault ("path: message")."""
    if document.get("kind") in KUBERAY_KINDS:
        errors = _kuberay_validator().iter_errors(document)
        return sorted(f"{_path(e.absolute_path)}: {e.message}" for e in errors)
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{_path(e.absolute_path)}: {e.message}"]
    return []


def server_side_problems(document: dict) -> list[str]:
    """Rules KubeRay's validation and the Kubernetes API server enforce beyond the schemas."""
    found = []
    spec = document.get("spec", {})
    if document.get("kind") == "RayJob":
        # KubeRay (ValidateRayJobSpec): the TTL only applies to a cluster that is shut down after the job.
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes", False):
            found.append("spec.ttlSecondsAfterFinished: needs shutdownAfterJobFinishes: true (KubeRay refuses it)")
        if spec.get("submissionMode", "K8sJobMode") == "K8sJobMode" and "submitterPodTemplate" in spec:
            found += _job_pod_problems(spec["submitterPodTemplate"], "spec.submitterPodTemplate")
    if document.get("kind") == "CronJob":
        template = spec.get("jobTemplate", {}).get("spec", {}).get("template", {})
        found += _job_pod_problems(template, "spec.jobTemplate.spec.template")
    return found


def problems(document: dict) -> list[str]:
    return schema_problems(document) + server_side_problems(document)


def _job_pod_problems(template: dict, where: str) -> list[str]:
    policy = template.get("spec", {}).get("restartPolicy")
    if policy not in JOB_RESTART_POLICIES:
        return [f"{where}.spec.restartPolicy: a Job's pods need one of {JOB_RESTART_POLICIES}, not {policy!r}"]
    return []


def cluster_launcher_problems(config: dict) -> list[str]:
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    errors = jsonschema.Draft7Validator(schema).iter_errors(config)
    return sorted(f"{_path(e.absolute_path)}: {e.message}" for e in errors)


def _path(parts) -> str:
    return ".".join(str(p) for p in parts) or "(document)"
