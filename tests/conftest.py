import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random  # noqa: E402
from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402

from dilm.tasks import Example, TaskData  # noqa: E402

# Tests that start one of these are integration runs (a Ray cluster; sweep drivers attached to it):
# marked ``integration`` here, so a new test that uses one is in the right tier without a decorator of its own.
INTEGRATION_FIXTURES = {"ray_cluster", "ray_address", "crashed_sweep"}


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: a whole run (a Ray cluster, a sweep, a distill or evaluation end "
                            "to end; seconds each): in `make test`, left out of the edit-test loop's `make test-quick`")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)

POS = ["great", "wonderful", "superb", "delightful", "excellent", "brilliant", "lovely", "charming"]
NEG = ["awful", "terrible", "dreadful", "boring", "horrible", "tedious", "lousy", "dismal"]


def toy_examples(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        words = rng.sample(POS if label else NEG, 3)
        out.append(Example(f"a {words[0]} and {words[1]} film , simply {words[2]}", label))
    return out


@pytest.fixture(scope="session")
def toy_task() -> TaskData:
    """A linearly separable sentiment toy task (word lists disjoint per class)."""
    return TaskData("toy", ("negative", "positive"), toy_examples(200, 0), toy_examples(60, 1))


class SmokeRun(NamedTuple):
    cfg: object  # the DistillConfig
    result: object  # the DistillResult
    seen: list[dict]  # every row the callback saw
    pools: list[list]  # per pool regeneration: the texts generated for each class


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, toy_task) -> SmokeRun:
    """A whole smoke run (the preset as it is, two DPCs, its tiny-bert probe) on the toy task, run once for the tests
    that read it (test_distill: the sets and the callback's rows; test_probe: the label agreement of each pool);
    the packaged tasks' runs: distill/test_distill.py::test_cli_smoke_preset*."""
    from dilm.distill import DistillConfig, distill, match_stage

    seen, pools = [], []
    regenerate = match_stage.regenerate_pool

    def regenerate_and_keep(ctx, seed, learner):
        out = regenerate(ctx, seed, learner)
        pools.append([samples for samples, _, _ in out])
        return out

    cfg = DistillConfig.from_preset("smoke", dpc=(2, 3), output_dir=str(tmp_path_factory.mktemp("distill")))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(match_stage, "regenerate_pool", regenerate_and_keep)
        result = distill(cfg, callback=seen.append, task=toy_task)
    return SmokeRun(cfg, result, seen, pools)


TOPICS = [["goal", "match", "striker", "league"], ["stocks", "profit", "market", "shares"],
          ["rocket", "laptop", "software", "orbit"], ["election", "minister", "treaty", "summit"]]


@pytest.fixture(scope="session")
def topic_task() -> TaskData:
    """4 classes with disjoint topic words (fewer-examples-than-classes tests); 200 test examples, so a share of
    predictions is measured to ±0.01 (16 learners), not in steps of 0.025."""

    def examples(n, seed):
        rng = random.Random(seed)
        return [Example(f"news about the {' and the '.join(rng.sample(TOPICS[i % 4], 2))} today", i % 4)
                for i in range(n)]

    return TaskData("topics", ("sports", "business", "tech", "world"), examples(160, 0), examples(200, 1))


# What a cluster's environment holds: credentials and tokens that its processes (and a sweep's drivers) see, and that
# no record of a sweep may contain (tests/tune/test_sweep.py::test_no_secret_leaks).
CLUSTER_SECRETS = {k: f"sentinel-7f3a9c-{k}" for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                                         "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN", "HF_TOKEN")}


@pytest.fixture(scope="session")
def ray_cluster():
    """A private 2-CPU Ray cluster (``address="local"`` never attaches to another one on this machine), shared by
    the session: this process's tests, and the sweep drivers that attach to its address (``ray_address``). Its
    processes hold ``CLUSTER_SECRETS`` in their environment (this process does not)."""
    import ray

    if not ray.is_initialized():
        with pytest.MonkeyPatch.context() as mp:  # inherited by the GCS and the raylet, so by every worker they start
            for k, v in CLUSTER_SECRETS.items():
                mp.setenv(k, v)
            ray.init(address="local", num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False,
                     namespace="dilm-tests")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_cluster) -> str:
    """The shared cluster's address, for a driver in another process (``dilm sweep --address``): it attaches
    instead of starting a Ray of its own (seconds of start-up and of CPU each time)."""
    import ray

    return ray.get_runtime_context().gcs_address


@pytest.fixture
def task_file_args(toy_task, tmp_path) -> list[str]:
    """The toy task written as user JSONL files, as CLI arguments."""
    import json

    for split in ("train", "test"):
        rows = [json.dumps({"text": e.text, "label": toy_task.label_names[e.label]}) for e in getattr(toy_task, split)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return ["--train-file", str(tmp_path / "train.jsonl"), "--test-file", str(tmp_path / "test.jsonl"),
            "--label-names", ",".join(toy_task.label_names)]


@pytest.fixture
def run_cli():
    """Run a sub-command without main()'s error handling, so a DilmError reaches the test."""
    from dilm.cli import build_parser

    def run(argv: list[str]) -> int:
        args = build_parser().parse_args(argv)
        return args.func(args)

    return run


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto) on 127.0.0.1 and a random port: the environment that points boto3 and
    pyarrow at it (``AWS_ENDPOINT_URL``, dummy credentials), with a bucket ``dilm-test``."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="dilm-test")
    yield env
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This process talks to the local S3 server (:func:`s3_server`)."""
    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    return s3_server
