"""The top-K KL on what a format-2 store gives back (variable entries per token, padded with id -1
and -inf), against float64 references written here, at TP = 1 and 2 in one 2-rank gloo launch.

- top_p = 1, K = vocabulary, float32 codec: the dense KL(p_T || p_S) (torch.log_softmax, float64)
  to 1e-5 in value and gradient;
- top_p < 1 with a quantised codec: the KL of both distributions coarsened to each token's own
  stored entries plus its rest outcome, written here from the dense student softmax (autograd);
- TP = 2 equals TP = 1;
- every case again on an ef store (id codec ef, names ending in _ef): value and gradient equal the
  packed store's to 1e-6 (ef decodes to the same (id, log-probability) pairs per token).
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import pytest
import torch

from megatron_ddk.testing.multiproc import tp_groups

S, B, PADDED, VOCAB = 6, 3, 24, 21
BASE = {"dense": (VOCAB, 1.0, "float32", 1.0), "adaptive_q8": (12, 0.8, "q8", 1.0),
        "adaptive_q4_T2": (9, 0.7, "q4", 2.0), "full_q4": (9, 1.0, "q4", 1.0)}
CASES = {**BASE, **{f"{name}_ef": case for name, case in BASE.items()}}


def _inputs():
    g = torch.Generator().manual_seed(99)
    zs = torch.randn(S, B, PADDED, generator=g, dtype=torch.float64) * 2
    zt = torch.randn(S, B, PADDED, generator=g, dtype=torch.float64) * 3
    zs[..., VOCAB:] = 40.0  # padding must not leak
    w = torch.rand(S, B, generator=g, dtype=torch.float64) + 0.5
    return zs, zt, w


def _stored(zt, k, top_p, codec, t, id_codec="packed"):
    """Encode + decode every token's teacher top-K as a format-2 store does."""
    from megatron_ddk.data.store_codec import StoreEncoding, decode_sample, encode_sample

    log_pt = torch.log_softmax(zt[..., :VOCAB] / t, dim=-1).reshape(S * B, VOCAB)
    vals, ids = log_pt.topk(k, dim=-1)
    rest = log_pt.scatter(-1, ids, float("-inf")).logsumexp(-1)
    enc = StoreEncoding(vocab_size=VOCAB, top_k=k, top_p=top_p, logprob_codec=codec,
                        id_codec=id_codec)
    i2, l2, r2 = decode_sample(encode_sample(ids.numpy(), vals.float().numpy(),
                                             rest.float().numpy(), enc), S * B, enc)
    return (torch.from_numpy(i2).view(S, B, k), torch.from_numpy(l2).view(S, B, k),
            torch.from_numpy(r2).view(S, B)), log_pt.view(S, B, VOCAB)


def _reference(name, zs, zt, w):
    k, top_p, codec, t = CASES[name]
    (ids, logp, rest), log_pt = _stored(zt, k, top_p, codec, t,
                                        "ef" if name.endswith("_ef") else "packed")
    zs = zs.clone().requires_grad_()
    log_ps = torch.log_softmax(zs[..., :VOCAB] / t, dim=-1)
    if name.startswith("dense"):
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    else:  # coarsened to each token's stored entries + its rest
        valid = ids >= 0
        log_qk = log_ps.gather(-1, ids.clamp_min(0))
        q_in = torch.where(valid, log_qk.exp(), 0.0).sum(-1)
        p = torch.where(valid, logp.double().exp(), 0.0)
        kl = torch.where(valid, p * (logp.double() - log_qk), 0.0).sum(-1)
        r = rest.double()
        kl = kl + torch.where(r > float("-inf"), r.exp() * (r - torch.log1p(-q_in)), 0.0)
    (kl * w).sum().backward()
    return kl.detach(), zs.grad, (ids, logp, rest)


def _run(name, group, tp, rank) -> Dict[str, object]:
    from megatron_ddk.losses.topk_kl import vocab_parallel_ce_and_topk_kl

    zs, zt, w = _inputs()
    ref_kl, ref_grad, (ids, logp, rest) = _reference(name, zs, zt, w)
    local = PADDED // tp
    cols = slice(rank * local, (rank + 1) * local)
    x = zs[..., cols].float().contiguous().requires_grad_()
    _, kl = vocab_parallel_ce_and_topk_kl(x, ids, logp, rest, tp_group=group,
                                          temperature=CASES[name][3], vocab_size=VOCAB,
                                          chunk_tokens=5)
    (kl * w.float()).sum().backward()
    grad = x.grad.double()
    return {"kl_err": (kl.double() - ref_kl).abs().max().item(),
            "grad_err": (grad - ref_grad[..., cols]).abs().max().item(),
            "grad_scale": ref_grad.abs().max().item(), "kl": kl.detach().double(), "grad": grad,
            "entries": float((ids >= 0).float().mean())}


NUM_RANKS = 2
"""One launch of NUM_RANKS gloo ranks runs every case (tests/losses/conftest.py's results)."""


def rank_main(rank: int, world: int):
    groups = tp_groups(rank, world)
    return {(name, tp): _run(name, groups[tp], tp, rank % tp) for name in CASES for tp in (1, 2)}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("tp", [1, 2])
def test_matches_float64_reference(results, name, tp):
    for rank, per_rank in enumerate(results):
        r = per_rank[(name, tp)]
        where = f"{name} tp{tp} rank {rank}: kl_err {r['kl_err']:.2e} grad_err {r['grad_err']:.2e}"
        # fp32 arithmetic inside against a float64 reference: 1e-5 (the bound)
        assert r["kl_err"] < 1e-5, where
        assert r["grad_err"] < 1e-5 * max(1.0, r["grad_scale"]), where


def test_adaptive_cases_store_fewer_entries(results):
    entries = {name: results[0][(name, 1)]["entries"] for name in CASES}
    assert entries["dense"] == entries["dense_ef"] == 1.0
    assert 0 < entries["adaptive_q8"] < 1 and 0 < entries["adaptive_q4_T2"] < 1, entries


@pytest.mark.parametrize("name", list(BASE))
@pytest.mark.parametrize("tp", [1, 2])
def test_ef_store_gives_the_packed_store_s_loss(results, name, tp):
    for per_rank in results:
        a, b = per_rank[(name, tp)], per_rank[(name + "_ef", tp)]
        assert a["entries"] == b["entries"]
        assert torch.allclose(a["kl"], b["kl"], rtol=0, atol=1e-6), (name, tp)
        assert torch.allclose(a["grad"], b["grad"], rtol=0, atol=1e-6), (name, tp)


@pytest.mark.parametrize("name", list(CASES))
def test_tp2_equals_tp1(results, name):
    a = results[0][(name, 1)]
    full = torch.cat([results[0][(name, 2)]["grad"], results[1][(name, 2)]["grad"]], -1)
    for rank in range(2):
        b = results[rank][(name, 2)]
        # both within 1e-5 of the float64 reference; against each other fp32 reduction order only
        assert torch.allclose(a["kl"], b["kl"], rtol=0, atol=2e-6), (name, rank)
    assert torch.allclose(a["grad"], full, rtol=0, atol=2e-6 * max(1.0, a["grad_scale"])), name
    assert np.isfinite(full.numpy()).all()
