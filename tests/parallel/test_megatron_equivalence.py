"""Megatron-Core on this host: TP=2, PP=2 and DP=2 against single-process references.

The reference is a world-1 run of the same model (weights from one checkpoint): tensor-parallel
loss and gradients, a pipeline-parallel step, and three distributed-optimizer steps must all equal
it; a checkpoint saved at TP=2 must give identical logits at TP=1.
"""

import os

import pytest
import torch

from megatron_ddk.testing import run_distributed
from megatron_ddk.testing.sharding import tp_shard

SEQ, MBS, VOCAB = 16, 2, 256


def _model_cfg():
    from megatron_ddk.config import ModelConfig

    return ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=96, max_position_embeddings=SEQ, normalization="RMSNorm",
                       activation="swiglu", position_embedding_type="rope")


def _batches(n):
    g = torch.Generator().manual_seed(7)
    return [(torch.randint(0, VOCAB - 6, (MBS, SEQ), generator=g),
             torch.randint(0, VOCAB - 6, (MBS, SEQ), generator=g)) for _ in range(n)]


def _build(tp=1, pp=1, seed=3):
    from megatron_ddk.models.build import build_gpt_model
    from megatron_ddk.parallel import initialize

    ctx = initialize(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=seed)
    return ctx, build_gpt_model(_model_cfg(), ctx, VOCAB)


def _loss(model, tokens, labels):
    pos = torch.arange(SEQ).expand(tokens.shape[0], SEQ)
    return model(tokens, pos, None, labels=labels).float().mean()


def _shard(name, full, param, ctx):
    """Slice a TP=1 tensor the way Megatron shards `param` on this TP rank."""
    return tp_shard(name, full, param, ctx.tp_rank, ctx.tp_size)


def _step_fn(batches):
    it = iter(batches)

    def forward_step(data_iterator, model):
        tokens, labels = next(it)
        pos = torch.arange(SEQ).expand(tokens.shape[0], SEQ)
        out = model(tokens, pos, None, labels=labels)

        def loss_func(output):
            # Megatron's per-token contract (calculate_per_token_loss, as the trainer uses):
            # a token sum and a count; the schedule divides by the global token count once
            total = output.float().sum()
            count = torch.tensor(output.numel(), dtype=torch.int)
            return total, count, {"lm": output.float().mean().detach()}

        return out, loss_func

    return forward_step


def _train(ddp, opt, batches, num_microbatches, ctx, steps):
    from megatron_ddk.training.schedule import forward_backward

    losses = []
    for s in range(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        chunk = batches[s * num_microbatches:(s + 1) * num_microbatches]
        out = forward_backward(ctx, [ddp], _step_fn(chunk), num_microbatches, SEQ, MBS)
        opt.step()
        losses.append([float(o["lm"]) for o in out])
    return losses


def _objects(model, ctx, dist_opt=True):
    from megatron_ddk.config import ParallelConfig, TrainConfig
    from megatron_ddk.training.optimizer import build_training_objects

    train = TrainConfig(lr=1e-2, min_lr=1e-2, lr_warmup_iters=0, lr_decay_style="constant",
                        clip_grad=0.0, weight_decay=0.0, train_iters=3)
    return build_training_objects(model, train, ParallelConfig(use_distributed_optimizer=dist_opt),
                                  ctx, num_iters=3)


def reference(rank, world, ck_a):
    """World 1: save the reference weights; loss/grads; 3 training steps at global batch 4."""
    from megatron_ddk.models.checkpoint import save_model

    ctx, model = _build()
    save_model(ck_a, 1, model, {"padded_vocab_size": VOCAB})
    tokens, labels = _batches(1)[0]
    loss = _loss(model, tokens, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # pipeline reference: mean over 2 micro-batches of the per-micro-batch mean loss
    b = _batches(2)
    pp_loss = sum(_loss(model, t, lab) for t, lab in b) / 2
    pp_loss.backward()
    pp_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ddp, opt, _ = _objects(model, ctx)
    _train(ddp, opt, _batches(6), 2, ctx, steps=3)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return float(loss), grads, float(pp_loss), pp_grads, params


def tensor_parallel(rank, world, ck_a, ck_b, ref):
    """TP=2: same loss and gradient shards; then save a changed model for the reshard check."""
    from megatron_ddk.models.checkpoint import load_model, save_model

    ctx, model = _build(tp=2)
    load_model(ck_a, model)
    tokens, labels = _batches(1)[0]
    loss = _loss(model, tokens, labels)
    loss.backward()
    torch.testing.assert_close(float(loss), ref[0], rtol=0, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, _shard(n, ref[1][n], p, ctx), rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=n: f"{n}: {m}")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_model(ck_b, 2, model, {"padded_vocab_size": VOCAB})
    model.eval()
    with torch.no_grad():
        pos = torch.arange(SEQ).expand(MBS, SEQ)
        logits = model(tokens, pos, None)
    gathered = [torch.empty_like(logits) for _ in range(ctx.tp_size)]
    torch.distributed.all_gather(gathered, logits.contiguous(), group=ctx.tp_group)
    return torch.cat(gathered, dim=-1)


def pipeline_parallel(rank, world, ck_a, ref):
    """PP=2 (1F1B over 2 micro-batches): the loss and this stage's gradients equal PP=1."""
    from megatron_ddk.models.checkpoint import load_model

    ctx, model = _build(pp=2)
    load_model(ck_a, model)
    ddp, opt, _ = _objects(model, ctx, dist_opt=False)
    ddp.zero_grad_buffer()
    from megatron_ddk.training.schedule import forward_backward

    out = forward_backward(ctx, [ddp], _step_fn(_batches(2)), 2, SEQ, MBS)
    if ctx.is_last_stage:
        torch.testing.assert_close(sum(float(o["lm"]) for o in out) / 2, ref[2], rtol=0, atol=1e-5)
    offset = ctx.pp_rank * 1  # one layer per stage
    for n, p in model.named_parameters():
        ref_name = n
        if ".layers." in n:
            head, rest = n.split(".layers.", 1)
            idx, tail = rest.split(".", 1)
            ref_name = f"{head}.layers.{int(idx) + offset}.{tail}"
        torch.testing.assert_close(p.main_grad, ref[3][ref_name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=n: f"{n}: {m}")
    return True


def data_parallel(rank, world, ck_a, ck_b, ref, tp_logits):
    """DP=2 distributed optimizer: 3 steps equal DP=1 on the same global batch; TP2 ckpt at TP1."""
    from megatron_ddk.models.checkpoint import load_model

    ctx, model = _build()
    load_model(ck_a, model)
    ddp, opt, _ = _objects(model, ctx)
    batches = _batches(6)
    mine = [batches[2 * s + rank] for s in range(3)]  # rank r takes micro-batch r of each step
    _train(ddp, opt, mine, 1, ctx, steps=3)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref[4][n], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=n: f"{n}: {m}")
    load_model(ck_b, model)
    model.eval()
    tokens, _ = _batches(1)[0]
    with torch.no_grad():
        logits = model(tokens, torch.arange(SEQ).expand(MBS, SEQ), None)
    torch.testing.assert_close(logits, tp_logits, rtol=1e-5, atol=1e-5)
    return True


@pytest.mark.timeout(400)
def test_tp_pp_dp_match_single_process(tmp_path):
    ck_a, ck_b = str(tmp_path / "a"), str(tmp_path / "b")
    ref = run_distributed(reference, 1, ck_a)[0]
    tp_logits = run_distributed(tensor_parallel, 2, ck_a, ck_b, ref)[0]
    assert tp_logits.shape[-1] == VOCAB
    run_distributed(pipeline_parallel, 2, ck_a, ref)
    run_distributed(data_parallel, 2, ck_a, ck_b, ref, tp_logits)
    assert os.path.isfile(os.path.join(ck_b, "latest_checkpointed_iteration.txt"))
