"""Shared fixtures of the data tests: a tiny lossless SentencePiece model and tiny JSONL domains.

The tokenizer is trained once per session (~1 s) on a few standard-library modules plus CJK and
prose lines written here, so every test uses a real model without touching the network.
"""

from __future__ import annotations

import json
import os
import sysconfig
import warnings

import pytest

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

CODE_SAMPLE = (
    "def f(x):\n\tif x  >  1:\n        return [x, {'k': x ** 2}]  # trailing  \n\n\n"
    "    pass\r\nclass A:  \n    '''doc'''\n"
)
CJK_SAMPLE = ("中文测试：你好，世界！日本語のテキスト。"
              "한국어 문장. 混合 mixed 文本 123 ４５６\n")
PROSE_SAMPLE = "The quick brown fox jumps over the lazy dog. It's 3.14 -- \"quoted\" text.\n"

_CJK_LINES = [
    "自然语言处理是人工智能的一个重要方向。",
    "知识蒸馏把大模型的知识迁移到小模型中。",
    "领域数据的比例会影响学生模型的表现。",
    "東京は日本の首都です。今日は良い天気ですね。",
]


def _training_lines():
    stdlib = sysconfig.get_paths()["stdlib"]
    lines = []
    for name in ("textwrap.py", "json/decoder.py", "string.py", "bisect.py"):
        with open(os.path.join(stdlib, name), encoding="utf-8") as f:
            lines.extend(line for line in f.read().split("\n") if line)
    lines.extend(_CJK_LINES * 20)
    lines.extend([PROSE_SAMPLE.strip()] * 20)
    return lines


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> str:
    """Path of a lossless BPE SentencePiece model (vocab 800) with its metadata file."""
    from megatron_ddk.data.tokenizer import train_sentencepiece

    folder = tmp_path_factory.mktemp("tokenizer")
    return train_sentencepiece(_training_lines(), str(folder / "tiny"), vocab_size=800,
                               num_threads=1)


def write_jsonl(path, texts, key="text") -> str:
    """One {"key": text} object per line; returns the path as a string."""
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({key: text, "meta": 1}, ensure_ascii=False) + "\n")
    return str(path)


def sample_texts(n: int, seed: int = 0):
    """n deterministic documents of varied length mixing code, CJK and prose."""
    import random

    rng = random.Random(seed)
    pieces = [CODE_SAMPLE, CJK_SAMPLE, PROSE_SAMPLE, "x = 1\n", "  indented\ttab\n"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(n)]


@pytest.fixture
def make_jsonl():
    """write_jsonl(path, texts, key='text') -> path (a fixture so tests need no conftest import)."""
    return write_jsonl


@pytest.fixture
def make_texts():
    """sample_texts(n, seed=0) -> n varied documents."""
    return sample_texts


@pytest.fixture
def samples() -> dict:
    """Round-trip samples: code (tabs, runs of spaces, CRLF, blank lines), CJK, prose."""
    return {"code": CODE_SAMPLE, "cjk": CJK_SAMPLE, "prose": PROSE_SAMPLE}
