"""parallel/reduce.reduce_named: one all_reduce of many named tensors equals the dense sum of
every rank's tensors (computed here from the same seeds), with names and shapes kept."""

import torch

from megatron_ddk.testing import run_distributed

SHAPES = {"loss": (2,), "domain_lm_loss": (2, 5), "per_sample": (3, 4, 7), "empty": (0,)}


def _tensors(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return {k: torch.randn(*s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}


def _reduce(rank, world):
    import torch.distributed as dist

    from megatron_ddk.parallel.reduce import reduce_named

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        return {k: v.clone() for k, v in reduce_named(_tensors(rank)).items()}
    finally:
        dist.destroy_process_group()


def test_reduce_named_equals_the_dense_sum():
    results = run_distributed(_reduce, 3, timeout=120)
    dense = {k: sum(_tensors(r)[k] for r in range(3)) for k in SHAPES}
    for out in results:
        assert list(out) == list(SHAPES)
        for k, shape in SHAPES.items():
            assert out[k].shape == shape and out[k].dtype == torch.float64
            torch.testing.assert_close(out[k], dense[k], rtol=0, atol=1e-12)


def test_reduce_named_without_a_process_group_is_the_identity():
    from megatron_ddk.parallel.reduce import reduce_named

    mine = _tensors(0)
    out = reduce_named(mine)
    for k in SHAPES:
        assert torch.equal(out[k], mine[k])
