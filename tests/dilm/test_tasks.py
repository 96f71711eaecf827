import pytest

from dilm import DilmError
from dilm.tasks import Example, TaskData, check_dpc, length_limit, load_task, parse_label


def test_unknown_task_names_known_keys():
    with pytest.raises(DilmError, match="known tasks: ag_news, mrpc, sst2"):
        load_task("sst3")


@pytest.mark.parametrize("name,n_train,n_test,labels,pair", [
    ("sst2", 67349, 872, ("negative", "positive"), False),
    ("mrpc", 3667, 408, ("no", "yes"), True),
    ("ag_news", 10001, 7600, ("World", "Sports", "Business", "Sci/Tech"), False),
])
def test_packaged_tasks_load_fully(name, n_train, n_test, labels, pair):
    t = load_task(name)
    assert (len(t.train), len(t.test), t.label_names, t.is_pair) == (n_train, n_test, labels, pair)
    assert all(e.text for e in t.train[:100])
    assert all((e.text_pair is not None) == pair for e in t.train[:100])
    assert {e.label for e in t.train} == set(range(len(labels)))


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_user_tsv_csv_jsonl(tmp_path):
    tsv = _write(tmp_path, "a.tsv", "text\tlabel\ngood\tpos\nbad\tneg\n")
    csv = _write(tmp_path, "b.csv", 'text,label\n"good, really",pos\nbad,neg\n')
    jsonl = _write(tmp_path, "c.jsonl", '{"text": "fine", "label": "pos"}\n{"text": "meh", "label": "neg"}\n')
    t = load_task(train_file=str(tsv), test_file=str(csv))
    assert t.label_names == ("neg", "pos") and t.test[0].text == "good, really" and t.test[0].label == 1
    t2 = load_task(train_file=str(jsonl), test_file=str(tsv), label_names=["neg", "pos"])
    assert [e.label for e in t2.train] == [1, 0]


@pytest.mark.parametrize("content,match", [
    ("text\tlabel\ngood\tpos\nbad\n", r"b\.tsv:3: malformed row"),
    ("text\tlabel\ngood\tpos\nbad\tmaybe\n", r"label 'maybe' is not in the label set \['neg', 'pos'\]"),
    ("sentence\tlabel\ngood\tpos\n", r"missing column 'text'"),
])
def test_malformed_user_files_one_line_errors(tmp_path, content, match):
    train = _write(tmp_path, "a.tsv", "text\tlabel\ngood\tpos\nbad\tneg\n")
    test = _write(tmp_path, "b.tsv", content)
    with pytest.raises(DilmError, match=match) as e:
        load_task(train_file=str(train), test_file=str(test), label_names=["neg", "pos"])
    assert "\n" not in str(e.value)


def test_malformed_jsonl_and_missing_file(tmp_path):
    bad = _write(tmp_path, "a.jsonl", '{"text": "ok", "label": "pos"}\n{"text": oops}\n')
    with pytest.raises(DilmError, match=r"a\.jsonl:2: malformed JSON"):
        load_task(train_file=str(bad), test_file=str(bad))
    with pytest.raises(DilmError, match="does not exist"):
        load_task(train_file=str(tmp_path / "nope.tsv"), test_file=str(bad))


def test_empty_class_is_an_error(tmp_path):
    train = _write(tmp_path, "a.tsv", "text\tlabel\ngood\tpos\nnice\tpos\n")
    with pytest.raises(DilmError, match=r"class\(es\) \['neg'\] have no training examples"):
        load_task(train_file=str(train), test_file=str(train), label_names=["neg", "pos"])


def test_dpc_larger_than_class(toy_task):
    small = TaskData("s", toy_task.label_names, toy_task.train[:6], toy_task.test)
    check_dpc(small, 3)
    with pytest.raises(DilmError, match="DPC 4 is larger than class 'negative' \\(3 examples\\)"):
        check_dpc(small, 4)


def test_parse_label_ids_and_names():
    names = ("neg", "pos")
    assert parse_label("pos", names) == 1 and parse_label(0, names) == 0 and parse_label("1", names) == 1
    with pytest.raises(DilmError):
        parse_label(2, names)


def test_length_limit_is_a_capped_quantile():
    lengths = list(range(1, 101))  # 1..100
    assert length_limit(lengths, 0.99, 512) == 100  # ceil(99.01)
    assert length_limit(lengths, 0.5, 512) == 51
    assert length_limit(lengths, 1.0, 40) == 40
    with pytest.raises(DilmError, match="no examples"):
        length_limit([], 0.99, 10)


def test_headerless_files_by_column_index_and_coreset_without_test_file(tmp_path, capsys):
    from dilm.cli import main
    from dilm.synset import read_set

    rows = [f"src\t{i % 2}\t\tsentence number {i} ." for i in range(12)]  # CoLA's layout: no header row
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    task = load_task(train_file=str(tmp_path / "train.tsv"), text_column="3", label_column="1", has_header=False,
                     need_test=False)
    assert len(task.train) == 12 and task.train[3] == Example("sentence number 3 .", 1) and task.test == []
    with pytest.raises(DilmError, match="read without a header .*give columns by index"):
        load_task(train_file=str(tmp_path / "train.tsv"), text_column="sentence", label_column="1",
                  has_header=False, need_test=False)
    with pytest.raises(DilmError, match="needs both --train-file and --test-file"):
        load_task(train_file=str(tmp_path / "train.tsv"), text_column="3", label_column="1", has_header=False)
    assert main(["coreset", "--train-file", str(tmp_path / "train.tsv"), "--no-header", "--text-column", "3",
                 "--label-column", "1", "--dpc", "2", "--n-sets", "1", "-o", str(tmp_path / "out")]) == 0
    s = read_set(tmp_path / "out" / "random_dpc2_set00.jsonl", ("0", "1"))
    assert s.counts() == [2, 2] and all(e.text.startswith("sentence number") for e in s.examples)
