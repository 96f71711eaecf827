"""The shared LM stage: trained alone, saved atomically, keyed by content, reused by matching runs."""

import dataclasses
import json
import threading

import pytest
import torch

from dilm import DilmError
from dilm.distill import LM_META, DistillConfig, Distiller, LMStageConfig, distill, lm_cache_key, train_lm
from dilm.tasks import Example, TaskData


def _cfg(tmp_path, **kw) -> DistillConfig:
    return DistillConfig.from_preset("smoke", output_dir=str(tmp_path / "run"), probe="", label_filter="none", **kw)


def test_key_follows_lm_keys_prompt_and_data_not_the_matching_stage(tmp_path, toy_task):
    cfg = _cfg(tmp_path)
    key = lm_cache_key(cfg, toy_task)
    assert key == lm_cache_key(cfg, toy_task)
    for same in ({"generator_lr": 1e-3}, {"outer_loops": 4}, {"dpc": (3,)}, {"n_sets": 5}, {"probe": "tiny-bert"}):
        assert lm_cache_key(dataclasses.replace(cfg, **same), toy_task) == key, same
    for other in ({"lm_lr": 5e-4}, {"lm_steps": 11}, {"seed": 1}, {"max_length": 20},
                  {"prompt_template": "Review ({label}):"}, {"generator": "tiny-bert"}):
        assert lm_cache_key(dataclasses.replace(cfg, **other), toy_task) != key, other
    edited = list(toy_task.train)
    edited[5] = Example(edited[5].text + " !", edited[5].label)
    changed = TaskData("toy", toy_task.label_names, edited, toy_task.test)
    assert lm_cache_key(cfg, changed) != key  # the data's content, not its name


# fields that reach the LM stage through its data or prompt, not through LMStageConfig: the held-out split
# (val_size, val_interval) and the rendered template are hashed as the data and the prompt
DATA_FIELDS = {"task", "prompt_template", "val_size", "val_interval"}
OTHER_VALUE = {"generator": "tiny-bert", "learner": "minilm-l6", "device": "cpu", "probe": "minilm-l6",
               "lm_precision": "fp32", "output_dir": "elsewhere", "lm_checkpoint": "some/lm", "pooling": "mean",
               "gen_loss_norm": "text",
               "sampler": "static", "dpc": (3, 5), "selection": "herding", "label_filter": "none",
               "select_pooling": "cls", "copy_filter": "none", "final_pool": "shared", "final_sources": "generator",
               "final_mix": "pooled", "length_quantile": 0.5, "top_p": 0.5, "temperature": 2.0}


def other_value(cfg: DistillConfig, name: str):
    """A valid value of field ``name`` that differs from ``cfg``'s."""
    if name in OTHER_VALUE:
        return OTHER_VALUE[name]
    v = getattr(cfg, name)
    if isinstance(v, bool):
        return not v
    if name == "outer_loops":
        return v + cfg.generate_interval * cfg.val_interval  # stays a multiple of both
    if name in ("generate_interval", "val_interval"):
        return 1 if v != 1 else cfg.outer_loops  # divides outer_loops
    return v * 2 + 50 if isinstance(v, int) else v * 0.5 + 0.25


def test_every_lm_stage_field_and_no_other_field_enters_the_key(tmp_path, toy_task):
    """The key hashes every field the LM stage reads (``LMStageConfig``, what the stage's code takes) and no field of
    the matching or selection stages, so two configs that differ only in how the LM is trained never share one."""
    cfg = dataclasses.replace(_cfg(tmp_path), probe="tiny-bert", label_filter="probe")
    key = lm_cache_key(cfg, toy_task)
    lm_fields = {f.name for f in dataclasses.fields(LMStageConfig)}
    assert {"lm_weight_decay", "lm_lr", "lm_steps", "lm_batch_size", "generator", "seed"} <= lm_fields
    changed, kept = set(), set()
    for f in dataclasses.fields(DistillConfig):
        if f.name in DATA_FIELDS:
            continue
        other = dataclasses.replace(cfg, **{f.name: other_value(cfg, f.name)})
        assert getattr(other, f.name) != getattr(cfg, f.name), f.name
        (changed if lm_cache_key(other, toy_task) != key else kept).add(f.name)
    assert changed == lm_fields, f"in the key but not LM-stage fields: {changed - lm_fields}; " \
                                 f"LM-stage fields missing from the key: {lm_fields - changed}"
    assert "generator_lr" in kept and "outer_loops" in kept and "top_p" in kept  # the walk covered the others


def test_train_lm_once_reused_and_replaced_when_the_key_changes(tmp_path, toy_task):
    cfg = _cfg(tmp_path)
    out = tmp_path / "cache" / "lm"
    seen = []
    path = train_lm(cfg, out, task=toy_task, callback=seen.append)
    meta = json.loads((path / LM_META).read_text())
    assert path == out and meta["key"] == lm_cache_key(cfg, toy_task) and meta["generator"] == "tiny-llama"
    assert any(m.get("stage") == "lm" for m in seen)
    assert sorted(p.name for p in out.parent.iterdir()) == [".lm.lock", "lm"]  # no half-written folder left
    stamp = (path / LM_META).stat().st_mtime_ns
    seen.clear()
    assert train_lm(cfg, out, task=toy_task, callback=seen.append) == path and not seen  # reused, not retrained
    assert (path / LM_META).stat().st_mtime_ns == stamp
    other = dataclasses.replace(cfg, lm_lr=3e-4)
    train_lm(other, out, task=toy_task)  # a different LM config replaces the folder's content
    assert json.loads((path / LM_META).read_text())["key"] == lm_cache_key(other, toy_task)
    assert sorted(p.name for p in out.parent.iterdir()) == [".lm.lock", "lm"]


def test_concurrent_callers_train_once(tmp_path, toy_task):
    cfg = _cfg(tmp_path)
    out = tmp_path / "lm"
    runs, errors = [], []

    def call():
        try:
            seen = []
            train_lm(cfg, out, task=toy_task, callback=seen.append)
            runs.append(any(m.get("stage") == "lm" for m in seen))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(runs) == [False, True]  # one trained, the other found it done


@pytest.mark.integration
def test_matching_starts_from_the_checkpoint(tmp_path, toy_task):
    cfg = _cfg(tmp_path)
    path = train_lm(cfg, tmp_path / "lm", task=toy_task)
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(path).state_dict()
    reuse = dataclasses.replace(cfg, lm_checkpoint=str(path), output_dir=str(tmp_path / "m"))
    run = Distiller(reuse, task=toy_task)
    for k, v in run.generator.state_dict().items():
        assert torch.equal(v, saved[k]), k
    fresh = Distiller(cfg, task=toy_task).generator.state_dict()
    assert any(not torch.equal(fresh[k], saved[k]) for k in saved)  # the LM stage did change the weights
    seen = []
    result = Distiller(reuse, callback=seen.append, task=toy_task).fit()
    assert not any(m["stage"] == "lm" for m in seen)
    assert [m["step"] for m in seen if "match_loss" in m][0] == cfg.lm_steps + 1  # the step count goes on
    assert json.loads(result.provenance.read_text())["lm_checkpoint"] == str(path)


@pytest.mark.integration
def test_a_loaded_task_is_not_loaded_or_hashed_again(tmp_path, toy_task, monkeypatch):
    """A sweep trial loads its task once: given it, the shared LM checkpoint (key, training) hashes the training data
    once and loads nothing, and distill loads nothing either."""
    from dilm.distill import context, lm_stage
    from tune.trial import lm_checkpoint_for

    def no_load(name, *args, **kwargs):
        raise AssertionError(f"task {name!r} loaded again")

    hashes = []
    fingerprint = lm_stage.task_fingerprint
    monkeypatch.setattr(lm_stage, "task_fingerprint", lambda *a: hashes.append(a) or fingerprint(*a))
    for module in (context, lm_stage):
        monkeypatch.setattr(module, "load_task", no_load)
    cfg = _cfg(tmp_path)
    path = lm_checkpoint_for(cfg, tmp_path / "lm", toy_task)
    assert len(hashes) == 1 and path.name == json.loads((path / LM_META).read_text())["key"]
    assert path.name == lm_cache_key(cfg, toy_task) and len(hashes) == 2  # the same key, recomputed here to check
    result = distill(dataclasses.replace(cfg, lm_checkpoint=str(path)), task=toy_task)
    assert result.sets and len(hashes) == 2


def test_bad_lm_checkpoints_fail_with_one_line(tmp_path, toy_task):
    cfg = _cfg(tmp_path)
    with pytest.raises(DilmError, match="LM checkpoint .*nope does not exist"):
        Distiller(dataclasses.replace(cfg, lm_checkpoint=str(tmp_path / "nope")), task=toy_task)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DilmError, match="not an LM-stage checkpoint written by dilm"):
        Distiller(dataclasses.replace(cfg, lm_checkpoint=str(tmp_path / "empty")), task=toy_task)
    path = train_lm(cfg, tmp_path / "lm", task=toy_task)
    with pytest.raises(DilmError, match="trained with prompt template 'label: {label}"):
        Distiller(dataclasses.replace(cfg, lm_checkpoint=str(path), prompt_template="Review ({label}):"),
                  task=toy_task)
    meta = json.loads((path / LM_META).read_text())
    (path / LM_META).write_text(json.dumps({**meta, "generator": "gpt2"}))
    with pytest.raises(DilmError, match="trained with generator 'gpt2', this run has 'tiny-llama'"):
        Distiller(dataclasses.replace(cfg, lm_checkpoint=str(path)), task=toy_task)


@pytest.mark.integration
def test_cli_lm_only_then_lm_checkpoint(tmp_path, capsys, task_file_args):
    from dilm.cli import main

    # a user's files (the toy task, described), one outer loop: the LM stage and the run from its checkpoint tokenise
    # and sample 200 short texts, not SST-2's 67k (~10 s less)
    base = ["distill", *task_file_args, "--description", "a movie review", "--preset", "smoke", "--set", "probe=",
            "--set", "label_filter=none", "--set", "n_sets=1", "--set", "outer_loops=1"]
    assert main([*base, "--lm-only", "-o", str(tmp_path / "a")]) == 0
    assert "LM-stage checkpoint" in capsys.readouterr().out and (tmp_path / "a" / "lm" / LM_META).exists()
    assert main([*base, "--lm-checkpoint", str(tmp_path / "a" / "lm"), "-o", str(tmp_path / "b")]) == 0
    prov = json.loads((tmp_path / "b" / "provenance.json").read_text())
    assert prov["lm_checkpoint"] == str(tmp_path / "a" / "lm") and prov["prompt_template"].startswith("Here is")
    assert main([*base, "--lm-checkpoint", str(tmp_path / "zz"), "-o", str(tmp_path / "c")]) == 2
    assert "does not exist" in capsys.readouterr().err
