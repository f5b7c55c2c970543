"""Tail samples (losses/tail_sample.py) against references written here, in one 2-rank launch.

- the draws equal a dense float64 numpy reference (softmax over the whole vocabulary, the head
  ids zeroed, cumulative sum, searchsorted of the systematic targets) at TP = 1 and TP = 2;
- every tail token gets floor(M p_v / R) or ceil(M p_v / R) draws (systematic sampling);
- unbiased: averaged over a midpoint grid of the uniform u, the top-K KL's gradient on the
  stored distribution (head entries + tail draws, through the store codec) equals the dense
  KL's gradient (torch autograd, float64), while the rest-bucket store's does not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_ddk.testing.multiproc import tp_groups

S, B, PADDED, VOCAB, K, M, T = 4, 3, 64, 61, 6, 5, 1.5
GRID = 100


def _inputs():
    g = torch.Generator().manual_seed(7)
    zt = torch.randn(S, B, PADDED, generator=g, dtype=torch.float64) * 1.5
    zt[..., VOCAB:] = 50.0  # padding must never be drawn
    zs = torch.randn(S, B, PADDED, generator=g, dtype=torch.float64)
    u = torch.rand(S, B, generator=g, dtype=torch.float64)
    return zt, zs, u


def _head(zt):
    log_p = torch.log_softmax(zt[..., :VOCAB] / T, dim=-1)
    vals, ids = log_p.topk(K, dim=-1)
    rest = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return log_p, ids, vals, rest


def _dense_draws(zt, ids, u):
    """The reference: numpy float64 over the whole vocabulary."""
    z = zt[..., :VOCAB].numpy().reshape(-1, VOCAB) / T
    p = np.exp(z - z.max(axis=1, keepdims=True))
    np.put_along_axis(p, ids.numpy().reshape(-1, K), 0.0, axis=1)
    cum = np.cumsum(p, axis=1)
    out = np.empty((cum.shape[0], M), dtype=np.int64)
    for t in range(cum.shape[0]):
        y = (np.arange(M) + u.numpy().reshape(-1)[t]) / M * cum[t, -1]
        out[t] = np.searchsorted(cum[t], y, side="right")
    return out.reshape(S, B, M)


def _shard(z, tp, rank):
    local = PADDED // tp
    return z[..., rank * local:(rank + 1) * local].float().contiguous()


def _stored_grad(zs, ids, vals, rest, draws, group):
    """Gradient of sum(KL) on what a store with (or without: draws None) tail samples decodes."""
    from megatron_ddk.data.store_codec import StoreEncoding, decode_sample, encode_sample
    from megatron_ddk.losses.topk_kl import vocab_parallel_ce_and_topk_kl

    enc = StoreEncoding(vocab_size=VOCAB, top_k=K, logprob_codec="float32", id_codec="ef",
                        tail_samples=0 if draws is None else M)
    tail = None if draws is None else draws.reshape(S * B, M).numpy()
    i2, l2, r2 = decode_sample(encode_sample(ids.reshape(S * B, K).numpy(),
                                             vals.reshape(S * B, K).float().numpy(),
                                             rest.reshape(-1).float().numpy(), enc, tail),
                               S * B, enc)
    w = enc.width
    x = zs[..., :PADDED].float().clone().requires_grad_()
    _, kl = vocab_parallel_ce_and_topk_kl(
        x, torch.from_numpy(i2).view(S, B, w), torch.from_numpy(l2).view(S, B, w),
        torch.from_numpy(r2).view(S, B), tp_group=group, temperature=T, vocab_size=VOCAB)
    kl.sum().backward()
    return x.grad.double()


def _unbiased(groups):
    from megatron_ddk.losses.tail_sample import vocab_parallel_tail_sample

    zt, zs, _ = _inputs()
    log_p, ids, vals, rest = _head(zt)
    zd = zs.clone().requires_grad_()
    log_q = torch.log_softmax(zd[..., :VOCAB] / T, dim=-1)
    (log_p.exp() * (log_p - log_q)).sum().backward()
    dense = zd.grad
    mean = torch.zeros_like(dense)
    for g in range(GRID):
        u = torch.full((S, B), (g + 0.5) / GRID, dtype=torch.float64)
        draws = vocab_parallel_tail_sample(zt.float(), ids, u, M, tp_group=groups[1],
                                           temperature=T, vocab_size=VOCAB)
        mean += _stored_grad(zs, ids, vals, rest, draws, groups[1]) / GRID
    bucket = _stored_grad(zs, ids, vals, rest, None, groups[1])
    return {"tail_err": (mean - dense).abs().max().item(),
            "bucket_err": (bucket - dense).abs().max().item()}


NUM_RANKS = 2
"""One launch of NUM_RANKS gloo ranks runs every case (tests/losses/conftest.py's results)."""


def rank_main(rank: int, world: int):
    from megatron_ddk.losses.tail_sample import vocab_parallel_tail_sample

    groups = tp_groups(rank, world)
    zt, _, u = _inputs()
    _, ids, _, _ = _head(zt)
    out = {}
    for tp in (1, 2):
        out[tp] = vocab_parallel_tail_sample(_shard(zt, tp, rank % tp), ids, u, M,
                                             tp_group=groups[tp], temperature=T,
                                             vocab_size=VOCAB, chunk_tokens=5).numpy()
    if rank == 0:
        out["unbiased"] = _unbiased(groups)
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_draws_equal_the_dense_reference(results, tp):
    zt, _, u = _inputs()
    _, ids, _, _ = _head(zt)
    ref = _dense_draws(zt, ids, u)
    for rank, per_rank in enumerate(results):
        got = per_rank[tp]
        assert np.array_equal(got, ref), (tp, rank)
        assert (got >= 0).all() and (got < VOCAB).all()
        assert (np.diff(got, axis=-1) >= 0).all()  # ascending
        heads = ids.numpy().reshape(-1, K)
        assert not any(np.isin(got.reshape(-1, M)[t], heads[t]).any() for t in range(S * B))


def test_each_tail_token_gets_floor_or_ceil_of_its_share(results):
    zt, _, _ = _inputs()
    log_p, ids, _, rest = _head(zt)
    draws = results[0][1].reshape(-1, M)
    p = log_p.exp().numpy().reshape(-1, VOCAB)
    r = rest.exp().numpy().reshape(-1)
    heads = ids.numpy().reshape(-1, K)
    for t in range(S * B):
        share = np.delete(np.arange(VOCAB), heads[t])
        counts = np.bincount(draws[t], minlength=VOCAB)[share]
        expected = M * p[t, share] / r[t]
        assert (counts >= np.floor(expected - 1e-9)).all() and \
            (counts <= np.ceil(expected + 1e-9)).all(), t
        assert counts.sum() == M


def test_gradient_is_unbiased_over_the_draws(results):
    r = results[0]["unbiased"]
    # the midpoint grid integrates each draw count (a step function of u) to within 1 / GRID
    # draws, i.e. R / (M GRID) <= 1e-3 of mass; the gradient (1/T)(q - w) moves by less
    assert r["tail_err"] < 2e-3, r
    assert r["bucket_err"] > 10 * r["tail_err"], r  # the rest bucket alone is biased here
