"""Vocabulary sizes: one common padded size for teacher and student, and its checks.

Released models of one family pad their embeddings differently (Qwen-1.5 14B: 152,064 rows,
1.8B: 151,936). Both models are built with the larger padded size; the padded rows are masked out
of CE and KL by the loss (which gets the real vocabulary size).
"""

from __future__ import annotations

from typing import Optional

from megatron_ddk.config.schema import ModelConfig


def pad_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron-LM's padding: round up to a multiple of divisible_by x tp_size."""
    multiple = divisible_by * tp_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def model_padded_size(model: ModelConfig, vocab_size: int, tp_size: int) -> int:
    """Padded embedding rows of one model (explicit padded_vocab_size wins)."""
    if model.padded_vocab_size is not None:
        if model.padded_vocab_size < vocab_size:
            raise ValueError(f"padded_vocab_size={model.padded_vocab_size} is smaller than the "
                             f"tokenizer vocabulary {vocab_size}")
        if model.padded_vocab_size % tp_size:
            raise ValueError(f"padded_vocab_size={model.padded_vocab_size} is not divisible by "
                             f"tensor_model_parallel_size={tp_size}")
        return model.padded_vocab_size
    return pad_vocab_size(vocab_size, model.make_vocab_size_divisible_by, tp_size)


def common_padded_vocab_size(student: ModelConfig, teacher: Optional[ModelConfig],
                             vocab_size: int, tp_size: int) -> int:
    """The one padded size both models are built with: the larger of the two."""
    size = model_padded_size(student, vocab_size, tp_size)
    if teacher is not None:
        size = max(size, model_padded_size(teacher, vocab_size, tp_size))
    return size


def check_tokenizer_hashes(student_hash: Optional[str], teacher_hash: Optional[str],
                           data_hash: Optional[str]) -> None:
    """Refuse mixed tokenizers: teacher, student and data must share one tokenizer.

    Any hash that is None (unknown, e.g. a fresh student) is not compared.
    """
    known = {name: h for name, h in (("student checkpoint", student_hash),
                                      ("teacher checkpoint", teacher_hash),
                                      ("domain manifest", data_hash)) if h}
    if len(set(known.values())) > 1:
        detail = ", ".join(f"{name}: {h}" for name, h in known.items())
        raise ValueError(f"tokenizer mismatch ({detail}): teacher, student and data must use the "
                         f"same tokenizer; re-preprocess the data or convert the models with the "
                         f"same tokenizer")
