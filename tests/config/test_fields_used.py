"""Configuration means what it says: every schema field is read by the package outside config/
(a field nobody reads is a setting that silently does nothing), and checkpoint.save_on_signal
really switches the pre-emption handlers."""

import dataclasses
import os
import re
import signal

from megatron_ddk.config import schema

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, "megatron_ddk")

# Fields read only inside config/, each with the reason that is not a silent no-op.
READ_IN_CONFIG_ONLY = {
    "virtual_pipeline_model_parallel_size": "refused unless null (config/validate.py)",
    "context_parallel_size": "refused unless 1 (config/validate.py)",
    "train_tokens": "turned into steps by config.validate.train_iters, which training calls",
}


def _package_source_outside_config() -> str:
    parts = []
    for folder, _, files in os.walk(PACKAGE):
        if os.path.relpath(folder, PACKAGE).split(os.sep)[0] == "config":
            continue
        parts += [open(os.path.join(folder, f)).read() for f in files if f.endswith(".py")]
    return "\n".join(parts)


def _schema_fields():
    for cls in vars(schema).values():
        if (isinstance(cls, type) and dataclasses.is_dataclass(cls)
                and cls.__module__ == schema.__name__):
            for f in dataclasses.fields(cls):
                yield cls.__name__, f.name


def test_every_schema_field_is_read_outside_config():
    source = _package_source_outside_config()
    unread = []
    for cls, name in _schema_fields():
        read = re.search(rf"\.{name}\b|[\"']{name}[\"']", source)
        if not read and name not in READ_IN_CONFIG_ONLY:
            unread.append(f"{cls}.{name}")
        if read and name in READ_IN_CONFIG_ONLY:
            unread.append(f"{cls}.{name} is read now: drop it from READ_IN_CONFIG_ONLY")
    assert unread == [], f"schema fields that nothing reads: {unread}"
    assert re.search(r"\btrain_iters\(", source)  # train_tokens' reader is used


def test_save_on_signal_switches_the_handlers():
    from megatron_ddk.training import entry

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        entry._install_stop_signals(True)
        assert all(signal.getsignal(s) is entry._on_signal for s in saved)
        entry._install_stop_signals(False)
        assert all(signal.getsignal(s) is signal.SIG_DFL for s in saved)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
