"""teacher_store.per_seed (pipeline/stages.py): one store stage per seed before that seed's arms,
every arm that can read a store pointed at its seed's, the others left online."""

import os

from megatron_ddk.pipeline.config import load_pipeline_config
from megatron_ddk.pipeline.plan import PipelinePlan
from megatron_ddk.pipeline.stages import arm_stages

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STUDY = os.path.join(ROOT, "megatron_ddk", "examples", "study", "pipeline.yaml")


def _stages(tmp_path, *overrides):
    cfg = load_pipeline_config(STUDY, overrides, out=str(tmp_path))
    return PipelinePlan(cfg), {s.name: s for s in arm_stages(PipelinePlan(cfg))}


def test_study_builds_one_store_per_seed_and_points_its_arms_at_it(tmp_path):
    plan, stages = _stages(tmp_path)
    seeds = plan.cfg.seeds
    stores = [n for n in stages if n.startswith("teacher_store/")]
    assert stores == [f"teacher_store/seed{s}" for s in seeds]
    names = list(stages)
    for seed in seeds:
        folder = os.path.join(plan.out, "teacher_store", f"seed{seed}")
        for arm in ("DDK", "DDK_noFS", "ES", "KD"):
            st = stages[f"{arm}/seed{seed}"]
            assert f"teacher_store/seed{seed}" in st.deps
            assert st.settings["distill"]["teacher_logits"] == folder
            assert names.index(f"teacher_store/seed{seed}") < names.index(f"{arm}/seed{seed}")
        for arm in ("CPT", "DDK_train"):  # no teacher / a training-batch signal: no store
            st = stages[f"{arm}/seed{seed}"]
            assert "teacher_logits" not in (st.settings.get("distill") or {})
            assert not any(d.startswith("teacher_store/") for d in st.deps)
    st = stages[f"teacher_store/seed{seeds[0]}"]
    st.prepare()
    argv = st.command(False)
    cover = argv[argv.index("--cover-runs") + 1:]
    assert len(cover) == 4 and all(p.endswith(".yaml") and os.path.isfile(p) for p in cover)
    assert argv[argv.index("--out") + 1] == os.path.join(plan.out, "teacher_store",
                                                         f"seed{seeds[0]}")


def test_store_settings_pass_through_and_per_seed_off_changes_nothing(tmp_path):
    _, stages = _stages(tmp_path, "teacher_store.top_k=8", "teacher_store.logprob_codec=q4",
                        "teacher_store.id_codec=packed", "teacher_store.tail_samples=0")
    st = stages["teacher_store/seed1234"]
    assert st.settings["flags"] == ["--top-k", "8", "--logprob-codec", "q4", "--id-codec",
                                    "packed", "--tail-samples", "0"]
    _, off = _stages(tmp_path / "off", "teacher_store.per_seed=false")
    assert not any(n.startswith("teacher_store/") for n in off)
    assert "teacher_logits" not in (off["KD/seed1234"].settings.get("distill") or {})


def test_arms_of_another_temperature_get_their_own_store(tmp_path):
    _, stages = _stages(tmp_path, "seeds=[1234]")
    plan = PipelinePlan(load_pipeline_config(STUDY, ["seeds=[1234]"], out=str(tmp_path)))
    plan.cfg.arms[0].run = {"ddk": {"policy": "ddk"}, "distill": {"temperature": 2.0}}
    stages = {s.name: s for s in arm_stages(plan)}
    assert {n for n in stages if n.startswith("teacher_store/")} == {
        "teacher_store/seed1234", "teacher_store/seed1234_1"}
    assert stages["DDK/seed1234"].settings["distill"]["teacher_logits"].endswith("seed1234")
    assert stages["KD/seed1234"].settings["distill"]["teacher_logits"].endswith("seed1234_1")
