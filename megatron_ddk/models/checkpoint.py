"""Megatron-LM's checkpoint layout through megatron.core.dist_checkpointing.

    DIR/iter_0000100/                  dist_checkpointing folder (torch_dist), reshardable TP/PP
    DIR/iter_0000100/megatron_ddk.json model config, padded vocabulary, tokenizer hash, layout
    DIR/iter_0000100/run_config.yaml   the resolved run config (when given)
    DIR/latest_checkpointed_iteration.txt   written last

A save goes to DIR/iter_0000100.tmp/ and is renamed into place only when every rank has
finished, and the latest-iteration file is replaced atomically after that: a crash at any point
of a save leaves the previous checkpoint complete and still named by the latest file.
Model keys follow Megatron-LM (state_dict["model"] = model.sharded_state_dict()), so a
Megatron-LM GPT checkpoint's weights load here and ours load there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

LATEST_FILE = "latest_checkpointed_iteration.txt"
META_FILE = "megatron_ddk.json"
CONFIG_FILE = "run_config.yaml"
FORMAT_VERSION = 1
_SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                 "ffn_hidden_size", "kv_channels", "normalization", "activation",
                 "position_embedding_type", "add_bias_linear", "add_qkv_bias",
                 "share_embeddings_and_output_weights")


def iteration_dir(root: str, iteration: int) -> str:
    """DIR/iter_NNNNNNN (Megatron-LM's 7-digit naming)."""
    return os.path.join(root, f"iter_{iteration:07d}")


def read_latest_iteration(root: str) -> Optional[int]:
    """Iteration named by DIR/latest_checkpointed_iteration.txt, or None when there is none."""
    path = os.path.join(root, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}: expected an iteration number, found {text!r}") from None


def resolve_checkpoint(path: str) -> tuple[str, int]:
    """(iteration folder, iteration) for a checkpoint root or an iter_NNNNNNN folder."""
    if not os.path.exists(path):
        raise ValueError(f"checkpoint {path} does not exist")
    base = os.path.basename(os.path.normpath(path))
    if base.startswith("iter_") and os.path.isfile(os.path.join(path, META_FILE)):
        return path, int(base[5:])
    iteration = read_latest_iteration(path)
    if iteration is None:
        raise ValueError(f"checkpoint {path} has no {LATEST_FILE}; point to a folder written by "
                         f"megatron-ddk (or an iter_NNNNNNN folder inside it)")
    folder = iteration_dir(path, iteration)
    if iteration == 0 and not os.path.isdir(folder) and os.path.isdir(os.path.join(path, "release")):
        folder = os.path.join(path, "release")
    if not os.path.isdir(folder):
        raise ValueError(f"{os.path.join(path, LATEST_FILE)} names iteration {iteration} but "
                         f"{folder} is missing")
    return folder, iteration


def read_metadata(folder: str) -> Dict[str, Any]:
    """The megatron_ddk.json of an iteration folder ({} for foreign Megatron-LM checkpoints)."""
    path = os.path.join(folder, META_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def check_compatible(meta: Dict[str, Any], model_dict: Dict[str, Any], padded_vocab_size: int,
                     tokenizer_hash: Optional[str], where: str) -> None:
    """Refuse a checkpoint whose model shape or tokenizer differs from what is being built."""
    saved = meta.get("model")
    if saved:
        diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {model_dict.get(k)!r}"
                 for k in _SHAPE_FIELDS if k in saved and saved.get(k) != model_dict.get(k)]
        if diffs:
            raise ValueError(f"checkpoint {where} was saved from a different model shape ("
                             + "; ".join(diffs) + "); fix the model section of the config")
    saved_vocab = meta.get("padded_vocab_size")
    if saved_vocab is not None and saved_vocab != padded_vocab_size:
        raise ValueError(f"checkpoint {where} has {saved_vocab} embedding rows but the model is "
                         f"built with {padded_vocab_size}; set model.padded_vocab_size={saved_vocab}"
                         f" or convert the checkpoint")
    saved_hash = meta.get("tokenizer_hash")
    if saved_hash and tokenizer_hash and saved_hash != tokenizer_hash:
        raise ValueError(f"checkpoint {where} was trained with tokenizer {saved_hash} but the data "
                         f"uses {tokenizer_hash}; teacher, student and data must share a tokenizer")


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_sharded(root: str, iteration: int, sharded_state_dict: Dict[str, Any],
                 metadata: Dict[str, Any], config_yaml: Optional[str] = None,
                 keep_last: Optional[int] = None) -> str:
    """Save a sharded state dict as DIR/iter_N crash-safely; every rank must call it.

    Returns the final iteration folder.
    """
    from megatron.core import dist_checkpointing

    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    dist_checkpointing.save(sharded_state_dict, tmp, validate_access_integrity=True)
    _barrier()
    if _rank() == 0:
        meta = dict(metadata, iteration=iteration, format_version=FORMAT_VERSION)
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        if config_yaml is not None:
            with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
                f.write(config_yaml)
        if os.path.isdir(final):  # re-saving an iteration after a resume: swap, never half-delete
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        latest_tmp = os.path.join(root, LATEST_FILE + ".tmp")
        with open(latest_tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(latest_tmp, os.path.join(root, LATEST_FILE))
        for name in os.listdir(root):  # leftovers of saves that crashed before their rename
            if name.endswith(".tmp") and name.startswith("iter_"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        if keep_last:
            prune_checkpoints(root, keep_last)
    _barrier()
    logger.info("saved checkpoint %s", final)
    return final


def prune_checkpoints(root: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete iteration folders (never the latest)."""
    latest = read_latest_iteration(root)
    iters = sorted(int(n[5:]) for n in os.listdir(root)
                   if n.startswith("iter_") and n[5:].isdigit())
    for it in iters[:-keep_last]:
        if it != latest:
            shutil.rmtree(iteration_dir(root, it), ignore_errors=True)


def load_sharded(folder: str, sharded_state_dict: Dict[str, Any], strict: bool = True):
    """Load the requested (sharded) entries of an iteration folder; returns the state dict."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    handling = StrictHandling.ASSUME_OK_UNEXPECTED if strict else StrictHandling.LOG_ALL
    with torch.no_grad():
        return dist_checkpointing.load(sharded_state_dict, folder, strict=handling)


def save_model(root: str, iteration: int, model, metadata: Dict[str, Any],
               config_yaml: Optional[str] = None) -> str:
    """Model-only checkpoint of any Megatron-Core module (Megatron-LM's 'model' key)."""
    return save_sharded(root, iteration, {"model": model.sharded_state_dict()}, metadata,
                        config_yaml)


def load_model(path: str, model) -> Dict[str, Any]:
    """Load only the model weights of a checkpoint (any TP/PP it was saved at) into `model`.

    Returns the checkpoint's metadata.
    """
    folder, _ = resolve_checkpoint(path)
    state = load_sharded(folder, {"model": model.sharded_state_dict()})
    model.load_state_dict(state["model"], strict=True)
    return read_metadata(folder)
