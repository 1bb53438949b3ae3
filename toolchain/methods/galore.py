"""GaLore (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection").

Every weight stays full rank and trains in place; what is low rank is the gradient the optimizer
sees. For each projected weight (the convs the recipe's `layers` selects) the gradient G, reshaped
to a matrix (C_out, C_in/g * prod(k)), is projected on its smaller side, as the reference
implementation's 'std' projection does:
    C_out >= C_in/g*prod(k):  R = G @ P.T, P = top-r right singular vectors of G (r x n)
    otherwise:                R = P.T @ G, P = top-r left singular vectors of G   (m x r)
Adam (or SGD-momentum) state lives in the projected space; the normalised update is projected back
(P.T @ ... or ... @ P), multiplied by `galore_scale`, reshaped to the weight and applied. P is
recomputed from the current gradient's SVD every `update_proj_gap` steps (at steps 0, gap, 2*gap,
... counted per weight); moments are kept across refreshes, as in the reference. Everything else
(BatchNorm affine, biases, the classifier, unselected convs) trains with the same optimizer
unprojected, as the reference does for non-targeted parameters.

Written here rather than imported: the `galore-torch` package imports transformers and
bitsandbytes on import and its projector takes 2-D gradients only. tests/test_methods.py checks
this projection against galore_torch's GaLoreProjector when that package is installed.

Nothing is injected, so there is nothing to fuse: the trained model already is the base
architecture (merge = a copy of it, zero inference overhead).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import EdgetoolError
from .base import AdaptationMethod, select_convs

if TYPE_CHECKING:
    from ..recipe import OptimConfig


def _matrix_shape(weight: torch.Tensor) -> tuple[int, int]:
    return weight.shape[0], weight[0].numel()


def orthogonal_basis(matrix: torch.Tensor, rank: int) -> tuple[str, torch.Tensor]:
    """('right', top-r rows of Vh) when rows >= cols, else ('left', top-r columns of U): the smaller side."""
    U, _, Vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    if matrix.shape[0] >= matrix.shape[1]:
        return "right", Vh[:rank].to(matrix.dtype)
    return "left", U[:, :rank].to(matrix.dtype)


def project(matrix: torch.Tensor, side: str, ortho: torch.Tensor) -> torch.Tensor:
    return matrix @ ortho.T if side == "right" else ortho.T @ matrix


def project_back(low_rank: torch.Tensor, side: str, ortho: torch.Tensor) -> torch.Tensor:
    return low_rank @ ortho if side == "right" else ortho @ low_rank


class GaLoreOptimizer(torch.optim.Optimizer):
    """Adam / AdamW / SGD-momentum whose param groups carrying a 'rank' key get GaLore projection.

    Unprojected groups follow torch.optim.Adam / AdamW / SGD(momentum) exactly. Per projected
    weight, state holds 'side', 'ortho' (the projection matrix), 'refreshes' (SVD count) and the
    optimizer moments in projected shape."""

    def __init__(self, params, kind: str = "adam", lr: float = 1e-3, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, momentum: float = 0.9):
        if kind not in ("adam", "adamw", "sgd"):
            raise ValueError(f"unknown optimizer kind {kind!r}")
        super().__init__(params, dict(kind=kind, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            kind, lr, wd = group["kind"], group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                state.setdefault("step", 0)
                if wd and kind == "adamw":
                    p.mul_(1 - lr * wd)  # decoupled decay on the full weight, as torch.optim.AdamW
                elif wd:
                    grad = grad.add(p, alpha=wd)  # L2 added to the gradient, as torch.optim.Adam / SGD

                projected = "rank" in group
                if projected:
                    matrix = grad.reshape(grad.shape[0], -1)
                    if "ortho" not in state or state["step"] % group["update_proj_gap"] == 0:
                        state["side"], state["ortho"] = orthogonal_basis(matrix, group["rank"])
                        state["refreshes"] = state.get("refreshes", 0) + 1
                    grad = project(matrix, state["side"], state["ortho"])

                state["step"] += 1
                if kind == "sgd":
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = grad.clone()
                    else:
                        buf.mul_(group["momentum"]).add_(grad)
                    update = buf
                else:
                    beta1, beta2 = group["betas"]
                    if "exp_avg" not in state:
                        state["exp_avg"] = torch.zeros_like(grad)
                        state["exp_avg_sq"] = torch.zeros_like(grad)
                    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                    exp_avg.lerp_(grad, 1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    bias1 = 1 - beta1 ** state["step"]
                    bias2 = 1 - beta2 ** state["step"]
                    update = (exp_avg / bias1) / (exp_avg_sq.sqrt() / math.sqrt(bias2) + group["eps"])

                if projected:
                    update = project_back(update, state["side"], state["ortho"]).reshape(p.shape) * group["scale"]
                p.add_(update, alpha=-lr)
        return loss


class GaLore(AdaptationMethod):
    description = "GaLore: full-rank weights, conv gradients projected to rank r (SVD refreshed every update_proj_gap steps)"

    def _inject(self, model: nn.Module, head_name: str | None) -> None:
        names = select_convs(model, self.cfg.layers, exclude={head_name} if head_name else set())  # fails early on a bad selection
        for p in model.parameters():
            p.requires_grad_(True)
        # The projection's rank is at most the gradient matrix's smaller side (orthogonal_basis keeps that many).
        self.note_rank_caps({n: min(self.cfg.rank, *_matrix_shape(model.get_submodule(n).weight)) for n in names})

    def projected_parameter_names(self, model: nn.Module) -> list[str]:
        """Trainable conv weights whose gradients are projected (the rest train unprojected)."""
        trainable = dict(self.trainable_parameters(model))
        names = [f"{n}.weight" for n in select_convs(model, self.cfg.layers)]
        return [n for n in names if n in trainable]

    def build_optimizer(self, model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
        projected = set(self.projected_parameter_names(model))
        params = self.trainable_parameters(model)
        groups = [
            {"params": [p for n, p in params if n in projected], "rank": self.cfg.rank,
             "update_proj_gap": self.cfg.update_proj_gap, "scale": self.cfg.galore_scale},
            {"params": [p for n, p in params if n not in projected]},
        ]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise EdgetoolError("method 'galore' found no trainable parameter to optimise")
        return GaLoreOptimizer(groups, kind=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)
