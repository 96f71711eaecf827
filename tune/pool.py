"""The evaluation pool: long-lived Ray actors that score synthetic sets across architectures for every trial.

Vocabulary
  * **pool** — ``actors`` named Ray actors ``<prefix>-eval-<i>`` in one namespace, created once per sweep *by the
    driver*; each holds a :class:`dilm.evaluate.Evaluator`, so tokenizers and models stay loaded between trials.
  * **job** — one ``score`` call: a list of sets (the ``n_sets`` sets of one DPC), trained on by every architecture
    of the pool's :class:`~dilm.protocol.EvalConfig`; the answer is ``Scores.summary()`` ({arch: {"accuracy", ...}}).
  * **client** — :class:`PoolClient`, used inside a trial: looks the actors up by name, spreads jobs over them and
    retries a job whose actor died.

Why the driver creates the actors: an actor created *inside* a trial is placed in the trial's placement group and
fails unless the trial reserved extra bundles (a ``PlacementGroupFactory``). Driver-created named actors are
reachable from every trial with ``ray.get_actor(name, namespace=...)`` — but their resources are outside Tune's
accounting, so the sweep sizes trials to leave room for them.

Resource arithmetic (Ray logical resources; :func:`tune.sweep.check_resources` checks it before anything starts).
An actor holds its ``actor_resources`` for the whole sweep; Tune schedules trials in what is left::

    actors × actor_cpu  +  max_concurrent_trials × trial_cpu   ≤  cluster CPU
    actors × actor_gpu  +  max_concurrent_trials × trial_gpu   ≤  cluster GPU

* hard (fail fast, one-line error): the pool plus *one* trial must fit — otherwise no trial could ever start and
  Tune would wait forever ("No available node types can fulfill resource request");
* soft (a warning): all ``max_concurrent_trials`` fit — otherwise Tune simply runs fewer trials at once.

Worked examples: ``sweeps/demo.yaml`` on 2 cores — 1 actor × 0.5 CPU + 2 trials × 0.75 CPU = 2.0 CPU;
``sweeps/gpu.yaml`` on one GPU with 16 cores — 1 actor × (2 CPU, 0.2 GPU) + 4 trials × (3 CPU, 0.2 GPU) =
14 CPU, 1.0 GPU. Fractional CPUs are bookkeeping: a process with ``cpu < 1`` still runs one torch thread
(Ray sets ``OMP_NUM_THREADS = max(1, floor(cpu))``), so 0.5 + 2 × 0.75 keeps at most three threads on two cores,
and only while the actor is scoring. Fractional GPUs share one device (0.25 → four processes on GPU 0); memory is
not policed, so size ``n_sets`` / batch sizes to fit.

Fault tolerance: actors are created with ``max_restarts`` (Ray restarts a dead actor and re-runs ``__init__``);
``max_task_retries`` stays 0 so that the *client* decides: a job whose actor died (``RayActorError``) is sent to the
next actor — or to the same, restarted one when the pool has a single actor — up to ``retries`` times. An actor
Ray is still restarting answers ``ActorUnavailableError``; that is not a new loss, so the job waits for it (up to
``restart_wait_s``) without spending a retry.
Actors are owned by the driver (not detached): they die with it, also on a ``ray start`` cluster.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from dilm.evaluate import Evaluator
from dilm.protocol import EvalConfig
from dilm.synset import SynSet
from dilm.tasks import TaskData, TaskSpec, load_task


@dataclass(frozen=True)
class PoolSpec:
    """How a trial reaches the pool (picklable, handed to trials through ``tune.with_parameters``)."""

    namespace: str
    names: tuple[str, ...]
    retries: int = 3  # re-submissions of one job after its actor died
    retry_wait_s: float = 1.0
    restart_wait_s: float = 300.0  # how long a job waits for an actor that Ray is restarting


class PoolError(RuntimeError):
    """The pool could not score a job (no live actor, or retries exhausted)."""


class EvalActor:
    """One pool member. ``max_concurrency=2``: ``stats`` answers while ``score`` runs (the lock serialises scoring)."""

    def __init__(self, task: TaskSpec | str | TaskData, cfg: EvalConfig):
        self.task = task if isinstance(task, TaskData) else load_task(task)
        self.evaluator = Evaluator(self.task, cfg)
        self._lock = threading.Lock()
        self._busy = False
        self._calls = 0

    def score(self, sets: list[SynSet]) -> dict[str, dict]:
        with self._lock:
            self._busy = True
            try:
                return self.evaluator.evaluate(sets).summary()
            finally:
                self._busy = False
                self._calls += 1

    def stats(self) -> dict:
        return {"pid": os.getpid(), "busy": self._busy, "calls": self._calls, "archs": list(self.evaluator.cfg.archs)}


def create_pool(task: TaskSpec | str | TaskData, cfg: EvalConfig, *, actors: int = 1, cpu: float = 1.0,
                gpu: float = 0.0, max_restarts: int = 3, namespace: str = "dilm", prefix: str | None = None,
                retries: int = 3, start_timeout_s: float = 300) -> tuple[PoolSpec, list]:
    """Start ``actors`` named evaluation actors (call from the driver). Returns the spec and the handles, which the
    driver keeps for the sweep's lifetime and passes to :func:`shutdown_pool` at the end."""
    prefix = prefix or f"pool-{uuid.uuid4().hex[:8]}"  # unique per driver: a resumed sweep gets fresh actors
    remote = ray.remote(EvalActor)
    names, handles = [], []
    for i in range(actors):
        name = f"{prefix}-eval-{i}"
        handles.append(remote.options(name=name, namespace=namespace, num_cpus=cpu, num_gpus=gpu,
                                      max_restarts=max_restarts, max_task_retries=0,
                                      max_concurrency=2).remote(task, cfg))
        names.append(name)
    try:
        ray.get([h.stats.remote() for h in handles], timeout=start_timeout_s)  # all up (models load lazily)
    except GetTimeoutError:
        shutdown_pool(handles)
        raise PoolError(f"the {actors} evaluation actor(s) ({cpu:g} CPU, {gpu:g} GPU each) did not start within "
                        f"{start_timeout_s:g} s: are those resources free in the cluster?") from None
    return PoolSpec(namespace, tuple(names), retries), handles


def shutdown_pool(handles: list) -> None:
    for h in handles:
        ray.kill(h, no_restart=True)


class PoolClient:
    """Spreads jobs over the pool's actors and retries jobs whose actor died; ``retried`` counts re-submissions."""

    def __init__(self, spec: PoolSpec):
        self.spec = spec
        self.retried = 0

    def handles(self) -> list:
        found = []
        for name in self.spec.names:
            try:
                found.append(ray.get_actor(name, namespace=self.spec.namespace))
            except ValueError:  # gone for good (restarts exhausted)
                continue
        if not found:
            raise PoolError(f"no evaluation actor of {list(self.spec.names)} is alive in namespace "
                            f"{self.spec.namespace!r}")
        return found

    def score(self, jobs: dict) -> dict:
        """``{key: [SynSet, ...]}`` → ``{key: {arch: summary}}``, jobs running in parallel on the actors."""
        handles = self.handles()
        attempts = dict.fromkeys(jobs, 0)
        refs = {key: ray.put(sets) for key, sets in jobs.items()}  # shipped once, reused by retries
        pending = {}

        def submit(key, slot: int) -> None:
            pending[handles[slot % len(handles)].score.remote(refs[key])] = (key, slot)

        for slot, key in enumerate(jobs):
            submit(key, slot)
        out = {}
        lost_at: dict = {}  # job → when it last lost its actor
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            key, slot = pending.pop(ref)
            try:
                out[key] = ray.get(ref)
            except ActorUnavailableError as e:  # Ray is restarting the actor: wait for it, no retry spent
                if key not in lost_at:  # the job's first sign of a lost actor: it is re-submitted from here on
                    lost_at[key] = time.monotonic()
                    self.retried += 1
                elif time.monotonic() - lost_at[key] > self.spec.restart_wait_s:
                    raise PoolError(f"job {key!r}: its evaluation actor did not come back within "
                                    f"{self.spec.restart_wait_s:g} s: {e}") from e
                time.sleep(self.spec.retry_wait_s)
                submit(key, slot)
            except RayActorError as e:  # the actor died under the job
                attempts[key] += 1
                if attempts[key] > self.spec.retries:
                    raise PoolError(f"job {key!r} lost its evaluation actor {attempts[key]} times: {e}") from e
                lost_at[key] = time.monotonic()
                self.retried += 1
                time.sleep(self.spec.retry_wait_s)
                submit(key, slot + 1)  # the next actor; with one actor, the same one once Ray restarted it
        return {key: out[key] for key in jobs}
