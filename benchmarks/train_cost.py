#!/usr/bin/env python3
"""What one training step costs: TT-LoRA (plain autograd, and the lean step of toolchain/training/lean.py)
against full fine-tuning of the same model on the same input. Run by hand; results go to
docs/benchmarks.md (--markdown prints the table with the command that produced it).

Conditions: batch 32, TT-LoRA rank 4 on every conv, `bn: frozen`, Adam; full fine-tuning trains every
parameter (BatchNorm frozen too, same recipe). Models:
  resnet1d     toolchain.models.backbones.ResNet1d, width 48, input 6 x 128
  mobilenet1d  toolchain.models.backbones.MobileNet1d, width 32, input 6 x 128
  mobilenetv2  torchvision's MobileNetV2 layout (inverted residuals, depthwise 3x3, ReLU6; built here from
               plain nn modules, random weights, BatchNorm statistics from two train-mode passes), 3 x 224 x 224

Measured per model and configuration, reported as ratios to full fine-tuning:
- peak training memory above the model. CPU: gradients + optimizer state + bytes saved for backward,
  counted on the first step as `fit` counts them (toolchain.training.fit.SavedActivationMeter, storages once).
  CUDA: torch.cuda.max_memory_allocated over two steps minus what was allocated before them (the model
  and the batch).
- step time (forward, backward, optimizer step), each configuration against full fine-tuning in its own
  interleaved series A B A B (A = full fine-tuning), medians. CPU: wall time; CUDA: CUDA events.
--precision fp16 runs autocast with a GradScaler, bf16 autocast alone.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_cost.py --markdown
    .venv/bin/python benchmarks/train_cost.py --device cuda --precision fp16 --markdown
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolchain.training.lean import lean_training  # noqa: E402
from toolchain.methods.registry import get_method  # noqa: E402
from toolchain.methods.settings import settings_for  # noqa: E402
from toolchain.models.backbones import MobileNet1d, ResNet1d, find_head  # noqa: E402
from toolchain.recipe import OptimConfig  # noqa: E402
from toolchain.training.fit import SavedActivationMeter, _tensor_bytes, optimizer_state_bytes  # noqa: E402

# ---------------------------------------------------------------------------------------------- MobileNetV2 (2-D)


class ConvBNActivation(nn.Sequential):
    """torchvision's Conv2dNormActivation: conv (no bias), BatchNorm, ReLU6 (in place)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        layers: list[nn.Module] = [ConvBNActivation(c_in, hidden, kernel=1)] if expand != 1 else []
        layers += [ConvBNActivation(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision.models.mobilenet_v2's layout at width 1.0 (no pretrained weights are needed here)."""

    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [ConvBNActivation(3, 32, stride=2)]
        c_in = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        layers.append(ConvBNActivation(c_in, 1280, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


# ---------------------------------------------------------------------------------------------- set-up

MODELS = {
    "resnet1d": ("ResNet1d, width 48", lambda: ResNet1d(6, 4, width=48), (6, 128), 4),
    "mobilenet1d": ("MobileNet1d, width 32", lambda: MobileNet1d(6, 4, width=32), (6, 128), 4),
    "mobilenetv2": ("MobileNetV2 (torchvision layout), 2-D", lambda: MobileNetV2(1000), (3, 224, 224), 1000),
}
CONFIGS = {  # name -> (method, lean step on)
    "full": ("full", False),  # plain autograd (nothing is frozen, so the lean context would change nothing)
    "ttlora": ("ttlora", False),
    "ttlora-lean": ("ttlora", True),
}
MEMORY_TARGET = {"resnet1d": 0.25, "mobilenet1d": 0.4, "mobilenetv2": 0.4}
TIME_TARGET = 0.8


def base_model(key: str, device: torch.device) -> nn.Module:
    """Random weights; BatchNorm statistics from two train-mode passes so the frozen BN is not identity."""
    torch.manual_seed(0)
    _, build, shape, _ = MODELS[key]
    model = build()
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, *shape))
    return model.eval().to(device)


def adapted(base: nn.Module, method_name: str) -> tuple[nn.Module, object]:
    model = copy.deepcopy(base)
    method = get_method(settings_for(method_name, {"rank": 4, "layers": "all", "bn": "frozen"}, {}))
    method.inject(model, find_head(model)[0])
    return model, method


class Step:
    """One configuration: model, optimizer, batch and a train-step closure."""

    def __init__(self, base, method_name, lean_on, x, y, precision, device):
        self.model, self.method = adapted(base, method_name)
        self.lean_on, self.x, self.y, self.device = lean_on, x, y, device
        self.opt = self.method.build_optimizer(self.model, OptimConfig(optimizer="adam", lr=1e-4))
        self.amp = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.method.set_train_mode(self.model)
        self.trainable = sum(p.numel() for _, p in self.method.trainable_parameters(self.model))

    def forward(self):
        autocast = torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()
        with autocast, lean_training(self.model, enabled=self.lean_on):
            return nn.functional.cross_entropy(self.model(self.x).float(), self.y)

    def backward_and_update(self, loss):
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()

    def __call__(self):
        self.backward_and_update(self.forward())

    def memory_cpu(self) -> int:
        """fit's account of the first step: gradients + optimizer state + bytes saved for backward."""
        meter = SavedActivationMeter.for_model(self.model)
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            loss = self.forward()
        self.opt.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        grads = _tensor_bytes(p.grad for p in self.model.parameters() if p.grad is not None)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        return grads + optimizer_state_bytes(self.opt) + meter.bytes

    def memory_cuda(self) -> int:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):  # the first step creates the optimizer state, the second runs with it
            self()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before


def time_interleaved(steps: dict[str, Step], reps: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds per step, configurations interleaved so a machine's drift hits them alike."""
    for _ in range(warmup):
        for s in steps.values():
            s()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(reps):
        for k, s in steps.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                s()
                end.record()
                torch.cuda.synchronize()
                times[k].append(start.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                s()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def measure(key: str, args, device: torch.device) -> dict:
    label, _, shape, classes = MODELS[key]
    batch = args.batch_2d if (key == "mobilenetv2" and args.batch_2d) else args.batch
    base = base_model(key, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=g).to(device)
    y = (torch.arange(batch) % classes).to(device)
    row = {"model": key, "label": label, "input": "x".join(map(str, shape)), "batch": batch, "configs": {}}
    steps: dict[str, Step] = {}
    for name, (method_name, lean_on) in CONFIGS.items():
        try:
            step = Step(base, method_name, lean_on, x, y, args.precision, device)
            mem = step.memory_cpu() if device.type == "cpu" else step.memory_cuda()
        except RuntimeError as exc:  # e.g. the plain TT-LoRA forward under CPU autocast
            row["configs"][name] = {"error": "fails: " + str(exc).splitlines()[0][:120]}
            continue
        steps[name] = step
        row["configs"][name] = {"trainable": step.trainable, "memory": mem}
    # Each configuration against full fine-tuning in its own A B A B series: a third configuration in the
    # rotation would change what the caches and the allocator hold when each step starts.
    for name in steps:
        if name == "full" or "full" not in steps:
            continue
        times = time_interleaved({"full": steps["full"], name: steps[name]}, args.reps, args.warmup, device)
        row["configs"][name]["seconds"] = times[name]
        row["configs"][name]["time_ratio"] = times[name] / times["full"]
        row["configs"]["full"]["seconds"] = times["full"]  # the last series' (TT-LoRA lean's) median
        row["configs"]["full"]["time_ratio"] = 1.0
    return row


# ---------------------------------------------------------------------------------------------- output


def ratio(row: dict, name: str, key: str) -> float | None:
    c, full = row["configs"].get(name, {}), row["configs"]["full"]
    if key == "seconds":
        return c.get("time_ratio")
    return c[key] / full[key] if key in c and key in full else None


def fmt_ratio(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}×"


def markdown(rows: list[dict], args, device: torch.device, command: str) -> str:
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} thread(s)")
    mem_how = ("gradients + optimizer state + saved for backward, first step" if device.type == "cpu"
               else "torch.cuda.max_memory_allocated above the model and batch, two steps")
    lines = [
        f"`{command}`",
        "",
        f"{where}, torch {torch.__version__}, {args.precision}; TT-LoRA rank 4 on every conv, `bn: frozen`, Adam; "
        f"ratios to full fine-tuning of the same model and input. Memory: {mem_how}. Time: medians of {args.reps} "
        f"steps of each configuration interleaved with full fine-tuning (A B A B) after {args.warmup} warm-up round(s); "
        f"full FT ms/step from its series against the lean step.",
        "",
        "| model | input, batch | full FT: memory, ms/step | TT-LoRA plain: memory, time | TT-LoRA lean: memory, time "
        "| targets (lean: memory, time) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        full = r["configs"]["full"]
        cells = []
        for name in ("ttlora", "ttlora-lean"):
            c = r["configs"].get(name, {})
            cells.append(f"n/a ({c['error']})" if "error" in c
                         else f"{fmt_ratio(ratio(r, name, 'memory'))}, {fmt_ratio(ratio(r, name, 'seconds'))}")
        mem, sec = ratio(r, "ttlora-lean", "memory"), ratio(r, "ttlora-lean", "seconds")
        target_mem, target_time = MEMORY_TARGET[r["model"]], TIME_TARGET
        verdict = (f"≤ {target_mem}: {'yes' if mem is not None and mem <= target_mem else 'NO'}; "
                   f"≤ {target_time}: {'yes' if sec is not None and sec <= target_time else 'NO'}")
        lines.append(f"| {r['label']} | {r['input']}, {r['batch']} | {full['memory'] / 2**20:.1f} MiB, "
                     f"{1000 * full['seconds']:.1f} | {cells[0]} | {cells[1]} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--models", default="resnet1d,mobilenet1d,mobilenetv2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batch-2d", type=int, default=None, help="batch for mobilenetv2 only (default: --batch)")
    parser.add_argument("--reps", type=int, default=15, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--markdown", action="store_true", help="print a table for docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    command = "python benchmarks/train_cost.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    rows = []
    for key in [m.strip() for m in args.models.split(",") if m.strip()]:
        if key not in MODELS:
            parser.error(f"unknown model {key!r} (have: {', '.join(MODELS)})")
        row = measure(key, args, device)
        rows.append(row)
        if not args.markdown:
            for name, c in row["configs"].items():
                if "error" in c:
                    print(f"{key:12s} {name:12s} n/a: {c['error']}")
                else:
                    print(f"{key:12s} {name:12s} trainable {c['trainable']:>9,d}  memory {c['memory'] / 2**20:8.1f} MiB "
                          f"({fmt_ratio(ratio(row, name, 'memory'))})  step {1000 * c['seconds']:8.1f} ms "
                          f"({fmt_ratio(ratio(row, name, 'seconds'))})", flush=True)
    if args.markdown:
        print(markdown(rows, args, device, command))


if __name__ == "__main__":
    main()
