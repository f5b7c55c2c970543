"""The embedded default, end to end: demo corpus -> tokenizer -> datasets -> teacher -> student
-> CPT / KD / DDK on the same token budget -> per-domain evaluation -> report with plots.

    python tools/quickstart.py            # the full demo (~15 min on 2 CPU cores)
    python tools/quickstart.py --smoke    # every stage on a tiny budget (~2 min), for tests

Run configs come from examples/quickstart/*.yaml (the smoke run shrinks them with overrides).
Each stage is a real `megatron-ddk` command; their logs go to <out>/logs/. Stage timings go to
<out>/timing.json and into the report.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples", "quickstart")

SMOKE_MODEL = {"teacher": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                           "num_query_groups": 2, "ffn_hidden_size": 128,
                           "max_position_embeddings": 64},
               "student": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4,
                           "num_query_groups": 2, "ffn_hidden_size": 64,
                           "max_position_embeddings": 64}}


class Quickstart:
    """Runs the stages in order, timing each, in output folder `out` with data in `data`."""

    def __init__(self, out: str, data: str, smoke: bool):
        self.out, self.data, self.smoke = out, data, smoke
        self.timing: dict = {}
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)

    # ------------------------------------------------------------------ helpers
    def stage(self, name: str, args: list, log: str) -> None:
        """Run one command, streaming a one-line status; fail loudly with its log tail."""
        print(f"[quickstart] {name} ...", flush=True)
        t0 = time.time()
        with open(os.path.join(self.logs, log), "w") as f:
            proc = subprocess.run([sys.executable] + args, cwd=ROOT, stdout=f,
                                  stderr=subprocess.STDOUT, env=dict(os.environ))
        seconds = time.time() - t0
        self.timing[name] = self.timing.get(name, 0.0) + seconds
        if proc.returncode != 0:
            tail = open(os.path.join(self.logs, log)).read()[-3000:]
            raise SystemExit(f"[quickstart] {name} failed (exit {proc.returncode}); log "
                             f"{os.path.join(self.logs, log)}:\n{tail}")
        print(f"[quickstart] {name} done in {seconds:.1f} s", flush=True)

    def config(self, example: str, name: str, **changes) -> str:
        """examples/quickstart/<example>.yaml with paths moved under out/data (and shrunk for
        --smoke), written to out/configs/<name>.yaml."""
        cfg = yaml.safe_load(open(os.path.join(EXAMPLES, example + ".yaml")))
        cfg["data"]["manifest"] = os.path.join(self.data, "datasets", "manifest.yaml")
        cfg["data"]["cache_dir"] = os.path.join(self.out, "cache")
        cfg["logging"]["run_dir"] = os.path.join(self.out, name)
        cfg["checkpoint"]["save"] = os.path.join(self.out, name, "ckpt")
        if cfg["checkpoint"].get("load"):
            cfg["checkpoint"]["load"] = os.path.join(self.out, "student", "ckpt")
        if "distill" in cfg:
            cfg["distill"]["teacher_load"] = os.path.join(self.out, "teacher", "ckpt")
        if self.smoke:
            self._shrink(cfg, example)
        for dotted, value in changes.items():
            section, key = dotted.split("__")
            cfg.setdefault(section, {})[key] = value
        path = os.path.join(self.out, "configs", name + ".yaml")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        return path

    @staticmethod
    def _shrink(cfg: dict, example: str) -> None:
        cfg["model"] = copy.deepcopy(SMOKE_MODEL["teacher" if example == "teacher" else "student"])
        if cfg.get("distill"):
            cfg["distill"]["teacher"] = copy.deepcopy(SMOKE_MODEL["teacher"])
        cfg["data"]["seq_length"] = 32
        cfg["ddk"].update(valid_samples_per_domain=8, interval=4)
        cfg["train"].update(micro_batch_size=4, global_batch_size=8, lr_warmup_iters=2,
                            train_iters={"teacher": 20, "student": 6}.get(example, 12))
        cfg["logging"]["log_interval"] = 2

    # ------------------------------------------------------------------ stages
    def build_data(self) -> None:
        corpus = os.path.join(self.data, "corpus")
        size = ["--max-mb", "0.12", "--min-mb", "0.06", "--max-doc-kb", "8"] if self.smoke else \
            ["--max-mb", "1.0"]
        self.stage("corpus", ["tools/build_demo_corpus.py", "--output-dir", corpus] + size,
                   "corpus.log")
        vocab = "512" if self.smoke else "4096"
        valid = ["--valid-samples", "8", "--valid-seq-length", "32"] if self.smoke else \
            ["--valid-samples", "32", "--valid-seq-length", "256"]
        self.stage("tokenizer + datasets", [
            "tools/build_domains.py", "--input", corpus,
            "--output-dir", os.path.join(self.data, "datasets"),
            "--tokenizer-model", os.path.join(self.data, "tokenizer", "demo.model"),
            "--train-tokenizer", "--vocab-size", vocab, "--workers", "2"] + valid, "datasets.log")

    def train(self, name: str, config: str, *overrides: str) -> None:
        self.stage(f"train {name}", ["-m", "megatron_ddk.train", "--config", config, *overrides],
                   f"train_{name}.log")

    def evaluate(self, name: str, config: str, ckpt: str) -> str:
        out = os.path.join(self.out, "eval", name + ".json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        self.stage("evaluate", ["-m", "megatron_ddk.cli", "eval", "--config", config, "--load",
                                ckpt, "--output", out], f"eval_{name}.log")
        return out

    def run(self) -> None:
        t0 = time.time()
        self.build_data()
        teacher_cfg = self.config("teacher", "teacher")
        student_cfg = self.config("student", "student")
        self.train("teacher", teacher_cfg)
        self.train("student", student_cfg)
        runs = {"CPT": self.config("ddk", "cpt", distill__teacher=None, ddk__policy="static"),
                "KD": self.config("ddk", "kd", ddk__policy="static"),
                "DDK": self.config("ddk", "ddk")}
        for name, cfg in runs.items():
            self.train(name, cfg)
        evals = {"teacher": self.evaluate("teacher", teacher_cfg, os.path.join(self.out, "teacher", "ckpt")),
                 "student_before": self.evaluate("student_before", student_cfg,
                                                 os.path.join(self.out, "student", "ckpt"))}
        for name in runs:
            evals[name] = self.evaluate(name, runs["DDK"], os.path.join(self.out, name.lower(), "ckpt"))
        timing_path = os.path.join(self.out, "timing.json")
        self.timing["total (before report)"] = time.time() - t0
        with open(timing_path, "w") as f:
            json.dump({k: round(v, 1) for k, v in self.timing.items()}, f, indent=1)
        args = ["tools/make_report.py", "--out", os.path.join(self.out, "report.md"),
                "--timing", timing_path, "--title",
                "megatron-ddk quickstart" + (" (smoke)" if self.smoke else "")]
        for name, path in evals.items():
            args += ["--eval", f"{name}={path}"]
        for name in runs:
            args += ["--run", f"{name}={os.path.join(self.out, name.lower())}"]
        self.stage("report", args, "report.log")
        print(f"[quickstart] report: {os.path.join(self.out, 'report.md')} "
              f"(total {time.time() - t0:.0f} s)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny budget (~2 min), every stage")
    p.add_argument("--out", default=None, help="output folder (default runs/quickstart[_smoke])")
    p.add_argument("--data", default=None, help="data folder (default data/demo[_smoke])")
    args = p.parse_args()
    suffix = "_smoke" if args.smoke else ""
    out = os.path.abspath(args.out or os.path.join(ROOT, "runs", "quickstart" + suffix))
    data = os.path.abspath(args.data or os.path.join(ROOT, "data", "demo" + suffix))
    for folder in (out, data):  # every run starts clean: the timings in the report are real
        shutil.rmtree(folder, ignore_errors=True)
    Quickstart(out, data, args.smoke).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
