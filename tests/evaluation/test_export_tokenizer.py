"""Hugging Face export of a megatron-ddk-trained student: tokenizer, generation, logits.

References: the project's SentencePiece model (ids), megatron-ddk's own Megatron-Core forward
of the checkpoint (logits), the checkpoint metadata (recorded tokenizer hash).
"""

import json
import os
import shutil

import pytest
import torch

from megatron_ddk.testing import run_distributed

SEQ = 24


def _sp(path):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=path)


def _test_texts(manifest, n=3):
    """A few real held-out documents (decoded), besides the built-in samples."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ddk.data.manifest import load_manifest

    m = load_manifest(manifest)
    sp = _sp(m.tokenizer_model)
    out = []
    for d in m.domains:
        ds = IndexedDataset(d.test_prefix, mmap=True)
        out += [sp.decode([int(t) for t in np.asarray(ds[i])[:-1]]) for i in range(min(n, len(ds)))]
    return out


def test_autotokenizer_reproduces_the_sentencepiece_ids(student, tmp_path):
    from transformers import AutoTokenizer

    from megatron_ddk.data.hf_tokenizer import (
        SAMPLE_TEXTS,
        resolve_tokenizer,
        verify_hf_tokenizer,
        write_hf_tokenizer,
    )

    sp = _sp(student["tokenizer"])
    tok = AutoTokenizer.from_pretrained(student["hf"])
    texts = list(SAMPLE_TEXTS) + _test_texts(student["manifest"])
    for text in texts:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text[:40]
        assert tok.encode(text) == sp.encode(text)  # exported without bos (trained without)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (
        sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id())
    gen = json.load(open(os.path.join(student["hf"], "generation_config.json")))
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (sp.bos_id(), sp.eos_id())
    # with bos: the same ids after bos
    src = resolve_tokenizer(student["tokenizer"])
    write_hf_tokenizer(src, str(tmp_path), None, add_bos_token=True)
    assert verify_hf_tokenizer(str(tmp_path), src, texts) == len(texts)
    tok_bos = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in texts:
        assert tok_bos.encode(text) == [sp.bos_id()] + sp.encode(text)


def _megatron_logits(rank, world, ckpt, tokens):
    from megatron_ddk.config import ModelConfig, from_dict
    from megatron_ddk.models.build import build_gpt_model
    from megatron_ddk.models.checkpoint import load_model, read_metadata, resolve_checkpoint
    from megatron_ddk.parallel import initialize

    ctx = initialize(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    meta = read_metadata(resolve_checkpoint(ckpt)[0])
    model = build_gpt_model(from_dict(ModelConfig, meta["model"]), ctx, meta["padded_vocab_size"])
    load_model(ckpt, model)
    model.eval()
    b, s = tokens.shape
    with torch.no_grad():
        return model(tokens, torch.arange(s).expand(b, s), None)[..., :meta["vocab_size"]]


def test_export_generates_and_matches_megatron_logits(student):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student["hf"])
    model = AutoModelForCausalLM.from_pretrained(student["hf"], dtype=torch.float32).eval()
    text = _test_texts(student["manifest"], 1)[0]
    ids = torch.tensor([tok.encode(text)[:SEQ], tok.encode(text)[SEQ:2 * SEQ]])
    with torch.no_grad():
        hf_logits = model(ids).logits
    ref = run_distributed(_megatron_logits, 1, student["ckpt"], ids, timeout=300)[0]
    assert ref.shape == hf_logits.shape and ref.std() > 0.1
    torch.testing.assert_close(hf_logits, ref, rtol=0, atol=1e-4)
    prompt = tok("def main(", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tok.decode(out[0]), str)


def _copy_ckpt(student, tmp_path, **meta_changes):
    from megatron_ddk.models.checkpoint import resolve_checkpoint

    root = tmp_path / "ckpt"
    shutil.copytree(student["ckpt"], root)
    folder = resolve_checkpoint(str(root))[0]
    path = os.path.join(folder, "megatron_ddk.json")
    meta = json.load(open(path))
    for key, value in meta_changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    json.dump(meta, open(path, "w"))
    return str(root)


def test_export_refusals(student, tmp_path):
    from megatron_ddk.data.tokenizer import train_sentencepiece
    from megatron_ddk.evaluation.export import export_checkpoint

    other = train_sentencepiece(["some other text entirely", "to train on"] * 50,
                                str(tmp_path / "other"), vocab_size=40, lossless=False)
    with pytest.raises(ValueError, match="trained with sha256:"):
        export_checkpoint(student["ckpt"], str(tmp_path / "a"), tokenizer=other)
    ckpt = _copy_ckpt(student, tmp_path, tokenizer_hash=None)
    with pytest.raises(ValueError, match="records no tokenizer.*--no-tokenizer"):
        export_checkpoint(ckpt, str(tmp_path / "b"))
    shutil.rmtree(ckpt)
    ckpt = _copy_ckpt(student, tmp_path, tokenizer_model="/nonexistent/tok.model")
    with pytest.raises(ValueError, match="no usable tokenizer.*/nonexistent/tok.model"):
        export_checkpoint(ckpt, str(tmp_path / "c"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="was not written by an export"):
        export_checkpoint(student["ckpt"], str(tmp_path / "mine"))
    assert not any(p.name.startswith(("a.tmp", "b.tmp", "c.tmp")) for p in tmp_path.iterdir())
