"""The stages of a pipeline config, in order, as real commands (see docs/pipeline.md).

    corpus (demo only) -> datasets (tokenizer + train/valid/test + manifest)
    -> teacher (pre-train | checkpoint | convert) -> student (same)
    -> arm x seed (CPT / KD / DDK / ablations, continuing the student on one token budget)
    -> eval/<model> (test split) -> report -> export/<arm>/seed<s> -> lm-eval/<arm>/seed<s>

Run configs are generated under <out>/configs/ from the common `run` section, the stage's own
sections and the paths this module chooses; every one is loaded and statically checked before
the first stage runs (`PipelinePlan.check`). Imports the config, models (checkpoint metadata)
and data (manifest) layers; nothing imports this module but the runner.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Any, Dict, List, Tuple

import yaml

from megatron_ddk.atomic import write_atomic
from megatron_ddk.config import to_dict
from megatron_ddk.config.loader import ConfigError
from megatron_ddk.config.schema import ModelConfig
from megatron_ddk.pipeline.config import ArmSpec, ModelStageSpec, PipelineConfig, deep_merge
from megatron_ddk.training.prepare import prepare_run

PY = sys.executable
PRETRAIN_SEEDS = {"teacher": 101, "student": 202}
"""Default train.seed of the pre-training stages: distinct from the arms' seeds, so the
continuations read the corpus in another order than the runs that made their starting points."""


def _latest_checkpoint(save: str) -> bool:
    return os.path.isfile(os.path.join(save, "latest_checkpointed_iteration.txt"))


class PipelinePlan:
    """Paths, generated configs and stages of one pipeline run."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.out = os.path.abspath(cfg.out)
        self.data_dir = os.path.join(self.out, "data")
        self.configs = os.path.join(self.out, "configs")
        if cfg.data.manifest:
            self.manifest = os.path.abspath(cfg.data.manifest)
        else:
            self.manifest = os.path.join(self.data_dir, "datasets", "manifest.yaml")
        self.corpus = (os.path.join(self.data_dir, "corpus") if cfg.data.uses_demo
                       else cfg.data.corpus and os.path.abspath(cfg.data.corpus))

    # ----------------------------------------------------------------------------- paths
    def run_dir(self, name: str) -> str:
        """Run folder of a training stage (teacher, student, ARM/seedS)."""
        return os.path.join(self.out, "runs", name)

    def ckpt(self, name: str) -> str:
        """Checkpoint folder of a model: produced by a stage, or the one the config names."""
        spec = getattr(self.cfg, name, None) if name in ("teacher", "student") else None
        if spec is not None and spec.source == "checkpoint":
            return os.path.abspath(spec.checkpoint)
        return os.path.join(self.run_dir(name), "ckpt")

    def arm_name(self, arm: ArmSpec, seed: int) -> str:
        return f"{arm.name}/seed{seed}"

    @property
    def seq_length(self) -> int:
        return int((self.cfg.run.get("data") or {}).get("seq_length", 256))

    # ----------------------------------------------------------------------------- configs
    def _model_of(self, name: str) -> Dict[str, Any]:
        """The architecture of the teacher or student: pre-train spec, else checkpoint metadata."""
        spec: ModelStageSpec = getattr(self.cfg, name)
        if spec.source == "pretrain":
            return to_dict(spec.model)
        meta = self._metadata(self.ckpt(name))
        if meta.get("model"):
            return meta["model"]
        if spec.model is not None:
            return to_dict(spec.model)
        raise ConfigError(f"{name}: checkpoint {self.ckpt(name)} records no model (a Megatron-LM "
                          f"checkpoint); give {name}.model with its architecture")

    @staticmethod
    def _metadata(path: str) -> Dict[str, Any]:
        from megatron_ddk.models.checkpoint_layout import read_metadata, resolve_checkpoint

        folder, _ = resolve_checkpoint(path)
        return read_metadata(folder)

    def _base(self, name: str, *sections: Dict[str, Any]) -> Dict[str, Any]:
        data = deep_merge({}, self.cfg.run)
        for section in sections:
            data = deep_merge(data, section)
        data.setdefault("data", {})["manifest"] = self.manifest
        data.setdefault("logging", {})["run_dir"] = self.run_dir(name)
        data.setdefault("checkpoint", {})["save"] = self.ckpt(name)
        return data

    def pretrain_config(self, name: str) -> Dict[str, Any]:
        """Run config that pre-trains the teacher or the student on the natural mixture."""
        spec: ModelStageSpec = getattr(self.cfg, name)
        if spec.model is None:
            raise ConfigError(f"{name}.model: required with {name}.source: pretrain")
        data = self._base(name, spec.run)
        data["model"] = to_dict(spec.model)
        data["distill"] = {"teacher": None, "teacher_load": None}
        data.setdefault("ddk", {})["policy"] = "static"
        data.setdefault("train", {}).setdefault("seed", PRETRAIN_SEEDS[name])
        return data

    def arm_config(self, arm: ArmSpec, seed: int, resolve: bool = True) -> Dict[str, Any]:
        """Run config of one arm x seed, continuing the student (weights only)."""
        data = self._base(self.arm_name(arm, seed), self.cfg.continuation, arm.run)
        data["model"] = self._model_of("student") if resolve else to_dict(
            self.cfg.student.model or ModelConfig())
        distill = data.setdefault("distill", {})
        if arm.teacher:
            distill["teacher_load"] = self.ckpt("teacher")
            distill["teacher"] = self._model_of("teacher") if resolve else to_dict(
                self.cfg.teacher.model or ModelConfig())
        else:
            distill.update(teacher=None, teacher_load=None)
        data["checkpoint"].update(load=self.ckpt("student"), finetune=True)
        data.setdefault("train", {})["seed"] = seed
        return data

    def eval_config(self, model: str) -> Dict[str, Any]:
        """Run config that `megatron-ddk eval` reads for the teacher or the student."""
        if getattr(self.cfg, model).source == "pretrain":
            data = self.pretrain_config(model)
        else:  # eval trains nothing, but the static checks want a consistent budget
            data = deep_merge(self._base(f"eval_{model}"),
                              {"train": {"train_iters": 1, "lr_warmup_iters": 0}})
            data["model"] = self._model_of(model)
        data["logging"]["run_dir"] = os.path.join(self.out, "logs", "eval_runs")
        data["checkpoint"] = {}
        data["distill"] = {"teacher": None, "teacher_load": None}
        return data

    def write_config(self, name: str, data: Dict[str, Any]) -> str:
        path = os.path.join(self.configs, name.replace("/", "_") + ".yaml")
        os.makedirs(self.configs, exist_ok=True)
        write_atomic(path, yaml.safe_dump(data, sort_keys=False))
        return path

    def check(self) -> None:
        """Load and statically check every run config that can be built now (before any stage
        runs): a typo, an unknown policy or an impossible layout fails here, naming the stage."""
        cfg = self.cfg
        if cfg.data.corpus and not (os.path.exists(self.corpus) or glob.glob(self.corpus)):
            raise ConfigError(f"data.corpus: corpus folder or file {self.corpus} does not exist "
                              "(nor matches a file as a glob); give a folder of per-domain "
                              ".jsonl/.txt files, or a file, folder or glob of a mixed corpus "
                              "with data.domain_field / data.cluster, with --corpus PATH")
        if cfg.data.manifest and not os.path.isfile(self.manifest):
            raise ConfigError(f"data.manifest: {self.manifest} does not exist")
        if cfg.tokenizer.model and not os.path.exists(cfg.tokenizer.model):
            raise ConfigError(f"tokenizer.model: {cfg.tokenizer.model} does not exist")
        if not cfg.tokenizer.train and not cfg.tokenizer.model and not cfg.data.manifest:
            raise ConfigError("tokenizer: give tokenizer.model or set tokenizer.train: true")
        if cfg.lm_eval.tasks:
            import importlib.util

            if importlib.util.find_spec("lm_eval") is None:
                raise ConfigError("lm_eval.tasks is set but lm-evaluation-harness is not "
                                  "installed: pip install -e '.[eval]' (or leave lm_eval.tasks "
                                  "empty)")
        for name in ("teacher", "student"):
            spec = getattr(cfg, name)
            if spec.source == "checkpoint" and not (spec.checkpoint
                                                    and os.path.exists(spec.checkpoint)):
                raise ConfigError(f"{name}.checkpoint: {spec.checkpoint!r} does not exist")
            if spec.source == "huggingface" and not (spec.hf_dir and os.path.isdir(spec.hf_dir)):
                raise ConfigError(f"{name}.hf_dir: {spec.hf_dir!r} is not a folder")
            if spec.source == "huggingface":
                self._check_hf_folder(name)
        checks: List[Tuple[str, Dict[str, Any]]] = []
        for name in ("teacher", "student"):
            if getattr(cfg, name).source == "pretrain":
                checks.append((name, self.pretrain_config(name)))
        resolve = all(getattr(cfg, n).source != "huggingface" for n in ("teacher", "student"))
        for arm in cfg.arms:
            for seed in cfg.seeds:
                checks.append((f"arm {arm.name} (seed {seed})",
                               self.arm_config(arm, seed, resolve)))
        clash = sorted(set(cfg.seeds) & {c[1]["train"]["seed"] for c in checks[:2]
                                          if c[0] in ("teacher", "student")})
        if clash:
            raise ConfigError(f"seeds {clash} equal a pre-training stage's train.seed: the arms "
                              f"would re-read the pre-training sample order; choose other seeds")
        for where, data in checks:  # the files do not exist yet: what train checks without them
            try:
                prepare_run(data, world_size=self.cfg.launch.nproc_per_node,
                            resolve_files=False, create_folders=False)
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        self._check_checkpoint_tokenizers()

    def _known_tokenizer(self):
        """The hash of the tokenizer the data will use, when it is known before any stage."""
        from megatron_ddk.data.tokenizer import tokenizer_hash

        if self.cfg.data.manifest:
            from megatron_ddk.data.manifest import load_manifest

            return load_manifest(self.manifest).tokenizer_hash
        if self.cfg.tokenizer.model and not self.cfg.tokenizer.train:
            return tokenizer_hash(self.cfg.tokenizer.model)
        return None

    def _check_hf_folder(self, name: str) -> None:
        """A Hugging Face teacher / student: its architecture is one convert-hf supports and its
        tokenizer is the one the data will use (read from the folder, before any stage)."""
        import json

        from megatron_ddk.data.hf_tokenizer import hf_tokenizer_file
        from megatron_ddk.data.tokenizer import tokenizer_hash
        from megatron_ddk.models.hf import hf_architecture

        hf_dir = os.path.abspath(getattr(self.cfg, name).hf_dir)
        path = os.path.join(hf_dir, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{name}.hf_dir: {hf_dir} has no config.json; give a Hugging "
                              f"Face model folder")
        with open(path) as f:
            try:
                hf_architecture(json.load(f), where=path)
            except ValueError as exc:
                raise ConfigError(f"{name}.hf_dir: {exc}") from None
        tok = hf_tokenizer_file(hf_dir)
        if tok is None:
            raise ConfigError(f"{name}.hf_dir: {hf_dir} has no tokenizer.model or tokenizer.json;"
                              f" the converted {name} needs its tokenizer")
        fix = f"set tokenizer: {{train: false, model: {tok}}}"
        if self.cfg.tokenizer.train:
            raise ConfigError(f"{name}.hf_dir: {hf_dir} brings its own tokenizer ({tok}) but "
                              f"tokenizer.train is true, so the data would use a new one; "
                              f"teacher, student and data must share a tokenizer: {fix}")
        known, theirs = self._known_tokenizer(), tokenizer_hash(tok)
        if known is not None and known != theirs:
            given = self.manifest if self.cfg.data.manifest else self.cfg.tokenizer.model
            raise ConfigError(f"{name}.hf_dir: its tokenizer {tok} ({theirs}) is not the "
                              f"pipeline's ({given}, {known}); {fix}"
                              + (" and rebuild the manifest" if self.cfg.data.manifest else ""))

    def _check_checkpoint_tokenizers(self) -> None:
        """Given checkpoints must be of the tokenizer the data will use (when it is known)."""
        known = self._known_tokenizer()
        for name in ("teacher", "student"):
            if getattr(self.cfg, name).source != "checkpoint":
                continue
            saved = self._metadata(self.ckpt(name)).get("tokenizer_hash")
            if saved and known is None:
                raise ConfigError(
                    f"{name}.checkpoint {self.ckpt(name)} was trained with tokenizer {saved}, "
                    f"but the pipeline trains a new tokenizer; set tokenizer.train: false and "
                    f"tokenizer.model to the checkpoint's tokenizer")
            if saved and known and saved != known:
                raise ConfigError(
                    f"{name}.checkpoint {self.ckpt(name)} was trained with tokenizer {saved} but "
                    f"the data use {known}; teacher, student and data must share a tokenizer")
