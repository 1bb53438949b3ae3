"""Training shared by pretrain, adapt and bench: seeded data order, the recipe's device and precision,
periodic evaluation, steps-to-target and an explicit account of peak training memory."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.formats import Split
from .lean import lean_training
from .device import training_device
from ..metrics import evaluate
from ..errors import DivergedError
from ..methods.base import AdaptationMethod
from ..recipe import OptimConfig


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class EvalPoint:
    step: int
    f1: float
    accuracy: float
    seconds: float = 0.0  # training time up to this step, evaluations excluded


@dataclass
class TrainResult:
    curve: list[EvalPoint]
    steps: int
    steps_to_target: int | None
    train_seconds: float
    peak_memory_bytes: int
    memory_breakdown: dict[str, int] = field(default_factory=dict)
    device: dict = field(default_factory=dict)  # toolchain.training.device.TrainingDevice.describe()
    peak_memory_source: str = "tensor-account"  # or "cuda-allocator" (see fit)
    skipped_steps: int = 0  # fp16: optimizer steps the gradient scaler skipped (overflowed gradients)

    def curve_rows(self) -> list[dict]:
        """The curve for a run record: step, F1, accuracy (timing left out, so identical runs record identically)."""
        return [{k: v for k, v in asdict(p).items() if k != "seconds"} for p in self.curve]


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(_tensor_bytes(v for v in st.values() if torch.is_tensor(v)) for st in opt.state.values())


class SavedActivationMeter:
    """Counts the bytes autograd keeps for backward (the activation part of training memory), by
    hooking saved tensors; the model's parameters and buffers that autograd also saves (weights,
    BatchNorm statistics) are skipped: they are counted as the model's own bytes."""

    def __init__(self, skip: set[int]):
        self.skip = skip
        self.bytes = 0
        self._seen: set[tuple[int, int]] = set()

    @classmethod
    def for_model(cls, model: nn.Module) -> "SavedActivationMeter":
        return cls({t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())})

    def pack(self, t: torch.Tensor):
        if t.device.type == "cpu" or t.is_cuda:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in self._seen and key[0] not in self.skip:
                self._seen.add(key)
                self.bytes += key[1]
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


def fit(
    model: nn.Module,
    method: AdaptationMethod,
    train: Split,
    cfg: OptimConfig,
    seed: int,
    eval_split: Split | None = None,
    desc: str = "train",
    progress: bool = True,
    where: str = "train",
) -> TrainResult:
    """Train `model`'s trainable parameters (as `method` set them) for `cfg.steps` steps with a data
    order fixed by `seed`, on `cfg.device` in `cfg.precision` (recipe section `where`). The model is
    moved to that device (in place, like nn.Module.to) and left there. Evaluates macro-F1 on
    `eval_split` (in fp32, on the device) at step 0, every `eval_every` steps and at the end.

    Peak memory is measured, not estimated, on the first step. On the CPU: bytes of all parameters and
    buffers + gradients + optimizer state (after the step, when Adam's moments exist) + tensors saved
    for backward. On CUDA: the allocator's peak during that step above what was allocated before it
    (the resident training data, the model, leftovers), plus the model's own bytes: what the CPU
    account counts, plus kernel workspaces and temporaries."""
    td = training_device(cfg.device, cfg.precision, where)
    seed_everything(seed)
    rng = np.random.default_rng([seed, 2024])
    model.to(td.device)
    opt = method.build_optimizer(model, cfg)
    scaler = td.grad_scaler()
    loss_fn = nn.CrossEntropyLoss()
    # The training windows are small: they move to the device once.
    X = torch.from_numpy(train.X).to(td.device)
    y = torch.from_numpy(train.y).to(td.device)
    bs = min(cfg.batch_size, len(y))
    on_cuda = td.device.type == "cuda"

    curve: list[EvalPoint] = []
    steps_to_target = None
    eval_seconds = 0.0

    def record(step: int) -> None:
        nonlocal steps_to_target, eval_seconds
        if eval_split is None:
            return
        before = time.perf_counter()
        f1, acc = evaluate(model, eval_split)
        curve.append(EvalPoint(step, f1, acc, before - start - eval_seconds))
        eval_seconds += time.perf_counter() - before
        if steps_to_target is None and f1 >= cfg.target_f1:
            steps_to_target = step

    start = time.perf_counter()
    record(0)
    order = np.empty(0, dtype=np.int64)
    memory: dict[str, int] = {}
    skipped = 0
    peak = 0
    # disable=None: tqdm hides itself when stderr is not a terminal (CI logs stay readable).
    bar = tqdm(range(1, cfg.steps + 1), desc=desc, disable=None if progress else True, leave=False, unit="step")
    for step in bar:
        if len(order) < bs:
            order = np.concatenate([order, rng.permutation(len(y))])
        idx, order = order[:bs], order[bs:]
        ix = torch.from_numpy(idx).to(td.device)
        method.set_train_mode(model)
        if step == 1:  # the first step is metered (see the docstring); the rest run plain
            meter = SavedActivationMeter.for_model(model)
            saved_tensors = torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack)
            if on_cuda:
                td.synchronize()
                torch.cuda.reset_peak_memory_stats(td.device)
                resident = torch.cuda.memory_allocated(td.device)
        else:
            saved_tensors = contextlib.nullcontext()
        with saved_tensors, td.autocast(), lean_training(model, enabled=cfg.lean_step):  # toolchain/training/lean/
            loss = loss_fn(model(X[ix]), y[ix])
        if not torch.isfinite(loss):
            hint = " or train in bf16/fp32" if td.precision == "fp16" else ""
            raise DivergedError(f"{desc}: loss became {loss.item()} at step {step}; lower the learning rate{hint}")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if step == 1:
            grads = _tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(opt)
        scaler.update()
        if scale is not None and scaler.get_scale() < scale:
            skipped += 1  # fp16 gradients overflowed: the scaler skipped this optimizer step and lowered its scale
        if step == 1:
            memory = {
                "parameters_and_buffers": _tensor_bytes(model.parameters()) + _tensor_bytes(model.buffers()),
                "gradients": grads,
                "optimizer_state": optimizer_state_bytes(opt),
                "saved_activations": meter.bytes,
            }
            peak = sum(memory.values())
            if on_cuda:
                td.synchronize()
                peak = (torch.cuda.max_memory_allocated(td.device) - resident) + memory["parameters_and_buffers"]
        if step % cfg.eval_every == 0 or step == cfg.steps:
            record(step)
            if eval_split is not None:
                bar.set_postfix(f1=f"{curve[-1].f1:.3f}", loss=f"{loss.item():.3f}")
    td.synchronize()
    seconds = time.perf_counter() - start
    model.eval()
    return TrainResult(curve, cfg.steps, steps_to_target, seconds, peak, memory, device=td.describe(),
                       peak_memory_source="cuda-allocator" if on_cuda else "tensor-account", skipped_steps=skipped)
