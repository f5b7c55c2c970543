"""Top-K KL (losses/topk_kl.py) against dense float64 references written here, at TP = 1 and 2.

One 2-rank gloo launch runs every case: the WORLD group is TP=2, each rank alone is TP=1. Each
rank builds the same full-vocabulary logits, keeps its shard, and compares value and gradient with
- K = vocabulary: the dense KL(p_T || p_S) from torch.log_softmax in float64 (must agree to 1e-6);
- K < vocabulary: the KL of both distributions coarsened to the K ids plus one "rest" outcome,
  written here in float64 from the full softmaxes (autograd gives the gradient);
and vocab_parallel_topk against torch.topk of the dense float64 log-softmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import pytest
import torch
import torch.nn.functional as F

from megatron_ddk.testing.multiproc import tp_groups

S, B, PADDED, VOCAB = 5, 3, 24, 21  # 15 tokens; 24 columns = 12 x 2 shards; 3 padded


@dataclass(frozen=True)
class Case:
    k: int
    tp: int
    temperature: float = 1.0
    with_ce: bool = True
    chunk: int = 4  # does not divide 15 tokens
    bf16: bool = False

    @property
    def name(self) -> str:
        return (f"K{self.k}-tp{self.tp}-T{self.temperature:g}-{'ce' if self.with_ce else 'kl'}"
                f"-c{self.chunk}{'-bf16' if self.bf16 else ''}")


CASES = [c for tp in (1, 2) for c in (
    Case(VOCAB, tp), Case(VOCAB, tp, with_ce=False), Case(VOCAB, tp, temperature=2.0),
    Case(VOCAB, tp, temperature=0.5, with_ce=False, chunk=1024),
    Case(5, tp), Case(5, tp, temperature=2.0), Case(1, tp, with_ce=False, chunk=1),
    Case(12, tp, temperature=2.0, bf16=True))]


def _inputs(case: Case):
    g = torch.Generator().manual_seed(4321)
    zs = torch.randn(S, B, PADDED, generator=g, dtype=torch.float64) * 2
    zt = torch.randn(S, B, PADDED, generator=g, dtype=torch.float64) * 2 + 0.5
    zs[..., VOCAB:] = 40.0  # padding must not leak into the softmax
    zt[..., VOCAB:] = 40.0
    labels = torch.randint(0, VOCAB, (S, B), generator=g)
    w_kl = torch.rand(S, B, generator=g, dtype=torch.float64) + 0.5
    w_ce = torch.rand(S, B, generator=g, dtype=torch.float64) + 0.5
    if case.bf16:
        zs = zs.bfloat16().double()
    return zs, zt, labels, w_kl, w_ce


def _teacher_topk(zt, k, t):
    """Dense float64 teacher top-K: ids, log-probabilities, log of the rest's mass."""
    log_pt = torch.log_softmax(zt[..., :VOCAB] / t, dim=-1)
    logp, ids = log_pt.topk(k, dim=-1)
    rest = log_pt.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, logp, rest


def _reference(case: Case, zs, zt, labels, w_kl, w_ce):
    """Independent float64 reference of the value and the gradient (autograd)."""
    t, k = case.temperature, case.k
    zs = zs.clone().requires_grad_()
    ids, logp, rest = _teacher_topk(zt, k, t)
    log_ps = torch.log_softmax(zs[..., :VOCAB] / t, dim=-1)
    if k == VOCAB:  # the plain dense KL
        log_pt = torch.log_softmax(zt[..., :VOCAB] / t, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    else:  # both distributions coarsened to K + 1 outcomes
        log_qk = log_ps.gather(-1, ids)
        log_qrest = torch.log1p(-log_qk.exp().sum(-1))
        kl = (logp.exp() * (logp - log_qk)).sum(-1) + rest.exp() * (rest - log_qrest)
    ce = F.cross_entropy(zs[..., :VOCAB].reshape(-1, VOCAB), labels.reshape(-1),
                         reduction="none").view(S, B)
    total = (kl * w_kl).sum() + ((ce * w_ce).sum() if case.with_ce else 0.0)
    total.backward()
    return kl.detach(), ce.detach(), zs.grad, (ids, logp, rest)


def _run_case(case: Case, group, tp_rank: int) -> Dict[str, float]:
    from megatron_ddk.losses.topk_kl import vocab_parallel_ce_and_topk_kl

    zs, zt, labels, w_kl, w_ce = _inputs(case)
    ref_kl, ref_ce, ref_grad, (ids, logp, rest) = _reference(case, zs, zt, labels, w_kl, w_ce)
    local = PADDED // case.tp
    cols = slice(tp_rank * local, (tp_rank + 1) * local)
    x = zs[..., cols].to(torch.bfloat16 if case.bf16 else torch.float32).contiguous()
    x.requires_grad_()
    ce, kl = vocab_parallel_ce_and_topk_kl(
        x, ids.int(), logp.float(), rest.float(), labels if case.with_ce else None,
        tp_group=group, temperature=case.temperature, vocab_size=VOCAB, chunk_tokens=case.chunk)
    total = (kl * w_kl.float()).sum() + ((ce * w_ce.float()).sum() if case.with_ce else 0.0)
    total.backward()
    grad = x.grad.double()
    pad_from = max(0, VOCAB - tp_rank * local)
    out = {"kl_err": (kl.double() - ref_kl).abs().max().item(),
           "kl_scale": ref_kl.abs().max().item(),
           "grad_err": (grad - ref_grad[..., cols]).abs().max().item(),
           "grad_scale": ref_grad.abs().max().item(),
           "pad_grad": grad[..., pad_from:].abs().max().item() if pad_from < local else 0.0,
           "kl": kl.detach().double(), "grad": grad}
    out["ce_err"] = (ce.double() - ref_ce).abs().max().item() if case.with_ce else 0.0
    return out


def _topk_check(group, tp: int, tp_rank: int) -> Dict[str, float]:
    """vocab_parallel_topk on shards vs torch.topk of the dense float64 log-softmax."""
    from megatron_ddk.losses.topk_kl import vocab_parallel_topk

    _, zt, *_ = _inputs(Case(VOCAB, tp))
    out = {}
    local = PADDED // tp
    for k, t in ((5, 1.0), (VOCAB, 2.0), (14, 0.7)):
        ids_ref, logp_ref, rest_ref = _teacher_topk(zt, k, t)
        shard = zt[..., tp_rank * local:(tp_rank + 1) * local].float()
        ids, logp, rest = vocab_parallel_topk(shard, k, tp_group=group, temperature=t,
                                              vocab_size=VOCAB, chunk_tokens=4)
        out[f"{k}-{t}-ids"] = float(torch.equal(ids, ids_ref))
        out[f"{k}-{t}-logp"] = (logp.double() - logp_ref).abs().max().item()
        finite = rest_ref > float("-inf")
        out[f"{k}-{t}-rest"] = ((rest.double() - rest_ref)[finite].abs().max().item()
                                if finite.any() else 0.0)
        out[f"{k}-{t}-rest_inf"] = float(bool(torch.equal(rest == float("-inf"), ~finite)))
    return out


NUM_RANKS = 2
"""One launch of NUM_RANKS gloo ranks runs every case (tests/losses/conftest.py's results)."""


def rank_main(rank: int, world: int):
    groups = tp_groups(rank, world)
    results = {case.name: _run_case(case, groups[case.tp], rank % case.tp) for case in CASES}
    results["topk"] = {tp: _topk_check(groups[tp], tp, rank % tp) for tp in (1, 2)}
    return results


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_float64_reference(results, case):
    for rank, per_rank in enumerate(results):
        r = per_rank[case.name]
        where = f"{case.name} rank {rank}: kl_err {r['kl_err']:.2e} ce_err {r['ce_err']:.2e} " \
                f"grad_err {r['grad_err']:.2e}"
        if case.bf16:  # the reference saw the same bf16 logits; the gradient is stored in bf16
            assert r["kl_err"] < 1e-5 and r["grad_err"] < 8e-3 * r["grad_scale"], where
        else:  # the acceptance bound: 1e-6 in value and gradient (fp32 arithmetic inside), of
            # the quantity's scale when that exceeds 1 (T = 0.5 doubles logits of magnitude ~8)
            tol = 1e-6 * max(1.0, r["kl_scale"])
            assert r["kl_err"] < tol and r["ce_err"] < 1e-6, where
            assert r["grad_err"] < 1e-6 * max(1.0, r["grad_scale"]), where
        assert r["pad_grad"] == 0.0, where


@pytest.mark.parametrize("case", [c for c in CASES if c.tp == 2], ids=lambda c: c.name)
def test_tp2_equals_tp1(results, case):
    tp1 = Case(case.k, 1, case.temperature, case.with_ce, case.chunk, case.bf16).name
    for rank, per_rank in enumerate(results):
        a, b = per_rank[tp1], per_rank[case.name]
        # both within 1e-6 (of scale) of the float64 reference, so within twice that of each other
        assert torch.allclose(a["kl"], b["kl"], rtol=0, atol=2e-6 * max(1.0, a["kl_scale"])), rank
        local = PADDED // 2
        full_b = torch.cat([results[0][case.name]["grad"], results[1][case.name]["grad"]], -1)
        tol = 2e-6 * max(1.0, a["grad_scale"]) if not case.bf16 else 1.6e-2 * a["grad_scale"]
        assert torch.allclose(a["grad"], full_b, rtol=0, atol=tol), rank
        assert full_b.shape[-1] == 2 * local


def test_vocab_parallel_topk_matches_dense(results):
    for per_rank in results:
        for tp, checks in per_rank["topk"].items():
            for key, value in checks.items():
                if key.endswith(("ids", "rest_inf")):
                    assert value == 1.0, (tp, key)
                else:
                    assert value < 1e-5, (tp, key, value)


def test_bad_shapes_are_named():
    import torch.distributed as dist

    from megatron_ddk.losses.topk_kl import vocab_parallel_ce_and_topk_kl

    z = torch.zeros(2, 1, 8)
    with pytest.raises(ValueError, match="topk_ids"):
        vocab_parallel_ce_and_topk_kl(z, torch.zeros(2, 1, 3, dtype=torch.long),
                                      torch.zeros(2, 1, 4), torch.zeros(2, 1),
                                      tp_group=dist.group.WORLD if dist.is_initialized() else 0)
    with pytest.raises(ValueError, match="rest_logprob"):
        vocab_parallel_ce_and_topk_kl(z, torch.zeros(2, 1, 3, dtype=torch.long),
                                      torch.zeros(2, 1, 3), torch.zeros(2),
                                      tp_group=0)
