"""LoRA on convolutions (Hu et al. 2021; conv form as in HF PEFT's lora.Conv1d/Conv2d).

For a conv W of shape (C_out, C_in/g, *k) with g groups:
    A: conv C_in -> r*g, the base layer's kernel/stride/padding/dilation/padding_mode, groups=g
    B: 1x1 conv r*g -> C_out, groups=g, zero-initialised
    forward = base(x) + B(A(x)) * alpha/r
Group j of the output only sees group j of A, so Delta W for group j is B_j @ A_j (flattened over
C_in/g and the kernel taps): exact for grouped and depthwise convs, hence always fusable. With g=1
this is PEFT's layout; PEFT itself gives grouped convs a full C_in -> r A and cannot merge them.

The per-group rank is capped at min(r, C_out/g, C_in/g * prod(k)): a larger rank adds parameters
without enlarging the space Delta W can reach (a depthwise conv's update has rank 1 per channel).
The scaling stays alpha / r with the recipe's r, so capping never changes the scale.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import AdaptationMethod, AdapterLayer


def group_rank(conv: nn.Module, rank: int) -> int:
    """The rank each group's update can actually have (see module docstring)."""
    taps = math.prod(conv.kernel_size)
    return max(1, min(rank, conv.out_channels // conv.groups, conv.in_channels // conv.groups * taps))


def lora_factors(conv: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
    """A (kaiming-uniform like PEFT) and B (zeros) as convs of the same type, dtype and device as `conv`."""
    g, r = conv.groups, group_rank(conv, rank)
    w = conv.weight
    kw = {"dtype": w.dtype, "device": w.device}
    conv_type = type(conv)
    lora_A = conv_type(conv.in_channels, r * g, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                       dilation=conv.dilation, groups=g, bias=False, padding_mode=conv.padding_mode, **kw)
    lora_B = conv_type(r * g, conv.out_channels, 1, groups=g, bias=False, **kw)
    nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
    nn.init.zeros_(lora_B.weight)
    return lora_A, lora_B


def grouped_product(lora_A: nn.Module, lora_B: nn.Module, groups: int, weight_shape: torch.Size,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """B @ A per group, shaped like the base weight (no scaling)."""
    r = lora_A.out_channels // groups
    a = lora_A.weight.to(dtype).reshape(groups, r, -1)  # (g, r, C_in/g * taps)
    b = lora_B.weight.to(dtype).reshape(groups, -1, r)  # (g, C_out/g, r)
    return torch.bmm(b, a).reshape(weight_shape)


class LoRAConv(AdapterLayer):
    """A Conv1d/Conv2d (grouped and depthwise included) plus a trainable low-rank branch B(A(x))."""

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None):
        super().__init__(base)
        self.rank = rank
        self.scaling = (rank if alpha is None else alpha) / rank
        self.lora_A, self.lora_B = lora_factors(base, rank)

    def lora_weight(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """scaling * B @ A shaped like the base weight, differentiable."""
        return grouped_product(self.lora_A, self.lora_B, self.base.groups, self.base.weight.shape, dtype) * self.scaling

    def lora_delta_weight(self) -> torch.Tensor:
        """s * B @ A in float64: what PEFT's `get_delta_weight` returns (for DoRA too, which adds the magnitude on top)."""
        return self.lora_weight(torch.float64).detach()

    def delta_weight(self) -> torch.Tensor:
        return self.lora_delta_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling

    def extra_repr(self) -> str:
        return f"rank_per_group={self.lora_A.out_channels // self.base.groups}, groups={self.base.groups}, scaling={self.scaling:g}"


class LoRA(AdaptationMethod):
    description = "LoRA on convs: trainable A (kernel-shaped, C_in->r) and B (1x1, r->C_out) per group"

    def _inject(self, model: nn.Module, head_name: str | None) -> None:
        names = self.wrap_convs(model, lambda conv: LoRAConv(conv, self.cfg.rank, self.cfg.alpha), head_name)
        self.note_rank_caps({n: group_rank(model.get_submodule(n).base, self.cfg.rank) for n in names})
