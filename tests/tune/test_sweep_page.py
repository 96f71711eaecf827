"""What a user opens after a sweep, without Ray: the MLflow runs page ``dilm ui`` points at (the view's search filter,
order and columns, checked against a real sqlite store), the one-page ``report.html``, and model loads that print no
progress bars."""

from __future__ import annotations

import json
import re

import pytest

from tune.scores import OBJECTIVE
from tune.tracking import VIEW_TAG, SweepTracker, TrialRun, sweep_view, tracking_uri
from tune.ui import ML_VIEW, runs_links, view_url


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    storage = tmp_path_factory.mktemp("store")
    return storage, tracking_uri(storage)


def test_the_sweep_view_shows_its_trials_and_baselines_as_rows_best_first(store, monkeypatch):
    """The view's search filter is valid MLflow search syntax that finds the sweep's children and not its parent
    (whose row would fold them away), in another sweep of the same experiment neither; best objective first."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _, uri = store
    first = SweepTracker.start(uri, "dilm-view", "first")
    tracker = SweepTracker.start(uri, "dilm-view", "second")
    for i, obj in enumerate([61.0, 70.5, 55.0]):
        with TrialRun(tracker.spec, f"t_{i}", f"0000{i} obj {obj}") as run:
            run.log_metrics({OBJECTIVE: obj})
    with TrialRun(first.spec, "other", "other sweep") as run:
        run.log_metrics({OBJECTIVE: 99.0})
    tracker.log_child_metrics("t_1", {"vs_random": 12.25, "vs_herding": 3.5})
    tracker.set_view(["generator_lr", "inner_loop"])

    exp = tracker.client.get_experiment(tracker.spec.experiment_id)
    view = json.loads(exp.tags[VIEW_TAG + tracker.spec.parent_run_id])
    assert view == sweep_view(tracker.spec.parent_run_id, ["generator_lr", "inner_loop"])
    assert {"metrics.`objective`", "metrics.`vs_random`", "metrics.`vs_herding`",
            "params.`inner_loop`"} <= set(view["selectedColumns"])
    order = f"{view['orderByKey'].replace('`', '')} {'ASC' if view['orderByAsc'] else 'DESC'}"
    rows = tracker.client.search_runs([tracker.spec.experiment_id], view["searchFilter"], order_by=[order])
    assert [r.info.run_name for r in rows] == ["00001 obj 70.5", "00000 obj 61.0", "00002 obj 55.0"]
    assert rows[0].data.metrics["vs_random"] == 12.25

    links = runs_links(uri, "http://127.0.0.1:5000")
    assert [label for label, _ in links] == ["sweep second (dilm-view)", "sweep first (dilm-view)"]  # latest first
    assert links[0][1] == view_url("http://127.0.0.1:5000", tracker.spec.experiment_id, tracker.spec.parent_run_id)
    assert links[0][1].endswith(f"/runs?{ML_VIEW}&viewStateShareKey={tracker.spec.parent_run_id}")


def test_dilm_ui_prints_the_latest_sweeps_page_first(store, monkeypatch, capsys):
    """``dilm ui``'s first link (``open URL``) is the latest sweep's view; the server itself is not started here."""
    import subprocess

    import tune.ui

    storage, _ = store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    class NoServer:
        def __init__(self, *args, **kwargs):
            self.pid = 0

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", NoServer)
    assert tune.ui.ui_main(["--storage", str(storage), "--port", "5077"]) == 0
    out = capsys.readouterr().out
    opened = re.search(r"^  open (\S+)", out, re.M)
    assert opened and "viewStateShareKey=" in opened.group(1) and "(sweep second (dilm-view): the latest)" in out


def summary_of(tmp_path) -> tuple[dict, object]:
    """A finished sweep's summary as tune.report assembles it, with one plot and the best trial's sets."""
    from tune.plots import param_importances

    sets = tmp_path / "best" / "sets"
    for dpc in (2, 4):
        (sets / f"dpc{dpc}").mkdir(parents=True)
        rows = [{"text": f"a <b>great</b> film {i}", "label": "positive"} for i in range(dpc)]
        rows += [{"text": f"a dull film {i}", "label": "negative"} for i in range(dpc)]
        (sets / f"dpc{dpc}" / "set00.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        (sets / f"dpc{dpc}" / "set01.jsonl").write_text(json.dumps({"text": "second set", "label": "positive"}))
    plot = param_importances({"generator_lr": 0.7, "inner_loop": 0.3}, tmp_path / "out" / "param_importances.png")
    share = {"exact_share": 0.05, "near_share": 0.1}
    summary = {
        "name": "demo", "complete": 2, "pruned": 1, "failed": 0, "finished": True, "storage": str(tmp_path),
        "best": {"number": 1, "ray_trial_id": "abc_00001", "state": "COMPLETE", OBJECTIVE: 70.5, "inner_loop": 2},
        "rows": [{"number": 0, "ray_trial_id": "abc_00000", "state": "COMPLETE", OBJECTIVE: 61.0, "inner_loop": 1},
                 {"number": 1, "ray_trial_id": "abc_00001", "state": "COMPLETE", OBJECTIVE: 70.5, "inner_loop": 2},
                 {"number": 2, "ray_trial_id": "abc_00002", "state": "PRUNED", OBJECTIVE: None, "inner_loop": 3}],
        "val_curves": {"abc_00000": [(10, 50.0), (12, 55.0)], "abc_00002": [(10, 48.0)]},
        "importances": {"generator_lr": 0.7, "inner_loop": 0.3}, "plots": [],
        "baselines": [{"arch": "p", "dpc": 2, "best": 70.0, "best_std": 2.0, "best_n": 9, "random": 60.0,
                       "random_std": 3.0, "vs_random": 10.0, "vs_random_lo": 7.5, "vs_random_hi": 12.5,
                       "herding": 69.0, "herding_std": 0.0, "vs_herding": 1.0}],
        "baseline_scores": {"random": {2: {"p": {"accuracy": 60.0, "accuracy_std": 3.0, "n": 9}}},
                            "herding": {2: {"p": {"accuracy": 69.0, "accuracy_std": 0.0, "n": 1}}}},
        "vocab_rate": {"best trial": 97.5, "vanilla": 96.0},
        "copies": {"best trial": {"2": {"train": share, "test": share}}, "vanilla": {}},
    }
    return summary, plot


def test_the_report_is_one_self_contained_page(tmp_path):
    from tune.report_page import write_report

    summary, plot = summary_of(tmp_path)
    page = write_report(summary, tmp_path / "best" / "sets", plot.parent)
    assert page == tmp_path / "out" / "report.html"
    text = page.read_text()
    srcs = re.findall(r'src="([^"]*)"', text)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)  # history, val, importances
    assert not re.search(r'(href|src)="(?!data:)', text)  # nothing outside the file
    assert "<tr class=best><td class=l>★ abc_00001" in text and "70.50" in text
    assert "+10.0 [+7.5, +12.5]" in text and "best − herding" in text
    assert "a &lt;b&gt;great&lt;/b&gt; film 0" in text and "a dull film 1" in text  # texts escaped, per class
    assert "a dull film 2" not in text.split("dpc4")[0] and "second set" not in text  # DPC 2's first set only
    assert "5.0" in text.split("Copies and vocabulary")[1] and "97.5 %" in text


def test_trials_get_their_margins_over_the_baselines():
    from tune.report import margins

    summary = {"rows": [{"ray_trial_id": "a", "state": "COMPLETE", OBJECTIVE: 70.5},
                        {"ray_trial_id": "b", "state": "PRUNED", OBJECTIVE: None}],
               "baseline_scores": {"random": {2: {"p": {"accuracy": 60.0}, "q": {"accuracy": 50.0}}},
                                   "vanilla": {}},
               "objective_archs": ("p",)}
    assert margins(summary) == {"a": {"vs_random": 10.5}}  # over the objective's archs; no scores, no margin
    assert margins({**summary, "objective_archs": ()}) == {"a": {"vs_random": 15.5}}


def test_model_loads_and_saves_print_no_progress_bars(tmp_path, capfd):
    """transformers' "Loading weights" / "Writing model shards" bars and notices are off inside
    :func:`dilm.hf.quiet_transformers` (every load of dilm's), and as they were after it."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from dilm.distill.checkpoint import write_lm_checkpoint
    from dilm.hf import quiet_transformers
    from dilm.models import load_model, load_tokenizer

    model, tok = load_model("tiny-llama", head="causal-lm"), load_tokenizer("tiny-llama")
    write_lm_checkpoint(tmp_path / "lm", model, tok, {"key": "k"})
    with quiet_transformers():
        AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out and "Writing model" not in captured.err
    AutoModelForCausalLM.from_pretrained(tmp_path / "lm")  # the guard: outside, the bar is there
    assert "Loading weights" in capfd.readouterr().err
