"""The downstream table: means and 95% t intervals over seeds against hand-computed values."""

import math

from megatron_ddk.evaluation.downstream_report import downstream_table, render_markdown


def _res(ppl, acc):
    return {"metrics": {"ddk_ppl_code": {"token_perplexity": ppl},
                        "ddk_mc_code": {"acc": acc, "acc_norm": acc}}}


def test_arm_by_seed_means_and_intervals():
    results = {"KD@1": _res(10.0, 0.5), "KD@2": _res(12.0, 0.7), "KD@3": _res(14.0, 0.6),
               "DDK@1": _res(9.0, 0.8), "teacher": _res(5.0, 0.9)}
    table = downstream_table(results)
    assert table["arms"] == ["KD", "DDK", "teacher"]
    row = next(r for r in table["rows"] if r["metric"] == "token_perplexity")
    kd = row["cells"]["KD"]
    # mean 12, sd 2, t(0.975, 2) = 4.303: half width 4.303 * 2 / sqrt(3)
    assert kd["mean"] == 12.0 and math.isclose(kd["half_width"], 4.303 * 2 / math.sqrt(3))
    assert row["cells"]["DDK"]["half_width"] is None and row["cells"]["teacher"]["mean"] == 5.0
    md = render_markdown(table)
    assert "| ddk_ppl_code | token_perplexity | 12 ± 4.97 (n=3) | 9 | 5 |" in md
