"""A user's own dataset through every entry point: task references resolve to one spec, files of every format read
the same rows, the data's hash keys the caches and reaches provenance, the sets carry the user's labels, and every
bad input is one line naming file, row and problem."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
import shutil

import pytest
import yaml

from dilm import DilmError
from dilm.cli import main
from dilm.distill import DistillConfig, lm_cache_key
from dilm.synset import read_set
from dilm.tasks import TASKS, TaskSpec, check_dpc, load_task, resolve_task
from tests.userdata import TICKETS, write_reviews, write_tickets

REVIEW_COLUMNS = ["--text-column", "review", "--label-column", "sentiment"]


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    return write_reviews(tmp_path_factory.mktemp("reviews"))


def test_every_task_reference_resolves_to_one_spec(tmp_path, reviews):
    assert resolve_task("sst2") is TASKS["sst2"] and TASKS["sst2"].packaged
    hub = resolve_task("hf:glue:sst2")
    assert (hub.source, hub.dataset, hub.config, hub.train, hub.test, hub.name) == (
        "hf", "glue", "sst2", "train", "validation", "glue")
    spec_file = tmp_path / "spec" / "reviews.yaml"  # a spec file's relative paths are taken from its folder
    spec_file.parent.mkdir()
    shutil.copy(reviews[0], spec_file.parent / "train.csv")
    spec_file.write_text(yaml.safe_dump({"name": "reviews", "train": "train.csv", "test": str(reviews[1]),
                                         "text_column": "review", "label_column": "sentiment",
                                         "label_names": ["neg", "pos"], "description": "a movie review"}))
    spec = resolve_task(str(spec_file))
    assert spec.train == str(spec_file.parent / "train.csv") and spec.label_names == ("neg", "pos")
    assert resolve_task(spec.to_ref()) == spec  # the reference a config records turns back into the spec
    assert DistillConfig(task=str(spec_file)).task == spec == DistillConfig(task=spec.to_dict()).task
    assert DistillConfig().to_dict()["task"] == "sst2"  # a packaged task is recorded by its name, as before
    with pytest.raises(DilmError, match=r"unknown task 'sst3'; known tasks: ag_news, mrpc, sst2 \(or hf:") as e:
        resolve_task("sst3")
    assert "\n" not in str(e.value)
    with pytest.raises(DilmError, match=r"unknown key\(s\) \['text_col'\]"):
        resolve_task({"train": "a.csv", "text_col": "x"})


def test_every_format_reads_the_same_rows(tmp_path, reviews):
    spec = {"train": str(reviews[0]), "test": str(reviews[1]), "text_column": "review", "label_column": "sentiment"}
    base = load_task(spec)
    assert base.label_names == ("neg", "pos") and len(base.train) == 400 and len(base.test) == 120
    for suffix, opener in ((".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open)):
        packed = tmp_path / f"train.csv{suffix}"
        with opener(packed, "wb") as f:
            f.write(reviews[0].read_bytes())
        assert load_task({**spec, "train": str(packed)}).fingerprint == base.fingerprint
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    for split in ("train", "test"):
        pq.write_table(pacsv.read_csv(reviews[0 if split == "train" else 1]), tmp_path / f"{split}.parquet")
    parquet = load_task({**spec, "train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")})
    assert parquet.fingerprint == base.fingerprint
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps({"review": e.text, "sentiment": base.label_names[e.label]}) + "\n"
                             for e in base.train))
    assert load_task({**spec, "train": str(jsonl)}).fingerprint == base.fingerprint


def test_a_dataset_saved_on_disk_and_parquet_with_its_own_labels(tmp_path):
    import datasets

    train, test = write_tickets(tmp_path / "tickets")
    spec = {"train": str(train), "test": str(test), "text_column": "body", "label_column": "queue"}
    tickets = load_task(spec)
    assert tickets.label_names == tuple(sorted(TICKETS)) and len(tickets.train) == 90
    saved = tmp_path / "saved"
    datasets.DatasetDict({s: datasets.Dataset.from_parquet(str(p)) for s, p in (("train", train), ("test", test))}
                         ).save_to_disk(str(saved))
    disk = load_task({"source": "disk", "dataset": str(saved), "text_column": "body", "label_column": "queue"})
    assert disk.fingerprint == tickets.fingerprint and resolve_task(str(saved)).source == "disk"


def test_the_data_hash_keys_the_lm_stage_and_a_pinned_spec_refuses_other_data(tmp_path):
    a = write_reviews(tmp_path / "a")
    b = write_reviews(tmp_path / "b", offset=600)  # the same file names, other rows
    spec = {"text_column": "review", "label_column": "sentiment"}
    ta, tb = (load_task({**spec, "train": str(t), "test": str(s)}) for t, s in (a, b))
    assert ta.fingerprint != tb.fingerprint
    ka = lm_cache_key(DistillConfig.from_preset("smoke", task=ta.spec), ta)
    assert ka != lm_cache_key(DistillConfig.from_preset("smoke", task=tb.spec), tb)
    assert ka == lm_cache_key(DistillConfig.from_preset("smoke", task=ta.spec))  # loaded again: the same key
    pinned = TaskSpec(**{**ta.spec.to_dict(), "sha256": ta.fingerprint})
    assert load_task(pinned).fingerprint == ta.fingerprint
    shutil.copy(b[0], a[0])  # the data changed under the same name
    with pytest.raises(DilmError, match="changed since the sweep started"):
        load_task(pinned)


def _bad(tmp_path, name: str, content: str | bytes):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(p)


@pytest.mark.parametrize("train,test,match", [
    ("review,sentiment\ngood,pos\nbad,neg\n", "review,sentiment\nfine,pos\nmeh,maybe\n",
     r"test\.csv:2: label 'maybe' is not in the label set \['neg', 'pos'\]"),
    ("review,sentiment\ngood,pos\n,neg\n", "review,sentiment\nfine,pos\n", r"train\.csv:3: empty text"),
    ("review,sentiment\ngood,\nbad,neg\n", "review,sentiment\nfine,pos\n", r"train\.csv:2: empty label"),
    ("review,sentiment\n" + "".join(f"text {i},pos\n" for i in range(150)), "review,sentiment\nfine,pos\n",
     r"label column 'review' has 150 distinct values \(is it a text column\?\)"),
    (b"\x1f\x8b\x08garbage", "review,sentiment\nfine,pos\n", r"train\.csv\.gz: unreadable"),
    ("review,sentiment\ngood,pos\nbad,neg\n", "", r"test\.csv: empty file"),
])
def test_bad_data_is_one_line_naming_file_row_and_problem(tmp_path, train, test, match):
    name = "train.csv.gz" if isinstance(train, bytes) else "train.csv"
    label = "review" if "150 distinct" in match else "sentiment"
    with pytest.raises(DilmError, match=match) as e:
        load_task({"train": _bad(tmp_path, name, train), "test": _bad(tmp_path, "test.csv", test),
                   "text_column": "review" if label == "sentiment" else "sentiment", "label_column": label})
    assert "\n" not in str(e.value)


def test_a_class_smaller_than_dpc_and_a_file_that_is_not_parquet(tmp_path, reviews):
    small = load_task({"train": _bad(tmp_path, "t.csv", "review,sentiment\na,pos\nb,pos\nc,neg\n"),
                       "test": str(reviews[1]), "text_column": "review", "label_column": "sentiment"})
    with pytest.raises(DilmError, match=r"task t: DPC 2 is larger than class 'neg' \(1 examples\)"):
        check_dpc(small, 2)
    with pytest.raises(DilmError, match=r"x\.parquet: unreadable Parquet"):
        load_task({"train": _bad(tmp_path, "x.parquet", "not parquet"), "test": str(reviews[1])})
    with pytest.raises(DilmError, match=r"x\.xlsx: unsupported file type 'xlsx'"):
        load_task({"train": _bad(tmp_path, "x.xlsx", "a"), "test": str(reviews[1])})


@pytest.mark.parametrize("argv,message", [
    (["distill", "--task", "sst2", "--train-file", "{train}", "--test-file", "{test}"],
     "--task sst2 and --train-file .* contradict each other"),
    (["distill", "--task", "sst2", "--text-column", "review"], "--text-column applies to --train-file data only"),
    (["evaluate", "x.jsonl", "--test-file", "{test}"], "--test-file needs --train-file"),
    (["coreset", "--train-file", "{train}", "--test-file", "{test}", "-o", "out"],
     "unrecognized arguments: --test-file"),
])
def test_options_that_contradict_or_go_unused_are_one_line(reviews, argv, message, capsys):
    argv = [a.format(train=reviews[0], test=reviews[1]) for a in argv]
    if argv[0] == "coreset":  # an option the command does not have: argparse's one line
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 2
    else:
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dilm") and re.search(message, err), err


@pytest.mark.integration
def test_distill_evaluate_and_coreset_run_on_the_users_files(tmp_path, reviews, capsys):
    """The main job's command on a user's CSV: the sets are of the file (its labels), the prompt is built from the
    description, provenance holds the data's hash; evaluate and coreset read the same files. (One outer loop of the
    smoke preset's two: what is asserted comes from the data, not from matching.)"""
    out = tmp_path / "run"
    files = ["--train-file", str(reviews[0]), "--test-file", str(reviews[1]), *REVIEW_COLUMNS]
    assert main(["distill", "--preset", "smoke", *files, "--description", "a movie review", "--task", "reviews",
                 "--set", "outer_loops=1", "-o", str(out)]) == 0
    prov = json.loads((out / "provenance.json").read_text())
    task = load_task({"train": str(reviews[0]), "test": str(reviews[1]), "text_column": "review",
                      "label_column": "sentiment"})
    assert prov["task"]["sha256"] == task.fingerprint and prov["task"]["name"] == "reviews"
    assert prov["task"]["label_names"] == ["neg", "pos"] and prov["config"]["task"]["train"] == str(reviews[0])
    assert prov["prompt_template"] == "Here is a movie review labelled {label}:"
    sets = sorted(out.rglob("*.jsonl"))
    sets = [p for p in sets if "dpc2" in str(p)]
    assert len(sets) == 2, sorted(out.rglob("*"))
    labels = {json.loads(line)["label"] for p in sets for line in p.read_text().splitlines()}
    assert labels == {"neg", "pos"}
    capsys.readouterr()
    assert main(["evaluate", str(sets[0]), *files, "--arch", "tfidf-logreg", "--seeds", "1"]) == 0
    assert "tfidf-logreg: accuracy" in capsys.readouterr().out
    tickets = write_tickets(tmp_path / "tickets")
    assert main(["coreset", "--train-file", str(tickets[0]), "--text-column", "body", "--label-column", "queue",
                 "--dpc", "3", "--n-sets", "1", "-o", str(tmp_path / "cs")]) == 0
    s = read_set(tmp_path / "cs" / "random_dpc3_set00.jsonl", tuple(sorted(TICKETS)))
    assert s.counts() == [3, 3, 3]


def test_the_full_data_reference_is_the_training_split_or_a_stratified_sample(reviews):
    from dilm.coreset import FULL_SAMPLE, full_data_set

    small = load_task({"train": str(reviews[0]), "test": str(reviews[1]), "text_column": "review",
                       "label_column": "sentiment"})
    whole = full_data_set(small)
    assert len(whole) == whole.meta["sample_size"] == whole.meta["train_examples"] == 400
    assert whole.label_names == ("neg", "pos")
    sst2 = load_task("sst2")
    sample = full_data_set(sst2)
    share = [len(g) / len(sst2.train) for g in sst2.by_class()]
    assert abs(len(sample) - FULL_SAMPLE) <= sst2.num_classes and sample.meta["train_examples"] == 67349
    assert [round(c / len(sample), 2) for c in sample.counts()] == [round(s, 2) for s in share]
    assert full_data_set(sst2).examples == sample.examples  # seeded
