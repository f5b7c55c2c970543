"""Domain-averaged perplexity and per-domain paired differences against hand computations.

Hand values use the textbook quantiles t(0.975, 2) = 4.303 and t(0.975, 4) = 2.776; every
interval is mean +- t * s / sqrt(n) with s the sample standard deviation (n - 1 in the
denominator), worked out in the comments.
"""

import json
import math

import pytest

from megatron_ddk.reporting.study import interval_verdict, study_markdown, summarize
from megatron_ddk.reporting.study_report import PAIRS, study_section

T2, T4 = 4.303, 2.776


def _table(cols, domains):
    """A ppl table as report.ppl_table writes it, equal test tokens per domain (so pooled is
    the geometric mean of the domain perplexities)."""
    table = {"domains": list(domains), "columns": list(cols), "ppl": {}, "pooled_ppl": {}}
    for col, ppls in cols.items():
        table["ppl"][col] = dict(zip(domains, ppls))
        table["pooled_ppl"][col] = math.exp(sum(math.log(p) for p in ppls) / len(ppls))
    return table


def _three_seeds():
    # DDK - KD per seed:  a: -1, -1, -1.5   b: -1, 1, -2   c: 0, -2, 2
    return _table({"teacher": (9.0, 15.0, 25.0),
                   "DDK@1": (10.0, 20.0, 30.0), "DDK@2": (11.0, 22.0, 27.0),
                   "DDK@3": (12.0, 18.0, 33.0),
                   "KD@1": (11.0, 21.0, 30.0), "KD@2": (12.0, 21.0, 29.0),
                   "KD@3": (13.5, 20.0, 31.0),
                   "CPT@1": (12.0, 22.0, 31.0), "CPT@2": (12.0, 23.0, 30.0),
                   "CPT@3": (14.0, 21.0, 32.0)}, ["a", "b", "c"])


def test_domain_averaged_ppl_per_arm_by_hand():
    s = summarize(_three_seeds())
    ddk = s["arms"]["DDK"]["metrics"]
    # arithmetic means over domains: 60/3, 60/3, 63/3
    assert ddk["domain_avg_ppl"]["values"] == pytest.approx([20.0, 20.0, 21.0])
    assert ddk["domain_avg_ppl"]["mean"] == pytest.approx(61 / 3)
    # deviations -1/3, -1/3, 2/3: s^2 = (1/9 + 1/9 + 4/9) / 2 = 1/3
    assert ddk["domain_avg_ppl"]["half_width"] == pytest.approx(
        T2 * math.sqrt(1 / 3) / math.sqrt(3), rel=1e-4)
    # pooled is the table's (geometric mean here), unchanged, and below the arithmetic mean
    assert ddk["pooled_ppl"]["values"][0] == pytest.approx((10 * 20 * 30) ** (1 / 3))
    for v_pooled, v_avg in zip(ddk["pooled_ppl"]["values"], ddk["domain_avg_ppl"]["values"]):
        assert v_pooled < v_avg


def test_per_domain_paired_differences_three_seeds():
    d = summarize(_three_seeds())["differences"]["DDK-KD"]
    m, verdicts = d["metrics"], d["verdicts"]
    assert d["seeds"] == [1, 2, 3]
    # a: mean -7/6; deviations 1/6, 1/6, -1/3 -> s^2 = (6/36) / 2 = 1/12; excludes 0
    assert m["ppl/a"]["mean"] == pytest.approx(-7 / 6)
    assert m["ppl/a"]["half_width"] == pytest.approx(T2 * math.sqrt(1 / 12) / math.sqrt(3),
                                                     rel=1e-4)
    assert m["ppl/a"]["high"] < 0 and verdicts["ppl/a"] == "lower (interval below 0)"
    # b: mean -2/3; deviations -1/3, 5/3, -4/3 -> s^2 = (42/9) / 2 = 7/3; contains 0
    assert m["ppl/b"]["mean"] == pytest.approx(-2 / 3)
    assert m["ppl/b"]["half_width"] == pytest.approx(T2 * math.sqrt(7 / 3) / math.sqrt(3),
                                                     rel=1e-4)
    assert verdicts["ppl/b"] == "no difference resolved (interval contains 0)"
    # c: 0, -2, 2 -> mean 0, s = 2
    assert m["ppl/c"]["mean"] == pytest.approx(0.0)
    assert m["ppl/c"]["half_width"] == pytest.approx(T2 * 2 / math.sqrt(3), rel=1e-4)
    # domain-averaged: per seed the mean of the domain differences: -2/3, -2/3, -1/2
    assert m["domain_avg_ppl"]["values"] == pytest.approx([-2 / 3, -2 / 3, -0.5])
    assert m["domain_avg_ppl"]["mean"] == pytest.approx(-11 / 18)
    # deviations -1/18, -1/18, 2/18 -> s^2 = (6/324) / 2 = 1/108; interval [-0.850, -0.372]
    assert m["domain_avg_ppl"]["half_width"] == pytest.approx(
        T2 * math.sqrt(1 / 108) / math.sqrt(3), rel=1e-4)
    assert verdicts["domain_avg_ppl"] == "lower (interval below 0)"
    assert verdicts == {k: interval_verdict(v) for k, v in m.items()}


def test_five_seeds_two_domains():
    x_ddk, y_ddk = [10.0, 10.0, 10.0, 10.0, 10.0], [20.0, 20.0, 20.0, 20.0, 20.0]
    dx, dy = [-1.0, -2.0, -3.0, -4.0, -5.0], [1.0, -1.0, 2.0, -2.0, 0.0]
    cols = {}
    for i in range(5):
        cols[f"DDK@{i}"] = (x_ddk[i], y_ddk[i])
        cols[f"ES@{i}"] = (x_ddk[i] - dx[i], y_ddk[i] - dy[i])
    m = summarize(_table(cols, ["x", "y"]))["differences"]["DDK-ES"]["metrics"]
    # x: mean -3, s^2 = (4 + 1 + 0 + 1 + 4) / 4 = 2.5 -> [-4.96, -1.04], excludes 0
    assert m["ppl/x"]["mean"] == pytest.approx(-3.0)
    assert m["ppl/x"]["half_width"] == pytest.approx(T4 * math.sqrt(2.5) / math.sqrt(5), rel=1e-4)
    assert interval_verdict(m["ppl/x"]) == "lower (interval below 0)"
    # y: mean 0, s^2 = 10 / 4 = 2.5: contains 0
    assert m["ppl/y"]["half_width"] == pytest.approx(T4 * math.sqrt(2.5) / math.sqrt(5), rel=1e-4)
    assert interval_verdict(m["ppl/y"]).startswith("no difference")
    # domain-averaged, (dx + dy) / 2: 0, -1.5, -0.5, -3, -2.5 -> mean -1.5,
    # deviations 1.5, 0, 1, -1.5, -1 -> s^2 = 6.5 / 4 = 1.625
    assert m["domain_avg_ppl"]["mean"] == pytest.approx(-1.5)
    assert m["domain_avg_ppl"]["half_width"] == pytest.approx(
        T4 * math.sqrt(1.625) / math.sqrt(5), rel=1e-4)
    # [-3.083, +0.083]: contains 0 although domain x alone is resolved
    assert m["domain_avg_ppl"]["high"] == pytest.approx(0.0826, abs=1e-3)
    assert interval_verdict(m["domain_avg_ppl"]).startswith("no difference")


def test_markdown_marks_intervals_that_exclude_zero():
    text = "\n".join(study_markdown(summarize(_three_seeds(), pairs=PAIRS)))
    assert "domain-averaged test ppl" in text
    half_a = T2 * math.sqrt(1 / 12) / math.sqrt(3)
    half_b = T2 * math.sqrt(7 / 3) / math.sqrt(3)
    half_avg = T2 * math.sqrt(1 / 108) / math.sqrt(3)
    per_domain = text.split("Paired differences per domain")[1]
    row = next(line for line in per_domain.splitlines() if line.startswith("| DDK-KD | 3 | "))
    assert f"**{-7 / 6:.2f} ± {half_a:.2f}**" in row
    assert f"**{-11 / 18:.2f} ± {half_avg:.2f}**" in row
    assert f"| {-2 / 3:.2f} ± {half_b:.2f} |" in row  # not bold
    assert "| difference | seeds | pooled | domain-averaged | a | b | c |" in text
    assert "DDK lower (interval below 0)" in text
    # two pairs present (DDK-KD, KD-CPT) x 3 domains
    assert "6 per-domain intervals: if no arm differed, about 0.3" in text


def test_missing_arms_are_skipped():
    s = summarize(_three_seeds(), pairs=PAIRS)
    assert set(s["differences"]) == {"DDK-KD", "KD-CPT"}
    table = _three_seeds()
    table["columns"] = [c for c in table["columns"] if not c.startswith("KD@")]
    s = summarize(table, pairs=PAIRS)
    assert s["differences"] == {}
    assert "Paired differences" not in "\n".join(study_markdown(s))


def test_one_seed_has_no_interval_and_says_so():
    s = summarize(_table({"DDK@7": (10.0, 20.0), "KD@7": (11.0, 19.0)}, ["x", "y"]))
    d = s["differences"]["DDK-KD"]
    assert d["metrics"]["domain_avg_ppl"]["mean"] == pytest.approx(0.0)
    assert d["metrics"]["ppl/x"]["half_width"] is None
    assert set(d["verdicts"].values()) == {"one seed: no interval"}
    text = "\n".join(study_markdown(s))
    assert "With one seed no interval exists" in text
    assert "Pairs sharing one seed have no interval" in text
    assert "by chance" not in text  # no interval, no multiple-comparisons count
    assert "**" not in text.split("Paired differences per domain")[1].split("\n", 1)[1]


def test_study_section_json_carries_domain_statistics(tmp_path):
    part, lines = study_section(_three_seeds(), [], str(tmp_path))
    back = json.loads(json.dumps(part))
    diff = back["study"]["differences"]["DDK-KD"]
    assert set(diff["metrics"]) == {"pooled_ppl", "domain_avg_ppl", "ppl/a", "ppl/b", "ppl/c"}
    assert diff["verdicts"]["ppl/a"] == "lower (interval below 0)"
    assert "domain_avg_ppl" in back["study"]["arms"]["CPT"]["metrics"]
    assert any("Paired differences per domain" in line for line in lines)
