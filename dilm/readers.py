"""Reading a task's rows: files (TSV, CSV, JSONL, Parquet; optionally ``.gz``, ``.bz2`` or ``.xz``) by path or by
storage URI (``s3://``, ``gs://``, … through ``pyarrow.fs``, fetched once per machine into the dilm cache), and
Hugging Face datasets (from the hub, or saved on disk with ``save_to_disk``).

Every reader returns *rows*: ``(text, text_pair, raw_label)`` tuples of strings (``text_pair`` None for single-text
tasks), each validated as it is read; a problem is one :class:`~dilm.DilmError` naming the file, the row and what is
wrong. Labels stay raw here: :mod:`dilm.tasks` maps them to ids.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import lzma
import shutil
from collections.abc import Iterator
from pathlib import Path

from dilm import DilmError

Row = tuple[str, str | None, str]
FORMATS = ("tsv", "csv", "jsonl", "parquet")
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
MAX_FIELD = 1 << 24  # csv's default 128 KiB field limit cuts long documents


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def file_format(path: str) -> str:
    """``reviews.csv.gz`` → ``csv``; a one-line error for a suffix dilm cannot read."""
    name = str(path).rsplit("/", 1)[-1].split("?", 1)[0]
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    kind = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if kind not in FORMATS:
        raise DilmError(f"{path}: unsupported file type {kind or '(none)'!r}; use one of {', '.join(FORMATS)} "
                        f"(optionally {', '.join(COMPRESSIONS)})")
    return kind


def fetched_path(location: str) -> Path:
    """Where this machine keeps its copy of the file at URI ``location``: ``<cache dir>/data/<hash of the URI>``, the
    URI's suffixes kept (the format and compression are read from them)."""
    from dilm.files import cache_dir

    suffix = "".join(Path(location.split("?", 1)[0]).suffixes[-2:])
    return cache_dir() / "data" / (hashlib.sha256(location.encode()).hexdigest()[:20] + suffix)


def local_copy(location: str) -> Path:
    """A path on this machine holding the file at ``location``: the path itself, or for a URI a copy fetched once
    per machine into ``<cache dir>/data/`` (by the URI; a later sweep that finds other content there re-fetches it
    when the caller's hash check fails, see :func:`dilm.tasks.load_task`)."""
    if not is_uri(location):
        path = Path(location)
        if not path.exists():
            raise DilmError(f"data file {location} does not exist")
        if not path.is_file():
            raise DilmError(f"data file {location} is not a file")
        return path
    from dilm.files import atomic_path, file_lock

    dest = fetched_path(location)
    with file_lock(dest.with_suffix(".lock")):
        if not dest.exists():
            import pyarrow.fs

            try:
                fs, key = pyarrow.fs.FileSystem.from_uri(location)
                with fs.open_input_stream(key) as src, atomic_path(dest) as tmp, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out)
            except (OSError, ValueError) as e:
                raise DilmError(f"data file {location} could not be read: {str(e).splitlines()[0]}") from None
    return dest


def forget_copy(location: str) -> None:
    """Drop this machine's fetched copy of ``location`` (its content changed at the source)."""
    if is_uri(location):
        fetched_path(location).unlink(missing_ok=True)


def _open_text(path: Path) -> io.TextIOBase:
    opener = COMPRESSIONS.get(path.suffix)
    if opener is not None:
        return io.TextIOWrapper(opener(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _column_index(header: list[str] | None, column: int | str, where: str) -> int:
    if isinstance(column, int):
        return column
    if header is None:
        if str(column).isdigit():
            return int(column)
        raise DilmError(f"{where}: column {column!r} named, but the file is read without a header (--no-header); "
                        "give columns by index (0, 1, ...)")
    if column not in header:
        raise DilmError(f"{where}: missing column {column!r}; columns are {header}")
    return header.index(column)


def _table_rows(path: Path, where: str, delimiter: str, columns: tuple, has_header: bool) -> Iterator[Row]:
    # QUOTE_NONE for TSV: GLUE files hold bare '"' characters. CSV keeps standard quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    csv.field_size_limit(MAX_FIELD)
    try:
        with _open_text(path) as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
            header = next(reader, None) if has_header else None
            if has_header and header is None:
                raise DilmError(f"{where}: empty file (expected a header row)")
            ti, pi, li = (None if c is None else _column_index(header, c, where) for c in columns)
            need = max(i for i in (ti, pi, li) if i is not None)
            for lineno, r in enumerate(reader, 2 if has_header else 1):
                if not r:
                    continue
                if len(r) <= need:
                    raise DilmError(f"{where}:{lineno}: malformed row: {len(r)} fields, expected at least {need + 1}")
                yield r[ti], None if pi is None else r[pi], r[li]
    except (UnicodeDecodeError, csv.Error, EOFError, OSError, lzma.LZMAError) as e:
        raise DilmError(f"{where}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def _jsonl_rows(path: Path, where: str, columns: tuple) -> Iterator[Row]:
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DilmError(f"{where}:{lineno}: malformed JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DilmError(f"{where}:{lineno}: expected a JSON object per line")
                yield _pick(row, columns, f"{where}:{lineno}")
    except (UnicodeDecodeError, EOFError, OSError, lzma.LZMAError) as e:
        raise DilmError(f"{where}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def _pick(row: dict, columns: tuple, where: str) -> Row:
    text, pair, label = columns
    for col in columns:
        if col is not None and str(col) not in row:
            raise DilmError(f"{where}: missing column {str(col)!r}; columns are {sorted(row)}")
    return (_str(row[str(text)]), None if pair is None else _str(row[str(pair)]), _str(row[str(label)]))


def _str(value) -> str:
    return "" if value is None else str(value)


def _parquet_rows(path: Path, where: str, columns: tuple) -> Iterator[Row]:
    """Parquet read a record batch at a time (a large file is never held whole as Python objects)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid (a ValueError) or OSError for a file that is not Parquet
        raise DilmError(f"{where}: unreadable Parquet ({str(e).splitlines()[0][:120]})") from None
    names = pf.schema_arrow.names
    for col in columns:
        if col is not None and str(col) not in names:
            raise DilmError(f"{where}: missing column {str(col)!r}; columns are {names}")
    wanted = sorted({str(c) for c in columns if c is not None})
    for batch in pf.iter_batches(batch_size=8192, columns=wanted):
        data = batch.to_pydict()
        yield from (_pick({k: data[k][i] for k in wanted}, columns, where) for i in range(batch.num_rows))


def read_rows(location: str, text_column: int | str, label_column: int | str, text_pair_column: int | str | None = None,
              has_header: bool = True) -> list[Row]:
    """The rows of one data file (a path or URI), validated: every text non-empty, every label present."""
    kind = file_format(location)
    path = local_copy(location)
    columns = (text_column, text_pair_column, label_column)
    if kind in ("tsv", "csv"):
        rows = _table_rows(path, location, "\t" if kind == "tsv" else ",", columns, has_header)
    elif kind == "jsonl":
        rows = _jsonl_rows(path, location, columns)
    else:
        rows = _parquet_rows(path, location, columns)
    return checked(rows, location, first=2 if has_header and kind in ("tsv", "csv") else 1)


def checked(rows, where: str, first: int = 1) -> list[Row]:
    """``rows`` as a list, refusing an empty text (or pair) or label, named by file and row."""
    out = []
    for i, (text, pair, label) in enumerate(rows, first):
        text, label = text.strip(), label.strip()
        if not text or (pair is not None and not pair.strip()):
            raise DilmError(f"{where}:{i}: empty text")
        if not label:
            raise DilmError(f"{where}:{i}: empty label")
        out.append((text, None if pair is None else pair.strip(), label))
    return out


def dataset_rows(ds, where: str, text_column: str, label_column: str,
                 text_pair_column: str | None) -> tuple[list[Row], tuple[str, ...] | None]:
    """Rows of one split of a ``datasets.Dataset``, and its label names where the label is a ClassLabel (then the
    raw labels are ids)."""
    columns = (text_column, text_pair_column, label_column)
    for col in columns:
        if col is not None and col not in ds.column_names:
            raise DilmError(f"{where}: missing column {col!r}; columns are {ds.column_names}")
    names = getattr(ds.features[label_column], "names", None)
    pairs = ds[text_pair_column] if text_pair_column else [None] * len(ds)
    rows = ((_str(t), None if p is None else _str(p), _str(lab))
            for t, p, lab in zip(ds[text_column], pairs, ds[label_column]))
    return checked(rows, where), tuple(names) if names else None


def load_dataset_dict(source: str, dataset: str, config: str | None):
    """A ``datasets.DatasetDict``: ``source`` hf (the hub or its local cache) or disk (``save_to_disk``'s folder)."""
    import datasets

    if source == "disk":
        if not Path(dataset).is_dir():
            raise DilmError(f"dataset folder {dataset} does not exist")
        try:
            ds = datasets.load_from_disk(dataset)
        except FileNotFoundError as e:
            raise DilmError(f"{dataset}: not a dataset saved with save_to_disk ({str(e).splitlines()[0]})") from None
        if isinstance(ds, datasets.Dataset):
            raise DilmError(f"{dataset}: a single Dataset; save a DatasetDict with train and test splits")
        return ds
    try:
        return datasets.load_dataset(dataset, config)
    except Exception as e:  # the hub's errors are many (offline, unknown name, gated): one line names it
        raise DilmError(f"hf:{dataset}: cannot load ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
