"""Vocab-parallel KL / CE against a dense float64 reference written here, at TP = 1, 2 and 4.

One 4-rank gloo launch runs every case: the WORLD group is TP=4, pairs of ranks are TP=2, single
ranks are TP=1. Each rank builds the same full-vocabulary logits, keeps its shard, and compares the
value and the gradient of its shard with torch.log_softmax on the whole (unpadded) vocabulary in
float64 and autograd through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import pytest
import torch
import torch.nn.functional as F

from megatron_ddk.testing.multiproc import tp_groups

S, B, PADDED = 5, 3, 24  # 15 tokens; 24 columns split 24 / 12x2 / 6x4


@dataclass(frozen=True)
class Case:
    kind: str  # "kl", "ce" or "fused"
    tp: int
    reverse: bool = False
    temperature: float = 1.0
    vocab_size: Optional[int] = 21
    chunk: int = 4  # does not divide 15 tokens
    bf16: bool = False

    @property
    def name(self) -> str:
        d = "rev" if self.reverse else "fwd"
        return (f"{self.kind}-tp{self.tp}-{d}-T{self.temperature:g}-V{self.vocab_size}"
                f"-c{self.chunk}{'-bf16' if self.bf16 else ''}")


def _cases():
    out = []
    for tp in (1, 2, 4):
        for rev in (False, True):
            for t in (1.0, 2.0):
                out.append(Case("kl", tp, rev, t))
                out.append(Case("fused", tp, rev, t))
        out.append(Case("kl", tp, vocab_size=None, chunk=1024))
        out.append(Case("kl", tp, reverse=True, vocab_size=11, chunk=1))  # tp4: 2 empty shards
        out.append(Case("kl", tp, temperature=2.0, bf16=True))
        out.append(Case("kl", tp, reverse=True, bf16=True))
        out.append(Case("ce", tp))
        out.append(Case("ce", tp, vocab_size=11, chunk=7))
        out.append(Case("fused", tp, reverse=True, temperature=2.0, bf16=True))
    return out


CASES = _cases()


def _inputs(case: Case):
    g = torch.Generator().manual_seed(1234)
    zs = torch.randn(S, B, PADDED, generator=g, dtype=torch.float64) * 3
    zt = torch.randn(S, B, PADDED, generator=g, dtype=torch.float64) * 3 + 1
    v = case.vocab_size or PADDED
    zs[..., v:] = 40.0  # padding must not leak into the softmax
    zt[..., v:] = 40.0
    labels = torch.randint(0, v, (S, B), generator=g)
    w_kl = torch.rand(S, B, generator=g, dtype=torch.float64) + 0.5
    w_ce = torch.rand(S, B, generator=g, dtype=torch.float64) + 0.5
    if case.bf16:  # the reference sees exactly the rounded values
        zs, zt = zs.bfloat16().double(), zt.bfloat16().double()
    return zs, zt, labels, w_kl, w_ce


def _dense(case: Case, zs, zt, labels, w_kl, w_ce):
    """Independent reference: full vocabulary, float64, autograd."""
    v = case.vocab_size or PADDED
    zs = zs.clone().requires_grad_()
    t = case.temperature
    log_ps = torch.log_softmax(zs[..., :v] / t, dim=-1)
    log_pt = torch.log_softmax(zt[..., :v] / t, dim=-1)
    if case.reverse:
        kl = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    else:
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    ce = F.cross_entropy(zs[..., :v].reshape(-1, v), labels.reshape(-1),
                         reduction="none").view(S, B)
    total = 0.0
    if case.kind in ("kl", "fused"):
        total = total + (kl * w_kl).sum()
    if case.kind in ("ce", "fused"):
        total = total + (ce * w_ce).sum()
    total.backward()
    return kl.detach(), ce.detach(), zs.grad


def _run_case(case: Case, group, tp_rank: int) -> Dict[str, float]:
    from megatron_ddk.losses import (
        vocab_parallel_ce_and_kl,
        vocab_parallel_cross_entropy,
        vocab_parallel_kl,
    )

    zs, zt, labels, w_kl, w_ce = _inputs(case)
    ref_kl, ref_ce, ref_grad = _dense(case, zs, zt, labels, w_kl, w_ce)
    local = PADDED // case.tp
    cols = slice(tp_rank * local, (tp_rank + 1) * local)
    dtype = torch.bfloat16 if case.bf16 else torch.float32
    x = zs[..., cols].to(dtype).contiguous().requires_grad_()
    y = zt[..., cols].to(dtype).contiguous().requires_grad_()  # must get no gradient
    kw = dict(tp_group=group, vocab_size=case.vocab_size, chunk_tokens=case.chunk)
    kl = ce = None
    if case.kind == "kl":
        kl = vocab_parallel_kl(x, y, temperature=case.temperature, reverse=case.reverse, **kw)
        (kl * w_kl.float()).sum().backward()
    elif case.kind == "ce":
        ce = vocab_parallel_cross_entropy(x, labels, **kw)
        (ce * w_ce.float()).sum().backward()
    else:
        ce, kl = vocab_parallel_ce_and_kl(x, y, labels, temperature=case.temperature,
                                          reverse=case.reverse, **kw)
        ((kl * w_kl.float()).sum() + (ce * w_ce.float()).sum()).backward()
    grad = x.grad.double()
    v = case.vocab_size or PADDED
    pad_local = max(0, min(local, (tp_rank + 1) * local - v))
    out = {
        "grad_err": (grad - ref_grad[..., cols]).abs().max().item(),
        "grad_scale": ref_grad.abs().max().item(),
        "pad_grad": grad[..., local - pad_local:].abs().max().item() if pad_local else 0.0,
        "teacher_grad_none": float(y.grad is None),
        "dtype_ok": float(all(t.dtype == torch.float32 for t in (kl, ce) if t is not None)),
    }
    if kl is not None:
        out["kl_err"] = (kl.double() - ref_kl).abs().max().item()
    if ce is not None:
        out["ce_err"] = (ce.double() - ref_ce).abs().max().item()
    return out


NUM_RANKS = 4
"""One launch of NUM_RANKS gloo ranks runs every case (tests/losses/conftest.py's results)."""


def rank_main(rank: int, world: int):
    groups = tp_groups(rank, world)
    results = {}
    for case in CASES:
        results[case.name] = _run_case(case, groups[case.tp], rank % case.tp)
    # A label outside the real vocabulary gives NaN, loudly, on every rank.
    from megatron_ddk.losses import vocab_parallel_cross_entropy
    z = torch.zeros(2, 1, PADDED // 2)
    bad = vocab_parallel_cross_entropy(z, torch.tensor([[3], [22]]), tp_group=groups[2],
                                       vocab_size=21)
    results["nan_label"] = {"finite_ok": float(bad[0, 0].item() == pytest.approx(math.log(21))),
                            "nan": float(bool(bad[1, 0].isnan()))}
    return results


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_dense_reference(results, case):
    # fp32 arithmetic on logits of magnitude ~10: a few 1e-6 absolute (a dense fp32 log_softmax
    # has the same order of error); bf16 gradients are rounded to 8 bits of mantissa.
    val_tol = 3e-5
    for rank, per_rank in enumerate(results):
        r = per_rank[case.name]
        where = f"{case.name} rank {rank}: {r}"
        if "kl_err" in r:
            assert r["kl_err"] < val_tol, where
        if "ce_err" in r:
            assert r["ce_err"] < val_tol, where
        grad_tol = 1e-5 if not case.bf16 else 8e-3 * r["grad_scale"]
        assert r["grad_err"] < grad_tol, where
        assert r["pad_grad"] == 0.0, where  # padded columns: exactly zero
        assert r["teacher_grad_none"] == 1.0, where
        assert r["dtype_ok"] == 1.0, where


def test_out_of_vocabulary_label_is_nan(results):
    for per_rank in results:
        assert per_rank["nan_label"] == {"finite_ok": 1.0, "nan": 1.0}


def test_tp_group_is_required():
    from megatron_ddk.losses import vocab_parallel_cross_entropy, vocab_parallel_kl

    z = torch.zeros(2, 1, 4)
    with pytest.raises(ValueError, match="tp_group is required"):
        vocab_parallel_kl(z, z, tp_group=None)
    with pytest.raises(ValueError, match="tp_group is required"):
        vocab_parallel_cross_entropy(z, torch.zeros(2, 1, dtype=torch.long), tp_group=None)
    with pytest.raises(ValueError, match="same shape"):
        vocab_parallel_kl(z, torch.zeros(2, 1, 5), tp_group=None)
