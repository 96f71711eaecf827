"""How soft labels and per-example weights are read: the JSONL field, the protocol's targets, TF-IDF, ICL."""

import random

import numpy as np
import pytest
import torch

from dilm import DilmError
from dilm.evaluate import (
    ICL_SOFT_NOTE,
    EvalConfig,
    Evaluator,
    finetune_ensemble,
    icl_demonstrations,
    tfidf_logreg,
)
from dilm.synset import SynExample, SynSet, read_set, write_set

CPU = torch.device("cpu")


def soft_set(toy_task, per_class: int, probs: list[float], weights: list[float] | None = None) -> SynSet:
    """``per_class`` examples per class; example i's soft label puts ``probs[i]`` on its own class."""
    picked = [ex for g in toy_task.by_class() for ex in g[:per_class]]
    soft = [[p, 1 - p] if e.label == 0 else [1 - p, p] for e, p in zip(picked, probs)]
    return SynSet.from_examples(picked, toy_task.label_names).with_soft_labels(soft, weights)


def test_weights_round_trip_and_bad_weights_are_one_line_errors(toy_task, tmp_path):
    s = soft_set(toy_task, 2, [0.9, 0.6, 1.0, 0.7], [2.0, 0.5, 1.0, 0.0])
    back = read_set(write_set(tmp_path / "w.jsonl", s), toy_task.label_names)
    assert [e.weight for e in back.examples] == [2.0, 0.5, 1.0, 0.0]
    assert back.examples[0].target(2) == pytest.approx([1.8, 0.2])  # weight × distribution
    assert '"weight"' not in (tmp_path / "w.jsonl").read_text().splitlines()[2]  # weight 1 is not written
    (tmp_path / "bad.jsonl").write_text('{"text": "a film", "label": "positive", "weight": -1}\n')
    with pytest.raises(DilmError, match=r"bad\.jsonl:1: 'weight' must be a non-negative number"):
        read_set(tmp_path / "bad.jsonl", toy_task.label_names)


def test_a_zero_weight_example_does_not_train(toy_task):
    """Flipping the label of a weight-0 example changes nothing; with weight 1 it changes what is learned."""
    test = toy_task.test[:60]
    cfg = EvalConfig(archs=("tiny-bert",), seeds=1, steps=15, lr=1e-3, device="cpu", progress=False)
    base = soft_set(toy_task, 3, [1.0] * 6)

    def variant(flip: bool, weight: float) -> SynSet:
        e = base.examples[0]
        label, soft = (1 - e.label, tuple(reversed(e.soft_label))) if flip else (e.label, e.soft_label)
        return SynSet([SynExample(e.text, label, None, soft, weight), *base.examples[1:]], base.label_names)

    sets = [variant(False, 0.0), variant(True, 0.0), variant(False, 1.0), variant(True, 1.0)]
    preds = finetune_ensemble("tiny-bert", [(s, 0) for s in sets], test, cfg, CPU)
    tf = [tfidf_logreg(s, 0, test) for s in sets]
    assert np.array_equal(preds[0], preds[1]) and np.array_equal(tf[0], tf[1])
    assert not np.array_equal(preds[2], preds[3]) or not np.array_equal(tf[2], tf[3])  # guard: weight 1 matters


def test_icl_shows_the_argmax_label_word_of_a_soft_label(toy_task):
    e = toy_task.train[0]  # label field says one class, the distribution the other (as a user file may)
    s = SynSet([SynExample(e.text, e.label, None, (0.3, 0.7) if e.label == 0 else (0.7, 0.3))], toy_task.label_names)
    [(shown, c)] = icl_demonstrations(s, 0, 8)
    assert shown.text == e.text and c == 1 - e.label


def test_icl_draws_demonstrations_by_label_margin(toy_task):
    # 10 confident examples, 10 with uniform labels (margin 0), 8 shots: only confident ones are shown
    s = soft_set(toy_task, 10, [1.0 if i % 2 else 0.5 for i in range(20)])
    for seed in range(5):
        assert all(max(e.soft_label) == 1.0 for e, _ in icl_demonstrations(s, seed, 8))
    # margins 0.4 vs 0.1 (and weights): confident examples are drawn about 4x as often
    s = soft_set(toy_task, 10, [0.9 if i % 2 else 0.6 for i in range(20)])
    shown = [max(e.soft_label) == 0.9 for seed in range(200) for e, _ in icl_demonstrations(s, seed, 4)]
    assert np.mean(shown) > 0.7
    w = soft_set(toy_task, 10, [0.9] * 20, [1.0 if i % 2 else 0.0 for i in range(20)])
    assert all(e.weight == 1.0 for e, _ in icl_demonstrations(w, 3, 10))
    # a hard set keeps the plain seeded shuffle of the set
    hard = SynSet.from_examples(toy_task.train[:20], toy_task.label_names)
    order = list(hard.examples)
    random.Random(7).shuffle(order)
    assert [e for e, _ in icl_demonstrations(hard, 7, 5)] == order[:5]


def test_icl_scores_say_how_soft_labels_were_read(toy_task):
    cfg = EvalConfig(archs=("icl-tiny-llama",), seeds=1, icl_shots=2, test_limit=3, device="cpu", progress=False)
    ev = Evaluator(toy_task, cfg)
    hard = SynSet.from_examples(toy_task.train[:4], toy_task.label_names)
    assert "note" not in ev.evaluate([hard]).summary()["icl-tiny-llama"]
    soft = soft_set(toy_task, 2, [0.8] * 4)
    assert ev.evaluate([soft]).summary()["icl-tiny-llama"]["note"] == ICL_SOFT_NOTE
