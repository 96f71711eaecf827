"""The end-of-sweep summary's text checks."""

from __future__ import annotations

import json

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
