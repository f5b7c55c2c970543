"""The loss tests' one launch per module: every case of a module runs in a single gloo launch.

A test module here defines NUM_RANKS and a module-level rank_main(rank, world) that takes its
groups from megatron_ddk.testing.multiproc.tp_groups and returns a dict of results; the
module-scoped `results` fixture is the list of every rank's dict (start-up costs seconds per
launch, so the cases share it).
"""

from __future__ import annotations

import pytest

from megatron_ddk.testing.multiproc import run_distributed


@pytest.fixture(scope="module")
def results(request):
    """[rank 0's dict, rank 1's dict, ...] of the requesting module's rank_main."""
    module = request.module
    return run_distributed(module.rank_main, module.NUM_RANKS, timeout=240)
