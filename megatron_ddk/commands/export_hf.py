"""Export a megatron-ddk checkpoint (a distilled student) as a Hugging Face model folder.

    megatron-ddk export-hf --load runs/student/checkpoints --out hf_student \
        [--tokenizer PATH | --no-tokenizer] [--add-bos-token] [--dtype auto] [--vocab-size N]

    megatron-ddk lm-eval --load runs/student/checkpoints --tasks arc_easy --output lm_eval.json

--load is a checkpoint root (its latest iteration) or one iter_NNNNNNN folder, saved at any TP/PP:
it is loaded into a single-process TP=1 model (dist_checkpointing reshards), so run this as one
process, no torchrun. Writes config.json (LlamaForCausalLM, or Qwen2ForCausalLM for a model with
a QKV bias), generation_config.json (bos/eos/pad ids), model.safetensors (or shards + index),
the tokenizer (the one the checkpoint was trained with, hash-checked; a SentencePiece model
becomes tokenizer.model + tokenizer_config.json that AutoTokenizer loads with the same ids) and
megatron_ddk_export.json (provenance). Models HF's LLaMA/Qwen2 classes cannot express are
refused. The logic lives in megatron_ddk/evaluation/export.py; docs/hf.md has the details.
"""
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_ddk.evaluation.export import main as export_main

    export_main(argv)
    return 0
