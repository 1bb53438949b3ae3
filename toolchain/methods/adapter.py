"""Residual bottleneck adapters (Houlsby et al. 2019; Rebuffi et al. 2017 for convnets) after convs.

    y = conv(x);  out = y + U(act(D(y)))
D: 1x1 conv C_out -> b (b = max(1, C_out // adapter_reduction)), default init; U: 1x1 conv b -> C_out,
zero-initialised so the adapted model equals the base at step 0. D and U have no bias, so the
linear variant also folds into bias-free convs.

adapter_kind 'nonlinear' (act = ReLU): cannot be folded into the conv; exported, it keeps two extra
convs and a ReLU per adapted layer, so it is not mergeable and `merge` refuses with that reason.

adapter_kind 'linear' (act = identity): out = (I + U D) y, so per kernel tap W' = (I + U D) W and
b' = (I + U D) b. The mixing matrix acts across all C_out channels, which a grouped/depthwise conv's
weight cannot express, so the linear variant is placed only after groups=1 convs of the selection
(grouped ones are skipped and listed in `skipped_layers`; a selection with none left is an error).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import EdgetoolError, NotMergeableError
from ..models.backbones import set_submodule
from .base import AdaptationMethod, AdapterLayer, select_convs


class BottleneckAdapter(AdapterLayer):
    """Nonlinear residual bottleneck after `base`; not mergeable."""

    mergeable = False

    def __init__(self, base: nn.Module, reduction: int):
        super().__init__(base)
        channels = base.out_channels
        self.bottleneck = max(1, channels // reduction)
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        conv_type = type(base)
        self.down = conv_type(channels, self.bottleneck, 1, bias=False, **kw)
        self.up = conv_type(self.bottleneck, channels, 1, bias=False, **kw)
        nn.init.zeros_(self.up.weight)

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        return torch.relu(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.up(self.activation(self.down(y)))

    def delta_weight(self) -> torch.Tensor:
        raise NotMergeableError(f"{type(self).__name__}: the ReLU between the adapter's 1x1 convs does not fold into the conv weight, "
                                 "so the adapter would stay in the exported graph and add inference cost")

    def extra_repr(self) -> str:
        return f"bottleneck={self.bottleneck}"


class LinearBottleneckAdapter(BottleneckAdapter):
    """Linear residual bottleneck (no activation): folds into a groups=1 conv."""

    mergeable = True

    def __init__(self, base: nn.Module, reduction: int):
        if base.groups != 1:
            raise EdgetoolError(f"the linear adapter folds only into groups=1 convs; this {type(base).__name__} has groups={base.groups}")
        super().__init__(base, reduction)

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def mixing(self) -> torch.Tensor:
        """U @ D in float64, (C_out, C_out)."""
        up = self.up.weight.detach().double().flatten(1)
        down = self.down.weight.detach().double().flatten(1)
        return up @ down

    def delta_weight(self) -> torch.Tensor:
        weight = self.base.weight.detach().double()
        return torch.tensordot(self.mixing(), weight, dims=([1], [0]))  # (U D) W, tap by tap

    def merged_bias(self) -> torch.Tensor | None:
        if self.base.bias is None:
            return None
        bias = self.base.bias.detach().double()
        return bias + self.mixing() @ bias


class Adapter(AdaptationMethod):
    description = "residual bottleneck adapter after convs (1x1 down, ReLU, 1x1 up); linear variant is fusable"
    mergeable = False  # the default nonlinear kind; an instance with adapter_kind 'linear' says True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.mergeable = cfg.adapter_kind == "linear"  # instance-level: depends on the recipe
        self.skipped_layers: list[str] = []

    def _inject(self, model: nn.Module, head_name: str | None) -> None:
        names = select_convs(model, self.cfg.layers, exclude={head_name} if head_name else set())
        layer_type = BottleneckAdapter
        if self.cfg.adapter_kind == "linear":
            layer_type = LinearBottleneckAdapter
            self.skipped_layers = [n for n in names if model.get_submodule(n).groups != 1]
            names = [n for n in names if n not in self.skipped_layers]
            if not names:
                raise EdgetoolError(
                    f"recipe field 'method.layers': {self.cfg.layers!r} selects only grouped/depthwise convs; "
                    "the linear adapter folds only into groups=1 convs"
                )
        for n in names:
            set_submodule(model, n, layer_type(model.get_submodule(n), self.cfg.adapter_reduction))

    def merge(self, model: nn.Module) -> nn.Module:
        if not self.mergeable:
            layers = [m for m in model.modules() if isinstance(m, BottleneckAdapter)]
            extra = sum(p.numel() for m in layers for p in (m.down.weight, m.up.weight))
            raise NotMergeableError(
                f"method 'adapter' (nonlinear) cannot be fused: the ReLU between each adapter's 1x1 convs does not fold "
                f"into the conv weights, so the exported graph would keep {2 * len(layers)} extra convs and {len(layers)} "
                f"ReLUs ({extra} extra weights) and their inference cost; use adapter_kind: linear, ttlora, lora or dora"
            )
        return super().merge(model)
