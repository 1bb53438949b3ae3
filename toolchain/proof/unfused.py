"""What fusion saves, measured: the unfused adapted model (adapter modules still in the graph) timed against
the fused one in the same runtime each: eager PyTorch, and ONNX Runtime FP32 when the unfused model
exports. Informational (verify reports it; no check rests on it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..artifacts import scratch_dir
from ..console import say
from ..backends.base import BACKENDS, Backend, Runner
from ..backends.onnxruntime import ort_session
from ..backends.pytorch import TorchRunner
from ..errors import first_line
from ..backends.timing import interleaved_rounds
from ..enginedir import EngineDir
from .export import export_onnx
from .parity import latency_input, latency_stats
from ..recipe import VerifyConfig

# One intra-op thread while timing eager PyTorch: its OpenMP pool spin-waits, and on a loaded machine a
# multi-thread pool drowned the difference being measured. Both models get the same setting; restored after.
TORCH_TIMING_THREADS = 1



def _unfused_onnx(adapted, sample: np.ndarray, opset: int, tmp: Path) -> tuple[Path | None, int, str]:
    """Export the unfused adapted model (adapter modules still in the graph), if the exporter can:
    (path, node count, "") or (None, 0, why not)."""
    try:
        import torch

        path = tmp / "unfused.onnx"
        proto = export_onnx(adapted, torch.from_numpy(sample), path, opset)
        return path, len(proto.graph.node), ""
    except Exception as exc:  # any exporter failure just means "not exportable"; it is reported, not fatal
        return None, 0, f"not exportable to ONNX: {type(exc).__name__}: {first_line(exc)[:200]}"


def _nodes_after_ort_folding(path: Path, tmp: Path) -> int:
    """Node count of `path` after ONNX Runtime's basic (constant-folding) optimisations: it folds an
    adapter whose factors are constants back into the conv weights at session load, which is why the
    unfused graph costs about the same as the fused one on ONNX Runtime (eager PyTorch has no such pass)."""
    optimized = tmp / f"{path.stem}.ort-basic.onnx"
    ort_session(path, optimization="basic", optimized_model_path=optimized)
    return len(onnx.load(str(optimized)).graph.node)


def unfused_comparison(adapted, fused, backend: Backend, ed: EngineDir, X: np.ndarray,
                   batch_sizes: tuple[int, ...], cfg: VerifyConfig, echo) -> dict[str, Any]:
    """What fusion saved: the unfused adapted model against the fused one, in the same runtime each
    (eager PyTorch; ONNX Runtime FP32 when the unfused model exports). Informational, no check, so
    fewer runs: eager PyTorch at the recipe batch is the slowest thing verify times."""
    iters = min(cfg.unfused_iterations, cfg.iterations)
    ms: dict[str, dict[str, Any]] = {"torch": {}, "onnxruntime": {}}
    ratio: dict[str, dict[str, float] | None] = {"torch": {}, "onnxruntime": {}}

    def time_pair(runtime: str, unfused_runner: Runner, fused_runner: Runner) -> None:
        for bs in batch_sizes:
            times = interleaved_rounds({"unfused": unfused_runner, "fused": fused_runner}, latency_input(X, bs),
                                       cfg.warmup, iters)
            st = {n: latency_stats(t) for n, t in times.items()}
            ms[runtime][str(bs)] = st
            ratio[runtime][str(bs)] = st["unfused"]["p50"] / st["fused"]["p50"]

    import torch

    # See TORCH_TIMING_THREADS.
    threads = torch.get_num_threads()
    torch.set_num_threads(TORCH_TIMING_THREADS)
    try:
        with TorchRunner(adapted, "unfused PyTorch", "unfused") as ru, TorchRunner(fused, "fused PyTorch", "fused") as rf:
            time_pair("torch", ru, rf)
    finally:
        torch.set_num_threads(threads)
    # The unfused graph runs on this backend when it can run a loose FP32 file; else on ONNX Runtime.
    timing = backend if backend.file_runner(ed.onnx("fused", "fp32"), "probe", ed) is not None else BACKENDS["onnxruntime"]()
    info: dict[str, Any] = {"fused_nodes": len(onnx.load(str(ed.onnx("fused", "fp32"))).graph.node)}
    with scratch_dir("unfused") as tmp:
        path, info["unfused_nodes"], note = _unfused_onnx(adapted, X[:1], ed.opset, tmp)
        info["status"] = note or "exported and timed on ONNX Runtime (FP32) against fused.onnx"
        if path is not None:
            info["unfused_nodes_after_ort_folding"] = _nodes_after_ort_folding(path, tmp)
            # The same folding on fused.onnx, for a like-for-like count (it folds e.g. Clip's Constant bounds too).
            info["fused_nodes_after_ort_folding"] = _nodes_after_ort_folding(ed.onnx("fused", "fp32"), tmp)
            with timing.file_runner(path, "unfused", ed) as ru, timing.runner(ed, "fused", "fp32", batch_sizes) as rf:
                time_pair("onnxruntime", ru, rf)
        else:
            ratio["onnxruntime"] = None
            say(echo, f"note: unfused adapted model {note}; timed in PyTorch only")
    return {"unfused_latency_ratio": ratio, "unfused_latency_ms": ms, "unfused_onnx": info, "unfused_iterations": iters,
            "torch_threads": TORCH_TIMING_THREADS}
