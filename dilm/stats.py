"""The intervals that comparisons are reported with: one shape for all of them.

A **summary** of a sample is ``{"mean", "std", "n"}`` (:func:`summary`; the sample standard deviation, 0 for one
value). An **interval** is ``{"mean", "lo", "hi", "n"}``: a difference (or a mean) and the ends of its two-sided
``level`` Student-t interval, ``lo`` and ``hi`` None where there is no interval (fewer than 2 values on a side), and
``n`` the values behind it:

* :func:`paired_interval` — the mean of paired differences (set k of one method with set k of another), the pairs
  treated as independent: mean ± t(1 − α/2, n − 1) · sd / √n;
* :func:`welch_interval` — the difference of the means of two independent samples given by their summaries, with
  Welch–Satterthwaite's degrees of freedom: (a − b) ± t(1 − α/2, df) · √(sa²/na + sb²/nb); ``n`` = na + nb.

Used by the sweep's summary (:mod:`tune.scores`), the soft-label controls and every bench.
"""

from __future__ import annotations

import math
import statistics

import numpy as np


def summary(xs: list[float]) -> dict:
    """``{"mean", "std", "n"}`` of ``xs`` (the sample standard deviation; 0 for one value)."""
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def _interval(mean: float, half: float | None, n: int) -> dict:
    return {"mean": mean, "lo": None if half is None else mean - half, "hi": None if half is None else mean + half,
            "n": n}


def paired_interval(diffs: list[float], level: float = 0.95) -> dict:
    """The mean of paired differences ``diffs`` with its Student-t ``level`` interval → ``{mean, lo, hi, n}``."""
    from scipy import stats  # here: scipy takes a while to import, and most importers never need a quantile

    x = np.asarray(diffs, dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        return _interval(mean, None, n)
    return _interval(mean, float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n)), n)


def welch_interval(a: dict, b: dict, level: float = 0.95) -> dict:
    """Mean ``a`` − mean ``b`` of two independent samples given as summaries (``{"mean", "std", "n"}``), with Welch's
    ``level`` interval → ``{mean, lo, hi, n}`` (``n`` = na + nb; no interval when either has fewer than 2)."""
    from scipy import stats

    na, nb, diff = a["n"], b["n"], a["mean"] - b["mean"]
    if na < 2 or nb < 2:
        return _interval(diff, None, na + nb)
    va, vb = a["std"] ** 2 / na, b["std"] ** 2 / nb
    if va + vb == 0:
        return _interval(diff, 0.0, na + nb)
    df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))  # Welch–Satterthwaite
    return _interval(diff, float(stats.t.ppf(0.5 + level / 2, df)) * (va + vb) ** 0.5, na + nb)


def excludes_zero(ci: dict) -> bool:
    """Whether an interval lies wholly above or below 0 (False where there is none)."""
    return ci["lo"] is not None and (ci["lo"] > 0 or ci["hi"] < 0)


def format_interval(ci: dict, digits: int = 1) -> str:
    """``+4.1 [+1.2, +7.0]``: the difference and its interval (``+4.1 (no interval)`` where there is none)."""
    if ci["lo"] is None:
        return f"{ci['mean']:+.{digits}f} (no interval)"
    return f"{ci['mean']:+.{digits}f} [{ci['lo']:+.{digits}f}, {ci['hi']:+.{digits}f}]"
