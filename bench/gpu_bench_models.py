"""Model pairs, synthetic data and comparisons shared by the single-GPU benchmarks.

Used by bench/gpu_throughput.py (tokens/s, MFU, time split, memory) and bench/gpu_precision.py
(bf16 against fp32). Two pairs, both sized for one 80 GB GPU with a bf16 student under the
distributed optimizer and a frozen bf16 teacher:

- llama (default): a small LLaMA-shaped student, 16 layers x hidden 2048 (16 heads of 128,
  4 query groups, SwiGLU ffn 5632, RMSNorm, RoPE, vocab 32,000): 0.84B parameters; the teacher
  has LLaMA-2-7B-shaped layers (hidden 4096, 32 heads, ffn 11008) at 12 of its 32 layers: 2.7B.
- qwen: Qwen-1.5-1.8B-shaped student layers and Qwen-1.5-7B-shaped teacher layers, 8 each by
  default, with the Qwen vocabulary (151,646 tokens, 151,936 rows).
--cpu-smoke shrinks either to two tiny fp32 models. Nothing here imports Megatron-Core at module
load; megatron_ddk is imported lazily so `--help` stays fast.
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch

QWEN_VOCAB, QWEN_PADDED = 151646, 151936
LLAMA_VOCAB = 32000
PAIRS = ("llama", "qwen")


def model_configs(args):
    """(student, teacher, vocab_size) ModelConfigs of the benchmark (or of the smoke run)."""
    from megatron_ddk.config.schema import ModelConfig

    max_pos = max(args.seq_lengths)
    if args.cpu_smoke:
        common = dict(max_position_embeddings=max_pos, transformer_impl=args.impl)
        return (ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                            ffn_hidden_size=64, **common),
                ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                            ffn_hidden_size=128, **common), 500)
    if getattr(args, "pair", "llama") == "qwen":
        common = dict(max_position_embeddings=max_pos, transformer_impl=args.impl,
                      norm_epsilon=1e-6, rotary_base=1000000, add_qkv_bias=True,
                      padded_vocab_size=QWEN_PADDED)
        student = ModelConfig(num_layers=args.student_layers or 8, hidden_size=2048,
                              num_attention_heads=16, ffn_hidden_size=5504, **common)
        teacher = ModelConfig(num_layers=args.teacher_layers or 8, hidden_size=4096,
                              num_attention_heads=32, ffn_hidden_size=11008, **common)
        return student, teacher, QWEN_VOCAB
    common = dict(max_position_embeddings=max_pos, transformer_impl=args.impl, norm_epsilon=1e-5,
                  rotary_base=10000)
    student = ModelConfig(num_layers=args.student_layers or 16, hidden_size=2048,
                          num_attention_heads=16, num_query_groups=4, ffn_hidden_size=5632,
                          **common)
    teacher = ModelConfig(num_layers=args.teacher_layers or 12, hidden_size=4096,
                          num_attention_heads=32, ffn_hidden_size=11008, **common)
    return student, teacher, LLAMA_VOCAB


def num_params(cfg, padded_vocab: int) -> int:
    """Parameters of one model (models/memory.py's count)."""
    from megatron_ddk.models.memory import model_params

    return model_params(cfg, padded_vocab)


def predicted_peak_bytes(student, teacher, padded_vocab: int, *, seq: int, mbs: int,
                         num_microbatches: int, bf16: bool, impl: str) -> int:
    """megatron-ddk plan-memory's per-GPU total for this run on one GPU, without its fixed overhead
    (CUDA context, allocator slack), i.e. what torch.cuda.max_memory_allocated can be held to."""
    from megatron_ddk.models.memory import Layout, plan_stages

    lay = Layout(tp=1, pp=1, dp=1, micro_batch_size=mbs, seq_length=seq,
                 num_microbatches=num_microbatches, use_distributed_optimizer=True, bf16=bf16,
                 attention="flash" if impl == "transformer_engine" else "materialized",
                 overhead_bytes=0)
    return int(plan_stages(student, teacher, padded_vocab, lay)[0].total)


def copy_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Copy every parameter of `src` into the same-named parameter of `dst`."""
    dst_params = dict(dst.named_parameters())
    src_params = dict(src.named_parameters())
    if set(dst_params) != set(src_params):
        raise ValueError(f"copy_weights: parameter names differ: "
                         f"{sorted(set(dst_params) ^ set(src_params))[:6]}")
    with torch.no_grad():
        for name, p in src_params.items():
            dst_params[name].copy_(p)


class SyntheticDomain:
    """A domain's validation set of random tokens, in GPTDataset's sample format."""

    def __init__(self, domain: int, num_samples: int, seq_length: int, vocab_size: int):
        self.domain, self.n, self.seq, self.vocab = domain, num_samples, seq_length, vocab_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 * self.domain + i)
        text = torch.randint(0, self.vocab, (self.seq + 1,), generator=g)
        return {"tokens": text[:-1], "labels": text[1:], "loss_mask": torch.ones(self.seq),
                "position_ids": torch.arange(self.seq)}


def train_batches(num: int, mbs: int, seq: int, vocab: int, num_domains: int, device,
                  seed: int) -> List[Dict[str, torch.Tensor]]:
    """`num` micro-batches of random tokens on `device` (trainer.collate's keys)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        text = torch.randint(0, vocab, (mbs, seq + 1), generator=g)
        out.append({"tokens": text[:, :-1], "labels": text[:, 1:],
                    "loss_mask": torch.ones(mbs, seq),
                    "position_ids": torch.arange(seq).expand(mbs, seq).contiguous(),
                    "domain_id": torch.randint(0, num_domains, (mbs,), generator=g)})
    return [{k: v.to(device) for k, v in b.items()} for b in out]


def logit_error(reference: torch.Tensor, test: torch.Tensor, vocab_size: int,
                chunk_tokens: int = 1024):
    """(relative L2, mean KL(softmax(reference) || softmax(test))) over tokens, in fp32.

    Both [..., v_padded]; columns from vocab_size on (padding) are ignored.
    """
    ref = reference[..., :vocab_size].reshape(-1, vocab_size)
    tst = test[..., :vocab_size].reshape(-1, vocab_size)
    num = den = kl = 0.0
    for i in range(0, ref.shape[0], chunk_tokens):
        r, t = ref[i:i + chunk_tokens].float(), tst[i:i + chunk_tokens].float()
        num += float((t - r).pow(2).sum())
        den += float(r.pow(2).sum())
        log_r, log_t = torch.log_softmax(r, -1), torch.log_softmax(t, -1)
        kl += float((log_r.exp() * (log_r - log_t)).sum())
    return math.sqrt(num / den), kl / ref.shape[0]
