"""The pipeline config: one YAML for the whole job (data -> tokenizer -> teacher / student ->
arms x seeds -> test-split evaluation -> report -> Hugging Face export).

Typed dataclasses with a docstring under every field (docs/configuration.md is generated from
them). The `run` mappings are partial run configs (megatron_ddk.config.schema.RunConfig
sections) merged over the common `run` section; every generated run config is loaded and
statically checked before any stage starts, so a typo fails the pipeline at once, naming the
pipeline field it came from. This module imports only the config layer.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

import yaml

from megatron_ddk.config.loader import ConfigError, apply_overrides, from_dict, load_yaml
from megatron_ddk.config.schema import ModelConfig

_CLUSTER_K = re.compile(r"^\d+(-\d+)?$")


@dataclass
class ClusterSpec:
    """Automatic domains for a corpus without labels (build_domains --domains auto:K)."""

    k: Union[int, str] = 4
    """Number of domains K, or a range "4-12": each K is fitted and the one with the best
    sampled silhouette score is used (the report lists them all)."""

    sample: int = 20000
    """Documents the features and k-means are fitted on (build_domains --cluster-sample);
    every document is then assigned in one streaming pass."""

    def __post_init__(self) -> None:
        low, _, high = str(self.k).partition("-")
        if (not _CLUSTER_K.match(str(self.k)) or int(low) < 2
                or (high and int(high) < int(low))):
            raise ConfigError(f"data.cluster.k: got {self.k!r}; expected a number of domains "
                              ">= 2 or a range like 4-12")
        if self.sample < 1:
            raise ConfigError(f"data.cluster.sample: got {self.sample}; must be >= 1")

    @property
    def domains_flag(self) -> str:
        """build_domains' --domains value (auto:K or auto:A-B)."""
        return f"auto:{self.k}"


@dataclass
class DataSpec:
    """Where the domains come from and how they are split."""

    corpus: Optional[str] = None
    """Folder of per-domain files: <domain>.jsonl ({"text": ...} per line), <domain>.txt or a
    <domain>/ folder of them. With `domain_field` or `cluster`: a mixed corpus instead, a file,
    folder or glob of .jsonl (.gz, .zst), .txt, .parquet or a datasets.save_to_disk folder
    (docs/data.md). `--corpus PATH` on the command line sets it."""

    inputs: Optional[List[str]] = None
    """More files, folders or globs of the same mixed corpus, read after `corpus`."""

    text_key: str = "text"
    """The record field holding the document (build_domains --text-key, Megatron-LM's
    --json-keys)."""

    domain_field: Optional[str] = None
    """Dotted path of the record field that names its domain, e.g. meta.redpajama_set_name:
    each distinct value becomes a domain (build_domains --domain-field)."""

    default_domain: Optional[str] = None
    """Domain of records without `domain_field`; None makes such a record an error naming its
    file and line."""

    domain_map: Optional[Dict[str, str]] = None
    """Label (field value or cluster_NN) -> domain name, to rename or merge labels."""

    min_domain_documents: int = 0
    """Labels with fewer documents are small (0: none is); see small_domains."""

    small_domains: Literal["other", "refuse"] = "other"
    """Small labels are merged into a domain `other`, or refused by name."""

    cluster: Optional[ClusterSpec] = None
    """Find the domains automatically (k-means on hashed TF-IDF) instead of reading them from
    file names or a field, e.g. {k: 3} or {k: "4-12"}."""

    manifest: Optional[str] = None
    """An existing domain manifest (tools/build_domains.py) to use instead of a corpus; it must
    have a test split."""

    demo_corpus_mb: Optional[float] = None
    """Build the embedded demo corpus (tools/build_demo_corpus.py, text already on the machine)
    with this many MB per domain instead of reading `corpus`."""

    demo_sizes_mb: Optional[List[float]] = None
    """Build the demo corpus with these MB of text for its first, second, ... domain (the
    builder's domain order), e.g. [2.0, 1.2, 0.7, 0.5, 0.3] for a mixture shaped like a real
    corpus; overrides demo_corpus_mb."""

    domains: Optional[List[str]] = None
    """Subset and order of the corpus's domains; None takes every domain, sorted by name."""

    valid_samples: int = 32
    """Validation samples per domain: DDK's steering set (paper: 500)."""

    test_samples: int = 32
    """Test samples per domain: reports only, never read by training or DDK."""

    split_seq_length: Optional[int] = None
    """Tokens per validation / test sample; None means run.data.seq_length."""

    max_piece_bytes: int = 1024
    """Documents longer than this (UTF-8 bytes) are cut into pieces at paragraph / line
    boundaries before the held-out draw, so the valid and test sets spread over many
    documents; training joins its pieces back (build_domains --max-piece-bytes; 0: never)."""

    min_heldout_documents: int = 16
    """Fewest documents (pieces) each valid and test set must hold
    (build_domains --min-heldout-documents)."""

    workers: int = 2
    """Tokenizer worker processes of the preprocessing."""

    @property
    def uses_demo(self) -> bool:
        """Whether the pipeline builds the embedded demo corpus."""
        return bool(self.demo_corpus_mb or self.demo_sizes_mb)


@dataclass
class TokenizerSpec:
    """The tokenizer: trained on the corpus, or an existing one."""

    train: bool = True
    """Train a SentencePiece BPE tokenizer on the corpus (equal shares per domain)."""

    vocab_size: int = 4096
    """Vocabulary size of the trained tokenizer."""

    model: Optional[str] = None
    """An existing SentencePiece .model or Hugging Face tokenizer.json (with train: false)."""


@dataclass
class ModelStageSpec:
    """Where the teacher or the starting student comes from."""

    source: Literal["pretrain", "checkpoint", "huggingface"] = "pretrain"
    """pretrain: train `model` from scratch on the natural mixture for `run`'s budget;
    checkpoint: a megatron-ddk or Megatron-LM checkpoint folder (`checkpoint`);
    huggingface: a Hugging Face folder converted with tools/convert_hf_checkpoint.py."""

    model: Optional[ModelConfig] = None
    """Architecture to pre-train (source: pretrain)."""

    run: Dict[str, Any] = field(default_factory=dict)
    """Run-config sections for the pre-training (e.g. train: {train_iters: 200, lr: 2e-3}),
    merged over the common `run`."""

    checkpoint: Optional[str] = None
    """Checkpoint folder (source: checkpoint)."""

    hf_dir: Optional[str] = None
    """Hugging Face model folder (source: huggingface)."""


@dataclass
class ArmSpec:
    """One continuation of the starting student (CPT, KD, DDK or an ablation)."""

    name: str = "DDK"
    """Name used in folders, the report and the export."""

    teacher: bool = True
    """Distil from the teacher (False: continued pre-training, the paper's CPT)."""

    run: Dict[str, Any] = field(default_factory=dict)
    """Run-config sections of this arm (e.g. ddk: {policy: static}), merged over the common
    `run` and `continuation`."""

    teacher_store: bool = True
    """With teacher_store.per_seed: read this seed's offline teacher store (False: keep the
    online teacher). An arm a store cannot serve (ddk.signal: training, distill.kl_direction:
    reverse) keeps the online teacher whatever this says."""


@dataclass
class TeacherStoreSpec:
    """The offline teacher of the arms (docs/offline_teacher.md): the teacher paid once per seed."""

    per_seed: bool = False
    """Build one teacher store per seed (`megatron-ddk cache-teacher`, a stage before that seed's
    arms, covering what any of them can draw) and point every teacher arm of the seed that can
    read one at it; arms that differ in distill.temperature, data.seq_length or
    ddk.valid_samples_per_domain get a store each. False: every arm runs the teacher online."""

    top_k: Optional[int] = None
    """Most entries per token (cache-teacher --top-k); None: the producer's default."""

    top_p: Optional[float] = None
    """Adaptive coverage (--top-p); None: the producer's default."""

    logprob_codec: Optional[str] = None
    """float32 | float16 | q2..q12 (--logprob-codec); None: the producer's default."""

    compression: Optional[Literal["none", "zstd"]] = None
    """Chunk compression (--compression; zstd needs the `formats` extra); None: the default."""

    id_codec: Optional[Literal["packed", "ef"]] = None
    """Token ids (--id-codec): ef (Elias-Fano over each token's id set) or packed (ceil(log2 V)
    bits each); None: the producer's default."""

    tail_samples: Optional[int] = None
    """Ids drawn per token from the teacher's mass outside the top K (--tail-samples; 0: the rest
    bucket alone); None: the producer's default."""


@dataclass
class EvaluationSpec:
    """The held-out evaluation every report number comes from."""

    split: Literal["test", "valid"] = "test"
    """Split the report is computed on (test: never seen by training or DDK)."""


@dataclass
class ExportSpec:
    """Hugging Face export of trained arms."""

    arms: List[str] = field(default_factory=list)
    """Arm names to export (every seed of each); empty exports nothing."""

    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """dtype of the exported weights."""


@dataclass
class LmEvalSpec:
    """Downstream evaluation with lm-evaluation-harness (the `eval` extra)."""

    tasks: List[str] = field(default_factory=list)
    """Task names; empty runs no downstream evaluation."""

    limit: Optional[int] = None
    """Items per task (None: all)."""


@dataclass
class LaunchSpec:
    """How training and evaluation stages are started."""

    nproc_per_node: int = 1
    """Processes per stage; > 1 starts them with torchrun (python -m torch.distributed.run)."""


@dataclass
class PipelineConfig:
    """The whole job in one file."""

    out: str = "runs/pipeline"
    """Output folder (`--out` overrides): data, runs, evaluations, report, exports, logs."""

    data: DataSpec = field(default_factory=DataSpec)
    """Corpus or manifest and the held-out splits."""

    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    """Tokenizer to train or use."""

    run: Dict[str, Any] = field(default_factory=dict)
    """Run-config sections common to every training stage (parallel, data.seq_length, train,
    logging ...)."""

    teacher: ModelStageSpec = field(default_factory=ModelStageSpec)
    """The teacher."""

    student: ModelStageSpec = field(default_factory=ModelStageSpec)
    """The starting student (every arm continues from it)."""

    continuation: Dict[str, Any] = field(default_factory=dict)
    """Run-config sections common to every arm (the shared token budget, LR, DDK interval)."""

    arms: List[ArmSpec] = field(default_factory=list)
    """The continuations to compare, all on the same token budget."""

    teacher_store: TeacherStoreSpec = field(default_factory=TeacherStoreSpec)
    """Offline teacher stores for the arms (one per seed) instead of the online teacher."""

    seeds: List[int] = field(default_factory=lambda: [1234])
    """Each arm runs once per seed (train.seed); the pre-training stages use their own seed."""

    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    """Held-out evaluation."""

    export: ExportSpec = field(default_factory=ExportSpec)
    """Hugging Face export."""

    lm_eval: LmEvalSpec = field(default_factory=LmEvalSpec)
    """Downstream evaluation."""

    launch: LaunchSpec = field(default_factory=LaunchSpec)
    """Processes per stage."""

    smoke: Dict[str, Any] = field(default_factory=dict)
    """Pipeline-config sections merged over the rest with --smoke (tiny sizes for a check run)."""


def deep_merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of base with update merged in (mappings recursively; anything else replaced)."""
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _check_unique_arms(cfg: PipelineConfig, path: str) -> None:
    names = [a.name for a in cfg.arms]
    if not names:
        raise ConfigError(f"{path}: arms is empty; give at least one arm (e.g. name: DDK)")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{path}: arms: duplicate name(s) {dupes}")
    for n in names:
        if not n or not all(c.isalnum() or c in "-_." for c in n):
            raise ConfigError(f"{path}: arms: name {n!r} must be letters, digits, '-', '_', '.'")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"{path}: seeds: expected a non-empty list of distinct integers, got "
                          f"{cfg.seeds}")
    unknown = sorted(set(cfg.export.arms) - set(names))
    if unknown:
        raise ConfigError(f"{path}: export.arms {unknown} are not arms; arms: {names}")


_RANGES = (("data.valid_samples", 1), ("data.test_samples", 0), ("data.split_seq_length", 2),
           ("data.max_piece_bytes", 0), ("data.min_heldout_documents", 1),
           ("data.workers", 1), ("tokenizer.vocab_size", 1), ("launch.nproc_per_node", 1),
           ("lm_eval.limit", 1))
"""(dotted field, smallest allowed value) of the pipeline's integer fields (None is allowed
where the field is optional)."""


def _check_ranges(cfg: PipelineConfig, path: str) -> None:
    errs = []
    for dotted, low in _RANGES:
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and value < low:
            errs.append(f"{dotted}={value}: must be >= {low}")
    mb = cfg.data.demo_corpus_mb
    if mb is not None and not mb > 0:  # also NaN
        errs.append(f"data.demo_corpus_mb={mb}: must be > 0")
    sizes = cfg.data.demo_sizes_mb
    if sizes is not None and (not sizes or not all(x > 0 for x in sizes)):
        errs.append(f"data.demo_sizes_mb={sizes}: give one size > 0 (MB) per domain")
    if cfg.evaluation.split == "test" and cfg.data.test_samples == 0 and not cfg.data.manifest:
        errs.append("data.test_samples=0 but evaluation.split is test: the report needs a test "
                    "split (give test_samples >= 1, or evaluation.split: valid)")
    errs += [f"seeds: {s} must be >= 0" for s in cfg.seeds if s < 0]
    if errs:
        raise ConfigError(f"pipeline config {path}:\n  - " + "\n  - ".join(errs))


def read_pipeline_yaml(path: str, _seen: Sequence[str] = ()) -> Dict[str, Any]:
    """The YAML as plain data, with `extends: OTHER.yaml` (relative to this file) resolved:
    this file's sections are merged over OTHER's (mappings recursively, lists replaced)."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"pipeline config {path} does not exist")
    if path in _seen:
        raise ConfigError(f"pipeline config {path}: `extends` loops back to itself")
    with open(path) as f:
        try:
            data = load_yaml(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"pipeline config {path} is not valid YAML: {exc}") from None
        except ConfigError as exc:
            raise ConfigError(f"pipeline config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"pipeline config {path}: the top level must be a mapping")
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"pipeline config {path}: extends: expected a file name, got {base!r}")
    parent = read_pipeline_yaml(os.path.join(os.path.dirname(path), base), [*_seen, path])
    return deep_merge(parent, data)


def load_pipeline_config(path: str, overrides: Sequence[str] = (), smoke: bool = False,
                         corpus: Optional[str] = None, out: Optional[str] = None) -> PipelineConfig:
    """Read the pipeline YAML (and what it extends), apply --smoke, section.key=value overrides,
    --corpus and --out."""
    data = read_pipeline_yaml(path)
    if smoke:
        data = deep_merge(data, data.get("smoke") or {})
    data = apply_overrides(data, overrides, top_level=True)
    if corpus is not None:
        data.setdefault("data", {})
        data["data"].update(corpus=corpus, manifest=None, demo_corpus_mb=None,
                            demo_sizes_mb=None)
    if out is not None:
        data["out"] = out
    try:
        cfg = from_dict(PipelineConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"pipeline config {path}: {exc}") from None
    _check_unique_arms(cfg, path)
    _check_ranges(cfg, path)
    sources = [s for s in ("corpus", "manifest", "demo_corpus_mb")
               if getattr(cfg.data, s) is not None]
    if cfg.data.demo_sizes_mb is not None and "demo_corpus_mb" not in sources:
        sources.append("demo_sizes_mb")
    if len(sources) != 1:
        raise ConfigError(f"pipeline config {path}: data: give exactly one of corpus (or "
                          f"--corpus DIR), manifest, demo_corpus_mb / demo_sizes_mb; got "
                          f"{sources or 'none'}")
    return cfg
