"""Fine-tuning baselines that change existing parameters in place (nothing to inject, trivially
fusable: the trained model already is the base architecture)."""

from __future__ import annotations

from torch import nn

from ..errors import EdgetoolError
from .base import BN_TYPES, AdaptationMethod


class FullFineTune(AdaptationMethod):
    description = "all parameters"

    def _inject(self, model: nn.Module, head_name: str | None) -> None:
        for p in model.parameters():
            p.requires_grad_(True)


class HeadOnly(AdaptationMethod):
    description = "classifier only"

    def _inject(self, model: nn.Module, head_name: str | None) -> None:
        if head_name is None:
            raise EdgetoolError("method 'head' needs the classifier's module name (recipe field 'model.head')")
        for p in model.get_submodule(head_name).parameters():
            p.requires_grad_(True)


class BatchNormOnly(AdaptationMethod):
    description = "BatchNorm affine parameters only"

    def _inject(self, model: nn.Module, head_name: str | None) -> None:
        for m in model.modules():
            if isinstance(m, BN_TYPES):
                for p in m.parameters():
                    p.requires_grad_(True)


class BiasOnly(AdaptationMethod):
    description = "biases only (BitFit): conv/linear biases and BatchNorm shifts (beta)"

    def _inject(self, model: nn.Module, head_name: str | None) -> None:
        # BitFit trains every bias term; a BatchNorm's beta is its `bias` parameter, so it is included.
        for n, p in model.named_parameters():
            if n.rpartition(".")[2] == "bias":
                p.requires_grad_(True)
