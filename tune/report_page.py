"""The sweep's one-page report: ``reports/<name>/report.html``, self-contained (styles inline, figures as ``data:``
URIs), so it opens from disk and can be sent as one file.

In order: the counts and the winner; the best trial beside the baselines arch by DPC (accuracy ± std over sets ×
seeds, the difference in points with its 95 % interval, as the console summary); the trials (the winner marked);
the figures (accuracy vs DPC per architecture with the baselines' curves, validation over steps, the optimization
history, parameter importances); the first texts per class of the winning sets; the copies of training and test
texts and the vocabulary rate. Built from the summary :mod:`tune.report` assembles, plus the best trial's sets.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

from dilm.files import atomic_write_text
from tune.plots import optimization_history, validation_curves
from tune.scores import OBJECTIVE, compared

TEXTS_PER_CLASS = 3
STYLE = """body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}
td,th{padding:3px 9px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
th{background:#f5f5f5}td.l,th.l{text-align:left}tr.best{background:#fff6d5;font-weight:600}
.sig{color:#0a7a2f}.figs img{max-width:48%;margin:4px;border:1px solid #eee}.muted{color:#777}
ul.texts li{margin:.2em 0}"""


def esc(value) -> str:
    return html.escape(str(value))


def _num(v, fmt: str = "{:.1f}") -> str:
    return "" if v is None else fmt.format(v)


def table(header: list[str], rows: list[list[str]], classes: list[str] | None = None, left: int = 1) -> str:
    """An HTML table of already-escaped cells; the first ``left`` columns aligned left; ``classes`` per row."""
    def cells(tag, values):
        return "".join(f"<{tag}{' class=l' if i < left else ''}>{v}</{tag}>" for i, v in enumerate(values))
    body = "".join(f"<tr{f' class={c}' if c else ''}>{cells('td', r)}</tr>"
                   for r, c in zip(rows, classes or [""] * len(rows)))
    return f"<table><tr>{cells('th', header)}</tr>{body}</table>"


def difference(row: dict, name: str) -> str:
    """``+4.1 [+1.2, +7.0]``, green when the interval excludes 0."""
    if f"vs_{name}" not in row:
        return ""
    text = f"{row['vs_' + name]:+.1f}"
    if f"vs_{name}_lo" in row:
        lo, hi = row[f"vs_{name}_lo"], row[f"vs_{name}_hi"]
        text += f" [{lo:+.1f}, {hi:+.1f}]"
        if lo > 0 or hi < 0:
            return f"<span class=sig>{text}</span>"
    return text


def comparison_table(rows: list[dict]) -> str:
    names = compared(rows)
    header = ["arch", "DPC", "best trial (n)"] + [h for n in names for h in (esc(n), f"best − {esc(n)} [95% CI]")]
    body = [[esc(r["arch"]), str(r["dpc"]), f"{r['best']:.1f} ± {r['best_std']:.1f} ({r['best_n']})"]
            + [c for n in names for c in ((f"{r[n]:.1f} ± {r[n + '_std']:.1f}" if n in r else ""), difference(r, n))]
            for r in rows]
    return table(header, body)


def trials_table(summary: dict) -> str:
    rows = summary["rows"]
    params = list(dict.fromkeys(k for r in rows for k in r if k not in ("number", "ray_trial_id", "state", OBJECTIVE)))
    best = (summary.get("best") or {}).get("ray_trial_id")
    body = [[("★ " if r["ray_trial_id"] == best else "") + esc(r["ray_trial_id"]), esc(r["state"]),
             _num(r[OBJECTIVE], "{:.2f}"), *(esc(f"{r[p]:.3g}" if isinstance(r.get(p), float) else r.get(p, ""))
                                             for p in params)] for r in rows]
    return table(["trial", "state", OBJECTIVE, *map(esc, params)], body,
                 ["best" if r["ray_trial_id"] == best else "" for r in rows], left=2)


def image(path: str | Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{esc(Path(path).stem)}" src="data:image/png;base64,{data}">'


def figures(summary: dict, out: Path) -> list[Path]:
    """The figures of the page: the accuracy-vs-DPC plots and importances already drawn, validation over steps and
    the optimization history drawn here (into ``out``)."""
    name = summary["name"]
    paths = [Path(p) for p in summary.get("plots", [])]
    curves = {k: v for k, v in summary.get("val_curves", {}).items() if v}
    if curves:
        paths.append(validation_curves(curves, out / "validation_over_steps.png", f"{name}: validation accuracy"))
    history = [(r["number"], r[OBJECTIVE]) for r in summary["rows"] if r[OBJECTIVE] is not None]
    if history:
        paths.append(optimization_history(history, out / "optimization_history.png", f"{name}: objective"))
    if (out / "param_importances.png").exists() and summary.get("importances"):
        paths.append(out / "param_importances.png")
    return paths


def first_texts(sets_dir: Path, per_class: int = TEXTS_PER_CLASS) -> str:
    """The first ``per_class`` texts of each class in the first set of every DPC (``sets/dpc<d>/set00.jsonl``)."""
    parts = []
    for f in sorted(sets_dir.glob("dpc*/*.jsonl"), key=lambda p: (int(p.parent.name[3:]), p.name)):
        if any(f.parent.name in p for p in parts):
            continue  # the first set of each DPC only
        by_label: dict[str, list[str]] = {}
        for line in f.read_text().splitlines():
            row = json.loads(line)
            text = row["text"] + (f" ⟂ {row['text_pair']}" if row.get("text_pair") else "")
            by_label.setdefault(str(row["label"]), []).append(text)
        items = "".join(f"<li><b>{esc(label)}</b>: " + " · ".join(f"“{esc(t)}”" for t in texts[:per_class]) + "</li>"
                        for label, texts in by_label.items())
        parts.append(f"<h3>{f.parent.name} <span class=muted>({esc(f.name)})</span></h3><ul class=texts>{items}</ul>")
    return "".join(parts) or "<p class=muted>no sets found</p>"


def copies_table(copies: dict) -> str:
    body = [[esc(name), d, *(f"{100 * r[split][k]:.1f}" for split in ("train", "test")
                             for k in ("exact_share", "near_share"))]
            for name, by_dpc in copies.items() for d, r in sorted(by_dpc.items(), key=lambda kv: int(kv[0]))]
    return table(["sets", "DPC", "train exact %", "train near %", "test exact %", "test near %"], body) if body else ""


def render(summary: dict, sets_dir: Path | None, out: Path) -> str:
    s, best = summary, summary.get("best")
    head = [f"<h1>Sweep {esc(s['name'])}</h1>", f"<p>{s['complete']} complete, {s['pruned']} stopped early (ASHA), "
            f"{s['failed']} failed{'' if s['finished'] else ' — interrupted: continue with --resume'}. "
            f"<span class=muted>{time.strftime('%Y-%m-%d %H:%M')}, storage {esc(s['storage'])}</span></p>"]
    if best:
        head.append(f"<p><b>Best trial ★ {esc(best['ray_trial_id'])}</b>: objective <b>{best[OBJECTIVE]:.2f}</b> "
                    "(mean test accuracy %, over the objective's architectures and the DPCs)</p>")
    body = []
    if s.get("baselines"):
        body += ["<h2>Best trial vs baselines</h2>", "<p class=muted>accuracy % ± std over sets × seeds (n); the "
                 "difference in points with its 95 % Welch interval, green when it excludes 0</p>",
                 comparison_table(s["baselines"])]
    body += ["<h2>Trials</h2>", trials_table(s)]
    images = [image(p) for p in figures(s, out) if p.exists()]
    if images:
        body += ["<h2>Figures</h2>", f"<div class=figs>{''.join(images)}</div>"]
    if best and sets_dir is not None:
        body += ["<h2>The winning sets: first texts per class</h2>", first_texts(sets_dir)]
    if s.get("vocab_rate") or any(s.get("copies", {}).values()):
        body.append("<h2>Copies and vocabulary</h2>")
        if any(s.get("copies", {}).values()):
            body += ["<p class=muted>share of the sets' texts that are exact or near copies (≥ 80 % of word 4-grams "
                     "shared with one text) of training and of test texts</p>", copies_table(s["copies"])]
        if s.get("vocab_rate"):
            body.append("<p>words found in the training vocabulary: " + ", ".join(
                f"{esc(k)} {v:.1f} %" for k, v in s["vocab_rate"].items()) + " (target ≥ 95 %)</p>")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>dilm sweep {esc(s['name'])}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(head + body)}</body></html>")


def write_report(summary: dict, sets_dir: Path | None, out: Path) -> Path:
    """Write ``out/report.html`` (figures it draws go beside it); ``sets_dir``: the best trial's ``sets/``."""
    page = out / "report.html"
    atomic_write_text(page, render(summary, sets_dir, out))
    return page
