"""bench/cpu_quality.py end to end on the tiny models: the matching arm, both generators' pool, the vanilla LM's pool
of the same size, the split of a set between two draws and the soft labels give paired cells."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cpu_quality_pairs_matching_with_vanilla_and_soft_with_hard_labels(tmp_path):
    out = tmp_path / "cq"
    cmd = [sys.executable, str(ROOT / "bench" / "cpu_quality.py"), "--out", str(out), "--quick", "--dpc", "2,4",
           "--sets", "2", "--candidates", "10", "--match-outer", "1", "--both", "--lm-pool", "--balanced",
           "--ft-dpc", "0", "--threads", "1"]
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "DILM_CACHE": str(tmp_path / "cache")},
                   capture_output=True, text=True, timeout=600)
    data = json.loads((out / "cpu_quality.json").read_text())
    cells, paired = data["cells"], data["paired"]
    assert "cpu_quality.py" in data["record"]["command"] and data["record"]["machine"]["cpu"]["isa"] is not None
    assert cells["matching"]["generator_steps"] == 5  # one outer loop of five generator steps
    samples = [cells[f"candidates{arm}"]["samples"] for arm in ("", "/match", "/lm2")]
    assert samples == [2 * 2 * 10] * 3
    judge = "tiny-bert-probe"
    for method, twin in (("match:filter+herding", "filter+herding"), ("match:kmeans", "kmeans"),
                         ("both:filter+herding", "filter+herding"), ("lm2:filter+herding", "filter+herding"),
                         ("bal:filter+herding", "filter+herding"), ("filter+herding+soft", "filter+herding")):
        for dpc in (2, 4):
            assert cells[f"{judge}/dpc{dpc}/{method}"]["n"] == 2
            diffs = [a - b for a, b in zip(cells[f"{judge}/dpc{dpc}/{method}"]["accuracies"],
                                           cells[f"{judge}/dpc{dpc}/{twin}"]["accuracies"])]
            assert paired[f"{judge}/dpc{dpc}/{method}"]["vs_twin"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert paired[f"{judge}/dpc2/random"]["vs_twin"] is None  # real sets have no twin
    both, lm2 = (cells[f"{judge}/dpc4/{m}:filter+herding"]["accuracies"] for m in ("both", "lm2"))
    assert paired[f"{judge}/dpc4/both:filter+herding"]["vs_lm_pool"]["mean"] == pytest.approx(
        sum(a - b for a, b in zip(both, lm2)) / 2)  # matching beyond a pool of the same size
    assert paired[f"{judge}/dpc4/filter+herding"]["vs_lm_pool"] is None
    bal, lm2bal = (cells[f"{judge}/dpc4/{m}:filter+herding"]["accuracies"] for m in ("bal", "lm2bal"))
    assert paired[f"{judge}/dpc4/bal:filter+herding"]["vs_lm_pool"]["mean"] == pytest.approx(
        sum(a - b for a, b in zip(bal, lm2bal)) / 2)  # matching, each draw giving half of every class
    assert paired[f"{judge}/dpc4/lm2bal:filter+herding"]["vs_twin"] is not None
    assert cells["sets/bal:filter+herding"]["label_agreement"] >= 0
    for dpc in (2, 4):  # the coresets: every method --sets sets (herding too: one per random half), and each
        assert cells[f"{judge}/dpc{dpc}/herding-real-data"]["n"] == 2  # generated method against the best of them
        real = {m: cells[f"{judge}/dpc{dpc}/{m}"] for m in ("random", "kcenters", "herding-real-data")}
        best = max(real, key=lambda m: real[m]["mean"])
        got = paired[f"{judge}/dpc{dpc}/bal:filter+herding"]
        assert got["best_coreset"] == best
        assert got["vs_best_coreset"]["mean"] == pytest.approx(
            cells[f"{judge}/dpc{dpc}/bal:filter+herding"]["mean"] - real[best]["mean"])
    # a rerun with the same LM and counts reads every draw's candidates back (no sampling, no matching) and selects
    # the same sets from them: the same accuracies, with a selection of the split arm the first run did not have
    # and the fine-tuned learner at two DPCs (2 steps: the cells, not the learner, are under test)
    again = subprocess.run(cmd[:-4] + ["--split-ways", "filter+herding,filter90+herding", "--ft-dpc", "2,4",
                                       "--ft-methods", "random,bal:filter+herding", "--ft-sets", "1", "--seeds", "2",
                                       "--ft-steps", "2", "--workers", "1", "--threads", "1"], cwd=ROOT, check=True,
                           env={**os.environ, "DILM_CACHE": str(tmp_path / "cache")}, capture_output=True, text=True,
                           timeout=600)
    assert all(f"candidates of candidates{arm}: kept in" in again.stdout for arm in ("", "/match", "/lm2"))
    rerun = json.loads((out / "cpu_quality.json").read_text())["cells"]
    assert "matching" not in rerun and "candidates" not in rerun
    assert rerun[f"{judge}/dpc4/bal:filter+herding"]["accuracies"] == cells[f"{judge}/dpc4/bal:filter+herding"][
        "accuracies"]
    assert rerun[f"{judge}/dpc4/bal:filter90+herding"]["n"] == 2
    for dpc in (2, 4):
        for method in ("random", "bal:filter+herding"):
            assert rerun[f"finetune/dpc{dpc}/{method}"]["n"] == 2  # one set x two seeds
