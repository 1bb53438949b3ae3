"""TT-LoRA's side output u = conv(x, K) in the lean step (K = G2 x G3 x ..., the frozen cores contracted once):
how it is produced next to the main conv, and G1's gradient from it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import ConvGeometry
from .precision import as_dtype

# How TT-LoRA's side output u = conv(x, K) is produced next to the main conv:
#   "combined": one conv with C_out + r output channels (r per group), main rows and u sliced out of it;
#   "separate": the main conv, and a conv with K alone whose r rows are zero-padded to a multiple of
#               SIDE_ROW_BLOCK (CPU conv kernels block output channels by 8/16, and a C_out + r conv costs a
#               whole extra block; docs/benchmarks.md has the measurements);
#   "factored": as "separate", but a Conv1d (groups = 1) whose cores make it cheaper runs the side conv
#               through the cores instead of K: a 1x1 conv to r1 x r2 channels (G2), then each channel's
#               k taps (G3), summed over r2. Fewer multiply-adds (r1 r2 (C_in + k) against 8 C_in k) and
#               measured 30-50 % faster than the padded K conv on CPU; u differs from conv(x, K) by rounding
#               only, and u feeds G1's gradient alone, never the layer's output.
#   "auto": combined on CUDA, factored elsewhere. All are exact up to rounding; tests run each.
SIDE_PATH = "auto"
SIDE_ROW_BLOCK = 8


def side_is_combined(x: torch.Tensor) -> bool:
    return SIDE_PATH == "combined" or (SIDE_PATH == "auto" and x.is_cuda)


@dataclass(frozen=True)
class SideWeights:
    """What the separate side conv runs on: K with its rows zero-padded to SIDE_ROW_BLOCK, and for a Conv1d
    (groups = 1) where it is cheaper, the cores laid out for the factored path (`pointwise`: G2 as an
    (r1 r2, C_in, 1) kernel; `taps`: G3 as an (r1 r2, 1, k) depthwise kernel)."""

    padded: torch.Tensor
    pointwise: torch.Tensor | None = None
    taps: torch.Tensor | None = None

    @staticmethod
    def of(base: nn.Module, cores: list[torch.Tensor], k: torch.Tensor) -> "SideWeights":
        """From a TT-LoRA layer's base conv, its frozen cores and their contraction K (all full precision)."""
        rows = -(-k.shape[0] // SIDE_ROW_BLOCK) * SIDE_ROW_BLOCK
        padded = torch.cat([k, k.new_zeros(rows - k.shape[0], *k.shape[1:])]) if rows > k.shape[0] else k
        return SideWeights(padded, *_factored(base, cores, rows))

    def to(self, dtype: torch.dtype) -> "SideWeights":
        if self.padded.dtype == dtype:  # every step in fp32: no new object
            return self
        return SideWeights(as_dtype(self.padded, dtype), as_dtype(self.pointwise, dtype), as_dtype(self.taps, dtype))

    def conv(self, xp: torch.Tensor, geo: ConvGeometry, r: int) -> torch.Tensor:
        """u = conv(xp, K) for groups = 1, (N, r, ...) in its own storage."""
        if self.pointwise is not None and SIDE_PATH in ("auto", "factored"):
            v = F.conv1d(xp, self.pointwise)
            u = F.conv1d(v, self.taps, None, geo.stride, geo.padding, geo.dilation, self.taps.shape[0])
            return u.view(u.shape[0], r, -1, u.shape[-1]).sum(2)
        side = geo.conv(xp, self.padded, None)
        return side[:, :r].contiguous() if side.shape[1] > r else side


def main_and_side(xp, w, b, k, side: SideWeights, geo: ConvGeometry, own_main: bool):
    """(conv(xp, w) + b, u = conv(xp, k)), u as (N, groups * r, ...) in its own storage so saving it does
    not keep the main output alive. `own_main`: no BatchNorm follows to copy the main rows out of a combined
    output, so they are copied here (the layer's output must not keep the side rows alive either)."""
    groups = geo.groups
    c_out, r = w.shape[0], k.shape[0]
    if not side_is_combined(xp):
        z = geo.conv(xp, w, b)
        if groups == 1:
            return z, side.conv(xp, geo, r)
        return z, geo.conv(xp, k.repeat(groups, *([1] * (k.dim() - 1))), None)
    cg = c_out // groups
    wc = torch.cat([w.view(groups, cg, *w.shape[1:]), k.unsqueeze(0).expand(groups, *k.shape)], 1).flatten(0, 1)
    bc = None if b is None else torch.cat([b.view(groups, cg), b.new_zeros(groups, r)], 1).flatten()
    out = geo.conv(xp, wc, bc)
    n, spatial = out.shape[0], out.shape[2:]
    flat = out.view(n, groups, cg + r, -1)
    main = flat[:, :, :cg].reshape(n, c_out, *spatial)  # a view when groups == 1
    if own_main and main.data_ptr() == out.data_ptr():
        main = main.contiguous()
    return main, flat[:, :, cg:].contiguous()


def side_grad(g: torch.Tensor, u: torch.Tensor, groups: int, r: int) -> torch.Tensor:
    """sum over batch and positions of g (C_out) times u (r), per group: dL/dG1 before the BN scale."""
    n = g.shape[0]
    if groups == 1:
        return torch.bmm(g.reshape(n, g.shape[1], -1), u.reshape(n, r, -1).transpose(1, 2)).sum(0)
    gg = g.reshape(n, groups, g.shape[1] // groups, -1)
    return torch.matmul(gg, u.reshape(n, groups, r, -1).transpose(-1, -2)).sum(0).reshape(-1, r)


def _factored(base: nn.Module, cores: list[torch.Tensor], padded_rows: int):
    """(pointwise, taps) for the factored side conv, or (None, None) where it does not apply or costs more."""
    if not isinstance(base, nn.Conv1d) or base.groups != 1 or len(cores) != 2:
        return None, None
    g2, g3 = cores  # (r1, C_in, r2), (r2, k, 1)
    r1, c_in, r2 = g2.shape
    k = g3.shape[1]
    if k < 2 or r1 * r2 * (c_in + k) >= padded_rows * c_in * k:  # a 1x1 conv: the taps would be a pass for nothing
        return None, None
    pointwise = g2.permute(0, 2, 1).reshape(r1 * r2, c_in, 1).contiguous()  # channel (a, b) = sum_i G2[a, i, b] x_i
    taps = g3[:, :, 0].repeat(r1, 1).reshape(r1 * r2, 1, k).contiguous()     # channel (a, b) filtered by G3[b]
    return pointwise, taps
