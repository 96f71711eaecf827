import pytest
import torch

from dilm import DilmError
from dilm.cli import main
from dilm.coreset import CoresetConfig, build_coresets
from dilm.selection import herding, kmeans_nearest
from dilm.synset import read_set

CPU = torch.device("cpu")


@pytest.mark.parametrize("method", ["random", "kcenters", "herding"])
def test_sizes_and_determinism(toy_task, method):
    cfg = CoresetConfig(method=method, dpc=(2, 5), n_sets=3, learner="tiny-bert", candidates_per_class=50)
    a = build_coresets(toy_task, cfg, CPU)
    b = build_coresets(toy_task, cfg, CPU)
    for dpc in (2, 5):
        assert len(a[dpc]) == (1 if method == "herding" else 3)
        for s1, s2 in zip(a[dpc], b[dpc]):
            assert s1.counts() == [dpc, dpc]
            assert len({e.text for e in s1.examples}) == 2 * dpc
            assert [e.text for e in s1.examples] == [e.text for e in s2.examples]
    if method != "herding":
        assert [e.text for e in a[5][0].examples] != [e.text for e in a[5][1].examples]


@pytest.mark.parametrize("method", ["kcenters", "herding"])
def test_halves_give_deterministic_methods_an_interval(toy_task, method):
    """With ``halves``, set k chooses from its own random half of each class: herding gives n_sets sets, each set's
    examples come from its half, and the sets differ (a spread to put an interval on)."""
    cfg = CoresetConfig(method=method, dpc=(3,), n_sets=4, learner="tiny-bert", candidates_per_class=0, halves=True)
    sets = build_coresets(toy_task, cfg, CPU)[3]
    assert len(sets) == 4 and len({tuple(e.text for e in s.examples) for s in sets}) > 1
    from dilm.coreset import class_candidates

    for k, s in enumerate(sets):
        half = {e.text for g in class_candidates(toy_task, cfg, k) for e in g}
        assert s.meta["half"] == k and {e.text for e in s.examples} <= half
        assert len(half) <= len(toy_task.train) // 2 + 2
    assert sets == build_coresets(toy_task, cfg, CPU)[3]  # seeded


def test_kmeans_nearest_picks_points_at_the_cluster_centres():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0]])
    feats = torch.cat([torch.randn(50, 2, generator=g) * 0.5 + c for c in centres])
    picked = kmeans_nearest(feats, 2, seed=0)
    assert sorted(p // 50 for p in picked) == [0, 1]  # one per blob
    for p in picked:  # the pick is the blob member nearest its centre, not a random one
        blob = feats[(p // 50) * 50: (p // 50 + 1) * 50]
        dists = (blob - blob.mean(0)).norm(dim=1)
        assert dists[p % 50] <= dists.sort().values[2]
    assert len(set(herding(feats, 4))) == 4


def test_unknown_method_and_cli(tmp_path, capsys):
    with pytest.raises(DilmError, match="known: random, kcenters, herding"):
        CoresetConfig(method="greedy")
    assert main(["coreset", "--task", "mrpc", "--method", "random", "--dpc", "3", "--n-sets", "2",
                 "-o", str(tmp_path)]) == 0
    s = read_set(tmp_path / "random_dpc3_set01.jsonl", ("no", "yes"), is_pair=True)
    assert s.counts() == [3, 3] and all(e.text_pair for e in s.examples)
    assert main(["coreset", "--task", "mrpc", "--dpc", "5000", "-o", str(tmp_path)]) == 2
    assert "DPC 5000 is larger than class 'no'" in capsys.readouterr().err


def test_evaluate_cli_json(tmp_path, capsys):
    main(["coreset", "--task", "sst2", "--dpc", "4", "--n-sets", "1", "-o", str(tmp_path)])
    out = tmp_path / "scores.json"
    assert main(["evaluate", str(tmp_path / "random_dpc4_set00.jsonl"), "--task", "sst2", "--arch",
                 "tfidf-logreg", "--seeds", "2", "--json", str(out)]) == 0
    assert "tfidf-logreg: accuracy" in capsys.readouterr().out
    import json

    assert json.loads(out.read_text())["scores"]["tfidf-logreg"]["n"] == 2
    assert main(["evaluate", str(tmp_path / "missing.jsonl"), "--task", "sst2"]) == 2
