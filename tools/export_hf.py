"""Export a megatron-ddk checkpoint (a distilled student) as a Hugging Face model folder.

    python tools/export_hf.py --load runs/student/checkpoints --out hf_student \
        [--tokenizer-dir ckpt/qwen1.8b/tokenizer] [--dtype auto] [--vocab-size N]

    lm_eval --model hf --model_args pretrained=hf_student,dtype=bfloat16 \
        --tasks mmlu,arc_challenge,race --batch_size 8

--load is a checkpoint root (its latest iteration) or one iter_NNNNNNN folder, saved at any TP/PP:
it is loaded into a single-process TP=1 model (dist_checkpointing reshards), so run this as one
process, no torchrun. Writes config.json (LlamaForCausalLM, or Qwen2ForCausalLM for a model with
a QKV bias), generation_config.json, model.safetensors (or shards + model.safetensors.index.json
above --max-shard-size GB) and the tokenizer files; transformers' AutoModelForCausalLM loads the
folder. The embedding is cut back to the real vocabulary (--vocab-size, else the vocab_size a
training run recorded (its tokenizer's), else model.vocab_size, else the rows of the converted HF
model, else the tokenizer's size): padded rows must not reach HF, whose softmax would give them
probability. Models HF's LLaMA/Qwen2 classes cannot express
(learned absolute positions, GeLU MLP, LayerNorm, biases on every linear layer) are refused.
When the checkpoint records a tokenizer hash, the tokenizer files must match it.
"""

from __future__ import annotations

import os
import sys

_TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_TOOLS))
sys.path.insert(0, _TOOLS)

from megatron_ddk.console import run_or_exit  # noqa: E402

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import warnings  # noqa: E402
from typing import Dict, List, Optional  # noqa: E402

from convert_hf_checkpoint import TOKENIZER_FILES, tokenizer_size  # noqa: E402

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")
logger = logging.getLogger("export_hf")

_DTYPES = ("bfloat16", "float16", "float32")


def _parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint root or iter_NNNNNNN folder")
    p.add_argument("--out", required=True, help="HF folder to write")
    p.add_argument("--tokenizer-dir", default=None,
                   help="folder with tokenizer files (default: LOAD/tokenizer when present)")
    p.add_argument("--dtype", choices=("auto",) + _DTYPES, default="auto",
                   help="weights dtype; auto = the converted HF model's dtype, else bfloat16")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="embedding rows to keep (default: see the module docstring)")
    p.add_argument("--max-shard-size", type=float, default=5.0,
                   help="GB per safetensors file; larger models are sharded with an index")
    return p.parse_args(argv)


def _model_config(folder: str, meta: dict):
    """ModelConfig from the checkpoint metadata, else from the run_config.yaml beside it."""
    from megatron_ddk.config.loader import from_dict, load_config
    from megatron_ddk.config.schema import ModelConfig

    if meta.get("model"):
        return from_dict(ModelConfig, meta["model"], "model")
    run_cfg = os.path.join(folder, "run_config.yaml")
    if os.path.isfile(run_cfg):
        return load_config(run_cfg).model
    raise ValueError(f"{folder} records no model config (no megatron_ddk.json 'model' entry and "
                     f"no run_config.yaml); it was not written by megatron-ddk")


def _tokenizer_dir(args, folder: str) -> Optional[str]:
    if args.tokenizer_dir:
        if not os.path.isdir(args.tokenizer_dir):
            raise ValueError(f"--tokenizer-dir {args.tokenizer_dir} is not a folder")
        return args.tokenizer_dir
    for root in (args.load, os.path.dirname(os.path.normpath(folder))):
        cand = os.path.join(root, "tokenizer")
        if os.path.isdir(cand):
            return cand
    return None


def _check_tokenizer_hash(tok_dir: str, expected: Optional[str]) -> None:
    """Refuse tokenizer files other than the ones the checkpoint was trained with."""
    from megatron_ddk.data.tokenizer import tokenizer_hash

    files = [os.path.join(tok_dir, n) for n in ("tokenizer.model", "tokenizer.json")
             if os.path.isfile(os.path.join(tok_dir, n))]
    if not expected or not files:
        return
    found = [tokenizer_hash(f) for f in files]
    if expected not in found:
        raise ValueError(f"tokenizer files in {tok_dir} ({', '.join(found)}) are not the "
                         f"tokenizer the checkpoint was trained with ({expected}); pass the right "
                         f"--tokenizer-dir")


def _token_id(tok_dir: str, token) -> Optional[int]:
    """Id of a special token (string or {'content': ...}) in the folder's tokenizer."""
    if isinstance(token, dict):
        token = token.get("content")
    if not token:
        return None
    tj = os.path.join(tok_dir, "tokenizer.json")
    if os.path.isfile(tj):
        with open(tj) as f:
            data = json.load(f)
        for t in data.get("added_tokens") or []:
            if t.get("content") == token:
                return int(t["id"])
        vocab = (data.get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and token in vocab:
            return int(vocab[token])
    sp_path = os.path.join(tok_dir, "tokenizer.model")
    if os.path.isfile(sp_path):
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=sp_path)
        pid = sp.PieceToId(token)
        return pid if sp.IdToPiece(pid) == token else None
    return None


def _special_ids(tok_dir: Optional[str]) -> Dict[str, Optional[int]]:
    """bos/eos/pad ids named by tokenizer_config.json (for configs written from scratch)."""
    path = os.path.join(tok_dir or "", "tokenizer_config.json")
    if not tok_dir or not os.path.isfile(path):
        return {}
    with open(path) as f:
        tc = json.load(f)
    return {f"{k}_id": _token_id(tok_dir, tc.get(k))
            for k in ("bos_token", "eos_token", "pad_token")}


def _export_vocab(args, model, meta: dict, tok_dir: Optional[str], padded: int) -> int:
    vocab = (args.vocab_size or meta.get("vocab_size") or model.vocab_size
             or meta.get("hf_vocab_size") or (tokenizer_size(tok_dir) if tok_dir else None))
    if vocab is None:
        logger.warning("no vocabulary size known: exporting all %d padded rows; pass "
                       "--vocab-size so padded tokens get no probability in HF", padded)
        vocab = padded
    if vocab > padded:
        raise ValueError(f"--vocab-size={vocab} exceeds the checkpoint's {padded} embedding rows")
    tok = tokenizer_size(tok_dir) if tok_dir else None
    if tok is not None and tok > vocab:
        raise ValueError(f"the tokenizer in {tok_dir} has ids up to {tok - 1} but only {vocab} "
                         f"embedding rows would be exported; pass --vocab-size {tok}")
    return int(vocab)


def _export_dtype(args, meta: dict) -> str:
    if args.dtype != "auto":
        return args.dtype
    hf_cfg = meta.get("hf_config") or {}
    dtype = hf_cfg.get("torch_dtype") or hf_cfg.get("dtype")
    return dtype if dtype in _DTYPES else "bfloat16"


def write_safetensors(tensors: Dict[str, "torch.Tensor"], out: str,
                      max_shard_gb: float) -> List[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index above max_shard_gb."""
    from safetensors.torch import save_file

    limit = max(1, int(max_shard_gb * 1e9))
    shards: List[Dict] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size()
                                                for t in tensors.values())},
                 "weight_map": {n: fname for fname, s in zip(names, shards) for n in s}}
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    for fname, shard in zip(names, shards):
        save_file(shard, os.path.join(out, fname), metadata={"format": "pt"})
    return names


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def export(args: argparse.Namespace, ctx=None) -> str:
    """Run the export; `ctx` is an already initialised world-1 ParallelContext (tests)."""
    import torch

    from megatron_ddk.models import hf
    from megatron_ddk.models.build import build_gpt_model
    from megatron_ddk.models.checkpoint import load_model, read_metadata, resolve_checkpoint
    from megatron_ddk.parallel import initialize

    folder, iteration = resolve_checkpoint(args.load)
    meta = read_metadata(folder)
    model = hf.export_model_config(_model_config(folder, meta))
    arch = hf.export_architecture(model)
    padded = meta.get("padded_vocab_size") or model.padded_vocab_size
    if padded is None:
        raise ValueError(f"{folder} records no padded_vocab_size; set model.padded_vocab_size")
    tok_dir = _tokenizer_dir(args, folder)
    if tok_dir:
        _check_tokenizer_hash(tok_dir, meta.get("tokenizer_hash"))
    else:
        logger.warning("no tokenizer files (pass --tokenizer-dir): lm-eval needs them in %s",
                       args.out)
    vocab = _export_vocab(args, model, meta, tok_dir, padded)
    dtype = _export_dtype(args, meta)
    if ctx is None:
        ctx = initialize(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    if ctx.world_size != 1:
        raise ValueError("run the exporter as one process (no torchrun)")
    gpt = build_gpt_model(model, ctx, padded)
    load_model(folder, gpt)
    state = {n: p.detach().cpu() for n, p in gpt.named_parameters()}
    tensors = {n: t.to(getattr(torch, dtype), copy=True)  # copies: q/k/v are views of one tensor
               for n, t in hf.megatron_to_hf(state, model, vocab).items()}
    os.makedirs(args.out, exist_ok=True)
    files = write_safetensors(tensors, args.out, args.max_shard_size)
    special = _special_ids(tok_dir)
    config = hf.hf_config_from_model(model, vocab, dtype, meta.get("hf_config"), special)
    _write_json(os.path.join(args.out, "config.json"), config)
    gen = meta.get("hf_generation_config") or {
        k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        if config.get(k) is not None}
    _write_json(os.path.join(args.out, "generation_config.json"), gen)
    for name in TOKENIZER_FILES if tok_dir else ():
        if os.path.isfile(os.path.join(tok_dir, name)):
            shutil.copyfile(os.path.join(tok_dir, name), os.path.join(args.out, name))
    print(f"wrote {args.out}: {arch}, iteration {iteration}, vocabulary {vocab} "
          f"(of {padded} rows), {dtype}, {len(files)} safetensors file(s)")
    return args.out


def main(argv: Optional[List[str]] = None, ctx=None) -> None:
    args = _parse_args(argv)
    if ctx is None:  # a CPU job: hide GPUs before anything initialises CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_or_exit(export, args, ctx)


if __name__ == "__main__":
    main()
