"""Local lm-eval tasks from a manifest's held-out test split (no download).

build_local_tasks(manifest, out) writes, per domain D (task names: non-alphanumerics -> '_'):
    D.ppl.jsonl, ddk_ppl_D.yaml   rolling perplexity of every test document (up to max_docs);
                                  a line: {"target": text + eos text, "num_tokens", "num_bytes"}
    D.mc.jsonl,  ddk_mc_D.yaml    "which continuation is the real one": the document's first
                                  context_tokens tokens, then its next continuation_tokens tokens
                                  against the same span of num_choices - 1 other test documents
and the groups ddk_ppl / ddk_mc (all domains) plus tasks.json (manifest, tokenizer hash, split,
counts, settings). Each task YAML includes the template shipped in evaluation/tasks/, so lm-eval
loads the folder with TaskManager(include_path=out). The folder is written under a temporary
name and renamed, so nothing half-written is left.

Text comes from the test documents' token ids, decoded with the manifest's tokenizer (lossless
for the project's SentencePiece models: encode(decode(ids)) == ids for whole documents, which is
checked; a document that does not round-trip is skipped and counted). The eos text at the end of
a rolling target is parsed by the exported Hugging Face tokenizer as the eos token, so lm-eval
scores the same tokens megatron-ddk's evaluation does: the document's tokens and its
end-of-document token, read after an end-of-document token (prefix_token_id = eos).

Layer: evaluation (imports data only).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import numpy as np

from megatron_ddk.atomic import atomic_folder

logger = logging.getLogger(__name__)

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
"""The shipped task templates and their utils.py."""

PPL_GROUP, MC_GROUP = "ddk_ppl", "ddk_mc"
"""Group names: every domain's rolling-perplexity / continuation task."""


@dataclass
class LocalTaskSettings:
    """How the local tasks are cut from the test documents."""

    max_docs: Optional[int] = 200
    """Test documents used per domain (None: all), in the split's order."""

    max_doc_tokens: Optional[int] = None
    """Rolling perplexity: documents longer than this are cut (at clean token boundaries) into
    pieces scored separately (None: whole documents, lm-eval rolls its windows)."""

    max_items: int = 200
    """Multiple choice: items per domain (at most)."""

    context_tokens: int = 32
    """Multiple choice: tokens of a document's opening given as context."""

    continuation_tokens: int = 16
    """Multiple choice: tokens in each choice."""

    num_choices: int = 4
    """Multiple choice: choices per item (the real one and num_choices - 1 others)."""

    seed: int = 1234
    """Picks the other documents and the position of the real choice."""


def task_name(kind: str, domain: str) -> str:
    """ddk_ppl_<domain> / ddk_mc_<domain> with the domain name made identifier-safe."""
    return f"ddk_{kind}_{re.sub(r'[^A-Za-z0-9_]', '_', domain)}"


class _Codec:
    """encode / decode / eos text of the manifest's tokenizer (SentencePiece or tokenizer.json)."""

    def __init__(self, model_path: str):
        from megatron_ddk.data.tokenizer import is_hf_tokenizer

        if is_hf_tokenizer(model_path):
            from transformers import AutoTokenizer

            folder = model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
            self._hf = AutoTokenizer.from_pretrained(folder)
            self.eos_id, self.eos_text = self._hf.eos_token_id, self._hf.eos_token
        else:
            import sentencepiece

            self._hf = None
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
            self.eos_id = self._sp.eos_id()
            self.eos_text = self._sp.IdToPiece(self.eos_id)

    def encode(self, text: str) -> List[int]:
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False)
        return self._sp.encode(text)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=False)
        return self._sp.decode(ids)


def _test_documents(manifest, domain, codec: _Codec, limit: Optional[int]):
    """[(doc_index, ids without the end-of-document tokens, text)] of a domain's test split."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = getattr(domain, "test_prefix", None)
    if not prefix:
        raise ValueError(f"manifest {manifest.path}: domain {domain.name} has no test split "
                         f"(test_prefix); rebuild the domains with `megatron-ddk build-domains`, "
                         f"which writes train, valid and test sets")
    ds = IndexedDataset(prefix, mmap=True)
    docs, skipped = [], 0
    for i in range(len(ds.document_indices) - 1):
        ids = np.asarray(ds[i]).tolist()
        while ids and ids[0] == codec.eos_id:
            ids = ids[1:]
        while ids and ids[-1] == codec.eos_id:
            ids = ids[:-1]
        if not ids:
            continue
        text = codec.decode(ids)
        if codec.encode(text) != ids or codec.eos_id in ids:
            skipped += 1
            continue
        docs.append((i, ids, text))
        if limit is not None and len(docs) >= limit:
            break
    if skipped:
        logger.warning("domain %s: %d test document(s) do not round-trip through the tokenizer "
                       "(decode then encode); left out", domain.name, skipped)
    return docs, skipped


def _span(codec: _Codec, ids: List[int], start: int, end: int) -> Optional[str]:
    """Text of ids[start:end] when it cuts cleanly (text(:start) + span == text(:end))."""
    if end > len(ids):
        return None
    head, whole = codec.decode(ids[:start]), codec.decode(ids[:end])
    span = codec.decode(ids[start:end])
    return span if head + span == whole and "\ufffd" not in whole else None


def _clean_cuts(codec: _Codec, ids: List[int], step: int) -> List[int]:
    """Cut positions about `step` tokens apart where the text splits cleanly."""
    cuts, pos = [0], 0
    while len(ids) - pos > step:
        end = pos + step
        while end < len(ids) and _span(codec, ids, pos, end) is None:
            end += 1
        if end >= len(ids):
            break
        cuts.append(end)
        pos = end
    return cuts + [len(ids)]


def _rolling_rows(codec: _Codec, docs, s: LocalTaskSettings) -> List[dict]:
    rows = []
    for i, ids, text in docs:
        cuts = [0, len(ids)] if not s.max_doc_tokens else _clean_cuts(codec, ids,
                                                                       s.max_doc_tokens)
        for k, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
            last = b == len(ids)
            piece = text if len(cuts) == 2 else codec.decode(ids[a:b])
            if codec.encode(piece) != ids[a:b]:
                continue  # a piece that tokenizes differently on its own is not comparable
            rows.append({"doc_index": i, "piece": k, "target": piece + (codec.eos_text if last
                                                                          else ""),
                         "num_tokens": b - a + int(last),
                         "num_bytes": len(piece.encode("utf-8"))})
    return rows


def _mc_items(codec: _Codec, docs, s: LocalTaskSettings, rng) -> List[dict]:
    """Items from consecutive (context + continuation)-token windows of the documents; the
    other choices are the continuations of other windows."""
    c, m = s.context_tokens, s.continuation_tokens
    cut = []
    for i, ids, _ in docs:
        for start in range(0, len(ids) - c - m + 1, c + m):
            context = _span(codec, ids, start, start + c) if start else codec.decode(ids[:c])
            span = _span(codec, ids, start + c, start + c + m)
            if context is not None and span is not None and span.strip():
                cut.append((i, start, (codec.eos_text if start == 0 else "") + context, span))
    items = []
    for k, (i, start, context, real) in enumerate(cut[:s.max_items]):
        others = [j for j in range(len(cut)) if j != k and cut[j][3] != real]
        if len(others) < s.num_choices - 1:
            continue
        pick = rng.choice(others, size=s.num_choices - 1, replace=False)
        choices = [cut[int(j)][3] for j in pick]
        label = int(rng.integers(0, s.num_choices))
        choices.insert(label, real)
        items.append({"doc_index": i, "start": start, "context": context, "choices": choices,
                      "label": label})
    return items


def _write_jsonl(path: str, rows: List[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_task(folder: str, name: str, template: str, data_file: str, group: str) -> None:
    import yaml

    cfg = {"include": os.path.join(TEMPLATES, template), "task": name, "tag": [group],
           "dataset_kwargs": {"data_files": {"test": data_file}}}
    with open(os.path.join(folder, name + ".yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)


def _write_group(folder: str, group: str, tasks: List[str]) -> None:
    import yaml

    with open(os.path.join(folder, group + ".yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump({"group": group, "task": tasks, "metadata": {"version": 1.0}}, f,
                       sort_keys=False)


def _write_domain(tmp: str, out: str, domain, codec: _Codec, manifest, s: LocalTaskSettings,
                  rng) -> Dict[str, int]:
    docs, skipped = _test_documents(manifest, domain, codec, s.max_docs)
    if not docs:
        raise ValueError(f"manifest {manifest.path}: domain {domain.name}: no usable test "
                         f"document ({skipped} do not round-trip through the tokenizer)")
    safe = task_name("x", domain.name)[len("ddk_x_"):]
    rows = _rolling_rows(codec, docs, s)
    _write_jsonl(os.path.join(tmp, f"{safe}.ppl.jsonl"), rows)
    _write_task(tmp, task_name("ppl", domain.name), "_ddk_rolling_ppl.yaml",
                os.path.join(out, f"{safe}.ppl.jsonl"), PPL_GROUP)
    items = _mc_items(codec, docs, s, rng)
    if items:
        _write_jsonl(os.path.join(tmp, f"{safe}.mc.jsonl"), items)
        _write_task(tmp, task_name("mc", domain.name), "_ddk_continuation_mc.yaml",
                    os.path.join(out, f"{safe}.mc.jsonl"), MC_GROUP)
    else:
        logger.warning("domain %s: fewer than %d windows of %d tokens in the test documents: "
                       "no continuation task", domain.name, s.num_choices,
                       s.context_tokens + s.continuation_tokens)
    return {"ppl_docs": len(rows), "ppl_tokens": sum(r["num_tokens"] for r in rows),
            "mc_items": len(items), "skipped_docs": skipped}


def build_local_tasks(manifest_path: str, out: str,
                      settings: Optional[LocalTaskSettings] = None) -> dict:
    """Write the local task folder `out` (see the module docstring); returns tasks.json's data."""
    from megatron_ddk.data.manifest import load_manifest

    s = settings or LocalTaskSettings()
    if s.num_choices < 2 or s.context_tokens < 1 or s.continuation_tokens < 1:
        raise ValueError(f"local task settings {asdict(s)}: need num_choices >= 2 and "
                         f"context/continuation tokens >= 1")
    manifest = load_manifest(manifest_path)
    require = getattr(manifest, "require_split", None)
    if require is not None:
        require("test")
    codec = _Codec(manifest.tokenizer_model)
    out = os.path.abspath(out)
    if os.path.exists(out) and os.listdir(out) and not os.path.isfile(
            os.path.join(out, "tasks.json")):
        raise ValueError(f"{out} exists and was not written by build_lm_eval_tasks; remove it or "
                         f"choose another folder")
    with atomic_folder(out) as tmp:
        rng = np.random.default_rng(s.seed)
        domains = {d.name: _write_domain(tmp, out, d, codec, manifest, s, rng)
                   for d in manifest.domains}
        ppl = [task_name("ppl", n) for n in domains]
        mc = [task_name("mc", n) for n, c in domains.items() if c["mc_items"]]
        _write_group(tmp, PPL_GROUP, ppl)
        if mc:
            _write_group(tmp, MC_GROUP, mc)
        info = {"manifest": manifest.path, "tokenizer_model": manifest.tokenizer_model,
                "tokenizer_hash": manifest.tokenizer_hash, "split": "test",
                "eos_token_id": codec.eos_id, "settings": asdict(s), "domains": domains,
                "tasks": {PPL_GROUP: ppl, MC_GROUP: mc}}
        with open(os.path.join(tmp, "tasks.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
    return info
