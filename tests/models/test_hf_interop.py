"""Hugging Face import/export against transformers itself (tiny random models, no downloads).

Reference: transformers' own LlamaForCausalLM / Qwen2ForCausalLM forward on the same tokens.
The converted Megatron-Core model must give the same per-token logits (first vocab_size columns;
padded columns are zero rows) at TP=1 and TP=2; the exported folder must load in transformers
with the same logits; import -> export must reproduce every safetensors tensor bit for bit.
Megatron runs in spawned processes (initialize() sets process-global state); transformers runs
here.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_ddk.testing import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(ROOT, "tools")
VOCAB, SEQ, BATCH = 300, 24, 2  # 300 is not a multiple of 128: padding is exercised


def _tools():
    from megatron_ddk.commands import convert_hf_checkpoint
    from megatron_ddk.evaluation import export

    return convert_hf_checkpoint, export


def _tokens():
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def _randomize(model, seed):
    """Large random weights (HF's 0.02 init makes every logit ~0) and non-unit norms, so a
    swapped or mis-ordered tensor changes the logits far beyond the tolerance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)


def _write_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                   "eos_token": "</s>", "unk_token": "<unk>"}, f)


def _make_hf(kind, path):
    """Save a tiny random HF model; return its logits on _tokens(), computed in fp32 (from the
    bf16-rounded weights for qwen2_bf16, which is saved in bf16)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                  max_position_embeddings=64, rms_norm_eps=1e-5)
    if kind == "llama":  # untied, non-default rope_theta and head_dim, sharded safetensors
        model = LlamaForCausalLM(LlamaConfig(**common, rope_theta=500.0, head_dim=32,
                                             tie_word_embeddings=False))
    else:  # Qwen2: QKV bias, tied embeddings (qwen2_bf16: the same, stored in bf16)
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    _randomize(model, seed={"llama": 1, "qwen2": 2, "qwen2_bf16": 3}[kind])
    model.eval()
    with torch.no_grad():
        if kind == "qwen2_bf16":  # round the weights only (model.to(bf16) would round RoPE too)
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        logits = model(_tokens()).logits
    if kind == "qwen2_bf16":
        model.to(torch.bfloat16)
    shard = "100KB" if kind == "llama" else "50MB"
    model.save_pretrained(path, safe_serialization=True, max_shard_size=shard)
    if kind == "llama":
        _write_tokenizer(path)
    return logits


def _read_safetensors(folder):
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.isfile(index)
             else ["model.safetensors"])
    out = {}
    for f in files:
        out.update(load_file(os.path.join(folder, f)))
    return out


def _megatron_logits(ckpt, ctx, return_model=False):
    """Logits [b, s, padded] of a converted checkpoint at ctx's TP (gathered over TP ranks)."""
    from megatron_ddk.config import ModelConfig, from_dict
    from megatron_ddk.models.build import build_gpt_model
    from megatron_ddk.models.checkpoint import load_model, read_metadata, resolve_checkpoint

    meta = read_metadata(resolve_checkpoint(ckpt)[0])
    model = build_gpt_model(from_dict(ModelConfig, meta["model"]), ctx, meta["padded_vocab_size"])
    load_model(ckpt, model)
    model.eval()
    tokens = _tokens()
    with torch.no_grad():
        logits = model(tokens, torch.arange(SEQ).expand(BATCH, SEQ), None)
    parts = [torch.empty_like(logits) for _ in range(ctx.tp_size)]
    torch.distributed.all_gather(parts, logits.contiguous(), group=ctx.tp_group)
    logits = torch.cat(parts, dim=-1)
    return (logits, model) if return_model else logits


def convert_all(rank, world, jobs):
    """World 1: convert each HF folder and run the converted model at TP=1."""
    from megatron_ddk.parallel import initialize

    convert, _ = _tools()
    ctx = initialize(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    out = {}
    for name, d, convert_flags, _ in jobs:
        convert.main(["--hf-dir", d["hf"], "--save", d["ckpt"]] + convert_flags, ctx=ctx)
        out[name] = _megatron_logits(d["ckpt"], ctx)
    return out


def tp2_logits_and_save(rank, world, jobs, tp2_ckpt):
    """TP=2: logits of every converted checkpoint; the llama one re-saved at TP=2 with the
    metadata a training run writes (no HF config recorded) for the export check."""
    from megatron_ddk.models.checkpoint import read_metadata, resolve_checkpoint, save_model
    from megatron_ddk.parallel import initialize

    ctx = initialize(tensor_model_parallel_size=2, pipeline_model_parallel_size=1)
    out = {}
    for name, d, _, _ in jobs:
        out[name], model = _megatron_logits(d["ckpt"], ctx, return_model=True)
        if name == "llama":
            meta = read_metadata(resolve_checkpoint(d["ckpt"])[0])
            trainer_meta = {k: meta[k] for k in ("model", "padded_vocab_size", "tokenizer_hash")}
            save_model(tp2_ckpt, 5, model, dict(trainer_meta, vocab_size=VOCAB))
    return out


def export_all(rank, world, jobs, tp2_ckpt, tp2_export):
    """World 1: export every converted checkpoint, and the one saved at TP=2."""
    from megatron_ddk.parallel import initialize

    _, export = _tools()
    ctx = initialize(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    for _, d, _, export_flags in jobs:
        export.main(["--load", d["ckpt"], "--out", d["export"]] + export_flags, ctx=ctx)
    llama = jobs[0][1]
    export.main(["--load", tp2_ckpt, "--out", tp2_export, "--dtype", "float32",
                 "--tokenizer-dir", os.path.join(llama["ckpt"], "tokenizer")], ctx=ctx)
    return True


@pytest.fixture(scope="module")
def interop(tmp_path_factory):
    """HF folders and reference logits; three launches: convert (world 1), TP=2 logits + a
    TP=2 save (world 2), export (world 1)."""
    base = tmp_path_factory.mktemp("hf")
    ref, jobs, dirs = {}, [], {}
    flags = {"llama": ([], ["--max-shard-size", "0.0001"]),
             "qwen2": (["--padded-vocab-size", "512", "--target-tensor-parallel-size", "2"],
                       ["--no-tokenizer"]),  # no tokenizer in the HF folder, none recorded
             "qwen2_bf16": ([], ["--no-tokenizer"])}
    for kind in flags:
        d = {k: str(base / f"{kind}_{k}") for k in ("hf", "ckpt", "export")}
        ref[kind] = _make_hf(kind, d["hf"])
        dirs[kind] = d
        jobs.append((kind, d) + flags[kind])
    tp2_ckpt, tp2_export = str(base / "llama_tp2_ckpt"), str(base / "llama_tp2_export")
    tp1 = run_distributed(convert_all, 1, jobs, timeout=300)[0]
    tp2 = run_distributed(tp2_logits_and_save, 2, jobs, tp2_ckpt, timeout=300)
    run_distributed(export_all, 1, jobs, tp2_ckpt, tp2_export, timeout=300)
    return {"ref": ref, "dirs": dirs, "tp1": tp1, "tp2": tp2, "tp2_export": tp2_export}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind,padded", [("llama", 384), ("qwen2", 512), ("qwen2_bf16", 384)])
def test_converted_logits_match_transformers_tp1(interop, kind, padded):
    logits, ref = interop["tp1"][kind], interop["ref"][kind]
    assert logits.shape == (BATCH, SEQ, padded)
    assert ref.std() > 0.5  # logits far from zero: the tolerance is meaningful
    torch.testing.assert_close(logits[..., :VOCAB], ref, rtol=0, atol=1e-4)
    assert torch.count_nonzero(logits[..., VOCAB:]) == 0  # zero padded rows


@pytest.mark.timeout(300)
def test_converted_logits_match_transformers_tp2(interop):
    rank0, rank1 = interop["tp2"]
    for kind in ("llama", "qwen2", "qwen2_bf16"):
        torch.testing.assert_close(rank0[kind], rank1[kind], rtol=0, atol=0)
        torch.testing.assert_close(rank0[kind][..., :VOCAB], interop["ref"][kind], rtol=0,
                                   atol=1e-4, msg=lambda m, kind=kind: f"{kind}: {m}")
        assert torch.count_nonzero(rank0[kind][..., VOCAB:]) == 0


def test_metadata_model_yaml_and_tokenizer(interop):
    import yaml

    from megatron_ddk.config import ModelConfig, from_dict
    from megatron_ddk.models.checkpoint import read_metadata, resolve_checkpoint

    d = interop["dirs"]["llama"]
    meta = read_metadata(resolve_checkpoint(d["ckpt"])[0])
    digest = hashlib.sha256(open(os.path.join(d["hf"], "tokenizer.json"), "rb").read()).hexdigest()
    assert meta["tokenizer_hash"] == "sha256:" + digest
    assert meta["source"] == "hf:LlamaForCausalLM" and meta["padded_vocab_size"] == 384
    assert meta["hf_vocab_size"] == VOCAB
    model_yaml = yaml.safe_load(open(os.path.join(d["ckpt"], "model.yaml")))
    model = from_dict(ModelConfig, model_yaml["model"])
    assert (model.kv_channels, model.num_query_groups, model.rotary_base) == (32, 2, 500)
    assert (model.vocab_size, model.padded_vocab_size, model.ffn_hidden_size) == (None, 384, 96)
    assert not model.share_embeddings_and_output_weights and not model.add_qkv_bias
    qwen = read_metadata(resolve_checkpoint(interop["dirs"]["qwen2"]["ckpt"])[0])["model"]
    assert qwen["add_qkv_bias"] and qwen["share_embeddings_and_output_weights"]
    assert "tokenizer_hash" not in read_metadata(
        resolve_checkpoint(interop["dirs"]["qwen2"]["ckpt"])[0])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d["export"])
    assert tok("w5 w7", add_special_tokens=False)["input_ids"] == [5, 7]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen2_bf16", "llama_from_tp2"])
def test_export_loads_in_transformers_with_same_logits(interop, kind):
    from transformers import AutoModelForCausalLM

    base = kind.replace("_from_tp2", "")
    folder = interop["tp2_export"] if kind == "llama_from_tp2" else interop["dirs"][base]["export"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert type(model).__name__ == ("LlamaForCausalLM" if base == "llama" else "Qwen2ForCausalLM")
    model.eval()
    with torch.no_grad():
        logits = model(_tokens()).logits
    torch.testing.assert_close(logits, interop["ref"][base], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen2_bf16", "llama_from_tp2"])
def test_import_export_round_trip_is_bit_exact(interop, kind):
    d = interop["dirs"][kind.replace("_from_tp2", "")]
    export_dir = interop["tp2_export"] if kind == "llama_from_tp2" else d["export"]
    original, exported = _read_safetensors(d["hf"]), _read_safetensors(export_dir)
    assert sorted(original) == sorted(exported)
    for name, t in original.items():
        assert exported[name].dtype == t.dtype and torch.equal(exported[name], t), name
    cfg = json.load(open(os.path.join(export_dir, "config.json")))
    assert cfg["torch_dtype"] == ("bfloat16" if kind == "qwen2_bf16" else "float32")
    if kind.startswith("llama"):
        assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["vocab_size"]) == (1, 2, VOCAB)
        assert os.path.isfile(os.path.join(export_dir, "tokenizer.json"))
    if kind == "llama":
        assert os.path.isfile(os.path.join(export_dir, "model.safetensors.index.json"))


# ---- refusals: pure checks, no process group ------------------------------------------------

def _plan(hf_dir, *extra):
    convert, _ = _tools()
    return convert.plan_conversion(convert._parse_args(["--hf-dir", hf_dir, "--save", "x", *extra]))


def _edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    cfg.update(changes)
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return str(dst)


def test_unsupported_architecture_refused_by_the_cli(interop, tmp_path):
    bad = _edited_copy(interop["dirs"]["qwen2"]["hf"], tmp_path / "gpt2",
                       architectures=["GPT2LMHeadModel"])
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, "convert_hf_checkpoint.py"),
                           "--hf-dir", bad, "--save", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "architecture GPT2LMHeadModel is not supported" in proc.stderr
    assert "LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM" in proc.stderr
    assert not os.path.exists(tmp_path / "out")


def test_shape_mismatch_refused(interop, tmp_path):
    bad = _edited_copy(interop["dirs"]["llama"]["hf"], tmp_path / "ffn", intermediate_size=128)
    with pytest.raises(ValueError, match=r"shape mismatch: .*mlp\.down_proj\.weight: "
                                         r"checkpoint \[64, 96\] vs config \[64, 128\]"):
        _plan(bad)
    bad = _edited_copy(interop["dirs"]["qwen2"]["hf"], tmp_path / "untied",
                       tie_word_embeddings=False)
    with pytest.raises(ValueError, match="missing tensors: lm_head.weight"):
        _plan(bad)


def test_target_layout_and_vocab_flags_validated(interop):
    hf_dir = interop["dirs"]["llama"]["hf"]
    with pytest.raises(ValueError, match="divisible by --target-tensor-parallel-size=4"):
        _plan(hf_dir, "--target-tensor-parallel-size", "4")
    with pytest.raises(ValueError, match="cannot be split over"):
        _plan(hf_dir, "--target-pipeline-parallel-size", "3")
    with pytest.raises(ValueError, match="tokenizer .* has ids up to 299"):
        _plan(hf_dir, "--padded-vocab-size", "256")
    plan = _plan(hf_dir, "--target-tensor-parallel-size", "2",
                 "--make-vocab-size-divisible-by", "64")
    assert plan.model.padded_vocab_size == 384 and plan.kept_rows == VOCAB
    plan = _plan(hf_dir, "--vocab-size", str(VOCAB), "--padded-vocab-size", "302")
    assert (plan.model.vocab_size, plan.model.padded_vocab_size) == (VOCAB, 302)


def test_config_features_hf_cannot_share_are_refused():
    from megatron_ddk.config import ModelConfig
    from megatron_ddk.models.hf import export_architecture, model_config_from_hf

    base = {"architectures": ["MistralForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": VOCAB, "max_position_embeddings": 4096, "sliding_window": 1024}
    with pytest.raises(ValueError, match="sliding_window=1024"):
        model_config_from_hf(base)
    assert model_config_from_hf(base, ignore_sliding_window=True).max_position_embeddings == 1024
    assert model_config_from_hf(dict(base, sliding_window=None)).max_position_embeddings == 4096
    with pytest.raises(ValueError, match="RoPE scaling 'llama3'"):
        model_config_from_hf(dict(base, sliding_window=None,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0}))
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        model_config_from_hf(dict(base, sliding_window=None, hidden_act="gelu"))
    with pytest.raises(ValueError, match="learned_absolute.*activation='gelu'"):
        export_architecture(ModelConfig(position_embedding_type="learned_absolute",
                                        activation="gelu"))
    assert export_architecture(ModelConfig(add_qkv_bias=True)) == "Qwen2ForCausalLM"
