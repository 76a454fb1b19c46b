"""The Kubernetes manifests (k8s/) and deployment files (deploy/): valid for KubeRay and Kubernetes,
safe by default, and in step with the CLI, the Dockerfile and pyproject.toml.

No cluster is needed: RayJob/RayCluster are checked against KubeRay's v1 CRD schemas (copies in
``tests/schemas/kuberay/``, see the README there; a missing copy fails) plus a stricter check for keys the
CRD does not define, pod templates and the Secret against Kubernetes' own schemas
(kubernetes-validate), and every command line against the real parser that will read it.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import inspect
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

import orchestrator
from orchestrator.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "k8s"
DEPLOY_DIR = ROOT / "deploy"
SCHEMA_DIR = Path(__file__).resolve().parent / "schemas" / "kuberay"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
K8S_VERSION = "1.30"  # schemas of the oldest Kubernetes these manifests target
PREEMPTION_GRACE_S = inspect.signature(orchestrator.Trainer).parameters["preemption_grace_s"].default
SENSITIVE_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{16}\b")
AWS_SECRET = re.compile(r"aws_secret_access_key\W{1,4}[A-Za-z0-9/+]{40}\b", re.IGNORECASE)
PLACEHOLDER = re.compile(r"^<[a-z0-9-]+>$")


# ---------------------------------------------------------------------------------------- loading


@functools.lru_cache(maxsize=None)
def _documents() -> tuple[tuple[str, dict], ...]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                docs.append((f"{path.name}#{index}", doc))
    return tuple(docs)


def documents(*kinds: str) -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in _documents() if not kinds or doc.get("kind") in kinds]


def ray_documents() -> list[tuple[str, dict]]:
    return documents("RayJob", "RayCluster")


def ray_cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_templates(doc: dict) -> Iterator[tuple[str, str, dict]]:
    """(role, label, pod template) for the head, every worker group and a RayJob's submitter."""
    spec = ray_cluster_spec(doc)
    yield "head", "head", spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield "worker", f"worker group {group['groupName']}", group["template"]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        yield "submitter", "submitter", doc["spec"]["submitterPodTemplate"]


def ray_containers(doc: dict) -> Iterator[tuple[str, str, dict]]:
    """(role, label, container) for the Ray containers of the head and the worker groups."""
    for role, label, template in pod_templates(doc):
        if role != "submitter":
            for container in template["spec"]["containers"]:
                yield role, f"{label}/{container['name']}", container


def env_of(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


@functools.lru_cache(maxsize=None)
def crd_schema(kind: str) -> dict:
    path = SCHEMA_DIR / CRD_FILES[kind]
    if not path.is_file():
        pytest.fail(f"KubeRay CRD schema {path} is missing; restore it as tests/schemas/kuberay/README.md "
                    f"describes")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB each
    crd = yaml.load(path.read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def unknown_keys(node: Any, schema: dict, path: str = "") -> list[str]:
    """Paths of keys the schema does not define.

    A CRD's structural schema prunes unknown fields silently instead of rejecting them, so a
    misspelt field (``terminationGracePeriodSecond``) would be dropped without a word. Walk the
    document alongside the schema: where the schema lists ``properties`` and allows neither
    ``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields``, any other key is an error.
    """
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(node, dict):
        properties = schema.get("properties")
        additional = schema.get("additionalProperties")
        for key, value in node.items():
            where = f"{path}.{key}" if path else key
            if properties is not None and key in properties:
                found += unknown_keys(value, properties[key], where)
            elif isinstance(additional, dict):
                found += unknown_keys(value, additional, where)
            elif properties is not None and not additional:
                found.append(where)
    elif isinstance(node, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(node):
            found += unknown_keys(item, schema["items"], f"{path}[{index}]")
    return found


def crd_errors(doc: dict) -> list[str]:
    schema = crd_schema(doc["kind"])
    validator = jsonschema.Draft4Validator(schema)  # OpenAPI v3.0 schemas are draft-4 style
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def as_pod_template(template: dict, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


def load_prestop():
    spec = importlib.util.spec_from_file_location("deploy_prestop", DEPLOY_DIR / "prestop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def submit_command() -> list[str]:
    """The `ray job submit ...` command line of deploy/submit.sh, as the shell would split it."""
    logical = (DEPLOY_DIR / "submit.sh").read_text().replace("\\\n", " ")
    (line,) = [ln for ln in logical.splitlines() if re.match(r"\s*(exec\s+)?ray job submit\b", ln)]
    words = shlex.split(line)
    return words[1:] if words[0] == "exec" else words


def script_defaults() -> dict[str, str]:
    text = (DEPLOY_DIR / "submit.sh").read_text()
    return dict(re.findall(r'^(\w+)="\$\{\1:-([^}]*)\}"', text, re.MULTILINE))


def dockerfile_lines() -> list[str]:
    text = (DEPLOY_DIR / "Dockerfile").read_text().replace("\\\n", " ")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def dockerfile_ray_version() -> str:
    (base,) = [ln.split()[1] for ln in dockerfile_lines() if ln.upper().startswith("FROM ")]
    match = re.fullmatch(r"rayproject/ray:(2\.\d+\.\d+)-py311(?:-cpu)?", base)
    assert match, f"deploy/Dockerfile: FROM {base} is not a rayproject/ray 2.x py311 CPU image"
    return match.group(1)


# ---------------------------------------------------------------------------- shape and schemas


def test_every_yaml_document_under_k8s_has_an_api_version_a_kind_and_a_name():
    docs = documents()
    assert {doc["kind"] for _, doc in docs} >= {"RayJob", "RayCluster", "Secret"}
    for name, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), name
        assert doc.get("metadata", {}).get("name"), name
    for name, doc in ray_documents():
        assert doc["apiVersion"] == "ray.io/v1", name


def test_the_kuberay_crd_copies_are_the_unchanged_files_their_readme_names():
    readme = (SCHEMA_DIR / "README.md").read_text()
    assert "v1.7.0" in readme and "Apache-2.0" in readme
    blobs = dict(re.findall(r"^\| `([\w.]+\.yaml)` \| `[^`]+` \| `([0-9a-f]{40})` \|$", readme, re.MULTILINE))
    assert sorted(blobs) == sorted(CRD_FILES.values())
    for name, blob in blobs.items():
        path = SCHEMA_DIR / name
        assert path.is_file(), f"{path} is missing; restore it as {SCHEMA_DIR / 'README.md'} describes"
        data = path.read_bytes()
        assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == blob, f"{name} differs from upstream"


@pytest.mark.parametrize("name,doc", ray_documents(), ids=[n for n, _ in ray_documents()])
def test_ray_manifests_validate_against_the_kuberay_v1_crd_schema(name, doc):
    assert crd_errors(doc) == []


@pytest.mark.parametrize("name,doc", ray_documents(), ids=[n for n, _ in ray_documents()])
def test_ray_manifests_use_no_key_the_kuberay_crd_does_not_define(name, doc):
    assert unknown_keys(doc, crd_schema(doc["kind"])) == []


def test_the_crd_checks_catch_a_misspelt_field_and_a_wrongly_typed_one():
    (_, rayjob), *_ = documents("RayJob")
    broken = copy.deepcopy(rayjob)
    broken["spec"]["backofLimit"] = 3
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["terminationGracePeriodSecond"] = 9
    assert sorted(unknown_keys(broken, crd_schema("RayJob"))) == [
        "spec.backofLimit", "spec.rayClusterSpec.headGroupSpec.template.spec.terminationGracePeriodSecond"]
    broken = copy.deepcopy(rayjob)
    broken["spec"]["backoffLimit"] = "five"
    assert any(error.startswith("spec.backoffLimit:") for error in crd_errors(broken))


def test_pod_templates_and_the_secret_validate_against_the_kubernetes_schemas():
    checked = 0
    for name, doc in documents():
        if doc["kind"] in CRD_FILES:
            for _, label, template in pod_templates(doc):
                kubernetes_validate.validate(as_pod_template(template, "check"), K8S_VERSION, strict=True)
                checked += 1
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            checked += 1
    assert checked >= 6  # RayJob: head, worker, submitter; RayCluster: head, worker; the Secret


def test_kubernetes_validation_rejects_an_unknown_container_field():
    (_, rayjob), *_ = documents("RayJob")
    template = copy.deepcopy(ray_cluster_spec(rayjob)["headGroupSpec"]["template"])
    template["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(as_pod_template(template, "check"), K8S_VERSION, strict=True)


# ------------------------------------------------------------------------------ CLI in step


def test_each_rayjob_entrypoint_parses_with_the_orchestrator_cli():
    for name, doc in documents("RayJob"):
        words = shlex.split(doc["spec"]["entrypoint"])
        assert words[0] == "orchestrator", name
        args = build_parser().parse_args(words[1:])
        assert args.command == "run", name
        assert (ROOT / args.target).is_file(), f"{name}: {args.target} is not in the repository"
        assert args.storage.startswith("s3://<bucket>/"), f"{name}: storage must be remote (and a marked placeholder)"
        assert args.run_name, f"{name}: a fixed --run-name is what makes a retry resume"
        assert args.epochs >= 1


def test_the_submit_script_runs_ray_job_submit_with_flags_ray_accepts():
    from ray.dashboard.modules.job.cli import submit

    words = submit_command()
    assert words[:3] == ["ray", "job", "submit"]
    params = submit.make_context("submit", words[3:]).params  # parses and validates, runs nothing
    assert params["address"] == "$RAY_ADDRESS"
    assert params["working_dir"] == "."
    assert (ROOT / params["runtime_env"]) == DEPLOY_DIR / "runtime_env.yaml"
    assert params["entrypoint"][:2] == ("orchestrator", "run")


def test_the_submit_script_passes_orchestrator_run_arguments_the_cli_accepts():
    words = submit_command()
    entry = words[words.index("--") + 1:]
    assert entry[:2] == ["orchestrator", "run"] and entry[-1] == "$@"
    values = {**script_defaults(), "STORAGE": "s3://<bucket>/runs"}
    argv = [values[w[1:]] if w.startswith("$") else w for w in entry[1:-1]]
    args = build_parser().parse_args(argv)
    assert args.command == "run" and (ROOT / args.target).is_file()
    assert args.run_name and args.epochs >= 1
    args = build_parser().parse_args(argv + ["--num-workers", "4", "--set", "lr=0.01"])  # "$@" extras
    assert args.num_workers == 4 and args.set == ["lr=0.01"]


def test_the_submit_script_is_strict_bash_and_documents_the_stop_wait():
    text = (DEPLOY_DIR / "submit.sh").read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert re.search(r"^set -euo pipefail$", text, re.MULTILINE)
    assert "RAY_JOB_STOP_WAIT_TIME_S" in text and "RAY_AUTH_MODE" in text
    subprocess.run(["bash", "-n", str(DEPLOY_DIR / "submit.sh")], check=True)


def test_the_runtime_env_is_valid_for_ray_and_lists_the_projects_dependencies_minus_ray_and_torch():
    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load((DEPLOY_DIR / "runtime_env.yaml").read_text())
    RuntimeEnv(**runtime_env)  # Ray's own validation of the fields
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["s3"],
              *project["optional-dependencies"]["examples"]]
    wanted = {Requirement(r).name for r in wanted} - {"ray", "torch"}
    assert {Requirement(r).name for r in runtime_env["pip"]} == wanted
    for name, value in runtime_env.get("env_vars", {}).items():
        assert not SENSITIVE_NAME.search(name), f"runtime_env.yaml must not carry {name}"
        assert isinstance(value, str)


# ---------------------------------------------------------------------------------- security


def test_every_pod_runs_as_non_root_without_privilege_escalation():
    for name, doc in ray_documents():
        for _, label, template in pod_templates(doc):
            pod = template["spec"].get("securityContext", {})
            assert pod.get("runAsNonRoot") is True, f"{name} {label}"
            assert pod.get("runAsUser", 0) >= 1000, f"{name} {label}"
            assert not template["spec"].get("hostNetwork") and not template["spec"].get("hostPID"), f"{name} {label}"
            for container in template["spec"]["containers"]:
                context = container.get("securityContext", {})
                assert context.get("allowPrivilegeEscalation") is False, f"{name} {label}/{container['name']}"
                assert not context.get("privileged"), f"{name} {label}/{container['name']}"
                assert context.get("runAsUser", 1000) != 0, f"{name} {label}/{container['name']}"
                assert all("hostPort" not in port for port in container.get("ports", []))
        autoscaler = ray_cluster_spec(doc).get("autoscalerOptions", {}).get("securityContext")
        if ray_cluster_spec(doc).get("enableInTreeAutoscaling"):
            assert autoscaler and autoscaler.get("allowPrivilegeEscalation") is False, name


def test_the_ray_dashboard_is_not_exposed_outside_the_cluster():
    exposed = {"NodePort", "LoadBalancer"}
    for name, doc in ray_documents():
        head = ray_cluster_spec(doc)["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", name
        assert not head.get("enableIngress") and "ingressOptions" not in head, name
        assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP", name
    for name, doc in documents("Service"):
        assert doc.get("spec", {}).get("type", "ClusterIP") not in exposed, name
    assert not documents("Ingress", "Route", "Gateway", "HTTPRoute")
    for path in [*K8S_DIR.glob("*.yaml")]:
        for word in exposed:
            assert not re.search(rf"^\s*[^#\n]*\b{word}\b", path.read_text(), re.MULTILINE), f"{path.name}: {word}"


def test_ray_token_authentication_is_on():
    for name, doc in ray_documents():
        assert ray_cluster_spec(doc).get("authOptions", {}).get("mode") == "token", name


def test_s3_credentials_reach_the_ray_containers_only_through_secret_key_refs():
    secrets = {doc["metadata"]["name"]: set(doc.get("stringData", {})) for _, doc in documents("Secret")}
    for name, doc in ray_documents():
        for _, label, container in ray_containers(doc):
            env = env_of(container)
            for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert var in env, f"{name} {label}: no {var}"
                ref = env[var].get("valueFrom", {}).get("secretKeyRef")
                assert ref and "value" not in env[var], f"{name} {label}: {var} must come from a secretKeyRef"
                assert ref["key"] in secrets.get(ref["name"], set()), \
                    f"{name} {label}: {ref['name']}/{ref['key']} is not in k8s/secret-s3.example.yaml"
        for _, label, template in pod_templates(doc):
            for container in template["spec"]["containers"]:
                for var, entry in env_of(container).items():
                    if SENSITIVE_NAME.search(var):
                        assert "value" not in entry, f"{name} {label}: {var} has a literal value"


def test_the_secret_template_holds_placeholders_only():
    docs = documents("Secret")
    assert docs
    for name, doc in docs:
        assert "data" not in doc, f"{name}: use stringData placeholders, never encoded values"
        for key, value in doc["stringData"].items():
            assert PLACEHOLDER.match(value), f"{name}: {key} must be a <placeholder>, not a value"


def test_no_file_under_k8s_or_deploy_contains_a_literal_aws_credential():
    fake_id, fake_secret = "AKIA" + "Q" * 16, "aws_secret_access_key = " + "a1/B" * 10
    assert AWS_KEY_ID.search(fake_id) and AWS_SECRET.search(fake_secret)  # the patterns do match
    files = [p for d in (K8S_DIR, DEPLOY_DIR) for p in sorted(d.rglob("*"))
             if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) >= 8
    for path in files:
        text = path.read_text()
        assert not AWS_KEY_ID.search(text), f"{path.relative_to(ROOT)} contains an AWS access key id"
        assert not AWS_SECRET.search(text), f"{path.relative_to(ROOT)} contains an AWS secret key"


# -------------------------------------------------------------------- spot, retries and grace


def test_the_rayjob_retries_on_new_clusters_and_cleans_up_after_itself():
    for name, doc in documents("RayJob"):
        spec = doc["spec"]
        assert spec.get("backoffLimit", 0) >= 1, name
        assert spec.get("shutdownAfterJobFinishes") is True, name
        assert spec.get("ttlSecondsAfterFinished", 0) > 0, name


def test_the_head_takes_no_training_and_stays_off_spot_while_workers_are_spot_friendly():
    for name, doc in ray_documents():
        spec = ray_cluster_spec(doc)
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-cpus") == "0", name
        head_pod = head["template"]["spec"]
        assert "spot" not in str(head_pod.get("nodeSelector", {})).lower(), name
        assert not head_pod.get("tolerations"), name
        for container in head_pod["containers"]:
            for bound in ("requests", "limits"):
                assert "nvidia.com/gpu" not in container.get("resources", {}).get(bound, {}), name
        assert spec["workerGroupSpecs"], name
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            assert pod.get("tolerations") and pod.get("nodeSelector"), f"{name} {group['groupName']}"
            for container in pod["containers"]:
                resources = container["resources"]
                assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
        for _, label, template in pod_templates(doc):
            for container in template["spec"]["containers"]:
                assert {"requests", "limits"} <= set(container.get("resources", {})), f"{name} {label}"


def test_grace_periods_leave_the_trainer_time_for_its_emergency_backup():
    prestop = load_prestop()
    assert PREEMPTION_GRACE_S == 120
    for name, doc in ray_documents():
        for role, label, template in pod_templates(doc):
            if role == "submitter":
                continue
            grace = template["spec"]["terminationGracePeriodSeconds"]
            assert grace > PREEMPTION_GRACE_S, f"{name} {label}"
            for container in template["spec"]["containers"]:
                env = env_of(container)
                if role == "head":
                    stop_wait = float(env["RAY_JOB_STOP_WAIT_TIME_S"]["value"])
                    command = container["lifecycle"]["preStop"]["exec"]["command"]
                    hook_timeout = prestop.build_parser().parse_args(command[2:]).timeout
                    assert PREEMPTION_GRACE_S < stop_wait < hook_timeout < grace, f"{name} {label}"
                else:
                    drain = float(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"]["value"])
                    assert PREEMPTION_GRACE_S < drain < grace, f"{name} {label}"
    runtime_env = yaml.safe_load((DEPLOY_DIR / "runtime_env.yaml").read_text())
    assert float(runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) > PREEMPTION_GRACE_S


def test_the_head_prestop_hook_is_the_script_the_image_ships():
    workdir = [ln.split(None, 1)[1] for ln in dockerfile_lines() if ln.upper().startswith("WORKDIR ")][-1]
    for name, doc in ray_documents():
        for role, label, container in ray_containers(doc):
            if role != "head":
                continue
            command = container["lifecycle"]["preStop"]["exec"]["command"]
            assert command[0] == "python", f"{name} {label}"
            relative = Path(command[1]).relative_to(workdir)
            assert (ROOT / relative) == DEPLOY_DIR / "prestop.py", f"{name} {label}"
            load_prestop().build_parser().parse_args(command[2:])


# --------------------------------------------------------------------------- image in step


def test_the_dockerfile_builds_on_a_ray_py311_cpu_image_installs_the_project_and_runs_as_ray():
    lines = dockerfile_lines()
    version = dockerfile_ray_version()
    assert Requirement([d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                        if d.startswith("ray")][0]).specifier.contains(version)
    runs = [ln for ln in lines if ln.upper().startswith("RUN ")]
    assert any(re.search(r'pip install --no-cache-dir "?\.\[[^\]]*\bs3\b[^\]]*\]"?', ln) for ln in runs), runs
    assert all("--no-cache-dir" in ln for ln in runs if "pip install" in ln)
    users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
    assert users and users[-1] in ("ray", "1000")
    for line in lines:
        if line.upper().startswith("COPY "):
            sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), f"deploy/Dockerfile copies {source}, which is not in the repo"


def test_manifests_run_the_image_built_from_deploy_dockerfile_with_its_ray_version():
    header = (DEPLOY_DIR / "Dockerfile").read_text()
    (image,) = set(re.findall(r"docker build -f deploy/Dockerfile -t (\S+) \.", header))
    assert "<registry>" in image, "the image reference in the manifests is a marked placeholder"
    workdir = [ln.split(None, 1)[1] for ln in dockerfile_lines() if ln.upper().startswith("WORKDIR ")][-1]
    version = dockerfile_ray_version()
    for name, doc in ray_documents():
        assert ray_cluster_spec(doc)["rayVersion"] == version, name
        for role, label, template in pod_templates(doc):
            for container in template["spec"]["containers"]:
                assert container["image"] == image, f"{name} {label}"
                if role != "submitter":
                    assert container.get("workingDir") == workdir, f"{name} {label}: entrypoint paths are relative to it"


# ------------------------------------------------------------------------------ prestop hook


class FakeJobs:
    """A JobSubmissionClient stand-in: jobs finish ``stops_after`` status polls after stop_job."""

    def __init__(self, statuses: dict[str, str], stops_after: int = 2, stop_fails: bool = False):
        self.statuses = dict(statuses)
        self.stops_after, self.stop_fails = stops_after, stop_fails
        self.stopped: list[str] = []
        self.polls: dict[str, int] = {}

    def list_jobs(self):
        return [type("Job", (), {"submission_id": k, "status": v})() for k, v in self.statuses.items()]

    def stop_job(self, job_id):
        self.stopped.append(job_id)
        if self.stop_fails:
            raise RuntimeError("dashboard unavailable")

    def get_job_status(self, job_id):
        if job_id in self.stopped and not self.stop_fails:
            self.polls[job_id] = self.polls.get(job_id, 0) + 1
            if self.polls[job_id] >= self.stops_after:
                self.statuses[job_id] = "STOPPED"
        return self.statuses[job_id]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_the_prestop_hook_stops_only_active_jobs_and_waits_until_they_have_stopped():
    prestop, clock, lines = load_prestop(), FakeClock(), []
    jobs = FakeJobs({"a": "RUNNING", "b": "SUCCEEDED", "c": "PENDING", "d": "FAILED"}, stops_after=3)
    left = prestop.stop_running_jobs(jobs, timeout_s=60, poll_s=1, clock=clock, sleep=clock.sleep, log=lines.append)
    assert left == [] and jobs.stopped == ["a", "c"]
    assert jobs.statuses == {"a": "STOPPED", "b": "SUCCEEDED", "c": "STOPPED", "d": "FAILED"}
    assert clock.now == 2  # three polls, one second apart
    assert "prestop: Ray job a is STOPPED" in lines


def test_the_prestop_hook_gives_up_at_its_timeout_without_raising():
    prestop, clock, lines = load_prestop(), FakeClock(), []
    jobs = FakeJobs({"a": "RUNNING"}, stop_fails=True)
    left = prestop.stop_running_jobs(jobs, timeout_s=5, poll_s=2, clock=clock, sleep=clock.sleep, log=lines.append)
    assert left == ["a"] and clock.now == 5
    assert any("stop_job(a) failed" in line for line in lines)
    assert lines[-1] == "prestop: Ray job a did not stop within 5 s"


def test_the_prestop_hook_returns_at_once_when_nothing_runs():
    prestop, clock, lines = load_prestop(), FakeClock(), []
    left = prestop.stop_running_jobs(FakeJobs({"a": "SUCCEEDED"}), timeout_s=60, clock=clock, sleep=clock.sleep,
                                     log=lines.append)
    assert left == [] and clock.now == 0 and lines == ["prestop: no running Ray jobs"]
