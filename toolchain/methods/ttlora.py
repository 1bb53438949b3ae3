"""TT-LoRA (LoRA-Edge): tensor-train decomposition of each conv kernel, output-side core first.

For W of shape (C_out, C_in/groups, k1[, k2]) TT-SVD gives cores
    G1: C_out x r1,  G2: r1 x C_in' x r2,  G3: r2 x k1 (x r3),  ...
with every TT rank capped at the recipe's r. W and every core but G1 stay frozen; G1 restarts at
zero so the adapted model equals the base exactly at step 0, and training updates C_out * r1
numbers per layer. Delta W = contraction of [G1, G2, ...]; after training W' = W + Delta W.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdaptationMethod, AdapterLayer, conv_forward


def tt_svd(tensor: torch.Tensor, max_rank: int) -> list[torch.Tensor]:
    """TT-SVD (Oseledets 2011) left to right. Cores are [r_{i-1}, d_i, r_i] with r_0 = r_n = 1;
    every rank is min(max_rank, what the unfolding allows). At full rank the contraction is exact."""
    dims = list(tensor.shape)
    cores: list[torch.Tensor] = []
    rest = tensor.double().reshape(dims[0], -1)
    r_prev = 1
    for d in dims[:-1]:
        rest = rest.reshape(r_prev * d, -1)
        U, S, Vh = torch.linalg.svd(rest, full_matrices=False)
        r = min(max_rank, S.numel())
        cores.append(U[:, :r].reshape(r_prev, d, r))
        rest = S[:r, None] * Vh[:r]
        r_prev = r
    cores.append(rest.reshape(r_prev, dims[-1], 1))
    return cores


def tt_contract(cores: list[torch.Tensor]) -> torch.Tensor:
    """Contract [r0=1, d1, r1], [r1, d2, r2], ... back to a d1 x d2 x ... tensor."""
    out = cores[0]
    for core in cores[1:]:
        out = torch.tensordot(out, core, dims=([out.dim() - 1], [0]))
    return out.reshape(out.shape[1:-1])


class TTLoRAConv(AdapterLayer):
    """A Conv1d/Conv2d (grouped and depthwise included) with a TT-LoRA update; only `g1` trains."""

    def __init__(self, base: nn.Module, rank: int):
        super().__init__(base)
        cores = tt_svd(base.weight.detach(), rank)
        dtype = base.weight.dtype
        # G1 re-initialised to zero: the adapter starts inactive (the SVD's U is discarded).
        self.g1 = nn.Parameter(torch.zeros(cores[0].shape[1], cores[0].shape[2], dtype=dtype))
        self.tt_ranks = [c.shape[2] for c in cores[:-1]]  # what tt_svd kept of `rank` at each bond
        self.n_frozen = len(cores) - 1
        for i, core in enumerate(cores[1:], start=2):
            self.register_buffer(f"g{i}", core.to(dtype))

    def frozen_cores(self) -> list[torch.Tensor]:
        return [getattr(self, f"g{i}") for i in range(2, self.n_frozen + 2)]

    def _delta(self, dtype: torch.dtype) -> torch.Tensor:
        cores = [self.g1.to(dtype).unsqueeze(0)] + [c.to(dtype) for c in self.frozen_cores()]
        # In `dtype` even under fp16/bf16 autocast (which would cast each contraction's matmul, leaving the
        # next one with mixed inputs): the update is small and W + dW is the weight the conv then casts.
        with torch.autocast(self.g1.device.type, enabled=False):
            return tt_contract(cores)

    def delta_weight(self) -> torch.Tensor:
        return self._delta(torch.float64).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base.weight + self._delta(self.base.weight.dtype)
        return conv_forward(self.base, x, weight, self.base.bias)

    def extra_repr(self) -> str:
        shapes = [tuple(self.g1.shape)] + [tuple(c.shape) for c in self.frozen_cores()]
        return f"tt_cores={shapes}"


class TTLoRA(AdaptationMethod):
    description = "TT-LoRA (LoRA-Edge): train the output-side TT core G1 of each conv kernel"

    def _inject(self, model: nn.Module, head_name: str | None) -> None:
        names = self.wrap_convs(model, lambda conv: TTLoRAConv(conv, self.cfg.rank), head_name)
        self.note_rank_caps({n: max(model.get_submodule(n).tt_ranks) for n in names})
