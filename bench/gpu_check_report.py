"""Write runs/gpu_check/report.md from what scripts/gpu_check.sh left in its output folder.

    python bench/gpu_check_report.py runs/gpu_check

Reads (each optional; a missing one is reported as not run): steps.tsv (step, exit code, seconds,
log file), host.json (GPU, driver, torch, CUDA, Transformer Engine), pytest.xml (JUnit XML of the
GPU tests), throughput.json (bench/gpu_throughput.py --json-out), precision.json
(bench/gpu_precision.py --json-out). Writes report.md atomically. Standard library only.
"""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET
from typing import List, Optional


def _json(folder: str, name: str) -> Optional[dict]:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _steps(folder: str) -> List[List[str]]:
    path = os.path.join(folder, "steps.tsv")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def _pytest(folder: str) -> List[str]:
    path = os.path.join(folder, "pytest.xml")
    if not os.path.isfile(path):
        return ["GPU tests: not run (no pytest.xml)"]
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites)
              for k in ("tests", "failures", "errors", "skipped")}
    out = [f"GPU tests: {counts['tests']} run, {counts['failures']} failed, {counts['errors']} "
           f"errors, {counts['skipped']} skipped"]
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                msg = (node.get("message") or "").splitlines()[0][:200] if node.get("message") \
                    else ""
                out.append(f"- {kind}: {case.get('classname')}::{case.get('name')}: {msg}")
    return out


def _throughput(data: Optional[dict]) -> List[str]:
    if data is None:
        return ["Not run (no throughput.json)."]
    out = [f"- {line}" for line in data["header"]] + ["", data["table"], ""]
    for r in data["rows"]:
        if r["run"].startswith("KD") and r.get("mfu") is not None:
            out.append(f"- KD step MFU (teacher FLOPs counted) at seq {r['seq']}, {r['run']}: "
                       f"{100 * r['mfu']:.1f}% (target >= 40% on H100-class)")
        if r.get("peak_gib") is not None and r.get("predicted_gib"):
            out.append(f"- peak memory {r['run']} seq {r['seq']}: {r['peak_gib']:.1f} GiB "
                       f"allocated vs {r['predicted_gib']:.1f} GiB predicted by "
                       f"megatron-ddk plan-memory ({r['peak_gib'] / r['predicted_gib']:.2f}x)")
    return out


def _precision(data: Optional[dict]) -> List[str]:
    if data is None:
        return ["Not run (no precision.json)."]
    out = [f"{data['pair']} pair, {data['tokens']} tokens on {data['device']}:", "",
           "| quantity | fp32 | bf16 | bf16 - fp32 |", "|---|---|---|---|"]
    for k in ("loss", "lm_loss", "kd_loss"):
        out.append(f"| {k} | {data['fp32'][k]:.6f} | {data['bf16'][k]:.6f} | "
                   f"{data['difference'][k]:+.2e} |")
    out += ["", f"Tolerance {data['tolerance']:.2e}; logits relative L2 student "
                f"{data['logits_rel_l2']['student']:.2e}, teacher "
                f"{data['logits_rel_l2']['teacher']:.2e}: **{'PASS' if data['ok'] else 'FAIL'}**"]
    return out


def build_report(folder: str) -> str:
    host = _json(folder, "host.json") or {}
    steps = _steps(folder)
    lines = ["# GPU check report", "", "Written by scripts/gpu_check.sh (docs/gpu.md).", "",
             "## Host", ""]
    lines += [f"- {k}: {v}" for k, v in sorted(host.items())] or ["- (no host.json)"]
    lines += ["", "## Steps", "", "| step | exit code | seconds | log |", "|---|---|---|---|"]
    lines += [f"| {s[0]} | {s[1]} | {s[2]} | {s[3] if len(s) > 3 else ''} |" for s in steps]
    failed = [s[0] for s in steps if s[1] != "0"]
    result = ("no steps ran" if not steps else
              "all steps passed" if not failed else "FAILED: " + ", ".join(failed))
    lines += ["", f"Result: {result}", "", "## GPU tests", ""] + _pytest(folder)
    lines += ["", "## Throughput (bench/gpu_throughput.py)", ""]
    lines += _throughput(_json(folder, "throughput.json"))
    lines += ["", "## bf16 against fp32 (bench/gpu_precision.py)", ""]
    lines += _precision(_json(folder, "precision.json"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print("usage: python bench/gpu_check_report.py OUTPUT_FOLDER (of scripts/gpu_check.sh)",
              file=sys.stderr)
        return 2
    folder = argv[0]
    text = build_report(folder)
    path = os.path.join(folder, "report.md")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
