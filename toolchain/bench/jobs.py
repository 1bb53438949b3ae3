"""The bench's unit of work, one (method, seed, learning rate) training run, and the pool that runs many.

Two kinds of run, each given only the data it may use:
- a *selection* run trains on the shots and scores the final model on the validation split. Its inputs
  (`SelectionInputs`, built by `selection_view`) hold no test window and no source window, so nothing
  chosen from these runs can depend on the test split;
- a *report* run trains at the chosen rate and measures everything the bench reports: the F1 curve on a
  fixed subsample of the test split, final test and validation F1, memory, step time, and (first seed)
  FLOPs and the fusion proof.

A run depends only on its (method, seed index, lr) and the inputs: it seeds every generator itself and
uses one intra-op thread, so a run gives the same numbers in any worker, in any order, with any --workers.
A run reads no file: its inputs carry the data, the base model and the original's ONNX graph, so it runs the
same on another machine (toolchain.bench.raypool sends it to a Ray cluster).

Where runs go is an executor's choice (toolchain.bench.executors): `RunPool` here runs them on this machine,
`RayPool` (toolchain.bench.raypool) on a Ray cluster. Both have one interface: `pool.for_recipe(device)` then
`.run(fn, jobs, inputs, on_done)` for each batch of one recipe's jobs, and `describe()` for bench.json."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import copy
import multiprocessing
import os
import pickle
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
from torch import nn

from ..artifacts import scratch_dir
from ..models.assembly import build_adapted
from ..data.formats import Split
from ..data.protocol import DataBundle
from ..errors import DivergedError, EdgetoolError, InternalError, NotMergeableError, first_line
from ..proof.export import compare_graph_structure, export_onnx
from ..proof.fusion import prove_fusion
from ..methods.settings import MethodSettings
from ..metrics import evaluate, macro_f1, predict_logits
from ..recipe import OptimConfig, Recipe
from ..training.cost import adapter_bytes, measure_step_flops, time_train_steps
from ..training.fit import fit, seed_everything


@dataclass(frozen=True)
class Job:
    method: str
    seed_index: int
    lr: float


@dataclass
class SelectionInputs:
    """What a selection run may see: per seed, a bundle holding the shots and the validation split only."""

    base: nn.Module
    head_name: str
    configs: dict[str, tuple[MethodSettings, OptimConfig]]
    seeds: list[int]
    data: list[DataBundle]


@dataclass
class ReportInputs:
    recipe: Recipe
    base: nn.Module
    head_name: str
    configs: dict[str, tuple[MethodSettings, OptimConfig]]
    seeds: list[int]
    data: list[DataBundle]
    curve_splits: list[Split]  # per seed: the fixed subsample of the test split the curves are scored on
    original: nn.Module
    original_onnx: onnx.ModelProto  # the graph fused models are compared with (held, not a path: no shared disk)


def _empty(split: Split) -> Split:
    return split.take(np.zeros(0, dtype=np.int64))


def selection_view(data: DataBundle) -> DataBundle:
    """`data` with no test and no source window (shapes and class lists kept): what selection runs get."""
    return replace(data, source_train=_empty(data.source_train), target_test=_empty(data.target_test))


def curve_subsample(split: Split, size: int, seed: int) -> Split:
    """A fixed, class-stratified subsample of `size` windows (the whole split when size is 0 or not smaller):
    per class round(size x its share) windows by largest remainder, at least one per class present."""
    n = len(split)
    if size <= 0 or size >= n:
        return split
    classes, counts = np.unique(split.y, return_counts=True)
    exact = size * counts / n
    take = np.maximum(np.floor(exact).astype(np.int64), 1)
    for i in np.argsort(-(exact - np.floor(exact)), kind="stable"):
        if take.sum() >= size:
            break
        take[i] = min(take[i] + 1, counts[i])
    rng = np.random.default_rng([seed, 4099])
    picked = [rng.choice(np.flatnonzero(split.y == c), size=int(k), replace=False) for c, k in zip(classes, take)]
    return split.take(np.sort(np.concatenate(picked)))


def fusion_row(method, adapted: nn.Module, original: nn.Module, original_onnx: onnx.ModelProto, sample: torch.Tensor,
               X: np.ndarray, recipe: Recipe) -> dict[str, Any]:
    """fuse-export's proof (architecture + equivalence), then the fused ONNX graph against the original's:
    identical graph and proof passed = zero inference overhead."""
    try:
        proof = prove_fusion(method, adapted, original, X, recipe.fuse.atol, recipe.fuse.rtol,
                             source=f"method '{method.name}'")
    except NotMergeableError as exc:
        return {"mergeable": False, "zero_overhead": False, "overhead_reason": str(exc), "fused_max_abs_diff": None}
    row: dict[str, Any] = {"mergeable": True, "fused_max_abs_diff": proof.equivalence.max_abs_error,
                           "architecture_identical": not proof.architecture_differences,
                           "fusion_equivalent": proof.equivalence.passed}
    with scratch_dir("fused") as tmp:  # this run's own: runs may share no disk
        fused_onnx = export_onnx(proof.fused, sample, Path(tmp) / f"fused-{method.name}.onnx", recipe.fuse.opset)
    graph = compare_graph_structure(original_onnx, fused_onnx)
    reasons = list(proof.failures)
    if not graph.identical:
        reasons.append("fused graph differs from the original: " + "; ".join(graph.differences[:3]))
    row["zero_overhead"] = not reasons
    row["overhead_reason"] = "; ".join(reasons) or None
    return row


def _adapted(inputs, job: Job, data: DataBundle):
    mcfg, tcfg = inputs.configs[job.method]
    seed = inputs.seeds[job.seed_index]
    # Adapter initialisation (e.g. LoRA's A) draws from the global RNG: seeded per run, so a run does not
    # depend on which runs this process did before it.
    seed_everything(seed)
    model, method = build_adapted(mcfg, inputs.base, inputs.head_name, data)
    return model, method, tcfg.model_copy(update={"lr": job.lr}), seed


def selection_run(inputs: SelectionInputs, job: Job) -> dict[str, Any]:
    """Train on the shots at job.lr; final macro-F1 on the validation split (None if the loss diverged)."""
    data = inputs.data[job.seed_index]
    model, method, tcfg, seed = _adapted(inputs, job, data)
    start = time.perf_counter()
    try:
        fit(model, method, data.target_train, tcfg, seed, progress=False)
    except DivergedError as exc:
        return {"val_f1": None, "val_loss": None, "diverged": str(exc), "seconds": time.perf_counter() - start}
    logits = predict_logits(model, data.target_val.X)
    loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(data.target_val.y)))
    return {"val_f1": macro_f1(data.target_val.y, logits.argmax(axis=1)), "val_loss": loss, "diverged": None,
            "seconds": time.perf_counter() - start}


def report_run(inputs: ReportInputs, job: Job) -> dict[str, Any]:
    """Train at the chosen rate and measure what the bench reports (see the module docstring)."""
    data = inputs.data[job.seed_index]
    model, method, tcfg, seed = _adapted(inputs, job, data)
    trainable = sum(p.numel() for _, p in method.trainable_parameters(model))
    untrained = copy.deepcopy(model)
    out: dict[str, Any] = {"seed": seed, "lr": job.lr, "trainable_params": trainable}
    if job.seed_index == 0:
        out["once"] = {"description": method.description, "config": inputs.configs[job.method][0].model_dump(mode="json"),
                       "train": tcfg.model_dump(mode="json"),
                       **measure_step_flops(model, method, tcfg, data.target_train)}
    start = time.perf_counter()
    result = fit(model, method, data.target_train, tcfg, seed, eval_split=inputs.curve_splits[job.seed_index],
                 desc=f"{job.method} seed {seed}", progress=False)
    out["f1"], out["accuracy"] = evaluate(model, data.target_test)
    out["val_f1"] = evaluate(model, data.target_val)[0] if len(data.target_val) else None
    out["seconds"] = time.perf_counter() - start
    out["device"] = result.device
    model.cpu()  # fusion and export run on the CPU whatever device trained
    if job.seed_index == 0:
        sample = torch.from_numpy(data.target_test.X[:1])
        out["once"].update(fusion_row(method, model, inputs.original, inputs.original_onnx, sample, data.target_test.X,
                                      inputs.recipe))
    out.update({
        "steps_to_target": result.steps_to_target,
        "train_seconds": result.train_seconds,
        "peak_memory_bytes": result.peak_memory_bytes,
        "memory_breakdown": result.memory_breakdown,
        "curve": result.curve,
        "adapter_bytes": adapter_bytes(method, model),
        "wall_seconds_per_step": time_train_steps(untrained, method, tcfg, data.target_train,
                                                  inputs.recipe.bench.timing_steps),
    })
    return out


def run_name(fn: Callable, inputs, job: Job) -> str:
    """How the progress lines name a run: 'select lora seed 1 lr 0.003', 'report ttlora seed 0 lr 0.01'."""
    kind = {"selection_run": "select", "report_run": "report"}.get(getattr(fn, "__name__", ""), "run")
    seeds = getattr(inputs, "seeds", None)
    seed = seeds[job.seed_index] if seeds is not None else job.seed_index
    return f"{kind} {job.method} seed {seed} lr {job.lr:g}"


def run_failed(name: str, exc: BaseException, where: str = "") -> Exception:
    """The one-line error for run `name` that raised `exc` (`where`: e.g. ' on node 10.0.0.7'): bad input or
    environment (an EdgetoolError) keeps its exit code; anything else is edgetool's own failure (exit 3)."""
    text = f"run '{name}' failed{where}: {first_line(exc)}"
    if isinstance(exc, EdgetoolError):
        err = EdgetoolError(text)
        err.exit_code = exc.exit_code
        return err
    return InternalError(f"{text} ({type(exc).__name__})")


def pickled_inputs(inputs, where: str, instead: str) -> bytes:
    """`inputs` pickled for other processes; one that cannot be is one line naming the option to use instead."""
    try:
        return pickle.dumps(inputs, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        # e.g. a model.factory model holding a lambda or a class defined in a script
        raise EdgetoolError(f"{where}: the model or data cannot be sent to worker processes "
                            f"({type(exc).__name__}: {exc}); run with {instead}") from None


# In a worker: the inputs of the runs it is given, loaded once per inputs file.
_LOADED: dict[str, Any] = {}


def _worker_init(parent: int) -> None:
    torch.set_num_threads(1)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    # A worker of a killed bench would otherwise wait for work forever (its queue never reaches end of file).
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _call(fn: Callable, inputs_path: str, job: Job) -> dict[str, Any]:
    if inputs_path not in _LOADED:
        _LOADED.clear()
        with open(inputs_path, "rb") as f:
            _LOADED[inputs_path] = pickle.load(f)
    return fn(_LOADED[inputs_path], job)


class RunPool:
    """Runs fn(inputs, job) for many jobs: in this process (workers 1) or in `workers` processes started once
    and kept for every batch (spawn, not fork: a forked child of a process that has used OpenMP threads can
    hang). Each batch's inputs are written to `workdir` (default: a temporary directory of the pool's own)
    and read by a worker when it first needs them, so a batch's inputs exist for the workers only from that
    batch on."""

    def __init__(self, workers: int, workdir: Path | None = None):
        self.workers, self.batches = workers, 0
        self.workdir = Path(workdir) if workdir is not None else None
        self.pool: cf.ProcessPoolExecutor | None = None
        self._own_dir = contextlib.ExitStack()

    def __enter__(self) -> "RunPool":
        if self.workers > 1:
            if self.workdir is None:
                self.workdir = self._own_dir.enter_context(scratch_dir("bench"))
            self.pool = cf.ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                               initializer=_worker_init, initargs=(os.getpid(),))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=exc_type is None, cancel_futures=exc_type is not None)
        self._own_dir.close()

    def for_recipe(self, device: str) -> "RunPool":
        """The pool for one recipe's runs, which train on `device` (every local run sees this machine's devices)."""
        return self

    def describe(self) -> dict[str, Any]:
        return {"name": "local", "workers": self.workers}

    def run(self, fn: Callable[[Any, Job], dict[str, Any]], jobs: list[Job], inputs,
            on_done: Callable[[Job, dict[str, Any]], None] | None = None) -> dict[Job, dict[str, Any]]:
        """{job: fn(inputs, job)}; on_done(job, result) is called in this process as each run finishes."""
        results: dict[Job, dict[str, Any]] = {}
        if self.pool is None:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for job in jobs:
                    try:
                        results[job] = fn(inputs, job)
                    except Exception as exc:
                        raise run_failed(run_name(fn, inputs, job), exc) from exc
                    if on_done is not None:
                        on_done(job, results[job])
            finally:
                torch.set_num_threads(threads)
            return results
        self.batches += 1
        path = self.workdir / f"run-inputs-{self.batches}.pickle"
        path.write_bytes(pickled_inputs(inputs, f"--workers {self.workers}", "--workers 1"))
        futures = {self.pool.submit(_call, fn, str(path), job): job for job in jobs}
        for future in cf.as_completed(futures):
            job = futures[future]
            try:
                results[job] = future.result()
            except Exception as exc:
                raise run_failed(run_name(fn, inputs, job), exc) from exc
            if on_done is not None:
                on_done(job, results[job])
        return results

