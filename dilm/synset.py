"""Synthetic sets on disk: JSONL lines ``{"text", "text_pair"?, "label", "soft_label"?, "weight"?}``, validated line
by line, written atomically (a temporary file renamed into place) so that a killed run never leaves half a set.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from dilm import DilmError
from dilm.files import atomic_write_text
from dilm.tasks import Example, parse_label


@dataclass(frozen=True)
class SynExample:
    text: str
    label: int
    text_pair: str | None = None
    soft_label: tuple[float, ...] | None = None
    weight: float = 1.0  # per-example weight on the label distribution (learned soft labels may set it)

    def distribution(self, num_classes: int) -> list[float]:
        """The label distribution: the soft label, or the one-hot of the hard label."""
        if self.soft_label is not None:
            return list(self.soft_label)
        return [1.0 if c == self.label else 0.0 for c in range(num_classes)]

    def target(self, num_classes: int) -> list[float]:
        """The training target: weight × distribution (soft cross-entropy on it is weight × cross-entropy)."""
        return [self.weight * p for p in self.distribution(num_classes)]


@dataclass(frozen=True)
class SynSet:
    examples: list[SynExample]
    label_names: tuple[str, ...]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @classmethod
    def from_examples(cls, examples: list[Example], label_names: tuple[str, ...], **meta) -> SynSet:
        return cls([SynExample(e.text, e.label, e.text_pair) for e in examples], tuple(label_names), meta)

    def with_soft_labels(self, soft: list[list[float]], weights: list[float] | None = None) -> SynSet:
        """The same texts with label distributions ``soft`` (n, C) (the label becomes their arg-max) and, when
        given, per-example weights (n,)."""
        weights = [1.0] * len(self.examples) if weights is None else weights
        exs = [SynExample(e.text, max(range(len(s)), key=s.__getitem__), e.text_pair, tuple(float(x) for x in s),
                          float(w))
               for e, s, w in zip(self.examples, soft, weights, strict=True)]
        return SynSet(exs, self.label_names, dict(self.meta))

    def counts(self) -> list[int]:
        out = [0] * self.num_classes
        for e in self.examples:
            out[e.label] += 1
        return out


def write_set(path: str | Path, synset: SynSet) -> Path:
    lines = []
    for e in synset.examples:
        row: dict = {"text": e.text, "label": synset.label_names[e.label]}
        if e.text_pair is not None:
            row["text_pair"] = e.text_pair
        if e.soft_label is not None:
            row["soft_label"] = [round(x, 6) for x in e.soft_label]
        if e.weight != 1.0:
            row["weight"] = round(e.weight, 6)
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + "\n")
    return Path(path)


def _parse_soft(value, num_classes: int, where: str) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != num_classes:
        raise DilmError(f"{where}soft_label must be a list of {num_classes} probabilities")
    try:
        probs = tuple(float(x) for x in value)
    except (TypeError, ValueError):
        raise DilmError(f"{where}soft_label must hold numbers") from None
    if any(not math.isfinite(p) or p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-3:
        raise DilmError(f"{where}soft_label must be non-negative and sum to 1 (got sum {sum(probs):.4f})")
    return probs


def read_set(path: str | Path, label_names: tuple[str, ...], is_pair: bool = False) -> SynSet:
    """Read and validate a JSONL set against a task's labels; errors name the file and line."""
    path = Path(path)
    if not path.exists():
        raise DilmError(f"synthetic set {path} does not exist")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}: "
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DilmError(f"{where}malformed JSON ({e.msg})") from None
            if not isinstance(row, dict) or "text" not in row or "label" not in row:
                raise DilmError(f"{where}each line needs an object with 'text' and 'label'")
            if not isinstance(row["text"], str) or not row["text"].strip():
                raise DilmError(f"{where}'text' must be a non-empty string")
            pair = row.get("text_pair")
            if is_pair and not isinstance(pair, str):
                raise DilmError(f"{where}this is a sentence-pair task: 'text_pair' is required")
            soft = row.get("soft_label")
            soft = None if soft is None else _parse_soft(soft, len(label_names), where)
            weight = row.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight)
                                                                                      and weight >= 0):
                raise DilmError(f"{where}'weight' must be a non-negative number, got {weight!r}")
            examples.append(SynExample(row["text"], parse_label(row["label"], label_names, where),
                                       pair if is_pair else None, soft, float(weight)))
    if not examples:
        raise DilmError(f"synthetic set {path} is empty")
    meta_path = path.with_suffix(".meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return SynSet(examples, tuple(label_names), meta)
