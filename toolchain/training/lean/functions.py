"""The autograd Functions of the lean step and the frozen-tensor results they reuse (see the package
docstring): a conv (+ eval BatchNorm + activation) node that saves only what its input gradient and
its trainable parameters need (TT-LoRA's side output: sidepath.py), and a mask-saving activation."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...methods.ttlora import TTLoRAConv
from .geometry import ConvGeometry, channel_view, reduce_dims
from .precision import as_dtype, autocast_dtype, autocast_off
from .sidepath import SideWeights, main_and_side, side_grad

RELU, RELU6 = "relu", "relu6"

# ---------------------------------------------------------------------------------------------- helpers


def _mask_of_output(y: torch.Tensor, act: str) -> torch.Tensor:
    """Where the activation passed the gradient, from its output: ReLU y > 0, ReLU6 0 < y < 6.
    Written as a float-to-bool conversion (y != 0), which is vectorised, where a comparison op producing
    bool is several times slower on CPU."""
    if act == RELU:
        return y.to(torch.bool)
    # 1 where 0 < y < 6, as hardtanh's own backward decides it, then to bool
    return torch.ops.aten.hardtanh_backward(y.new_ones(()).expand_as(y), y, 0.0, 6.0).to(torch.bool)


def _activate(z: torch.Tensor, act: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply `act` in place on `z` (a tensor we own); return (output, mask) with a bool mask of where it
    passes the gradient."""
    if act is None:
        return z, None
    if act == RELU:
        z.clamp_min_(0)
    else:
        z.clamp_(0, 6)
    return z, _mask_of_output(z, act)


def _gate(grad: torch.Tensor, act: str | None, saved: torch.Tensor | None, saved_is_output: bool) -> torch.Tensor:
    """The gradient before the activation, from its bool mask or (when the output is kept anyway) its output."""
    if act is None:
        return grad
    if saved_is_output:
        if act == RELU:
            return torch.ops.aten.threshold_backward(grad, saved, 0)
        return torch.ops.aten.hardtanh_backward(grad, saved, 0.0, 6.0)
    # a uint8 multiply is vectorised; torch.where on a bool mask is not (several times slower on CPU)
    return grad * saved.view(torch.uint8)


# ---------------------------------------------------------------------------------------------- autograd Functions


@dataclass(frozen=True)
class LayerSpec:
    geometry: ConvGeometry | None  # None: no conv, the unit starts at its BatchNorm
    bn_eps: float | None           # None: no BatchNorm
    act: str | None
    keep_output: bool  # the next module saves our output anyway: keep it rather than a mask
    save_input: bool   # TT-LoRA: save the input (recompute the side path) instead of the r-channel side output


class LeanLayer(torch.autograd.Function):
    """y = act(bn(conv(x, W + Delta W) + b)), every part optional: a frozen conv W (Delta W = G1 K for
    TT-LoRA, G1 trainable), an eval BatchNorm with frozen scale s (its shift beta may train), ReLU/ReLU6.

    The forward is the plain path's own ops on the same tensors (conv with W + Delta W formed as
    TTLoRAConv forms it, F.batch_norm in eval mode), so the output is the plain path's bit for bit
    where the conv kernel is the same; so is the backward of a frozen conv (see _frozen_backward).
    Saves: TT-LoRA's side output u = conv(x, K) (or x, see LayerSpec.save_input) and the mask; the
    weight and BatchNorm statistics it also keeps are the model's own tensors."""

    @staticmethod
    def forward(ctx, x, weight, delta, bias, scale, bn_mean, bn_var, bn_weight, bn_bias, g1, k, k_side, spec: LayerSpec):
        amp = autocast_dtype(x)
        args = (ctx, x, weight, delta, bias, scale, bn_mean, bn_var, bn_weight, bn_bias, g1, k, k_side, spec)
        if amp is None:
            return LeanLayer._forward(*args, x.dtype)
        # Inside, every dtype is explicit (that of the plain path's autocast conv); autocast must not re-cast.
        with torch.autocast(x.device.type, enabled=False):
            return LeanLayer._forward(*args, amp)

    @staticmethod
    def _forward(ctx, x, weight, delta, bias, scale, bn_mean, bn_var, bn_weight, bn_bias, g1, k, k_side,
                 spec: LayerSpec, dtype: torch.dtype):
        geo = spec.geometry
        ctx.spec, ctx.x_shape = spec, x.shape
        ctx.dtypes = {"x": x.dtype, "bias": None if bias is None else bias.dtype,
                      "bn_bias": None if bn_bias is None else bn_bias.dtype, "g1": None if g1 is None else g1.dtype}
        xc = as_dtype(x, dtype)
        u = None
        if geo is None:
            z = xc
        else:
            w = as_dtype(weight if delta is None else weight + delta, dtype)
            b = as_dtype(bias, dtype)
            xp = geo.pad(xc)
            if g1 is None or spec.save_input:
                z = geo.conv(xp, w, b)
            else:
                z, u = main_and_side(xp, w, b, as_dtype(k, dtype), k_side.to(dtype), geo, spec.bn_eps is None)
        if spec.bn_eps is not None:
            z = F.batch_norm(z, bn_mean, bn_var, bn_weight, bn_bias, False, 0.0, spec.bn_eps)
        y, mask = _activate(z, spec.act)
        keep = y if spec.keep_output and spec.act is not None else mask
        saved_x = xc if (g1 is not None and spec.save_input) else None
        ctx.save_for_backward(saved_x, u, keep, weight, scale, g1, k, bn_mean, bn_var, bn_weight)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        # Explicit dtypes here too: an autocast state the engine may carry into backward must not re-cast.
        with autocast_off(grad_y.device.type):
            return LeanLayer._backward(ctx, grad_y)

    @staticmethod
    def _backward(ctx, grad_y):
        x, u, keep, weight, scale, g1, k, bn_mean, bn_var, bn_weight = ctx.saved_tensors
        spec: LayerSpec = ctx.spec
        need = ctx.needs_input_grad
        g = _gate(grad_y, spec.act, keep, spec.keep_output)
        if g1 is None:
            gx, gbias, gbn_bias = LeanLayer._frozen_backward(ctx, g, weight, scale, (bn_mean, bn_var, bn_weight),
                                                             need[0], need[3], need[8])
            g1_grad = None
        else:
            gx, gbias, gbn_bias, g1_grad = LeanLayer._ttlora_backward(ctx, g, x, u, weight, scale, g1, k,
                                                                      need[0], need[3], need[8], need[9])
        dtypes = ctx.dtypes
        return (as_dtype(gx, dtypes["x"]), None, None, as_dtype(gbias, dtypes["bias"]), None, None, None, None,
                as_dtype(gbn_bias, dtypes["bn_bias"]), as_dtype(g1_grad, dtypes["g1"]), None, None, None)

    @staticmethod
    def _frozen_backward(ctx, g, weight, scale, bn_stats, need_x, need_bias, need_bn_bias):
        """A frozen conv and/or eval BatchNorm: the ops autograd's own nodes run (BatchNorm's backward, then
        the conv's input and bias gradients), with a shape-only stand-in for the tensors they do not read,
        so on the CPU in fp32 the gradients are the plain path's bit for bit, and a method that trains
        nothing but these layers' neighbours (LoRA, DoRA, adapters, biases) follows the plain path's
        trajectory exactly however sensitive the protocol is to rounding."""
        spec, geo = ctx.spec, ctx.spec.geometry
        gz, gbn_bias = g, None
        if spec.bn_eps is not None:
            need_below = need_x or (geo is not None and need_bias)
            gz, gbn_bias = _bn_backward(g, scale, bn_stats, spec.bn_eps, need_below, need_bn_bias)
        if geo is None:
            return (gz if need_x else None), None, gbn_bias
        if not (need_x or need_bias):
            return None, None, gbn_bias
        stand_in = _shape_stand_in(gz, geo.padded_shape(ctx.x_shape))
        gxp, _, gbias = geo.backward(gz, stand_in, as_dtype(weight, gz.dtype), (need_x, False), need_bias)
        return (geo.unpad_grad(gxp, ctx.x_shape) if need_x else None), gbias, gbn_bias

    @staticmethod
    def _ttlora_backward(ctx, g, x, u, weight, scale, g1, k, need_x, need_bias, need_bn_bias, need_g1):
        """TT-LoRA on a frozen conv (+ eval BatchNorm): G1's gradient from the side output (or the input),
        the input gradient through (W + G1 K) s, BatchNorm's scale s folded into the weight (a weight-size
        product, not an activation pass). Equal to the plain path to float rounding, not bit for bit: the
        plain path's G1 gradient is a dense weight gradient contracted with the cores."""
        spec, geo = ctx.spec, ctx.spec.geometry
        gx = gbias = gbn_bias = g1_grad = None
        if need_bias or need_bn_bias:
            total = g.sum(reduce_dims(g.dim()))
            gbn_bias = total if need_bn_bias else None
            if need_bias:
                gbias = total if scale is None else total * scale
        if need_x or (need_g1 and spec.save_input):
            w = weight + (g1 @ k.flatten(1)).view_as(weight)
            if scale is not None:  # dL/dz = s * dL/dy: fold s into the weight, not into the gradient
                w = w * scale.reshape((-1,) + (1,) * (w.dim() - 1))
            w = as_dtype(w, g.dtype)
            if spec.save_input:
                gxp, gw, _ = geo.backward(g, geo.pad(x), w, (need_x, need_g1))
                if need_g1:
                    g1_grad = gw.flatten(1).to(k.dtype) @ k.flatten(1).T
            else:
                # Only the input gradient: its sizes are all convolution_backward needs of the input.
                stand_in = _shape_stand_in(g, geo.padded_shape(ctx.x_shape))
                gxp, _, _ = geo.backward(g, stand_in, w, (True, False))
            if need_x:
                gx = geo.unpad_grad(gxp, ctx.x_shape)
        if need_g1:
            if g1_grad is None:
                g1_grad = side_grad(g, u, geo.groups, g1.shape[1]).to(g1.dtype)
            if scale is not None:
                g1_grad = g1_grad * scale[:, None]
        return gx, gbias, gbn_bias, g1_grad


def _shape_stand_in(like: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """An input for convolution_backward when only sizes are read (no weight gradient): uninitialised and
    contiguous, as the conv kernels want their input (an expanded one-element tensor would be copied into
    a contiguous one first). It lives for one call; nothing reads it."""
    return like.new_empty(shape)


def _bn_backward(g, scale, bn_stats, eps: float, need_input: bool, need_shift: bool):
    """(dL/dz, dL/dbeta) of an eval BatchNorm y = s z + (beta - s mean), from dL/dy alone. On the CPU,
    aten's own BatchNorm backward (the one autograd runs), handed dL/dy as a stand-in for the input it
    reads only for the frozen scale's gradient; elsewhere s * dL/dy and a sum, equal to float rounding."""
    if not (need_input or need_shift):
        return None, None
    mean, var, weight = bn_stats
    if g.device.type == "cpu":
        g = g.contiguous()
        gz, _, gshift = torch.ops.aten.native_batch_norm_backward(
            g, g, weight, mean, var, None, None, False, eps, [need_input, False, need_shift])
        return gz, gshift
    gz = g * channel_view(as_dtype(scale, g.dtype), g.dim()) if need_input else None
    return gz, (g.sum(reduce_dims(g.dim())) if need_shift else None)


class LeanActivation(torch.autograd.Function):
    """ReLU / ReLU6 saving a bool mask; in place when the module says so."""

    @staticmethod
    def forward(ctx, x, act, inplace):
        ctx.act = act
        if inplace:
            y, mask = _activate(x, act)
            ctx.mark_dirty(x)
        else:
            y = torch.relu(x) if act == RELU else F.hardtanh(x, 0.0, 6.0)
            mask = _mask_of_output(y, act)
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (mask,) = ctx.saved_tensors
        return _gate(grad_y, ctx.act, mask, False), None, None


# Per-module results that depend only on frozen tensors (BN statistics, TT cores), reused across steps
# until one of those tensors changes (its version counter moves). Entries are small: C or r*C_in*k numbers.
_BN_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_CORE_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _version_key(tensors) -> tuple:
    return tuple((id(t), t._version, t.dtype, t.device) for t in tensors if t is not None)


def bn_scale(bn: nn.Module) -> torch.Tensor:
    """s = gamma / sqrt(var + eps): dL/dx = s * dL/dy for an eval BatchNorm (cached while its tensors stay)."""
    key = _version_key((bn.running_var, bn.weight)) + (bn.eps,)
    hit = _BN_CACHE.get(bn)
    if hit is None or hit[0] != key:
        with torch.no_grad(), autocast_off(bn.running_var.device.type):  # cached: full precision
            scale = 1.0 / torch.sqrt(bn.running_var + bn.eps)
            hit = (key, scale if bn.weight is None else scale * bn.weight)
        _BN_CACHE[bn] = hit
    return hit[1]


def contracted_cores(layer: TTLoRAConv) -> tuple[torch.Tensor, SideWeights]:
    """K = G2 x G3 x ... : (r1, C_in/groups, k...), so that Delta W = G1 @ K (both flattened), and the
    weights of the separate side conv (SideWeights)."""
    cores = layer.frozen_cores()
    key = _version_key(cores)
    hit = _CORE_CACHE.get(layer)
    if hit is None or hit[0] != key:
        with torch.no_grad(), autocast_off(cores[0].device.type):  # cached: full precision
            out = cores[0]
            for core in cores[1:]:
                out = torch.tensordot(out, core, dims=([out.dim() - 1], [0]))
            k = out.reshape(cores[0].shape[0], *layer.base.weight.shape[1:])
            hit = (key, k, SideWeights.of(layer.base, cores, k))
        _CORE_CACHE[layer] = hit
    return hit[1], hit[2]
