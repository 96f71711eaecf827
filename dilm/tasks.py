"""Tasks: one typed :class:`TaskSpec` for every dataset dilm reads, one resolver, one loader.

A *task reference* is what a user writes wherever a task is named (every sub-command, a sweep YAML's ``task``, the
Python API): a packaged name (``sst2``, ``mrpc``, ``ag_news``), ``hf:DATASET`` or ``hf:DATASET:CONFIG`` (the hub or
its cache), the folder of a ``datasets.DatasetDict`` saved with ``save_to_disk``, a spec file (``.yaml``/``.json``),
or a spec given as a mapping (``{train: reviews.csv, test: test.csv, text_column: review, ...}``).
:func:`resolve_task` turns any of them into a :class:`TaskSpec` — the packaged tasks are specs too — and
:func:`load_task` reads it into :class:`TaskData`: train and test lists of :class:`Example` with integer labels, the
label names that the generator's prompts and the written sets use, and ``fingerprint``, a content hash of the data
that enters every cache key (two files of one name with different rows never share an LM checkpoint).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from dilm import DilmError
from dilm.readers import dataset_rows, forget_copy, is_uri, load_dataset_dict, read_rows

SOURCES = ("packaged", "files", "hf", "disk")
MAX_CLASSES = 100  # more distinct training labels than this and no label_names: a text column given as the label


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    text_pair: str | None = None


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's data lives and how it reads. ``source``: packaged (``train``/``test`` are files inside the
    package), files (paths or storage URIs; TSV, CSV, JSONL or Parquet, optionally compressed), hf (``dataset`` on
    the hub, ``train``/``test`` are split names) or disk (``dataset`` is a ``save_to_disk`` folder, split names
    likewise). ``label_names`` in id order (empty: the training labels, sorted); ``description``: one line of what
    a text is ("a customer support ticket"), which words the generator's prompt of a task that is not packaged;
    ``sha256``: a content hash the data must have (set by a sweep's driver, checked on every node)."""

    name: str = ""
    train: str = ""
    test: str = ""
    text_column: int | str = "text"
    label_column: int | str = "label"
    text_pair_column: int | str | None = None
    label_names: tuple[str, ...] = ()
    has_header: bool = True
    description: str = ""
    prompt_template: str = ""  # the generator's prompt in plain words, with a {label} field (generator.py)
    source: str = "files"
    dataset: str = ""
    config: str | None = None
    sha256: str = ""

    def __post_init__(self):
        object.__setattr__(self, "label_names", tuple(str(n) for n in self.label_names or ()))
        if self.source not in SOURCES:
            raise DilmError(f"task source {self.source!r} unknown; known: {', '.join(SOURCES)}")
        if self.source in ("packaged", "files") and not self.train:
            raise DilmError("a task spec needs a training file ('train', or --train-file)")
        if self.source in ("hf", "disk") and not self.dataset:
            raise DilmError(f"a task spec of source {self.source} needs 'dataset'")
        if self.source in ("hf", "disk") and not self.train:
            object.__setattr__(self, "train", "train")  # the split's name
        if len(set(self.label_names)) != len(self.label_names):
            raise DilmError(f"task {self.name}: label names repeat: {list(self.label_names)}")
        if self.prompt_template and "{label}" not in self.prompt_template:
            raise DilmError(f"task {self.name}: prompt_template {self.prompt_template!r} has no {{label}} field")
        if not self.name:
            object.__setattr__(self, "name", self._default_name())

    def _default_name(self) -> str:
        if self.source in ("hf", "disk"):
            return self.dataset.rstrip("/").rsplit("/", 1)[-1]
        return self.train.rsplit("/", 1)[-1].split(".", 1)[0]

    @property
    def is_pair(self) -> bool:
        return self.text_pair_column is not None

    @property
    def packaged(self) -> bool:
        return self.source == "packaged"

    def to_dict(self) -> dict:
        """The spec as data (a sweep YAML's ``task`` mapping, provenance, MLflow params): the fields that differ
        from the defaults."""
        defaults = TaskSpec(train="-")
        return {f.name: (list(v) if isinstance(v, tuple) else v) for f in dataclasses.fields(self)
                if (v := getattr(self, f.name)) != getattr(defaults, f.name) or f.name in ("name", "source")}

    def to_ref(self) -> str | dict:
        """The shortest reference that :func:`resolve_task` turns back into this spec: a packaged task's name, or
        :meth:`to_dict`."""
        return self.name if self.packaged and not self.sha256 else self.to_dict()


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        name="sst2", label_names=("negative", "positive"), train="sst2/train.tsv.gz", test="sst2/dev.tsv.gz",
        text_column="sentence", label_column="label", source="packaged",
        description="GLUE SST-2 movie-review sentiment; test = GLUE dev (872)",
        prompt_template="Here is one short {label} sentence from a movie review:",
    ),
    "mrpc": TaskSpec(
        name="mrpc", label_names=("no", "yes"), train="mrpc/train.tsv.gz", test="mrpc/dev.tsv.gz",
        text_column="#1 String", text_pair_column="#2 String", label_column="Quality", source="packaged",
        description="GLUE MRPC paraphrase (sentence pairs); test = GLUE dev (408)",
        prompt_template="Two sentences from a news article. Is the second a paraphrase of the first? {label}.\n"
                        "First:",
    ),
    "ag_news": TaskSpec(
        name="ag_news", label_names=("World", "Sports", "Business", "Sci/Tech"), train="ag_news/train.tsv.gz",
        test="ag_news/test.tsv.gz", text_column=0, label_column=1, has_header=False, source="packaged",
        description="AG News topic subset (10k train, 7.6k test)",
        prompt_template="Here is the start of a {label} news article:",
    ),
}
SPEC_KEYS = tuple(f.name for f in dataclasses.fields(TaskSpec))
OTHER_REFERENCES = "hf:DATASET[:CONFIG], a save_to_disk folder, a task spec file (.yaml/.json), or --train-file"
REFERENCE_HELP = f"a packaged task ({', '.join(sorted(TASKS))}), {OTHER_REFERENCES}"


def _absolute(location: str, base: Path) -> str:
    return location if not location or is_uri(location) else str((base / location).expanduser().resolve())


def spec_from_mapping(raw: Mapping, base: str | Path | None = None, where: str = "task") -> TaskSpec:
    """A spec from data (a YAML mapping, a spec file, a saved config); relative paths are taken from ``base``
    (default: the working directory) and made absolute, since trials run elsewhere."""
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise DilmError(f"{where}: unknown key(s) {unknown}; known keys: {', '.join(SPEC_KEYS)}")
    values = dict(raw)
    if values.get("source") == "packaged" and values.get("name") in TASKS:
        return dataclasses.replace(TASKS[values["name"]], sha256=values.get("sha256", ""))
    values.setdefault("source", "files")
    base = Path(base or ".")
    for key in ("train", "test") if values["source"] == "files" else ("dataset",) if values["source"] == "disk" else ():
        values[key] = _absolute(str(values.get(key) or ""), base)
    if isinstance(values.get("label_names"), str):
        values["label_names"] = tuple(x.strip() for x in values["label_names"].split(",") if x.strip())
    return TaskSpec(**values)


def resolve_task(ref: TaskSpec | Mapping | str | None) -> TaskSpec:
    """Any task reference (see the module docstring) → its :class:`TaskSpec`; a one-line error naming what is
    known on a miss."""
    if isinstance(ref, TaskSpec):
        return ref
    if isinstance(ref, Mapping):
        return spec_from_mapping(ref)
    if not ref:
        raise DilmError(f"no task given; pass {REFERENCE_HELP}")
    if ref in TASKS:
        return TASKS[ref]
    if ref.startswith("hf:"):
        dataset, _, config = ref[3:].partition(":")
        return TaskSpec(source="hf", dataset=dataset, config=config or None, train="train", test="validation")
    path = Path(ref).expanduser()
    if path.is_dir():
        return TaskSpec(source="disk", dataset=str(path.resolve()), train="train", test="")
    if path.is_file() and path.suffix in (".yaml", ".yml", ".json"):
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise DilmError(f"task spec {path}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, Mapping):
            raise DilmError(f"task spec {path}: expected a mapping of {', '.join(SPEC_KEYS)}")
        return spec_from_mapping(raw, path.parent, where=f"task spec {path}")
    raise DilmError(f"unknown task {ref!r}; known tasks: {', '.join(sorted(TASKS))} (or {OTHER_REFERENCES})")


@dataclass(frozen=True)
class TaskData:
    name: str
    label_names: tuple[str, ...]
    train: list[Example] = field(repr=False)
    test: list[Example] = field(repr=False)
    is_pair: bool = False
    spec: TaskSpec | None = field(default=None, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def described_by(self) -> TaskSpec:
        """The spec the data was read from (its prompt template, description); for data built in memory, the packaged
        task of its name or a bare spec."""
        return self.spec or TASKS.get(self.name) or TaskSpec(name=self.name, train="(in memory)")

    @functools.cached_property
    def fingerprint(self) -> str:
        """Content hash (sha256, hex) of both splits and the label names: what the task's data *is*."""
        h = hashlib.sha256(json.dumps(list(self.label_names)).encode())
        for split in (self.train, self.test):
            h.update(b"|split|")
            for e in split:
                h.update(json.dumps([e.text, e.text_pair, e.label]).encode())
        return h.hexdigest()

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
            raise DilmError(f"task {task.name}: DPC {dpc} is larger than class {task.label_names[c]!r} "
                            f"({len(group)} examples)")


def length_limit(lengths: list[int], quantile: float, cap: int) -> int:
    """A token limit from a task's data: the ``quantile`` of ``lengths`` (rounded up), at most ``cap``, at least 1.

    With the 0.99 quantile, 1 % of the examples are longer than the limit; a fixed 64 instead cuts 47.5 % of
    MRPC's rendered pairs."""
    if not lengths:
        raise DilmError("no examples to take token lengths from")
    return max(1, min(cap, int(np.ceil(np.quantile(np.asarray(lengths), quantile)))))


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


def _label_names(spec: TaskSpec, raw: list[str], where: str) -> tuple[str, ...]:
    """The spec's label names, or the training labels sorted (numbers numerically); refuses a label column that holds
    texts (more than :data:`MAX_CLASSES` distinct values)."""
    if spec.label_names:
        return spec.label_names
    values = set(raw)
    if len(values) > MAX_CLASSES:
        raise DilmError(f"{where}: label column {spec.label_column!r} has {len(values):,} distinct values (is it a "
                        f"text column?); name the label column, or give label_names for a task with that many classes")
    return tuple(sorted(values, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s)))


def _examples(rows, names: tuple[str, ...], where: str) -> list[Example]:
    return [Example(text=t, text_pair=p, label=parse_label(lab, names, f"{where}:{i}: "))
            for i, (t, p, lab) in enumerate(rows, 1)]


def _check_classes(data: TaskData, need_test: bool = True) -> TaskData:
    for split in ("train", "test") if need_test else ("train",):
        if not getattr(data, split):
            raise DilmError(f"task {data.name}: the {split} split is empty")
    counts = Counter(ex.label for ex in data.train)
    empty = [data.label_names[c] for c in range(data.num_classes) if counts[c] == 0]
    if empty:
        raise DilmError(f"task {data.name}: class(es) {empty} have no training examples")
    return data


def _read_files(spec: TaskSpec, need_test: bool) -> TaskData:
    base = resources.files("dilm") / "data" if spec.packaged else None
    cols = (spec.text_column, spec.label_column, spec.text_pair_column, spec.has_header)

    def rows(location: str):
        if base is None:
            return read_rows(location, *cols)
        with resources.as_file(base / location) as path:
            return read_rows(str(path), *cols)

    if need_test and not spec.test:
        raise DilmError(f"task {spec.name}: no test file: user data needs both --train-file and --test-file (or "
                        "'test' in the spec)")
    train = rows(spec.train)
    test = rows(spec.test) if spec.test else []
    names = _label_names(spec, [lab for _, _, lab in train], spec.train)
    return TaskData(spec.name, names, _examples(train, names, spec.train), _examples(test, names, spec.test),
                    spec.is_pair, spec)


def _read_dataset(spec: TaskSpec, need_test: bool) -> TaskData:
    ds = load_dataset_dict(spec.source, spec.dataset, spec.config)
    splits = list(ds.keys())
    test_split = spec.test or next((s for s in ("test", "validation") if s in ds), "")
    for split in (spec.train, test_split) if need_test else (spec.train,):
        if split not in ds:
            raise DilmError(f"{spec.dataset}: no split {split or 'for the test'!r}; splits are {splits}")
    cols = (str(spec.text_column), str(spec.label_column),
            None if spec.text_pair_column is None else str(spec.text_pair_column))
    train, class_names = dataset_rows(ds[spec.train], f"{spec.dataset}[{spec.train}]", *cols)
    test = dataset_rows(ds[test_split], f"{spec.dataset}[{test_split}]", *cols)[0] if test_split in ds else []
    names = spec.label_names or class_names or _label_names(spec, [lab for _, _, lab in train], spec.dataset)
    return TaskData(spec.name, names, _examples(train, names, f"{spec.dataset}[{spec.train}]"),
                    _examples(test, names, f"{spec.dataset}[{test_split}]"), spec.is_pair, spec)


def read_task(spec: TaskSpec, need_test: bool = True, refetch: bool = True) -> TaskData:
    """Read ``spec``'s data, checked (classes, splits, and the pinned ``sha256`` where the spec has one; on a
    mismatch, files fetched from URIs are fetched once more first: this machine's copy may be stale)."""
    data = _check_classes((_read_files if spec.source in ("packaged", "files") else _read_dataset)(spec, need_test),
                          need_test)
    if spec.sha256 and data.fingerprint != spec.sha256:
        fetched = [location for location in (spec.train, spec.test) if is_uri(location)]
        if refetch and fetched and spec.source == "files":
            for location in fetched:
                forget_copy(location)
            return read_task(spec, need_test, refetch=False)
        raise DilmError(f"task {spec.name}: the data at {spec.train or spec.dataset} changed since the sweep started "
                        f"(content hash {data.fingerprint[:12]}…, expected {spec.sha256[:12]}…)")
    return data


def pin(data: TaskData) -> TaskSpec:
    """The spec of ``data`` with its content hash, for nodes that read the same data again (from a URI)."""
    return dataclasses.replace(data.spec or resolve_task(data.name), sha256=data.fingerprint)


def load_task(ref: TaskSpec | Mapping | str | None = None, *, train_file: str | None = None,
              test_file: str | None = None, text_column: str = "text", label_column: str = "label",
              text_pair_column: str | None = None, label_names: list[str] | None = None, has_header: bool = True,
              description: str = "", need_test: bool = True) -> TaskData:
    """Resolve a task reference (or, with ``train_file``, a spec of files; ``ref`` then names it) and read it;
    ``need_test=False``: no test split needed (coreset selection reads train only)."""
    spec = files_spec(ref, train_file, test_file, text_column, label_column, text_pair_column, label_names,
                      has_header, description) if (train_file or test_file) else resolve_task(ref)
    return read_task(spec, need_test)


def files_spec(name: str | None, train_file: str | None, test_file: str | None, text_column: str = "text",
               label_column: str = "label", text_pair_column: str | None = None,
               label_names: list[str] | tuple[str, ...] | None = None, has_header: bool = True,
               description: str = "") -> TaskSpec:
    """The spec of user files given as options; ``name`` may only name them (a packaged name or a task reference
    beside files contradicts them: a one-line error)."""
    if not train_file:
        raise DilmError("user data needs --train-file")
    if name and (name in TASKS or name.startswith("hf:") or Path(name).exists()):
        raise DilmError(f"--task {name} and --train-file {train_file} contradict each other: give one (--task may "
                        "only name the files' task, e.g. --task reviews)")
    return spec_from_mapping({"name": name or "", "train": train_file, "test": test_file or "",
                              "text_column": text_column, "label_column": label_column,
                              "text_pair_column": text_pair_column, "label_names": tuple(label_names or ()),
                              "has_header": has_header, "description": description})
