"""Convert a Hugging Face model folder (safetensors) into a megatron-ddk checkpoint.

    megatron-ddk convert-hf --hf-dir Qwen1.5-1.8B --save ckpt/qwen1.8b \
        [--padded-vocab-size 152064] [--make-vocab-size-divisible-by 128] \
        [--target-tensor-parallel-size 2 --target-pipeline-parallel-size 1] [--dtype auto]

Reads LlamaForCausalLM, Qwen2ForCausalLM (Qwen-1.5 / Qwen2) and MistralForCausalLM (without a
sliding window) with the `safetensors` package (one model.safetensors or shards listed in
model.safetensors.index.json); transformers is not needed. Writes

    SAVE/iter_0000000/ + SAVE/latest_checkpointed_iteration.txt   Megatron layout (torch_dist)
    SAVE/model.yaml       the `model:` section for run configs (also usable as distill.teacher)
    SAVE/tokenizer/       tokenizer.model / tokenizer.json / tokenizer_config.json ... when present

The checkpoint is written from a TP=1 model: dist_checkpointing reshards it to any TP/PP at load
time, so --target-tensor-parallel-size / --target-pipeline-parallel-size only validate the split
(heads, query groups, layers) and choose the vocabulary padding (Megatron's rule pads to a
multiple of make-vocab-size-divisible-by x TP). Embedding rows beyond the kept vocabulary
(--vocab-size, default the HF vocab_size) are zeros up to the padded size; the padded size is
written into model.yaml so that every TP builds the same number of rows. The conversion runs on
the CPU (GPUs are hidden) and holds the model once plus one HF tensor.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Dict, List, Optional

import yaml

from megatron_ddk.console import results, run_or_exit
from megatron_ddk.data.hf_tokenizer import copy_tokenizer_files, hf_tokenizer_file, tokenizer_size

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")


@dataclass
class ConversionPlan:
    """Everything decided before any weight is read."""

    arch: str
    """HF architecture name."""

    model: object
    """megatron_ddk ModelConfig of the converted model (padded_vocab_size set)."""

    hf_vocab_size: int
    """Embedding rows in the HF checkpoint."""

    kept_rows: int
    """HF embedding rows copied into the checkpoint (the rest, up to the padded size, are 0)."""

    weight_files: Dict[str, str]
    """HF tensor name -> safetensors file holding it."""

    hf_config: dict
    """The HF config.json, recorded in the checkpoint metadata for the export."""

    hf_dtype: str
    """Dtype of the HF weights (first tensor), e.g. 'BF16'."""


def _parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF model folder (config.json + safetensors)")
    p.add_argument("--save", required=True, help="checkpoint folder to write")
    p.add_argument("--padded-vocab-size", type=int, default=None,
                   help="embedding rows of the checkpoint (the common padded size of teacher and "
                        "student); default: Megatron's rule from --make-vocab-size-divisible-by")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=None,
                   help="HF rows to keep (default: config.json vocab_size, or the padded size "
                        "when that is smaller); the rest are dropped. When given it is also "
                        "written as model.vocab_size, which training checks against the data's "
                        "tokenizer (so give the tokenizer's size)")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1,
                   help="TP the checkpoint will be used at (validated; the checkpoint reshards)")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1,
                   help="PP the checkpoint will be used at (validated; the checkpoint reshards)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="checkpoint dtype; auto = bfloat16 for bf16 weights, else float32")
    p.add_argument("--ignore-sliding-window", action="store_true",
                   help="convert a sliding-window model, capping max_position_embeddings at "
                        "the window (where full attention gives the same result)")
    return p.parse_args(argv)


def _weight_files(hf_dir: str) -> Dict[str, str]:
    """HF tensor name -> safetensors file, from the index or the single model.safetensors."""
    from safetensors import safe_open

    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        return _indexed_weight_files(hf_dir, index)
    single = os.path.join(hf_dir, "model.safetensors")
    if not os.path.isfile(single):
        raise ValueError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json; only "
                         f"safetensors checkpoints convert (re-save .bin weights with "
                         f"save_pretrained(safe_serialization=True))")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def _indexed_weight_files(hf_dir: str, index: str) -> Dict[str, str]:
    """The index's weight_map, every file a .safetensors file inside hf_dir (ValueError for a
    name that leaves the folder, e.g. ../../x.safetensors or an absolute path or symlink)."""
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index}: not a safetensors index with a weight_map ({err})") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: weight_map must map tensor names to file names")
    root = os.path.realpath(hf_dir)
    files = {}
    for name, fname in weight_map.items():
        path = os.path.realpath(os.path.join(root, str(fname)))
        inside = os.path.commonpath([root, path]) == root and path != root
        if not (isinstance(fname, str) and inside and fname.endswith(".safetensors")):
            raise ValueError(f"{index}: weight_map[{name!r}] = {fname!r} is not a .safetensors "
                             f"file inside {hf_dir}; refusing to read it")
        files[name] = path
    return files


def _header_shapes(files: Dict[str, str]) -> tuple:
    """({name: shape}, dtype of the first tensor) read from safetensors headers only."""
    from safetensors import safe_open

    shapes, dtype = {}, None
    by_file: Dict[str, List[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as f:
            for name in names:
                sl = f.get_slice(name)
                shapes[name] = tuple(sl.get_shape())
                dtype = dtype or sl.get_dtype()
    return shapes, dtype or "F32"


def _vocab_sizes(args, hf_vocab: int, tp: int, where: str) -> tuple:
    """(kept rows, padded rows) from the flags; ValueError when they cannot work."""
    from megatron_ddk.models.vocab import pad_vocab_size

    padded = args.padded_vocab_size
    vocab = args.vocab_size or (min(hf_vocab, padded) if padded else hf_vocab)
    if vocab > hf_vocab:
        raise ValueError(f"--vocab-size={vocab} exceeds the {hf_vocab} embedding rows of {where}")
    if padded is None:
        padded = pad_vocab_size(vocab, args.make_vocab_size_divisible_by, tp)
    if padded < vocab:
        raise ValueError(f"--padded-vocab-size={padded} is smaller than the kept vocabulary "
                         f"{vocab}; pass --vocab-size to drop rows beyond it")
    if padded % tp:
        raise ValueError(f"--padded-vocab-size={padded} is not divisible by "
                         f"--target-tensor-parallel-size={tp}")
    tok = tokenizer_size(args.hf_dir) if vocab < hf_vocab else None
    if tok is not None and tok > vocab:
        raise ValueError(f"the tokenizer in {args.hf_dir} has ids up to {tok - 1} but only {vocab} "
                         f"embedding rows would be kept; raise --vocab-size/--padded-vocab-size")
    return vocab, padded


def _check_target_split(model, tp: int, pp: int, where: str) -> None:
    from megatron_ddk.config.validate import pipeline_split_errors

    groups = model.num_query_groups or model.num_attention_heads
    errs = []
    if tp < 1 or pp < 1:
        errs.append(f"target TP={tp} / PP={pp} must be >= 1")
    elif model.num_attention_heads % tp or groups % tp:
        errs.append(f"num_attention_heads={model.num_attention_heads} and num_key_value_heads="
                    f"{groups} must both be divisible by --target-tensor-parallel-size={tp}")
    if pp >= 1:
        errs += pipeline_split_errors(model, "model", pp)
    if errs:
        raise ValueError(f"{where}: " + "; ".join(errs))


def plan_conversion(args: argparse.Namespace) -> ConversionPlan:
    """Read config.json and the safetensors headers; decide the model and refuse what cannot be
    converted. No weights are read and no process group is started."""
    from megatron_ddk.models import hf

    cfg_path = os.path.join(args.hf_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{args.hf_dir}: no config.json; pass a Hugging Face model folder")
    with open(cfg_path) as f:
        hf_config = json.load(f)
    model = hf.model_config_from_hf(hf_config, ignore_sliding_window=args.ignore_sliding_window,
                                    make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                                    where=cfg_path)
    files = _weight_files(args.hf_dir)
    shapes, dtype = _header_shapes(files)
    hf.check_hf_shapes(shapes, model, model.vocab_size, args.hf_dir)
    _check_target_split(model, args.target_tensor_parallel_size,
                        args.target_pipeline_parallel_size, args.hf_dir)
    kept, padded = _vocab_sizes(args, model.vocab_size, args.target_tensor_parallel_size,
                                args.hf_dir)
    # model.vocab_size stays unset (training takes it from the manifest's tokenizer, and refuses
    # a different explicit value) unless the user named it.
    return ConversionPlan(arch=hf.hf_architecture(hf_config), hf_vocab_size=model.vocab_size,
                          kept_rows=kept, weight_files=files, hf_config=hf_config, hf_dtype=dtype,
                          model=replace(model, vocab_size=args.vocab_size,
                                        padded_vocab_size=padded))


def _copy_tokenizer(hf_dir: str, save: str) -> Optional[str]:
    """Copy the tokenizer files (hf_tokenizer.HF_TOKENIZER_FILES) to SAVE/tokenizer/; return the
    file to hash (and to preprocess with)."""
    out = os.path.join(save, "tokenizer")
    copy_tokenizer_files(hf_dir, out)
    return hf_tokenizer_file(out)


def _load_weights(plan: ConversionPlan, model) -> None:
    """Copy the HF tensors into `model`'s parameters, one tensor at a time."""
    import torch
    from safetensors import safe_open

    from megatron_ddk.models import hf

    params = dict(model.named_parameters())
    filled = set()
    with ExitStack() as stack, torch.no_grad():
        handles = {p: stack.enter_context(safe_open(p, framework="pt"))
                   for p in sorted(set(plan.weight_files.values()))}

        def get(name):
            return handles[plan.weight_files[name]].get_tensor(name)

        for name, tensor in hf.hf_to_megatron(get, plan.model, plan.kept_rows,
                                              plan.model.padded_vocab_size):
            if name not in params or params[name].shape != tensor.shape:
                raise AssertionError(f"mapping produced {name} {tuple(tensor.shape)}; model has "
                                     f"{tuple(params[name].shape) if name in params else 'none'}")
            params[name].copy_(tensor)
            filled.add(name)
    missing = sorted(set(params) - filled)
    assert not missing, f"parameters not filled by the mapping: {missing}"


def convert(args: argparse.Namespace, ctx=None) -> str:
    """Run the conversion; `ctx` is an already initialised world-1 ParallelContext (tests)."""
    from megatron_ddk.config.loader import to_dict
    from megatron_ddk.data.tokenizer import tokenizer_hash
    from megatron_ddk.models.build import build_gpt_model
    from megatron_ddk.models.checkpoint import save_model
    from megatron_ddk.parallel import initialize

    plan = plan_conversion(args)
    if ctx is None:
        ctx = initialize(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    if ctx.world_size != 1:
        raise ValueError("run the converter as one process (no torchrun): the checkpoint is "
                         "written at TP=1 and resharded at load time")
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and plan.hf_dtype == "BF16")
    model = build_gpt_model(plan.model, ctx, plan.model.padded_vocab_size, bf16=bf16)
    _load_weights(plan, model)
    tok_file = _copy_tokenizer(args.hf_dir, args.save)
    metadata = {"model": to_dict(plan.model), "padded_vocab_size": plan.model.padded_vocab_size,
                "source": f"hf:{plan.arch}", "hf_config": plan.hf_config,
                "hf_vocab_size": plan.kept_rows}
    if tok_file:
        metadata["tokenizer_hash"] = tokenizer_hash(tok_file)
    gen_path = os.path.join(args.hf_dir, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            metadata["hf_generation_config"] = json.load(f)
    folder = save_model(args.save, 0, model, metadata)
    with open(os.path.join(args.save, "model.yaml"), "w") as f:
        f.write(f"# {plan.arch} converted from {os.path.abspath(args.hf_dir)}.\n"
                f"# Paste as the run config's model: section, or (indented) as distill.teacher.\n")
        yaml.safe_dump({"model": to_dict(plan.model)}, f, sort_keys=False)
    results().info(f"wrote {folder} ({plan.arch}, {plan.model.num_layers} layers, "
                   f"{plan.kept_rows} embedding rows of {plan.hf_vocab_size} kept, padded to "
                   f"{plan.model.padded_vocab_size}, {'bf16' if bf16 else 'fp32'})")
    results().info(f"model config: {os.path.join(args.save, 'model.yaml')}")
    if tok_file:
        results().info(f"tokenizer: {tok_file} ({metadata['tokenizer_hash']}); preprocess the "
                       f"domains with --tokenizer-model {tok_file}")
    return folder


def main(argv: Optional[List[str]] = None, ctx=None) -> int:
    args = _parse_args(argv)
    if ctx is None:  # a CPU job: hide GPUs before anything initialises CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_or_exit(convert, args, ctx)
    return 0

