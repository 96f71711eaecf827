"""Prompt templates, the label-agreement probe and the ``<model>-probe`` evaluation architecture."""

import json

import numpy as np
import pytest
import torch

from dilm import DilmError
from dilm.archs import check_arch
from dilm.distill import DistillConfig
from dilm.evaluate import Evaluator
from dilm.generator import LABEL_TEMPLATE, TokenizedCorpus, parse, prompt, resolve_template
from dilm.models import load_tokenizer
from dilm.probe import LabelProbe, fit_logreg, predict
from dilm.protocol import EvalConfig
from dilm.synset import SynExample, SynSet
from dilm.tasks import TASKS, Example, TaskData, TaskSpec

CPU = torch.device("cpu")


# ---------------------------------------------------------------- prompt templates

def test_templates_resolve_by_key_task_or_literal():
    assert resolve_template("task", "sst2") == TASKS["sst2"].prompt_template
    assert prompt("positive", resolve_template("task", "sst2")) == \
        "Here is one short positive sentence from a movie review:"
    assert all(spec.prompt_template and "{label}" in spec.prompt_template for spec in TASKS.values())
    user = TaskSpec(name="tickets", train="t.csv")
    assert resolve_template("task", user) == LABEL_TEMPLATE  # no template or description of its own: the bare format
    described = TaskSpec(name="tickets", train="t.csv", description="a customer support ticket.")
    assert prompt("billing", resolve_template("task", described)) == \
        "Here is a customer support ticket labelled billing:"  # the prompt from the spec's description
    assert resolve_template("label", "sst2") == LABEL_TEMPLATE == "label: {label}\ntext:"
    assert resolve_template("A {label} tweet:", "sst2") == "A {label} tweet:"
    with pytest.raises(DilmError, match="has no {label} field"):
        resolve_template("A tweet:", "sst2")
    with pytest.raises(DilmError, match="has no {label} field"):
        DistillConfig.from_preset("smoke", prompt_template="A tweet:")  # fails before any model loads


def test_corpus_renders_the_template_and_parse_keeps_one_line():
    tok = load_tokenizer("tiny-llama")
    template = resolve_template("task", "sst2")
    corpus = TokenizedCorpus.build(tok, [Example("a fine film", 1)], ("negative", "positive"), 64, template)
    assert tok.decode(corpus.sequences[0]) == \
        f"Here is one short positive sentence from a movie review: a fine film{tok.eos_token}"
    assert parse(" a fine film\n\nHere is another one", False) == ("a fine film", None)
    assert parse(" one\npair: two", True) == ("one", "two")


@pytest.mark.integration
def test_cli_prompt_template_reaches_provenance(tmp_path, task_file_args):
    from dilm.cli import main

    # a user's files (the toy task): the run tokenises and samples 200 short texts, not SST-2's 67k
    assert main(["distill", *task_file_args, "--preset", "smoke", "--set", "probe=", "--set", "label_filter=none",
                 "--set", "n_sets=1", "--set", "outer_loops=0", "--prompt-template", "A {label} film review:",
                 "-o", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "provenance.json").read_text())["prompt_template"] == \
        "A {label} film review:"


# ---------------------------------------------------------------- the label-agreement probe

def test_probe_agreement_and_its_disk_cache(toy_task, tmp_path, monkeypatch):
    monkeypatch.setenv("DILM_CACHE", str(tmp_path))
    probe = LabelProbe.for_task(toy_task, "tiny-bert", CPU)
    by_class = toy_task.by_class("test")
    # a probe on a random tiny encoder's features: 55 of 60 measured; chance is 30 ± 3.9 (sd), so 45 is > 3.8 sd
    # above chance and 10 test examples below what was measured
    agree = probe.agreement(by_class)
    assert agree > 0.75
    assert probe.agreement(by_class[::-1]) == pytest.approx(1 - agree)  # texts of the other class: disagreement
    cached = list((tmp_path / "probes").glob("*.joblib"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    LabelProbe.for_task(toy_task, "tiny-bert", CPU)  # read back, not refitted
    assert cached[0].stat().st_mtime_ns == stamp
    other = TaskData("toy", toy_task.label_names, toy_task.train[:-2], toy_task.test)
    LabelProbe.for_task(other, "tiny-bert", CPU)  # other content: another cache entry
    assert len(list((tmp_path / "probes").glob("*.joblib"))) == 2


def percent_of_own_class(probe: LabelProbe, by_class: list[list]) -> float:
    """% of the texts of ``by_class[c]`` the probe predicts as c, over all classes."""
    return 100 * float(np.concatenate([probe.predict([s.text for s in g]) == c for c, g in enumerate(by_class)]).mean())


@pytest.mark.integration
def test_distill_emits_label_agreement_per_pool_and_for_final_sets(smoke_run, toy_task):
    """conftest's smoke run (the preset's tiny-bert probe, DPC 2 and 3, on the toy task; shared with test_distill),
    which kept the texts generated for each class at every pool regeneration."""
    cfg, result, seen, generated = smoke_run
    assert cfg.probe == "tiny-bert" and cfg.dpc == (2, 3)
    pools = [m for m in seen if "label_agreement" in m]
    assert len(pools) == len(generated) == cfg.outer_loops // cfg.generate_interval
    assert all(m["stage"] == "match" for m in pools)
    probe = LabelProbe.for_task(toy_task, "tiny-bert", CPU)  # the run's probe, read back from the disk cache
    assert [m["label_agreement"] for m in pools] == pytest.approx([percent_of_own_class(probe, g) for g in generated])
    final = {k for m in seen for k in m if k.startswith("final_label_agreement")}
    assert final == {"final_label_agreement", "final_label_agreement/dpc2", "final_label_agreement/dpc3"}
    prov = json.loads(result.provenance.read_text())["label_agreement"]
    assert len(prov["pools"]) == len(pools) and set(prov["final"]) == {"candidates", "dpc2", "dpc3"}
    assert prov["probe"] == "tiny-bert"


# ---------------------------------------------------------------- the <model>-probe architecture

def _set(examples, names, soft=None):
    return SynSet([SynExample(e.text, e.label, soft_label=None if soft is None else soft(e)) for e in examples],
                  names, {})


def test_minilm_probe_tells_a_good_set_from_a_bad_one(toy_task):
    picked = [e for c in toy_task.by_class() for e in c[:5]]
    good = _set(picked, toy_task.label_names)
    bad = _set([Example(e.text, 1 - e.label) for e in picked], toy_task.label_names)  # labels swapped
    # soft labels are honoured: 0.9 on the wrong class reads like the swapped set
    soft_bad = _set(picked, toy_task.label_names, soft=lambda e: [0.9, 0.1] if e.label else [0.1, 0.9])
    ev = Evaluator(toy_task, EvalConfig(archs=("minilm-probe",), seeds=3, progress=False))
    acc = [ev.evaluate([s]).summary()["minilm-probe"] for s in (good, bad, soft_bad)]
    assert acc[0]["accuracy"] > 90 and acc[1]["accuracy"] < 10 and acc[2]["accuracy"] < 10
    assert acc[0]["n"] == 1  # deterministic: one fit per set, whatever the seeds


def test_probe_arch_names_are_checked():
    check_arch("minilm-probe")
    check_arch("tiny-bert-probe")
    check_arch("tiny-llama-probe")  # a decoder's states too (test_a_decoder_lm_probe_is_a_judge_too)
    with pytest.raises(DilmError, match="no-such-model"):
        check_arch("./no-such-model-probe")


def test_fit_logreg_soft_targets_and_one_class():
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    hard = fit_logreg(x, np.eye(2)[[0, 0, 1, 1]])
    assert list(predict(hard, x)) == [0, 0, 1, 1]
    flipped = fit_logreg(x, np.array([[0.2, 0.8], [0.2, 0.8], [0.8, 0.2], [0.8, 0.2]]))
    assert list(predict(flipped, x)) == [1, 1, 0, 0]
    assert list(predict(fit_logreg(x, np.eye(2)[[1, 1, 1, 1]]), x)) == [1, 1, 1, 1]


def test_a_decoder_lm_probe_is_a_judge_too(toy_task):
    """``<decoder>-probe`` (``smollm2-probe`` on the packaged model): mean-pooled decoder states, a judge whose
    features no MiniLM-space selection saw; on the toy task a good set beats its label-swapped twin."""
    from dilm.archs import check_arch, kind_of

    check_arch("tiny-llama-probe")
    assert kind_of("smollm2-probe").model("smollm2-probe") == "smollm2-135m"
    picked = [e for c in toy_task.by_class() for e in c[:5]]
    good = _set(picked, toy_task.label_names)
    bad = _set([Example(e.text, 1 - e.label) for e in picked], toy_task.label_names)
    ev = Evaluator(toy_task, EvalConfig(archs=("tiny-llama-probe",), seeds=1, progress=False))
    good_acc, bad_acc = (ev.evaluate([s]).summary()["tiny-llama-probe"]["accuracy"] for s in (good, bad))
    assert good_acc == pytest.approx(100 - bad_acc) and good_acc > 75  # 60 test texts; chance 50 ± 6.5
