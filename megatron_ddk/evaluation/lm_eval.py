"""lm-evaluation-harness on a megatron-ddk checkpoint: `megatron-ddk lm-eval` and run_lm_eval().

run_lm_eval(checkpoint, tasks, limit=..., ...):
  1. exports the checkpoint to a temporary Hugging Face folder (evaluation/export.py, in a child
     process with GPUs hidden: Megatron's process-global state stays out of this process);
  2. optionally builds the local tasks from a manifest's test split (evaluation/local_tasks.py)
     into the same temporary folder;
  3. checks every task name against lm-eval's index (shipped tasks + include paths) and loads
     each task's data, so an unknown task or one whose data cannot be had offline is a clear
     error naming the task and the dataset it needs, before any model work;
  4. runs lm_eval.simple_evaluate with the transformers backend (HFLM; CUDA when available),
     prefix_token_id = the eos id when the tokenizer adds no bos (megatron-ddk trains without
     bos: a document follows the previous one's end-of-document token);
  5. returns lm-eval's results, versions and sample counts plus the checkpoint, iteration,
     tokenizer hash, lm-eval version and a flat {task: {metric: value}} view.
lm-eval is the optional extra `eval` (pip install -e .[eval]); without it a clear error says so.

Layer: evaluation (imports data/models through export.py and local_tasks.py; never training).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

from megatron_ddk.atomic import write_atomic
from megatron_ddk.console import results

logger = logging.getLogger(__name__)

EXTRA_HINT = ("install megatron-ddk's `eval` extra: pip install -e '.[eval]' "
              "(lm-eval[hf]>=0.4.13,<0.5)")


def require_lm_eval():
    """The lm_eval module, or a ValueError naming the extra to install."""
    try:
        import lm_eval  # noqa: F401
        import lm_eval.models.huggingface  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as err:
        raise ValueError(f"lm-evaluation-harness is not installed ({err}); {EXTRA_HINT}") from None
    return lm_eval


def lm_eval_version() -> str:
    """The installed lm-eval version ('unknown' when its metadata is missing)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "unknown"


def _task_source(manager, name: str) -> str:
    """'dataset_path[/dataset_name]' a task reads, from its YAML (for error messages)."""
    entry = manager.task_index.get(name)
    path = getattr(entry, "yaml_path", None)
    if not path:
        return "its dataset"
    try:
        from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval 0.4.13's loader

        cfg = load_yaml(path, resolve_func=False)
    except Exception:  # noqa: BLE001 - a message helper must not fail
        return "its dataset"
    source = cfg.get("dataset_path") or "its dataset"
    if cfg.get("dataset_name"):
        source += f" (subset {cfg['dataset_name']})"
    return f"the Hugging Face dataset {source}" if cfg.get("dataset_path") else source


def check_tasks(manager, tasks: Sequence[str]) -> None:
    """Unknown names and tasks whose data cannot be loaded -> ValueError naming them."""
    from lm_eval.tasks import get_task_dict

    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not manager.match_tasks([t])]
    if unknown:
        hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        raise ValueError("unknown lm-eval task(s): " + "; ".join(
            f"{t} (did you mean {', '.join(h)}?)" if h else t for t, h in hints.items())
            + ". Local tasks (ddk_ppl, ddk_mc, ddk_ppl_<domain>, ...) need --manifest (built "
            "from its test split) or --include-path (`megatron-ddk lm-eval-tasks`'s folder)")
    for name in tasks:
        try:
            get_task_dict([name], manager)
        except Exception as err:  # noqa: BLE001 - datasets raises many kinds; re-raised named
            raise ValueError(
                f"lm-eval task {name} cannot load its data: it needs {_task_source(manager, name)}"
                f", which is not available on this machine ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:300] if str(err) else ''}). Download it where there "
                f"is network access (HF_DATASETS_CACHE), or use a local task") from None


def export_for_eval(checkpoint: str, out: str, dtype: str = "float32",
                    tokenizer: Optional[str] = None) -> dict:
    """Export in a child process (CPU, GPUs hidden); returns the export's provenance record."""
    from megatron_ddk.evaluation.export import PROVENANCE_FILE

    cmd = [sys.executable, "-m", "megatron_ddk.evaluation.export", "--load", checkpoint,
           "--out", out, "--dtype", dtype] + (["--tokenizer", tokenizer] if tokenizer else [])
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        raise ValueError(f"exporting {checkpoint} for lm-eval failed: "
                         + (lines[-1][len("error: "):] if lines else proc.stderr[-2000:]))
    with open(os.path.join(out, PROVENANCE_FILE), encoding="utf-8") as f:
        return json.load(f)


def _prefix_token_id(hf_dir: str) -> Optional[int]:
    """The eos id when the exported tokenizer prepends no bos (see the module docstring)."""
    tc_path = os.path.join(hf_dir, "tokenizer_config.json")
    gen_path = os.path.join(hf_dir, "generation_config.json")
    if not (os.path.isfile(tc_path) and os.path.isfile(gen_path)):
        return None
    with open(tc_path, encoding="utf-8") as f:
        if json.load(f).get("add_bos_token"):
            return None
    with open(gen_path, encoding="utf-8") as f:
        eos = json.load(f).get("eos_token_id")
    return eos[0] if isinstance(eos, list) else eos


def flat_metrics(results: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results (filter suffix and stderr dropped)."""
    out: Dict[str, Dict[str, float]] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            if (name in ("alias", "sample_len") or name.endswith("_stderr")
                    or not isinstance(value, (int, float))):
                continue
            out.setdefault(task, {})[name] = float(value)
    return out


def run_lm_eval(checkpoint: Optional[str], tasks: Sequence[str], limit: Optional[float] = None,
                batch_size: int = 8, *, manifest: Optional[str] = None,
                include_path: Optional[Sequence[str]] = None, hf_dir: Optional[str] = None,
                device: Optional[str] = None, dtype: Optional[str] = None,
                log_samples: bool = False, local_settings=None,
                allow_code_execution: bool = False) -> Dict[str, Any]:
    """Evaluate a checkpoint (or an existing export, hf_dir) with lm-eval; see the docstring."""
    require_lm_eval()
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = [t.strip() for t in tasks if t and t.strip()]
    if not tasks:
        raise ValueError("no lm-eval task given (--tasks T1,T2)")
    if (checkpoint is None) == (hf_dir is None):
        raise ValueError("give exactly one of a checkpoint (--load) and an exported folder")
    model_path = checkpoint if checkpoint is not None else hf_dir
    if not os.path.exists(model_path):  # before lm-eval looks for its tasks (network)
        raise ValueError(f"{model_path} does not exist (--load: a checkpoint root or "
                         "iter_NNNNNNN folder)")
    if limit is not None and float(limit) >= 1:
        limit = int(limit)  # lm-eval: < 1 is a fraction of each task, >= 1 a count
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("float32" if device == "cpu" else "bfloat16")
    with tempfile.TemporaryDirectory(prefix="megatron_ddk_lm_eval_") as tmp:
        paths = list(include_path or [])
        local = None
        if manifest:
            from megatron_ddk.evaluation.local_tasks import build_local_tasks

            local = build_local_tasks(manifest, os.path.join(tmp, "tasks"), local_settings)
            paths.append(os.path.join(tmp, "tasks"))
        manager = TaskManager(include_path=paths or None)
        check_tasks(manager, tasks)
        export = None
        if checkpoint is not None:
            hf_dir = os.path.join(tmp, "hf")
            export = export_for_eval(checkpoint, hf_dir, dtype=dtype)
        prefix = _prefix_token_id(hf_dir)
        model_args = {"pretrained": hf_dir, "dtype": dtype, "device": device}
        if prefix is not None:
            model_args["prefix_token_id"] = prefix
        logger.info("lm-eval %s on %s: tasks %s, limit %s", lm_eval_version(), hf_dir,
                    ",".join(tasks), limit)
        res = simple_evaluate(model="hf", model_args=model_args, tasks=tasks, limit=limit,
                              batch_size=batch_size, task_manager=manager,
                              log_samples=log_samples, bootstrap_iters=0,
                              confirm_run_unsafe_code=allow_code_execution)
    out = {
        "checkpoint": export["checkpoint"] if export else None,
        "iteration": export["iteration"] if export else None,
        "tokenizer_hash": export["tokenizer_hash"] if export else None,
        "hf_dir": None if export else hf_dir, "export": export, "tasks": tasks, "limit": limit,
        "batch_size": batch_size, "device": device, "dtype": dtype,
        "prefix_token_id": prefix, "lm_eval_version": lm_eval_version(),
        "results": res["results"], "groups": res.get("groups", {}),
        "versions": res.get("versions", {}), "n-samples": res.get("n-samples", {}),
        "higher_is_better": res.get("higher_is_better", {}),
        "metrics": flat_metrics(res["results"]), "local_tasks": local,
    }
    if log_samples:
        out["samples"] = res.get("samples", {})
    return out


def write_result(result: Dict[str, Any], path: str) -> None:
    """JSON (numbers and strings; anything else as its str), written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, json.dumps(result, indent=1, default=str))


def format_metrics(result: Dict[str, Any]) -> str:
    """The flat metrics as a fixed-width table."""
    lines = [f"{'task':<32} {'metric':<20} {'value':>12}"]
    for task, metrics in result["metrics"].items():
        for name, value in metrics.items():
            lines.append(f"{task:<32} {name:<20} {value:>12.4f}")
    return "\n".join(lines)


def lm_eval_main(load: str, tasks: str, output: Optional[str], limit: Optional[float],
                 batch_size: int, manifest: Optional[str], include_path: List[str],
                 device: Optional[str], allow_code_execution: bool = False) -> int:
    """`megatron-ddk lm-eval`: run, print the table, write the JSON. A user error propagates as
    ValueError (exit 2 through console.run_command)."""
    result = run_lm_eval(load, tasks.split(","), limit, batch_size, manifest=manifest,
                         include_path=include_path, device=device,
                         allow_code_execution=allow_code_execution)
    results().info(format_metrics(result))
    if output:
        write_result(result, output)
    return 0
