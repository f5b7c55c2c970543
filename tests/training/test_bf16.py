"""bf16 mixed precision run for real on CPU: Float16Module, bf16 parameters and gradients, fp32 main
parameters in the distributed optimizer, bf16 checkpoints, bf16 logits into the KL.

Two launches of real Megatron-Core objects (megatron_ddk.testing.multiproc, gloo):
- world 1: for a KD step and a DDK step (interval-0 evaluation, Eq. 1 weights, one optimizer step)
  a Trainer with train.bf16=false and one with train.bf16=true, holding the same weights (the fp32
  ones are set to the bf16 values, so only the arithmetic differs); then a bf16 run of 6 steps
  checkpointed at step 3, a fresh Trainer resumed from step 3, and the bf16 checkpoint evaluated in
  bf16 and in fp32;
- world 2: the KD step in bf16 at TP=2 from the TP=1 weights, against the TP=1 bf16 step.

Tolerances, from bf16's 8-bit significand (unit roundoff u = 2^-8; one round-to-nearest has a
relative error uniform in [-u, u], rms u / sqrt(3)) and the reduction sizes:
- Every GEMM accumulates its h <= 128 products in fp32 (error h 2^-24, negligible) and rounds
  its output to bf16 once; norms, softmax, SwiGLU and the residual adds round once each. The
  longest forward path of the 2-layer student meets about 24 such roundings, a gradient of the
  first layer about 48 (forward and backward). Independent roundings add in quadrature:
  relative L2 error of a gradient tensor ~ sqrt(48) u / sqrt(3) = 4u = GRAD_RTOL (1.6e-2).
- The loss is a mean over N = 8 x 32 = 256 tokens (global batch x sequence). A token's loss moves
  by sum_j (p_j - y_j) dz_j, with dz_j of rms sqrt(24) u / sqrt(3) times the logits' rms and
  ||p - y||_2 <= sqrt(2): rms per token <= sqrt(2) * 2.8u * (rms_S + gamma (rms_S + rms_T)) for
  the CE + gamma KL. The mean over N independent tokens divides that by sqrt(N); LOSS tolerance =
  6 of those standard deviations, with the logits' rms measured in the run (loss_atol()).
- Evaluation: per-domain CE means over each domain's validation tokens (>= 256), the same
  formula with gamma = 0 and N = that domain's token count.
  The Eq. 1 weights r = softmax(ppl_S / ppl_T): |dr_i| <= 2 r_i max|d ratio| and
  |d ratio| <= 2 ratio x the evaluation tolerance.
- TP=2 against TP=1, both bf16: two independent bf16 error realisations, sqrt(2) x the above.
- The bf16 KL itself against a float64 reference: tests/losses/test_kl.py (bf16 cases).
A wrong loss scale, a lost micro-batch, an fp32 teacher against a bf16 one or fp32 logits
reaching the KL move these numbers by orders of magnitude more; bf16 that silently ran as fp32
is caught by the exact-equality checks (identical gradients fail).
Exact resume is exact: the checkpoint holds the fp32 main parameters and the Adam moments, so the
resumed run must reproduce every logged number and every bf16 weight bit for bit.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from megatron_ddk.config.schema import DistillConfig
from megatron_ddk.testing import run_distributed, tiny_run

U = 2.0 ** -8  # bf16 unit roundoff
ROUNDING_RMS = U / math.sqrt(3)
FORWARD_ROUNDINGS, GRAD_ROUNDINGS = 24, 48
GRAD_RTOL = math.sqrt(GRAD_ROUNDINGS) * ROUNDING_RMS  # 4u
TOKENS = 8 * 32  # per optimizer step (global batch 8 x seq 32), and per domain in evaluation
GAMMA = DistillConfig().gamma
TP_FACTOR = math.sqrt(2)


def loss_atol(rms_student: float, rms_teacher: float, gamma: float = GAMMA,
              tokens: int = TOKENS) -> float:
    """6 standard deviations of the bf16 error of a mean over `tokens` tokens (module docstring)."""
    per_token = (math.sqrt(2) * math.sqrt(FORWARD_ROUNDINGS) * ROUNDING_RMS
                 * (rms_student + gamma * (rms_student + rms_teacher)))
    return 6 * per_token / math.sqrt(tokens)
EXACT = ("loss", "lm_loss", "kd_loss", "lr", "grad_norm", "consumed_samples", "weights", "step")


def _write(tiny, run_dir: str, *, policy: str, bf16: bool, tp: int = 1, train_iters: int = 4,
           extra_ckpt=None) -> str:
    cfg = tiny_run.run_config(tiny["manifest"], run_dir, teacher_load=tiny["teacher"],
                              policy=policy, train_iters=train_iters, interval=2,
                              extra={"train": {"bf16": bf16},
                                     "parallel": {"tensor_model_parallel_size": tp}})
    cfg["logging"]["tensorboard"] = False
    cfg["checkpoint"].update(extra_ckpt or {})
    return tiny_run.write_config(cfg, os.path.join(run_dir, "run.yaml"))


# ------------------------------------------------------------------------------ worker helpers
def _trainer(path: str, ctx):
    from megatron_ddk.config import load_config
    from megatron_ddk.training.trainer import Trainer

    trainer = Trainer(load_config(path, []), ctx)
    trainer.loss = _DtypeRecorder(trainer.loss)
    return trainer


class _DtypeRecorder:
    """The trainer's loss, recording the dtype of the student logits that reach it (the KL)."""

    def __init__(self, loss):
        self._loss, self.dtypes, self.rms = loss, set(), {"student": 0.0, "teacher": 0.0}

    def __call__(self, student_logits, **kwargs):
        self.dtypes.add(str(student_logits.dtype))
        for key, z in (("student", student_logits), ("teacher", kwargs.get("teacher_logits"))):
            if z is not None:
                rms = float(z.detach().float().pow(2).mean().sqrt())
                self.rms[key] = max(self.rms[key], rms)
        return self._loss(student_logits, **kwargs)

    def __getattr__(self, name):
        return getattr(self._loss, name)


def _copy_weights(src, dst) -> None:
    """dst's parameters := src's (upcast); the optimizer's main parameters follow."""
    with torch.no_grad():
        for model_src, model_dst in ((src.student, dst.student),
                                     (src.source.model, dst.source.model)):
            pairs = zip(model_src.named_parameters(), model_dst.named_parameters())
            for (name, a), (name_b, b) in pairs:
                assert name == name_b and a.shape == b.shape
                b.copy_(a)
    dst.optimizer.reload_model_params()


def _full_weights(trainer):
    return {n: p.detach().float().clone() for n, p in trainer.student.named_parameters()}


def _step(trainer) -> dict:
    """The interval start (if due) and one optimizer step; the gradients it applied."""
    if trainer.mixture.steps_left == 0:
        trainer._start_interval()
    grads = {}
    opt_step = trainer.optimizer.step

    def capture_then_step():  # the gradients the optimizer is about to apply (fp32 main_grad)
        for name, p in trainer.student.named_parameters():
            grads[name] = p.main_grad.detach().clone()
        return opt_step()

    trainer.optimizer.step = capture_then_step
    rec = trainer.train_step()
    trainer.optimizer.step = opt_step
    hist = trainer.controller.history[-1]
    return {"loss": rec["loss"], "lm_loss": rec["lm_loss"], "kd_loss": rec["kd_loss"],
            "grads": grads, "weights": [float(w) for w in hist["weights"]],
            "ppl_student": hist.get("ppl_student"), "ppl_teacher": hist.get("ppl_teacher"),
            "logits_dtypes": sorted(trainer.loss.dtypes), "logits_rms": trainer.loss.rms,
            "r": hist.get("r")}


def _precision_facts(trainer) -> dict:
    """What bf16 mixed precision means, read off the live Megatron-Core objects."""
    opts = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    main = [p for opt in opts for g in opt.shard_fp32_from_float16_groups for p in g]
    return {"student": sorted({str(p.dtype) for p in trainer.student.parameters()}),
            "teacher": sorted({str(p.dtype) for p in trainer.source.model.parameters()}),
            "main_grad": sorted({str(p.main_grad.dtype) for p in trainer.student.parameters()}),
            "main_params": sorted({str(p.dtype) for p in main}), "num_main_params": len(main),
            "optimizers": sorted({type(opt).__name__ for opt in opts}),
            "wrapper": type(trainer.model.module).__mro__[1].__name__}


def _records(run_dir: str, kind: str = "step"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def _resume_and_eval(ctx, paths: dict) -> dict:
    """bf16: 6 steps saved at 3 and 6; a fresh trainer resumed from 3; eval of the checkpoint."""
    from megatron_ddk.config import load_config
    from megatron_ddk.training.evaluation_command import evaluate_checkpoint
    from megatron_ddk.training.trainer import Trainer

    full = _trainer(paths["full"], ctx)  # records the student's logits rms of its last steps
    full.run()
    resumed = Trainer(load_config(paths["resumed"], []), ctx)
    start = resumed.step
    resumed.run()
    same_weights = all(torch.equal(a, b) for a, b in zip(full.student.parameters(),
                                                        resumed.student.parameters()))
    ckpt = os.path.join(os.path.dirname(paths["full"]), "ckpt")
    evals = {}
    for name in ("eval_bf16", "eval_fp32"):
        cfg = load_config(paths[name], ["distill.teacher=null", "ddk.policy=static"])
        evals[name] = evaluate_checkpoint(cfg, ctx, ckpt)["domains"]
    return {"resumed_from": start, "same_weights": same_weights, "evals": evals,
            "final_logits_rms": full.loss.rms["student"],
            "dtype": str(next(resumed.student.parameters()).dtype)}


def world1(rank, world, paths):
    from megatron_ddk.parallel import initialize

    ctx = initialize(seed=1234)
    out = {}
    for policy in ("static", "ddk"):
        bf = _trainer(paths[f"{policy}_bf16"], ctx)
        fp = _trainer(paths[f"{policy}_fp32"], ctx)
        _copy_weights(bf, fp)
        if policy == "static":
            out["tp1_weights"] = _full_weights(bf)
            out["facts_bf16"] = _precision_facts(bf)
        out[policy] = {"bf16": _step(bf), "fp32": _step(fp)}
        out[policy]["fp32_param_dtypes"] = sorted({str(p.dtype) for p in fp.student.parameters()})
    out.update(_resume_and_eval(ctx, paths))
    return out


def world2_tp2(rank, world, path, tp1_weights, tp1_grads):
    from megatron_ddk.parallel import initialize
    from megatron_ddk.testing.sharding import tp_shard

    ctx = initialize(tensor_model_parallel_size=2, seed=1234)
    trainer = _trainer(path, ctx)
    with torch.no_grad():
        for name, p in trainer.student.named_parameters():
            p.copy_(tp_shard(name, tp1_weights[name], p, ctx.tp_rank, 2))
    trainer.optimizer.reload_model_params()
    result = _step(trainer)
    errors = {}
    for name, p in trainer.student.named_parameters():
        ref = tp_shard(name, tp1_grads[name], p, ctx.tp_rank, 2)
        got = result["grads"][name]
        errors[name] = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    return {"loss": result["loss"], "lm_loss": result["lm_loss"], "kd_loss": result["kd_loss"],
            "grad_rel_err": errors, "logits_dtypes": result["logits_dtypes"]}


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bf16"))
    paths = {}
    for policy in ("static", "ddk"):
        for bf16 in (True, False):
            name = f"{policy}_{'bf16' if bf16 else 'fp32'}"
            paths[name] = _write(tiny, os.path.join(root, name), policy=policy, bf16=bf16)
    paths["full"] = _write(tiny, os.path.join(root, "full"), policy="ddk", bf16=True,
                           train_iters=6, extra_ckpt={"save_interval": 3})
    paths["resumed"] = _write(tiny, os.path.join(root, "resumed"), policy="ddk", bf16=True,
                              train_iters=6, extra_ckpt={
                                  "save_interval": 3,
                                  "load": os.path.join(root, "full", "ckpt", "iter_0000003")})
    for name, bf16 in (("eval_bf16", True), ("eval_fp32", False)):
        paths[name] = _write(tiny, os.path.join(root, name), policy="static", bf16=bf16)
    one = run_distributed(world1, 1, paths, timeout=600)[0]
    return {"one": one, "root": root}


@pytest.fixture(scope="module")
def tp2(tiny, runs):
    """Both ranks' results of the bf16 KD step at TP=2 (from the TP=1 weights)."""
    path = _write(tiny, os.path.join(runs["root"], "tp2"), policy="static", bf16=True, tp=2)
    one = runs["one"]
    return run_distributed(world2_tp2, 2, path, one["tp1_weights"],
                           one["static"]["bf16"]["grads"], timeout=600)


def _grad_errors(a: dict, b: dict) -> dict:
    return {n: float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)) for n in b}


# ------------------------------------------------------------------------------ tests
@pytest.mark.timeout(900)
def test_bf16_is_really_mixed_precision(runs):
    facts = runs["one"]["facts_bf16"]
    assert facts["student"] == ["torch.bfloat16"] and facts["teacher"] == ["torch.bfloat16"]
    assert facts["main_grad"] == ["torch.float32"], "DDP must reduce gradients in fp32"
    assert facts["main_params"] == ["torch.float32"] and facts["num_main_params"] > 0
    assert facts["optimizers"] == ["DistributedOptimizer"] and facts["wrapper"] == "Float16Module"
    for policy in ("static", "ddk"):
        assert runs["one"][policy]["bf16"]["logits_dtypes"] == ["torch.bfloat16"], \
            "the KL must receive the bf16 logits (its bf16 branch), not an fp32 copy"
        assert runs["one"][policy]["fp32"]["logits_dtypes"] == ["torch.float32"]
        assert runs["one"][policy]["fp32_param_dtypes"] == ["torch.float32"]


@pytest.mark.parametrize("policy", ["static", "ddk"])
def test_bf16_step_matches_fp32(runs, policy):
    bf, fp = runs["one"][policy]["bf16"], runs["one"][policy]["fp32"]
    atol = loss_atol(fp["logits_rms"]["student"], fp["logits_rms"]["teacher"])
    for key in ("loss", "lm_loss", "kd_loss"):
        assert abs(bf[key] - fp[key]) < atol, (key, bf[key], fp[key], atol)
    assert bf["kd_loss"] > 0
    errors = _grad_errors(bf["grads"], fp["grads"])
    worst = max(errors, key=errors.get)
    assert errors[worst] < GRAD_RTOL, (worst, errors[worst], GRAD_RTOL)
    assert min(errors.values()) > 0.01 * U, "bf16 and fp32 gave identical gradients: not bf16"
    if policy == "ddk":  # per-domain validation ppl of student and teacher, and Eq. 1 from them
        eval_atol = loss_atol(fp["logits_rms"]["teacher"], 0.0, gamma=0.0)
        for key in ("ppl_student", "ppl_teacher"):
            for a, b in zip(bf[key], fp[key]):
                assert abs(math.log(a) - math.log(b)) < eval_atol, (key, bf[key], fp[key])
        ratio = max(s / t for s, t in zip(fp["ppl_student"], fp["ppl_teacher"]))
        r_atol = 4 * max(fp["r"]) * ratio * eval_atol
        assert bf["r"] == pytest.approx(fp["r"], abs=r_atol) and bf["r"] != fp["r"]
        assert bf["weights"] == pytest.approx(fp["weights"], abs=r_atol)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="TP=2 on GPUs needs two of them")
def test_bf16_tp2_matches_tp1(runs, tp2):
    tp1 = runs["one"]["static"]["bf16"]
    atol = TP_FACTOR * loss_atol(tp1["logits_rms"]["student"], tp1["logits_rms"]["teacher"])
    for rank in tp2:
        assert rank["logits_dtypes"] == ["torch.bfloat16"]
        for key in ("loss", "lm_loss", "kd_loss"):
            assert abs(rank[key] - tp1[key]) < atol, (key, rank[key], tp1[key], atol)
        worst = max(rank["grad_rel_err"], key=rank["grad_rel_err"].get)
        assert rank["grad_rel_err"][worst] < TP_FACTOR * GRAD_RTOL, \
            (worst, rank["grad_rel_err"][worst])


def test_bf16_checkpoint_resumes_exactly(runs):
    one, root = runs["one"], runs["root"]
    assert one["resumed_from"] == 3 and one["dtype"] == "torch.bfloat16"
    full, resumed = _records(os.path.join(root, "full")), _records(os.path.join(root, "resumed"))
    assert [r["step"] for r in full] == list(range(1, 7))
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for a, b in zip(full[3:], resumed):
        assert {k: a[k] for k in EXACT} == {k: b[k] for k in EXACT}, a["step"]
    assert one["same_weights"], "the resumed run's bf16 weights must equal the full run's"


def test_bf16_eval_matches_fp32_eval(runs):
    one = runs["one"]
    bf, fp = one["evals"]["eval_bf16"], one["evals"]["eval_fp32"]
    assert bf.keys() == fp.keys() and len(bf) >= 2
    for name in bf:
        tokens = fp[name]["tokens"]
        assert bf[name]["tokens"] == tokens >= TOKENS
        atol = loss_atol(one["final_logits_rms"], 0.0, gamma=0.0, tokens=tokens)
        assert abs(bf[name]["loss"] - fp[name]["loss"]) < atol, (name, bf[name], fp[name], atol)
        assert bf[name]["loss"] != fp[name]["loss"], "bf16 evaluation gave exactly fp32's loss"


# ------------------------------------------------------------------------------ host checks
def _bf16_config():
    from megatron_ddk.config import load_config

    return load_config(None, ["train.train_iters=10", "train.lr_warmup_iters=1", "train.bf16=true"])


def test_host_runs_bf16_on_cpu_with_one_warning(monkeypatch, caplog):
    from megatron_ddk.config import host

    monkeypatch.setattr(host, "have_cuda", lambda: False)
    cfg = _bf16_config()
    assert host.host_errors(cfg) == []
    with caplog.at_level("WARNING", logger=host.__name__):
        host.host_checks(cfg)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "train.bf16=true on a CPU host" in lines[0] and "testing" in lines[0]
    cfg.train.bf16 = None  # the default (fp32 on CPU) says nothing
    assert host.host_warnings(cfg) == []


@pytest.mark.parametrize("capability,refused", [((7, 0), True), ((7, 5), True), ((8, 0), False),
                                                ((9, 0), False)])
def test_host_refuses_bf16_only_on_gpus_without_it(monkeypatch, capability, refused):
    from megatron_ddk.config import host

    monkeypatch.setattr(host, "have_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    errs = host.host_errors(_bf16_config())
    if refused:
        assert errs == [f"train.bf16=true but this GPU (compute capability {capability[0]}."
                        f"{capability[1]}) has no bf16 support (needs >= 8.0, Ampere or newer); "
                        f"set train.bf16=false"]
    else:
        assert errs == [] and host.host_warnings(_bf16_config()) == []
