"""Atomic file output: temporary names that carry the writer's pid, and their clean-up.

Every writer of a file that must never be seen half-written (manifest, datasets, metrics,
evaluation JSON) writes `<path>.tmp<pid>[.ext]` and renames it into place with os.replace. A
writer killed before the rename leaves that temporary file behind; the next writer of the same
output calls `remove_stale_tmp(path)` first, which deletes the leftovers of writers that are no
longer alive (a live writer's file is never touched).

Whole folders (an export, a task folder, a checkpoint iteration) are built under a temporary
sibling and published with `swap_folder`: the old folder is renamed aside, the new one into
place, then the old one deleted, so at every moment one complete version exists under the final
name or under `<path>.old<pid>`; `recover_folder` (run by the next writer) puts an aside version
back when a crash came between the two renames. `atomic_folder` is both steps for one process.
Imports nothing from megatron_ddk.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from contextlib import contextmanager
from typing import Iterator, List, Union

logger = logging.getLogger(__name__)


def tmp_path(path: str, suffix: str = "") -> str:
    """The temporary name this process writes `path` under: `<path>.tmp<pid><suffix>`."""
    return f"{path}.tmp{os.getpid()}{suffix}"


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (signal 0 probes without sending anything)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_tmp_files(path: str) -> List[str]:
    """Leftover temporary files of `path` whose writer process is gone.

    Matches `<path>.tmp<pid>`, `<path>.tmp<pid>.<ext>` and `<path>.tmp.<pid>` next to `path`.
    """
    folder = os.path.dirname(os.path.abspath(path))
    pattern = re.compile(re.escape(os.path.basename(path)) + r"\.tmp\.?(\d+)(\.[^/]*)?$")
    try:
        names = os.listdir(folder)
    except OSError:  # no folder yet: nothing left over
        return []
    stale = []
    for name in sorted(names):
        match = pattern.match(name)
        full = os.path.join(folder, name)
        if match and not pid_alive(int(match.group(1))) and os.path.isfile(full):
            stale.append(full)
    return stale


def remove_stale_tmp(path: str) -> List[str]:
    """Delete the temporary files a killed writer of `path` left; returns what was removed."""
    removed = []
    for stale in stale_tmp_files(path):
        try:
            os.remove(stale)
        except FileNotFoundError:  # another process cleaned it first
            continue
        removed.append(stale)
        logger.info("removed %s, left by a writer that is no longer running", stale)
    return removed


def write_atomic(path: str, data: Union[str, bytes]) -> None:
    """Write `data` to `path` all at once: stale temporaries removed, temp file, os.replace.

    On any error the temporary file is removed and `path` keeps its previous content.
    """
    remove_stale_tmp(path)
    tmp = tmp_path(path)
    binary = isinstance(data, bytes)
    try:
        with open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise



def _fsync_tree(folder: str) -> None:
    for here, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(here, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def swap_folder(tmp: str, path: str) -> None:
    """Publish the finished folder `tmp` as `path` (module docstring): its files are synced, an
    existing `path` goes to `<path>.old<pid>` and is deleted only after the new one is in place."""
    _fsync_tree(tmp)
    if not os.path.isdir(path):
        os.replace(tmp, path)
        return
    old = f"{path}.old{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(path: str) -> List[str]:
    """Clean up after writers of folder `path` that died: their `<path>.tmp<pid>` folders are
    deleted, and a `<path>.old<pid>` folder is renamed back when `path` itself is missing (a crash
    between swap_folder's renames), else deleted. Returns what was removed or restored."""
    folder, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(base) + r"\.(tmp|old)(\d+)$")
    done = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return done
    for name in names:
        match = pattern.match(name)
        full = os.path.join(folder, name)
        if not match or pid_alive(int(match.group(2))) or not os.path.isdir(full):
            continue
        if match.group(1) == "old" and not os.path.exists(path):
            os.replace(full, path)
            logger.warning("restored %s from %s (a writer died while replacing it)", path, full)
        else:
            shutil.rmtree(full, ignore_errors=True)
            logger.info("removed %s, left by a writer that is no longer running", full)
        done.append(full)
    return done


@contextmanager
def atomic_folder(path: str) -> Iterator[str]:
    """Build folder `path` in one go: yields an empty temporary sibling to fill; when the block
    ends without an error it replaces `path` (swap_folder), otherwise it is deleted and `path`
    is as it was."""
    path = os.path.abspath(path)
    recover_folder(path)
    tmp = tmp_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        swap_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

def check_writable_folder(path: str, field: str, create: bool = True) -> None:
    """Create folder `path` if needed and prove a file can be written in it; ValueError in one
    line naming the config field and the path otherwise (a file in the way, a read-only or
    permission-denied location, a full disk). create=False changes nothing on disk: the folder,
    or the nearest folder above it that exists, must be a writable folder."""
    if not create:
        _check_creatable(path, field)
        return
    probe = os.path.join(path, f".write_probe{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        where = f" ({err.filename})" if err.filename and err.filename not in (path, probe) else ""
        raise ValueError(f"{field}={path}: cannot write there: {reason}{where}; choose a "
                         f"writable folder") from None


def _check_creatable(path: str, field: str) -> None:
    """check_writable_folder without writing: the first existing folder on the way is writable."""
    here = os.path.abspath(path)
    while not os.path.exists(here):
        here = os.path.dirname(here)
    if not os.path.isdir(here):
        raise ValueError(f"{field}={path}: {here} is a file, not a folder; choose a writable "
                         f"folder")
    if not os.access(here, os.W_OK | os.X_OK):
        raise ValueError(f"{field}={path}: cannot write there: {here} is not writable; choose a "
                         f"writable folder")
