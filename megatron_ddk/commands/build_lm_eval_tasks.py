"""Build megatron-ddk's local lm-eval tasks from a manifest's held-out test split (no download).

    megatron-ddk lm-eval-tasks --manifest datasets/manifest.yaml --out lm_eval_tasks/
    lm_eval --model hf --model_args pretrained=hf_student,prefix_token_id=2 \
        --include_path lm_eval_tasks/ --tasks ddk_ppl,ddk_mc
    megatron-ddk lm-eval --load CKPT --include-path lm_eval_tasks/ --tasks ddk_ppl --output r.json

Per domain: ddk_ppl_<domain> (rolling perplexity of the test documents) and ddk_mc_<domain>
(which continuation is the real one); groups ddk_ppl and ddk_mc. Details: docs/lm_eval.md; the
logic is megatron_ddk/evaluation/local_tasks.py.
"""

import argparse
import json
import os

from megatron_ddk.console import results, run_or_exit
from megatron_ddk.evaluation.local_tasks import LocalTaskSettings, build_local_tasks


def main(argv=None) -> None:
    d = LocalTaskSettings()
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="domain manifest with a test split")
    p.add_argument("--out", required=True, help="task folder to write (lm-eval include path)")
    p.add_argument("--max-docs", type=int, default=d.max_docs,
                   help="test documents per domain (0: all)")
    p.add_argument("--max-doc-tokens", type=int, default=None,
                   help="cut longer documents into pieces for the rolling task (default: whole)")
    p.add_argument("--max-items", type=int, default=d.max_items,
                   help="multiple-choice items per domain")
    p.add_argument("--context-tokens", type=int, default=d.context_tokens)
    p.add_argument("--continuation-tokens", type=int, default=d.continuation_tokens)
    p.add_argument("--num-choices", type=int, default=d.num_choices)
    p.add_argument("--seed", type=int, default=d.seed)
    a = p.parse_args(argv)
    settings = LocalTaskSettings(max_docs=a.max_docs or None, max_doc_tokens=a.max_doc_tokens,
                                 max_items=a.max_items, context_tokens=a.context_tokens,
                                 continuation_tokens=a.continuation_tokens,
                                 num_choices=a.num_choices, seed=a.seed)
    info = run_or_exit(build_local_tasks, a.manifest, a.out, settings)
    results().info(json.dumps({"out": os.path.abspath(a.out), "domains": info["domains"],
                               "tasks": info["tasks"]}, indent=1))

