"""Fine-tuning baselines that change existing parameters in place (nothing to inject, trivially
fusable: the trained model already is the base architecture)."""

from __future__ import annotations

from torch import nn

from .base import BN_TYPES, AdaptationMethod, register_method


@register_method
class FullFineTune(AdaptationMethod):
    name = "full"
    description = "all parameters"

    def _inject(self, model: nn.Module, head_name: str | None) -> None:
        for p in model.parameters():
            p.requires_grad_(True)


@register_method
class HeadOnly(AdaptationMethod):
    name = "head"
    description = "classifier only"

    def _inject(self, model: nn.Module, head_name: str | None) -> None:
        if head_name is None:
            raise ValueError("method 'head' needs the classifier's name")
        for p in model.get_submodule(head_name).parameters():
            p.requires_grad_(True)


@register_method
class BatchNormOnly(AdaptationMethod):
    name = "bn"
    description = "BatchNorm affine parameters only"

    def _inject(self, model: nn.Module, head_name: str | None) -> None:
        for m in model.modules():
            if isinstance(m, BN_TYPES):
                for p in m.parameters():
                    p.requires_grad_(True)


@register_method
class BiasOnly(AdaptationMethod):
    name = "bias"
    description = "biases only (BitFit); BatchNorm shifts count as biases"

    def _inject(self, model: nn.Module, head_name: str | None) -> None:
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.requires_grad_(True)
