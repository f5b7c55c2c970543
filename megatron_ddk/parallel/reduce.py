"""Named all-reduces: many small [sum, count]-style tensors reduced in one collective.

    totals = reduce_named({"loss": t1, "domain_lm_loss": t2}, group)   # one all_reduce SUM

Every tensor is flattened into one float64 buffer in the order of the mapping's keys, the
buffer is summed over `group` (skipped without an initialised process group: one process), and
the result is split back by name with the original shapes. Element-wise sums do not depend on
how the values are packed, so the result equals one all_reduce per tensor.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist


def reduce_named(tensors: Dict[str, torch.Tensor], group: Optional[object] = None
                 ) -> Dict[str, torch.Tensor]:
    """{name: the SUM over `group` of that tensor} (float64, on the CPU), one all_reduce."""
    names = list(tensors)
    flat = [tensors[n].detach().to(torch.float64).cpu().reshape(-1) for n in names]
    sizes = [t.numel() for t in flat]
    buf = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    out, start = {}, 0
    for name, size in zip(names, sizes):
        out[name] = buf[start:start + size].view(tensors[name].shape)
        start += size
    return out
