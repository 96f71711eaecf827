"""Sweeps: configuration validation, resource checks, and real smoke sweeps on local Ray clusters.

The expensive scenario runs once per module (``crashed_sweep``): a 3-trial tiny-model sweep whose first trial is
invalid, driven by a subprocess that is SIGKILLed as soon as one trial has finished, then resumed with ``--resume``
(both drivers attached to the session's Ray cluster, as to a ``ray start`` one: conftest's ``ray_address``).
The tests read its end state: the sweep's records (MLflow, Optuna), the failed trial, and no repeated work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import psutil
import pytest
import yaml

from dilm import DilmError
from dilm.distill import LM_META, DistillConfig, lm_cache_key
from dilm.tasks import load_task
from tests.conftest import CLUSTER_SECRETS
from tests.userdata import write_reviews
from tune.config import EvalSpec, SweepConfig, SweepPaths, load_config
from tune.report import ORPHAN, trial_state
from tune.scores import FINAL, OBJECTIVE, VAL_METRIC
from tune.search import PruneAwareOptunaSearch
from tune.sweep import base_distill_config, check_resources, main
from tune.trial import final_result

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = ROOT / "sweeps"
DATA = ROOT / "tests" / "data"


# --------------------------------------------------------------------------- configuration (no Ray)


def write_yaml(tmp_path: Path, cfg: dict, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def smoke_raw() -> dict:
    return yaml.safe_load((SWEEPS / "smoke.yaml").read_text())


@pytest.mark.parametrize("name", sorted(p.stem for p in SWEEPS.glob("*.yaml")))
def test_shipped_sweeps_load(name):
    cfg = load_config(SWEEPS / f"{name}.yaml")
    assert cfg.name == name and cfg.search
    sampled = optuna.create_study().ask({k: p.distribution() for k, p in cfg.search.items()}).params
    for k, p in cfg.search.items():  # Optuna samples each parameter inside the YAML's range
        assert sampled[k] in p.choices if p.type == "categorical" else p.low <= sampled[k] <= p.high, k
    smoke = load_config(SWEEPS / f"{name}.yaml", smoke=True)
    assert smoke.name == f"{name}-smoke" and smoke.preset == "smoke" and smoke.trial_resources.gpu == 0
    assert 2 <= smoke.num_samples <= 4 and set(smoke.search) == set(cfg.search)
    assert check_resources(smoke, {"CPU": 2.0}) == []


@pytest.mark.parametrize("change, message", [
    ({"sampler": "tpe"}, r"unknown key\(s\) \['sampler'\]"),
    ({"eval": {"archs": ["tfidf-logreg"], "actorz": 1}}, r"eval: unknown key\(s\) \['actorz'\]"),
    ({"search": {"temperature": {"type": "normal", "low": 0, "high": 1}}}, "unknown type 'normal'"),
    ({"search": {"tempreature": {"type": "uniform", "low": 0.5, "high": 2}}}, r"unknown distill option\(s\) "
                                                                               r"\['tempreature'\]"),
    ({"search": {"dpc": {"type": "categorical", "choices": [[5, 10]]}}}, "choices must be scalars"),
    ({"search": {"generator_lr": {"type": "loguniform", "low": 0, "high": 1}}}, "log scale needs low > 0"),
    ({"search": {"inner_loop": {"type": "int", "low": 5, "high": 2}}}, "must be below high"),
    ({"fixed": {"device": "cpu"}}, "fixed.preset is required"),
    ({"fixed": {"preset": "smoke", "output_dir": "/x"}}, "set by the sweep"),
    ({"fixed": {"preset": "smoke", "lm_stepz": 3}}, r"unknown distill option\(s\) \['lm_stepz'\]"),
    ({"fixed": {"preset": "smoke", "inner_loop": 0}}, "inner_loop must be >= 1"),
    ({"asha": {"max_t": 1, "grace_period": 1}}, "grace_period < max_t"),
    ({"asha": {"max_t": 2, "grace_period": 1}}, r"max_t \(2\) must exceed the 2 \(training_iteration\)"),
    ({"metric": "objective"}, "metric can no longer be set: a sweep always maximises 'objective'"),
    ({"metric": "val_accuracy", "mode": "max"}, "metric/mode can no longer be set"),
    ({"eval": {"archs": ["tfidf-logreg"], "seeds": 0}}, "seeds, batch_size and ensemble must be >= 1"),
    ({"eval": {"archs": ["tfidf-logreg"], "objective_archs": ["minilm-probe"]}},
     r"eval.objective_archs names minilm-probe, not among eval.archs \(tfidf-logreg\)"),
    ({"name": "a b"}, "sweep name must be"),
    ({"points_to_evaluate": [{"lm_lr": 1e-4}]}, "must give every search key"),
    ({"trial_resources": {"cpu": 1, "gpu": -1}}, "resources must be >= 0"),
    ({"baseline_resources": {"cpu": -0.5}}, "resources must be >= 0"),
    ({"baseline_resources": {"cpus": 1}}, "baseline_resources"),
    ({"storage": "ftp://host/dilm"}, "storage .ftp://host/dilm.: unknown URI scheme .ftp."),
])
def test_bad_config_is_a_one_line_error(tmp_path, change, message):
    path = write_yaml(tmp_path, {**smoke_raw(), **change})
    with pytest.raises(DilmError, match=message) as err:
        load_config(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("storage, env, name", [
    ("runs/rel", {}, "storage 'runs/rel'"),  # --storage (or the YAML's storage)
    (None, {"DILM_SWEEP_DIR": "rel"}, "$DILM_SWEEP_DIR 'rel'"),
    (None, {}, "the default storage 'runs/sweeps'"),
])
def test_relative_storage_is_refused_inside_a_ray_job(tmp_path, monkeypatch, capsys, storage, env, name):
    """In a `ray job submit` entrypoint (Ray sets RAY_JOB_CONFIG_JSON_ENV_VAR) the working dir is Ray's temporary
    copy: a relative storage is a one-line error before Ray is touched; an absolute one is used as given."""
    import tune.sweep

    monkeypatch.delenv("DILM_SWEEP_DIR", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"metadata": {"job_submission_id": "raysubmit_test"}}')
    monkeypatch.chdir(tmp_path)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started although the storage is refused")

    monkeypatch.setattr(tune.sweep, "connect_ray", no_ray)
    assert main(["--config", str(SWEEPS / "smoke.yaml"), *(["--storage", storage] if storage else [])]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{name} is relative: inside a Ray job" in err and "pass an absolute path" in err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(DilmError, match="tune_storage 'tune' is relative"):
        SweepPaths.of(load_config(SWEEPS / "smoke.yaml", storage=tmp_path, tune_storage="tune"))
    paths = SweepPaths.of(load_config(SWEEPS / "smoke.yaml", storage=tmp_path / "abs"))
    assert paths.storage == tmp_path / "abs" and paths.tune_dir == str(tmp_path / "abs" / "tune" / "smoke")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")  # outside a job: relative to the working directory
    assert SweepPaths.of(load_config(SWEEPS / "smoke.yaml", storage="rel")).storage == tmp_path / "rel"


def test_help_gives_every_option_a_default(capsys):
    """``dilm sweep --help`` (= ``python -m tune.sweep --help``): every option with its help and its default."""
    from dilm.cli import main as dilm_main

    with pytest.raises(SystemExit) as done:
        dilm_main(["sweep", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    options = ["--config", "--smoke", "--resume", "--name", "--storage", "--tune-storage", "--address", "--num-cpus",
               "--autoscaling"]
    for option, following in zip(options, [*options[1:], None]):
        part = text[text.rindex(option + " "):text.rindex(following + " ") if following else None]
        assert "(default: " in part or "required" in part, part


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(DilmError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(DilmError, match="invalid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_config_is_frozen_and_complete():
    cfg = load_config(SWEEPS / "demo.yaml", name="other", storage="/tmp/x")
    assert cfg.name == "other" and cfg.storage == "/tmp/x" and cfg.experiment == "dilm-demo"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_samples = 9
    saved = json.loads(json.dumps(cfg.to_dict()))  # as saved beside the sweep (and logged as parent params)
    assert SweepConfig.from_dict(saved) == cfg  # what a resume compares the YAML against


def test_eval_defaults_come_from_eval_config():
    """The pool's protocol has one source of defaults: dilm.protocol.EvalConfig."""
    from dilm.protocol import EvalConfig

    spec, protocol = EvalSpec(), EvalConfig()
    assert spec.eval_config() == dataclasses.replace(protocol, progress=False)
    assert spec.seeds == protocol.seeds and spec.steps == protocol.steps
    cfg = load_config(SWEEPS / "demo.yaml")
    assert cfg.eval.eval_config().seeds == yaml.safe_load((SWEEPS / "demo.yaml").read_text())["eval"]["seeds"]


def test_resource_arithmetic():
    gpu = load_config(SWEEPS / "gpu.yaml")
    with pytest.raises(DilmError, match="asks for GPUs .* has 2 CPU and 0 GPU"):
        check_resources(gpu, {"CPU": 2.0})
    assert check_resources(gpu, {"CPU": 16.0, "GPU": 1.0}) == []  # 2 + 4 x 3 CPU, 0.2 + 4 x 0.2 GPU
    assert "only 3 of max_concurrent_trials=4" in check_resources(gpu, {"CPU": 12.0, "GPU": 1.0})[0]
    with pytest.raises(DilmError, match="do not fit"):
        check_resources(gpu, {"CPU": 4.0, "GPU": 1.0})
    demo = load_config(SWEEPS / "demo.yaml")
    assert check_resources(demo, {"CPU": 2.0}) == []  # 0.5 + 2 x 0.75
    assert "only 1 of" in check_resources(demo, {"CPU": 1.5})[0]


def test_final_result_is_the_mean_over_archs_and_dpcs():
    scores = {5: {"a": {"accuracy": 60.0}, "b": {"accuracy": 70.0}},
              10: {"a": {"accuracy": 80.0}, "b": {"accuracy": 90.0}}}
    out = final_result(scores, None, 42)
    assert out[OBJECTIVE] == 75.0 and out["acc_a"] == 70.0 and out["acc_b"] == 80.0
    only_b = final_result(scores, None, 42, ("b",))  # eval.objective_archs: the others stay columns
    assert only_b[OBJECTIVE] == 80.0 and only_b["acc_a"] == 70.0
    assert out[FINAL] is True and out["step"] == 42 and math.isnan(out[VAL_METRIC])


def test_searcher_records_asha_stops_as_pruned():
    """Stock OptunaSearch would store an early-stopped trial COMPLETE with its last value."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState

    searcher = PruneAwareOptunaSearch({"lr": FloatDistribution(1e-5, 1e-3, log=True)}, metric=OBJECTIVE,
                                      mode="max", storage=optuna.storages.InMemoryStorage(), study_name="t")
    val = {OBJECTIVE: math.nan, VAL_METRIC: 55.0, "step": 3, FINAL: False}
    for tid in ("stopped", "complete", "errored"):
        assert searcher.suggest(tid) is not None
        searcher.on_trial_result(tid, val)
    # Tune hands the result ASHA stopped on to on_trial_complete only
    searcher.on_trial_complete("stopped", result={**val, VAL_METRIC: 61.0, "step": 7})
    searcher.on_trial_complete("complete", result={**val, OBJECTIVE: 70.0, FINAL: True})
    searcher.on_trial_complete("errored", error=True)
    trials = {t.user_attrs["ray_trial_id"]: t for t in searcher._ot_study.trials}
    assert trials["stopped"].state == TrialState.PRUNED
    assert trials["stopped"].intermediate_values == {3: 55.0, 7: 61.0}
    assert trials["complete"].state == TrialState.COMPLETE and trials["complete"].value == 70.0
    assert trials["errored"].state == TrialState.FAIL


def test_a_restored_searcher_opens_the_study_where_the_new_head_keeps_it(tmp_path):
    """A fresh head may keep the driver's folder (``$DILM_CACHE``) at another path than the first: the searcher of
    ``tuner.pkl`` and the searcher state Tune saved both name the first head's sqlite file, and a resume continues
    the study in the new head's copy instead, never opening (or making) the old path."""
    import ray.cloudpickle
    from optuna.distributions import FloatDistribution

    from tune.search import optuna_storage_at

    first, second = tmp_path / "first-head", tmp_path / "second-head"
    first.mkdir()
    searcher = PruneAwareOptunaSearch({"lr": FloatDistribution(1e-5, 1e-3, log=True)}, metric=OBJECTIVE, mode="max",
                                      storage=optuna.storages.RDBStorage(f"sqlite:///{first / 'optuna.db'}"),
                                      study_name="t")
    for tid in ("done", "running"):
        assert searcher.suggest(tid) is not None
    searcher.on_trial_complete("done", result={OBJECTIVE: 70.0, FINAL: True})
    tuner_pkl = ray.cloudpickle.dumps(searcher)  # as Tune pickles it into tuner.pkl
    searcher.save_to_dir(str(first))  # the searcher state Tune saves with the experiment
    shutil.copytree(first, second)  # fetched from the storage by a head that keeps it elsewhere
    shutil.rmtree(first)
    url, setstate = f"sqlite:///{second / 'optuna.db'}", optuna.storages.RDBStorage.__setstate__
    with optuna_storage_at(url):
        restored = ray.cloudpickle.loads(tuner_pkl)
    assert optuna.storages.RDBStorage.__setstate__ is setstate  # only inside the block
    restored.restore_from_dir(str(second))
    restored.on_trial_complete("running", result={OBJECTIVE: 80.0, FINAL: True})
    assert not first.exists()
    study = optuna.load_study(study_name="t", storage=url)
    assert sorted(t.value for t in study.trials) == [70.0, 80.0]


def test_a_trial_asked_after_the_study_was_published_is_asked_again_on_a_fresh_head(tmp_path):
    """A fresh head resumes from the study last published and Tune's searcher state saved later: a trial asked in
    between is not in that study; the restored searcher asks it again with its parameters, and its reports and
    result land there (before: Optuna's "Record does not exist" ended the resumed sweep)."""
    import ray.cloudpickle
    from optuna.distributions import FloatDistribution

    from tune.search import optuna_storage_at

    first, second = tmp_path / "first-head", tmp_path / "second-head"
    first.mkdir()
    searcher = PruneAwareOptunaSearch({"lr": FloatDistribution(1e-5, 1e-3, log=True)}, metric=OBJECTIVE, mode="max",
                                      storage=optuna.storages.RDBStorage(f"sqlite:///{first / 'optuna.db'}"),
                                      study_name="t")
    assert searcher.suggest("done") is not None
    searcher.on_trial_complete("done", result={OBJECTIVE: 70.0, FINAL: True})
    shutil.copytree(first, second)  # the study as last published
    late = searcher.suggest("late")  # asked after that
    tuner_pkl = ray.cloudpickle.dumps(searcher)
    searcher.save_to_dir(str(first))
    for f in first.iterdir():  # Tune's experiment (the searcher state) is newer than the published study
        if f.name != "optuna.db":
            shutil.copy(f, second / f.name)
    url = f"sqlite:///{second / 'optuna.db'}"
    with optuna_storage_at(url):
        restored = ray.cloudpickle.loads(tuner_pkl)
    restored.restore_from_dir(str(second))
    restored.on_trial_result("late", {VAL_METRIC: 60.0, "step": 1})
    restored.on_trial_complete("late", result={OBJECTIVE: 80.0, FINAL: True})
    study = optuna.load_study(study_name="t", storage=url)
    assert sorted(t.value for t in study.trials) == [70.0, 80.0]
    again = next(t for t in study.trials if t.value == 80.0)
    assert again.params == late and again.intermediate_values == {1: 60.0}
    assert again.user_attrs["ray_trial_id"] == "late"


@pytest.mark.parametrize("how", ["dilm-sweep", "python-m"])
def test_sweeps_pickled_before_the_split_unpickle(how):
    """``tuner.pkl`` of smoke sweeps started at commit 739ab12, before tune/sweep.py was split: ``--resume`` loads it
    with today's code. Started by ``dilm sweep`` it names ``tune.sweep.PruneAwareOptunaSearch``, ``.TrialEnd`` and
    ``.trial_dirname``; started by ``python -m tune.sweep`` those came from ``__main__`` and were pickled by value,
    naming only ``tune.tracking`` classes."""
    import ray.cloudpickle
    from ray.tune.search.optuna import OptunaSearch

    from tune.search import TrialEnd, trial_dirname
    from tune.tracking import TrackingSpec
    from tune.trial import run_trial

    raw = (DATA / f"tuner-739ab12-{how}.pkl").read_bytes()
    # the searcher reopens its Optuna store on unpickling, as a resumed sweep does in its own (existing) storage:
    # give the store the folder it was pickled with (an absolute path of the machine that made the fixture)
    store_dir = Path(re.search(rb"sqlite:///(/[^\x00'\"]+)/optuna\.db", raw).group(1).decode())
    made = next((d for d in [*reversed(store_dir.parents), store_dir] if not d.exists()), None)  # topmost new folder
    store_dir.mkdir(parents=True, exist_ok=True)
    try:
        state = ray.cloudpickle.loads(raw)
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    tune_config, run_config = state["_tune_config"], state["_run_config"]
    [callback] = run_config.callbacks
    assert state["__trainable_name"] == run_trial.__name__  # Tuner.restore refuses a trainable of another name
    assert isinstance(tune_config.search_alg, OptunaSearch) and isinstance(callback.spec, TrackingSpec)
    if how == "dilm-sweep":
        assert type(tune_config.search_alg) is PruneAwareOptunaSearch and type(callback) is TrialEnd
        assert tune_config.trial_dirname_creator is trial_dirname
    else:
        assert type(tune_config.search_alg).__name__ == "PruneAwareOptunaSearch"


def test_a_resume_continues_the_parent_run_in_the_drivers_own_store_wherever_it_is(tmp_path, monkeypatch):
    from tune.resume import same_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    paths = SweepPaths.of(load_config(SWEEPS / "smoke.yaml", storage=str(tmp_path / "new")))
    moved = {"tracking_uri": "sqlite:////first/head/mlflow.db", "own_store": True}  # a fresh head, another folder
    assert same_store(moved, f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}", paths)
    assert not same_store({**moved, "own_store": False}, f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}", paths)
    assert not same_store(moved, "http://tracking.example:5000", paths)  # another store: a new parent run
    assert same_store({"tracking_uri": "http://tracking.example:5000"}, "http://tracking.example:5000", paths)


def test_resume_accepts_the_configuration_saved_before_the_split(tmp_path):
    """The state file of the smoke sweep as 739ab12 saved it (with metric/mode, and fewer eval keys) is the same
    configuration as today's sweeps/smoke.yaml; a real change is still refused."""
    from dilm.files import write_json
    from tune.config import SweepPaths
    from tune.sweep import check_same_config

    cfg = load_config(SWEEPS / "smoke.yaml", storage=tmp_path)
    saved = json.loads((DATA / "state-739ab12-smoke.json").read_text())
    assert {"metric", "mode"} <= set(saved["config"]) and "lr" not in saved["config"]["eval"]
    write_json(SweepPaths.of(cfg).state_file, saved)
    check_same_config(cfg, SweepPaths.of(cfg))
    changed = load_config(write_yaml(tmp_path, {**smoke_raw(), "num_samples": 4}, "smoke.yaml"), storage=tmp_path)
    with pytest.raises(DilmError, match=r"\(num_samples changed\)"):
        check_same_config(changed, SweepPaths.of(changed))


# --------------------------------------------------------------------------- on a local Ray cluster


def test_gpu_sweep_on_a_cpu_cluster_fails_fast(ray_cluster, tmp_path, capsys):
    start = time.monotonic()
    assert main(["--config", str(SWEEPS / "gpu.yaml"), "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "asks for GPUs" in err and err.count("\n") == 1
    assert time.monotonic() - start < 30 and not (tmp_path / "mlflow.db").exists()


# --------------------------------------------------------------------------- the crash-and-resume scenario

TEST_SWEEP = {
    "name": "crash",
    # a user's CSV (tests/userdata.py: other columns, labels neg/pos), by paths relative to the YAML's folder
    "task": {"name": "reviews", "train": "data/train.csv", "test": "data/test.csv", "text_column": "review",
             "label_column": "sentiment"},
    "num_samples": 3,
    "max_concurrent_trials": 2,
    "max_failures": 1,
    "startup_trials": 1,
    "trial_resources": {"cpu": 1},
    "fixed": {"preset": "smoke", "device": "cpu", "outer_loops": 1, "lm_steps": 4},
    "search": {"temperature": {"type": "uniform", "low": 0.5, "high": 2.0},
               "generator_lr": {"type": "loguniform", "low": 1.0e-5, "high": 1.0e-3}},
    "points_to_evaluate": [{"temperature": -1.0, "generator_lr": 1e-4}],  # invalid: DistillConfig raises in it
    "asha": {"time_attr": "training_iteration", "max_t": 100, "grace_period": 1},
    "eval": {"archs": ["tfidf-logreg", "tiny-bert"], "seeds": 1, "steps": 10, "test_limit": 100, "device": "cpu",
             "actors": 1, "actor_resources": {"cpu": 0}},
    "mlflow": {"experiment": "dilm-test-crash"},
}
# the module's scenario: shorter texts than the smoke preset's 24 tokens (sampling, which a trial and the vanilla
# baseline spend most of their time in, takes a step a token); TEST_SWEEP as it is for the code of 739ab12
CRASH_SWEEP = {**TEST_SWEEP, "fixed": {**TEST_SWEEP["fixed"], "length_cap": 16}}


def driver(config: Path, storage: Path, log: Path, *extra: str, code: Path = ROOT,
           command: tuple[str, ...] = ("tune.sweep",), secrets: dict | None = None,
           address: str = "local") -> subprocess.Popen:
    """``python -m tune.sweep`` (``command``) of the code in ``code`` on its own local 2-CPU Ray cluster (or attached
    to the one at ``address``), in a new session (output to ``log``: a pipe nobody reads would fill up and stall the
    driver); ``secrets`` join its environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(secrets or {})
    env["PYTHONPATH"] = str(code)  # before the editable install of the shared venv
    own = ["--num-cpus", "2"] if address == "local" else []
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", *command, "--config", str(config), "--storage",
                                 str(storage), "--address", address, *own, *extra],
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=code)


def await_driver(proc: subprocess.Popen, log: Path, ready: Callable[[], object], what: str,
                 seconds: float = 420) -> None:
    """Wait until ``ready()`` (``what``: the message if it never is within ``seconds``), failing with the end of the
    driver's ``log`` if it ends first."""
    deadline = time.monotonic() + seconds
    while not ready():
        assert proc.poll() is None, f"the driver ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what} within {seconds:.0f} s"
        time.sleep(0.5)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a driver and every process it started: its descendants and anything left in its session (Ray's
    agents outlive a killed driver; on a cluster it attached to, Ray ends the dead driver's trials and tasks).
    Only processes of this test are touched."""
    procs = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        leader = psutil.Process(proc.pid)
        procs = {p.pid: p for p in [leader, *leader.children(recursive=True)]}
    for p in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getsid(p.pid) == proc.pid:
                procs.setdefault(p.pid, p)
    for p in procs.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()  # psutil checks the process is still the one found (no PID reuse)
    psutil.wait_procs(list(procs.values()), timeout=30)
    proc.wait(timeout=30)


def finished_trials(storage: Path) -> dict[str, dict]:
    """Trials that wrote their final result: {trial_id: mtimes of final.json and provenance.json}."""
    out = {}
    for done in (storage / "sets" / "crash").glob("*/final.json"):
        out[done.parent.name] = {"final": done.stat().st_mtime_ns,
                                 "provenance": (done.parent / "provenance.json").stat().st_mtime_ns}
    return out


def crash_and_resume(storage: Path, config: Path, code: Path = ROOT, command: tuple[str, ...] = ("tune.sweep",),
                     secrets: dict | None = None, extra: tuple[str, ...] = (), address: str = "local"):
    """Start the sweep with the code in ``code``, SIGKILL it once a trial has finished, resume it with this code
    (both drivers with ``secrets`` in their environment, ``extra`` on their command line, and each on its own local
    Ray or both attached to the cluster at ``address``)."""
    first = driver(config, storage, storage / "first.log", *extra, code=code, command=command, secrets=secrets,
                   address=address)
    try:
        await_driver(first, storage / "first.log", lambda: finished_trials(storage), "no trial finished")
        before = finished_trials(storage)
    finally:
        kill_tree(first)
    resumed = driver(config, storage, storage / "resumed.log", "--resume", *extra, secrets=secrets, address=address)
    try:
        resumed.wait(timeout=480)
    finally:
        kill_tree(resumed)
    return {"storage": storage, "config": config, "before": before, "rc": resumed.returncode,
            "out": (storage / "resumed.log").read_text()}


# what a cluster's environment holds: each sentinel must reach no record of the sweep (test_no_secret_leaks); the
# session's cluster holds them (conftest), the drivers get them too
SECRETS = CLUSTER_SECRETS


@pytest.fixture(scope="module")
def crashed_sweep(tmp_path_factory, ray_address):
    """The crash-and-resume scenario, both drivers attached to the session's cluster (a killed driver's trials and
    tasks end with it there too; each driver's own local Ray cost ~10 s of start-up and of two busy cores)."""
    storage = tmp_path_factory.mktemp("sweeps")
    write_reviews(storage / "data")
    return crash_and_resume(storage, write_yaml(storage, CRASH_SWEEP, "crash.yaml"), secrets=SECRETS,
                            address=ray_address)


def mlflow_runs(storage: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{storage}/mlflow.db")
    exp = client.get_experiment_by_name("dilm-test-crash")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return client, parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags and "baseline" not in r.data.tags]


def study_trials(storage: Path):
    return optuna.load_study(study_name="crash", storage=f"sqlite:///{storage}/optuna.db").trials


def test_killed_sweep_resumes_without_repeating_finished_trials(crashed_sweep):
    s = crashed_sweep
    assert s["rc"] == 0, s["out"][-3000:]
    assert "2 complete, 0 stopped early (ASHA), 1 failed" in s["out"]
    before, after = s["before"], finished_trials(s["storage"])
    assert len(before) == 1 and len(after) == 2  # killed with a valid trial unfinished; it ran after resume
    for trial_id, mtimes in before.items():
        assert after[trial_id] == mtimes  # neither distilled nor scored again
    client, _, children = mlflow_runs(s["storage"])
    lost = [r for r in children if r.data.tags.get(ORPHAN)]  # started after Tune's last save (timing: 0 or 1)
    assert len(lost) <= 1 and all(r.info.status == "KILLED" for r in lost)
    trial_ids = [r.data.tags["dilm.trial_id"] for r in children if r not in lost]
    assert len(trial_ids) == len(set(trial_ids)) == 3  # one child run per trial, also for the resumed one
    for r in children:
        if r.data.tags["dilm.trial_id"] in before:
            assert len(client.get_metric_history(r.info.run_id, OBJECTIVE)) == 1


def test_sweep_records_runs_params_metrics_artifacts_and_study(crashed_sweep):
    s = crashed_sweep
    client, parents, children = mlflow_runs(s["storage"])
    [parent] = parents
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_complete"] == 2
    assert parent.data.params["num_samples"] == "3" and parent.data.params["fixed.preset"] == "smoke"
    assert {"trials.csv", "param_importances.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    done = [r for r in children if r.info.status == "FINISHED"]
    assert len(done) == 2
    distill_keys = {f.name for f in dataclasses.fields(DistillConfig)}
    for r in done:
        assert set(r.data.params) == distill_keys  # every DistillConfig key
        for key in ("match_loss", "grad_sim", "lr", VAL_METRIC, OBJECTIVE, "accuracy/tiny-bert/dpc2",
                    "label_agreement", "final_label_agreement", "final_label_agreement/dpc2",
                    "accuracy/tfidf-logreg/dpc2", "acc_tiny-bert"):
            assert key in r.data.metrics, key
        assert len(client.get_metric_history(r.info.run_id, "match_loss")) >= 2  # per step
        arts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"sets", "plots", "provenance.json", "scores.json"} <= arts
        assert [a.path for a in client.list_artifacts(r.info.run_id, "sets/dpc2")] == ["sets/dpc2/set00.jsonl",
                                                                                       "sets/dpc2/set01.jsonl"]
        assert {a.path for a in client.list_artifacts(r.info.run_id, "plots")} == {
            "plots/accuracy_vs_dpc_tfidf-logreg.png", "plots/accuracy_vs_dpc_tiny-bert.png"}
    trials = study_trials(s["storage"])
    ran = [t for t in trials if trial_state(t) != "NOT_RESUMED"]  # the killed driver may have started one more
    assert sorted(t.state.name for t in ran) == ["COMPLETE", "COMPLETE", "FAIL"]
    objectives = {tid: json.loads((s["storage"] / "sets" / "crash" / tid / "final.json").read_text())[OBJECTIVE]
                  for tid in finished_trials(s["storage"])}
    assert {t.user_attrs["ray_trial_id"]: t.value for t in trials if t.state.name == "COMPLETE"} == objectives
    assert not list((s["storage"] / "sets" / "crash").glob("*/checkpoint"))  # generator weights removed


def test_no_secret_leaks(crashed_sweep):
    """Credentials and tokens in the environment of the drivers and of the cluster's processes (``SECRETS``) reach no
    MLflow param, tag, metric name or artifact, no provenance.json, report, database or other file of the storage,
    and not the console (the drivers' output is in the storage: first.log, resumed.log)."""
    import ray

    @ray.remote(num_cpus=0)
    def worker_env(names):
        return {k: os.environ.get(k) for k in names}

    assert ray.get(worker_env.remote(list(SECRETS))) == SECRETS  # what the trials' workers held
    s = crashed_sweep
    marker = b"sentinel-7f3a9c-"
    files = [p for p in s["storage"].rglob("*") if p.is_file()]
    assert {"first.log", "resumed.log", "mlflow.db", "optuna.db", "provenance.json", "trials.csv"} <= {
        p.name for p in files}  # what is scanned: the console, the records, the artifacts, the report
    assert [p for p in files if marker in p.read_bytes()] == []
    client, parents, children = mlflow_runs(s["storage"])
    for r in parents + children:
        words = [*r.data.params.items(), *r.data.tags.items(), *r.data.metrics]
        assert not [w for w in words if "sentinel-7f3a9c-" in str(w)], r.info.run_id


def test_the_lm_stage_is_trained_once_before_the_trials_and_reused_on_resume(crashed_sweep):
    s = crashed_sweep
    [lm] = [p for p in (s["storage"] / "lm").iterdir() if not p.name.startswith(".")]  # one config, one checkpoint
    meta = json.loads((lm / LM_META).read_text())
    assert lm.name == meta["key"] == lm_cache_key(base_distill_config(load_config(s["config"])))
    trained = (lm / LM_META).stat().st_mtime_ns
    finals = finished_trials(s["storage"])
    assert all(trained < m["final"] for m in finals.values())  # before the trials, and not again on resume
    for tid in finals:
        prov = json.loads((s["storage"] / "sets" / "crash" / tid / "provenance.json").read_text())
        assert prov["lm_checkpoint"] == str(lm)  # every trial started matching from it
    _, [parent], _ = mlflow_runs(s["storage"])
    assert parent.data.tags["dilm.lm_checkpoint"] == str(lm)


def test_concurrent_trials_share_one_lm_checkpoint_per_lm_config(ray_cluster, toy_task, tmp_path):
    """Ray tasks starting together with the same LM config get one checkpoint (trained once, atomically: no partial
    folder left); another LM key gets its own; a later caller reuses it untouched."""
    import ray

    from tune.trial import lm_checkpoint_for

    data, lm_dir = tmp_path / "data", tmp_path / "lm"
    data.mkdir()
    lm_dir.mkdir()
    for split in ("train", "test"):  # a user's files (the toy task): each task's LM stage reads 200 texts, not SST-2
        rows = [json.dumps({"text": e.text, "label": toy_task.label_names[e.label]}) for e in getattr(toy_task, split)]
        (data / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    spec = {"name": "toy", "train": str(data / "train.jsonl"), "test": str(data / "test.jsonl")}
    base = DistillConfig.from_preset("smoke", task=spec, device="cpu", lm_steps=2)
    other = dataclasses.replace(base, lm_lr=base.lm_lr * 3)
    task = ray.remote(num_cpus=0.5)(lm_checkpoint_for)
    paths = ray.get([task.remote(c, str(lm_dir)) for c in (base, base, other)])
    assert paths[0] == paths[1] != paths[2]
    assert {p.name for p in paths} == {lm_cache_key(base), lm_cache_key(other)}
    assert sorted(p.name for p in lm_dir.iterdir() if not p.name.startswith(".")) == sorted({p.name for p in paths})
    assert not [p for p in lm_dir.iterdir() if p.is_dir() and p.name.startswith(".")]  # no temporary folder left
    stamp = (paths[0] / LM_META).stat().st_mtime_ns
    assert lm_checkpoint_for(dataclasses.replace(base, generator_lr=1.0), lm_dir) == paths[0]  # matching key: reused
    assert (paths[0] / LM_META).stat().st_mtime_ns == stamp


def test_the_shared_lm_stage_gets_every_cpu_of_its_node(ray_cluster):
    """The LM stage runs alone before the trials: a trial's resources with all the CPUs of the largest live node
    that has its GPU and custom resources; and a Ray task given them runs as many torch threads (not the 1 a
    trial's fractional CPU share gives, nor a reused worker's last count)."""
    import ray
    import torch

    from tune.config import Resources
    from tune.sweep import lm_stage_resources

    def node(cpu, gpu=0, alive=True, **custom):
        return {"Alive": alive, "Resources": {"CPU": cpu, **({"GPU": gpu} if gpu else {}), **custom}}

    nodes = [node(8), node(32, alive=False), node(4, gpu=1), node(16, worker=1)]
    assert lm_stage_resources(Resources(cpu=0.75), nodes).cpu == 16
    assert lm_stage_resources(Resources(cpu=1, gpu=1), nodes) == Resources(cpu=4, gpu=1)
    assert lm_stage_resources(Resources(cpu=2, custom={"worker": 1}), nodes).cpu == 16
    assert lm_stage_resources(Resources(cpu=2, custom={"tpu": 1}), nodes).cpu == 2  # no node fits: a trial's own
    shared = lm_stage_resources(Resources(cpu=0.75), ray.nodes())
    assert shared.cpu == 2  # the test cluster's one node

    @ray.remote
    def threads_after():
        from dilm.device import use_cpu_threads

        torch.set_num_threads(1)  # what a reused worker may hold
        return use_cpu_threads()

    expected = min(2, len(os.sched_getaffinity(0)))
    assert ray.get(threads_after.options(**shared.as_remote()).remote()) == expected
    assert ray.get(threads_after.options(num_cpus=0.75).remote()) == 1


def test_baselines_are_scored_beside_the_sweep(crashed_sweep):
    """Random real sets, the vanilla LM (the shared checkpoint, no matching), the k-centers and herding coresets (n_sets
    sets each, from random halves: an interval) and the full data are runs of the sweep's experiment, tagged, with a
    trial's metric names; the summary puts the best trial beside them, the plot has all curves."""
    s = crashed_sweep
    client = mlflow_runs(s["storage"])[0]
    exp = client.get_experiment_by_name("dilm-test-crash")
    runs = {r.data.tags["baseline"]: r for r in client.search_runs([exp.experiment_id], "tags.baseline != ''")}
    assert set(runs) == {"random", "vanilla", "kcenters", "herding", "full"}
    _, [parent], _ = mlflow_runs(s["storage"])
    for r in runs.values():
        assert r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        for arch in ("tiny-bert", "tfidf-logreg"):
            assert 0 <= r.data.metrics[f"accuracy/{arch}/dpc2"] <= 100 and f"accuracy_std/{arch}/dpc2" in r.data.metrics
        assert (OBJECTIVE in r.data.metrics) == (r.data.tags["baseline"] != "full")  # the ceiling ranks no trial
    [lm] = [p for p in (s["storage"] / "lm").iterdir() if not p.name.startswith(".")]
    assert runs["vanilla"].data.tags["dilm.lm_checkpoint"] == str(lm)
    paths = SweepPaths.of(load_config(s["config"], storage=s["storage"]))  # the layout the report and benches read
    assert paths.baseline_dir("vanilla") == s["storage"] / "sets" / "crash" / "baselines" / "vanilla"
    assert all(any(paths.trial_sets(t).glob("dpc2/set*.jsonl")) for t in finished_trials(s["storage"]))
    vanilla = json.loads((s["storage"] / "sets" / "crash" / "baselines" / "vanilla" / "provenance.json").read_text())
    assert vanilla["config"]["outer_loops"] == 0 and vanilla["lm_checkpoint"] == str(lm)
    assert "best trial vs baselines" in s["out"] and "best-random" in s["out"]
    assert "words found in the training vocabulary: best trial" in s["out"]
    assert 0 <= parent.data.metrics["vocab_rate/best_trial"] <= 100
    rows = json.loads((s["storage"] / "reports" / "crash" / "baselines.json").read_text())
    assert {(r["arch"], r["dpc"]) for r in rows} == {("tiny-bert", 2), ("tfidf-logreg", 2)}
    for r in rows:
        assert r["vs_random"] == pytest.approx(r["best"] - r["random"])
        for coreset in ("kcenters", "herding"):  # n_sets sets, one per random half: a difference with its interval
            assert r[f"vs_{coreset}"] == pytest.approx(r["best"] - r[coreset])
            assert r[f"vs_{coreset}_lo"] <= r[f"vs_{coreset}"] <= r[f"vs_{coreset}_hi"]
    for coreset in ("kcenters", "herding"):
        folder = s["storage"] / "sets" / "crash" / "baselines" / coreset
        assert json.loads((folder / "scores.json").read_text())["2"]["tiny-bert"]["n"] == 2  # the smoke preset's n_sets
    assert "best-kcenters" in s["out"] and "best-herding" in s["out"] and "best-full" not in s["out"]
    assert "best_vs_random/tiny-bert/dpc2" in parent.data.metrics
    # the full-data reference: the protocol on the whole (400-example) training set, beside the best trial
    assert "of the full data (the same protocol trained on the whole training set):" in s["out"]
    assert re.search(r"tiny-bert +DPC +2: [0-9.]+, i\.e\. [0-9]+ % of the full-data accuracy \([0-9.]+\) with 4 of 400 "
                     "examples", s["out"]), s["out"][-3000:]
    [row] = [r for r in rows if r["arch"] == "tiny-bert"]
    assert parent.data.metrics["best_share_of_full/tiny-bert/dpc2"] == pytest.approx(100 * row["best"] / row["full"])
    assert {"plots/accuracy_vs_dpc_tiny-bert.png", "plots/accuracy_vs_dpc_tfidf-logreg.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "plots")}


def test_the_sweep_distills_the_users_file_pinned_to_its_hash(crashed_sweep):
    """The sweep's task is the user's CSV (named relative to the YAML, read from another working directory): every
    trial's and baseline's sets carry its labels, their provenance its content hash, MLflow its spec."""
    s = crashed_sweep
    data = load_task(load_config(s["config"]).task)
    provenances = list((s["storage"] / "sets" / "crash").rglob("provenance.json"))
    assert len(provenances) >= 3  # two trials and the vanilla baseline
    for p in provenances:
        prov = json.loads(p.read_text())
        assert prov["task"]["sha256"] == data.fingerprint and prov["task"]["label_names"] == ["neg", "pos"]
        lines = [line for f in p.parent.rglob("set*.jsonl") for line in f.read_text().splitlines()]
        labels = {json.loads(line)["label"] for line in lines}
        assert labels == {"neg", "pos"}, p
    _, [parent], _ = mlflow_runs(s["storage"])
    assert parent.data.params["task.train"] == str(s["storage"] / "data" / "train.csv")
    assert parent.data.params["task.sha256"] == data.fingerprint


def test_failing_trial_is_recorded_and_the_sweep_goes_on(crashed_sweep):
    s = crashed_sweep
    _, _, children = mlflow_runs(s["storage"])
    [failed] = [r for r in children if r.info.status == "FAILED"]
    assert "must be > 0" in failed.data.tags["dilm.error"]
    assert failed.data.params["temperature"] == "-1.0"  # the sampled value is on record
    [fail] = [t for t in study_trials(s["storage"]) if trial_state(t) == "FAIL"]
    assert fail.params["temperature"] == -1.0 and fail.user_attrs["ray_trial_id"] == failed.data.tags["dilm.trial_id"]


def test_existing_sweep_is_not_overwritten_nor_resumed_with_another_config(crashed_sweep, capsys, tmp_path):
    s = crashed_sweep
    assert main(["--config", str(s["config"]), "--storage", str(s["storage"])]) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err
    changed = write_yaml(s["storage"], {**CRASH_SWEEP, "num_samples": 5}, "changed.yaml")  # beside its data
    assert main(["--config", str(changed), "--storage", str(s["storage"]), "--resume"]) == 2
    assert "different configuration (num_samples changed)" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_killed_before_the_split_resumes_after_it(tmp_path):
    """The crash scenario across the split of tune/sweep.py: started by ``dilm sweep`` with the code of commit 739ab12
    (its tuner.pkl names tune.sweep.PruneAwareOptunaSearch, .TrialEnd, .trial_dirname), resumed with this code."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "739ab12"], capture_output=True)
    if archive.returncode:
        pytest.skip("commit 739ab12 is not in this checkout's history")
    old = tmp_path / "old"
    old.mkdir()
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    storage = tmp_path / "sweeps"
    storage.mkdir()
    s = crash_and_resume(storage, write_yaml(storage, TEST_SWEEP, "crash.yaml"), code=old,
                         command=("dilm.cli", "sweep"))
    assert s["rc"] == 0, s["out"][-3000:]
    assert "2 complete, 0 stopped early (ASHA), 1 failed" in s["out"]
    after = finished_trials(storage)
    assert len(after) == 2 and all(after[t] == m for t, m in s["before"].items())  # not run again


# --------------------------------------------------------------------------- ray start + ray job submit


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_job_submit_recipe_puts_results_under_storage(tmp_path):
    """The README's `ray job submit` recipe on a real local head (``ray start --head --block``: it stops what it
    started when terminated), started as a user would without the venv on PATH: the entrypoint names the venv's
    interpreter, the results land under the absolute --storage the job prints (not in Ray's temporary copy of the
    working dir), provenance records the revision passed as DILM_GIT_REVISION, and a relative --storage is refused."""
    import tempfile

    from mlflow.tracking import MlflowClient

    ray_bin = Path(sys.executable).parent / "ray"
    port, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "DILM_SWEEP_DIR",
                                                            "DILM_GIT_REVISION", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep)
                                  if Path(d).resolve() != Path(sys.executable).parent.resolve())
    if (Path.home() / ".ray" / "auth_token").exists():  # Ray 2.60 then enables token auth: clients must use it
        env["RAY_AUTH_MODE"] = "token"
    head_rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    revision = head_rev.stdout.strip() if head_rev.returncode == 0 else "f" * 40
    storage = tmp_path / "sweeps"

    def submit(*args: str) -> subprocess.CompletedProcess:
        # = RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
        #     --runtime-env-json '{"env_vars": {"DILM_GIT_REVISION": "'$(git rev-parse HEAD)'"}}' \
        #     -- "$PWD/.venv/bin/python" -m tune.sweep --config sweeps/smoke.yaml --storage "$PWD/runs/sweeps"
        return subprocess.run([str(ray_bin), "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                               "--working-dir", str(ROOT), "--runtime-env-json",
                               json.dumps({"env_vars": {"DILM_GIT_REVISION": revision}}),
                               "--", sys.executable, "-m", "tune.sweep", "--config", "sweeps/smoke.yaml", *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)

    with open(tmp_path / "head.log", "w") as log:
        # every fixed default port freed: another Ray on this machine may hold 10001 (client) or 52365 (job agent)
        head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
                                 "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                                 "--ray-client-server-port", str(free_port()),
                                 "--dashboard-agent-listen-port", str(free_port()),
                                 "--temp-dir", temp_dir], start_new_session=True, stdout=log,
                                stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([str(ray_bin), "job", "list", "--address", f"http://127.0.0.1:{dash}"], env=env,
                             capture_output=True).returncode:
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(1)
        refused = submit("--storage", "runs/sweeps")
        assert refused.returncode != 0
        assert "storage 'runs/sweeps' is relative: inside a Ray job" in refused.stdout + refused.stderr

        job = submit("--storage", str(storage))
        out = job.stdout + job.stderr
        assert job.returncode == 0, out[-4000:]
        assert f"sweep smoke: storage {storage}\n" in out  # at the start ...
        assert "sweep smoke: 3 complete" in out and f"  storage:   {storage}\n" in out  # ... and with the summary
        assert "git revision unknown" not in out
        assert {"mlflow.db", "optuna.db", "tune", "sets", "reports", "state"} <= {p.name for p in storage.iterdir()}
        provenances = list((storage / "sets" / "smoke").rglob("provenance.json"))
        assert len(provenances) == 4  # 3 trials and the vanilla-LM baseline
        assert {json.loads(p.read_text())["git_revision"] for p in provenances} == {revision}
        client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
        parent = client.get_run(json.loads((storage / "state" / "smoke.json").read_text())["parent_run_id"])
        assert parent.data.tags["dilm.git_revision"] == revision
        copies = list(Path(temp_dir).glob("session_*/runtime_resources/working_dir_files/*"))
        assert copies and not any((c / "runs").exists() for c in copies)  # nothing landed in Ray's copy
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        finally:
            kill_tree(head)
            shutil.rmtree(temp_dir, ignore_errors=True)


def test_in_background_returns_the_value_or_raises_the_error_in_the_caller():
    """The baselines run in a driver thread beside the Tuner: their result, or their error, reaches the driver when it
    asks (``result()``), not before, and the caller goes on meanwhile."""
    import threading

    from tune.baselines import in_background

    go = threading.Event()

    def slow(x):
        assert go.wait(30)
        return x * 2

    result = in_background(slow, 21)
    go.set()  # the caller ran on while slow() waited
    assert result() == 42

    def fails():
        raise DilmError("baseline vanilla: no candidates")

    with pytest.raises(DilmError, match="no candidates"):
        in_background(fails)()
