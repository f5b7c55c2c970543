"""Megatron-LM's checkpoint folders and megatron-ddk's metadata file, read without torch.

    DIR/iter_0000100/                  one iteration (megatron.core.dist_checkpointing folder)
    DIR/iter_0000100/megatron_ddk.json model config, padded vocabulary, tokenizer hash, run id
    DIR/release/                       Megatron-LM's folder of a released (converted) model
    DIR/latest_checkpointed_iteration.txt   "100" or "release"

Owns: naming and resolving iteration folders (a root, an iter_N folder or a release folder, with
or without megatron_ddk.json: Megatron-LM's own checkpoints have none), reading the metadata with
errors that name the file, comparing a recorded model with a config, and pruning only the
iterations one run wrote (each megatron_ddk.json records the run id of the run that wrote it).
check-config and the teacher resolution read checkpoints through this module, so it imports
nothing but the standard library (no torch, no megatron, nothing else from megatron_ddk).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

LATEST_FILE = "latest_checkpointed_iteration.txt"
META_FILE = "megatron_ddk.json"
CONFIG_FILE = "run_config.yaml"
DIST_CONFIG_FILE = "metadata.json"  # written by megatron.core.dist_checkpointing in every folder
FORMAT_VERSION = 1
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "ffn_hidden_size", "kv_channels", "normalization", "activation",
                "position_embedding_type", "add_bias_linear", "add_qkv_bias",
                "share_embeddings_and_output_weights")
"""ModelConfig fields that decide a checkpoint's tensor shapes and keys."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read or written; the message names the file."""


def iteration_dir(root: str, iteration: int) -> str:
    """DIR/iter_NNNNNNN (Megatron-LM's 7-digit naming)."""
    return os.path.join(root, f"iter_{iteration:07d}")


def read_latest_iteration(root: str) -> Optional[int]:
    """Iteration named by DIR/latest_checkpointed_iteration.txt ('release' is 0), or None."""
    path = os.path.join(root, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number or 'release', found "
                              f"{text!r}") from None


def is_iteration_folder(folder: str) -> bool:
    """True for a folder that holds one checkpoint (ours, or Megatron-LM's without metadata)."""
    return os.path.isdir(folder) and any(
        os.path.isfile(os.path.join(folder, name)) for name in (META_FILE, DIST_CONFIG_FILE))


def _iteration_of(folder: str) -> int:
    base = os.path.basename(os.path.normpath(folder))
    if base.startswith("iter_") and base[5:].isdigit():
        return int(base[5:])
    return int(read_metadata(folder).get("iteration", 0))


def complete_iterations(root: str) -> List[int]:
    """Iterations of DIR/iter_NNNNNNN folders that hold a checkpoint, oldest first."""
    if not os.path.isdir(root):
        return []
    return sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("iter_") and
                  n[5:].isdigit() and is_iteration_folder(os.path.join(root, n)))


def resolve_checkpoint(path: str) -> Tuple[str, int]:
    """(iteration folder, iteration) for a checkpoint root, an iter_NNNNNNN folder or a release
    folder; resolving an already resolved folder returns it unchanged."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if is_iteration_folder(path):
        return path, _iteration_of(path)
    iteration = read_latest_iteration(path)
    if iteration is None:
        found = complete_iterations(path)
        hint = (f" (it holds iterations {found}: point to one iter_NNNNNNN folder)" if found else
                "; point to a checkpoint folder written by megatron-ddk or Megatron-LM (or an "
                "iter_NNNNNNN folder inside it)")
        raise CheckpointError(f"checkpoint {path} has no {LATEST_FILE}{hint}")
    folder = iteration_dir(path, iteration)
    if (iteration == 0 and not os.path.isdir(folder)
            and os.path.isdir(os.path.join(path, "release"))):
        folder = os.path.join(path, "release")
    if not os.path.isdir(folder):
        raise CheckpointError(f"{os.path.join(path, LATEST_FILE)} names iteration {iteration} "
                              f"but {folder} is missing")
    return folder, iteration


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """One checkpoint as a run uses it, resolved once (training/prepare.py) and carried to every
    reader: the path given, its iteration folder and iteration, and its megatron_ddk.json."""

    path: str
    """As the config gave it (a root, an iter_NNNNNNN or a release folder)."""

    folder: str
    """The iteration folder it resolves to."""

    iteration: int
    """Its iteration (0 for a release folder)."""

    metadata: Dict[str, Any] = field(default_factory=dict)
    """megatron_ddk.json ({} for Megatron-LM's own checkpoints)."""

    @property
    def tokenizer_hash(self) -> Optional[str]:
        """The tokenizer hash it records (None: unknown)."""
        return self.metadata.get("tokenizer_hash")


def describe_checkpoint(path: Union[str, ResolvedCheckpoint]) -> ResolvedCheckpoint:
    """`path` resolved and its metadata read (CheckpointError naming the file); a
    ResolvedCheckpoint is returned unchanged."""
    if isinstance(path, ResolvedCheckpoint):
        return path
    folder, iteration = resolve_checkpoint(path)
    return ResolvedCheckpoint(path, folder, iteration, read_metadata(folder))


def checkpoint_root(path: str) -> str:
    """The folder that holds the latest file: `path` itself, or the parent of an iteration."""
    if is_iteration_folder(path) and not os.path.isfile(os.path.join(path, LATEST_FILE)):
        return os.path.dirname(os.path.normpath(path))
    return path


def read_metadata(folder: str) -> Dict[str, Any]:
    """The megatron_ddk.json of an iteration folder ({} for Megatron-LM's own checkpoints)."""
    path = os.path.join(folder, META_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {exc}); the file is "
                              f"corrupt: restore it or use another checkpoint") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    for key, types, what in _META_TYPES:
        value = meta.get(key)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            raise CheckpointError(f"{path}: {key} is {value!r}, expected {what}; the file is "
                                  f"corrupt or not megatron-ddk's: restore it or use another "
                                  f"checkpoint")
    return meta


_META_TYPES = (("model", dict, "a mapping of model fields"),
               ("padded_vocab_size", int, "an integer"), ("iteration", int, "an integer"),
               ("tokenizer_hash", str, "a string"), ("run_id", str, "a string"))
"""Types of the megatron_ddk.json entries that are read (None is allowed for each)."""


def _effective(model: Dict[str, Any]) -> Dict[str, Any]:
    """A model dict with ModelConfig's None defaults spelled out (None query groups = heads)."""
    out = dict(model)
    heads, hidden = out.get("num_attention_heads"), out.get("hidden_size")
    if out.get("num_query_groups") is None:
        out["num_query_groups"] = heads
    if out.get("ffn_hidden_size") is None and hidden is not None:
        out["ffn_hidden_size"] = 4 * hidden
    if out.get("kv_channels") is None and hidden and heads:
        out["kv_channels"] = hidden // heads
    return out


def model_differences(saved: Dict[str, Any], config: Dict[str, Any],
                      fields=SHAPE_FIELDS) -> List[str]:
    """'field: checkpoint X vs config Y' for every listed field the two models disagree on
    (None defaults compared by what they mean)."""
    a, b = _effective(saved), _effective(config)
    return [f"{k}: checkpoint {a.get(k)!r} vs config {b.get(k)!r}"
            for k in fields if k in saved and a.get(k) != b.get(k)]


def check_compatible(meta: Dict[str, Any], model_dict: Dict[str, Any], padded_vocab_size: int,
                     tokenizer_hash: Optional[str], where: str) -> None:
    """Refuse a checkpoint whose model shape or tokenizer differs from what is being built."""
    diffs = model_differences(meta.get("model") or {}, model_dict)
    if diffs:
        raise CheckpointError(f"checkpoint {where} was saved from a different model shape ("
                              + "; ".join(diffs) + "); fix the model section of the config")
    saved_vocab = meta.get("padded_vocab_size")
    if saved_vocab is not None and saved_vocab != padded_vocab_size:
        raise CheckpointError(f"checkpoint {where} has {saved_vocab} embedding rows but the model "
                              f"is built with {padded_vocab_size}; set model.padded_vocab_size="
                              f"{saved_vocab} or convert the checkpoint")
    saved_hash = meta.get("tokenizer_hash")
    if saved_hash and tokenizer_hash and saved_hash != tokenizer_hash:
        raise CheckpointError(f"checkpoint {where} was trained with tokenizer {saved_hash} but the "
                              f"data uses {tokenizer_hash}; teacher, student and data must share "
                              f"a tokenizer")


def _run_id_of(folder: str) -> Optional[str]:
    try:
        return read_metadata(folder).get("run_id")
    except CheckpointError:  # unreadable: not provably ours, so never pruned
        return None


def prune_checkpoints(root: str, keep_last: int, run_id: Optional[str]) -> List[int]:
    """Delete all but the newest `keep_last` iterations that the run `run_id` wrote; never the
    latest, never an iteration another run (or a Megatron-LM checkpoint) wrote. Returns the
    deleted iterations."""
    if not run_id:
        return []
    latest = read_latest_iteration(root)
    mine = [it for it in complete_iterations(root) if _run_id_of(iteration_dir(root, it)) == run_id]
    deleted = [it for it in mine[:-keep_last] if it != latest]
    for it in deleted:
        shutil.rmtree(iteration_dir(root, it), ignore_errors=True)
    return deleted
