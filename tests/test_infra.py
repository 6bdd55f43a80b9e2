"""The deployment files in infra/ cannot drift from the code.

Every job command written in a manifest, the Dockerfile or infra/README.md must name a real `jobs.*` module and
an existing config file, and its `--set` overrides must pass the job's own config validation; the image, the Ray
version and the user id must agree across the Dockerfile, pyproject.toml and every manifest; the GPU workers must
be able to hold the job's decode actors; the scheduled run must be the same job as rayjob.yaml and never overlap.
Every manifest document passes strict schemas (tests/manifest_schemas.py): a misspelled or misplaced field fails.
And the behaviour that no schema sees: objects defined once (so `kubectl create` reruns), a /dev/shm that holds
Ray's object store, disk requested for the model cache, deadlines that cover every retry, arguments that mean the
same after two shells, an image that builds without BuildKit, no SSH open to the world.
Nothing here starts Ray, a container or a cluster: it reads files and validates configs (fast, no network).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shlex
from functools import cache
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from pipeline.config import ConfigError, load_config
from tests.manifest_schemas import (
    KUBERAY_SCHEMA,
    cluster_launcher_problems,
    kuberay_schema,
    problems,
    schema_problems,
    server_side_problems,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBE = INFRA / "kuberay"
DOCKERFILE = INFRA / "Dockerfile"
DOCKERIGNORE = INFRA / "Dockerfile.dockerignore"
README = INFRA / "README.md"
CLUSTER_LAUNCHER = INFRA / "cluster.yaml"
MANIFESTS = {name: KUBE / f"{name}.yaml" for name in ("serviceaccount", "raycluster", "rayjob", "cronjob")}

API_VERSIONS = {
    "ServiceAccount": "v1",
    "ConfigMap": "v1",
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
    "CronJob": "batch/v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
}
EXPECTED_KINDS = {
    "serviceaccount": ["ServiceAccount"],
    "raycluster": ["RayCluster"],
    "rayjob": ["RayJob"],
    "cronjob": ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"],
}
# The one image that is not ours: the scheduled run's submitter only needs a shell and kubectl. Pinned by digest.
SCHEDULER_IMAGE = re.compile(r"^alpine/k8s:\d+\.\d+\.\d+@sha256:[0-9a-f]{64}$")
OUR_IMAGE = re.compile(r"[A-Za-z0-9.\-]+(?::\d+)?/(?:[\w.\-]+/)*specvlm:[\w.\-]+")
KUBERAY_MAX_RAYJOB_NAME = 47  # KubeRay refuses longer RayJob names (they prefix generated resource names)
CREDENTIAL_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|SESSION|CREDENTIAL|API_KEY", re.I)
SHELL_BREAKS = {";", "&&", "||", "|", "&", "(", ")", ";;"}
# Ray sizes its object store to this fraction of the memory it sees; /dev/shm must hold it or Ray uses /tmp.
OBJECT_STORE_FRACTION = 0.3
QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
QUANTITY_UNITS = {
    **{None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12},
    **{"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40},
}


# ---------------------------------------------------------------------------------------------------- loading


@cache
def docs(path: Path) -> tuple:
    return tuple(d for d in yaml.safe_load_all(path.read_text()) if d is not None)


def doc(path: Path, kind: str) -> dict:
    found = [d for d in docs(path) if d.get("kind") == kind]
    assert len(found) == 1, f"{path.relative_to(ROOT)}: expected one {kind}, found {len(found)}"
    return found[0]


@cache
def embedded_rayjob() -> dict:
    """The RayJob the scheduled run creates: cronjob.yaml's ConfigMap carries it as a YAML string."""
    configmap = doc(MANIFESTS["cronjob"], "ConfigMap")
    return yaml.safe_load(configmap["data"]["rayjob.yaml"])


def rayjobs() -> list[tuple[str, dict]]:
    return [("rayjob.yaml", doc(MANIFESTS["rayjob"], "RayJob")), ("cronjob.yaml (ConfigMap)", embedded_rayjob())]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    specs = [("raycluster.yaml", doc(MANIFESTS["raycluster"], "RayCluster")["spec"])]
    return specs + [(where, job["spec"]["rayClusterSpec"]) for where, job in rayjobs()]


def pod_specs(node, where: str = ""):
    """Every pod spec (a mapping with `containers`) anywhere in a manifest, with a readable location."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield where, node
        for key, value in node.items():
            yield from pod_specs(value, f"{where}.{key}" if where else key)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from pod_specs(value, f"{where}[{i}]")


def all_pod_specs() -> list[tuple[str, dict]]:
    found = []
    for name, path in MANIFESTS.items():
        for d in docs(path):
            found += [(f"{name}.yaml {d['kind']}: {w}", p) for w, p in pod_specs(d)]
    found += [(f"cronjob.yaml embedded RayJob: {w}", p) for w, p in pod_specs(embedded_rayjob())]
    return found


def manifest_documents() -> list[tuple[str, dict]]:
    """Every document of every manifest, the RayJob inside cronjob.yaml's ConfigMap included."""
    found = [
        (f"{name}.yaml {d['kind']} {d['metadata'].get('name')}", d)
        for name, path in MANIFESTS.items()
        for d in docs(path)
    ]
    return found + [("cronjob.yaml embedded RayJob", embedded_rayjob())]


def quantity(value) -> float:
    """A Kubernetes quantity ("16Gi", "500m", 4) as a number (bytes, cores)."""
    match = QUANTITY.match(str(value))
    assert match, f"not a Kubernetes quantity: {value!r}"
    return float(match[1]) * QUANTITY_UNITS[match[2]]


def string_values(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from string_values(value)
    elif isinstance(node, list):
        for value in node:
            yield from string_values(value)


@cache
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.strip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip()[:-1] + " " if raw.rstrip().endswith("\\") else raw
        if not raw.rstrip().endswith("\\"):
            lines.append(current)
            current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "") for line in lines]


def dockerfile_args() -> dict[str, str]:
    args = {}
    for instruction, rest in dockerfile():
        if instruction == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key.strip()] = value.strip().strip('"')
    return args


def dockerfile_env() -> dict[str, str]:
    env = {}
    for instruction, rest in dockerfile():
        if instruction == "ENV":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def dockerfile_uid() -> int:
    users = [rest.strip() for instruction, rest in dockerfile() if instruction == "USER"]
    assert users, "the Dockerfile sets no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"USER {users[-1]!r}: use a numeric uid so Kubernetes' runAsNonRoot can verify it"
    return int(uid)


def ray_version() -> str:
    version = dockerfile_args().get("RAY_VERSION")
    assert version, "infra/Dockerfile has no `ARG RAY_VERSION=...`"
    return version


@cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement(name: str, group: str | None = None) -> Requirement:
    project = pyproject()["project"]
    reqs = project["dependencies"] if group is None else project["optional-dependencies"][group]
    found = [Requirement(r) for r in reqs if Requirement(r).name == name]
    assert found, f"pyproject.toml lists no {name} requirement"
    return found[0]


@cache
def readme_code_blocks() -> tuple[str, ...]:
    return tuple(re.findall(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", README.read_text(), re.S | re.M))


# ------------------------------------------------------------------------------------------------ job commands


def shell_lines(text: str) -> list[str]:
    """Logical shell lines: backslash-continued lines joined."""
    return [line for line in re.sub(r"\\\n\s*", " ", text).splitlines() if line.strip()]


def job_invocations(command_line: str) -> list[tuple[str, list[str]]]:
    """`python -m jobs.X args...` inside one shell line -> [(X, args)], args up to the next shell separator."""
    lexer = shlex.shlex(command_line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    found = []
    for i in range(len(tokens) - 2):
        if (
            re.fullmatch(r"(.*/)?python(3(\.\d+)?)?", tokens[i])
            and tokens[i + 1] == "-m"
            and (tokens[i + 2].startswith("jobs."))
        ):
            args = []
            for token in tokens[i + 3 :]:
                if token in SHELL_BREAKS:
                    break
                args.append(token)
            found.append((tokens[i + 2].removeprefix("jobs."), args))
    return found


@cache
def job_commands() -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """Every job command written in infra/: (where, job module, args)."""
    found = []

    def scan(where: str, text: str):
        for line in shell_lines(text):
            if "jobs." in line:
                found.extend((where, job, tuple(args)) for job, args in job_invocations(line))

    for path in [*MANIFESTS.values(), CLUSTER_LAUNCHER]:
        for d in docs(path):
            if d.get("kind") == "ConfigMap":  # YAML files inside a ConfigMap are scanned parsed, below
                d = {key: value for key, value in d.get("data", {}).items() if not key.endswith((".yaml", ".yml"))}
            for value in string_values(d):
                scan(path.relative_to(ROOT).as_posix(), value)
    for value in string_values(embedded_rayjob()):
        scan("infra/kuberay/cronjob.yaml (embedded RayJob)", value)
    for block in readme_code_blocks():
        scan("infra/README.md", block)
    for instruction, rest in dockerfile():
        if instruction in ("CMD", "ENTRYPOINT", "RUN"):
            text = shlex.join(json.loads(rest)) if rest.strip().startswith("[") else rest
            scan("infra/Dockerfile", text)
    return tuple(found)


@cache
def cli_defaults() -> dict[str, str]:
    """DEFAULT_CONFIGS from pipeline/cli.py, read without importing it (the import pulls in torch)."""
    tree = ast.parse((ROOT / "pipeline/cli.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DEFAULT_CONFIGS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("pipeline/cli.py has no DEFAULT_CONFIGS")


def job_task(module: str) -> str:
    """The task a jobs/<module>.py entry point runs: the argument of its `main("...")` call."""
    path = ROOT / "jobs" / f"{module}.py"
    assert path.is_file(), f"jobs/{module}.py does not exist"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "main" and node.args:
            return ast.literal_eval(node.args[0])
    raise AssertionError(f"jobs/{module}.py calls no main(task)")


def parse_job_args(args) -> argparse.Namespace:
    """The job CLI's arguments (pipeline/cli.py): --config PATH and repeated --set KEY=VALUE, nothing else."""
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False, allow_abbrev=False)
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    namespace, unknown = parser.parse_known_args(list(args))
    assert not unknown, f"arguments the job CLI does not accept: {unknown}"
    return namespace


def command_id(command) -> str:
    where, job, args = command
    return f"{where}: jobs.{job} {' '.join(args)}"[:120]


def resolved_config(job: str, args) -> tuple[Path, list[str]]:
    task = job_task(job)
    namespace = parse_job_args(args)
    return ROOT / (namespace.config or cli_defaults()[task]), [f"task.kind={task}", *namespace.set]


# ------------------------------------------------------------------------------------------------------ tests


def test_infra_files_exist():
    for path in [DOCKERFILE, DOCKERIGNORE, README, CLUSTER_LAUNCHER, *MANIFESTS.values()]:
        assert path.is_file(), f"{path.relative_to(ROOT)} is missing"


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_kinds_and_api_versions(name):
    found = docs(MANIFESTS[name])
    assert all(isinstance(d, dict) for d in found), f"{name}.yaml: every document must be a mapping"
    assert [d.get("kind") for d in found] == EXPECTED_KINDS[name]
    for d in found:
        assert d.get("apiVersion") == API_VERSIONS[d["kind"]], f"{name}.yaml {d['kind']}: apiVersion"
        meta = d.get("metadata") or {}
        assert meta.get("name"), f"{name}.yaml {d['kind']}: metadata.name"
        assert "namespace" not in meta, f"{name}.yaml {d['kind']}: leave the namespace to `kubectl -n`"


def test_embedded_rayjob_parses_with_a_unique_name_per_run():
    job = embedded_rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    prefix = job["metadata"].get("generateName")
    assert prefix and "name" not in job["metadata"], "each scheduled run needs its own name: use generateName"
    assert len(prefix) + 5 <= KUBERAY_MAX_RAYJOB_NAME, f"generateName {prefix!r} makes names KubeRay refuses"
    assert len(doc(MANIFESTS["rayjob"], "RayJob")["metadata"]["name"]) <= KUBERAY_MAX_RAYJOB_NAME


def test_cluster_launcher_parses_with_a_gpu_worker_type():
    config = docs(CLUSTER_LAUNCHER)[0]
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    head = types[config["head_node_type"]]
    gpu_types = [t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU")]
    assert gpu_types, "cluster.yaml: no worker node type with GPU resources"
    for node_type in gpu_types:
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]
        assert re.match(r"(g\d|p\d)", node_type["node_config"]["InstanceType"]), "GPU workers need a GPU instance"
    for name, node_type in types.items():
        profile = node_type["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Arn") or profile.get("Name"), f"cluster.yaml {name}: S3 access needs an instance profile"
    assert head["resources"].get("CPU") == 0, "the head runs no tasks: job work belongs on the workers"
    run_options = " ".join(config["docker"].get("run_options", []))
    assert "RAY_AUTH_MODE=token" in run_options, "cluster.yaml: enable Ray token authentication on every node"
    assert any("auth_token" in target for target in config.get("file_mounts", {})), "cluster.yaml: mount the token"


@pytest.mark.parametrize("where,spec", ray_cluster_specs(), ids=lambda x: x if isinstance(x, str) else "")
def test_ray_cluster_spec(where, spec):
    assert spec["rayVersion"] == ray_version(), f"{where}: rayVersion must be the image's Ray ({ray_version()})"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: enable Ray token authentication"
    head = spec["headGroupSpec"]
    groups = [("head", head), *[(g["groupName"], g) for g in spec["workerGroupSpecs"]]]
    for name, group in groups:
        params = group.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), f"{where} {name}: rayStartParams take strings"
    assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: keep tasks and actors off the head"
    if spec.get("enableInTreeAutoscaling"):
        sidecar = spec.get("autoscalerOptions", {}).get("securityContext", {})
        assert sidecar.get("allowPrivilegeEscalation") is False, f"{where}: lock down the autoscaler sidecar too"
    gpu_groups = [g for g in spec["workerGroupSpecs"] if gpus_per_pod(g)]
    assert gpu_groups, f"{where}: no worker group asks for nvidia.com/gpu"
    for group in gpu_groups:
        pod = group["template"]["spec"]
        assert group.get("minReplicas", 0) <= group.get("replicas", 0) <= group["maxReplicas"], f"{where}: replicas"
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), (
            f"{where} {group['groupName']}: tolerate the nvidia.com/gpu taint of GPU nodes"
        )
        for container in pod["containers"]:
            resources = container.get("resources", {})
            for kind in ("cpu", "memory"):
                assert kind in resources.get("limits", {}), f"{where}: set {kind} limits on GPU workers"
            requested = resources.get("requests", {}).get("nvidia.com/gpu")
            assert requested in (None, resources["limits"].get("nvidia.com/gpu")), "GPU requests must equal limits"


def gpus_per_pod(group: dict) -> float:
    containers = group["template"]["spec"]["containers"]
    return sum(float(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in containers)


def test_pods_run_as_non_root_with_the_image_user():
    uid = dockerfile_uid()
    assert uid != 0
    found = all_pod_specs()
    assert len(found) >= 8, "fewer pod specs than expected: did a manifest lose its head/worker/submitter pods?"
    for where, pod in found:
        context = pod.get("securityContext", {})
        assert context.get("runAsNonRoot") is True, f"{where}: securityContext.runAsNonRoot: true"
        assert context.get("runAsUser", 0) != 0, f"{where}: runAsUser must not be root"
        for container in pod["containers"]:
            if OUR_IMAGE.fullmatch(container["image"]):
                assert context.get("runAsUser") == uid, f"{where}: runAsUser must be the image's USER ({uid})"
            own = container.get("securityContext", {})
            assert own.get("allowPrivilegeEscalation") is False, f"{where} {container['name']}: no privilege escalation"
            assert own.get("runAsUser", uid) != 0 and not own.get("privileged"), f"{where} {container['name']}: root"


def test_one_image_everywhere_tagged_with_the_project_version():
    refs = {}
    for path in [DOCKERFILE, README, CLUSTER_LAUNCHER, *MANIFESTS.values()]:
        for ref in OUR_IMAGE.findall(path.read_text()):
            refs.setdefault(ref, set()).add(path.relative_to(ROOT).as_posix())
    assert len(refs) == 1, f"the image is named differently across infra/: {refs}"
    image = next(iter(refs))
    version = pyproject()["project"]["version"]
    assert image.rsplit(":", 1)[1] == version, f"tag the image with the project version {version}: {image}"
    with_pods = [path for path in MANIFESTS.values() if any(next(pod_specs(d), None) for d in docs(path))]
    for path in [README, *with_pods, CLUSTER_LAUNCHER]:
        assert image in path.read_text(), f"{path.relative_to(ROOT)} does not use the image {image}"
    assert docs(CLUSTER_LAUNCHER)[0]["docker"]["image"] == image
    for where, pod in all_pod_specs():
        for container in pod["containers"]:
            assert container["image"] == image or SCHEDULER_IMAGE.match(container["image"]), (
                f"{where}: unexpected image {container['image']!r} (pin any other image by digest)"
            )


def test_ray_version_matches_pyproject():
    version = Version(ray_version())
    ray_req = requirement("ray", "pipeline")
    assert version in ray_req.specifier, f"image Ray {version} is outside pyproject's {ray_req}"
    lower = [Version(s.version) for s in ray_req.specifier if s.operator in (">=", "==", "~=")]
    assert lower, f"pyproject's {ray_req} has no lower bound to match"
    assert version.release[:2] == lower[0].release[:2], (
        f"image Ray {version} is not the version pyproject's {ray_req} is tested with"
    )
    from_line = [rest for instruction, rest in dockerfile() if instruction == "FROM"]
    assert from_line and from_line[-1].startswith("rayproject/ray:${RAY_VERSION}"), "base on the official Ray image"


def test_dockerfile_installs_the_project_without_moving_torch():
    args, env = dockerfile_args(), dockerfile_env()
    runs = [rest for instruction, rest in dockerfile() if instruction == "RUN"]
    installs = [cmd for run in runs for cmd in re.split(r"&&|;|\|\|", run) if re.search(r"\bpip3? install\b", cmd)]
    project = [cmd for cmd in installs if re.search(r"(^|\s)(-e\s+)?['\"]?\.(\[[\w,]+\])?['\"]?(\s|$)", cmd)]
    assert project, "the Dockerfile does not pip install the project"
    for cmd in project:
        assert "[pipeline]" in cmd, f"install the project with its pipeline extra: {cmd.strip()}"
        assert re.search(r"(--constraint|-c)\s+\S+", cmd) or "--no-deps" in cmd, (
            f"installing the project may replace the image's CUDA torch / Ray: constrain it ({cmd.strip()})"
        )
    torch_req = requirement("torch")
    for cmd in installs:
        for token in shlex.split(cmd):
            if re.match(r"torch\b", token) and not token.startswith("torch=="):
                raise AssertionError(f"unpinned torch install in the Dockerfile: {cmd.strip()}")
            if token.startswith("torch=="):
                pin = token.removeprefix("torch==")
                pin = args.get(pin[2:-1], "") if re.fullmatch(r"\$\{\w+\}", pin) else pin
                assert re.fullmatch(r"\d+(\.\d+)+", pin), f"torch must be pinned to a release, got {token!r}"
                assert Version(pin) in torch_req.specifier, f"torch {pin} is outside pyproject's {torch_req}"
    user = [rest.strip() for instruction, rest in dockerfile() if instruction == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root USER"
    assert dockerfile_uid() != 0
    assert [rest for instruction, rest in dockerfile() if instruction == "WORKDIR"], "set WORKDIR to the project"
    assert env.get("HF_HUB_OFFLINE") == "1", "nothing may be downloaded from the Hugging Face Hub at run time"
    for name in [*env, *args]:
        assert not CREDENTIAL_NAME.search(name), f"no credentials in the image: {name}"


def test_dockerfile_copies_only_what_the_context_allows():
    allowed = [
        line.strip().removeprefix("!").rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip().startswith("!")
    ]
    assert DOCKERIGNORE.read_text().splitlines().count("*") == 1, "the .dockerignore is an allow-list: start with *"
    copies = [rest for instruction, rest in dockerfile() if instruction in ("COPY", "ADD")]
    assert copies
    for rest in copies:
        sources = [t for t in shlex.split(rest) if not t.startswith("--")][:-1]
        for source in sources:
            source = source.rstrip("/")
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repo"
            assert source in allowed, f"Dockerfile copies {source}, which infra/Dockerfile.dockerignore excludes"
    workdir = [rest for instruction, rest in dockerfile() if instruction == "WORKDIR"][-1].strip()
    cache_dir = dockerfile_env().get("SPECVLM_CACHE")
    assert cache_dir, "set SPECVLM_CACHE (where model weights from object storage are copied)"
    for where, pod in all_pod_specs():
        for container in pod["containers"]:
            assert container.get("workingDir", workdir) == workdir, f"{where}: Ray must start in {workdir}"
            for mount in container.get("volumeMounts", []):
                if mount["name"] == "model-cache":
                    assert mount["mountPath"] == cache_dir, f"{where}: mount the model cache at SPECVLM_CACHE"


def test_no_credentials_inline():
    for where, pod in all_pod_specs():
        for container in pod["containers"]:
            for var in container.get("env", []):
                assert isinstance(var.get("value", ""), str), f"{where} {var['name']}: env values must be strings"
                if CREDENTIAL_NAME.search(var["name"]):
                    assert "value" not in var, f"{where}: {var['name']} must come from a Secret (valueFrom), not inline"
            for source in container.get("envFrom", []):
                assert set(source) <= {"secretRef", "configMapRef", "prefix"}
    for path in [DOCKERFILE, README, CLUSTER_LAUNCHER, *MANIFESTS.values()]:
        text = path.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{path.name}: an AWS access key id"
        secret = re.search(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{30,}", text)
        assert not secret, f"{path.name}: an AWS secret key"
        assert not re.search(r"kind:\s*Secret\b", text), f"{path.name}: do not ship Secrets in manifests"


def test_every_object_is_defined_once_and_every_service_account_used_exists():
    """An object defined in two files breaks `kubectl create -f` of the second once the first exists."""
    defined: dict[tuple[str, str], str] = {}
    for name, path in MANIFESTS.items():
        for d in docs(path):
            key = (d["kind"], d["metadata"]["name"])
            assert key not in defined, f"{key[0]} {key[1]} is defined in {defined[key]} and {name}.yaml: define it once"
            defined[key] = f"{name}.yaml"
    for where, pod in all_pod_specs():
        used = pod.get("serviceAccountName")
        assert used is None or ("ServiceAccount", used) in defined, f"{where} uses ServiceAccount {used}, never defined"


def test_readme_creates_only_what_a_rerun_deletes_first():
    """`kubectl create -f FILE` fails on any object of FILE that exists: only the RayJob is created (and deleted
    before a rerun); everything else is applied."""
    for block in readme_code_blocks():
        for line in shell_lines(block):
            tokens = shlex.split(line.split("#")[0])
            if tokens[:1] == ["kubectl"] and "create" in tokens and "-f" in tokens:
                path = ROOT / tokens[tokens.index("-f") + 1]
                kinds = {d["kind"] for d in docs(path)}
                assert kinds == {"RayJob"}, f"infra/README.md: `kubectl create -f {path.name}` also creates {kinds}"


# ---- job commands: real modules, real configs, valid overrides


def test_job_commands_are_written_where_expected():
    places = {where for where, _, _ in job_commands()}
    for required in ["infra/kuberay/rayjob.yaml", "infra/kuberay/cronjob.yaml (embedded RayJob)", "infra/README.md"]:
        assert required in places, f"no `python -m jobs.<task>` command found in {required}"
    readme = [args for where, _, args in job_commands() if where == "infra/README.md"]
    assert any(parse_job_args(a).config is None for a in readme), "README: show the demo job (no --config)"
    assert any(parse_job_args(a).config for a in readme), "README: show a real job (--config configs/...)"
    assert any(
        "ray job submit" in line and "--working-dir" in line and "python -m jobs." in line
        for block in readme_code_blocks()
        for line in shell_lines(block)
    ), "README: show `ray job submit --working-dir . -- python -m jobs....`"
    for _, job in rayjobs():
        assert job_invocations(job["spec"]["entrypoint"]), "the RayJob entrypoint must run a job module"


@pytest.mark.parametrize("command", job_commands(), ids=command_id)
def test_job_command_names_a_real_module_and_config(command):
    where, job, args = command
    assert (ROOT / "jobs" / f"{job}.py").is_file(), f"{where}: jobs/{job}.py does not exist"
    config, _ = resolved_config(job, args)
    assert config.is_file(), (
        f"{where}: the config {config.relative_to(ROOT)} does not exist (a manifest or the README names it)"
    )


@pytest.mark.parametrize("command", job_commands(), ids=command_id)
def test_job_command_overrides_are_valid(command):
    """The job's own validation (unknown keys, types, ranges) of the config with every --set, as `python -m` would."""
    where, job, args = command
    config, overrides = resolved_config(job, args)
    if not config.is_file():
        # Reported by test_job_command_names_a_real_module_and_config; still check the keys and types of the
        # overrides against the schema, on the task's demo config.
        config = ROOT / cli_defaults()[job_task(job)]
    try:
        load_config(config, overrides)
    except ConfigError as exc:
        raise AssertionError(f"{where}: {' '.join(args)}\n{exc}") from None


@pytest.mark.parametrize("where,job", rayjobs(), ids=lambda x: x if isinstance(x, str) else "")
def test_rayjob_cluster_can_hold_the_decode_actors(where, job):
    [(module, args)] = job_invocations(job["spec"]["entrypoint"])
    config_path, overrides = resolved_config(module, args)
    if not config_path.is_file():  # reported by test_job_command_names_a_real_module_and_config
        config_path = ROOT / cli_defaults()[job_task(module)]
    compute = load_config(config_path, overrides).compute
    per_actor = 1.0 if compute.num_gpus == "auto" else float(compute.num_gpus)
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(gpus_per_pod(g) * g["maxReplicas"] for g in groups)
    assert compute.actors * per_actor <= gpus, (
        f"{where}: {compute.actors} decode actors x {per_actor} GPU need more than the {gpus:g} GPUs of the workers"
    )
    assert per_actor > 0, f"{where}: the RayJob's decode actors should run on the GPU workers"


# ---- the scheduled run


def test_cronjob_runs_the_same_rayjob_without_overlap():
    cron = doc(MANIFESTS["cronjob"], "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid", "two runs writing the same output must never overlap"
    original, copy = doc(MANIFESTS["rayjob"], "RayJob"), embedded_rayjob()
    difference = first_difference(original["spec"], copy["spec"])
    assert difference is None, (
        f"cronjob.yaml's RayJob differs from rayjob.yaml at spec{difference}: the scheduled run must be the same job"
    )
    assert copy["metadata"]["labels"].items() >= original["metadata"]["labels"].items()

    configmap = doc(MANIFESTS["cronjob"], "ConfigMap")
    script = configmap["data"]["submit.sh"]
    selector = re.search(r'selector="([^"=]+)=([^"]+)"', script)
    assert selector and copy["metadata"]["labels"].get(selector[1]) == selector[2], (
        "submit.sh finds earlier runs by a label the scheduled RayJob does not carry"
    )
    job_spec = cron["spec"]["jobTemplate"]["spec"]
    pod = job_spec["template"]["spec"]
    [container] = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if v.get("configMap", {}).get("name") == configmap["metadata"]["name"])
    directory = mounts[volume["name"]]
    assert f"{directory}/rayjob.yaml" in script, "submit.sh must create the RayJob from the mounted ConfigMap"
    assert f"{directory}/submit.sh" in container["command"] + container.get("args", []), "run the mounted submit.sh"
    attempts = original["spec"].get("backoffLimit", 0) + 1
    longest_run = attempts * original["spec"]["activeDeadlineSeconds"]  # KubeRay's deadline holds per attempt
    assert job_spec["activeDeadlineSeconds"] >= longest_run + 3600, (
        f"the submitter gives up after {job_spec['activeDeadlineSeconds']} s, but the RayJob may run {attempts} "
        f"attempts of {original['spec']['activeDeadlineSeconds']} s (and start a cluster for each)"
    )

    role = doc(MANIFESTS["cronjob"], "Role")
    binding = doc(MANIFESTS["cronjob"], "RoleBinding")
    granted = {
        v
        for rule in role["rules"]
        if "ray.io" in rule["apiGroups"] and "rayjobs" in rule["resources"]
        for v in rule["verbs"]
    }
    assert {"create", "get", "list"} <= granted, f"the submitter may only {sorted(granted)} rayjobs"
    assert not granted & {"delete", "deletecollection", "*"}, "the submitter needs no delete rights"
    role_ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["roleRef"] == role_ref, "the RoleBinding must bind the submitter's Role"
    assert {"kind": "ServiceAccount", "name": pod["serviceAccountName"]} in [
        {k: s[k] for k in ("kind", "name")} for s in binding["subjects"]
    ], "the RoleBinding must bind the CronJob's ServiceAccount"


def first_difference(a, b, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{path}.{key}"
            found = first_difference(a[key], b[key], f"{path}.{key}")
            if found is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path} (length)"
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    return None if a == b else path


def test_readme_names_only_files_that_exist():
    text = README.read_text()
    for path in [*MANIFESTS.values(), DOCKERFILE, CLUSTER_LAUNCHER]:
        assert path.relative_to(ROOT).as_posix() in text, f"infra/README.md does not document {path.name}"
    for block in readme_code_blocks():
        for ref in re.findall(r"(?<![\w./-])((?:infra|configs|jobs)/[\w./-]*\w)", block):
            assert (ROOT / ref).exists(), f"infra/README.md refers to {ref}, which does not exist"


# ---- strict schemas: a misspelled, misplaced or mistyped field fails here, not at `kubectl apply`


@pytest.mark.parametrize("where,document", manifest_documents(), ids=lambda x: x if isinstance(x, str) else "")
def test_manifest_document_passes_its_strict_schema(where, document):
    assert problems(document) == [], f"{where}:\n" + "\n".join(problems(document))


def test_cluster_launcher_passes_rays_own_schema():
    assert cluster_launcher_problems(docs(CLUSTER_LAUNCHER)[0]) == []
    config = {**docs(CLUSTER_LAUNCHER)[0], "head_setup_commandz": []}
    assert any("head_setup_commandz" in p for p in cluster_launcher_problems(config))


def test_kuberay_schema_records_the_release_it_follows():
    assert kuberay_schema()["x-kuberay-version"] in KUBERAY_SCHEMA.name
    assert kuberay_schema()["x-kuberay-version"] in README.read_text(), "infra/README.md: name the KubeRay release"


def _rayjob():
    return json.loads(json.dumps(doc(MANIFESTS["rayjob"], "RayJob")))  # a deep copy to break


def _worker(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]


def _renamed(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def _typo_in_submitter_config(job):
    _renamed(job["spec"]["submitterConfig"], "backoffLimit", "backoffLimt")


def _resource_for_resources(job):
    _renamed(_worker(job)["containers"][0], "resources", "resource")


def _string_for_boolean(job):
    job["spec"]["shutdownAfterJobFinishes"] = "true"


def _lowercase_env_from(job):
    _renamed(job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0], "envFrom", "envfrom")


def _auth_secret_name(job):  # added to authOptions after KubeRay 1.5.1
    job["spec"]["rayClusterSpec"]["authOptions"]["secretName"] = "specvlm-ray-token"


def _auth_k8s_token(job):  # added to authOptions after KubeRay 1.5.1
    job["spec"]["rayClusterSpec"]["authOptions"]["enableK8sTokenAuth"] = True


def _restart_always_in_the_submitter(job):
    job["spec"]["submitterPodTemplate"]["spec"]["restartPolicy"] = "Always"


def _ttl_without_shutdown(job):
    job["spec"]["shutdownAfterJobFinishes"] = False


@pytest.mark.parametrize(
    "fault,expected",
    [
        (_typo_in_submitter_config, "'backoffLimt' was unexpected"),
        (_resource_for_resources, "'resource' was unexpected"),
        (_string_for_boolean, "'true' is not of type 'boolean'"),
        (_lowercase_env_from, "'envfrom' was unexpected"),
        (_auth_secret_name, "'secretName' was unexpected"),
        (_auth_k8s_token, "'enableK8sTokenAuth' was unexpected"),
        (_restart_always_in_the_submitter, "restartPolicy: a Job's pods need one of"),
        (_ttl_without_shutdown, "ttlSecondsAfterFinished: needs shutdownAfterJobFinishes"),
    ],
    ids=lambda x: x.__name__.strip("_") if callable(x) else "",
)
def test_a_broken_rayjob_is_refused(fault, expected):
    job = _rayjob()
    assert problems(job) == []
    fault(job)
    found = problems(job)
    assert any(expected in p for p in found), f"{fault.__name__} slipped past the checks: {found}"


def test_broken_kubernetes_objects_are_refused():
    cron = json.loads(json.dumps(doc(MANIFESTS["cronjob"], "CronJob")))
    _renamed(cron["spec"], "concurrencyPolicy", "concurrencypolicy")
    assert any("'concurrencypolicy' was unexpected" in p for p in schema_problems(cron))
    cron = json.loads(json.dumps(doc(MANIFESTS["cronjob"], "CronJob")))
    cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["restartPolicy"] = "Always"
    assert any("restartPolicy" in p for p in server_side_problems(cron))


# ---- behaviour no schema sees


def ray_pod_groups() -> list[tuple[str, dict]]:
    """(where, pod spec) of every Ray head and worker group."""
    found = []
    for where, spec in ray_cluster_specs():
        groups = [("head", spec["headGroupSpec"]), *[(g["groupName"], g) for g in spec["workerGroupSpecs"]]]
        found += [(f"{where} {name}", group["template"]["spec"]) for name, group in groups]
    return found


def test_shared_memory_holds_rays_object_store():
    """Ray puts its object store (30% of the memory) in /dev/shm only if it fits there, else on disk in /tmp.
    KubeRay mounts a /dev/shm as large as the container's memory, unless the pod brings its own."""
    for where, pod in ray_pod_groups():
        ray_container = pod["containers"][0]
        memory = quantity(ray_container["resources"]["limits"]["memory"])
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for mount in ray_container.get("volumeMounts", []):
            if mount["mountPath"] == "/dev/shm":
                size = volumes[mount["name"]].get("emptyDir", {}).get("sizeLimit")
                assert size and quantity(size) >= OBJECT_STORE_FRACTION * memory, (
                    f"{where}: /dev/shm of {size} cannot hold Ray's object store ({OBJECT_STORE_FRACTION:.0%} of "
                    f"{ray_container['resources']['limits']['memory']}); size it up or leave it to KubeRay"
                )


def test_disk_for_emptydirs_is_requested():
    """A pod that can fill an emptyDir on disk must ask for that much ephemeral storage, or the scheduler may put
    it on a node without the room, which then evicts it."""
    for where, pod in all_pod_specs():
        on_disk = [v["emptyDir"] for v in pod.get("volumes", []) if "emptyDir" in v]
        needed = sum(quantity(e["sizeLimit"]) for e in on_disk if e.get("medium") != "Memory" and "sizeLimit" in e)
        assert all("sizeLimit" in e for e in on_disk), f"{where}: give every emptyDir a sizeLimit"
        requested = sum(
            quantity(c.get("resources", {}).get("requests", {}).get("ephemeral-storage", 0)) for c in pod["containers"]
        )
        assert requested >= needed, f"{where}: emptyDirs of {needed / 2**30:g} GiB, ephemeral-storage requested less"


def test_job_arguments_mean_the_same_after_two_shells():
    """`ray job submit -- ARGS` runs ARGS in a shell on the head after the submitting shell parsed them; Ray 2.60
    re-quotes them, older clients joined them as they were. Arguments with nothing a shell interprets (no glob,
    no quote, no $) are the same either way."""
    submitted = [(where, job["spec"]["entrypoint"]) for where, job in rayjobs()]
    for block in readme_code_blocks():
        for line in shell_lines(block):
            if "ray job submit" in line:
                submitted.append(("infra/README.md", line.split(" -- ", 1)[1]))
    assert len(submitted) >= 4
    for where, command in submitted:
        for token in shlex.split(command):
            assert shlex.quote(token) == token, (
                f"{where}: {token!r} changes meaning between the two shells: name a folder and input.format "
                "instead of a glob"
            )


def test_dockerfile_builds_without_buildkit():
    """WORKDIR creates a missing folder as root under the classic builder and kaniko: the project folder is made
    and handed to the image's user before USER switches to it."""
    steps = dockerfile()
    workdir = [rest.strip() for instruction, rest in steps if instruction == "WORKDIR"][-1]
    users = [(i, rest.strip()) for i, (instruction, rest) in enumerate(steps) if instruction == "USER"]
    last_user = users[-1][0]
    made = [
        i
        for i, (instruction, rest) in enumerate(steps)
        if instruction == "RUN" and f"mkdir -p {workdir}" in rest and f"chown {users[-1][1]} {workdir}" in rest
    ]
    assert made and made[0] < last_user, f"create {workdir} (mkdir + chown to {users[-1][1]}) before `USER`"
    running_as = [user for i, user in users if i < made[0]]
    assert running_as and running_as[-1] in ("root", "0"), "the mkdir/chown step must run as root"


def test_image_copies_and_installs_every_package():
    """The editable install maps only the top-level packages it finds: each needs its stub before the install
    and its COPY after it."""
    packages = [p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]]
    runs = " ".join(rest for instruction, rest in dockerfile() if instruction == "RUN")
    copies = [rest.split()[-1].rstrip("/") for instruction, rest in dockerfile() if instruction == "COPY"]
    for package in packages:
        assert f"{package}/__init__.py" in runs, f"infra/Dockerfile: stub {package}/ before the editable install"
        assert package in copies, f"infra/Dockerfile: COPY {package}/ into the image"


def test_image_pins_the_makefiles_torch():
    makefile = re.search(r"^TORCH \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert makefile, "the Makefile pins no torch"
    assert dockerfile_args().get("TORCH_VERSION") == makefile[1], (
        "infra/Dockerfile: TORCH_VERSION is not the Makefile's"
    )


def test_cluster_launcher_opens_no_ssh_to_the_world_and_installs_nothing():
    config = docs(CLUSTER_LAUNCHER)[0]
    for name, node_type in config["available_node_types"].items():
        # Without SecurityGroupIds the launcher creates a group with SSH open to 0.0.0.0/0.
        assert node_type["node_config"].get("SecurityGroupIds"), f"cluster.yaml {name}: name its security group"
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not config.get(key), f"cluster.yaml {key}: the image carries everything (see infra/Dockerfile)"
    build_check = [rest for instruction, rest in dockerfile() if instruction == "RUN" and "import boto3" in rest]
    assert build_check, "infra/Dockerfile: the autoscaler on the launcher's head needs boto3 in the image"
