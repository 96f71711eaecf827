"""The evaluation pool on a real local Ray cluster: scores come back, also when an actor dies mid-evaluation."""

from __future__ import annotations

import os
import signal
import time

import pytest

ray = pytest.importorskip("ray")

from dilm.protocol import EvalConfig  # noqa: E402
from dilm.synset import SynSet  # noqa: E402
from tune.pool import PoolClient, PoolError, PoolSpec, create_pool, shutdown_pool  # noqa: E402


def toy_sets(task, n: int, per_class: int) -> list[SynSet]:
    by_class = task.by_class()
    return [SynSet.from_examples([e for group in by_class for e in group[i * per_class:(i + 1) * per_class]],
                                 task.label_names) for i in range(n)]


def wait_until(predicate, timeout: float, every: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")


@ray.remote(num_cpus=0)
def score_in_task(spec, sets):
    client = PoolClient(spec)
    return client.score({5: sets}), client.retried


def test_pool_scores_jobs_on_two_actors(ray_cluster, toy_task):
    spec, handles = create_pool(toy_task, EvalConfig(archs=("tfidf-logreg",), seeds=2, progress=False),
                                actors=2, cpu=0, namespace="dilm-tests")
    try:
        assert isinstance(spec, PoolSpec) and len(spec.names) == 2
        scores = PoolClient(spec).score({2: toy_sets(toy_task, 2, 2), 4: toy_sets(toy_task, 2, 4)})
        assert list(scores) == [2, 4]
        for per_arch in scores.values():
            assert per_arch["tfidf-logreg"]["n"] == 4  # 2 sets x 2 seeds
            assert per_arch["tfidf-logreg"]["accuracy"] > 60  # the toy task's classes use disjoint words
        calls = [ray.get(h.stats.remote())["calls"] for h in handles]
        assert sorted(calls) == [1, 1]  # one job per actor
    finally:
        shutdown_pool(handles)


def test_pool_survives_actor_killed_mid_evaluation(ray_cluster, toy_task):
    """SIGKILL the only actor while it trains: Ray restarts it and the client re-submits the job to it."""
    cfg = EvalConfig(archs=("tiny-bert",), seeds=2, steps=100, test_limit=40, device="cpu", progress=False)
    spec, [actor] = create_pool(toy_task, cfg, actors=1, cpu=0, max_restarts=2, namespace="dilm-tests",
                                retries=2)
    try:
        first_pid = ray.get(actor.stats.remote())["pid"]
        ref = score_in_task.remote(spec, toy_sets(toy_task, 2, 5))  # a client in a task, as in a trial
        wait_until(lambda: ray.get(actor.stats.remote())["busy"], timeout=180)  # a loaded machine starts the job late
        os.kill(first_pid, signal.SIGKILL)
        scores, retried = ray.get(ref, timeout=240)
        assert retried == 1
        assert scores[5]["tiny-bert"]["n"] == 4
        # 4 runs, each right on k of the 40 test examples: the mean is a whole number of 1/160ths
        assert (scores[5]["tiny-bert"]["accuracy"] * 1.6) == pytest.approx(round(scores[5]["tiny-bert"]["accuracy"]
                                                                                * 1.6), abs=1e-6)
        after = ray.get(actor.stats.remote())
        assert after["pid"] != first_pid and after["calls"] == 1  # restarted; the retried job ran there
        assert PoolClient(spec).handles()  # the name resolves to the restarted actor
    finally:
        shutdown_pool([actor])


def test_client_gives_up_when_no_actor_is_left(ray_cluster, toy_task):
    spec, [actor] = create_pool(toy_task, EvalConfig(archs=("tfidf-logreg",), progress=False), actors=1, cpu=0,
                                max_restarts=0, namespace="dilm-tests", retries=0)
    ray.kill(actor, no_restart=True)
    with pytest.raises(PoolError, match="evaluation actor"):
        PoolClient(spec).score({1: toy_sets(toy_task, 1, 1)})
