"""The pipeline's stages as commands: data, models, arms x seeds, evaluations, report, exports.

`build_stages(plan)` returns them in run order; each is an ordinary `megatron-ddk`
subcommand (docs/pipeline.md lists them), so any stage can be rerun by hand from its log's first
line.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Dict, List

from megatron_ddk.pipeline.plan import PY, PipelinePlan
from megatron_ddk.pipeline.stage import Stage


def _cli(plan: PipelinePlan, args: List[str]) -> List[str]:
    """`megatron-ddk ARGS`, under torchrun when launch.nproc_per_node > 1."""
    n = plan.cfg.launch.nproc_per_node
    if n > 1:
        return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                "-m", "megatron_ddk.cli"] + args
    return [PY, "-m", "megatron_ddk.cli"] + args


def _latest(save: str) -> str:
    return os.path.join(save, "latest_checkpointed_iteration.txt")


def data_stages(plan: PipelinePlan) -> List[Stage]:
    """corpus (demo only) and datasets; none when the config names a manifest."""
    cfg, stages = plan.cfg, []
    if cfg.data.manifest:
        return stages
    deps, inputs = [], []
    if cfg.data.uses_demo:
        sizes = cfg.data.demo_sizes_mb
        mb = max(sizes) if sizes else cfg.data.demo_corpus_mb
        # small demos: smaller sources and documents qualify
        argv = [PY, "-m", "megatron_ddk.cli", "demo-corpus", "--output-dir", plan.corpus, "--max-mb",
                str(mb), "--min-mb", str(min(0.3, (min(sizes) if sizes else mb) / 2)),
                "--max-doc-kb", str(min(32.0, mb * 1000 / 16))]
        if sizes:
            argv += ["--sizes-mb", ",".join(str(x) for x in sizes)]
        stages.append(Stage(name="corpus", settings={"argv": argv}, command=lambda _r: argv,
                            outputs=[plan.corpus], clean=[plan.corpus]))
        deps = ["corpus"]
    else:
        inputs = [plan.corpus]
    split_len = cfg.data.split_seq_length or plan.seq_length
    tok = cfg.tokenizer
    tok_model = (os.path.abspath(tok.model) if tok.model and not tok.train else
                 os.path.join(plan.data_dir, "tokenizer", "tokenizer.model"))
    if tok.model and not tok.train:
        inputs.append(tok_model)
    args = [PY, "-m", "megatron_ddk.cli", "build-domains", "--input", plan.corpus,
            "--output-dir", os.path.dirname(plan.manifest), "--tokenizer-model", tok_model,
            "--valid-samples", str(cfg.data.valid_samples), "--valid-seq-length", str(split_len),
            "--test-samples", str(cfg.data.test_samples), "--test-seq-length", str(split_len),
            "--workers", str(cfg.data.workers), "--max-piece-bytes", str(cfg.data.max_piece_bytes),
            "--min-heldout-documents", str(cfg.data.min_heldout_documents)]
    if tok.train:
        args += ["--train-tokenizer", "--vocab-size", str(tok.vocab_size)]
    if cfg.data.domains:
        args += ["--domains", ",".join(cfg.data.domains)]
    datasets = os.path.dirname(plan.manifest)
    stages.append(Stage(name="datasets", command=lambda _r: args, settings={"argv": args},
                        inputs=inputs, deps=deps, outputs=[plan.manifest],
                        clean=[datasets, os.path.dirname(tok_model)] if tok.train else [datasets]))
    return stages


def _train(plan: PipelinePlan, name: str, make: Callable[[], Dict[str, Any]],
           settings: Dict[str, Any], deps: List[str], continues: bool) -> Stage:
    """A training stage; a killed run resumes from its own save folder with its full state."""
    paths: Dict[str, str] = {}

    def prepare() -> None:
        paths["config"] = plan.write_config(name, make())

    def command(resume: bool) -> List[str]:
        save = plan.ckpt(name)
        args = ["train", "--config", paths["config"]]
        if resume and os.path.isfile(_latest(save)):
            return _cli(plan, args + ["--load", save] +
                        (["checkpoint.finetune=false"] if continues else []))
        shutil.rmtree(plan.run_dir(name), ignore_errors=True)  # killed before its first save
        return _cli(plan, args)

    return Stage(name=name, command=command, settings=settings, deps=deps,
                 outputs=[_latest(plan.ckpt(name))], clean=[plan.run_dir(name)],
                 resumable=True, prepare=prepare)


def model_stage(plan: PipelinePlan, name: str, deps: List[str]) -> Stage:
    """Pre-train, convert or adopt the teacher / the student."""
    spec = getattr(plan.cfg, name)
    if spec.source == "pretrain":
        settings = plan.pretrain_config(name)
        return _train(plan, name, lambda: plan.pretrain_config(name), settings, deps, False)
    if spec.source == "huggingface":
        save = plan.ckpt(name)
        argv = [PY, "-m", "megatron_ddk.cli", "convert-hf", "--hf-dir", os.path.abspath(spec.hf_dir),
                "--save", save]
        return Stage(name=name, command=lambda _r: argv, settings={"argv": argv},
                     inputs=[os.path.abspath(spec.hf_dir)], deps=deps, outputs=[_latest(save)],
                     clean=[plan.run_dir(name)])
    path = plan.ckpt(name)  # an existing checkpoint: checked, fingerprinted, not copied
    argv = [PY, "-c", "import sys; from megatron_ddk.models.checkpoint import resolve_checkpoint;"
            " print(resolve_checkpoint(sys.argv[1]))", path]
    return Stage(name=name, command=lambda _r: argv, settings={"checkpoint": path},
                 inputs=[path], deps=deps, outputs=[path])


def arm_stages(plan: PipelinePlan) -> List[Stage]:
    """One training stage per arm x seed."""
    stages = []
    for arm in plan.cfg.arms:
        for seed in plan.cfg.seeds:
            name = plan.arm_name(arm, seed)
            deps = ["student"] + (["teacher"] if arm.teacher else [])
            settings = plan.arm_config(arm, seed, resolve=False)
            stages.append(_train(plan, name, lambda a=arm, s=seed: plan.arm_config(a, s),
                                 settings, deps, True))
    return stages


def eval_path(plan: PipelinePlan, name: str) -> str:
    return os.path.join(plan.out, "eval", name.replace("/", "_") + ".json")


def eval_stages(plan: PipelinePlan) -> List[Stage]:
    """Held-out evaluation of the teacher, the starting student and every arm x seed."""
    split = plan.cfg.evaluation.split
    samples = plan.cfg.data.test_samples if split == "test" else plan.cfg.data.valid_samples
    jobs = [("teacher", "teacher", "teacher"), ("student_before", "student", "student")]
    jobs += [(plan.arm_name(a, s), plan.arm_name(a, s), "student")
             for a in plan.cfg.arms for s in plan.cfg.seeds]
    stages = []
    for label, producer, model in jobs:
        out = eval_path(plan, label)
        paths: Dict[str, str] = {}

        def prepare(label=label, model=model, paths=paths) -> None:
            paths["config"] = plan.write_config(f"eval_{label}", plan.eval_config(model))

        def command(_resume, producer=producer, out=out, paths=paths) -> List[str]:
            return _cli(plan, ["eval", "--config", paths["config"], "--load",
                               plan.ckpt(producer), "--split", split, "--samples", str(samples),
                               "--output", out])

        stages.append(Stage(name=f"eval/{label}", command=command, prepare=prepare,
                            settings={"split": split, "samples": samples},
                            deps=[producer], outputs=[out], clean=[out]))
    return stages


def _label(plan: PipelinePlan, arm: str, seed: int) -> str:
    """Column name of an arm x seed in the report: the arm alone when there is one seed."""
    return arm if len(plan.cfg.seeds) == 1 else f"{arm}@{seed}"


def report_stage(plan: PipelinePlan, timing_path: str) -> Stage:
    """`megatron-ddk report` over every evaluation and arm run folder."""
    first = plan.cfg.seeds[0]
    argv = [PY, "-m", "megatron_ddk.cli", "report", "--out", os.path.join(plan.out, "report.md"),
            "--timing", timing_path, "--title", f"megatron-ddk pipeline: {plan.out}",
            "--eval", f"teacher={eval_path(plan, 'teacher')}",
            "--eval", f"student_before={eval_path(plan, 'student_before')}"]
    deps = ["eval/teacher", "eval/student_before"]
    for arm in plan.cfg.arms:
        for seed in plan.cfg.seeds:
            name = plan.arm_name(arm, seed)
            argv += ["--eval", f"{_label(plan, arm.name, seed)}={eval_path(plan, name)}",
                     "--run", f"{_label(plan, arm.name, seed)}={plan.run_dir(name)}"]
            deps.append(f"eval/{name}")
    argv += ["--ddk-name", _label(plan, "DDK", first), "--kd-name", _label(plan, "KD", first)]
    if plan.cfg.lm_eval.tasks:
        for arm in plan.cfg.arms:
            for seed in plan.cfg.seeds:
                name = plan.arm_name(arm, seed)
                argv += ["--lm-eval", f"{_label(plan, arm.name, seed)}={lm_eval_path(plan, name)}"]
                deps.append(f"lm-eval/{name}")
    out = os.path.join(plan.out, "report.md")
    return Stage(name="report", command=lambda _r: argv, settings={"argv": argv}, deps=deps,
                 outputs=[out])


def export_stages(plan: PipelinePlan) -> List[Stage]:
    """Hugging Face folders of the arms named in export.arms (every seed)."""
    stages = []
    for arm in plan.cfg.arms:
        if arm.name not in plan.cfg.export.arms:
            continue
        for seed in plan.cfg.seeds:
            name = plan.arm_name(arm, seed)
            out = os.path.join(plan.out, "hf", f"{arm.name}-seed{seed}")
            argv = [PY, "-m", "megatron_ddk.cli", "export-hf", "--load", plan.ckpt(name), "--out", out,
                    "--dtype", plan.cfg.export.dtype]
            stages.append(Stage(name=f"export/{name}", command=lambda _r, a=argv: a,
                                settings={"argv": argv}, deps=[name],
                                outputs=[os.path.join(out, "config.json")], clean=[out]))
    return stages


def lm_eval_path(plan: PipelinePlan, name: str) -> str:
    return os.path.join(plan.out, "lm_eval", name.replace("/", "_") + ".json")


def lm_eval_stages(plan: PipelinePlan) -> List[Stage]:
    """Downstream evaluation (lm-evaluation-harness) of every arm x seed, when tasks are set."""
    spec = plan.cfg.lm_eval
    if not spec.tasks:
        return []
    stages = []
    for arm in plan.cfg.arms:
        for seed in plan.cfg.seeds:
            name = plan.arm_name(arm, seed)
            out = lm_eval_path(plan, name)
            argv = [PY, "-m", "megatron_ddk.cli", "lm-eval", "--load", plan.ckpt(name),
                    "--tasks", ",".join(spec.tasks), "--output", out]
            if any(t.startswith("ddk_") for t in spec.tasks):  # local tasks: the test split
                argv += ["--manifest", plan.manifest]
            if spec.limit:
                argv += ["--limit", str(spec.limit)]
            stages.append(Stage(name=f"lm-eval/{name}", command=lambda _r, a=argv: a,
                                settings={"argv": argv}, deps=[name], outputs=[out],
                                clean=[out]))
    return stages
