"""Transformer Engine and FP8: spec choice, host-check refusals, FP8 contexts, the GPU benchmark.

CPU (always run):
- layer_spec: the local spec's module classes, written out here from Megatron-Core's names; the
  TE spec refused without TE with a message naming what is missing; fusion flags per impl.
- host checks with torch.cuda and the TE probe mocked: TE missing, no GPU, a GPU below 8.9, and
  the Hopper / Ada hosts that pass; each message names the field and what is missing.
- fp8_context: nullcontext without FP8 or without TE, Megatron-Core's context otherwise.
- In one spawned world-1 process: Megatron-Core's TransformerBlock enters the FP8 context of the
  teacher's own config (not the student's) during a DistillationPair forward, under no_grad; and
  the benchmark's FP8 branch runs end to end with FP8 stood in by a recorder (local layers):
  the copied "FP8" teacher reproduces the reference logits exactly.
- bench/gpu_throughput.py: --help, the refusal without CUDA (exit 2), and --cpu-smoke.
GPU (skipped unless CUDA and Transformer Engine import): FP8 teacher logits against bf16 ones
(relative L2 and KL, computed here); one KD step with the TE spec against the local spec with the
same weights loaded from a checkpoint.
"""

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from megatron_ddk.config import host as host_mod
from megatron_ddk.config import load_config, optional
from megatron_ddk.config.schema import ModelConfig
from megatron_ddk.models import fp8 as fp8_mod
from megatron_ddk.models import spec as spec_mod
from megatron_ddk.testing import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bench", "gpu_throughput.py")
HAVE_GPU_TE = torch.cuda.is_available() and optional.have_transformer_engine()
def gpu_te(test):
    """Marked gpu; skipped without CUDA and Transformer Engine."""
    skip = pytest.mark.skipif(not HAVE_GPU_TE, reason="needs CUDA and Transformer Engine")
    return pytest.mark.gpu(skip(test))


def _load_bench():
    spec = importlib.util.spec_from_file_location("gpu_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ layer spec
@pytest.mark.parametrize("norm", ["RMSNorm", "LayerNorm"])
def test_local_spec_uses_megatron_core_modules(norm):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import TransformerLayer

    layer = spec_mod.layer_spec(ModelConfig(normalization=norm))
    sub = layer.submodules
    attn, mlp = sub.self_attention, sub.mlp
    assert layer.module is TransformerLayer
    assert attn.module is SelfAttention and mlp.module is MLP
    assert attn.submodules.linear_qkv is ColumnParallelLinear
    assert attn.submodules.linear_proj is RowParallelLinear
    assert attn.submodules.core_attention is DotProductAttention
    assert mlp.submodules.linear_fc1 is ColumnParallelLinear
    assert mlp.submodules.linear_fc2 is RowParallelLinear
    # no apex here: both norms fall back to torch's (RMSNorm / LayerNorm picked by the config)
    assert sub.input_layernorm is WrappedTorchNorm and sub.pre_mlp_layernorm is WrappedTorchNorm
    modules = {v.__module__ for v in (attn.submodules.linear_qkv, attn.submodules.core_attention,
                                      mlp.submodules.linear_fc1, sub.input_layernorm)}
    assert not any("transformer_engine" in m for m in modules)


def test_te_spec_refused_without_te(monkeypatch):
    monkeypatch.setattr(optional, "have_transformer_engine", lambda: False)
    with pytest.raises(ValueError) as err:
        spec_mod.layer_spec(ModelConfig(transformer_impl="transformer_engine"))
    msg = str(err.value)
    assert "model.transformer_impl='transformer_engine'" in msg
    assert "Transformer Engine is not importable" in msg and "transformer_impl: local" in msg


@pytest.mark.skipif(not optional.have_transformer_engine(), reason="needs Transformer Engine")
def test_te_spec_uses_te_modules():
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    attn = spec_mod.layer_spec(ModelConfig(transformer_impl="transformer_engine")) \
        .submodules.self_attention.submodules
    assert attn.linear_qkv is TELayerNormColumnParallelLinear
    assert attn.core_attention is TEDotProductAttention
    assert attn.linear_proj is TERowParallelLinear


@pytest.mark.parametrize("impl, activation, bias, rope, expected", [
    ("local", "swiglu", False, "rope", dict(act=False, softmax=False, rope=False, bda=False)),
    ("transformer_engine", "swiglu", False, "rope",
     dict(act=True, softmax=True, rope=True, bda=True)),
    # Megatron-Core refuses bias+GeLU fusion without biases; no RoPE fusion without RoPE
    ("transformer_engine", "gelu", False, "learned_absolute",
     dict(act=False, softmax=True, rope=False, bda=True)),
    ("transformer_engine", "gelu", True, "learned_absolute",
     dict(act=True, softmax=True, rope=False, bda=True)),
])
def test_fusion_flags(impl, activation, bias, rope, expected):
    flags = spec_mod.fusion_flags(ModelConfig(transformer_impl=impl, activation=activation,
                                              add_bias_linear=bias, position_embedding_type=rope))
    assert flags == {"bias_activation_fusion": expected["act"],
                     "masked_softmax_fusion": expected["softmax"],
                     "persist_layer_norm": impl == "transformer_engine",
                     "gradient_accumulation_fusion": False,
                     "apply_rope_fusion": expected["rope"],
                     "bias_dropout_fusion": expected["bda"]}


def test_local_fusion_flags_build_a_transformer_config():
    """Megatron-Core accepts the local flags on this host (it refuses e.g. RoPE fusion w/o TE)."""
    from types import SimpleNamespace

    from megatron_ddk.models.build import transformer_config

    ctx = SimpleNamespace(tp_size=1, pp_size=1, device=torch.device("cpu"))
    for activation in ("swiglu", "gelu"):
        config = transformer_config(ModelConfig(activation=activation), ctx)
        assert not config.apply_rope_fusion and not config.bias_activation_fusion
        assert config.fp8 is None


# ------------------------------------------------------------------------------ host checks
def _host(monkeypatch, *, te: bool, capability=None):
    """Pretend this host has TE or not, and a GPU of `capability` (None: no GPU)."""
    monkeypatch.setattr(host_mod, "have_transformer_engine", lambda: te)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)


def _cfg(student_fp8=None, teacher_fp8=None, impl="transformer_engine"):
    over = ["train.train_iters=10", "train.lr_warmup_iters=1", "train.bf16=true",
            f"model.transformer_impl={impl}", f"distill.teacher.transformer_impl={impl}",
            "distill.teacher.num_layers=4"]
    over += [f"model.fp8={student_fp8}"] if student_fp8 else []
    over += [f"distill.teacher.fp8={teacher_fp8}"] if teacher_fp8 else []
    return load_config(None, over)


def test_host_refuses_te_when_it_does_not_import(monkeypatch):
    _host(monkeypatch, te=False, capability=(9, 0))
    errs = host_mod.host_errors(_cfg(teacher_fp8="hybrid"))
    assert len(errs) == 2, errs  # model and distill.teacher, nothing about the GPU
    assert errs[0].startswith("model.transformer_impl='transformer_engine' but Transformer "
                              "Engine is not importable")
    assert errs[1].startswith("distill.teacher.transformer_impl='transformer_engine'")


def test_host_refuses_te_and_fp8_without_gpu(monkeypatch):
    _host(monkeypatch, te=True, capability=None)
    errs = " | ".join(host_mod.host_errors(_cfg(teacher_fp8="e4m3")))
    assert ("model.transformer_impl='transformer_engine' needs a CUDA GPU; this host has "
            "none") in errs
    assert "distill.teacher.fp8='e4m3' needs an FP8-capable GPU (Hopper/Ada); this host has no " \
           "CUDA GPU" in errs
    assert "not importable" not in errs and "model.fp8" not in errs


def test_host_refuses_fp8_below_compute_capability_8_9(monkeypatch):
    _host(monkeypatch, te=True, capability=(8, 0))  # A100: TE runs, FP8 does not
    errs = host_mod.host_errors(_cfg(teacher_fp8="hybrid"))
    assert errs == ["distill.teacher.fp8='hybrid' needs compute capability >= 8.9 (Hopper/Ada); "
                    "this GPU has 8.0"]
    assert host_mod.host_errors(_cfg()) == []  # bf16 TE on an A100 is fine


@pytest.mark.parametrize("capability", [(8, 9), (9, 0), (10, 0)])
def test_host_accepts_fp8_on_ada_hopper_blackwell(monkeypatch, capability):
    _host(monkeypatch, te=True, capability=capability)
    assert host_mod.host_errors(_cfg(student_fp8="hybrid", teacher_fp8="e4m3")) == []


# ------------------------------------------------------------------------------ fp8 context
@dataclasses.dataclass
class _TConf:
    """Stands in for a TransformerConfig: fp8_context reads only .fp8 itself."""

    fp8: str


def test_fp8_context_without_fp8_or_without_te(monkeypatch):
    calls = []
    import megatron.core.fp8_utils as fp8_utils

    monkeypatch.setattr(fp8_utils, "get_fp8_context", lambda *a, **k: calls.append(a))
    plain = fp8_mod.fp8_context(ModelConfig(), None)
    assert isinstance(plain, contextlib.nullcontext)
    monkeypatch.setattr(optional, "have_transformer_engine", lambda: False)
    cfg = ModelConfig(transformer_impl="transformer_engine", fp8="hybrid")
    assert isinstance(fp8_mod.fp8_context(cfg, _TConf("hybrid")), contextlib.nullcontext)
    assert calls == []


def test_fp8_context_is_megatron_cores(monkeypatch):
    import megatron.core.fp8_utils as fp8_utils

    marker, seen = contextlib.nullcontext("fp8-region"), []

    def fake(config, layer_no=-1, is_init=False):
        seen.append((config, layer_no, is_init))
        return marker

    monkeypatch.setattr(optional, "have_transformer_engine", lambda: True)
    monkeypatch.setattr(fp8_utils, "get_fp8_context", fake)
    tconf = _TConf("e4m3")
    cfg = ModelConfig(transformer_impl="transformer_engine", fp8="e4m3")
    assert fp8_mod.fp8_context(cfg, tconf) is marker
    assert seen == [(tconf, -1, False)]  # the whole forward, autocast (not model init)
    with pytest.raises(ValueError, match="ModelConfig has fp8='e4m3' but the model's "
                                         "TransformerConfig has fp8='hybrid'"):
        fp8_mod.fp8_context(cfg, dataclasses.replace(tconf, fp8="hybrid"))
    # from the built module's config alone (what a caller holding only `model.config` passes)
    assert fp8_mod.fp8_context(None, tconf) is marker
    assert isinstance(fp8_mod.fp8_context(None, _TConf(None)), contextlib.nullcontext)
    assert len(seen) == 2
    with pytest.raises(ValueError, match="ModelConfig has fp8=None"):
        fp8_mod.fp8_context(ModelConfig(), tconf)  # built with FP8 but the config says none


def test_recast_fp8_weights_every_forward():
    class FakeTELinear(torch.nn.Module):  # the two attributes Megatron-Core's TE wrappers carry
        def __init__(self):
            super().__init__()
            self.is_first_microbatch, self.disable_parameter_transpose_cache = True, False

    class Model(torch.nn.Module):
        def __init__(self, fp8):
            super().__init__()
            self.config = _TConf(fp8)
            self.layers = torch.nn.ModuleList([FakeTELinear(), torch.nn.Linear(2, 2),
                                               torch.nn.Sequential(FakeTELinear())])

    model = Model("hybrid")
    assert fp8_mod.recast_fp8_weights_every_forward(model) == 2
    fakes = [m for m in model.modules() if isinstance(m, FakeTELinear)]
    assert all(m.disable_parameter_transpose_cache for m in fakes)
    bf16 = Model(None)
    assert fp8_mod.recast_fp8_weights_every_forward(bf16) == 0
    assert not any(m.disable_parameter_transpose_cache for m in bf16.modules()
                   if isinstance(m, FakeTELinear))


def test_describe_fp8():
    assert fp8_mod.describe_fp8(ModelConfig()).startswith("no FP8")
    text = fp8_mod.describe_fp8(ModelConfig(transformer_impl="transformer_engine", fp8="hybrid",
                                            fp8_amax_history_len=16))
    assert text.startswith("FP8 hybrid (E4M3 forward, E5M2 gradients), delayed scaling, "
                           "amax history 16 (max)")
    assert "loss fp32" in text
    assert "amax" not in fp8_mod.describe_fp8(ModelConfig(fp8="e4m3", fp8_recipe="tensorwise"))


# ------------------------------------------------------------------------------ spawned, CPU
def _cpu_world1_checks(rank, world_size, ckpt_root):
    """Megatron-Core's own FP8 regions per model, and the benchmark's FP8 branch (stood in)."""
    import megatron.core.transformer.transformer_block as tb

    from megatron_ddk.models.build import build_gpt_model
    from megatron_ddk.models.pair import DistillationPair
    from megatron_ddk.models.teacher import freeze
    from megatron_ddk.parallel.state import initialize

    entered = []

    @contextlib.contextmanager
    def recorder(config, layer_no=-1, is_init=False):
        entered.append((config.hidden_size, config.fp8, layer_no, is_init, torch.is_grad_enabled()))
        yield

    tb.get_fp8_context = recorder  # what Megatron-Core's TransformerBlock calls
    ctx = initialize(seed=7)
    # fp8 on local layers: the static checks refuse that in a run config, but build_gpt_model
    # takes it, which lets the recorder see Megatron-Core's FP8 calls on a CPU
    student = build_gpt_model(ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                                          ffn_hidden_size=64, max_position_embeddings=32), ctx, 128)
    teacher = freeze(build_gpt_model(ModelConfig(num_layers=3, hidden_size=64,
                                                 num_attention_heads=4, ffn_hidden_size=128,
                                                 max_position_embeddings=32, fp8="hybrid"),
                                     ctx, 128))
    at_build = list(entered)
    entered.clear()
    tokens = torch.randint(0, 128, (2, 16))
    out = DistillationPair(student, teacher)(tokens, torch.arange(16).expand(2, 16), None)
    pair_regions = list(entered)
    entered.clear()

    bench = _load_bench()
    bench.fp8_unavailable = lambda args: ""  # run the FP8 branch with the recorder as "FP8"
    bench.fp8_teacher_config = lambda t, a: dataclasses.replace(t, fp8=a.fp8_format,
                                                                fp8_recipe=a.fp8_recipe)
    args = bench.smoke_settings(bench.parse_args(["--cpu-smoke", "--seq-lengths", "32"]))
    rows, header = bench.run_rows(args, ctx)
    kd = _kd_step(ctx, ("local", "local"), False, ckpt_root)  # the GPU test's harness, on CPU
    return {"kd_step": kd, "at_build": at_build, "pair": pair_regions,
            "shapes": [tuple(o.shape) for o in out],
            "bench_regions": entered, "rows": [dataclasses.asdict(r) for r in rows],
            "header": header}


@pytest.fixture(scope="module")
def cpu_world1(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("kd_ckpt"))
    return run_distributed(_cpu_world1_checks, 1, root, timeout=240)[0]


def test_teacher_layers_enter_fp8_with_the_teachers_config(cpu_world1):
    # built inside fp8_model_init contexts only for the teacher's 3 layers (fp8_param is off)
    assert [(h, f, n, init) for h, f, n, init, _ in cpu_world1["at_build"]] == \
        [(64, "hybrid", i, True) for i in range(3)]
    # forward: the teacher's block enters one region (delayed recipe: around all its layers),
    # with the teacher's config, without grad; the bf16 student enters none
    assert cpu_world1["pair"] == [(64, "hybrid", -1, False, False)]
    assert cpu_world1["shapes"] == [(2, 16, 128), (2, 16, 128)]


def test_bench_fp8_branch_on_cpu(cpu_world1):
    rows = {r["run"]: r for r in cpu_world1["rows"]}
    fp8 = rows["KD, FP8 teacher"]
    assert fp8["step_s"] > 0 and fp8["flops_per_step"] == rows["KD, fp32 teacher"]["flops_per_step"]
    # same weights (copied), same batch, FP8 stood in by a no-op: the logits must be identical
    rel_l2, kl = fp8["fp8_error"]
    assert rel_l2 <= 1e-6 and abs(kl) <= 1e-7
    # the "FP8" teacher was built in its 2 layers' init regions, and each of its forwards ran in
    # one region of its own config without grad: (1 warm-up + 2 timed steps) x 2 micro-batches,
    # plus the logit comparison
    regions = cpu_world1["bench_regions"]
    assert regions[:2] == [(64, "hybrid", 0, True, True), (64, "hybrid", 1, True, True)]
    assert regions[2:] == [(64, "hybrid", -1, False, False)] * 7
    ddk = rows["DDK, FP8 teacher, K=4"]
    assert ddk["step_s"] > fp8["step_s"] and ddk["flops_per_step"] > fp8["flops_per_step"]
    assert "FP8 hybrid" in cpu_world1["header"][2]


def test_kd_step_harness_exact_after_checkpoint_round_trip_on_cpu(cpu_world1):
    """The GPU comparison's harness with local on both sides: the checkpoint round trip and the
    KD step must then reproduce the loss and every gradient exactly (fp32, same kernels)."""
    kd = cpu_world1["kd_step"]
    (loss_a, g_a), (loss_b, g_b) = kd["0:local"], kd["1:local"]
    assert loss_a == loss_b and math.isfinite(loss_a) and loss_a > 0
    assert set(g_a) == set(g_b) and len(g_a) >= 10
    for name in g_a:
        assert torch.equal(g_a[name], g_b[name]), name
        assert g_a[name].abs().sum() > 0, name  # every student weight got a gradient


# ------------------------------------------------------------------------------ benchmark CLI
def _bench(*args, env=None, timeout=120):
    full_env = dict(os.environ, OMP_NUM_THREADS="2", **(env or {}))
    return subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True,
                          cwd=ROOT, env=full_env, timeout=timeout)


def test_bench_help():
    proc = _bench("--help")
    assert proc.returncode == 0 and "--cpu-smoke" in proc.stdout and "--fp8-recipe" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for hosts without CUDA")
def test_bench_refuses_without_cuda():
    proc = _bench()
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "on one CUDA GPU, and this host has none" in proc.stderr and "--cpu-smoke" in proc.stderr


def test_bench_cpu_smoke_prints_one_table():
    proc = _bench("--cpu-smoke", env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 2 * 5  # header, rule, 5 runs x 2 sequence lengths
    cells = {(r[1].strip(), r[2].strip()): r for r in (line.split("|") for line in table[2:])}
    assert set(k[0] for k in cells) == {"32", "64"}
    for seq in ("32", "64"):
        cpt = cells[(seq, "CPT")]
        assert float(cpt[3].replace(",", "")) > 0 and cpt[5].strip() == "n/a"  # no MFU on CPU
        # a freshly initialised model predicts ~uniformly: CE close to ln(vocab = 500)
        loss = float(re.search(r"loss ([0-9.]+)", cpt[9]).group(1))
        assert abs(loss - math.log(500)) < 0.3
        fp8 = cells[(seq, "KD, FP8 teacher")]
        assert "skipped: Transformer Engine not installed" in fp8[9] or HAVE_GPU_TE
        kd = cells[(seq, "KD, fp32 teacher")]
        ddk = cells[(seq, "DDK, fp32 teacher, K=4")]
        assert float(ddk[4]) > float(kd[4])  # ms/step: the evaluation amortised over K


# ------------------------------------------------------------------------------ GPU only
def _rel_l2_and_kl(ref, test):
    ref, test = ref.float().flatten(0, -2), test.float().flatten(0, -2)
    rel = float((test - ref).norm() / ref.norm())
    kl = torch.nn.functional.kl_div(torch.log_softmax(test, -1), torch.log_softmax(ref, -1),
                                    log_target=True, reduction="batchmean")
    return rel, float(kl)


def _gpu_fp8_logits(rank, world_size):
    from megatron_ddk.models.build import build_gpt_model
    from megatron_ddk.models.teacher import freeze
    from megatron_ddk.parallel.state import initialize

    ctx = initialize(seed=3)
    cfg = ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=8, ffn_hidden_size=1024,
                      max_position_embeddings=256, transformer_impl="transformer_engine")
    ref = freeze(build_gpt_model(cfg, ctx, 1024, bf16=True))
    fp8 = freeze(build_gpt_model(dataclasses.replace(cfg, fp8="hybrid", fp8_amax_history_len=16),
                                 ctx, 1024, bf16=True))
    assert fp8_mod.recast_fp8_weights_every_forward(fp8) >= 2 * 4  # qkv, proj, fc1, fc2 x 2
    with torch.no_grad():
        for name, p in fp8.named_parameters():
            p.copy_(dict(ref.named_parameters())[name])
        tokens = torch.randint(0, 1024, (2, 128), device=ctx.device)
        pos = torch.arange(128, device=ctx.device).expand(2, 128)
        for _ in range(3):  # delayed scaling uses the amax of earlier iterations
            fp8(tokens, pos, None)
        return _rel_l2_and_kl(ref(tokens, pos, None).cpu(), fp8(tokens, pos, None).cpu())


@gpu_te
def test_fp8_teacher_logits_close_to_bf16():
    rel, kl = run_distributed(_gpu_fp8_logits, 1, timeout=300)[0]
    assert 0 < rel < 5e-2, rel  # > 0: FP8 really ran
    assert kl < 1e-2, kl


def _kd_step(ctx, impls, bf16, ckpt_root):
    """One KD forward/backward per layer implementation in `impls`, the first writing the
    checkpoints of student and teacher and the others loading them: {impl: (loss, grads)}."""
    from megatron_ddk.losses.distill import DistillationLoss
    from megatron_ddk.models.build import build_gpt_model
    from megatron_ddk.models.checkpoint import load_model, save_model
    from megatron_ddk.models.pair import DistillationPair
    from megatron_ddk.models.teacher import freeze
    from megatron_ddk.training.schedule import forward_backward

    shapes = {"student": dict(num_layers=2, hidden_size=128, num_attention_heads=4,
                              ffn_hidden_size=512, max_position_embeddings=128),
              "teacher": dict(num_layers=2, hidden_size=256, num_attention_heads=8,
                              ffn_hidden_size=1024, max_position_embeddings=128)}
    text = torch.randint(0, 500, (2, 2, 65), generator=torch.Generator().manual_seed(0))
    text = text.to(ctx.device)
    pos = torch.arange(64, device=ctx.device).expand(2, 64)
    mask = torch.ones(2, 64, device=ctx.device)
    domain = torch.zeros(2, dtype=torch.long, device=ctx.device)
    results = {}
    for i, impl in enumerate(impls):
        models = {}
        for name, shape in shapes.items():
            model = build_gpt_model(ModelConfig(transformer_impl=impl, **shape), ctx, 512,
                                    bf16=bf16)
            path = os.path.join(ckpt_root, name)
            if i == 0:
                save_model(path, 1, model, {})
            else:
                load_model(path, model)
            models[name] = model
        pair = DistillationPair(models["student"], freeze(models["teacher"]))
        loss = DistillationLoss(tp_group=ctx.tp_group, num_domains=1, vocab_size=500,
                                logits_layout="bsv")
        batches = iter(text)

        def forward_step(_it, model, *, batches=batches, loss=loss):
            t = next(batches)
            labels = t[:, 1:]
            out = model(t[:, :-1], pos, None)
            return out, lambda o: loss(o[0], labels=labels, loss_mask=mask, domain_id=domain,
                                       teacher_logits=o[1])

        reports = forward_backward(ctx, [pair], forward_step, 2, 64, 2)
        total = sum(r["loss"] for r in reports)
        grads = {n: p.grad.float().cpu() for n, p in models["student"].named_parameters()
                 if p.grad is not None}
        results[f"{i}:{impl}"] = (float(total[0] / total[1]), grads)
    return results


def _gpu_kd_step(rank, world_size, ckpt_root):
    from megatron_ddk.parallel.state import initialize

    return _kd_step(initialize(seed=5), ("transformer_engine", "local"), True, ckpt_root)


@gpu_te
def test_kd_step_te_spec_matches_local_spec(tmp_path):
    res = run_distributed(_gpu_kd_step, 1, str(tmp_path), timeout=300)[0]
    (loss_te, g_te), (loss_local, g_local) = res["0:transformer_engine"], res["1:local"]
    assert abs(loss_te - loss_local) / loss_local < 1e-2
    common = sorted(set(g_te) & set(g_local))
    assert len(common) >= 10, common  # embedding, output, qkv/proj/fc1/fc2 of both layers
    for name in common:
        rel = float((g_te[name] - g_local[name]).norm() / g_local[name].norm())
        assert rel < 5e-2, (name, rel)
