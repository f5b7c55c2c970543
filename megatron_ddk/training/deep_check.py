"""`megatron-ddk check-config --deep`: the config against the files it names, before any model.

The static checks see one YAML; the expensive mismatches are between the YAML and the files it
names, and a run would only find them after loading data and building both models. This reads:
- the manifest (load_manifest: datasets, counts) and its tokenizer (file hash vs the manifest's);
- the metadata of every checkpoint the run reads (distill.teacher_load, checkpoint.load):
  tokenizer hash, tokenizer vocabulary, padded embedding rows and model shape;
- the checkpoint.save folder (would a fresh run be refused: training/run_folder.py);
and returns every problem, each naming the field, the file and both values. It builds nothing
and imports no torch (megatron.core only for the .idx counts of the manifest's datasets).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

from megatron_ddk.config.schema import ModelConfig, RunConfig
from megatron_ddk.config.validate import static_errors
from megatron_ddk.models.checkpoint_layout import (
    SHAPE_FIELDS,
    CheckpointError,
    model_differences,
    read_metadata,
    resolve_checkpoint,
)
from megatron_ddk.models.teacher_config import teacher_problems
from megatron_ddk.models.vocab import model_padded_size
from megatron_ddk.training.run_folder import resolve_load, save_folder_errors


def _manifest_errors(cfg: RunConfig) -> Tuple[Optional[Any], List[str]]:
    """(the loaded manifest or None, its problems)."""
    from megatron_ddk.data.manifest import load_manifest
    from megatron_ddk.data.tokenizer import tokenizer_hash

    if not cfg.data.manifest:
        return None, ["data.manifest is not set: give the domain manifest YAML written by "
                      "`megatron-ddk build-domains`"]
    try:
        manifest = load_manifest(cfg.data.manifest)
    except (ValueError, OSError) as exc:
        return None, [f"data.manifest: {exc}"]
    try:
        found = tokenizer_hash(manifest.tokenizer_model)
    except (ValueError, OSError) as exc:
        return manifest, [f"data.manifest {cfg.data.manifest}: tokenizer: {exc}"]
    if found != manifest.tokenizer_hash:
        return manifest, [f"data.manifest {cfg.data.manifest}: tokenizer "
                          f"{manifest.tokenizer_model} has hash {found} but the manifest records "
                          f"{manifest.tokenizer_hash}: rebuild the domains with this tokenizer"]
    from megatron_ddk.data.manifest import check_vocab_size
    from megatron_ddk.data.tokenizer import build_tokenizer

    try:  # what a run checks next (manifest.load_manifest_and_tokenizer)
        check_vocab_size(manifest, build_tokenizer(manifest.tokenizer_model).vocab_size)
    except ValueError as exc:
        return manifest, [f"data.manifest: {exc}"]
    return manifest, []


def _vocab_errors(models: Dict[str, ModelConfig], vocab: int, tp: int,
                  manifest_path: str) -> Tuple[Optional[int], List[str]]:
    """(the common padded vocabulary or None, why the models do not fit the tokenizer)."""
    errs, sizes = [], []
    for where, m in models.items():
        if m.vocab_size is not None and m.vocab_size != vocab:
            errs.append(f"{where}.vocab_size={m.vocab_size} but the tokenizer of {manifest_path} "
                        f"has {vocab} entries: remove {where}.vocab_size or use that tokenizer")
        try:
            sizes.append(model_padded_size(m, vocab, tp))
        except ValueError as exc:
            errs.append(f"{where}.{exc} (tokenizer of {manifest_path})")
            continue
        if m.padded_vocab_size is not None and m.padded_vocab_size > 2 * vocab:
            errs.append(f"{where}.padded_vocab_size={m.padded_vocab_size} is more than twice the "
                        f"{vocab} entries of the tokenizer of {manifest_path}: this model was "
                        f"configured for another tokenizer; remove padded_vocab_size or use the "
                        f"data of that tokenizer")
    return (max(sizes) if sizes else None), errs


def _checkpoint_errors(field: str, path: str, model: Optional[ModelConfig], manifest,
                       padded: Optional[int], compare_shape: bool) -> List[str]:
    """What in one checkpoint's metadata disagrees with the data and the model to be built."""
    try:
        folder, _ = resolve_checkpoint(path)
        meta = read_metadata(folder)
    except CheckpointError as exc:
        return [f"{field}: {exc}"]
    errs, where = [], f"{field}={path}"
    if manifest is not None:
        saved_hash = meta.get("tokenizer_hash")
        if saved_hash and saved_hash != manifest.tokenizer_hash:
            errs.append(f"{where} was trained with tokenizer {saved_hash} but data.manifest uses "
                        f"{manifest.tokenizer_hash}: teacher, student and data must share a "
                        f"tokenizer")
        saved_vocab = meta.get("vocab_size")
        if saved_vocab is not None and saved_vocab != manifest.vocab_size:
            errs.append(f"{where} has a {saved_vocab}-entry tokenizer vocabulary but "
                        f"data.manifest's tokenizer has {manifest.vocab_size}")
    saved_rows = meta.get("padded_vocab_size")
    if padded is not None and saved_rows is not None and saved_rows != padded:
        errs.append(f"{where} has {saved_rows} embedding rows but this run builds its models with "
                    f"{padded}: set the padded_vocab_size of both models to {saved_rows} or "
                    f"convert the checkpoint")
    if compare_shape and model is not None and meta.get("model"):
        diffs = model_differences(meta["model"], dataclasses.asdict(model), SHAPE_FIELDS)
        if diffs:
            errs.append(f"{where} holds another model shape than model: " + "; ".join(diffs))
    return errs


def deep_errors(cfg: RunConfig, world_size: Optional[int] = None) -> List[str]:
    """Every static, teacher, data, checkpoint and save-folder problem of `cfg` (empty: none)."""
    uses_teacher = cfg.distill.teacher is not None
    teacher, errs = teacher_problems(cfg)
    if teacher is not None or not errs:  # unresolved from_checkpoint: static checks skip its shape
        cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher=teacher))
    errs += static_errors(cfg, world_size)
    manifest, more = _manifest_errors(cfg)
    errs += more
    padded = None
    models = {"model": cfg.model}
    if teacher is not None:
        models["distill.teacher"] = teacher
    if manifest is not None:
        padded, more = _vocab_errors(models, manifest.vocab_size,
                                     cfg.parallel.tensor_model_parallel_size, cfg.data.manifest)
        errs += more
    if cfg.distill.teacher_load and uses_teacher:
        errs += _checkpoint_errors("distill.teacher_load", cfg.distill.teacher_load, teacher,
                                   manifest, padded, compare_shape=False)  # teacher_problems did
    try:
        cfg = resolve_load(cfg)
    except ValueError as exc:
        return errs + [str(exc)]
    if cfg.checkpoint.load:
        errs += _checkpoint_errors("checkpoint.load", cfg.checkpoint.load, cfg.model, manifest,
                                   padded, compare_shape=True)
    errs += save_folder_errors(cfg)
    return errs
