"""Seed statistics: the t quantile, intervals worked by hand, paired differences, edge cases."""

from __future__ import annotations

import math

import pytest

from sclseg.stats import describe, interval_verdict, paired_difference, t_cdf, t_quantile

# t_{0.975, df} from printed Student-t tables (df = 1, 2, 4, 9, 30)
T975 = {1: 12.706205, 2: 4.302653, 4: 2.776445, 9: 2.262157, 30: 2.042272}


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_the_printed_table(df) -> None:
    assert t_quantile(0.975, df) == pytest.approx(T975[df], abs=1e-6)
    assert t_quantile(0.025, df) == pytest.approx(-T975[df], abs=1e-6)
    assert t_cdf(T975[df], df) == pytest.approx(0.975, abs=1e-7)


def test_t_cdf_closed_forms() -> None:
    # df=1 is the Cauchy distribution: 1/2 + atan(x)/pi; df=2: 1/2 + x / (2 sqrt(2 + x^2))
    for x in (-3.0, -0.4, 0.0, 0.7, 5.0):
        assert t_cdf(x, 1) == pytest.approx(0.5 + math.atan(x) / math.pi, abs=1e-15)
        assert t_cdf(x, 2) == pytest.approx(0.5 + x / (2 * math.sqrt(2 + x * x)), abs=1e-15)


def test_t_quantile_agrees_with_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in (3, 5, 6, 7, 8, 15, 49, 100):
        for p in (0.9, 0.95, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-10)


def test_paired_interval_worked_by_hand() -> None:
    # differences 1, 2, 3, 4, 5: mean 3; squared deviations 4+1+0+1+4 = 10, sd = sqrt(10/4) = sqrt(2.5)
    # = 1.5811388; half-width t_{0.975,4} * sd / sqrt(5) = 2.776445 * 0.7071068 = 1.9632431
    a = {"0": 11.0, "1": 22.0, "2": 33.0, "3": 44.0, "4": 55.0}
    b = {"0": 10.0, "1": 20.0, "2": 30.0, "3": 40.0, "4": 50.0}
    d = paired_difference(a, b)
    assert d["per_seed"] == {"0": 1.0, "1": 2.0, "2": 3.0, "3": 4.0, "4": 5.0}
    assert d["n"] == 5 and d["mean"] == pytest.approx(3.0)
    assert d["std"] == pytest.approx(math.sqrt(2.5))
    assert d["ci95"] == pytest.approx([3 - 1.9632431, 3 + 1.9632431], abs=1e-6)
    assert d["contains_zero"] is False and interval_verdict(d) == "interval excludes 0"


def test_paired_uses_only_the_shared_seeds_and_says_when_zero_is_inside() -> None:
    # shared seeds 0, 1: differences +1, -3 -> mean -1, sd = sqrt(8) = 2.8284271,
    # half-width 12.706205 * 2.8284271 / sqrt(2) = 12.706205 * 2 = 25.41241
    d = paired_difference({"0": 5.0, "1": 1.0, "7": 9.0}, {"0": 4.0, "1": 4.0, "3": 0.0})
    assert d["per_seed"] == {"0": 1.0, "1": -3.0} and d["n"] == 2
    assert d["ci95"] == pytest.approx([-1 - 25.41241, -1 + 25.41241], abs=1e-5)
    assert d["contains_zero"] is True and "inside the seed noise" in interval_verdict(d)


def test_one_seed_has_no_interval() -> None:
    d = paired_difference({"0": 3.5}, {"0": 1.0})
    assert d["mean"] == 2.5 and d["n"] == 1 and d["std"] is None and d["ci95"] is None
    assert d["contains_zero"] is None and interval_verdict(d) == "one seed: no interval"
    assert describe([42.0]) == {"mean": 42.0, "std": None, "ci95": None, "n": 1}


def test_a_constant_difference_has_a_zero_width_interval() -> None:
    d = paired_difference({"0": 3.0, "1": 7.0, "2": 5.0}, {"0": 1.0, "1": 5.0, "2": 3.0})
    assert d["mean"] == 2.0 and d["std"] == 0.0 and d["ci95"] == [2.0, 2.0] and d["contains_zero"] is False


def test_describe_per_method() -> None:
    # 50, 52, 57: mean 53, deviations -3, -1, 4 -> sd = sqrt(26/2) = sqrt(13) = 3.6055513;
    # half-width 4.302653 * 3.6055513 / sqrt(3) = 8.956686
    r = describe([50.0, 52.0, 57.0])
    assert r["mean"] == pytest.approx(53.0) and r["std"] == pytest.approx(math.sqrt(13)) and r["n"] == 3
    assert r["ci95"] == pytest.approx([53 - 8.956686, 53 + 8.956686], abs=1e-5)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="share no seed"):
        paired_difference({"0": 1.0}, {"1": 1.0})
    with pytest.raises(ValueError, match="no values"):
        describe([])
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_cdf(1.0, 0)
