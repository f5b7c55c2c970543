"""Each Megatron-Core 0.16 workaround of training/mcore_compat.py, against the real optimizer.

Every test here states the upstream behaviour the workaround exists for; when Megatron-Core
changes it (fixed, renamed, moved), the test fails and names what to re-check, instead of the
workaround silently doing nothing."""

import inspect

import pytest
import torch

from megatron_ddk.testing import run_distributed

SEQ, MBS, VOCAB = 16, 2, 256


def _build(ctx, seed):
    from megatron_ddk.config import ModelConfig, ParallelConfig, TrainConfig
    from megatron_ddk.models.build import build_gpt_model
    from megatron_ddk.training.optimizer import build_training_objects

    torch.manual_seed(seed)
    model = build_gpt_model(ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                                        ffn_hidden_size=64, max_position_embeddings=SEQ),
                            ctx, VOCAB)
    train = TrainConfig(lr=1e-2, min_lr=1e-2, lr_warmup_iters=0, lr_decay_style="constant",
                        clip_grad=0.0, weight_decay=0.0, train_iters=3)
    ddp, opt, _ = build_training_objects(model, train, ParallelConfig(), ctx, num_iters=3)
    return model, ddp, opt


def _train_two_steps(ddp, opt):
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        tokens = torch.randint(0, VOCAB, (MBS, SEQ), generator=g)
        pos = torch.arange(SEQ).expand(MBS, SEQ)
        ddp(tokens, pos, None, labels=tokens).float().mean().backward()
        ddp.finish_grad_sync()
        opt.step()


def _adam(opt):
    (inner,) = [o.optimizer for o in getattr(opt, "chained_optimizers", [opt])]
    return inner


def _load(folder, model, opt):
    from megatron_ddk.models.checkpoint import load_sharded
    from megatron_ddk.training.checkpoint import SHARDING

    request = {"optimizer": opt.sharded_state_dict(model.sharded_state_dict(), is_loading=True,
                                                   metadata=SHARDING)}
    return load_sharded(folder, request)["optimizer"]


def _checks(rank, world, root):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_ddk.models.checkpoint import save_sharded
    from megatron_ddk.parallel import destroy, initialize
    from megatron_ddk.training import mcore_compat as compat
    from megatron_ddk.training.checkpoint import SHARDING

    ctx = initialize(seed=3)
    out = {"version": compat.check_version()}
    model, ddp, opt = _build(ctx, 1)
    _train_two_steps(ddp, opt)
    folder = save_sharded(root, 2, {"optimizer": opt.sharded_state_dict(
        model.sharded_state_dict(), metadata=SHARDING)}, {})
    saved_moments = [s["exp_avg"].clone() for s in _adam(opt).state.values()]

    # 1. a fresh torch Adam has no state for dist_checkpointing to load into
    model2, _, opt2 = _build(ctx, 2)
    out["fresh_state_sizes"] = sorted({len(s) for s in _adam(opt2).state.values()} or {0})
    compat.materialise_optimizer_state(opt2)
    out["materialised_steps"] = sorted({float(s["step"]) for s in _adam(opt2).state.values()})
    # 2. the fully_reshardable load without the workaround
    try:
        with torch.no_grad():
            opt2.load_state_dict(_load(folder, model2, opt2))
        out["plain_load"] = "loaded"
    except KeyError as exc:
        out["plain_load"] = f"KeyError {exc}"
    # 3. with step_tolerant_loading it loads, but every parameter's 'step' is one shared tensor:
    #    torch's in-place `step += 1` then counts once per parameter; restore_adam_steps fixes it
    for name, restore in (("unrestored", False), ("restored", True)):
        model3, ddp3, opt3 = _build(ctx, 3)
        compat.materialise_optimizer_state(opt3)
        with torch.no_grad(), compat.step_tolerant_loading(opt3):
            opt3.load_state_dict(_load(folder, model3, opt3))
        inner = opt3.chained_optimizers[0] if hasattr(opt3, "chained_optimizers") else opt3
        out["instance_patch_removed"] = compat.PATCHED_METHOD not in vars(inner)
        out["group_steps"] = sorted({g["step"] for g in _adam(opt3).param_groups if "step" in g})
        out["moments_equal"] = all(torch.equal(a, s["exp_avg"]) for a, s in
                                   zip(saved_moments, _adam(opt3).state.values()))
        if restore:
            compat.restore_adam_steps(opt3)
        states = list(_adam(opt3).state.values())
        out[f"{name}_step_tensors"] = len({id(s["step"]) for s in states})
        out["num_params"] = len(states)
        _train_two_steps(ddp3, opt3)
        out[f"{name}_steps_after_2"] = sorted({float(s["step"]) for s in states})
    # 4. the private method the patch wraps: present, same signature; gone -> a loud error
    method = getattr(DistributedOptimizer, compat.PATCHED_METHOD, None)
    out["signature"] = list(inspect.signature(method).parameters) if method else None
    delattr(DistributedOptimizer, compat.PATCHED_METHOD)
    try:
        with compat.step_tolerant_loading(opt3):
            pass
        out["missing"] = "silently skipped"
    except compat.CompatError as exc:
        out["missing"] = str(exc)
    finally:
        setattr(DistributedOptimizer, compat.PATCHED_METHOD, method)
    destroy()
    return out


@pytest.fixture(scope="module")
def compat_results(tmp_path_factory):
    return run_distributed(_checks, 1, str(tmp_path_factory.mktemp("compat")), timeout=300)[0]


def test_written_for_megatron_core_0_16(compat_results):
    from megatron_ddk.training.mcore_compat import MCORE_VERSION

    assert compat_results["version"].startswith(MCORE_VERSION + "."), \
        "Megatron-Core changed: re-check every workaround in training/mcore_compat.py"


def test_fresh_adam_needs_materialised_state(compat_results):
    assert compat_results["fresh_state_sizes"] == [0]
    assert compat_results["materialised_steps"] == [1.0]


def test_fully_reshardable_load_fails_on_step_without_the_workaround(compat_results):
    # when this fails, Megatron-Core loads torch Adam's 'step' itself: drop step_tolerant_loading
    assert compat_results["plain_load"] == "KeyError 'step'"


def test_adam_step_is_shared_until_restored(compat_results):
    r = compat_results
    assert r["group_steps"] == [2] and r["moments_equal"] and r["instance_patch_removed"]
    assert r["num_params"] > 1
    # when this fails, Megatron-Core gives each parameter its own step: drop restore_adam_steps
    assert r["unrestored_step_tensors"] == 1
    assert r["unrestored_steps_after_2"] == [2.0 + 2 * r["num_params"]]
    # with the workaround: one tensor per parameter, 2 saved steps + 2 more = 4 (Adam's count)
    assert r["restored_step_tensors"] == r["num_params"]
    assert r["restored_steps_after_2"] == [4.0]


def test_patched_private_method_exists_or_fails_loudly(compat_results):
    assert compat_results["signature"] == ["self", "model_param", "tensors"]
    assert "_set_main_param_and_optimizer_states is gone" in compat_results["missing"]
    assert "0.16" in compat_results["missing"]
