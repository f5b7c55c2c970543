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


def have_module(module: str) -> bool:
    """True when `module` can be imported (found on sys.path; not imported here)."""
    return importlib.util.find_spec(module.split(".")[0]) is not None


def require_extra(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module` of the optional extra `extra`; a ValueError (a user error, exit 2) that
    names the extra and `purpose` (what asked for it) when it is not installed."""
    if not have_module(module):
        raise ValueError(f"{purpose} needs the {module!r} package, which is not installed: "
                         f"pip install 'megatron-ddk[{extra}]'")
    return importlib.import_module(module)
