"""Teacher and student in one pipeline: PP=2, TP=2 x PP=2 and PP=2 x DP=2 against world 1.

The reference is a world-1 run that saves the student and two teachers and computes, with dense
torch (log_softmax, an explicit KL sum), the distillation loss CE + 0.2 * KL(teacher || student)
averaged over 4 micro-batches, and the student's gradients. The parallel runs load the same
checkpoints into a DistillationPair, run Megatron-Core's 1F1B schedule with the vocab-parallel
DistillationLoss (megatron_ddk.losses), and must match: loss and every student gradient (layers
renumbered per stage, TP shards sliced). Teacher A (4 layers, hidden 96) splits evenly; teacher B
(5 layers, tied embeddings) needs num_layers_in_first_pipeline_stage=3. After an optimizer step
the teacher must be bit-identical and gradient-free, and the student checkpoint teacher-free.
Split checks are static (tests/config/test_pipeline_split.py compares the rule with
Megatron-Core's own TransformerConfig); the pair refuses a stage built for another split.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from megatron_ddk.testing import run_distributed
from megatron_ddk.testing.sharding import tp_shard

SEQ, MBS, VOCAB, NMB, GAMMA = 16, 2, 256, 4, 0.2
# layers per pipeline stage at PP=2, written out independently of the code under test
STAGE_LAYERS = {"student": [1, 1], "a": [2, 2], "b": [3, 2]}


def _student_cfg():
    from megatron_ddk.config import ModelConfig

    return ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=96, max_position_embeddings=SEQ,
                       share_embeddings_and_output_weights=True)


def _teacher_cfg(which, pp=1):
    from megatron_ddk.config import ModelConfig

    layers, first, tied = (4, None, False) if which == "a" else (5, 3, True)
    return ModelConfig(num_layers=layers, hidden_size=96, num_attention_heads=6,
                       num_query_groups=2, ffn_hidden_size=160, max_position_embeddings=SEQ,
                       share_embeddings_and_output_weights=tied,
                       num_layers_in_first_pipeline_stage=first if pp > 1 else None)


def _batches():
    g = torch.Generator().manual_seed(11)
    return [(torch.randint(0, VOCAB, (MBS, SEQ), generator=g),
             torch.randint(0, VOCAB, (MBS, SEQ), generator=g)) for _ in range(NMB)]


def _dense_loss(s_logits, t_logits, labels):
    """CE + gamma * KL(p_t || p_s), both averaged over tokens; logits [b, s, V]."""
    log_s = F.log_softmax(s_logits.float(), dim=-1)
    log_t = F.log_softmax(t_logits.float(), dim=-1)
    ce = -log_s.gather(-1, labels.unsqueeze(-1)).mean()
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    return ce + GAMMA * kl


def reference(rank, world, ck):
    """World 1: save student and teachers; dense loss and student grads for each teacher."""
    from megatron_ddk.config import to_dict
    from megatron_ddk.models.build import build_gpt_model
    from megatron_ddk.models.checkpoint import save_model
    from megatron_ddk.parallel import initialize

    ctx = initialize(seed=5)
    student = build_gpt_model(_student_cfg(), ctx, VOCAB)
    save_model(os.path.join(ck, "student"), 1, student, {"padded_vocab_size": VOCAB})
    pos = torch.arange(SEQ).expand(MBS, SEQ)
    out = {}
    for which in ("a", "b"):
        teacher = build_gpt_model(_teacher_cfg(which), ctx, VOCAB).eval()
        save_model(os.path.join(ck, "teacher_" + which), 1, teacher,
                   {"padded_vocab_size": VOCAB, "model": to_dict(_teacher_cfg(which))})
        student.zero_grad()
        loss = 0.0
        for tokens, labels in _batches():
            with torch.no_grad():
                t_logits = teacher(tokens, pos, None)
            loss = loss + _dense_loss(student(tokens, pos, None), t_logits, labels) / NMB
        loss.backward()
        out[which] = (float(loss), {n: p.grad.clone() for n, p in student.named_parameters()})
    return out


def _shard(name, full, param, ctx):
    """Slice a TP=1 tensor the way Megatron shards `param` on this TP rank."""
    return tp_shard(name, full, param, ctx.tp_rank, ctx.tp_size)


def _ref_name(name, student):
    """Reference (world-1) name of a stage parameter: global layer numbers, tied output."""
    if ".layers." in name:
        head, rest = name.split(".layers.", 1)
        idx, tail = rest.split(".", 1)
        return f"{head}.layers.{student.decoder.layers[int(idx)].layer_number - 1}.{tail}"
    if name == "output_layer.weight" and student.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"
    return name


def _forward_step(batches, loss):
    it = iter(batches)

    def forward_step(data_iterator, model):
        tokens, labels = next(it)
        out = model(tokens, torch.arange(SEQ).expand(MBS, SEQ), None)

        def loss_func(output):
            student_logits, teacher_logits = output
            return loss(student_logits, labels=labels, loss_mask=torch.ones_like(labels),
                        domain_id=torch.zeros(MBS, dtype=torch.long),
                        teacher_logits=teacher_logits)

        return out, loss_func

    return forward_step


def _mean_loss(ctx, reports, nmb):
    """The step's loss (mean over all micro-batches of all DP ranks), on every rank."""
    total = torch.zeros(1, dtype=torch.float64)
    if ctx.is_last_stage:
        total += sum(float(r["loss"][0] / r["loss"][1]) for r in reports) / nmb
    torch.distributed.all_reduce(total, group=ctx.pp_group)  # only the last stage adds
    torch.distributed.all_reduce(total, group=ctx.dp_group)
    return float(total) / ctx.dp_size


def _build_pair(ctx, ck, which):
    from megatron_ddk.models.build import build_gpt_model
    from megatron_ddk.models.checkpoint import load_model
    from megatron_ddk.models.memory import stage_params
    from megatron_ddk.models.pair import DistillationPair
    from megatron_ddk.models.teacher import build_teacher

    student = build_gpt_model(_student_cfg(), ctx, VOCAB)
    load_model(os.path.join(ck, "student"), student)
    teacher = build_teacher(_teacher_cfg(which, ctx.pp_size), ctx, VOCAB,
                            os.path.join(ck, "teacher_" + which))
    if ctx.pp_size == 2:
        assert len(student.decoder.layers) == STAGE_LAYERS["student"][ctx.pp_rank]
        assert len(teacher.decoder.layers) == STAGE_LAYERS[which][ctx.pp_rank]
    else:
        assert len(student.decoder.layers) == 2 and len(teacher.decoder.layers) == 4
    # the memory planner's per-stage parameter counts (docs/pipeline_parallel.md) match what was
    # built
    for model, cfg in ((student, _student_cfg()), (teacher, _teacher_cfg(which, ctx.pp_size))):
        expect = sum(stage_params(cfg, VOCAB, ctx.tp_size, ctx.pp_size, ctx.pp_rank).values())
        assert sum(p.numel() for p in model.parameters()) == expect, (which, ctx.pp_rank)
    return DistillationPair(student, teacher)


def _objects(pair, ctx, dist_opt):
    from megatron_ddk.config import ParallelConfig, TrainConfig
    from megatron_ddk.training.optimizer import build_training_objects

    train = TrainConfig(lr=1e-2, min_lr=1e-2, lr_warmup_iters=0, lr_decay_style="constant",
                        clip_grad=0.0, weight_decay=0.0, train_iters=1)
    return build_training_objects(pair, train,
                                  ParallelConfig(use_distributed_optimizer=dist_opt), ctx, 1)


def _distill_step(ctx, ck, ref, which, dist_opt=True, forward_only_check=False):
    """One distillation step; check loss, student grads, the frozen teacher. Returns the pair."""
    from megatron_ddk.losses.distill import DistillationLoss
    from megatron_ddk.training.schedule import forward_backward

    pair = _build_pair(ctx, ck, which)
    ddp, opt, _ = _objects(pair, ctx, dist_opt)
    loss = DistillationLoss(tp_group=ctx.tp_group, num_domains=1, gamma=GAMMA,
                            logits_layout="bsv")
    mine = _batches()[ctx.dp_rank::ctx.dp_size]
    ref_loss, ref_grads = ref[which]
    where = f"teacher {which}, tp={ctx.tp_size} pp={ctx.pp_size} dp={ctx.dp_size}"
    if forward_only_check:
        reports = forward_backward(ctx, [ddp], _forward_step(mine, loss), len(mine), SEQ, MBS,
                                   forward_only=True)  # shapes fn taken from the pair
        assert abs(_mean_loss(ctx, reports, len(mine)) - ref_loss) < 1e-5, where
    teacher_before = {n: p.detach().clone() for n, p in pair.teacher.named_parameters()}
    student_before = {n: p.detach().clone() for n, p in pair.student.named_parameters()}
    ddp.zero_grad_buffer()
    opt.zero_grad()
    reports = forward_backward(ctx, [ddp], _forward_step(mine, loss), len(mine), SEQ, MBS,
                               adjust_tensor_shapes_fn=pair.adjust_tensor_shapes)
    got = _mean_loss(ctx, reports, len(mine))
    assert abs(got - ref_loss) < 1e-5, f"{where}: loss {got} vs {ref_loss}"
    for n, p in pair.student.named_parameters():
        expect = _shard(n, ref_grads[_ref_name(n, pair.student)], p, ctx)
        torch.testing.assert_close(p.main_grad, expect, rtol=1e-4, atol=2e-6,
                                   msg=lambda m, n=n: f"{where}: grad of {n}: {m}")
    ok, _, _ = opt.step()
    assert ok
    for n, p in pair.teacher.named_parameters():
        assert not p.requires_grad and p.grad is None and not hasattr(p, "main_grad"), n
        assert torch.equal(p.detach(), teacher_before[n]), f"{where}: teacher {n} changed"
    changed = [n for n, p in pair.student.named_parameters()
               if not torch.equal(p.detach(), student_before[n])]
    assert len(changed) == len(student_before), f"{where}: student params not updated"
    return pair


def _check_student_checkpoint(ctx, ck, pair):
    """pair.sharded_state_dict() holds the student only; a save/load round trip via the pair."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_ddk.models.checkpoint import load_model, save_model

    sharded = pair.sharded_state_dict()
    assert set(sharded) == set(pair.student.sharded_state_dict())
    teacher_ptrs = {p.data_ptr() for p in pair.teacher.parameters()}
    tensors = [v for v in nested_values(sharded) if isinstance(v, ShardedTensor)]
    assert tensors and not any(t.data.data_ptr() in teacher_ptrs for t in tensors)
    assert not any("teacher" in t.key for t in tensors)
    out = os.path.join(ck, "student_out")
    save_model(out, 1, pair, {"padded_vocab_size": VOCAB})
    fresh = _build_pair(ctx, ck, "a")  # the original student weights, before the step
    load_model(out, fresh)             # loads through DistillationPair.load_state_dict
    for (n, p), q in zip(pair.student.named_parameters(), fresh.student.parameters()):
        assert torch.equal(p.detach(), q.detach()), n


def _check_refusals(ctx):
    """A pair of different stages, or with a trainable teacher, is refused."""
    from megatron_ddk.models.build import build_gpt_model
    from megatron_ddk.models.pair import DistillationPair
    from megatron_ddk.models.teacher import freeze

    student = build_gpt_model(_student_cfg(), ctx, VOCAB)
    teacher = build_gpt_model(_teacher_cfg("a"), ctx, VOCAB)
    with pytest.raises(ValueError, match="trainable parameters"):
        DistillationPair(student, teacher)
    freeze(teacher)
    DistillationPair(student, teacher)  # accepted once frozen
    other = freeze(build_gpt_model(_teacher_cfg("a"), ctx, VOCAB,
                                   post_process=not ctx.is_last_stage))
    with pytest.raises(ValueError, match="not the same pipeline stage"):
        DistillationPair(student, other)
    # a teacher stage built for another split than its config says (Megatron-Core built 3 + 2
    # layers; the rule, shared with config/validate.py and the planner, gives 5 no even split)
    uneven = freeze(build_gpt_model(_teacher_cfg("b", pp=2), ctx, VOCAB))
    uneven.config.num_layers_in_first_pipeline_stage = None
    with pytest.raises(ValueError, match="teacher: num_layers=5 over 2 pipeline stages"):
        DistillationPair(student, uneven)
    uneven.config.num_layers_in_first_pipeline_stage = 3
    DistillationPair(student, uneven)


def pipeline_two_stages(rank, world, ck, ref):
    """PP=2: teacher A (even split) with every extra check, teacher B (uneven split); then
    TP=2 and DP=2 without pipelining."""
    from megatron_ddk.parallel import initialize

    ctx = initialize(pipeline_model_parallel_size=2, seed=5)
    pair = _distill_step(ctx, ck, ref, "a", forward_only_check=True)
    _check_student_checkpoint(ctx, ck, pair)
    _distill_step(ctx, ck, ref, "b")
    _check_refusals(ctx)
    # the same step without pipelining: TP=2 (vocab-parallel loss), then DP=2 (the global
    # batch split over ranks) against the same single-process reference
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    ctx = initialize(tensor_model_parallel_size=2, seed=5)
    _distill_step(ctx, ck, ref, "a")
    parallel_state.destroy_model_parallel()
    ctx = initialize(seed=5)
    assert ctx.dp_size == 2  # plain DDP: every rank holds the all-reduced gradient to compare
    _distill_step(ctx, ck, ref, "a", dist_opt=False)
    return True


def pipeline_four_ranks(rank, world, ck, ref):
    """TP=2 x PP=2 (both teachers), then PP=2 x DP=2 with plain DDP (teacher B)."""
    from megatron.core import parallel_state

    from megatron_ddk.parallel import initialize

    ctx = initialize(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, seed=5)
    _distill_step(ctx, ck, ref, "a")
    _distill_step(ctx, ck, ref, "b")
    parallel_state.destroy_model_parallel()
    ctx = initialize(pipeline_model_parallel_size=2, seed=5)
    assert ctx.dp_size == 2
    _distill_step(ctx, ck, ref, "b", dist_opt=False)
    return True


@pytest.mark.timeout(400)
def test_pipelined_distillation_matches_single_process(tmp_path):
    ck = str(tmp_path)
    ref = run_distributed(reference, 1, ck)[0]
    assert abs(ref["a"][0] - ref["b"][0]) > 1e-4  # the two teachers really differ
    run_distributed(pipeline_two_stages, 2, ck, ref)
    run_distributed(pipeline_four_ranks, 4, ck, ref, timeout=300)


def _run_cfg(student_layers, teacher_layers, pp, student=None, teacher=None):
    """A run config whose only possible problems are pipeline splits."""
    from megatron_ddk.config import ModelConfig, RunConfig

    cfg = RunConfig()
    cfg.train.train_iters = 10_000
    cfg.model = ModelConfig(num_layers=student_layers, **(student or {}))
    cfg.distill.teacher = ModelConfig(num_layers=teacher_layers, hidden_size=256,
                                      **(teacher or {}))
    cfg.distill.teacher_load = "/ckpt/teacher"
    cfg.parallel.pipeline_model_parallel_size = pp
    return cfg


def test_static_check_refuses_split_naming_both_models():
    from megatron_ddk.config import ConfigError, static_checks, static_errors

    with pytest.raises(ConfigError) as err:
        static_checks(_run_cfg(2, 5, 2))
    errs = static_errors(_run_cfg(2, 5, 2))
    assert len(errs) == 1 and errs[0] in str(err.value), errs
    for part in ("model.num_layers=2", "distill.teacher.num_layers=5",
                 "pipeline_model_parallel_size=2", "num_layers_in_first_pipeline_stage"):
        assert part in errs[0], errs[0]
    errs = static_errors(_run_cfg(3, 4, 2))  # now the student is the one that cannot split
    assert len(errs) == 1 and "model.num_layers=3" in errs[0] and "teacher.num_layers=4" in errs[0]
    errs = static_errors(_run_cfg(2, 4, 1, teacher={"num_layers_in_first_pipeline_stage": 2}))
    assert len(errs) == 1 and "distill.teacher" in errs[0], errs


@pytest.mark.parametrize("student_layers, teacher_layers, pp, student, teacher", [
    (2, 5, 2, None, {"num_layers_in_first_pipeline_stage": 3}),
    (2, 5, 2, None, {"num_layers_in_last_pipeline_stage": 1}),
    (3, 6, 2, {"num_layers_in_last_pipeline_stage": 2}, None),
    (4, 6, 4, None, {"num_layers_in_first_pipeline_stage": 1,
                     "num_layers_in_last_pipeline_stage": 1}),
    (4, 8, 4, None, None),
])
def test_static_check_accepts_per_model_first_last_stage(student_layers, teacher_layers, pp,
                                                         student, teacher):
    from megatron_ddk.config import static_errors

    assert static_errors(_run_cfg(student_layers, teacher_layers, pp, student, teacher)) == []

