"""One common padded vocabulary for teacher and student (design.md, Vocabularies)."""

import pytest

from megatron_ddk.config import ModelConfig
from megatron_ddk.models.checkpoint import check_compatible
from megatron_ddk.models.vocab import (
    check_tokenizer_hashes,
    common_padded_vocab_size,
    pad_vocab_size,
)


def test_megatron_padding_rule():
    # round up to a multiple of divisible_by x TP (Megatron-LM's rule)
    assert pad_vocab_size(151646, 128, 1) == 151680
    assert pad_vocab_size(151646, 128, 8) == 152576
    assert pad_vocab_size(32000, 128, 2) == 32000


def test_released_qwen_rows_become_one_common_size():
    # Qwen-1.5 14B has 152,064 embedding rows, 1.8B has 151,936, for the same 151,646 tokens
    student = ModelConfig(padded_vocab_size=151936)
    teacher = ModelConfig(padded_vocab_size=152064)
    assert common_padded_vocab_size(student, teacher, 151646, tp_size=8) == 152064
    assert common_padded_vocab_size(student, None, 151646, tp_size=8) == 151936
    with pytest.raises(ValueError, match="smaller than the tokenizer vocabulary"):
        common_padded_vocab_size(ModelConfig(padded_vocab_size=1000), None, 151646, 1)
    with pytest.raises(ValueError, match="not divisible by tensor_model_parallel_size=3"):
        common_padded_vocab_size(ModelConfig(padded_vocab_size=152064 + 1), None, 151646, 3)


def test_checkpoint_with_other_row_count_is_refused_with_the_fix():
    meta = {"padded_vocab_size": 151936}
    with pytest.raises(ValueError, match="151936 embedding rows but the model is built with "
                                         "152064; set model.padded_vocab_size=151936"):
        check_compatible(meta, {}, 152064, None, "ckpt/student")


def test_tokenizer_hash_mismatch_names_both():
    check_tokenizer_hashes("sha256:a", None, "sha256:a")
    with pytest.raises(ValueError, match="tokenizer mismatch.*teacher checkpoint: sha256:b"):
        check_tokenizer_hashes("sha256:a", "sha256:b", "sha256:a")
