"""Teacher and student as one pipeline-stage module that Megatron-Core's schedules can drive.

Both models' layers are split over the same pipeline stages (each model by its own
num_layers / num_layers_in_first|last_pipeline_stage). On a stage boundary the P2P tensor carries
both hidden states side by side, [s, b, h_student + h_teacher] (student first); each stage hands
each model its own slice. The teacher's slice is detached and its forward runs under no_grad, so
it never receives gradients; the gradient sent back upstream is zero in the teacher's columns.
On the last stage the forward returns (student_logits, teacher_logits), both [b, s, v/tp], for
the distillation loss. Without a teacher (CPT, evaluation) the pair is just the student and the
P2P tensor is the student's hidden state. docs/pipeline_parallel.md explains the layout and its
memory.

Megatron-Core's 1F1B schedule sizes its P2P buffers from config.hidden_size (the student's);
pass `pair.adjust_tensor_shapes` as its adjust_tensor_shapes_fn to widen them
(training/schedule.forward_backward does so by itself when the caller passes none).

Must not import: megatron_ddk.training, .data, .losses, .ddk.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core.transformer.module import MegatronModule

from megatron_ddk.config.pipeline_split import pipeline_stage_layers


def stage_layer_errors(model: torch.nn.Module, name: str) -> List[str]:
    """Why the layers `model` holds on its pipeline stage are not what the split rule
    (config/pipeline_split.pipeline_stage_layers, the one config/validate.py checks) says.

    Megatron-Core builds some splits the rule refuses (an empty middle stage, a floored share),
    so a model built from a config that skipped the static checks is caught here."""
    cfg, decoder = model.config, getattr(model, "decoder", None)
    pp = cfg.pipeline_model_parallel_size
    groups = getattr(model, "pg_collection", None)
    if decoder is None or groups is None or getattr(groups, "pp", None) is None:
        return []
    first, last = cfg.num_layers_in_first_pipeline_stage, cfg.num_layers_in_last_pipeline_stage
    split = pipeline_stage_layers(cfg.num_layers, pp, first, last)
    where = (f"{name}: num_layers={cfg.num_layers} over {pp} pipeline stages (first stage: "
             f"{first}, last stage: {last})")
    if split is None:
        return [f"{where} cannot be split: every stage needs at least one layer"]
    stage = dist.get_rank(groups.pp) if dist.is_initialized() else 0
    if len(decoder.layers) != split[stage]:
        return [f"{where} splits as {split}, but stage {stage} holds {len(decoder.layers)} layers"]
    return []


def check_pair(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """Raise ValueError when the two stage modules cannot share one pipeline (same stage, same
    stage count, same sequence sharding, each holding the layers the split rule gives it)."""
    s, t = student.config, teacher.config
    pp = s.pipeline_model_parallel_size
    problems = []
    if t.pipeline_model_parallel_size != pp:
        problems.append(f"the student is split over {pp} pipeline stages but the teacher over "
                        f"{t.pipeline_model_parallel_size}; build both on one ParallelContext")
    if (student.pre_process, student.post_process) != (teacher.pre_process, teacher.post_process):
        problems.append(f"student (pre_process={student.pre_process}, post_process="
                        f"{student.post_process}) and teacher (pre_process={teacher.pre_process}, "
                        f"post_process={teacher.post_process}) are not the same pipeline stage")
    if bool(s.sequence_parallel) != bool(t.sequence_parallel):
        problems.append(f"sequence_parallel differs (student {s.sequence_parallel}, teacher "
                        f"{t.sequence_parallel}): both hidden states share one [s, b, h] P2P "
                        f"tensor, so both models must shard the sequence the same way")
    problems += stage_layer_errors(student, "student") + stage_layer_errors(teacher, "teacher")
    if problems:
        raise ValueError("DistillationPair: " + "; ".join(problems))


class DistillationPair(MegatronModule):
    """One pipeline stage of (student, frozen teacher).

    Args:
        student: the student's GPTModel stage (trained).
        teacher: the teacher's GPTModel stage on the same pipeline rank (frozen), or None.

    Megatron-Core reaches through wrappers (DDP, Float16Module) for a few attributes of the
    model; those that concern the trained model (tied embeddings, model type, process groups)
    are the student's. Checkpoints hold the student only: `sharded_state_dict`,
    `state_dict_for_save_checkpoint` and `load_state_dict` all speak the student's keys.
    """

    def __init__(self, student: torch.nn.Module, teacher: Optional[torch.nn.Module] = None):
        super().__init__(config=student.config)
        if teacher is None:
            problems = stage_layer_errors(student, "student")
            if problems:
                raise ValueError("DistillationPair: " + "; ".join(problems))
        else:
            check_pair(student, teacher)
            if any(p.requires_grad for p in teacher.parameters()):
                raise ValueError("DistillationPair: the teacher has trainable parameters; freeze "
                                 "it first (megatron_ddk.models.teacher.freeze)")
        self.student = student
        self.teacher = teacher
        self.pre_process = student.pre_process
        self.post_process = student.post_process
        self.model_type = student.model_type
        self.pg_collection = getattr(student, "pg_collection", None)
        self.vp_stage = getattr(student, "vp_stage", None)
        self.share_embeddings_and_output_weights = student.share_embeddings_and_output_weights
        self._student_hidden = student.config.hidden_size
        self._teacher_hidden = teacher.config.hidden_size if teacher is not None else 0
        if student.config.pipeline_model_parallel_size > 1:
            # As Megatron-LM does: once a stage's output is sent, free its data (the autograd
            # graph stays for backward); otherwise every in-flight micro-batch would keep a
            # widened [s, b, h_s + h_t] output alive. The schedule reads this flag from the
            # student's config, which DDP / Float16Module share.
            student.config.deallocate_pipeline_outputs = True

    @property
    def p2p_hidden_size(self) -> int:
        """Last dimension of the stage-to-stage tensor: h_student + h_teacher."""
        return self._student_hidden + self._teacher_hidden

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        """The student's tied embedding / output weight (finalize_model_grads all-reduces its
        gradient between the first and last stage); the teacher's is frozen."""
        return self.student.shared_embedding_or_output_weight()

    def train(self, mode: bool = True):
        """Train mode for the student; the teacher stays in eval mode (no dropout) always."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def set_input_tensor(self, input_tensor) -> None:
        """Split the received [s, b, h_s + h_t] tensor between the two models."""
        if isinstance(input_tensor, list):
            assert len(input_tensor) == 1, "one P2P tensor per stage"
            input_tensor = input_tensor[0]
        if input_tensor is None or self.teacher is None:
            self.student.set_input_tensor(input_tensor)
            if self.teacher is not None:
                self.teacher.set_input_tensor(None)
            return
        width, hs = input_tensor.shape[-1], self._student_hidden
        if width != self.p2p_hidden_size:
            raise ValueError(f"DistillationPair: received a P2P tensor of width {width}, expected "
                             f"student {hs} + teacher {self._teacher_hidden} = "
                             f"{self.p2p_hidden_size}; pass pair.adjust_tensor_shapes as "
                             f"adjust_tensor_shapes_fn to the 1F1B schedule")
        self.student.set_input_tensor(input_tensor[..., :hs])
        self.teacher.set_input_tensor(input_tensor[..., hs:].detach())

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None):
        """Last stage: (student_logits [b, s, v/tp], teacher_logits [b, s, v/tp] or None).
        Other stages: the hidden states to send, [s, b, h_s (+ h_t)]."""
        teacher_out = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_out = self.teacher(input_ids, position_ids, attention_mask)
        student_out = self.student(input_ids, position_ids, attention_mask)
        if self.post_process:
            return student_out, teacher_out
        if teacher_out is None:
            return student_out
        return torch.cat([student_out, teacher_out.detach().to(student_out.dtype)], dim=-1)

    def adjust_tensor_shapes(self, recv_shapes: List[Tuple], send_shapes: List[Tuple]):
        """For the 1F1B schedule: widen the P2P shapes by the teacher's hidden size."""
        extra = self._teacher_hidden

        def widen(shapes):
            return [(s, b, h + extra) for (s, b, h) in shapes]

        return widen(recv_shapes), widen(send_shapes)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """The student's weights only: the teacher is never written into a student checkpoint."""
        return self.student.sharded_state_dict(prefix=prefix, sharded_offsets=sharded_offsets,
                                               metadata=metadata)

    def state_dict_for_save_checkpoint(self, prefix: str = "", keep_vars: bool = False):
        """The student's state dict only."""
        return self.student.state_dict(prefix=prefix, keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a student checkpoint's state dict (the keys `sharded_state_dict` writes) into the
        student; the teacher is loaded on its own (models/teacher.py)."""
        return self.student.load_state_dict(state_dict, strict=strict, assign=assign)
