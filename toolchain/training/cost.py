"""What one training step costs, measured on a copy of the model: FLOPs (forward, backward, optimizer;
counted on the CPU in fp32, the same on every device), time on the training device, and the adapter
checkpoint's size. Used by `bench`; peak memory comes from `fit`."""

from __future__ import annotations

import copy
import io
import statistics
import time

import torch
from torch import nn

from ..models.assembly import build_adapted
from .device import TrainingDevice, training_device
from .lean import lean_training
from ..recipe import OptimConfig
from .fit import fit, seed_everything

# Elementwise FLOPs per trainable element of one optimizer step (FlopCounterMode does not see them).
# Adam (torch, single-tensor path): exp_avg.lerp_ 3 + exp_avg_sq.mul_.addcmul_ 4 + sqrt/div/add eps 3
# + param.addcdiv_ 3 = 13; L2 weight decay adds grad + wd * param (2); AdamW's decoupled decay 1.
# SGD with momentum: buf.mul_.add_ 2 + param.add_(buf, alpha=-lr) 2 = 4 (+2 with weight decay).
OPTIMIZER_FLOPS_PER_ELEMENT = {"adam": 13, "adamw": 14, "sgd": 4}
WEIGHT_DECAY_FLOPS_PER_ELEMENT = {"adam": 2, "adamw": 0, "sgd": 2}


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor,
                td: TrainingDevice, scaler, lean: bool) -> None:
    """One step as `fit` takes it (autocast forward, lean step, scaled backward for fp16)."""
    with td.autocast(), lean_training(model, enabled=lean):
        loss = nn.functional.cross_entropy(model(xb), yb)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def _batch(split, cfg: OptimConfig) -> tuple[torch.Tensor, torch.Tensor]:
    bs = min(cfg.batch_size, len(split))
    return torch.from_numpy(split.X[:bs]), torch.from_numpy(split.y[:bs])


def grouped_conv_backward_fix() -> dict:
    """A FlopCounterMode custom_mapping correcting its grouped-conv weight gradient, or {} if not needed.

    torch's stock formula for aten.convolution_backward counts dL/dW of a conv with `groups` g as if
    every output channel saw all C_in inputs: g times too many FLOPs (a depthwise conv's weight
    gradient is counted C times over; see pytorch/pytorch PR 183405). The weight gradient of a conv has
    exactly as many MACs as its forward, so the correction divides that term by g. The stock formula is
    probed first, so a torch that already divides by groups is left alone."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    raw = getattr(flop_counter.flop_registry.get(aten.convolution_backward), "__wrapped__", None)
    if raw is None:
        return {}
    # depthwise probe: N=2, C=4, groups=4, k=3, T=10 -> dL/dW takes 2 * 2*4*1*3*10 FLOPs, like the forward
    probe = raw([2, 4, 10], [2, 4, 10], [4, 1, 3], None, [1], [1], [1], False, [0], 4, [False, True, False],
                out_shape=[None, [4, 1, 3], None])
    if probe == 2 * 2 * 4 * 1 * 3 * 10:
        return {}

    def conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                           output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
        args = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups)
        total = 0
        if output_mask[0]:
            total += raw(*args, [True, False, False], out_shape=out_shape)
        if output_mask[1]:
            total += raw(*args, [False, True, False], out_shape=out_shape) // groups
        return total

    return {aten.convolution_backward: conv_backward_flop}


def measure_step_flops(model: nn.Module, method, cfg: OptimConfig, split) -> dict[str, int]:
    """Counted FLOPs of one training step, split into forward / backward / optimizer, plus the estimate
    of the optimizer's elementwise work. `model` is copied; the caller's model is not touched."""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(model)
    opt = method.build_optimizer(model, cfg)
    method.set_train_mode(model)
    xb, yb = _batch(split, cfg)
    fix = grouped_conv_backward_fix()
    with FlopCounterMode(display=False, custom_mapping=fix) as fc, lean_training(model, enabled=cfg.lean_step):
        loss = nn.functional.cross_entropy(model(xb), yb)
    forward = fc.get_total_flops()
    opt.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False, custom_mapping=fix) as fc:
        loss.backward()
    backward = fc.get_total_flops()
    with FlopCounterMode(display=False, custom_mapping=fix) as fc:
        opt.step()
    optimizer_counted = fc.get_total_flops()
    trainable = sum(p.numel() for _, p in method.trainable_parameters(model))
    per_element = OPTIMIZER_FLOPS_PER_ELEMENT[cfg.optimizer]
    if cfg.weight_decay > 0:
        per_element += WEIGHT_DECAY_FLOPS_PER_ELEMENT[cfg.optimizer]
    optimizer_estimate = per_element * trainable
    return {
        "flops_forward": int(forward),
        "flops_backward": int(backward),
        "flops_optimizer_counted": int(optimizer_counted),
        "flops_optimizer_estimate": int(optimizer_estimate),
        "flops_per_step": int(forward + backward + optimizer_counted + optimizer_estimate),
    }


def time_train_steps(model: nn.Module, method, cfg: OptimConfig, split, steps: int, warmup: int = 2) -> float:
    """Median seconds of one training step (forward, backward, optimizer) on a copy of `model`, on
    `cfg.device` in `cfg.precision`: CUDA events on a GPU (the device's own clock, no host overhead
    counted twice), the host's monotonic clock on the CPU."""
    td = training_device(cfg.device, cfg.precision)
    model = copy.deepcopy(model).to(td.device)
    opt = method.build_optimizer(model, cfg)
    scaler = td.grad_scaler()
    method.set_train_mode(model)
    xb, yb = (t.to(td.device) for t in _batch(split, cfg))
    times = []
    for i in range(warmup + steps):
        if td.device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            _train_step(model, opt, xb, yb, td, scaler, cfg.lean_step)
            end.record()
            end.synchronize()
            seconds = begin.elapsed_time(end) / 1000.0
        else:
            start = time.perf_counter()
            _train_step(model, opt, xb, yb, td, scaler, cfg.lean_step)
            seconds = time.perf_counter() - start
        if i >= warmup:
            times.append(seconds)
    return float(statistics.median(times))


def adapter_bytes(method, model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(method.adapter_state(model), buf)
    return len(buf.getvalue())


def full_step_cost(mcfg, tcfg: OptimConfig, base: nn.Module, head_name: str, data, seed: int,
                   timing_steps: int) -> dict[str, float]:
    """Full fine-tuning's peak training memory (one metered `fit` step) and median step time on `data`,
    for a bench whose methods do not include it: the reference of the cost ratios."""
    seed_everything(seed)
    model, method = build_adapted(mcfg, base, head_name, data)
    untrained = copy.deepcopy(model)
    one_step = tcfg.model_copy(update={"steps": 1})
    result = fit(model, method, data.target_train, one_step, seed, progress=False)
    return {"peak_memory_bytes": result.peak_memory_bytes,
            "wall_seconds_per_step": time_train_steps(untrained, method, tcfg, data.target_train, timing_steps)}
