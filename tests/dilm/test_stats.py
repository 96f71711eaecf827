"""dilm.stats against cases worked by hand (t quantiles from a printed table, 4 decimals), and its one shape."""

import math

import pytest

from dilm.stats import excludes_zero, paired_interval, summary, welch_interval


def test_paired_interval_by_hand():
    # differences 1..10: mean 5.5, sd √(82.5/9) = 3.0277, t(0.975, 9) = 2.2622 → half 2.2622 · 3.0277 / √10 = 2.1659
    ci = paired_interval([float(x) for x in range(1, 11)])
    assert ci["mean"] == 5.5 and ci["n"] == 10
    assert ci["lo"] == pytest.approx(5.5 - 2.1659, abs=1e-3) and ci["hi"] == pytest.approx(5.5 + 2.1659, abs=1e-3)
    ci = paired_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.3027 → half 2.4841
    assert ci["hi"] - 2.0 == pytest.approx(4.3027 / 3**0.5, abs=1e-4) and ci["mean"] - ci["lo"] == pytest.approx(
        ci["hi"] - ci["mean"])
    assert paired_interval([1.0, 3.0], level=0.9)["hi"] < paired_interval([1.0, 3.0])["hi"]


def test_welch_interval_by_hand():
    # equal sd and n: va = vb = 4/8 = 0.5, df = 1 / (2 · 0.25 / 7) = 14, t(0.975, 14) = 2.1448, se = 1 → ±2.1448
    ci = welch_interval({"mean": 5.0, "std": 2.0, "n": 8}, {"mean": 3.0, "std": 2.0, "n": 8})
    assert ci["mean"] == 2.0 and ci["n"] == 16
    assert ci["lo"] == pytest.approx(-0.1448, abs=1e-4) and ci["hi"] == pytest.approx(4.1448, abs=1e-4)
    assert not excludes_zero(ci) and excludes_zero({**ci, "lo": 0.1})
    same = welch_interval({"mean": 1.0, "std": 0.0, "n": 3}, {"mean": 0.0, "std": 0.0, "n": 3})
    assert same["lo"] == same["hi"] == 1.0  # no spread: the difference itself


def test_one_shape_and_no_interval_below_two_values():
    keys = {"mean", "lo", "hi", "n"}
    one = paired_interval([4.0])
    assert set(one) == keys and one["mean"] == 4.0 and one["lo"] is None and one["hi"] is None
    assert math.isnan(paired_interval([])["mean"])
    few = welch_interval(summary([1.0]), summary([2.0, 3.0]))
    assert set(few) == keys and few["mean"] == -1.5 and few["lo"] is None and not excludes_zero(few)
    assert summary([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3} and summary([7.0])["std"] == 0.0
