"""The adaptation-method interface. Every method (TT-LoRA and the PEFT baselines) implements it, so
training, fusion and export never special-case a method.

Two pieces, after HF PEFT's tuner/layer split:
- `AdapterLayer` wraps one frozen base module and knows its own `delta_weight()` and `merge()`.
- `AdaptationMethod` injects layers into a model, says what trains, builds the optimizer, saves and
  loads the adapter-only state, and merges (or refuses to) back into the base architecture.
"""

from __future__ import annotations

import copy
import fnmatch
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..errors import EdgetoolError, NotMergeableError
from ..models.backbones import CONV_TYPES, set_submodule
from ..models.checkpoints import detached_state, load_state

if TYPE_CHECKING:
    from ..recipe import OptimConfig
    from .settings import MethodSettings

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


class AdapterLayer(nn.Module):
    """Wraps `base` (kept frozen). A mergeable layer's forward equals `merge()`'s module's forward."""

    mergeable: ClassVar[bool] = True

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def delta_weight(self) -> torch.Tensor:
        """The update to `base.weight`, in float64, shaped like it."""
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight.detach().double() + self.delta_weight()

    def merged_bias(self) -> torch.Tensor | None:
        return None if self.base.bias is None else self.base.bias.detach().double()

    def merge(self) -> nn.Module:
        """A plain copy of the base module carrying W' (computed in float64, cast to W's dtype)."""
        if not self.mergeable:
            raise NotMergeableError(f"{type(self).__name__} cannot be fused into {type(self.base).__name__}: "
                                    "its extra modules would stay in the exported graph and add inference cost")
        fused = copy.deepcopy(self.base)
        with torch.no_grad():
            fused.weight.copy_(self.merged_weight().to(fused.weight.dtype))
            bias = self.merged_bias()
            if bias is not None:
                if fused.bias is None:
                    raise NotMergeableError(f"{type(self).__name__} produces a bias but the base layer has none")
                fused.bias.copy_(bias.to(fused.bias.dtype))
        for p in fused.parameters():
            p.requires_grad_(False)
        return fused

    def unload(self) -> nn.Module:
        return self.base


def conv_forward(conv: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Run `conv` with another weight; `_conv_forward` keeps stride/padding/padding_mode/groups."""
    return conv._conv_forward(x, weight, bias)


def select_convs(model: nn.Module, layers: str | list[str], exclude: set[str] = frozenset()) -> list[str]:
    """Names of the convs a recipe targets: 'all', 'pointwise' (1x1, groups=1), or fnmatch patterns."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, CONV_TYPES) and n not in exclude]
    if layers == "all":
        chosen = [n for n, _ in convs]
    elif layers == "pointwise":
        chosen = [n for n, m in convs if all(k == 1 for k in m.kernel_size) and m.groups == 1]
    else:
        chosen = [n for n, _ in convs if any(fnmatch.fnmatchcase(n, pat) for pat in layers)]
    if not chosen:
        raise EdgetoolError(f"recipe field 'method.layers': {layers!r} matched no Conv1d/Conv2d layer in the model")
    return chosen


class AdaptationMethod:
    mergeable: ClassVar[bool] = True
    description: ClassVar[str] = ""

    def __init__(self, cfg: MethodSettings):
        self.cfg = cfg
        # One-line remarks from inject (e.g. a rank capped per layer) for the stages to print.
        self.notes: list[str] = []

    @property
    def name(self) -> str:
        return self.cfg.name

    # ---- injection ------------------------------------------------------------------------------
    def inject(self, model: nn.Module, head_name: str | None = None, train_head: bool | None = None) -> nn.Module:
        """Freeze everything, let the method wrap/unfreeze its part, then unfreeze the head if asked.
        Modifies `model` in place and returns it."""
        for p in model.parameters():
            p.requires_grad_(False)
        self._inject(model, head_name)
        if (self.cfg.train_head if train_head is None else train_head) and head_name is not None:
            for p in model.get_submodule(head_name).parameters():
                p.requires_grad_(True)
        if not any(p.requires_grad for p in model.parameters()):
            raise EdgetoolError(f"method '{self.name}' left no trainable parameter in this model")
        return model

    def _inject(self, model: nn.Module, head_name: str | None) -> None:
        raise NotImplementedError

    def note_rank_caps(self, used: dict[str, int]) -> None:
        """Say where the recipe's rank is more than a layer can use: `used` maps each adapted layer to the
        rank it got. A larger rank would only add parameters that reach nothing new, so it is capped."""
        requested = self.cfg.rank
        capped = [(n, r) for n, r in used.items() if r < requested]
        if not capped:
            return
        listed = ", ".join(f"{n} -> {r}" for n, r in capped[:6]) + (f", ... ({len(capped)} in all)" if len(capped) > 6 else "")
        self.notes.append(f"method.rank {requested} is more than {len(capped)} of {len(used)} adapted layer(s) can use; "
                          f"capped (layer -> rank used): {listed}")

    def wrap_convs(self, model: nn.Module, make_layer, head_name: str | None = None) -> list[str]:
        names = select_convs(model, self.cfg.layers, exclude={head_name} if head_name else set())
        for n in names:
            set_submodule(model, n, make_layer(model.get_submodule(n)))
        return names

    # ---- training -------------------------------------------------------------------------------
    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def build_optimizer(self, model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
        params = [p for _, p in self.trainable_parameters(model)]
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
        cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def set_train_mode(self, model: nn.Module) -> None:
        """Train mode, except BatchNorm stays in eval (frozen statistics) unless the recipe says 'stats'."""
        model.train()
        if self.cfg.bn == "frozen":
            for m in model.modules():
                if isinstance(m, BN_TYPES):
                    m.eval()

    # ---- adapter state --------------------------------------------------------------------------
    def adapter_state_keys(self, model: nn.Module) -> list[str]:
        """State-dict keys of the update: trainable parameters, the adapter layers' own tensors
        (frozen TT cores included, so a device never re-derives them), and BN statistics when they update."""
        keys = {n for n, _ in self.trainable_parameters(model)}
        for mod_name, mod in model.named_modules():
            if isinstance(mod, AdapterLayer):
                prefix = f"{mod_name}." if mod_name else ""
                keys |= {prefix + k for k in mod.state_dict() if not k.startswith("base.")}
            if self.cfg.bn == "stats" and isinstance(mod, BN_TYPES):
                prefix = f"{mod_name}." if mod_name else ""
                keys |= {prefix + k for k in mod.state_dict() if k.startswith("running_") or k == "num_batches_tracked"}
        return sorted(keys)

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # On the CPU whatever device trained it, so fuse-export and verify load it anywhere; with the model's
        # state-dict metadata (module versions), which some modules' loaders need.
        return detached_state(model, self.adapter_state_keys(model))

    def load_adapter_state(self, model: nn.Module, adapter: dict[str, torch.Tensor]) -> None:
        own = model.state_dict()
        expected = set(self.adapter_state_keys(model))
        # Only the update's own keys: an adapter must never overwrite base weights it was not trained on.
        unknown = sorted(set(adapter) - expected)
        missing = sorted(expected - set(adapter))
        if unknown or missing:
            detail = f"unexpected {unknown[:3]}" if unknown else f"missing {missing[:3]}"
            raise EdgetoolError(f"adapter checkpoint does not fit this model and method '{self.name}': {detail}")
        for k, v in adapter.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise EdgetoolError(f"adapter checkpoint does not fit this model: '{k}' is {tuple(v.shape)}, model has {tuple(own[k].shape)}")
        load_state(model, adapter, strict=False)

    # ---- fusion ---------------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> nn.Module:
        """A new model of the base architecture with every adapter folded into its layer's weights."""
        blocking = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer) and not m.mergeable]
        if not self.mergeable or blocking:
            where = f" (layer {blocking[0]})" if blocking else ""
            raise NotMergeableError(
                f"method '{self.name}' cannot be fused{where}: its extra modules would stay in the exported graph "
                "and add inference cost; use a fusable method (e.g. ttlora, lora, dora, or adapter_kind: linear)"
            )
        return self._replace_layers(model, lambda layer: layer.merge())

    def unload(self, model: nn.Module) -> nn.Module:
        """The base model without any adapter (the update discarded)."""
        return self._replace_layers(model, lambda layer: copy.deepcopy(layer.unload()))

    @staticmethod
    def _replace_layers(model: nn.Module, fn) -> nn.Module:
        out = copy.deepcopy(model)
        layers = [(n, m) for n, m in out.named_modules() if isinstance(m, AdapterLayer)]
        for n, m in layers:
            set_submodule(out, n, fn(m))
        for p in out.parameters():
            p.requires_grad_(False)
        return out.eval()

