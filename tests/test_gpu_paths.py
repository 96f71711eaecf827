"""The GPU's code paths on the CPU (``$DILM_GPU_PATHS``, :func:`dilm.device.gpu_paths`): the ``gpu`` preset's
pipeline and ``sweeps/gpu-quick.yaml`` run end to end at tiny scale (tiny models, a few steps, device cpu) through
the code a GPU runs, bar what only CUDA has (CUDA graphs, CUDA random generators); the fractional-GPU resource
arithmetic of the GPU sweep is checked as data. A GPU run can then only fail on the device itself.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import yaml

from dilm import DilmError
from dilm.archs.finetune import cpu_workers
from dilm.cli import main
from dilm.device import GPU_PATHS_ENV, autocast_dtype, device_kind, gpu_paths, inference_dtype
from dilm.ensemble import Ensemble
from dilm.models import load_model
from dilm.protocol import EvalConfig
from dilm.sampling import SHORTLIST, SYNC_EVERY, Sampler, SamplingSpec
from dilm.synset import read_set
from tests.dilm.test_sampling import GREEDY, lm, prompts_of  # noqa: F401 (lm: a fixture)
from tests.tune.test_sweep import SWEEPS, driver, kill_tree, write_yaml
from tests.userdata import write_reviews
from tune.config import load_config
from tune.sweep import check_resources

CPU = torch.device("cpu")

# the gpu preset's scale (models, counts, steps) cut to a CPU's seconds; every other value stays the preset's
# (probe_examples 0, rep_pool_per_class 0, gen_batch_size 2048, the sampler, the pooling, the selection)
TINY = {"generator": "tiny-llama", "learner": "tiny-bert", "probe": "tiny-bert", "dpc": [2], "n_sets": 2,
        "over_sample": 3, "length_cap": 24, "lm_steps": 4, "lm_batch_size": 8, "outer_loops": 2, "inner_loop": 2,
        "model_step_per_inner_step": 1, "syn_per_class": 4, "real_per_class": 8, "n_rep_sets": 2,
        "generate_interval": 1, "val_interval": 1, "val_size": 40, "val_dpc": 2, "val_sets": 1, "val_seeds": 2,
        "val_steps": 5}


@pytest.fixture
def on_gpu_paths(monkeypatch, tmp_path):
    """This process on the GPU's paths, with a cache of its own (its results are not a plain CPU's)."""
    monkeypatch.setenv(GPU_PATHS_ENV, "1")
    monkeypatch.setenv("DILM_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("value, on", [(None, False), ("", False), ("0", False), ("1", True), ("yes", True)])
def test_the_switch_turns_the_cpu_onto_the_gpus_paths(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv(GPU_PATHS_ENV, raising=False)
    else:
        monkeypatch.setenv(GPU_PATHS_ENV, value)
    assert gpu_paths(CPU) is on and gpu_paths("cpu") is on and gpu_paths("cuda:0")  # CUDA: always
    assert device_kind(CPU) == ("cpu+gpu-paths" if on else "cpu") and device_kind("cuda") == "cuda"
    if on:  # the method's stages in bf16 and a bf16 sampler copy, as on a bf16 GPU (emulated on an AVX2 CPU)
        assert autocast_dtype(CPU) == torch.bfloat16 and inference_dtype(CPU) == torch.bfloat16
    else:
        assert autocast_dtype(CPU) is None
    assert cpu_workers(EvalConfig(archs=("tiny-bert",), workers=2), CPU, 8) == (1 if on else 2)  # no pool
    assert Ensemble(load_model("tiny-bert", "classifier", 2, CPU), [0, 1], CPU).vectorized is on
    causal = load_model("tiny-llama", "causal-lm", device=CPU)
    assert Sampler(causal, CPU, SamplingSpec(), eos_id=0, pad_id=0).shortlist == (0 if on else SHORTLIST)


@pytest.mark.parametrize("mode", ["dynamic", "static", pytest.param("compiled", marks=pytest.mark.slow)])
def test_the_samplers_gpu_paths_decode_as_its_cpu_paths_do(lm, monkeypatch, mode):  # noqa: F811 (a fixture)
    """On the GPU's paths (full-vocabulary top-p, finished rows checked every SYNC_EVERY tokens) greedy decoding is
    the CPU's paths' (which is HF's, tests/dilm/test_sampling.py), in every mode (compiled: a plain ``torch.compile``
    here, a CUDA graph only on CUDA), with rows that finish at different steps."""
    model, tok = lm
    prompts = prompts_of(tok) * 2
    spec = dataclasses.replace(GREEDY, max_new_tokens=SYNC_EVERY + 4, batch_size=8, precision="fp32")
    eos = Sampler(model, CPU, spec, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id).sample(prompts)[0][2]
    cpu = Sampler(model, CPU, spec, eos_id=eos, pad_id=tok.pad_token_id).sample(prompts)
    monkeypatch.setenv(GPU_PATHS_ENV, "1")
    sampler = Sampler(model, CPU, dataclasses.replace(spec, mode=mode), eos_id=eos, pad_id=tok.pad_token_id,
                      prompt_width=12)
    assert sampler.shortlist == 0 and sampler.sample(prompts) == cpu
    assert len({len(r) for r in cpu}) > 1 and min(map(len, cpu)) < SYNC_EVERY  # not vacuous: rows finish early


def test_the_gpu_sweeps_resource_arithmetic():
    """sweeps/gpu-quick.yaml on one GPU and 16 CPUs: 1 actor x (2 CPU, 0.2 GPU) + 4 trials x (3 CPU, 0.2 GPU) = 14 CPU,
    1.0 GPU, as its comment says; every trial and the actor on cuda."""
    cfg = load_config(SWEEPS / "gpu-quick.yaml")
    pool, trial, n = cfg.eval.actor_resources, cfg.trial_resources, cfg.max_concurrent_trials
    assert (n, cfg.eval.actors) == (4, 1) and cfg.eval.device == "cuda" and cfg.fixed["preset"] == "gpu"
    assert pool.cpu + n * trial.cpu == 14 and math.isclose(pool.gpu + n * trial.gpu, 1.0)
    assert pool.as_remote()["num_gpus"] == 0.2 and trial.as_tune()["gpu"] == 0.2
    assert check_resources(cfg, {"CPU": 16.0, "GPU": 1.0}) == []
    assert check_resources(cfg, {"CPU": 14.0, "GPU": 1.0}) == []  # exactly full: no float rounding leaves one out
    assert "only 3 of max_concurrent_trials=4" in check_resources(cfg, {"CPU": 16.0, "GPU": 0.8})[0]
    assert "only 2 of max_concurrent_trials=4" in check_resources(cfg, {"CPU": 8.0, "GPU": 1.0})[0]
    with pytest.raises(DilmError, match="asks for GPUs"):
        check_resources(cfg, {"CPU": 16.0})
    with pytest.raises(DilmError, match="do not fit"):
        check_resources(cfg, {"CPU": 16.0, "GPU": 0.3})


# --------------------------------------------------------------------------- end to end on the GPU's paths (slow)


def spy(monkeypatch, cls, record: list, *attrs: str) -> None:
    """Record ``attrs`` of every ``cls`` built."""
    init = cls.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        record.append(tuple(getattr(self, a) for a in attrs))

    monkeypatch.setattr(cls, "__init__", recording)


@pytest.mark.slow
def test_the_gpu_presets_pipeline_on_the_cpu(on_gpu_paths, monkeypatch, task_file_args, tmp_path, capsys):
    """``dilm distill --preset gpu --evaluate`` (bench/gpu_evidence.sh dilm) at tiny scale, device cpu: sets come
    out and are scored, through the vmap ensemble (validation and evaluation, several members at once) and the
    sampler's GPU batching, in bf16."""
    ensembles, samplers, casts = [], [], []
    spy(monkeypatch, Ensemble, ensembles, "n", "vectorized")
    spy(monkeypatch, Sampler, samplers, "shortlist")
    autocast = torch.autocast.__init__

    def recording(self, device_type, dtype=None, *args, **kwargs):
        casts.append((device_type, dtype))
        autocast(self, device_type, dtype, *args, **kwargs)

    monkeypatch.setattr(torch.autocast, "__init__", recording)
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}")]
    out = tmp_path / "out"
    assert main(["distill", "--preset", "gpu", *task_file_args, *sets, "--device", "cpu", "-o", str(out),
                 "--evaluate", "--eval-seeds", "2", "--arch", "tiny-bert,tfidf-logreg"]) == 0
    printed = capsys.readouterr().out
    assert "DPC 2: 2 set(s)" in printed and "tiny-bert" in printed
    for path in sorted((out / "sets" / "dpc2").glob("set*.jsonl")):
        assert read_set(path, ("negative", "positive")).counts() == [2, 2]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["gpu_paths"] is True and prov["config"]["gen_batch_size"] == 2048 and prov["device"] == "cpu"
    assert json.loads((out / "scores.json").read_text())["2"]["tiny-bert"]["n"] == 4  # 2 sets x 2 seeds
    assert ensembles and all(vectorized for _, vectorized in ensembles)
    assert max(n for n, _ in ensembles) == 4  # evaluation: 2 sets x 2 seeds in one vmap-ed ensemble
    assert samplers and all(shortlist == 0 for shortlist, in samplers)
    assert ("cpu", torch.bfloat16) in casts


@pytest.mark.slow
def test_the_gpu_quick_sweep_on_the_cpu(tmp_path):
    """sweeps/gpu-quick.yaml with its distillations and evaluation cut to tiny scale (preset gpu kept), devices cpu
    and the GPU shares zeroed, on a local 2-CPU Ray cluster whose trials and evaluation actor take the GPU's paths
    ($DILM_GPU_PATHS in the driver's environment reaches every Ray worker it starts)."""
    raw = yaml.safe_load((SWEEPS / "gpu-quick.yaml").read_text())
    write_reviews(tmp_path / "data", n_train=200, n_test=60)
    raw.update(
        task={"name": "reviews", "train": "data/train.csv", "test": "data/test.csv", "text_column": "review",
              "label_column": "sentiment"},
        num_samples=2, max_concurrent_trials=2, startup_trials=2,
        trial_resources={"cpu": 1, "gpu": 0},
        fixed={**raw["fixed"], **TINY, "device": "cpu"},
        asha={**raw["asha"], "max_t": 10},
        eval={**raw["eval"], "archs": ["tiny-bert", "tfidf-logreg"], "steps": 5, "test_limit": 60, "device": "cpu",
              "actor_resources": {"cpu": 0, "gpu": 0}})
    assert raw["fixed"]["preset"] == "gpu" and raw["eval"]["seeds"] == 2
    config = write_yaml(tmp_path, raw, "gpu-quick-tiny.yaml")
    storage = tmp_path / "storage"
    proc = driver(config, storage, tmp_path / "driver.log", secrets={GPU_PATHS_ENV: "1",
                                                                     "DILM_CACHE": str(tmp_path / "cache")})
    try:
        proc.wait(timeout=900)
    finally:
        kill_tree(proc)
    log = (tmp_path / "driver.log").read_text()
    assert proc.returncode == 0, log[-4000:]
    provenances = sorted((storage / "sets" / raw["name"]).glob("*/provenance.json"))
    assert len(provenances) == 2, log[-4000:]
    for path in provenances:
        prov = json.loads(path.read_text())
        assert prov["gpu_paths"] is True and prov["config"]["gen_batch_size"] == 2048
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{storage}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(raw["mlflow"]["experiment"]).experiment_id])
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags and "baseline" not in r.data.tags]
    scored = [r for r in trials if {"acc_tiny-bert", "acc_tfidf-logreg"} <= set(r.data.metrics)]
    assert len(scored) == 2, log[-4000:]  # both trials' sets scored by the evaluation actor
