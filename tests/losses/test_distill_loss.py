"""DistillationLoss (Eq. 3) against a dense float64 formula, at TP = 1 and 2, in one 2-rank launch.

Checks: loss_sum / num_tokens = mean CE + gamma * mean KL over the masked tokens (Eq. 3; times
T^2 only with kl_t2_scaling); the gradient of loss_sum; the [sum, count] report; per-domain sums
(student CE, KL, and the teacher's CE of teacher_ce) against a per-domain dense computation and
against the totals, so TP = 2 equals TP = 1; CPT (no teacher); both logits layouts; and
Megatron-Core's own forward_step_calc_loss consuming the closure.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import pytest
import torch

from megatron_ddk.testing.multiproc import tp_groups

S, B, PADDED, VOCAB, DOMAINS = 6, 4, 16, 13, 4  # domain 3 gets no sample


@dataclass(frozen=True)
class Case:
    tp: int
    teacher: bool = True
    reverse: bool = False
    temperature: float = 1.0
    layout: str = "sbv"
    t2: bool = False

    @property
    def name(self) -> str:
        kind = ("rev" if self.reverse else "fwd") if self.teacher else "cpt"
        return f"tp{self.tp}-{kind}-T{self.temperature:g}-{self.layout}" + ("-T2" if self.t2
                                                                           else "")


CASES = [Case(tp, True, rev, t) for tp in (1, 2) for rev in (False, True) for t in (1.0, 2.0)]
CASES += [Case(tp, teacher=False) for tp in (1, 2)]
CASES += [Case(tp, reverse=True, temperature=2.0, layout="bsv") for tp in (1, 2)]
CASES += [Case(2, teacher=False, layout="bsv")]
CASES += [Case(tp, temperature=2.0, t2=True) for tp in (1, 2)]
GAMMA = 0.3


def _batch():
    g = torch.Generator().manual_seed(7)
    zs = torch.randn(S, B, PADDED, generator=g, dtype=torch.float64) * 2
    zt = torch.randn(S, B, PADDED, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, VOCAB, (B, S), generator=g)
    mask = (torch.rand(B, S, generator=g) > 0.3).float()
    labels[mask == 0] = -100  # ignored positions may hold anything; they must not leak NaN
    domain_id = torch.tensor([2, 0, 2, 1])
    return zs, zt, labels, mask, domain_id


def _dense(case: Case, zs, zt, labels, mask, domain_id):
    """Per-token CE and KL [b, s] in float64 on the unpadded vocabulary, written independently."""
    zs = zs.clone().requires_grad_()
    lsb = zs.transpose(0, 1)[..., :VOCAB]  # [b, s, v]
    ltb = zt.transpose(0, 1)[..., :VOCAB]
    log_p1 = torch.log_softmax(lsb, -1)
    ce = -log_p1.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    t = case.temperature
    lps, lpt = torch.log_softmax(lsb / t, -1), torch.log_softmax(ltb / t, -1)
    if case.reverse:
        kl = (lps.exp() * (lps - lpt)).sum(-1)
    else:
        kl = (lpt.exp() * (lpt - lps)).sum(-1)
    if not case.teacher:
        kl = torch.zeros_like(kl)
    m = mask.double()
    n = m.sum()
    kl_weight = GAMMA * (t * t if case.t2 else 1.0) if case.teacher else 0.0
    loss_sum = (ce * m).sum() + kl_weight * (kl * m).sum()
    loss_sum.backward()
    teacher_ce = -torch.log_softmax(ltb, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1))
    teacher_ce = teacher_ce.squeeze(-1)
    dom = {}
    for d in range(DOMAINS):
        sel = (domain_id == d).double().unsqueeze(1) * m
        dom[d] = ((ce * sel).sum().item(), (kl * sel).sum().item(), sel.sum().item(),
                  (teacher_ce * sel).sum().item())
    return {"loss_mean": (loss_sum / n).item(), "lm_mean": ((ce * m).sum() / n).item(),
            "kd_mean": ((kl * m).sum() / n).item(), "n": n.item(), "grad": zs.grad, "dom": dom}


def _run_case(case: Case, group, tp_rank: int):
    from megatron_ddk.losses import DistillationLoss

    zs, zt, labels, mask, domain_id = _batch()
    ref = _dense(case, zs, zt, labels, mask, domain_id)
    local = PADDED // case.tp
    cols = slice(tp_rank * local, (tp_rank + 1) * local)
    x = zs[..., cols].float().contiguous()
    y = zt[..., cols].float().contiguous()
    if case.layout == "bsv":
        x, y = x.transpose(0, 1).contiguous(), y.transpose(0, 1).contiguous()
    x.requires_grad_()
    loss = DistillationLoss(tp_group=group, num_domains=DOMAINS, vocab_size=VOCAB, gamma=GAMMA,
                            temperature=case.temperature, reverse=case.reverse, chunk_tokens=5,
                            logits_layout=case.layout, kl_t2_scaling=case.t2,
                            teacher_ce=True)
    fn = loss.loss_func(labels, mask, domain_id, y if case.teacher else None)
    loss_sum, num_tokens, report = fn(x)
    loss_sum.backward()
    grad = x.grad.double()
    if case.layout == "bsv":
        grad = grad.transpose(0, 1)
    rep = {k: v.double() for k, v in report.items()}
    dom_ce, dom_kl = rep["domain_lm_loss"], rep["domain_kd_loss"]
    out = {
        "loss_err": abs(loss_sum.item() / num_tokens.item() - ref["loss_mean"]),
        "n_ok": float(num_tokens.item() == ref["n"] and num_tokens.dtype == torch.int32),
        "grad_err": (grad - ref["grad"][..., cols]).abs().max().item(),
        "lm_err": abs((rep["lm_loss"][0] / rep["lm_loss"][1]).item() - ref["lm_mean"]),
        "kd_err": abs((rep["kd_loss"][0] / rep["kd_loss"][1]).item() - ref["kd_mean"]),
        "rep_loss_err": abs((rep["loss"][0] / rep["loss"][1]).item() - ref["loss_mean"]),
        "counts_ok": float(all(rep[k][1].item() == ref["n"] for k in ("lm_loss", "kd_loss",
                                                                        "loss"))),
        "dom_err": max(max(abs(dom_ce[0, d].item() - ref["dom"][d][0]),
                           abs(dom_kl[0, d].item() - ref["dom"][d][1]))
                       for d in range(DOMAINS)),
        "dom_counts_ok": float(all(dom_ce[1, d].item() == ref["dom"][d][2] ==
                                   dom_kl[1, d].item() for d in range(DOMAINS))),
        "dom_total_err": max(abs(dom_ce[0].sum() - rep["lm_loss"][0]).item(),
                             abs(dom_kl[0].sum() - rep["kd_loss"][0]).item(),
                             abs(dom_ce[1].sum() - rep["lm_loss"][1]).item()),
    }
    if case.teacher:  # teacher_ce: the teacher's per-domain CE sums, tokens as the student's
        dom_t = rep["domain_teacher_lm_loss"]
        out["teacher_ce_err"] = max(abs(dom_t[0, d].item() - ref["dom"][d][3])
                                    for d in range(DOMAINS))
        out["teacher_ce_counts_ok"] = float(torch.equal(dom_t[1], dom_ce[1]))
    else:
        out["teacher_ce_err"] = 0.0 if "domain_teacher_lm_loss" not in rep else 1.0
        out["teacher_ce_counts_ok"] = 1.0
    return out


def _megatron_schedule_check(group):
    """Megatron-Core's forward_step_calc_loss consumes the closure: per-token and averaged."""
    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss

    from megatron_ddk.losses import DistillationLoss

    zs, zt, labels, mask, domain_id = _batch()
    loss = DistillationLoss(tp_group=group, num_domains=DOMAINS, vocab_size=VOCAB)
    out = {}
    for per_token in (True, False):
        cfg = types.SimpleNamespace(calculate_per_token_loss=per_token, timers=None)
        fn = loss.loss_func(labels, mask, domain_id, zt.float())
        store = []
        value, n = forward_step_calc_loss(object(), zs.float(), fn, cfg, None, False, 2, store,
                                          cp_group_size=1, is_last_stage=True)
        rep = store[0]["loss"]
        expected = rep[0] if per_token else rep[0] / rep[1] / 2
        out[per_token] = abs(value.item() - expected.item()) + abs(n.item() - rep[1].item())
    return out


NUM_RANKS = 2
"""One launch of NUM_RANKS gloo ranks runs every case (tests/losses/conftest.py's results)."""


def rank_main(rank: int, world: int):
    groups = tp_groups(rank, world)
    results = {c.name: _run_case(c, groups[c.tp], rank % c.tp) for c in CASES}
    results["schedule"] = _megatron_schedule_check(groups[1])
    return results


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_distill_loss_matches_dense(results, case):
    for rank, per_rank in enumerate(results):
        r = per_rank[case.name]
        where = f"{case.name} rank {rank}: {r}"
        for key in ("loss_err", "lm_err", "kd_err", "rep_loss_err", "grad_err"):
            assert r[key] < 1e-5, where
        assert r["dom_err"] < 3e-5 and r["dom_total_err"] < 3e-5, where
        assert r["teacher_ce_err"] < 3e-5 and r["teacher_ce_counts_ok"] == 1.0, where
        assert r["n_ok"] == r["counts_ok"] == r["dom_counts_ok"] == 1.0, where


def test_megatron_schedule_contract(results):
    for per_rank in results:
        assert per_rank["schedule"][True] < 1e-5 and per_rank["schedule"][False] < 1e-5


def test_bad_arguments():
    from megatron_ddk.losses import DistillationLoss, distillation_loss_from_config

    with pytest.raises(ValueError, match="num_domains"):
        DistillationLoss(tp_group=object(), num_domains=0)
    with pytest.raises(ValueError, match="logits_layout"):
        DistillationLoss(tp_group=object(), num_domains=2, logits_layout="vbs")
    from megatron_ddk.config import DistillConfig

    cfg = DistillConfig(gamma=0.2, temperature=2.0, kl_direction="reverse", kl_chunk_tokens=64)
    built = distillation_loss_from_config(cfg, tp_group=object(), num_domains=3, vocab_size=10)
    assert (built.reverse, built.temperature, built.chunk_tokens, built.gamma) == (True, 2.0, 64,
                                                                                   0.2)
    assert not built.kl_t2_scaling and not built.teacher_ce  # Eq. 3 by default
    cfg.kl_t2_scaling = True
    assert distillation_loss_from_config(cfg, tp_group=object(), num_domains=3,
                                         teacher_ce=True).kl_t2_scaling
    loss = DistillationLoss(tp_group=object(), num_domains=2)
    with pytest.raises(ValueError, match="labels"):
        loss(torch.zeros(3, 2, 5), labels=torch.zeros(3, 2, dtype=torch.long),
             loss_mask=torch.ones(3, 2), domain_id=torch.zeros(3, dtype=torch.long))
