"""The one place that decides whether optional dependencies are present.

Transformer Engine and apex are optional extras (GPU hosts only). Everything else asks here
instead of importing them itself, so call sites stay unconditional and CPU hosts never try.
The pure-Python extras (wandb, ...) are imported through require_extra, whose error names the
extra to install.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType


@functools.lru_cache(maxsize=None)
def have_transformer_engine() -> bool:
    """True when transformer_engine.pytorch imports on this host."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a broken TE install counts as absent; host checks say so
        return False
    return True


@functools.lru_cache(maxsize=None)
def have_apex() -> bool:
    """True when NVIDIA apex (with its CUDA extensions) imports."""
    try:
        import apex.normalization  # noqa: F401
    except Exception:
        return False
    return True


def have_cuda() -> bool:
    """True when this process can use a CUDA GPU (the only place that asks torch)."""
    import torch

    return torch.cuda.is_available()


EXTRA_OF = {
    "wandb": "wandb",
    "pyarrow": "formats",
    "pyarrow.parquet": "formats",
    "pyarrow.ipc": "formats",
    "zstandard": "formats",
    "sklearn": "cluster",
}
"""Importable module of a pure-Python extra -> the setup.py extra that installs it."""

PACKAGE_OF = {"sklearn": "scikit-learn", "pyarrow.parquet": "pyarrow", "pyarrow.ipc": "pyarrow"}
"""Importable module -> its package name on PyPI, where they differ."""


class MissingDependencyError(ValueError):
    """An optional package (EXTRA_OF) that a configured feature needs is not installed."""


def have_module(module: str) -> bool:
    """True when `module` can be imported (found on sys.path; not imported here)."""
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except ValueError:  # sys.modules[name] is None: blocked, as a missing package
        return False


def require_extra(module: str, purpose: str) -> ModuleType:
    """Import `module` (a key of EXTRA_OF) for `purpose` (what asked for it, e.g. "Parquet input
    x.parquet"); MissingDependencyError (a user error, exit 2) naming the package and the
    `pip install 'megatron-ddk[EXTRA]'` that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = PACKAGE_OF.get(module, module)
        raise MissingDependencyError(
            f"{purpose} needs the {package} package, which is not installed ({err}); install "
            f"it with: pip install 'megatron-ddk[{EXTRA_OF[module]}]'") from None
