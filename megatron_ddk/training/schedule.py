"""One call into Megatron-Core's pipeline schedules with this run's explicit process groups.

`run_batches` is the one forward step of the package (training, evaluation, the teacher store's
producer): it hands the micro-batches to Megatron-Core as its data_iterator and takes the next
one with next(), as Megatron-LM's pretrain_gpt.py does; the caller only says what the loss of a
micro-batch's output is.

No pipelining for PP=1, 1F1B otherwise (the only schedule that accepts adjust_tensor_shapes_fn,
which the two-model pipeline needs). The P2P communicator is built from the context's PP group.
adjust_tensor_shapes_fn (models/pair.py widens the P2P tensor by the teacher's hidden size) is
used at PP > 1 and ignored at PP = 1; at PP > 1 a model that defines adjust_tensor_shapes (the
DistillationPair, also inside DDP / Float16Module) supplies it when the caller passes none.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from megatron_ddk.parallel.state import ParallelContext


def run_batches(ctx: ParallelContext, model, batches: List[Dict[str, Any]],
                loss_of: Callable[[Dict[str, Any]], Callable], seq_length: int,
                micro_batch_size: int, forward_only: bool = False) -> list:
    """Forward (and backward) over `batches`, one per micro-batch, on the model's tokens and
    position ids; loss_of(batch) is the loss function of that micro-batch's output (the
    schedule's contract: output -> (loss, num_tokens, report) or (loss, report))."""
    device = ctx.device

    def forward_step(data_iterator, module):
        batch = next(data_iterator)
        out = module(batch["tokens"].to(device), batch["position_ids"].to(device), None)
        return out, loss_of(batch)

    return forward_backward(ctx, [model], forward_step, len(batches), seq_length,
                            micro_batch_size, forward_only=forward_only,
                            data_iterator=iter(batches))


def forward_backward(ctx: ParallelContext, model_chunks: List, forward_step: Callable,
                     num_microbatches: int, seq_length: int, micro_batch_size: int,
                     forward_only: bool = False,
                     adjust_tensor_shapes_fn: Optional[Callable] = None,
                     data_iterator=None) -> list:
    """Run forward (and backward) over `num_microbatches`; returns the last stage's reports."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    func = get_forward_backward_func(pp_size=ctx.pp_size)
    kwargs = dict(forward_step_func=forward_step, data_iterator=data_iterator, model=model_chunks,
                  num_microbatches=num_microbatches, seq_length=seq_length,
                  micro_batch_size=micro_batch_size, forward_only=forward_only,
                  pg_collection=ctx.pg_collection)
    if ctx.pp_size > 1:
        config = model_chunks[0].config
        kwargs["p2p_communicator"] = P2PCommunicator(pp_group=ctx.pp_group, config=config)
        kwargs["adjust_tensor_shapes_fn"] = adjust_tensor_shapes_fn or _model_shapes_fn(
            model_chunks[0])
    # At PP=1 there is no P2P tensor to size: adjust_tensor_shapes_fn is ignored (Megatron-Core's
    # no-pipelining schedule asserts it is None), so callers may pass it unconditionally.
    return func(**kwargs)


def _model_shapes_fn(model) -> Optional[Callable]:
    """The wrapped model's own adjust_tensor_shapes (DistillationPair), or None."""
    from megatron.core.utils import get_attr_wrapped_model

    try:
        return get_attr_wrapped_model(model, "adjust_tensor_shapes")
    except RuntimeError:
        return None
