"""The pipeline-split rule is written once (config/pipeline_split.py) and the static checks, the
memory planner and the pair all follow it; the rule agrees with what Megatron-Core builds
wherever Megatron-Core builds something sensible."""

import pytest
import torch

from megatron_ddk.config import ModelConfig, RunConfig, static_errors
from megatron_ddk.config.pipeline_split import pipeline_stage_layers
from megatron_ddk.models.memory import stage_layers

# (num_layers, pp, first, last) -> layers per stage, worked out by hand; None = refused
CASES = {
    (4, 3, 2, 2): None,          # the middle stage would be empty (the planner said [2, 0, 2])
    (4, 2, 2, 2): [2, 2],
    (5, 2, 3, None): [3, 2],
    (5, 2, None, None): None,    # Megatron-Core would floor 5 / 2 silently
    (6, 4, 1, 1): [1, 2, 2, 1],
    (7, 3, None, 3): [2, 2, 3],
    (3, 1, None, None): [3],
    (3, 1, 1, None): None,       # first/last need PP > 1
    (2, 3, None, None): None,
    (4, 2, 0, None): None,
}


def _cfg(n, pp, first, last):
    cfg = RunConfig()
    cfg.train.train_iters = 10
    cfg.model = ModelConfig(num_layers=n, num_layers_in_first_pipeline_stage=first,
                            num_layers_in_last_pipeline_stage=last)
    cfg.parallel.pipeline_model_parallel_size = pp
    return cfg


@pytest.mark.parametrize("case", sorted(CASES, key=str))
def test_validation_planner_and_rule_agree(case):
    n, pp, first, last = case
    expected = CASES[case]
    assert pipeline_stage_layers(n, pp, first, last) == expected
    errs = [e for e in static_errors(_cfg(*case)) if "pipeline" in e]
    model = _cfg(*case).model
    if expected is None:
        assert errs and all(e.startswith("model") for e in errs), errs
        with pytest.raises(ValueError, match=f"num_layers={n} cannot be split over {pp}"):
            stage_layers(model, pp)
    else:
        assert errs == []
        assert stage_layers(model, pp) == expected


def test_pair_check_uses_the_same_rule():
    """models/pair.py checks the layers a stage holds against the rule (a module shaped like a
    Megatron-Core GPTModel stage: config, decoder.layers, pg_collection)."""
    from types import SimpleNamespace

    from megatron_ddk.models.pair import stage_layer_errors

    def stage(n, pp, first, last, built):
        cfg = SimpleNamespace(num_layers=n, pipeline_model_parallel_size=pp,
                              num_layers_in_first_pipeline_stage=first,
                              num_layers_in_last_pipeline_stage=last)
        return SimpleNamespace(config=cfg, decoder=SimpleNamespace(layers=[None] * built),
                               pg_collection=SimpleNamespace(pp=object()))

    assert stage_layer_errors(stage(5, 2, 3, None, 3), "teacher") == []
    errs = stage_layer_errors(stage(4, 3, 2, 2, 2), "teacher")
    assert len(errs) == 1 and "teacher: num_layers=4 over 3 pipeline stages" in errs[0]
    errs = stage_layer_errors(stage(5, 2, None, None, 2), "student")  # floored by Megatron
    assert "cannot be split" in errs[0]
    errs = stage_layer_errors(stage(5, 2, 3, None, 2), "student")  # stage 0 should hold 3
    assert "splits as [3, 2], but stage 0 holds 2 layers" in errs[0]


def _megatron_layers(num_layers, pp, first, last):
    """Layers per stage as Megatron-Core's TransformerConfig and block builder decide; None
    where either refuses (ValueError from the config, AssertionError from the builder)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig

    try:
        cfg = TransformerConfig(num_layers=num_layers, hidden_size=8, num_attention_heads=1,
                                pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                                num_layers_in_first_pipeline_stage=first,
                                num_layers_in_last_pipeline_stage=last)
        return [get_num_layers_to_build(cfg, pp_rank=r) for r in range(pp)]
    except (ValueError, AssertionError):
        return None


def test_stage_layers_agree_with_megatron_core():
    refused = 0
    for n in range(1, 9):
        for pp in (2, 3, 4):
            for first in (None, 1, 2, 3):
                for last in (None, 1, 2):
                    ours = pipeline_stage_layers(n, pp, first, last)
                    theirs = _megatron_layers(n, pp, first, last)
                    case = ((n, pp, first, last), ours, theirs)
                    if ours is not None:
                        assert ours == theirs and sum(ours) == n and min(ours) >= 1, case
                    else:  # Megatron-Core refuses too, or builds nonsense, e.g. [-1, 2] for
                        # 1 layer with 2 on the last of 2 stages: refusing first protects it
                        assert theirs is None or min(theirs) < 1 or sum(theirs) != n, case
                        refused += 1
    assert 0 < refused < 8 * 3 * 4 * 3
