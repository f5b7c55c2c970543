"""The pipeline's stages as commands: data, models, arms x seeds, evaluations, report, exports.

`build_stages(plan)` returns them in run order; each is an ordinary `megatron-ddk`
subcommand (docs/pipeline.md lists them), so any stage can be rerun by hand from its log's first
line.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Any, Callable, Dict, List

from megatron_ddk.config.schema import DistillConfig
from megatron_ddk.pipeline.config import ArmSpec, deep_merge
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


def _corpus_files(plan: PipelinePlan) -> List[str]:
    """What the datasets stage reads, for its stamp: the corpus folder or file, every file a
    glob matches, and the same of data.inputs."""
    found = []
    for given in [plan.corpus, *(plan.cfg.data.inputs or [])]:
        path = os.path.abspath(given)
        found += [path] if os.path.exists(path) else sorted(glob.glob(path, recursive=True))
    return found


def _source_flags(data) -> List[str]:
    """build_domains' flags for a mixed corpus (DataSpec: field, map, clustering)."""
    args = [] if data.text_key == "text" else ["--text-key", data.text_key]
    if data.cluster is not None:
        args += ["--domains", data.cluster.domains_flag,
                 "--cluster-sample", str(data.cluster.sample)]
    elif data.domains:
        args += ["--domains", ",".join(data.domains)]
    if data.domain_field:
        args += ["--domain-field", data.domain_field]
    if data.default_domain is not None:
        args += ["--default-domain", data.default_domain]
    if data.domain_map:
        args += ["--domain-map", json.dumps(data.domain_map, sort_keys=True)]
    if data.min_domain_documents:
        args += ["--min-domain-documents", str(data.min_domain_documents),
                 "--small-domains", data.small_domains]
    return args


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
        argv = [PY, "-m", "megatron_ddk.cli", "demo-corpus", "--output-dir", plan.corpus,
                "--max-mb", str(mb), "--min-mb", str(min(0.3, (min(sizes) if sizes else mb) / 2)),
                "--max-doc-kb", str(min(32.0, mb * 1000 / 16))]
        if sizes:
            argv += ["--sizes-mb", ",".join(str(x) for x in sizes)]
        stages.append(Stage(name="corpus", settings={"argv": argv}, command=lambda _r: argv,
                            outputs=[plan.corpus], clean=[plan.corpus]))
        deps = ["corpus"]
    else:
        inputs = _corpus_files(plan)
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
    args += [a for given in cfg.data.inputs or [] for a in ("--input", os.path.abspath(given))]
    args += _source_flags(cfg.data)
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
        argv = [PY, "-m", "megatron_ddk.cli", "convert-hf", "--hf-dir",
                os.path.abspath(spec.hf_dir), "--save", save]
        return Stage(name=name, command=lambda _r: argv, settings={"argv": argv},
                     inputs=[os.path.abspath(spec.hf_dir)], deps=deps, outputs=[_latest(save)],
                     clean=[plan.run_dir(name)])
    path = plan.ckpt(name)  # an existing checkpoint: checked, fingerprinted, not copied
    argv = [PY, "-c", "import sys; from megatron_ddk.models.checkpoint import resolve_checkpoint;"
            " print(resolve_checkpoint(sys.argv[1]))", path]
    return Stage(name=name, command=lambda _r: argv, settings={"checkpoint": path},
                 inputs=[path], deps=deps, outputs=[path])


def _reads_store(plan: PipelinePlan, arm: ArmSpec, seed: int) -> bool:
    """Whether this arm x seed reads its seed's teacher store (teacher_store.per_seed)."""
    if not (plan.cfg.teacher_store.per_seed and arm.teacher and arm.teacher_store):
        return False
    data = plan.arm_config(arm, seed, resolve=False)
    return ((data.get("ddk") or {}).get("signal", "validation") == "validation"
            and (data.get("distill") or {}).get("kl_direction", "forward") == "forward")


def _store_identity(plan: PipelinePlan, arm: ArmSpec, seed: int) -> tuple:
    """What, besides the seed, a store is tied to that arms may set differently."""
    data = plan.arm_config(arm, seed, resolve=False)
    return (float((data.get("distill") or {}).get("temperature", DistillConfig().temperature)),
            (data.get("data") or {}).get("seq_length"),
            (data.get("ddk") or {}).get("valid_samples_per_domain"))


def store_groups(plan: PipelinePlan, seed: int) -> Dict[str, List[ArmSpec]]:
    """Store folder -> the arms of `seed` that read it (one per distinct _store_identity)."""
    groups: Dict[tuple, List[ArmSpec]] = {}
    for arm in plan.cfg.arms:
        if _reads_store(plan, arm, seed):
            groups.setdefault(_store_identity(plan, arm, seed), []).append(arm)
    base = os.path.join(plan.out, "teacher_store", f"seed{seed}")
    return {base + ("" if i == 0 else f"_{i}"): arms for i, arms in enumerate(groups.values())}


def _store_stage(plan: PipelinePlan, seed: int, folder: str, arms: List[ArmSpec]) -> Stage:
    """`megatron-ddk cache-teacher` for the arms of one seed (covering what each can draw)."""
    spec, paths = plan.cfg.teacher_store, {}
    name = "teacher_store/" + os.path.basename(folder)
    flags: List[str] = []
    for key in ("top_k", "top_p", "logprob_codec", "compression", "id_codec", "tail_samples"):
        if getattr(spec, key) is not None:
            flags += ["--" + key.replace("_", "-"), str(getattr(spec, key))]

    def prepare() -> None:
        paths["cover"] = [plan.write_config(f"{name}_{a.name}", plan.arm_config(a, seed))
                          for a in arms]

    def command(_resume: bool) -> List[str]:
        return _cli(plan, ["cache-teacher", "--config", paths["cover"][0], "--out", folder,
                           "--cover-runs", *paths["cover"], *flags])

    settings = {"flags": flags, "arms": [plan.arm_config(a, seed, resolve=False) for a in arms]}
    return Stage(name=name, command=command, prepare=prepare, settings=settings,
                 deps=["teacher", "student"], outputs=[os.path.join(folder, "header.json")],
                 clean=[folder], resumable=True)


def arm_stages(plan: PipelinePlan) -> List[Stage]:
    """teacher_store.per_seed: one store stage per seed; then one training stage per arm x seed
    (reading its seed's store when it can)."""
    stages, store_of = [], {}
    for seed in plan.cfg.seeds:
        for folder, arms in store_groups(plan, seed).items():
            stages.append(_store_stage(plan, seed, folder, arms))
            store_of.update({(a.name, seed): (folder, stages[-1].name) for a in arms})
    for arm in plan.cfg.arms:
        for seed in plan.cfg.seeds:
            name = plan.arm_name(arm, seed)
            deps = ["student"] + (["teacher"] if arm.teacher else [])
            settings = plan.arm_config(arm, seed, resolve=False)
            store = store_of.get((arm.name, seed))
            extra = {} if store is None else {"distill": {"teacher_logits": store[0]}}
            if store is not None:
                deps.append(store[1])
                settings = deep_merge(settings, extra)
            stages.append(_train(plan, name, lambda a=arm, s=seed, e=extra:
                                 deep_merge(plan.arm_config(a, s), e), settings, deps, True))
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
            argv = [PY, "-m", "megatron_ddk.cli", "export-hf", "--load", plan.ckpt(name),
                    "--out", out, "--dtype", plan.cfg.export.dtype]
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
