"""End-to-end DiLM on tiny models: config validation, selection, resume, the CLI smoke preset."""

import json

import pytest
import torch

from dilm import DilmError
from dilm.cli import main
from dilm.distill import PRESETS, DistillConfig, Distiller, distill
from dilm.synset import read_set
from dilm.tasks import load_task


@pytest.mark.parametrize("overrides,match", [
    ({"outer_loops": 3, "generate_interval": 2}, "multiple of generate_interval"),
    ({"task": "sst3"}, "unknown task 'sst3'"),
    ({"syn_per_class": 9, "pool_per_class": 8}, "exceeds pool_per_class"),
    ({"dpc": (0,)}, "dpc must be positive"),
    ({"bogus": 1}, r"unknown distill option\(s\) \['bogus'\]"),
    ({"sampler": "fast"}, "unknown sampler 'fast'; known: dynamic, static, compiled"),
    ({"gen_loss_norm": "token"}, "unknown gen_loss_norm 'token'; known: batch, text"),
    ({"length_quantile": 0}, r"length_quantile must be in \(0, 1\], got 0"),
    ({"length_cap": 0}, "length_cap must be >= 1, got 0"),
    ({"max_new_tokens": -1}, "max_new_tokens must be >= 0, got -1"),
])
def test_bad_configs_fail_before_any_model_loads(overrides, match):
    with pytest.raises(DilmError, match=match):
        DistillConfig.from_preset("smoke", **overrides)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_is_a_valid_config(preset):
    cfg = DistillConfig.from_preset(preset)  # validates (divisibility, sizes, sampler mode)
    assert DistillConfig(**cfg.to_dict()) == cfg  # what provenance and the sweep's params record rebuilds it


def test_dpc_larger_than_class_and_missing_model_fail_early(tmp_path, toy_task):
    with pytest.raises(DilmError, match="model path '/nope' does not exist"):
        Distiller(DistillConfig.from_preset("smoke", generator="/nope", output_dir=str(tmp_path)), task=toy_task)
    with pytest.raises(DilmError, match="DPC 500 is larger than class"):
        Distiller(DistillConfig.from_preset("smoke", dpc=(500,), output_dir=str(tmp_path)), task=toy_task)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill")
    seen = []
    cfg = DistillConfig.from_preset("smoke", dpc=(2, 3), output_dir=str(out))
    return cfg, distill(cfg, callback=seen.append), seen


def test_final_sets_exact_dpc_no_duplicates(smoke_run):
    cfg, result, _ = smoke_run
    assert sorted(result.sets) == [2, 3]
    for dpc, paths in result.sets.items():
        assert len(paths) == cfg.n_sets
        for p in paths:
            s = read_set(p, ("negative", "positive"))
            assert s.counts() == [dpc, dpc]
            assert len({e.text for e in s.examples}) == len(s.examples)
    prov = json.loads(result.provenance.read_text())
    assert prov["config"]["dpc"] == [2, 3] and "torch" in prov["versions"] and prov["timings_s"]


def test_callback_sees_lm_match_and_validation_metrics(smoke_run):
    cfg, result, seen = smoke_run
    stages = {m["stage"] for m in seen}
    assert stages == {"lm", "match"}
    match_steps = [m for m in seen if "match_loss" in m]
    assert len(match_steps) == cfg.total_match_steps
    assert [m["step"] for m in match_steps] == list(range(cfg.lm_steps + 1, cfg.lm_steps + cfg.total_match_steps + 1))
    assert any("val_accuracy" in m for m in seen) and result.best_val_accuracy is not None


def test_resume_from_checkpoint_continues_the_step_count(tmp_path):
    cfg = DistillConfig.from_preset("smoke", output_dir=str(tmp_path), fail_at_step=3)
    with pytest.raises(RuntimeError, match="injected failure"):
        distill(cfg)
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["stage"] == "match" and state["outer"] == 1
    seen = []
    resumed = DistillConfig.from_preset("smoke", output_dir=str(tmp_path))
    distill(resumed, callback=seen.append)
    steps = [m["step"] for m in seen if "match_loss" in m]
    assert steps == [cfg.lm_steps + 3, cfg.lm_steps + 4]  # outer loop 2 only; LM stage not repeated
    assert not any(m["stage"] == "lm" for m in seen)
    # the AdamW moments came back too: the optimiser counts every matching step, not just the resumed ones
    opt = torch.load(tmp_path / "checkpoint" / "weights.pt")["optimizer"]
    assert {int(s["step"]) for s in opt["state"].values()} == {cfg.total_match_steps}


def test_cli_smoke_preset(tmp_path, capsys):
    assert main(["distill", "--task", "sst2", "--preset", "smoke", "-o", str(tmp_path / "o")]) == 0
    assert "DPC 2: 2 set(s)" in capsys.readouterr().out
    assert main(["distill", "--task", "nope", "--preset", "smoke", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dilm: error: unknown task 'nope'") and "\n" not in err


def test_token_limits_come_from_the_tasks_data(tmp_path):
    """Item 1: by default max_length / max_new_tokens are the 0.99 quantile of the task's token lengths (a fixed
    64 cut 47.5 % of MRPC's rendered pairs), capped by length_cap; explicit values win."""
    task = load_task("mrpc")
    run = Distiller(DistillConfig.from_preset("smoke", task="mrpc", length_cap=512, output_dir=str(tmp_path)),
                    task=task)
    limits = run.limits
    full = [len(s) for s in run.full_corpus.sequences]
    assert sum(n > limits["max_length"] for n in full) <= 0.01 * len(full) < sum(n > 64 for n in full) / 40
    assert all(len(s) <= limits["max_length"] for s in run.corpus.sequences)
    assert limits["max_new_tokens"] > 64 and run.sampler.max_new_tokens == limits["max_new_tokens"]
    capped = Distiller(DistillConfig.from_preset("smoke", task="mrpc", length_cap=30, max_new_tokens=7,
                                                 output_dir=str(tmp_path)), task=task).limits
    assert capped == {"max_length": 30, "max_new_tokens": 7}


@pytest.mark.parametrize("task", ["mrpc", pytest.param("ag_news", marks=pytest.mark.slow)])
def test_cli_smoke_preset_on_pair_and_multiclass_tasks(task, tmp_path, capsys):
    """``--preset smoke`` on MRPC used to stop with "0 usable texts": pairs now always parse (see
    test_sampling), and the sets hold whole pairs."""
    assert main(["distill", "--task", task, "--preset", "smoke", "-o", str(tmp_path)]) == 0
    t = load_task(task)
    s = read_set(tmp_path / "sets" / "dpc2" / "set00.jsonl", t.label_names, t.is_pair)
    assert s.counts() == [2] * t.num_classes
    assert all(bool(e.text_pair) == t.is_pair for e in s.examples)
