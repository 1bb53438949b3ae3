"""A conv's geometry for the lean step: what F.conv and convolution_backward need besides the weight,
and per-channel views."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CONV_CLASSES = (nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class ConvGeometry:
    """What a conv does besides its weight. Padding that F.conv cannot express (reflect, replicate,
    circular, string padding) is applied with F.pad first (`pre_pad`), as nn.Conv's own forward does."""

    nd: int
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    pre_pad: tuple[int, ...] | None
    pad_mode: str

    @staticmethod
    def of(conv: nn.Module) -> "ConvGeometry":
        nd = 1 if isinstance(conv, nn.Conv1d) else 2
        pre_pad, padding = None, tuple(conv.padding) if not isinstance(conv.padding, str) else (0,) * nd
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            amounts = tuple(conv._reversed_padding_repeated_twice)
            pre_pad = amounts if any(amounts) else None
            padding = (0,) * nd
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        return ConvGeometry(nd, tuple(conv.stride), padding, tuple(conv.dilation), conv.groups, pre_pad, mode)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.pre_pad is None else F.pad(x, self.pre_pad, mode=self.pad_mode)

    def unpad_grad(self, grad: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
        """Gradient w.r.t. the unpadded input from the gradient w.r.t. the padded one."""
        if self.pre_pad is None:
            return grad
        if self.pad_mode == "constant":
            return F.pad(grad, [-p for p in self.pre_pad])  # negative padding crops
        with torch.enable_grad():  # reflect/replicate/circular: let autograd fold the wrapped borders back
            probe = grad.new_zeros(x_shape).requires_grad_()
            return torch.autograd.grad(F.pad(probe, self.pre_pad, mode=self.pad_mode), probe, grad)[0]

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        fn = F.conv1d if self.nd == 1 else F.conv2d
        return fn(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: tuple[bool, bool],
                 bias_grad: bool = False):
        """(input gradient, weight gradient, bias gradient) as `mask` and `bias_grad` ask: the op and
        arguments autograd's own conv node uses, so the results are its results bit for bit. `x` may be a
        shape-only stand-in when the weight gradient is not wanted."""
        return torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if bias_grad else None, list(self.stride), list(self.padding),
            list(self.dilation), False, [0] * self.nd, self.groups, [mask[0], mask[1], bias_grad])

    def padded_shape(self, x_shape: torch.Size) -> list[int]:
        pre = self.pre_pad or (0,) * (2 * self.nd)
        return list(x_shape[:2]) + [x_shape[2 + i] + pre[2 * (self.nd - 1 - i)] + pre[2 * (self.nd - 1 - i) + 1]
                                    for i in range(self.nd)]

    def out_sizes(self, x_shape: torch.Size, kernel: tuple[int, ...]) -> list[int]:
        padded = self.padded_shape(x_shape)
        return [(padded[2 + i] + 2 * self.padding[i] - self.dilation[i] * (kernel[i] - 1) - 1) // self.stride[i] + 1
                for i in range(self.nd)]


def channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def reduce_dims(ndim: int) -> list[int]:
    return [0] + list(range(2, ndim))
