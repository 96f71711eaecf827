"""Selection among generated candidates (k-means, herding toward the candidates' or the real mean, the probe's label
filter) and the memorisation / contamination report of a set."""

import numpy as np
import pytest
import torch

from dilm.memorisation import CopyIndex, memorisation_report, ngrams
from dilm.selection import SELECTIONS, herding, label_filter, select_rows


def blobs(seed=0) -> torch.Tensor:
    """60 unit-ish rows in 3 well separated blobs of 20 (blob b around axis b)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(8)[:3] * 5
    return torch.cat([c + 0.3 * torch.randn(20, 8, generator=g) for c in centres])


@pytest.mark.parametrize("method", SELECTIONS)
def test_every_selection_returns_k_distinct_rows(method):
    x = blobs()
    idx = select_rows(x, 6, method, seed=0, real_mean=torch.nn.functional.normalize(x, dim=1).mean(0))
    assert len(idx) == len(set(idx)) == 6 and all(0 <= i < 60 for i in idx)


def test_herding_matches_the_mean_it_is_given():
    x = blobs()
    unit = torch.nn.functional.normalize(x.double(), dim=1)
    # toward the candidates' own mean: the 3 chosen rows' mean is closer to it than any 3 rows of one blob
    own = herding(x, 3)
    assert sorted(i // 20 for i in own) == [0, 1, 2]  # one per blob: the balanced mean
    # toward a target inside blob 2 (real data elsewhere than the candidates' mean): the rows come from blob 2
    target = unit[40:60].mean(0)
    assert all(i // 20 == 2 for i in herding(x, 3, target))
    # herding beats the rows picked at random at matching the target
    chosen = unit[herding(x, 5, target)].mean(0)
    rand = unit[torch.randperm(60, generator=torch.Generator().manual_seed(1))[:5]].mean(0)
    assert (chosen - target).norm() < (rand - target).norm()


def test_label_filter_keeps_the_confident_and_falls_back_to_the_most_confident():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55], [0.95, 0.05]])
    assert label_filter(probs, 0, 0.0, 2) == [0, 2, 4]  # the probe's class is the candidate's
    assert label_filter(probs, 1, 0.0, 2) == [1, 3]
    assert label_filter(probs, 0, 0.7, 2) == [0, 4]  # and confident enough
    assert label_filter(probs, 1, 0.9, 2) == [1, 3]  # none pass 0.9: the 2 most confident of class 1
    assert label_filter(probs, 0, 0.0, 5) == [0, 1, 2, 3, 4]  # k of 5: all
    three = np.array([[0.4, 0.35, 0.25], [0.3, 0.45, 0.25]])  # 3 classes: the argmax, not p >= 0.5
    assert label_filter(three, 0, 0.0, 1) == [0] and label_filter(three, 1, 0.0, 1) == [1]


def test_the_copy_filter_drops_copies_of_training_texts_before_the_label_filter():
    """``copy_filter``: candidates flagged as copies never enter a set while DPC originals remain (the label filter
    and the choice then run on the originals); with fewer originals than DPC, the first copies fill up."""
    from dilm.distill.select import Candidates, Selection, select
    from dilm.generator import Sample
    from dilm.memorisation import copied

    train = ["the plot is thin", "a gripping , beautifully acted drama about two brothers and their father"]
    texts = ["The plot is  thin", "a gripping , beautifully acted drama about two brothers and their mother",
             "a fresh comedy with a big heart", "warm and very funny", "a sharp little thriller", "so dull"]
    index = CopyIndex(train)
    assert copied(texts, index, "exact").tolist() == [True, False, False, False, False, False]
    near = copied(texts, index, "near")
    assert near.tolist() == [True, True, False, False, False, False]
    samples = [Sample(t, None, [], 0) for t in texts]
    x = torch.eye(6)  # herding among equidistant rows: any originals may be chosen, none of the copies
    probs = np.tile([0.9, 0.1], (6, 1))
    probs[5] = [0.3, 0.7]  # "so dull" reads as the other class
    cands = Candidates([samples], [x], [probs], [near])
    for method in SELECTIONS:
        s = select(cands, 3, 0, ("a",), Selection(method, "probe", copy_filter="near"), [x.mean(0).double()])
        assert {e.text for e in s.examples} == set(texts[2:5]), method  # no copy, and not the off-label text
        assert s.meta["copy_filter"] == "near"
    kept = select(cands, 3, 0, ("a",), Selection("herding", "none"), None)  # no copy filter: copies may be chosen
    assert kept.meta["copy_filter"] == "none"
    few = select(cands, 5, 0, ("a",), Selection("herding", "none", copy_filter="near"), None)
    assert {e.text for e in few.examples} == set(texts[:1] + texts[2:])  # 4 originals + the first copy
    with pytest.raises(ValueError, match="copy flags"):
        select(Candidates([samples], [x], [probs]), 3, 0, ("a",), Selection("herding", "none", copy_filter="exact"))


def test_memorisation_counts_exact_and_near_copies_of_train_and_test():
    train = ["a gripping , beautifully acted drama about two brothers and their father",
             "the plot is thin", "utterly charming from start to finish"]
    test = ["a dull and lifeless sequel that nobody asked for"]
    synthetic = [
        "The plot is   thin",  # exact copy (case and spaces normalised)
        "a gripping , beautifully acted drama about two brothers and their mother",  # 9 of 10 4-grams in one text
        "a fresh comedy with a big heart",  # new
        "a dull and lifeless sequel that nobody asked for",  # a test text
    ]
    report = memorisation_report(synthetic, CopyIndex(train), CopyIndex(test))
    assert report["train"] == {"n": 4, "exact": 1, "near": 2, "exact_share": 0.25, "near_share": 0.5}
    assert report["test"]["exact"] == 1 and report["test"]["near"] == 1
    # n-grams from different training texts do not add up to a copy
    spliced = "a gripping , beautifully acted utterly charming from start to finish"
    assert CopyIndex(train).overlap(spliced) < 0.8
    assert ngrams("too short") == {("too", "short")} and ngrams("") == set()


def test_probe_probabilities_rank_on_and_off_label_texts(toy_task, tmp_path, monkeypatch):
    from dilm.probe import LabelProbe

    monkeypatch.setenv("DILM_CACHE", str(tmp_path))
    probe = LabelProbe.for_task(toy_task, "tiny-bert", torch.device("cpu"))
    neg, pos = toy_task.by_class("test")
    p = probe.probabilities(neg + pos, 2)
    assert p.shape == (len(neg) + len(pos), 2) and np.allclose(p.sum(1), 1)
    assert np.array_equal(p.argmax(1), probe.predict([e.text for e in neg + pos]))
    # the filter keeps exactly the texts the probe assigns to the class
    kept = label_filter(p[: len(neg)], 0, 0.0, 1)
    assert kept == [i for i in range(len(neg)) if p[i, 0] >= 0.5] and len(kept) > len(neg) / 2


def test_select_filters_then_chooses_per_class():
    """The stage's ``select``: off-label candidates (the probe's argmax is another class) never enter a set while
    enough on-label ones remain; every method gives exactly DPC per class; herding-real follows the real mean."""
    from dilm.distill.select import Candidates, Selection, select
    from dilm.generator import Sample

    x = blobs()  # rows 0-19 blob 0, 20-39 blob 1, 40-59 blob 2
    samples = [Sample(f"text {i}", None, [], 0) for i in range(60)]
    probs = np.tile([0.9, 0.1], (60, 1))
    probs[40:] = [0.2, 0.8]  # blob 2 reads as the other class
    cands = Candidates([samples, samples], [x, x], [probs, probs])  # the same texts listed under both classes
    for method in SELECTIONS:
        means = [torch.nn.functional.normalize(x[40:60].double(), dim=1).mean(0)] * 2
        s = select(cands, 5, 0, ("a", "b"), Selection(method, "probe"), means)
        assert s.counts() == [5, 5]
        chosen = [int(e.text.split()[1]) for e in s.examples]
        assert all(i < 40 for i in chosen[:5]) and all(i >= 40 for i in chosen[5:]), (method, chosen)
    unfiltered = select(cands, 3, 0, ("a", "b"), Selection("herding-real", "none"), means)
    assert all(int(e.text.split()[1]) >= 40 for e in unfiltered.examples)  # toward blob 2, no filter in the way
    assert unfiltered.meta["selection"] == "herding-real" and unfiltered.meta["label_filter"] == "none"


def test_a_shared_pool_gives_every_set_its_own_half():
    """``final_pool: shared``: set k selects from a seeded random half of each class's pool (at least the largest DPC),
    the halves of different sets differ, and a subset keeps every candidate's features, probabilities and copy flags
    beside it."""
    from dilm.distill.select import Candidates, subset
    from dilm.generator import Sample
    from dilm.selection import half_rows

    halves = [half_rows([40, 9], 6, seed) for seed in range(5)]
    for rows in halves:
        assert [len(r) for r in rows] == [20, 6]  # half of 40; half of 9 is under the least (6)
        assert all(r == sorted(set(r)) and r[0] >= 0 and r[-1] < n for r, n in zip(rows, (40, 9)))
    assert len({tuple(rows[0]) for rows in halves}) == 5 and half_rows([40, 9], 6, 3) == halves[3]  # seeded
    samples = [[Sample(f"c{c} {i}", None, [], 0) for i in range(n)] for c, n in enumerate((40, 9))]
    feats = [torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 4) for n in (40, 9)]
    probs = [np.arange(n)[:, None].repeat(2, 1) for n in (40, 9)]
    copies = [np.arange(n) % 2 == 0 for n in (40, 9)]
    half = subset(Candidates(samples, feats, probs, copies), halves[0])
    for c, rows in enumerate(halves[0]):
        assert [int(s.text.split()[1]) for s in half.samples[c]] == rows
        assert half.features[c][:, 0].tolist() == rows and half.probs[c][:, 0].tolist() == rows
        assert half.copies[c].tolist() == [i % 2 == 0 for i in rows]
    assert subset(Candidates(samples, feats, None), halves[0]).probs is None


def test_a_split_mix_takes_each_draws_share_where_the_pooled_choice_takes_one_draw():
    """``final_mix: split``: with two draws (``Candidates.sources``) every class gets DPC//2 of the first draw's
    candidates and the rest of the second's, each filtered and chosen on its own (herding over both together
    takes the draw nearer the pool's mean); a draw with too few gives its share to the other; one draw, or
    ``split`` off, is the pooled choice."""
    from dilm.distill.select import Candidates, Selection, select, subset
    from dilm.generator import Sample
    from dilm.selection import split_counts

    x = blobs()[:40]  # rows 0-19 blob 0: the first draw; 20-39 blob 1: the second
    samples = [Sample(f"text {i}", None, [], 0) for i in range(40)]
    probs = np.tile([0.9, 0.1], (40, 1))
    probs[20:36] = [0.4, 0.6]  # most of the second draw reads as the other class: the filter keeps rows 36-39
    sources = np.repeat([0, 1], 20)
    cands = Candidates([samples], [x], [probs], None, [sources])

    def drawn(s):
        return [int(sources[int(e.text.split()[1])]) for e in s.examples]

    pooled = select(cands, 5, 0, ("a",), Selection("herding", "probe"))
    assert drawn(pooled).count(0) >= 4 and "final_mix" not in pooled.meta  # 20 survivors against 4: the first's
    for d, first in ((5, 2), (8, 4), (1, 0)):
        s = select(cands, d, 0, ("a",), Selection("herding", "probe", split=True))
        assert sorted(drawn(s)) == [0] * first + [1] * (d - first) and s.meta["final_mix"] == "split"
        assert all(int(e.text.split()[1]) >= 36 for e in s.examples[first:])  # filtered within the second draw
    few = subset(cands, [[0, 1, 2, 5, 6, 7, 8, 9, 10, 20, 21]])  # the second draw has 2 candidates
    assert sorted(drawn(select(few, 6, 0, ("a",), Selection("herding", "none", split=True)))) == [0] * 4 + [1] * 2
    alone = Candidates([samples], [x], [probs])  # one draw: split has nothing to share out
    assert select(alone, 5, 0, ("a",), Selection("herding", "probe", split=True)).examples == pooled.examples
    assert split_counts([3], 5) == [5] and split_counts([10, 10], 5) == [2, 3] and split_counts([1, 10], 5) == [1, 4]
    assert split_counts([10, 0], 4) == [4, 0]
