"""The pipeline-split rule, written once: how many transformer layers each pipeline stage holds.

Used by the static config checks (config/validate.py), the memory planner (models/memory.py) and
the teacher/student pair (models/pair.py, which checks what Megatron-Core built against it).
Megatron-Core floors num_layers / pp without a word when the layers do not divide, and builds
nonsense (negative or empty stages) for some first/last-stage overrides, so every split is
decided here before anything is built. Imports nothing from megatron_ddk.
"""

from __future__ import annotations

from typing import List, Optional, Tuple


def pipeline_stage_layers(num_layers: int, pp: int, first: Optional[int] = None,
                          last: Optional[int] = None) -> Optional[List[int]]:
    """Transformer layers on each of `pp` stages, as Megatron-Core builds them; None when the
    split cannot work (every stage must hold at least one layer).

    Args:
        num_layers: the model's layer count.
        pp: pipeline stages.
        first / last: num_layers_in_first/last_pipeline_stage (None: an even share).
    """
    if num_layers < 1 or pp < 1 or any(v is not None and v < 1 for v in (first, last)):
        return None
    if pp == 1:
        return [num_layers] if first is None and last is None else None
    rest = num_layers - (first or 0) - (last or 0)
    middle = pp - (first is not None) - (last is not None)
    if rest < 0 or bool(rest) != bool(middle) or (middle and rest % middle):
        return None
    if first is None and last is None:
        return [num_layers // pp] * pp
    share = rest // middle if middle else 0
    return ([first if first is not None else share] + [share] * (pp - 2)
            + [last if last is not None else share])


def suggest_first_stage(num_layers: int, pp: int) -> Optional[int]:
    """A num_layers_in_first_pipeline_stage that makes `num_layers` split over `pp` stages."""
    fits = [f for f in range(1, num_layers) if pipeline_stage_layers(num_layers, pp, f)]
    return min(fits, key=lambda f: abs(f - num_layers / pp)) if fits else None


def split_errors(num_layers: int, first: Optional[int], last: Optional[int], where: str,
                 pp: int, pp_field: str = "parallel.pipeline_model_parallel_size") -> List[str]:
    """Why one model's layers cannot be split over `pp` stages (empty when they can)."""
    if pipeline_stage_layers(num_layers, pp, first, last) is not None:
        return []
    if pp == 1 and (first is not None or last is not None):
        return [f"{where}: num_layers_in_first/last_pipeline_stage need {pp_field} > 1"]
    unset = first is None and last is None
    first_hint = suggest_first_stage(num_layers, pp) if pp > 1 and unset else None
    hint = (f" (e.g. {where}.num_layers_in_first_pipeline_stage={first_hint})"
            if first_hint is not None else "")
    return [f"{where}.num_layers={num_layers} cannot be split over {pp_field}={pp} stages "
            f"(first stage: {first}, last stage: {last}); every stage needs at least one layer: "
            f"make the layers divide evenly or set num_layers_in_first_pipeline_stage / "
            f"num_layers_in_last_pipeline_stage{hint}"]


def pair_split_errors(student: Tuple[int, Optional[int], Optional[int]],
                      teacher: Tuple[int, Optional[int], Optional[int]], pp: int,
                      names: tuple = ("model", "distill.teacher"),
                      pp_field: str = "parallel.pipeline_model_parallel_size") -> List[str]:
    """Why student and teacher cannot share `pp` pipeline stages (empty when they can).

    Args:
        student / teacher: (num_layers, num_layers_in_first_pipeline_stage,
            num_layers_in_last_pipeline_stage) of each model.
        pp: pipeline stages (both models are split over the same stages).
        names: how the message names the two models' config sections.
        pp_field: how the message names the stage count.
    """
    splits = [pipeline_stage_layers(n, pp, f, la) for (n, f, la) in (student, teacher)]
    if all(s is not None for s in splits):
        return []
    parts = []
    for name, (n, f, la), split in zip(names, (student, teacher), splits):
        extra = (f", num_layers_in_first_pipeline_stage={f}" if f is not None else "") + \
                (f", num_layers_in_last_pipeline_stage={la}" if la is not None else "")
        verdict = f"splits as {split}" if split is not None else f"cannot be split over {pp}"
        parts.append(f"{name}.num_layers={n}{extra} {verdict}")
    hints = []
    for name, (n, f, la), split in zip(names, (student, teacher), splits):
        unset = f is None and la is None
        first = suggest_first_stage(n, pp) if split is None and pp > 1 and unset else None
        if first is not None:
            hints.append(f"{name}.num_layers_in_first_pipeline_stage={first}")
    hint = f" (e.g. {', '.join(hints)})" if hints else ""
    return [f"teacher and student share the {pp_field}={pp} pipeline stages: "
            + "; ".join(parts) + f". Each model's layers must divide evenly over the {pp} "
            f"stages, or set that model's num_layers_in_first_pipeline_stage / "
            f"num_layers_in_last_pipeline_stage{hint}"]
