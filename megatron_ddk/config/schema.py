"""Typed configuration of a megatron-ddk run: one dataclass per section.

The docstring under each field is its reference documentation (Megatron-Core style). Names follow
Megatron-LM at the config boundary (tensor_model_parallel_size, micro_batch_size, ...) and the
paper in the DDK section (interval, alpha). Loading, overrides and validation live in loader.py,
validate.py and host.py; this module only declares the fields and must not import the rest of
megatron_ddk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional, Union

TEACHER_FROM_CHECKPOINT = "from_checkpoint"
"""distill.teacher value: take the teacher's architecture from its checkpoint's metadata."""


KL_CHUNK_TOKENS = 256
"""Default tokens per chunk of the vocab-parallel KL: distill.kl_chunk_tokens, the chunk_tokens
default of losses/kl.py and the memory planner's Layout.kl_chunk_tokens all take it from here."""


@dataclass
class ModelConfig:
    """Architecture of one Megatron-Core GPTModel (the student, or the teacher under distill)."""

    num_layers: int = 2
    """Number of transformer layers."""

    hidden_size: int = 128
    """Transformer hidden size."""

    num_attention_heads: int = 4
    """Number of attention (query) heads."""

    num_query_groups: Optional[int] = None
    """Key/value head groups for GQA (1 = MQA). None means multi-head attention (= heads)."""

    ffn_hidden_size: Optional[int] = None
    """MLP hidden size. None means 4 x hidden_size."""

    kv_channels: Optional[int] = None
    """Per-head dimension. None means hidden_size / num_attention_heads."""

    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """Normalisation layer type."""

    norm_epsilon: float = 1e-5
    """Epsilon of the normalisation layers."""

    activation: Literal["swiglu", "gelu"] = "swiglu"
    """MLP activation: swiglu (gated SiLU, LLaMA/Qwen) or gelu (StarCoder/GPT-2 style)."""

    position_embedding_type: Literal["rope", "learned_absolute"] = "rope"
    """Position encoding: rotary (LLaMA/Qwen) or learned absolute (StarCoder/GPT-2)."""

    rotary_base: int = 10000
    """RoPE base (theta). Qwen-1.5 uses 1,000,000; LLaMA-2 10,000."""

    rotary_percent: float = 1.0
    """Fraction of the head dimension that is rotated."""

    max_position_embeddings: int = 4096
    """Longest sequence the model supports (size of learned position tables)."""

    add_bias_linear: bool = False
    """Bias in all linear layers (StarCoder style)."""

    add_qkv_bias: bool = False
    """Bias in the QKV projection only (Qwen-1.5 / Qwen2 style)."""

    share_embeddings_and_output_weights: bool = False
    """Tie the output layer to the input embedding."""

    vocab_size: Optional[int] = None
    """Tokenizer vocabulary size. None means take it from the domain manifest's tokenizer."""

    make_vocab_size_divisible_by: int = 128
    """Pad the embedding rows to a multiple of this times tensor_model_parallel_size."""

    padded_vocab_size: Optional[int] = None
    """Explicit padded embedding size (e.g. 151936 for Qwen-1.5 1.8B). Teacher and student are
    always built with one common padded size: the larger of the two after padding."""

    hidden_dropout: float = 0.0
    """Dropout after attention and MLP."""

    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""

    init_method_std: float = 0.02
    """Standard deviation of the weight initialisation."""

    transformer_impl: Literal["local", "transformer_engine"] = "local"
    """Layer implementation (Megatron-LM's name): Megatron-Core's local spec or Transformer
    Engine's. transformer_engine requires TE and a GPU (host check)."""

    recompute_granularity: Optional[Literal["full", "selective"]] = None
    """Activation recomputation: None, full (whole layers) or selective (attention core)."""

    recompute_method: Literal["uniform", "block"] = "uniform"
    """With full recompute: uniform (chunks of recompute_num_layers) or block (first N layers)."""

    recompute_num_layers: int = 1
    """Layers per recompute chunk (uniform) or recomputed layers per stage (block)."""

    num_layers_in_first_pipeline_stage: Optional[int] = None
    """Layers on the first pipeline stage; None divides layers evenly over stages."""

    num_layers_in_last_pipeline_stage: Optional[int] = None
    """Layers on the last pipeline stage; None divides layers evenly over stages."""

    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    """FP8 format of this model's forward (Transformer Engine only); None runs bf16/fp32."""

    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    """Transformer Engine FP8 scaling recipe."""

    fp8_amax_history_len: int = 1024
    """Amax history length of the delayed-scaling recipe."""

    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    """How the delayed-scaling recipe reduces the amax history."""


@dataclass
class ParallelConfig:
    """Distributed layout shared by the student and the teacher."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel ranks (splits heads, MLP and the vocabulary)."""

    pipeline_model_parallel_size: int = 1
    """Pipeline stages; teacher and student layers are split over the same stages."""

    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Interleaved pipeline chunks. Not supported in this version: must stay None."""

    context_parallel_size: int = 1
    """Context parallelism. Not supported in this version: must stay 1."""

    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs transformer_impl: transformer_engine)."""

    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""

    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduce-scatter with the backward pass."""

    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the forward pass."""

    distributed_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend: auto picks nccl with CUDA and gloo without."""

    distributed_timeout_minutes: int = 10
    """Timeout of collective operations."""


@dataclass
class DataConfig:
    """Where the domain datasets are and how samples are cut."""

    manifest: Optional[str] = None
    """Domain manifest YAML (tools/build_domains.py writes it). Required for training."""

    seq_length: int = 256
    """Tokens per training sample."""

    cache_dir: Optional[str] = None
    """Folder for Megatron-Core dataset index caches (shared by all ranks, and by every run of
    the manifest: builds are locked); each build of the datasets gets its own subfolder
    datasets-<fingerprint>, so a rebuild never reuses stale caches. None: <manifest
    folder>/cache, one cache per manifest, cleared when build-domains replaces the datasets."""


@dataclass
class DistillConfig:
    """The teacher and the distillation loss (Eq. 3: CE + gamma * KL, optionally Hinton's T^2)."""

    teacher: Union[ModelConfig, Literal["from_checkpoint"], None] = None
    """Teacher architecture: a mapping (ModelConfig fields), or from_checkpoint to take it from
    the model recorded in teacher_load's megatron_ddk.json (the default whenever teacher_load is
    set and teacher is not given; a Megatron-LM checkpoint records none: give a mapping). A
    mapping is checked against the recorded model and every differing field is named. null,
    or neither teacher nor teacher_load given, means no teacher: continued pre-training (CPT)."""

    teacher_load: Optional[str] = None
    """Checkpoint folder of the teacher (megatron-ddk or Megatron-LM layout: a root with
    latest_checkpointed_iteration.txt, an iter_NNNNNNN or a release folder). Required when
    teacher is set."""

    gamma: float = 0.2
    """Weight of the KL term (paper: 0.2). The CE weight is 1."""

    temperature: float = 1.0
    """Softmax temperature T of both distributions in the KL (CE is always at T = 1)."""

    kl_t2_scaling: bool = False
    """Multiply the KL term by T^2 (Hinton's convention: keeps the soft-target gradient's size
    as T changes). False is Eq. 3 of the paper, loss = CE + gamma * KL, so a temperature sweep
    changes only T, not the KL weight; at T = 1 both agree (docs/losses.md)."""

    kl_direction: Literal["forward", "reverse"] = "forward"
    """forward = KL(teacher || student) (the paper's KD); reverse = KL(student || teacher)."""

    kl_chunk_tokens: int = KL_CHUNK_TOKENS
    """Tokens per chunk of the vocab-parallel KL (bounds its extra memory; recomputed in
    backward)."""

    teacher_logits: Optional[str] = None
    """Offline teacher: a store folder written by tools/cache_teacher_logits.py. The run builds
    no teacher model; the KL is exact over the store's top-K tokens plus one bucket for the rest,
    and DDK's teacher validation losses come from the store. Its header must match the run
    (teacher_load's checkpoint, teacher shape, tokenizer, seq_length, temperature, seed, data);
    a (domain, sample) it does not hold is an error. Forward KL only. None: the online teacher."""


@dataclass
class DDKConfig:
    """Domain re-weighting every `interval` steps (docs/ddk.md; the paper's Algorithm 1)."""

    policy: Literal["ddk", "ddk_no_smoothing", "equal", "static"] = "ddk"
    """ddk = Eq. 2 smoothing; ddk_no_smoothing = Eq. 1 recomputed each interval; equal = uniform
    (DDK ES); static = fixed weights (natural sizes or static_weights), the KD/CPT mixture."""

    interval: int = 1000
    """Distillation interval K in optimizer steps (paper: 1000)."""

    alpha: float = 0.5
    """Smoothing coefficient of Eq. 2; every domain keeps at least (1 - alpha) / N."""

    signal: Literal["validation", "training"] = "validation"
    """What the perplexity ratio of Eq. 1 / Eq. 2 is measured on. validation (the paper): the
    student's (and, once, the frozen teacher's) mean CE on each domain's validation samples,
    measured before step 1 and every K steps. training: the student's and the teacher's mean
    CE on the interval's own training batches, from logits the KD loss already has (no extra
    forward pass); a domain with no tokens in an interval keeps its previous ratio, and r_0 is
    uniform since nothing is measured before step 1 (docs/ddk.md)."""

    initial_sampling: Literal["natural", "uniform", "eq1", "manifest"] = "natural"
    """How interval 0's data D_0 is drawn (policies ddk / ddk_no_smoothing). natural (the paper's
    "randomly sample"): token shares of the corpus; uniform: 1 / N; eq1: from r_0 itself;
    manifest: each domain's initial_weight. Eq. 2's prior r_0 is Eq. 1 in every case."""

    initial_weights: Optional[str] = None
    """Removed: it both sampled interval 0 and served as Eq. 2's prior. Setting it is an error;
    interval 0's data is now ddk.initial_sampling and the prior r_0 is always Eq. 1."""

    static_weights: Optional[List[float]] = None
    """Weights for policy static, in manifest domain order. None means natural token shares."""

    valid_samples_per_domain: int = 500
    """Validation samples per domain used to measure perplexity (paper: 500)."""

    weight_floor: Optional[float] = None
    """Optional minimum weight per domain (applied after the policy, then renormalised)."""

    weight_cap: Optional[float] = None
    """Optional maximum weight per domain (applied after the policy, then renormalised)."""

    max_epochs_per_domain: Optional[float] = None
    """Optional repetition cap: a domain that has been read this many times is clipped to zero
    weight and the rest renormalised."""


@dataclass
class TrainConfig:
    """Optimisation, schedule and budget. Steps are optimizer steps (iterations)."""

    micro_batch_size: int = 2
    """Samples per micro-batch per data-parallel rank."""

    global_batch_size: int = 8
    """Samples per optimizer step over all data-parallel ranks (gradient accumulation fills it)."""

    train_iters: Optional[int] = None
    """Optimizer steps to train. Exactly one of train_iters and train_tokens must be set."""

    train_tokens: Optional[int] = None
    """Token budget; converted to steps as ceil(tokens / (global_batch_size * seq_length))."""

    lr: float = 3.0e-5
    """Peak learning rate (paper: 3e-5)."""

    min_lr: float = 3.0e-6
    """Final learning rate of the decay (paper: 3e-6)."""

    lr_warmup_init: float = 0.0
    """Learning rate at step 0 of the warm-up."""

    lr_warmup_iters: int = 1000
    """Linear warm-up length in optimizer steps (paper: 1000)."""

    lr_decay_iters: Optional[int] = None
    """Steps over which the LR decays to min_lr; None means train_iters."""

    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the decay after warm-up."""

    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""

    adam_beta1: float = 0.9
    """Adam beta1."""

    adam_beta2: float = 0.95
    """Adam beta2."""

    adam_eps: float = 1.0e-8
    """Adam epsilon."""

    clip_grad: float = 1.0
    """Gradient clipping by global norm; 0 disables it."""

    bf16: Optional[bool] = None
    """bf16 mixed precision. None = bf16 on GPU, fp32 on CPU."""

    seed: int = 1234
    """Run seed: initialisation, sampling order, dropout."""

    exit_duration_minutes: Optional[float] = None
    """Save and exit once the run has been going this long (Megatron-LM's flag)."""

    exit_interval: Optional[int] = None
    """Save and exit when the step is a multiple of this (Megatron-LM's flag)."""


@dataclass
class CheckpointConfig:
    """Megatron-LM checkpoint layout: DIR/iter_NNNNNNN/ + latest_checkpointed_iteration.txt."""

    save: Optional[str] = None
    """Folder to write checkpoints to. None saves nothing."""

    load: Optional[str] = None
    """Folder to resume from (its latest iteration; an iter_NNNNNNN folder picks one). auto
    resumes from checkpoint.save when it holds a checkpoint and starts fresh when it does not.
    None starts fresh (refused when checkpoint.save already holds checkpoints, unless
    overwrite)."""

    save_interval: Optional[int] = None
    """Save every this many steps; a final checkpoint is always written when save is set."""

    keep_last: Optional[int] = None
    """Keep only the newest this many checkpoints. None keeps all."""

    save_on_signal: bool = True
    """Save and exit 0 on SIGTERM / SIGUSR1 (SLURM pre-emption)."""

    finetune: bool = False
    """Load only the model weights from load (new optimizer, step 0)."""

    overwrite: bool = False
    """Let a run write into a checkpoint.save folder that holds checkpoints it does not resume
    from (a fresh run over an earlier one, another run's folder, the teacher's folder). Its
    iterations replace same-numbered ones; iterations it did not write are never pruned."""


@dataclass
class LoggingConfig:
    """Run folder, console log, TensorBoard, metrics.jsonl and (optionally) Weights & Biases."""

    run_dir: str = "runs/default"
    """Run folder: log, metrics.jsonl, TensorBoard events, metadata, plots."""

    log_interval: int = 10
    """Log a line and a metrics record every this many steps."""

    tensorboard: bool = True
    """Write TensorBoard scalars under run_dir/tensorboard."""

    log_level: Literal["DEBUG", "INFO", "WARNING"] = "INFO"
    """Console and file log level."""

    wandb_project: Optional[str] = None
    """Weights & Biases project (Megatron-LM's --wandb-project); set, rank 0 logs what TensorBoard
    gets (train/, timing/, ddk/ scalars) to a wandb run. Needs the 'wandb' extra. Offline runs:
    WANDB_MODE=offline, then `wandb sync`."""

    wandb_exp_name: Optional[str] = None
    """Name of the wandb run (--wandb-exp-name); default: the run folder's name."""

    wandb_save_dir: Optional[str] = None
    """Where wandb writes its local files (--wandb-save-dir); default: run_dir/wandb."""


@dataclass
class RunConfig:
    """A whole run: one YAML file with these sections, plus section.field=value overrides."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The student (or the only model, for CPT and teacher pre-training)."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline / data-parallel layout."""

    data: DataConfig = field(default_factory=DataConfig)
    """Domain manifest and sample length."""

    distill: DistillConfig = field(default_factory=DistillConfig)
    """Teacher and loss; no teacher means CPT."""

    ddk: DDKConfig = field(default_factory=DDKConfig)
    """Mixture policy and interval."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimiser, schedule, budget."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Where and how the run reports."""
