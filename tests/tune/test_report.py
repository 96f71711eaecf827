"""The end-of-sweep summary's text checks."""

from __future__ import annotations

import json

import pytest

from tune.report import vocab_rate, words


def test_words_read_contractions_as_a_tokenised_corpus_writes_them():
    assert words("Don't, it's CAN'T") == words("do n't , it 's ca n't") == ["do", "not", "it", "s", "ca", "not"]
    assert words("The repair’s cost") == ["the", "repair", "s", "cost"]


def test_vocab_rate_counts_words_found_in_the_vocabulary(tmp_path):
    vocabulary = set(words("a fine film , it is n't dull")) | {"s"}
    f = tmp_path / "set.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in (
        {"text": "A fine film, isn't it?", "label": 1},  # a, fine, film, is, not, it: 6 found
        {"text": "applesurgency film", "text_pair": "it's dull", "label": 0},  # 4 of 5 found
    )) + "\n")
    assert vocab_rate([f], vocabulary) == 100 * 10 / 11
    assert vocab_rate([], vocabulary) != vocab_rate([], vocabulary)  # nan: no words


def test_best_trial_beside_the_baselines_rows_table_and_metric_names():
    from tune.scores import OBJECTIVE, best_row, compare, comparison_metrics, format_compare, objective

    best = {2: {"a": {"accuracy": 60.0, "accuracy_std": 1.0}, "b": {"accuracy": 80.0, "accuracy_std": 2.0}},
            4: {"a": {"accuracy": 80.0, "accuracy_std": 1.0}}}
    baselines = {"random": {2: {"a": {"accuracy": 50.0, "accuracy_std": 1.0}}},
                 "vanilla": {2: {"a": {"accuracy": 55.0, "accuracy_std": 1.0}, "b": {"accuracy": 70.0,
                                                                                     "accuracy_std": 1.0}}}}
    assert objective(best) == 75.0  # a: mean of 60 and 80 over its DPCs; b: 80
    rows = compare(best, baselines)
    assert [(r["arch"], r["dpc"]) for r in rows] == [("a", 2), ("b", 2), ("a", 4)]
    assert rows[0]["vs_random"] == 10.0 and rows[0]["vs_vanilla"] == 5.0 and "vs_random" not in rows[1]
    assert comparison_metrics(rows) == {"best_vs_random/a/dpc2": 10.0, "best_vs_vanilla/a/dpc2": 5.0,
                                        "best_vs_vanilla/b/dpc2": 10.0}
    table = format_compare(rows)
    assert "best-random" in table[0] and table[0].index("random") < table[0].index("vanilla") and len(table) == 4
    assert best_row([{OBJECTIVE: 1.0}, {OBJECTIVE: 3.0}]) == {OBJECTIVE: 3.0} and best_row([]) is None


def test_differences_come_with_a_welch_interval_in_rows_table_and_metrics():
    from scipy import stats

    from dilm.stats import welch_interval
    from tune.scores import accuracy_sample, compare, comparison_metrics, format_compare

    a, b = {"accuracy": 70.0, "accuracy_std": 3.0, "n": 10}, {"accuracy": 64.0, "accuracy_std": 4.0, "n": 20}
    ci = welch_interval(accuracy_sample(a), accuracy_sample(b))
    lo, hi = ci["lo"], ci["hi"]
    # against scipy's own Welch test: the interval's ends are where the two-sided p-value is 0.05
    for end in (lo, hi):
        shifted = stats.ttest_ind_from_stats(70.0 - end, 3.0, 10, 64.0, 4.0, 20, equal_var=False)
        assert shifted.pvalue == pytest.approx(0.05, abs=1e-6)
    assert lo < 6.0 < hi and welch_interval(accuracy_sample(a), accuracy_sample({**b, "n": 1}))["lo"] is None
    rows = compare({5: {"p": a}}, {"random": {5: {"p": b}}, "vanilla": {5: {"p": {**b, "accuracy": 69.0}}}})
    assert rows[0]["vs_random_lo"] == pytest.approx(lo) and rows[0]["vs_random_hi"] == pytest.approx(hi)
    assert comparison_metrics(rows)["best_vs_random_lo/p/dpc5"] == pytest.approx(lo)
    line = format_compare(rows)[1]
    assert f"[{lo:+5.1f},{hi:+5.1f}]*" in line  # excludes 0: starred
    assert "+1.0 [" in line and "]*" not in line.split("+1.0 [")[1]  # vs vanilla: includes 0, no star


def test_the_summary_reads_the_sets_copies_from_provenance(tmp_path):
    from tune.report import format_copies, read_copies

    share = {"n": 20, "exact": 1, "near": 2, "exact_share": 0.05, "near_share": 0.1}
    none = {"n": 20, "exact": 0, "near": 0, "exact_share": 0.0, "near_share": 0.0}
    (tmp_path / "provenance.json").write_text(json.dumps({"copies": {"10": {"train": share, "test": none},
                                                                     "5": {"train": none, "test": none}}}))
    copies = {"best trial": read_copies(tmp_path / "provenance.json"), "vanilla": read_copies(tmp_path / "no.json")}
    assert copies["vanilla"] == {}
    assert format_copies(copies) == "best trial dpc5 0.0/0.0 test 0.0/0.0, best trial dpc10 5.0/10.0 test 0.0/0.0"


def test_a_trial_a_killed_driver_started_and_the_resume_lost_is_not_a_failed_trial():
    """An Optuna trial still RUNNING when a resumed sweep ends was started by the killed driver after Tune last saved
    its state: it is FAIL in the study (so TPE ignores it) but NOT_RESUMED in the summary's rows and counts."""
    import optuna

    from tune.report import fail_orphans, format_summary, trial_state

    study = optuna.create_study(direction="maximize")
    done, failed, lost = study.ask(), study.ask(), study.ask()
    lost.set_user_attr("ray_trial_id", "abc123")
    study.tell(done, 70.0)
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    assert fail_orphans(study) == ["abc123"]
    states = {t.number: (t.state.name, trial_state(t)) for t in study.trials}
    assert states == {0: ("COMPLETE", "COMPLETE"), 1: ("FAIL", "FAIL"), 2: ("FAIL", "NOT_RESUMED")}
    assert fail_orphans(study) == []
    line = format_summary({"name": "s", "complete": 1, "pruned": 0, "failed": 1, "not_resumed": 1, "finished": True,
                           "best": None, "importances": None, "storage": "runs", "driver_dir": "runs",
                           "optuna_url": "sqlite:///runs/optuna.db"}).splitlines()[0]
    assert line == "sweep s: 1 complete, 0 stopped early (ASHA), 1 failed, 1 started by a killed driver and not resumed"
