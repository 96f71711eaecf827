import json

import pytest

from dilm import DilmError
from dilm.synset import SynExample, SynSet, read_set, write_set

NAMES = ("negative", "positive")


def test_jsonl_round_trip(tmp_path):
    s = SynSet([SynExample("good “film”", 1), SynExample("bad", 0, soft_label=(0.7, 0.3)),
                SynExample("a", 1, text_pair="b")], NAMES)
    path = write_set(tmp_path / "s.jsonl", s)
    back = read_set(path, NAMES, is_pair=False)
    assert [(e.text, e.label, e.soft_label) for e in back.examples] == [(e.text, e.label, e.soft_label)
                                                                         for e in s.examples]
    pair = read_set(path, NAMES, is_pair=False)
    assert pair.examples[2].text_pair is None  # single-sentence task ignores text_pair
    assert json.loads(path.read_text().splitlines()[0])["label"] == "positive"
    assert [p.name for p in tmp_path.iterdir()] == ["s.jsonl"]  # no temp file left behind


@pytest.mark.parametrize("line,match", [
    ('{"text": "x", "label": "neutral"}', "label 'neutral' is not in the label set"),
    ('{"text": "x"}', "needs an object with 'text' and 'label'"),
    ('{"text": "x", "label": 0, "soft_label": [0.5, 0.6]}', "sum to 1"),
    ('{"text": "x", "label": 0, "soft_label": [1.0]}', "list of 2 probabilities"),
    ('not json', "malformed JSON"),
    ('{"text": "  ", "label": 0}', "non-empty string"),
])
def test_invalid_lines(tmp_path, line, match):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok", "label": 1}\n' + line + "\n")
    with pytest.raises(DilmError, match=match) as e:
        read_set(p, NAMES)
    assert "bad.jsonl:2:" in str(e.value)


def test_pair_task_requires_text_pair(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"text": "a", "label": "yes"}\n')
    with pytest.raises(DilmError, match="text_pair"):
        read_set(p, ("no", "yes"), is_pair=True)
