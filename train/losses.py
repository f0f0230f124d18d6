"""Distillation losses: each a small function of (student, teacher[, labels]) -> a scalar.

Logits are (B, T, V) and aligned: position t of both models predicts token t + 1, so the KD
losses compare position with position and only the data cross-entropy shifts by one. Every
loss is a mean over the scored positions (`mask`, (B, T) bool; None scores all), so weights in
a run config mean the same whatever the batch shape.

- `forward_kl`: KL(p_teacher || p_student) on logits divided by the temperature T, times T^2
  (Hinton et al. 2015: the soft targets' gradients scale as 1 / T^2, the factor keeps their size
  comparable to the hard-label loss when T changes). Mode-covering. The teacher side may be the
  full logits or a top-k pair (indices, logits) from a cache: the teacher's distribution is then
  renormalised over its k kept tokens and the student's full log-softmax is read at them.
- `reverse_kl`: KL(p_student || p_teacher) at temperature T, times T^2: mode-seeking (MiniLLM).
  Needs the full teacher logits.
- `cross_entropy`: next-token CE on the data (labels -100 are ignored).
- `hidden_mse` with `HiddenProjection`: white-box KD, MSE between student hidden states and the
  teacher's at mapped layers, through a learned linear map where the widths differ.
Sequence-level KD (CE on sequences the teacher generates) lives in distill/: it is a data
transformation followed by `cross_entropy`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp_min(1.0)


def _check_logits(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"{what}: student logits {tuple(student.shape)} and teacher logits "
            f"{tuple(teacher.shape)} cover different positions"
        )


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2 KL(softmax(z_t / T) || softmax(z_s / T)), averaged over scored positions.

    teacher_logits: (B, T, V) full logits, or (indices (B, T, k), logits (B, T, k)) top-k.
    """
    s = student_logits.float() / temperature
    log_p_s = F.log_softmax(s, dim=-1)
    if isinstance(teacher_logits, tuple):
        indices, values = teacher_logits
        _check_logits(student_logits, values, "forward_kl")
        log_p_t = F.log_softmax(values.float() / temperature, dim=-1)  # renormalised over top-k
        log_p_s = log_p_s.gather(-1, indices.long())
    else:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"forward_kl: student logits {tuple(student_logits.shape)} and teacher logits "
                f"{tuple(teacher_logits.shape)} differ; teacher and student must share the "
                "vocabulary"
            )
        log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return _masked_mean(kl, mask) * temperature**2


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2 KL(softmax(z_s / T) || softmax(z_t / T)), averaged over scored positions."""
    if isinstance(teacher_logits, tuple):
        raise ValueError(
            "reverse_kl needs the teacher's full distribution (every token the student may put "
            "mass on); a top-k logits cache cannot serve it: set distill.cache.top_k=0 (full) "
            "or compute the teacher on the fly"
        )
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"reverse_kl: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; teacher and student must share the vocabulary"
        )
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
    return _masked_mean(kl, mask) * temperature**2


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits at t against labels at t + 1 (-100 ignored)."""
    return F.cross_entropy(
        student_logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
        ignore_index=IGNORE,
    )


def parse_layer_map(layer_map: Mapping | Sequence | None, n_student: int,
                    n_teacher: int) -> dict[int, int]:
    """{student layer: teacher layer}, both 1-based into `hidden_states` (0 = the embedding
    output, i = block i - 1's output).

    None maps evenly: student layer i (1..n_student) to teacher layer round(i * n_teacher /
    n_student), so the last layers always meet. A list of pairs or a mapping is taken as given.
    """
    if layer_map is None:
        return {i: round(i * n_teacher / n_student) for i in range(1, n_student + 1)}
    pairs = layer_map.items() if isinstance(layer_map, Mapping) else layer_map
    result: dict[int, int] = {}
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(
                f"distill.layer_map entry {pair!r} must be a [student_layer, teacher_layer] pair"
            )
        s, t = (int(v) for v in pair)
        if not 0 <= s <= n_student or not 0 <= t <= n_teacher:
            raise ValueError(
                f"distill.layer_map entry [{s}, {t}] is outside student 0..{n_student} / "
                f"teacher 0..{n_teacher} (0 = embedding output, i = block i's output)"
            )
        result[s] = t
    if not result:
        raise ValueError("distill.layer_map is empty; leave it out to map layers evenly")
    return result


class HiddenProjection(nn.Module):
    """One Linear(d_student, d_teacher) per mapped student layer when the widths differ (FitNets'
    regressor); the identity when they match. Trained with the student."""

    def __init__(self, layer_map: Mapping[int, int], d_student: int, d_teacher: int):
        super().__init__()
        self.layer_map = dict(layer_map)
        self.maps = nn.ModuleDict()
        if d_student != d_teacher:
            for s in self.layer_map:
                self.maps[str(s)] = nn.Linear(d_student, d_teacher, bias=False)

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        key = str(layer)
        return self.maps[key](hidden) if key in self.maps else hidden


def hidden_mse(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    projection: HiddenProjection,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over mapped layers of the per-position MSE between projected student and teacher
    hidden states (B, T, d). Each layer's MSE is divided by the teacher's mean square there, so
    layers whose residual stream has grown large do not swamp the early ones.
    """
    losses = []
    for s, t in projection.layer_map.items():
        target = teacher_hidden[t].float()
        pred = projection(s, student_hidden[s].float())
        if pred.shape != target.shape:
            raise ValueError(
                f"hidden_mse: student layer {s} gives {tuple(pred.shape)}, teacher layer {t} "
                f"{tuple(target.shape)}"
            )
        per_position = (pred - target).square().mean(-1)
        scale = _masked_mean(target.square().mean(-1), mask).detach().clamp_min(1e-6)
        losses.append(_masked_mean(per_position, mask) / scale)
    return torch.stack(losses).mean()
