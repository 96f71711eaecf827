"""A user's own dataset, written by the tests: SST-2 sentences under other column names and other labels, as a
CSV (``review``, ``sentiment``: ``neg`` / ``pos``) and as Parquet with three classes of its own."""

from __future__ import annotations

import csv
from pathlib import Path

from dilm.tasks import load_task


def write_reviews(folder: Path, n_train: int = 400, n_test: int = 120, offset: int = 0) -> tuple[Path, Path]:
    """train.csv and test.csv of SST-2 rows (balanced), columns ``review``/``sentiment``, labels ``neg``/``pos``;
    ``offset`` picks other rows (same file names, other content)."""
    folder.mkdir(parents=True, exist_ok=True)
    sst2 = load_task("sst2")
    by_class = sst2.by_class()
    paths = []
    for name, n, start in (("train.csv", n_train, offset), ("test.csv", n_test, offset + n_train)):
        rows = [(e.text, "pos" if c else "neg") for i in range(start // 2, start // 2 + n // 2)
                for c in (0, 1) for e in [by_class[c][i]]]
        with open(folder / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["review", "sentiment"])
            w.writerows(rows)
        paths.append(folder / name)
    return paths[0], paths[1]


TICKETS = {"billing": ["invoice", "charge", "refund", "payment"], "shipping": ["parcel", "courier", "delivery", "late"],
           "login": ["password", "account", "locked", "reset"]}


def write_tickets(folder: Path, n_per_class: int = 30) -> tuple[Path, Path]:
    """train.parquet and test.parquet: support tickets in three classes of their own (``body``, ``queue``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for split, n in (("train", n_per_class), ("test", n_per_class // 2)):
        body, queue = [], []
        for q, words in TICKETS.items():
            for i in range(n):
                body.append(f"ticket {i} about my {words[i % 4]} and the {words[(i + 1) % 4]} please help")
                queue.append(q)
        pq.write_table(pa.table({"body": body, "queue": queue, "id": list(range(len(body)))}),
                       folder / f"{split}.parquet")
        out.append(folder / f"{split}.parquet")
    return out[0], out[1]
