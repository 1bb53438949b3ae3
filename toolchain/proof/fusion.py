"""The zero-overhead proof in PyTorch, used by `fuse-export` and `bench` alike: fold the adapter into
the dense kernels (through the method interface), prove the fused model is an instance of the original
architecture, and prove it computes what the adapted model computes, layer by layer and end to end."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import EdgetoolError
from ..methods.base import BN_TYPES, AdaptationMethod
from ..models.backbones import CONV_TYPES

# Layers compared one by one: every module of the fused model that carries weights.
COMPARED_TYPES = (*CONV_TYPES, nn.Linear, *BN_TYPES)


def fuse_model(method: AdaptationMethod, adapted: nn.Module) -> nn.Module:
    """The fused model, through the method interface only (`method.merge`), in eval mode. A method that
    cannot be fused raises NotMergeableError saying what inference cost it would add."""
    return method.merge(adapted).eval()


def architecture_differences(fused: nn.Module, reference: nn.Module, limit: int = 20) -> list[str]:
    """Ways `fused` is not an instance of the base architecture: module tree (names, types, settings),
    state-dict keys, shapes and dtypes. Empty when it is."""
    diffs: list[str] = []
    mods_f, mods_r = dict(fused.named_modules()), dict(reference.named_modules())
    for name in mods_f.keys() - mods_r.keys():
        diffs.append(f"module '{name}' ({type(mods_f[name]).__name__}) is not in the base architecture")
    for name in mods_r.keys() - mods_f.keys():
        diffs.append(f"module '{name}' ({type(mods_r[name]).__name__}) of the base architecture is missing")
    for name in mods_f.keys() & mods_r.keys():
        f, r = mods_f[name], mods_r[name]
        if type(f) is not type(r):
            diffs.append(f"module '{name or '<root>'}' is {type(f).__name__}, base has {type(r).__name__}")
        elif f.extra_repr() != r.extra_repr():
            diffs.append(f"module '{name}' is {type(f).__name__}({f.extra_repr()}), base has ({r.extra_repr()})")
    sd_f, sd_r = fused.state_dict(), reference.state_dict()
    if list(sd_f) != list(sd_r):
        extra, missing = sorted(set(sd_f) - set(sd_r)), sorted(set(sd_r) - set(sd_f))
        diffs.append(f"state-dict keys differ (extra {extra[:3]}, missing {missing[:3]})" if extra or missing
                     else "state-dict keys are in a different order")
    for k in sd_f.keys() & sd_r.keys():
        if sd_f[k].shape != sd_r[k].shape or sd_f[k].dtype != sd_r[k].dtype:
            diffs.append(f"state-dict '{k}' is {tuple(sd_f[k].shape)} {sd_f[k].dtype}, "
                         f"base has {tuple(sd_r[k].shape)} {sd_r[k].dtype}")
    return sorted(diffs)[:limit]


@dataclass
class LayerError:
    name: str
    type: str
    max_abs_error: float
    max_rel_error: float  # max_abs_error / scale
    scale: float  # max |output| of the adapted layer over all inputs
    tolerance: float  # atol + rtol * scale
    passed: bool


@dataclass
class EquivalenceReport:
    max_abs_error: float
    max_rel_error: float
    scale: float
    argmax_agreement: float
    worst_layer: str | None
    passed: bool
    inputs: int
    layers: list[LayerError] = field(default_factory=list)

    def failure(self) -> str | None:
        if self.passed:
            return None
        worst = next((l for l in self.layers if l.name == self.worst_layer), None)
        if worst is not None and not worst.passed:
            return (f"fusion equivalence failed: worst layer '{worst.name}' ({worst.type}) differs from its adapted "
                    f"counterpart by {worst.max_abs_error:.3g} (tolerance {worst.tolerance:.3g})")
        return (f"fusion equivalence failed end to end: max |adapted - fused| {self.max_abs_error:.3g} "
                f"(relative {self.max_rel_error:.3g}); worst layer '{self.worst_layer}'")


def check_equivalence(adapted: nn.Module, fused: nn.Module, X: np.ndarray, atol: float, rtol: float,
                      batch_size: int = 64) -> EquivalenceReport:
    """Run `adapted` on X; at every weighted layer feed the fused counterpart the very input the adapted
    layer received and compare outputs (per layer), and compare the logits (end to end).
    A layer or the logits pass when max |adapted - fused| <= atol + rtol * max |adapted output|."""
    adapted, fused = adapted.eval(), fused.eval()
    adapted_mods = dict(adapted.named_modules())
    pairs = [(n, m, adapted_mods.get(n)) for n, m in fused.named_modules() if isinstance(m, COMPARED_TYPES)]
    err = {n: 0.0 for n, _, _ in pairs}
    scale = {n: 0.0 for n, _, _ in pairs}

    def hook_for(name: str, fused_layer: nn.Module):
        def hook(_module, inputs, output):
            y = fused_layer(inputs[0])
            e = float((y.double() - output.double()).abs().max()) if y.shape == output.shape else float("inf")
            # max() would silently keep the old value against a NaN: a NaN difference is a failure.
            err[name] = max(err[name], float("inf") if math.isnan(e) else e)
            scale[name] = max(scale[name], float(output.abs().max()))
        return hook

    handles = [a.register_forward_hook(hook_for(n, f)) for n, f, a in pairs if a is not None]
    try:
        with torch.no_grad():
            outs_a, outs_f = [], []
            for i in range(0, len(X), batch_size):
                xb = torch.from_numpy(np.ascontiguousarray(X[i: i + batch_size]))
                outs_a.append(adapted(xb).double().numpy())
                outs_f.append(fused(xb).double().numpy())
    finally:
        for h in handles:
            h.remove()
    ya, yf = np.concatenate(outs_a), np.concatenate(outs_f)

    layers = []
    for n, f, a in pairs:
        if a is None:  # a method renamed the layer: cannot be compared, so it cannot pass
            err[n] = float("inf")
        tol = atol + rtol * scale[n]
        layers.append(LayerError(n, type(f).__name__, err[n], err[n] / scale[n] if scale[n] > 0 else err[n],
                                 scale[n], tol, err[n] <= tol))
    abs_e = float(np.abs(ya - yf).max()) if ya.size else 0.0
    out_scale = float(np.abs(ya).max()) if ya.size else 0.0
    end_to_end_ok = abs_e <= atol + rtol * out_scale
    worst = max(layers, key=lambda l: l.max_abs_error / l.tolerance, default=None)
    return EquivalenceReport(
        max_abs_error=abs_e,
        max_rel_error=abs_e / out_scale if out_scale > 0 else abs_e,
        scale=out_scale,
        argmax_agreement=float(np.mean(ya.argmax(1) == yf.argmax(1))) if ya.size else 1.0,
        worst_layer=worst.name if worst else None,
        passed=end_to_end_ok and all(l.passed for l in layers),
        inputs=len(X),
        layers=layers,
    )


@dataclass
class FusionProof:
    """What fusing one adapted model proved. `failures` is empty when the fused model is the original
    architecture and equals the adapted model within tolerance."""

    fused: nn.Module
    architecture_differences: list[str]
    equivalence: EquivalenceReport
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures


def prove_fusion(method: AdaptationMethod, adapted: nn.Module, original: nn.Module, X: np.ndarray,
                 atol: float, rtol: float, source: str = "the adapter") -> FusionProof:
    """Fuse `adapted`, then check architecture and equivalence on inputs `X`. A method that cannot be
    fused raises NotMergeableError; a fused weight that is NaN/inf is bad input (a diverged or corrupt
    adapter, named by `source`) and raises EdgetoolError."""
    fused = fuse_model(method, adapted)
    non_finite = [k for k, t in fused.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if non_finite:
        raise EdgetoolError(f"the fused model's '{non_finite[0]}' contains NaN or inf: the adaptation in "
                            f"{source} diverged or the file is corrupt; nothing was exported")
    failures = []
    arch = architecture_differences(fused, original)
    if arch:
        failures.append(f"the fused model is not the base architecture: {arch[0]}")
    eq = check_equivalence(adapted, fused, X, atol, rtol)
    if not eq.passed:
        failures.append(eq.failure())
    return FusionProof(fused, arch, eq, failures)
