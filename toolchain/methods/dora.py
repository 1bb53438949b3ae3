"""DoRA on convolutions (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), following
HF PEFT's conv implementation (peft/tuners/lora/dora.py, _DoraConvNdLayer):

    V = W + s * Delta W              (Delta W = the LoRA product B @ A, per group, see lora.py)
    W' = m * V / ||V||_c             (||.||_c: L2 norm over every dim but the output channel)

m (one number per output channel) starts at ||W||_c, so W' = W at step 0. As in the paper (sec. 4.3)
and PEFT, ||V||_c is treated as a constant in the forward (detached): it follows the update but
receives no gradient. The base bias is left as is, not rescaled by m / ||V||_c (PEFT subtracts it
before scaling and adds it back), so the fused layer is W' with the original bias.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdaptationMethod, conv_forward
from .lora import LoRAConv, group_rank


def channel_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W||_c: per-output-channel L2 norm over all other dims, shape (C_out,)."""
    return weight.flatten(1).norm(p=2, dim=1)


def direction_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W + s dW||_c as the divisor: floored at 1e-12 so an all-zero (e.g. pruned) output channel gives
    m * 0 / 1e-12 = 0 instead of 0/0 = NaN at step 0 (PEFT divides unguarded; elsewhere identical)."""
    return channel_norm(weight).clamp_min(1e-12)


class DoRAConv(LoRAConv):
    """LoRA direction + trainable per-output-channel magnitude `magnitude` (shape (C_out,))."""

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None):
        super().__init__(base, rank, alpha)
        self.magnitude = nn.Parameter(channel_norm(base.weight.detach()).clone())

    def _channel_view(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return t.reshape((1, -1) + (1,) * (ndim - 2))

    def merged_weight(self) -> torch.Tensor:
        direction = self.base.weight.detach().double() + self.lora_delta_weight()
        scale = self.magnitude.detach().double() / direction_norm(direction)
        return scale.reshape((-1,) + (1,) * (direction.dim() - 1)) * direction

    def delta_weight(self) -> torch.Tensor:
        # The whole update W' - W (magnitude included), so merged_weight() == W + delta_weight() holds.
        return self.merged_weight() - self.base.weight.detach().double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base.weight
        lora_weight = self.lora_weight(weight.dtype).detach()
        norm = direction_norm(weight + lora_weight).detach()
        mag_norm_scale = self.magnitude / norm
        base_out = conv_forward(self.base, x, weight, None)
        out = base_out + self.lora_B(self.lora_A(x)) * self.scaling
        out = self._channel_view(mag_norm_scale, out.dim()) * out
        if self.base.bias is not None:
            out = out + self._channel_view(self.base.bias, out.dim())
        return out


class DoRA(AdaptationMethod):
    description = "DoRA on convs: LoRA direction (A, B) plus a trainable per-output-channel magnitude"

    def _inject(self, model: nn.Module, head_name: str | None) -> None:
        names = self.wrap_convs(model, lambda conv: DoRAConv(conv, self.cfg.rank, self.cfg.alpha), head_name)
        self.note_rank_caps({n: group_rank(model.get_submodule(n).base, self.cfg.rank) for n in names})
