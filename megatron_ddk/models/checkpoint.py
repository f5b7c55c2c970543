"""Megatron-LM's checkpoint layout through megatron.core.dist_checkpointing.

    DIR/iter_0000100/                  dist_checkpointing folder (torch_dist), reshardable TP/PP
    DIR/iter_0000100/megatron_ddk.json model config, padded vocabulary, tokenizer hash, run id
    DIR/iter_0000100/run_config.yaml   the resolved run config (when given)
    DIR/latest_checkpointed_iteration.txt   written last

A save goes to DIR/iter_0000100.tmp/ and is renamed into place only when every rank has
finished, and the latest-iteration file is replaced atomically after that: a crash at any point
of a save leaves the previous checkpoint complete and still named by the latest file.
Model keys follow Megatron-LM (state_dict["model"] = model.sharded_state_dict()), so a
Megatron-LM GPT checkpoint's weights load here and ours load there. Folder resolution and the
metadata file live in checkpoint_layout.py (torch-free); a failed save or load raises
CheckpointError naming the folder, the file when one is at fault, and the cause.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from typing import Any, Dict, Optional, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint.api

from megatron_ddk.atomic import recover_folder, swap_folder, write_atomic
from megatron_ddk.models.checkpoint_layout import (  # noqa: F401  (re-exported names)
    CONFIG_FILE,
    DIST_CONFIG_FILE,
    FORMAT_VERSION,
    LATEST_FILE,
    META_FILE,
    CheckpointError,
    ResolvedCheckpoint,
    check_compatible,
    describe_checkpoint,
    iteration_dir,
    prune_checkpoints,
    read_latest_iteration,
    read_metadata,
    resolve_checkpoint,
)

logger = logging.getLogger(__name__)

_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# torch.distributed.checkpoint's CheckpointException derives from BaseException
_FAILURES = (Exception, torch.distributed.checkpoint.api.CheckpointException)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _free_space(path: str) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**30:.2f} GiB"
    except OSError:
        return "unknown space"


def _os_cause(exc: BaseException) -> Optional[OSError]:
    """The OSError behind `exc` (torch's writers wrap ENOSPC as 'unexpected pos ...')."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _last_line(exc: BaseException) -> str:
    """The innermost message of a (possibly multi-rank, multi-line) checkpoint exception."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def save_error(folder: str, iteration: int, exc: BaseException) -> CheckpointError:
    """A CheckpointError that says what a failed save was doing and why it failed."""
    cause = _os_cause(exc)
    parent = os.path.dirname(os.path.normpath(folder)) or "."
    free = _free_space(parent)
    if cause is not None and cause.errno in _NO_SPACE:
        why = f"no space left for the checkpoint ({cause.strerror})"
    elif cause is not None:
        why = f"{cause.strerror or type(cause).__name__} ({cause.filename or folder})"
    elif "unexpected pos" in str(exc):  # torch's zip writer: fewer bytes written than asked
        why = (f"a file could not be written completely (torch: {_last_line(exc)!r}): the disk "
               f"is full or a quota or file-size limit was hit")
    else:
        why = f"{type(exc).__name__}: {_last_line(exc)}"
    return CheckpointError(
        f"saving checkpoint iteration {iteration} to {folder} failed: {why}. {free} free on "
        f"that device. The previous checkpoint, if any, is untouched: free space (or choose "
        f"another checkpoint.save) and resume with --load")


def save_sharded(root: str, iteration: int, sharded_state_dict: Dict[str, Any],
                 metadata: Dict[str, Any], config_yaml: Optional[str] = None,
                 keep_last: Optional[int] = None) -> str:
    """Save a sharded state dict as DIR/iter_N crash-safely; every rank must call it.

    `metadata["run_id"]` marks the iteration as this run's: keep_last prunes only those.
    Returns the final iteration folder.
    """
    from megatron.core import dist_checkpointing

    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    try:
        if _rank() == 0:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        dist_checkpointing.save(sharded_state_dict, tmp, validate_access_integrity=True)
        _barrier()
        if _rank() == 0:
            _publish(root, tmp, final, iteration, metadata, config_yaml)
    except CheckpointError:
        raise
    except _FAILURES as exc:  # every failure becomes one clear message
        raise save_error(tmp, iteration, exc) from exc
    if _rank() == 0 and keep_last:
        deleted = prune_checkpoints(root, keep_last, metadata.get("run_id"))
        if deleted:
            logger.info("checkpoint.keep_last=%d: removed this run's iterations %s", keep_last,
                        deleted)
    _barrier()
    logger.info("saved checkpoint %s", final)
    return final


def _publish(root: str, tmp: str, final: str, iteration: int, metadata: Dict[str, Any],
             config_yaml: Optional[str]) -> None:
    """Rank 0: metadata into the finished tmp folder, rename it into place, then the latest file."""
    meta = dict(metadata, iteration=iteration, format_version=FORMAT_VERSION)
    with open(os.path.join(tmp, META_FILE), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    if config_yaml is not None:
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            f.write(config_yaml)
    recover_folder(final)  # an earlier re-save of this iteration that died mid-swap
    swap_folder(tmp, final)  # re-saving an iteration after a resume: swap, never half-delete
    write_atomic(os.path.join(root, LATEST_FILE), str(iteration))
    for name in os.listdir(root):  # leftovers of saves that crashed before their rename
        if re.match(r"^iter_\d+\.(tmp|old\d*)$", name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _read_index(folder: str):
    """(storage_data of DIR/.metadata, None) or (None, why it cannot be read)."""
    from torch.distributed.checkpoint import FileSystemReader

    index = os.path.join(folder, ".metadata")
    if not os.path.isfile(index):
        return None, f"{index} is missing (not a complete torch_dist checkpoint)"
    try:
        return FileSystemReader(folder).read_metadata().storage_data, None
    except Exception as exc:  # noqa: BLE001  (an unpickling error can be of any type)
        return None, f"{index} is corrupt ({type(exc).__name__}: {exc})"


def _torch_dist(folder: str) -> bool:
    """True when metadata.json names the torch_dist backend (or is absent: Megatron-LM's
    default); other backends are left to dist_checkpointing's own checks."""
    try:
        with open(os.path.join(folder, DIST_CONFIG_FILE)) as f:
            return json.load(f).get("sharded_backend", "torch_dist") == "torch_dist"
    except (OSError, ValueError, AttributeError):
        return True


def diagnose_folder(folder: str) -> Optional[str]:
    """Why the files of an iteration folder cannot load (None when none is visibly damaged):
    a corrupt metadata file, a missing or truncated shard, an unreadable common.pt."""
    read_metadata(folder)  # raises CheckpointError naming megatron_ddk.json
    config = os.path.join(folder, DIST_CONFIG_FILE)
    if os.path.isfile(config):
        try:
            with open(config) as f:
                json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"{config} is corrupt ({type(exc).__name__}: {exc})"
    index = os.path.join(folder, ".metadata")
    storage, problem = _read_index(folder)
    if problem:
        return problem
    needed: Dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0),
                                         info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{path} is missing ({index} lists it)"
        have = os.path.getsize(path)
        if have < size:
            return (f"{path} is truncated: {have} bytes, but {index} places data up to byte "
                    f"{size}")
    common = os.path.join(folder, "common.pt")
    if os.path.isfile(common):
        try:
            torch.load(common, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001
            return f"{common} is corrupt ({type(exc).__name__}: {exc})"
    return None


def load_sharded(folder: str, sharded_state_dict: Dict[str, Any], strict: bool = True):
    """Load the requested (sharded) entries of an iteration folder; returns the state dict."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    handling = StrictHandling.ASSUME_OK_UNEXPECTED if strict else StrictHandling.LOG_ALL
    if _torch_dist(folder):  # before torch's reader, which logs a traceback for these
        problem = _read_index(folder)[1]
        if problem:
            raise CheckpointError(f"loading checkpoint {folder} failed: {problem}")
    try:
        with torch.no_grad():
            return dist_checkpointing.load(sharded_state_dict, folder, strict=handling)
    except CheckpointError:
        raise
    except _FAILURES as exc:  # every failure becomes one clear message
        reason = diagnose_folder(folder) or f"{type(exc).__name__}: {_last_line(exc)}"
        raise CheckpointError(f"loading checkpoint {folder} failed: {reason}") from exc


def save_model(root: str, iteration: int, model, metadata: Dict[str, Any],
               config_yaml: Optional[str] = None) -> str:
    """Model-only checkpoint of any Megatron-Core module (Megatron-LM's 'model' key)."""
    return save_sharded(root, iteration, {"model": model.sharded_state_dict()}, metadata,
                        config_yaml)


def load_model(path: Union[str, ResolvedCheckpoint], model) -> Dict[str, Any]:
    """Load only the model weights of a checkpoint (any TP/PP it was saved at) into `model`.

    `path` is a checkpoint root, an iteration folder (also Megatron-LM's, without
    megatron_ddk.json) or the run's ResolvedCheckpoint (not read again). Returns its metadata.
    """
    ckpt = describe_checkpoint(path)
    state = load_sharded(ckpt.folder, {"model": model.sharded_state_dict()})
    model.load_state_dict(state["model"], strict=True)
    return ckpt.metadata
