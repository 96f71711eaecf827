"""Tasks: a typed registry of packaged datasets plus user files (CSV/TSV/JSONL) and Hugging Face datasets.

A task resolves to :class:`TaskData`: train and test lists of :class:`Example` with integer labels and the
human-readable label names that the generator prompts use.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from dilm import DilmError


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    text_pair: str | None = None


@dataclass(frozen=True)
class TaskSpec:
    """Where a packaged task's files live and how their columns read."""

    name: str
    label_names: tuple[str, ...]
    train_file: str
    test_file: str
    text_column: int | str
    label_column: int | str
    text_pair_column: int | str | None = None
    has_header: bool = True
    labels_are_names: bool = False  # True: the file holds "Sports", not 1
    description: str = ""
    prompt_template: str = ""  # the generator's prompt in plain words, with a {label} field (generator.py)

    @property
    def is_pair(self) -> bool:
        return self.text_pair_column is not None


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        name="sst2", label_names=("negative", "positive"), train_file="sst2/train.tsv.gz",
        test_file="sst2/dev.tsv.gz", text_column="sentence", label_column="label",
        description="GLUE SST-2 movie-review sentiment; test = GLUE dev (872)",
        prompt_template="Here is one short {label} sentence from a movie review:",
    ),
    "mrpc": TaskSpec(
        name="mrpc", label_names=("no", "yes"), train_file="mrpc/train.tsv.gz", test_file="mrpc/dev.tsv.gz",
        text_column="#1 String", text_pair_column="#2 String", label_column="Quality",
        description="GLUE MRPC paraphrase (sentence pairs); test = GLUE dev (408)",
        prompt_template="Two sentences from a news article. Is the second a paraphrase of the first? {label}.\n"
                        "First:",
    ),
    "ag_news": TaskSpec(
        name="ag_news", label_names=("World", "Sports", "Business", "Sci/Tech"),
        train_file="ag_news/train.tsv.gz", test_file="ag_news/test.tsv.gz", text_column=0, label_column=1,
        has_header=False, labels_are_names=True, description="AG News topic subset (10k train, 7.6k test)",
        prompt_template="Here is the start of a {label} news article:",
    ),
}


@dataclass(frozen=True)
class TaskData:
    name: str
    label_names: tuple[str, ...]
    train: list[Example] = field(repr=False)
    test: list[Example] = field(repr=False)
    is_pair: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def by_class(self, split: str = "train") -> list[list[Example]]:
        """Examples of ``split`` grouped by label id (index = label)."""
        groups: list[list[Example]] = [[] for _ in self.label_names]
        for ex in getattr(self, split):
            groups[ex.label].append(ex)
        return groups


def check_dpc(task: TaskData, dpc: int) -> None:
    """Refuse a DPC larger than a class of the task's training split (a set takes DPC distinct real examples)."""
    for c, group in enumerate(task.by_class()):
        if dpc > len(group):
            raise DilmError(f"DPC {dpc} is larger than class {task.label_names[c]!r} ({len(group)} examples)")


def length_limit(lengths: list[int], quantile: float, cap: int) -> int:
    """A token limit from a task's data: the ``quantile`` of ``lengths`` (rounded up), at most ``cap``, at least 1.

    With the 0.99 quantile, 1 % of the examples are longer than the limit; a fixed 64 instead cuts 47.5 % of
    MRPC's rendered pairs."""
    if not lengths:
        raise DilmError("no examples to take token lengths from")
    return max(1, min(cap, int(np.ceil(np.quantile(np.asarray(lengths), quantile)))))


def get_task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise DilmError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))} "
                        "(or pass --train-file/--test-file, or a Hugging Face dataset name with hf:NAME)")
    return TASKS[name]


def parse_label(label: str | int, label_names: tuple[str, ...], where: str = "") -> int:
    """Map a label given as an id or a name (``1``, ``"1"``, ``"positive"``) to its id."""
    if isinstance(label, bool):
        label = int(label)
    if isinstance(label, int) and 0 <= label < len(label_names):
        return label
    if isinstance(label, str):
        s = label.strip()
        if s in label_names:
            return label_names.index(s)
        if s.lstrip("-").isdigit() and 0 <= int(s) < len(label_names):
            return int(s)
    raise DilmError(f"{where}label {label!r} is not in the label set {list(label_names)}")


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig", newline="")


def _read_table(path: Path, delimiter: str, has_header: bool) -> tuple[list[str] | None, list[list[str]]]:
    # QUOTE_NONE for TSV: GLUE files hold bare '"' characters. CSV keeps standard quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with _open_text(path) as f:
        rows = [r for r in csv.reader(f, delimiter=delimiter, quoting=quoting) if r]
    if has_header:
        if not rows:
            raise DilmError(f"{path}: empty file (expected a header row)")
        return rows[0], rows[1:]
    return None, rows


def _column_index(header: list[str] | None, column: int | str, path: Path) -> int:
    if isinstance(column, int):
        return column
    if column.isdigit() and header is None:
        return int(column)
    if header is None:
        raise DilmError(f"{path}: column {column!r} named, but the file is read without a header (--no-header); "
                        "give columns by index (0, 1, ...)")
    if header is None or column not in header:
        raise DilmError(f"{path}: missing column {column!r}; columns are {header or 'unnamed (no header)'}")
    return header.index(column)


def read_examples(path: str | Path, text_column: int | str, label_column: int | str,
                  label_names: tuple[str, ...] | None = None, text_pair_column: int | str | None = None,
                  has_header: bool = True) -> tuple[list[tuple[str, str | None, str]], tuple[str, ...] | None]:
    """Read (text, text_pair, raw_label) rows from a TSV, CSV or JSONL file (optionally gzipped).

    Every row is validated; a malformed row raises :class:`DilmError` naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        raise DilmError(f"data file {path} does not exist")
    kind = path.name.removesuffix(".gz").rsplit(".", 1)[-1].lower()
    out: list[tuple[str, str | None, str]] = []
    if kind == "jsonl":
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DilmError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DilmError(f"{path}:{lineno}: expected a JSON object per line")
                for col in (text_column, label_column, text_pair_column):
                    if col is not None and str(col) not in row:
                        raise DilmError(f"{path}:{lineno}: missing column {str(col)!r}")
                pair = None if text_pair_column is None else str(row[str(text_pair_column)])
                out.append((str(row[str(text_column)]), pair, str(row[str(label_column)])))
        return out, label_names
    if kind not in ("tsv", "csv"):
        raise DilmError(f"{path}: unsupported file type {kind!r}; use .tsv, .csv or .jsonl (optionally .gz)")
    header, rows = _read_table(path, "\t" if kind == "tsv" else ",", has_header)
    ti = _column_index(header, text_column, path)
    li = _column_index(header, label_column, path)
    pi = None if text_pair_column is None else _column_index(header, text_pair_column, path)
    need = max(i for i in (ti, li, pi) if i is not None)
    first = 2 if has_header else 1
    for lineno, r in enumerate(rows, first):
        if len(r) <= need:
            raise DilmError(f"{path}:{lineno}: malformed row: {len(r)} fields, expected at least {need + 1}")
        out.append((r[ti], None if pi is None else r[pi], r[li]))
    return out, label_names


def _to_examples(rows, label_names: tuple[str, ...], path) -> list[Example]:
    return [Example(text=t.strip(), text_pair=None if p is None else p.strip(),
                    label=parse_label(lab, label_names, f"{path}:{i}: "))
            for i, (t, p, lab) in enumerate(rows, 1)]


def _check_classes(data: TaskData, need_test: bool = True) -> TaskData:
    for split in ("train", "test") if need_test else ("train",):
        counts = Counter(ex.label for ex in getattr(data, split))
        if not getattr(data, split):
            raise DilmError(f"task {data.name}: the {split} split is empty")
        if split == "train":
            empty = [data.label_names[c] for c in range(data.num_classes) if counts[c] == 0]
            if empty:
                raise DilmError(f"task {data.name}: class(es) {empty} have no training examples")
    return data


def load_packaged(name: str) -> TaskData:
    spec = get_task_spec(name)
    root = resources.files("dilm") / "data"
    splits = []
    for rel in (spec.train_file, spec.test_file):
        with resources.as_file(root / rel) as path:
            rows, _ = read_examples(path, spec.text_column, spec.label_column, spec.label_names,
                                    spec.text_pair_column, spec.has_header)
            splits.append(_to_examples(rows, spec.label_names, rel))
    return _check_classes(TaskData(name, spec.label_names, splits[0], splits[1], spec.is_pair))


def load_files(train_file: str | Path, test_file: str | Path | None, text_column: str, label_column: str,
               text_pair_column: str | None = None, label_names: list[str] | None = None,
               name: str = "custom", has_header: bool = True) -> TaskData:
    """A user task from files. Label names come from ``label_names`` or, sorted, from the training file.

    Without ``test_file`` the test split is empty (enough for coreset selection, which reads only train).
    ``has_header=False``: columns are given by index (``0``, ``1``, …), as GLUE's CoLA ships.
    """
    train_rows, _ = read_examples(train_file, text_column, label_column, None, text_pair_column, has_header)
    test_rows = [] if test_file is None else read_examples(test_file, text_column, label_column, None,
                                                           text_pair_column, has_header)[0]
    if label_names is None:
        raw = sorted({lab for _, _, lab in train_rows})
        label_names = sorted(raw, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    names = tuple(label_names)
    data = TaskData(name, names, _to_examples(train_rows, names, train_file),
                    _to_examples(test_rows, names, test_file), text_pair_column is not None)
    return _check_classes(data, need_test=test_file is not None)


def load_hf(dataset: str, text_column: str, label_column: str = "label", text_pair_column: str | None = None,
            train_split: str = "train", test_split: str = "validation", config: str | None = None) -> TaskData:
    """Any Hugging Face dataset (needs hub access or a local cache). Label names from its ClassLabel feature."""
    import datasets

    ds = datasets.load_dataset(dataset, config)
    feature = ds[train_split].features[label_column]
    names = tuple(getattr(feature, "names", None) or sorted({str(x) for x in ds[train_split][label_column]}))

    def convert(split):
        cols = ds[split]
        pairs = cols[text_pair_column] if text_pair_column else [None] * len(cols)
        return [Example(str(t), parse_label(lab, names), None if p is None else str(p))
                for t, p, lab in zip(cols[text_column], pairs, cols[label_column])]

    return _check_classes(TaskData(dataset, names, convert(train_split), convert(test_split),
                                   text_pair_column is not None))


def load_task(name: str | None = None, *, train_file: str | None = None, test_file: str | None = None,
              text_column: str = "text", label_column: str = "label", text_pair_column: str | None = None,
              label_names: list[str] | None = None, has_header: bool = True, need_test: bool = True) -> TaskData:
    """Resolve a task: a packaged name, ``hf:DATASET``, or user files (``need_test=False``: no test file needed)."""
    if train_file or test_file:
        if not train_file or (need_test and not test_file):
            raise DilmError("user data needs both --train-file and --test-file" if need_test
                            else "user data needs --train-file")
        return load_files(train_file, test_file, text_column, label_column, text_pair_column, label_names,
                          name=name or Path(train_file).stem, has_header=has_header)
    if name and name.startswith("hf:"):
        return load_hf(name[3:], text_column, label_column, text_pair_column)
    if name is None:
        raise DilmError("no task given; pass --task NAME or --train-file/--test-file")
    return load_packaged(name)
