"""Every example run config validates; the presets carry the paper's settings; manifests parse.

World size of a config: its "# world_size: N" header comment (the layout it was planned for),
else TP x PP (one data-parallel rank).
"""

import glob
import math
import os
import re

import pytest
import yaml

from megatron_ddk.config import load_config, static_checks, train_iters
from megatron_ddk.models.memory import GIB, Layout, plan_stages

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")


def _run_configs():
    found = []
    for path in sorted(glob.glob(os.path.join(EXAMPLES, "**", "*.yaml"), recursive=True)):
        with open(path) as f:
            data = yaml.safe_load(f)
        if isinstance(data, dict) and "model" in data:
            found.append(path)
    return found


def _world_size(path, cfg):
    with open(path) as f:
        match = re.search(r"^#\s*world_size:\s*(\d+)", f.read(), re.MULTILINE)
    if match:
        return int(match.group(1))
    return cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size


RUN_CONFIGS = _run_configs()
PRESETS = sorted(glob.glob(os.path.join(EXAMPLES, "presets", "*.yaml")))
MANIFESTS = sorted(glob.glob(os.path.join(EXAMPLES, "manifests", "*.yaml")))


def test_presets_cover_the_papers_pairs():
    names = {os.path.basename(p) for p in PRESETS}
    assert {"qwen1.5_14b_to_1.8b.yaml", "qwen1.5_14b_to_4b.yaml", "qwen1.5_7b_to_1.8b.yaml",
            "llama2_13b_to_tinyllama_1.1b.yaml", "starcoder_15.5b_to_3b.yaml"} <= names
    assert set(PRESETS) <= set(RUN_CONFIGS)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: os.path.relpath(p, EXAMPLES))
def test_example_config_passes_static_checks(path):
    cfg = load_config(path)
    world = _world_size(path, cfg)
    static_checks(cfg, world)


# The paper's settings (Liu et al., NeurIPS 2024, Sec. 4.1 and Algorithm 1, as transcribed in
# docs/ddk.md), written here by hand, not read from any preset or config default.
PAPER = {
    "ddk.policy": "ddk",                    # the full method
    "ddk.interval": 1000,                   # K, the distillation interval
    "ddk.alpha": 0.5,                       # Eq. 2 smoothing
    "ddk.valid_samples_per_domain": 500,    # validation samples per domain
    "ddk.signal": "validation",             # r_0 from Eq. 1 on validation ppl, before step 1
    "ddk.initial_sampling": "natural",      # Algorithm 1 line 2: D_0 "randomly" sampled
    "distill.gamma": 0.2,                   # Eq. 3 KL weight
    "distill.temperature": 1.0,             # T
    "distill.kl_t2_scaling": False,         # Eq. 3 has no T^2
    "distill.kl_direction": "forward",      # KD = KL(p_T || p_S)
    "train.lr": 3e-5, "train.min_lr": 3e-6, "train.lr_warmup_init": 0.0,
    "train.lr_warmup_iters": 1000, "train.lr_decay_style": "cosine",
}


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_preset_uses_the_papers_hyper_parameters(path):
    cfg = load_config(path)
    with open(path) as f:
        raw = yaml.safe_load(f)
    t, d = cfg.train, cfg.distill
    assert d.teacher is not None and d.teacher_load.startswith("/path/to/")
    assert cfg.data.manifest.startswith("/path/to/")
    for dotted, want in PAPER.items():
        section, key = dotted.split(".")
        got = getattr(getattr(cfg, section), key)
        assert got == want and type(got) is type(want), (path, dotted, got, want)
        # stated in the file, so a change of a config default cannot move a paper preset
        assert key in raw[section], f"{path}: {dotted} must be written out"
    assert t.train_tokens == 15_000_000_000
    assert t.global_batch_size * cfg.data.seq_length == 2 ** 19      # ~0.5M tokens per step
    assert train_iters(cfg) == math.ceil(15e9 / 2 ** 19) == 28611    # paper: ~30,000 steps
    assert cfg.checkpoint.save_on_signal and cfg.checkpoint.save
    world = _world_size(path, cfg)
    assert world % 8 == 0, "layouts are planned for whole 8-GPU nodes"


# Released checkpoints' embedding rows (HF config.json vocab_size) and a few dimensions.
ROWS = {"qwen1.5_14b_to_1.8b.yaml": (151936, 152064), "qwen1.5_14b_to_4b.yaml": (151936, 152064),
        "qwen1.5_7b_to_1.8b.yaml": (151936, 151936),
        "llama2_13b_to_tinyllama_1.1b.yaml": (32000, 32000),
        "starcoder_15.5b_to_3b.yaml": (49152, 49152)}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_preset_vocabularies_and_architecture_family(name):
    cfg = load_config(os.path.join(EXAMPLES, "presets", name))
    s, t = cfg.model, cfg.distill.teacher
    assert (s.padded_vocab_size, t.padded_vocab_size) == ROWS[name]
    for m in (s, t):
        assert m.vocab_size is None   # taken from the manifest's tokenizer at run time
        if name.startswith("qwen"):
            assert (m.rotary_base in (1_000_000, 5_000_000) and m.add_qkv_bias
                    and not m.share_embeddings_and_output_weights and m.norm_epsilon == 1e-6)
        elif name.startswith("llama"):
            assert m.rotary_base == 10000 and not m.add_qkv_bias and m.activation == "swiglu"
        else:
            assert (m.num_query_groups, m.position_embedding_type, m.activation,
                    m.normalization, m.add_bias_linear, m.share_embeddings_and_output_weights) \
                == (1, "learned_absolute", "gelu", "LayerNorm", True, True)
    if name == "qwen1.5_14b_to_4b.yaml":
        assert s.rotary_base == 5_000_000 and t.rotary_base == 1_000_000


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_preset_layout_fits_80gb(path):
    cfg = load_config(path)
    p, tr = cfg.parallel, cfg.train
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = _world_size(path, cfg) // (tp * pp)
    lay = Layout(tp=tp, pp=pp, dp=dp, micro_batch_size=tr.micro_batch_size,
                 seq_length=cfg.data.seq_length,
                 num_microbatches=tr.global_batch_size // (tr.micro_batch_size * dp),
                 sequence_parallel=p.sequence_parallel, attention="flash",
                 recompute=cfg.model.recompute_granularity)
    vocab = max(cfg.model.padded_vocab_size, cfg.distill.teacher.padded_vocab_size)
    peak = max(s.total for s in plan_stages(cfg.model, cfg.distill.teacher, vocab, lay))
    assert peak < 70 * GIB   # margin under 80 GB for what the plan does not model


REQUIRED_DOMAIN_KEYS = {"name", "train_prefixes", "valid_prefix", "num_train_tokens",
                        "num_train_documents", "num_valid_tokens", "num_valid_documents",
                        "initial_weight"}


@pytest.mark.parametrize("path", MANIFESTS, ids=os.path.basename)
def test_manifest_template_shape(path):
    with open(path) as f:
        data = yaml.safe_load(f)
    assert set(data) == {"version", "tokenizer", "domains"} and data["version"] == 1
    assert set(data["tokenizer"]) == {"model", "hash", "vocab_size"}
    assert data["tokenizer"]["hash"].startswith("sha256:")
    names = [d["name"] for d in data["domains"]]
    assert len(names) == len(set(names))
    for d in data["domains"]:
        assert set(d) == REQUIRED_DOMAIN_KEYS
        assert isinstance(d["train_prefixes"], list) and d["train_prefixes"]
    if "10_domains" in path:
        assert names == ["common_crawl", "c4", "the_stack", "wikipedia", "books", "arxiv",
                         "stack_exchange", "chinese_books", "chinese_common_crawl",
                         "open_web_math"]
    else:
        assert names == ["python", "java", "typescript", "csharp"]


def test_presets_point_at_a_manifest_template():
    templates = {os.path.splitext(os.path.basename(p))[0] for p in MANIFESTS}
    assert len(MANIFESTS) == 3
    for path in PRESETS:
        folder = os.path.basename(os.path.dirname(load_config(path).data.manifest))
        assert folder in templates, (path, folder)
