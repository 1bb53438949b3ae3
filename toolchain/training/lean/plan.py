"""Which modules of a model the lean step treats, and the context manager that routes their forward
through toolchain.training.lean.functions and restores it."""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ...methods.base import BN_TYPES
from ...methods.ttlora import TTLoRAConv

from .functions import RELU, RELU6, LayerSpec, LeanActivation, LeanLayer, bn_scale, contracted_cores
from .geometry import CONV_CLASSES, ConvGeometry
from .precision import autocast_off


# ---------------------------------------------------------------------------------------------- eligibility


def _plain_forward_of(m: nn.Module, cls: type) -> bool:
    """`m` is a `cls` whose forward is the stock one (a subclass with its own forward is unknown)."""
    return isinstance(m, cls) and type(m).forward is cls.forward


def _is_conv(m: nn.Module) -> bool:
    return any(_plain_forward_of(m, c) for c in CONV_CLASSES)


def _is_frozen_conv(m: nn.Module) -> bool:
    return _is_conv(m) and not m.weight.requires_grad


def _is_ttlora(m: nn.Module) -> bool:
    return (_plain_forward_of(m, TTLoRAConv) and _is_frozen_conv(m.base)
            and not any(c.requires_grad for c in m.frozen_cores()))


def _is_bn(m: nn.Module) -> bool:
    """A BatchNorm whose scale is frozen (eval mode and running statistics are checked per call)."""
    return any(_plain_forward_of(m, c) for c in BN_TYPES) and (m.weight is None or not m.weight.requires_grad)


def _act_kind(m: nn.Module) -> str | None:
    if _plain_forward_of(m, nn.ReLU):
        return RELU
    if isinstance(m, nn.ReLU6) and type(m).forward is nn.Hardtanh.forward and m.min_val == 0 and m.max_val == 6:
        return RELU6
    return None


def _has_hooks(m: nn.Module) -> bool:
    return any(getattr(m, name, None) for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                    "_backward_pre_hooks"))


def _global_hooks() -> bool:
    mod = nn.modules.module
    return any(getattr(mod, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                      "_global_backward_hooks", "_global_backward_pre_hooks"))


# ---------------------------------------------------------------------------------------------- units


class Unit:
    """A conv (frozen, or TT-LoRA on a frozen conv) and/or an eval BatchNorm and/or a ReLU(6), run as
    one autograd node when `usable`, else as the modules themselves (`fused`: each module called, so its
    own hooks and overrides apply; single: the module's class forward, we are inside its call).
    What does not change between steps (geometry, parameter lists) is worked out once, here."""

    def __init__(self, head: nn.Module | None, bn: nn.Module | None, act: nn.Module | None,
                 frozen_backbone: bool, fused: bool = False):
        self.head, self.bn, self.act = head, bn, act
        self.frozen_backbone, self.fused = frozen_backbone, fused
        self.consumer: Unit | None = None  # the next step of the Sequential, when it is a unit
        self.members = [m for m in (head, bn, act) if m is not None]
        self.params = [p for m in self.members for p in m.parameters()]
        self.ttlora = head if isinstance(head, TTLoRAConv) else None
        self.conv = head.base if self.ttlora is not None else head
        self.act_kind = _act_kind(act) if act is not None else None
        if self.conv is not None:
            self.geometry = ConvGeometry.of(self.conv)
            self.kernel = tuple(self.conv.kernel_size)
            self.bn_dims = self.conv.weight.dim()
        else:
            self.bn_dims = None

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            m = self.members[0]
            return type(m).forward(m, x)
        for m in self.members:
            x = m(x)
        return x

    def usable(self, x: torch.Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        conv = self.conv
        if conv is not None and (conv.weight.requires_grad or x.dim() != self.bn_dims or x.shape[1] != conv.in_channels):
            return False
        if self.ttlora is not None and any(c.requires_grad for c in self.ttlora.frozen_cores()):
            return False
        bn = self.bn
        if bn is not None:
            channels = x.shape[1] if conv is None else conv.out_channels
            dims = x.dim()
            if (bn.training or bn.running_mean is None or bn.running_var is None or channels != bn.num_features
                    or (bn.weight is not None and bn.weight.requires_grad)
                    or dims not in ((2, 3) if isinstance(bn, nn.BatchNorm1d) else (4,))):
                return False
        return x.requires_grad or any(p.requires_grad for p in self.params)

    def saves_input(self, x_shape: torch.Size) -> bool:
        """Whether running this unit on an input of `x_shape` keeps the input for backward."""
        return self.ttlora is not None and self._save_input(x_shape)

    def _save_input(self, x_shape: torch.Size) -> bool:
        side = self.conv.groups * self.ttlora.g1.shape[1]
        for s in self.geometry.out_sizes(x_shape, self.kernel):
            side *= s
        whole = self.conv.in_channels
        for s in x_shape[2:]:
            whole *= s
        return side >= whole  # a tie goes to the input: its backward is one stock conv backward

    def _keep_output(self, y_shape) -> bool:
        if self.act is None:
            return False
        if self.consumer is not None:
            return self.consumer.saves_input(y_shape)
        # Unknown reader: in a frozen backbone it is a lean layer that keeps nothing of its input;
        # otherwise assume it saves its input (a trainable conv does) and share that tensor.
        return not self.frozen_backbone

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.usable(x):
            return self.plain(x)
        bn, conv = self.bn, self.conv
        scale = bn_scale(bn) if bn is not None else None
        bn_args = (bn.running_mean, bn.running_var, bn.weight, bn.bias) if bn is not None else (None,) * 4
        eps = bn.eps if bn is not None else None
        if conv is None:
            spec = LayerSpec(None, eps, self.act_kind, self._keep_output(x.shape), False)
            return LeanLayer.apply(x, None, None, None, scale, *bn_args, None, None, None, spec)
        geo = self.geometry
        delta = g1 = k = k_side = None
        save_input = False
        if self.ttlora is not None:
            # Delta W exactly as TTLoRAConv forms it, in the weight's dtype (autocast casts the conv, not
            # this product); G1's gradient comes from the side path, so no graph.
            with torch.no_grad(), autocast_off(x.device.type):
                delta = self.ttlora._delta(conv.weight.dtype)
            g1 = self.ttlora.g1
            k, k_side = contracted_cores(self.ttlora)
            save_input = self._save_input(x.shape)
        keep = False
        if self.act_kind is not None:
            keep = self._keep_output((x.shape[0], conv.out_channels, *geo.out_sizes(x.shape, self.kernel)))
        spec = LayerSpec(geo, eps, self.act_kind, keep, save_input)
        return LeanLayer.apply(x, conv.weight, delta, conv.bias, scale, *bn_args, g1, k, k_side, spec)


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class LeanPlan:
    """What `lean_training` changed: module name -> treatment, and the fused Sequential runs
    (a treatment applies at run time only while its conditions hold, e.g. BatchNorm in eval mode)."""

    treatments: dict[str, str] = field(default_factory=dict)
    fused: list[list[str]] = field(default_factory=list)
    frozen_backbone: bool = False
    _patched: list[nn.Module] = field(default_factory=list, repr=False)

    def restore(self) -> None:
        for m in self._patched:
            m.__dict__.pop("forward", None)
        self._patched.clear()

    def _override(self, m: nn.Module, fn: Callable) -> None:
        m.forward = fn
        self._patched.append(m)


def _activation_forward(m: nn.Module, kind: str) -> Callable:
    cls_forward = type(m).forward
    inplace = bool(getattr(m, "inplace", False))

    def forward(x):
        if torch.is_grad_enabled() and x.requires_grad:
            return LeanActivation.apply(x, kind, inplace)
        return cls_forward(m, x)
    return forward


def _sequential_forward(steps: list) -> Callable:
    def forward(x):
        for step in steps:
            x = step(x)
        return x
    return forward


# model -> (signature, (treatments, fused, frozen_backbone, [(weakref to module, forward)])): planning walks
# and classifies every module, which costs more than a small model's forward; the signature (module
# identities, hooks, which parameters train) says when a stored plan no longer fits.
_PLAN_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _signature(named: list[tuple[str, nn.Module]]) -> tuple:
    hook_names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    parts = [_global_hooks()]
    for n, m in named:
        d = m.__dict__
        parts.append((n, id(m), "forward" in d, any(d.get(h) for h in hook_names),
                      tuple(p is not None and p.requires_grad for p in d["_parameters"].values())))
    return tuple(parts)


def plan_lean(model: nn.Module) -> LeanPlan:
    """Override the forward of every eligible module of `model` (see the module docstring); undo with
    `plan.restore()`. `lean_training` is the safe way to use it."""
    named = list(model.named_modules())
    signature = _signature(named)
    hit = _PLAN_CACHE.get(model)
    if hit is None or hit[0] != signature or any(ref() is None for ref, _ in hit[1][3]):
        hit = (signature, _build_plan(named))
        if not any(ref() is model for ref, _ in hit[1][3]):  # a stored override of the model itself would keep it alive
            _PLAN_CACHE[model] = hit
    treatments, fused, frozen_backbone, overrides = hit[1]
    plan = LeanPlan(dict(treatments), [list(f) for f in fused], frozen_backbone)
    try:
        for ref, fn in overrides:
            plan._override(ref(), fn)
    except BaseException:
        plan.restore()
        raise
    return plan


def _build_plan(named_all: list[tuple[str, nn.Module]]) -> tuple:
    named = [(n, m) for n, m in named_all if "forward" not in m.__dict__]
    names = {m: n for n, m in named}
    frozen_backbone = not any(m.weight.requires_grad for _, m in named
                              if isinstance(m, CONV_CLASSES) and m.weight is not None)
    treatments: dict[str, str] = {}
    fused: list[list[str]] = []
    overrides: list[tuple[weakref.ref, Callable]] = []
    units: dict[nn.Module, Unit] = {}
    inside_ttlora = {m.base for _, m in named if isinstance(m, TTLoRAConv)}
    for n, m in named:
        if m in inside_ttlora:
            continue  # TTLoRAConv's lean forward never calls its base module
        kind = None
        if _is_ttlora(m):
            kind = "ttlora"
        elif _is_frozen_conv(m):
            kind = "frozen-conv"
        elif _is_bn(m):
            kind = "eval-bn-affine"
        elif frozen_backbone and _act_kind(m):
            # A mask is a win only when whatever reads the output does not keep it: in a frozen backbone
            # the readers are lean layers; otherwise stand-alone activations are left alone.
            kind = f"{_act_kind(m)}-mask"
            overrides.append((weakref.ref(m), _activation_forward(m, _act_kind(m))))
        if kind is None:
            continue
        treatments[n] = kind
        if kind != f"{_act_kind(m)}-mask":
            is_bn = kind == "eval-bn-affine"
            unit = units[m] = Unit(None if is_bn else m, m if is_bn else None, None, frozen_backbone)
            overrides.append((weakref.ref(m), unit.__call__))
    if _global_hooks():
        # fusing would skip them; the per-module overrides still run inside each module's __call__
        return treatments, fused, frozen_backbone, overrides
    plans: dict[nn.Module, list] = {}  # Sequential -> its steps (units and modules), in order
    parent: dict[nn.Module, tuple[nn.Module, int]] = {}  # Sequential -> (the Sequential holding it, its step)
    for _, seq in named:
        # nn.Sequential or a subclass that keeps its forward (torchvision's Conv2dNormActivation is one)
        if not (isinstance(seq, nn.Sequential) and type(seq).forward is nn.Sequential.forward) or _has_hooks(seq):
            continue
        children = list(seq)
        steps: list = []
        i = 0
        while i < len(children):
            j = i
            head = children[j] if (_is_ttlora(children[j]) or _is_frozen_conv(children[j])) else None
            j += head is not None
            bn = children[j] if j < len(children) and _is_bn(children[j]) else None
            j += bn is not None
            act = children[j] if j < len(children) and _act_kind(children[j]) else None
            j += act is not None
            members = [m for m in (head, bn, act) if m is not None]
            if len(members) >= 2 and not any(_has_hooks(m) or m not in names for m in members):
                steps.append(Unit(head, bn, act, frozen_backbone, fused=True))
                fused.append([names[m] for m in members])
                i = j
            else:
                steps.append(children[i])
                i += 1
        plans[seq] = steps
    for seq, steps in plans.items():
        for k, step in enumerate(steps):
            if isinstance(step, nn.Module) and step in plans:
                parent[step] = (seq, k)

    def entry(step) -> Unit | None:
        """The unit that first reads what flows into `step`, when known."""
        if isinstance(step, Unit):
            return step
        if step in units:
            return units[step]
        return entry(plans[step][0]) if plans.get(step) else None

    def reader(seq: nn.Module, k: int) -> Unit | None:
        """The unit that reads the output of step k of `seq`, looking through nested Sequentials."""
        if k + 1 < len(plans[seq]):
            return entry(plans[seq][k + 1])
        return reader(*parent[seq]) if seq in parent else None

    for seq, steps in plans.items():
        if any(isinstance(s, Unit) for s in steps):
            for k, step in enumerate(steps):
                if isinstance(step, Unit):
                    step.consumer = reader(seq, k)
            overrides.append((weakref.ref(seq), _sequential_forward(steps)))
    return treatments, fused, frozen_backbone, overrides


@contextlib.contextmanager
def lean_training(model: nn.Module, enabled: bool = True):
    """Run `model`'s forward (the backward follows the graph it records) with the lean step; yields the
    LeanPlan (None when disabled). The model's forwards are restored on exit."""
    if not enabled:
        yield None
        return
    plan = plan_lean(model)
    try:
        yield plan
    finally:
        plan.restore()
