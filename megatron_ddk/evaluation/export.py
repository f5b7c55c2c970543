"""Export a megatron-ddk checkpoint as a Hugging Face folder that transformers and
lm-evaluation-harness load: weights (models/hf_export.py) + tokenizer (data/hf_tokenizer.py).

    python -m megatron_ddk.evaluation.export --load CKPT --out DIR [--tokenizer PATH |
        --no-tokenizer] [--add-bos-token] [--dtype auto] [--vocab-size N]
    (`megatron-ddk export-hf` is the same command)

The tokenizer is, by default, the one the checkpoint was trained with: training records its
hash and path (megatron_ddk.json: tokenizer_hash, tokenizer_model); a converted HF checkpoint
keeps its files in CKPT/tokenizer/. A tokenizer whose hash differs from the recorded one is
refused; a checkpoint that records no tokenizer needs --tokenizer (unchecked) or
--no-tokenizer. Everything is written to a temporary sibling folder and renamed into place, so a
failed export leaves nothing half-written; an existing --out is replaced only when an earlier
export wrote it (it holds megatron_ddk_export.json, the provenance record).

Layer: imports models, data and parallel (the world-1 process that loads the checkpoint).
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from dataclasses import asdict, dataclass
from typing import List, Optional

from megatron_ddk.atomic import atomic_folder

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "megatron_ddk_export.json"
"""Written into every export: checkpoint, iteration, tokenizer hash, sizes."""


@dataclass
class ExportResult:
    """What an export wrote."""

    out: str
    """The HF folder."""

    checkpoint: str
    """The iter_NNNNNNN folder exported."""

    iteration: int
    """Its training iteration."""

    architecture: str
    """HF architecture (LlamaForCausalLM or Qwen2ForCausalLM)."""

    vocab_size: int
    """Embedding rows exported."""

    padded_vocab_size: int
    """Embedding rows in the checkpoint."""

    dtype: str
    """Weight dtype written."""

    tokenizer: Optional[str]
    """The tokenizer file or folder exported (None with --no-tokenizer)."""

    tokenizer_hash: Optional[str]
    """Its 'sha256:...' hash (the checkpoint's, when it records one)."""

    files: List[str]
    """Safetensors files written."""


def default_tokenizer(load: str, folder: str, meta: dict) -> Optional[str]:
    """The tokenizer the checkpoint was trained with: the recorded model file, else a
    tokenizer/ folder beside the checkpoint (converted HF models); None when neither exists."""
    recorded = meta.get("tokenizer_model")
    if recorded and os.path.exists(recorded):
        return recorded
    for root in (load, os.path.dirname(os.path.normpath(folder))):
        cand = os.path.join(root, "tokenizer")
        if os.path.isdir(cand):
            return cand
    return None


def _choose_tokenizer(load: str, folder: str, meta: dict, tokenizer: Optional[str]):
    from megatron_ddk.data.hf_tokenizer import check_hash, resolve_tokenizer

    expected = meta.get("tokenizer_hash")
    if expected is None and tokenizer is None:
        raise ValueError(f"checkpoint {folder} records no tokenizer (no tokenizer_hash in its "
                         f"megatron_ddk.json), so the export cannot know which one it was "
                         f"trained with: pass --tokenizer PATH (exported unchecked) or "
                         f"--no-tokenizer (weights only)")
    path = tokenizer or default_tokenizer(load, folder, meta)
    if path is None:
        raise ValueError(f"no usable tokenizer for {folder}: it was trained with {expected} "
                         f"(recorded file: {meta.get('tokenizer_model') or 'none'}), which is not "
                         f"on this machine and there is no tokenizer/ folder beside the "
                         f"checkpoint; pass --tokenizer PATH, or --no-tokenizer (weights only)")
    source = resolve_tokenizer(path)
    if expected is None:
        logger.warning("checkpoint %s records no tokenizer hash: %s is exported unchecked",
                       folder, path)
    return source, check_hash(source, expected)


def _check_out(out: str) -> None:
    """Refuse to replace a folder no export wrote."""
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or (
            os.listdir(out) and not os.path.isfile(os.path.join(out, PROVENANCE_FILE)))):
        raise ValueError(f"--out {out} exists and was not written by an export; remove it or "
                         f"choose another folder")


def export_checkpoint(load: str, out: str, *, tokenizer: Optional[str] = None,
                      no_tokenizer: bool = False, add_bos_token: bool = False,
                      dtype: str = "auto", vocab_size: Optional[int] = None,
                      max_shard_size: float = 5.0, ctx=None) -> ExportResult:
    """Export `load` (checkpoint root or iter folder, any TP/PP) to the HF folder `out`.

    ctx: an initialised world-1 ParallelContext (tests); None starts (and ends) one here.
    """
    from megatron_ddk.data.hf_tokenizer import (
        sample_texts,
        tokenizer_size,
        verify_hf_tokenizer,
        write_hf_tokenizer,
    )
    from megatron_ddk.models import hf
    from megatron_ddk.models import hf_export as wx
    from megatron_ddk.models.checkpoint import read_metadata, resolve_checkpoint

    folder, iteration = resolve_checkpoint(load)
    meta = read_metadata(folder)
    model = wx.export_model_config(folder, meta)
    arch = hf.export_architecture(model)
    padded = meta.get("padded_vocab_size") or model.padded_vocab_size
    if padded is None:
        raise ValueError(f"{folder} records no padded_vocab_size; set model.padded_vocab_size")
    source, tok_hash = (None, None) if no_tokenizer else _choose_tokenizer(
        load, folder, meta, tokenizer)
    _check_out(out)
    with atomic_folder(out) as tmp:
        special = {}
        if source is not None:
            special = write_hf_tokenizer(source, tmp, tok_hash, add_bos_token)
            verify_hf_tokenizer(tmp, source, sample_texts())
        vocab = wx.export_vocab(vocab_size, model, meta,
                                tokenizer_size(tmp) if source else None, padded)
        out_dtype = wx.export_dtype(dtype, meta)
        own_ctx = ctx is None
        if own_ctx:
            from megatron_ddk.parallel import initialize

            ctx = initialize(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        try:
            files = wx.write_weights(folder, model, padded, vocab, out_dtype, tmp,
                                     max_shard_size, ctx)
        finally:
            if own_ctx:
                from megatron_ddk.parallel import destroy

                destroy()
        wx.write_hf_config(tmp, model, vocab, out_dtype, meta, special)
        result = ExportResult(os.path.abspath(out), folder, iteration, arch, vocab, padded,
                              out_dtype, source.model_file if source else None, tok_hash, files)
        wx.write_json(os.path.join(tmp, PROVENANCE_FILE), asdict(result))
    return result


def build_parser() -> argparse.ArgumentParser:
    """Flags of `megatron-ddk export-hf` (docs/hf.md)."""
    p = argparse.ArgumentParser(prog="export_hf.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint root or iter_NNNNNNN folder")
    p.add_argument("--out", required=True, help="HF folder to write")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", "--tokenizer-dir", dest="tokenizer", default=None,
                     help="SentencePiece model (any file name), tokenizer.json, or a folder of "
                          "HF tokenizer files (default: the one the checkpoint was trained with)")
    tok.add_argument("--no-tokenizer", action="store_true", help="export the weights only")
    p.add_argument("--add-bos-token", action="store_true",
                   help="SentencePiece: the HF tokenizer prepends bos (megatron-ddk trains "
                        "without bos, so the default is off)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="weights dtype; auto = the converted HF model's dtype, else bfloat16")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="embedding rows to keep (default: docs/hf.md)")
    p.add_argument("--max-shard-size", type=float, default=5.0,
                   help="GB per safetensors file; larger models are sharded with an index")
    return p


def main(argv: Optional[List[str]] = None, ctx=None) -> ExportResult:
    """Parse flags, export, report one line; user errors exit 2 (console.run_or_exit)."""
    from megatron_ddk.console import results, run_or_exit

    args = build_parser().parse_args(argv)
    if ctx is None:  # a CPU job: hide GPUs before anything initialises CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    res = run_or_exit(export_checkpoint, args.load, args.out, tokenizer=args.tokenizer,
                      no_tokenizer=args.no_tokenizer, add_bos_token=args.add_bos_token,
                      dtype=args.dtype, vocab_size=args.vocab_size,
                      max_shard_size=args.max_shard_size, ctx=ctx)
    results().info(f"wrote {res.out}: {res.architecture}, iteration {res.iteration}, vocabulary "
                   f"{res.vocab_size} (of {res.padded_vocab_size} rows), {res.dtype}, "
                   f"{len(res.files)} safetensors file(s), tokenizer "
                   f"{res.tokenizer_hash or 'none (--no-tokenizer)'}")
    return res


if __name__ == "__main__":
    main()
