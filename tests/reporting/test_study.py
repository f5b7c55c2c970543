"""Study statistics against hand-computed values and textbook t quantiles."""

import math

import pytest

from megatron_ddk.reporting.study import (
    interval_verdict,
    mean_interval,
    split_column,
    summarize,
    t_critical,
)


def test_t_critical_known_values():
    assert t_critical(1) == pytest.approx(12.706, abs=1e-3)
    assert t_critical(2) == pytest.approx(4.303, abs=1e-3)
    assert t_critical(4) == pytest.approx(2.776, abs=1e-3)
    assert t_critical(40) == pytest.approx(2.021, abs=2e-3)
    assert t_critical(120) == pytest.approx(1.980, abs=2e-3)
    with pytest.raises(ValueError):
        t_critical(0)


def test_mean_interval_by_hand():
    stat = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    sd = math.sqrt(2.5)
    assert stat["mean"] == 3.0
    assert stat["half_width"] == pytest.approx(2.776 * sd / math.sqrt(5), rel=1e-4)
    assert mean_interval([7.0])["half_width"] is None


def test_split_column():
    assert split_column("DDK@1234") == ("DDK", 1234)
    assert split_column("DDK_train@7") == ("DDK_train", 7)
    assert split_column("teacher") == ("teacher", None)
    assert split_column("a@b") == ("a@b", None)


def _table():
    domains = ["x", "y"]
    cols = {"teacher": (10.0, 20.0), "DDK@1": (12.0, 30.0), "DDK@2": (13.0, 28.0),
            "KD@1": (12.5, 31.0), "KD@2": (13.5, 30.0)}
    table = {"domains": domains, "columns": list(cols), "ppl": {}, "pooled_ppl": {}}
    for c, (a, b) in cols.items():
        table["ppl"][c] = {"x": a, "y": b}
        table["pooled_ppl"][c] = math.sqrt(a * b)  # equal token counts: geometric mean
    return table


def test_summarize_paired_differences_and_worst_ratio():
    s = summarize(_table())
    ddk = s["arms"]["DDK"]["metrics"]
    assert ddk["worst_ratio"]["values"] == [1.5, 1.4]  # y: 30/20, 28/20
    diff = s["differences"]["DDK-KD"]["metrics"]
    # paired per seed: x: -0.5, -0.5 ; y: -1, -2
    assert diff["ppl/x"]["values"] == [-0.5, -0.5]
    assert diff["ppl/x"]["half_width"] == 0.0
    assert diff["ppl/y"]["mean"] == -1.5
    assert diff["ppl/y"]["half_width"] == pytest.approx(12.706 * math.sqrt(0.5) / math.sqrt(2),
                                                        rel=1e-4)
    assert "DDK-ES" not in s["differences"]
    assert interval_verdict(diff["ppl/x"]) == "lower (interval below 0)"
    assert interval_verdict(diff["ppl/y"]) == "no difference resolved (interval contains 0)"
