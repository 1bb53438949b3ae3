"""Backbones and model plumbing: the built-in HAR CNNs (plain Conv1d/BatchNorm1d/Linear so export
stays clean), bring-your-own factories and classifier-head handling."""

from __future__ import annotations

import importlib
import os
from typing import Iterable

import torch
from torch import nn

from ..errors import EdgetoolError, first_line
from ..recipe import ModelConfig

CONV_TYPES = (nn.Conv1d, nn.Conv2d)


class ResidualBlock1d(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernels: tuple[int, ...] = (7, 5, 3)):
        super().__init__()
        layers: list[nn.Module] = []
        c = c_in
        for i, k in enumerate(kernels):
            layers += [nn.Conv1d(c, c_out, k, padding=k // 2, bias=False), nn.BatchNorm1d(c_out)]
            if i < len(kernels) - 1:
                layers.append(nn.ReLU())
            c = c_out
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(nn.Conv1d(c_in, c_out, 1, bias=False), nn.BatchNorm1d(c_out))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class ResNet1d(nn.Module):
    """T-ResNet-style HAR backbone (Wang et al. 2017 time-series ResNet): three residual blocks."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            ResidualBlock1d(in_channels, width), ResidualBlock1d(width, 2 * width), ResidualBlock1d(2 * width, 2 * width)
        )
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


class InvertedResidual1d(nn.Module):
    """MobileNetV2 block: 1x1 expand -> depthwise k -> 1x1 project (linear bottleneck)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int, kernel: int = 5):
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        self.block = nn.Sequential(
            nn.Conv1d(c_in, hidden, 1, bias=False), nn.BatchNorm1d(hidden), nn.ReLU6(),
            nn.Conv1d(hidden, hidden, kernel, stride=stride, padding=kernel // 2, groups=hidden, bias=False),
            nn.BatchNorm1d(hidden), nn.ReLU6(),
            nn.Conv1d(hidden, c_out, 1, bias=False), nn.BatchNorm1d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNet1d(nn.Module):
    """MobileNetV2-style depthwise-separable HAR backbone."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv1d(in_channels, w, 5, padding=2, bias=False), nn.BatchNorm1d(w), nn.ReLU6())
        self.features = nn.Sequential(
            InvertedResidual1d(w, w, 1, 2), InvertedResidual1d(w, 2 * w, 2, 4),
            InvertedResidual1d(2 * w, 2 * w, 1, 4), InvertedResidual1d(2 * w, 2 * w, 2, 4),
        )
        self.head_conv = nn.Sequential(nn.Conv1d(2 * w, 4 * w, 1, bias=False), nn.BatchNorm1d(4 * w), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.head_conv(self.features(self.stem(x)))).flatten(1))


BUILTIN = {"resnet1d": ResNet1d, "mobilenet1d": MobileNet1d}


# A factory is code: one named by a recipe inside a run or engine directory (an artifact that may come
# from another machine) is imported only when this machine's user trusts its module, by --trust-factory
# or this variable (comma-separated), the way `trust_remote_code` gates a model repository's code.
TRUST_ENV = "EDGETOOL_TRUST_FACTORY"


def trusted_factory(spec: str, trusted: Iterable[str] = ()) -> bool:
    """Whether factory `spec` ('package.module:function') is trusted by an entry of `trusted` or of
    $EDGETOOL_TRUST_FACTORY: 'package.module:function' trusts that factory, 'package.module' that module
    and 'package' every module under it."""
    module = spec.partition(":")[0]
    entries = [*trusted, *os.environ.get(TRUST_ENV, "").split(",")]
    for entry in (e.strip() for e in entries):
        if entry and (entry == spec or entry == module or module.startswith(entry + ".")):
            return True
    return False


def check_factory_trusted(cfg: ModelConfig, origin: str, trusted: Iterable[str] = ()) -> None:
    """Refuse (exit 2) a factory named by `origin` (a recipe that arrived inside a run or engine
    directory) unless the user trusts its module here: nothing is imported before this passes."""
    if cfg.arch != "factory" or not cfg.factory or trusted_factory(cfg.factory, trusted):
        return
    module = cfg.factory.partition(":")[0]
    raise EdgetoolError(f"{origin} names model factory '{cfg.factory}': importing it runs module '{module}''s code, and "
                        f"a run or engine directory may come from anywhere; if you trust it on this machine, pass "
                        f"--trust-factory {module} (or set {TRUST_ENV}={module})")


def _import_factory(spec: str):
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # user code: ImportError, or whatever its import raises (e.g. a broken extension)
        raise EdgetoolError(f"recipe field 'model.factory': cannot import module '{module_name}' "
                            f"({type(exc).__name__}: {first_line(exc)})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise EdgetoolError(f"recipe field 'model.factory': '{module_name}' has no callable '{attr}'")
    return fn


def model_name(cfg: ModelConfig) -> str:
    """What to call the model in messages: the built-in's name, or the factory's callable and its
    kwargs' arch-like values (`torchvision.models:resnet18`, `zoo:build(arch=mnasnet0_5)`)."""
    if cfg.arch != "factory":
        return cfg.arch
    named = [f"{k}={v}" for k, v in cfg.kwargs.items() if isinstance(v, str)]
    return cfg.factory + (f"({', '.join(named)})" if named else "")


def build_model(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    """A fresh (untrained) base model for `num_classes` outputs."""
    if cfg.arch == "factory":
        try:
            model = _import_factory(cfg.factory)(**cfg.kwargs)
        except EdgetoolError:
            raise
        except Exception as exc:  # user code: report, don't trace
            raise EdgetoolError(f"model factory {cfg.factory} failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(model, nn.Module):
            raise EdgetoolError(f"model factory {cfg.factory} returned {type(model).__name__}, not an nn.Module")
    else:
        try:
            model = BUILTIN[cfg.arch](in_channels, num_classes, width=cfg.width, **cfg.kwargs)
        except TypeError as exc:  # an unknown or duplicate keyword in model.kwargs
            raise EdgetoolError(
                f"recipe field 'model.kwargs': {cfg.arch} does not accept {sorted(cfg.kwargs)} ({exc})") from None
    head_name, head = find_head(model, cfg.head)
    if head_outputs(head) != num_classes:
        # Without model.head the head is a guess (the last nn.Linear, else the last conv), so say how to name it.
        hint = "" if cfg.head else "; if it is not the classifier, set model.head to the classifier's module name"
        raise EdgetoolError(f"model head '{head_name}' has {head_outputs(head)} outputs but the source domain has "
                            f"{num_classes} classes{hint}")
    return model


HEAD_TYPES = (nn.Linear, *CONV_TYPES)


def head_outputs(head: nn.Module) -> int:
    """Classes a head scores: a Linear's out_features, a conv classifier's (SqueezeNet's 1x1) out_channels."""
    return head.out_features if isinstance(head, nn.Linear) else head.out_channels


def find_head(model: nn.Module, name: str | None = None) -> tuple[str, nn.Module]:
    """The classifier: `name`'s module (an nn.Linear or a Conv1d/Conv2d), else the last nn.Linear registered,
    else, in a model without one (SqueezeNet), the last conv registered."""
    if name is not None:
        module = dict(model.named_modules()).get(name)
        if module is None:
            raise EdgetoolError(f"recipe field 'model.head': the model has no module '{name}'")
        if not isinstance(module, HEAD_TYPES):
            raise EdgetoolError(f"recipe field 'model.head': '{name}' is a {type(module).__name__}, not an nn.Linear, "
                                "nn.Conv1d or nn.Conv2d classifier")
        return name, module
    modules = list(model.named_modules())
    candidates = ([(n, m) for n, m in modules if isinstance(m, nn.Linear)]
                  or [(n, m) for n, m in modules if isinstance(m, CONV_TYPES)])
    if not candidates:
        raise EdgetoolError("the model has no nn.Linear or conv layer to use as its classifier head")
    return candidates[-1]


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def extend_head(model: nn.Module, head_name: str, num_classes: int) -> None:
    """New-classes scenario: grow the classifier (an nn.Linear or a conv) to `num_classes`, keeping the source
    rows (output channels); new rows start at zero so the source classes' decisions are unchanged at step 0."""
    head = model.get_submodule(head_name)
    outputs = head_outputs(head)
    if outputs == num_classes:
        return
    if outputs > num_classes:
        raise EdgetoolError(f"head has {outputs} outputs, more than the {num_classes} target classes")
    if isinstance(head, nn.Linear):
        new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    elif head.groups != 1:
        # Each group's outputs see only that group's inputs: a new class would belong to one group.
        raise EdgetoolError(f"cannot grow the grouped conv head '{head_name}' (groups={head.groups}) for new classes; "
                            "use a model whose classifier is an nn.Linear or a groups=1 conv")
    else:
        new = type(head)(head.in_channels, num_classes, head.kernel_size, stride=head.stride, padding=head.padding,
                         dilation=head.dilation, bias=head.bias is not None, padding_mode=head.padding_mode)
    new = new.to(device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:outputs] = head.weight
        if head.bias is not None:
            new.bias.fill_(head.bias.min().item() if outputs else 0.0)
            new.bias[:outputs] = head.bias
    new.train(head.training)
    set_submodule(model, head_name, new)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
