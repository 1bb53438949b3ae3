"""Training shared by pretrain, adapt and bench: seeded data order, periodic evaluation,
steps-to-target and an explicit account of peak training memory."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import Split
from .metrics import evaluate
from .errors import DivergedError
from .methods.base import AdaptationMethod
from .recipe import OptimConfig


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

    def curve_rows(self) -> list[dict]:
        """The curve for a run record: step, F1, accuracy (timing left out, so identical runs record identically)."""
        return [{k: v for k, v in asdict(p).items() if k != "seconds"} for p in self.curve]


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(_tensor_bytes(v for v in st.values() if torch.is_tensor(v)) for st in opt.state.values())


class SavedActivationMeter:
    """Counts the bytes autograd keeps for backward (the activation part of training memory), by
    hooking saved tensors; parameters that autograd also saves are skipped (already counted)."""

    def __init__(self, skip: set[int]):
        self.skip = skip
        self.bytes = 0
        self._seen: set[tuple[int, int]] = set()

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
) -> TrainResult:
    """Train `model`'s trainable parameters (as `method` set them) for `cfg.steps` steps with a data
    order fixed by `seed`. Evaluates macro-F1 on `eval_split` at step 0, every `eval_every` steps and at the end.

    Peak memory is measured, not estimated, on the first step: bytes of all parameters and buffers
    + gradients + optimizer state (after the step, when Adam's moments exist) + tensors saved for
    backward. On CUDA, torch.cuda.max_memory_allocated is used instead."""
    seed_everything(seed)
    rng = np.random.default_rng([seed, 2024])
    opt = method.build_optimizer(model, cfg)
    loss_fn = nn.CrossEntropyLoss()
    X = torch.from_numpy(train.X)
    y = torch.from_numpy(train.y)
    bs = min(cfg.batch_size, len(y))

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
    # disable=None: tqdm hides itself when stderr is not a terminal (CI logs stay readable).
    bar = tqdm(range(1, cfg.steps + 1), desc=desc, disable=None if progress else True, leave=False, unit="step")
    for step in bar:
        if len(order) < bs:
            order = np.concatenate([order, rng.permutation(len(y))])
        idx, order = order[:bs], order[bs:]
        method.set_train_mode(model)
        if step == 1:  # the first step is metered (see the docstring); the rest run plain
            meter = SavedActivationMeter({p.untyped_storage().data_ptr() for p in model.parameters()})
            saved_tensors = torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack)
        else:
            saved_tensors = contextlib.nullcontext()
        with saved_tensors:
            loss = loss_fn(model(X[idx]), y[idx])
        if not torch.isfinite(loss):
            raise DivergedError(f"{desc}: loss became {loss.item()} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 1:
            grads = _tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
        opt.step()
        if step == 1:
            memory = {
                "parameters_and_buffers": _tensor_bytes(model.parameters()) + _tensor_bytes(model.buffers()),
                "gradients": grads,
                "optimizer_state": optimizer_state_bytes(opt),
                "saved_activations": meter.bytes,
            }
        if step % cfg.eval_every == 0 or step == cfg.steps:
            record(step)
            if eval_split is not None:
                bar.set_postfix(f1=f"{curve[-1].f1:.3f}", loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start
    model.eval()
    peak = sum(memory.values())
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        peak = int(torch.cuda.max_memory_allocated())
    return TrainResult(curve, cfg.steps, steps_to_target, seconds, peak, memory)
