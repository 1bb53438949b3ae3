"""ONNX Runtime: the one place edgetool makes an InferenceSession, its runner and its backend."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import EdgetoolError
from .base import Availability, Backend, PolygraphyRunner, Runner, first_line, register_backend
from .cuda import CudaDevice, cuda_device

if TYPE_CHECKING:
    from ..enginedir import EngineDir

ONNXRUNTIME_MISSING = ("ONNX Runtime is not installed (neither 'onnxruntime' nor 'onnxruntime-gpu'): "
                       "`pip install \"edgetool[onnxruntime]\"`, or onnxruntime-gpu on a GPU machine or Jetson")


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise EdgetoolError(f"{ONNXRUNTIME_MISSING} ({first_line(exc)})") from None
    return onnxruntime


def ort_session(model, providers: list[str] | None = None, optimization: str = "all",
                optimized_model_path: Path | None = None):
    """An InferenceSession for `model` (a path, or an onnx.ModelProto). Like Polygraphy's SessionFromOnnx
    (one intra-op thread per usable CPU) but with thread-pool spinning off: verify interleaves several
    sessions in one process, and a pool left spinning after its run competes with the next session's
    threads. `optimization`: "all" (default), "basic" (constant folding only) or "disabled";
    `optimized_model_path` saves the optimised graph there."""
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # warnings about unused initializers etc. are not the user's concern
    opts.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                      "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                      "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[optimization]
    if optimized_model_path is not None:
        opts.optimized_model_filepath = str(optimized_model_path)
    try:
        opts.intra_op_num_threads = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS, Windows): ONNX Runtime's default
        pass
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    src = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    what = "the graph" if hasattr(model, "SerializeToString") else str(model)
    try:
        return ort.InferenceSession(src, sess_options=opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types (InvalidGraph, Fail, ...)
        raise EdgetoolError(f"onnxruntime cannot load {what}: {first_line(exc)}") from None


def run_onnx(model, X: np.ndarray, providers: list[str] | None = None, batch_size: int = 256) -> np.ndarray:
    """Outputs of the graph's first output for inputs X (float32, [N, ...]), run in batches."""
    sess = ort_session(model, providers)
    name = sess.get_inputs()[0].name
    X = np.ascontiguousarray(X, dtype=np.float32)
    return np.concatenate([sess.run(None, {name: X[i: i + batch_size]})[0] for i in range(0, len(X), batch_size)])


class OnnxRuntimeRunner(PolygraphyRunner):
    backend = "onnxruntime"

    def __init__(self, path: Path, graph: str, precision: str, providers: list[str], input_name: str, output_name: str):
        self.path = Path(path)
        self.providers = providers

        def make():
            from polygraphy.backend.onnxrt import OnnxrtRunner

            return OnnxrtRunner(lambda: ort_session(self.path, providers), name=self.path.name)

        super().__init__(self.path.name, graph, precision, make, input_name, output_name)


@register_backend
class OnnxRuntimeBackend(Backend):
    """FP32 and FP16 graphs on ONNX Runtime: the CUDA provider when it and a device are usable, else CPU."""

    name = "onnxruntime"

    def __init__(self):
        self._providers: list[str] | None = None
        self._device: CudaDevice | None = None

    @property
    def providers(self) -> list[str]:
        if self._providers is None:
            import onnxruntime as ort

            self._providers = ["CPUExecutionProvider"]
            if "CUDAExecutionProvider" in ort.get_available_providers():
                self._device, _ = cuda_device()
                if self._device is not None:
                    self._providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return self._providers

    @property
    def on_gpu(self) -> bool:
        return self.providers[0] == "CUDAExecutionProvider"

    def probe(self) -> Availability:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return Availability(False, f"onnxruntime cannot be imported ({first_line(exc)})")
        return Availability(True, f"onnxruntime {ort.__version__} with {self.providers[0]}")

    def accuracy_precisions(self) -> list[str]:
        return ["fp32", "fp16"]

    def latency_precision(self) -> str:
        # FP16 is the deployed precision on a GPU; on a CPU ONNX Runtime runs FP16 graphs through casts,
        # so FP32 is what one would ship there.
        return "fp16" if self.on_gpu else "fp32"

    def executed_as(self, precision: str) -> str:
        if precision == "fp32":
            return f"float32 graph on ONNX Runtime ({self.providers[0]})"
        if self.on_gpu:
            return "float16 graph on ONNX Runtime CUDAExecutionProvider: float16 arithmetic"
        # Seen in the session's optimised graph: 'InsertedPrecisionFreeCast_*' nodes before every Conv/Gemm.
        return ("float16 graph on ONNX Runtime CPUExecutionProvider: float16 weights and graph I/O casts, float32 "
                "arithmetic (the CPU provider casts float16 weights up for kernels it lacks in float16)")

    def runner(self, ed: EngineDir, graph: str, precision: str, batch_sizes: tuple[int, ...], echo=None) -> Runner:
        path = ed.onnx(graph, precision)
        if not path.is_file():
            raise EdgetoolError(f"{path} not found: ENGINE_DIR is incomplete; rerun `edgetool fuse-export`")
        return OnnxRuntimeRunner(path, graph, precision, self.providers, ed.input_name, ed.output_name)

    def runtime_graph(self, ed: EngineDir, graph: str, precision: str, out_dir: Path) -> Path | None:
        """The graph after this session's optimisations (same providers and options as the runners)."""
        optimized = Path(out_dir) / f"{graph}.{precision}.{self.providers[0]}.optimized.onnx"
        ort_session(ed.onnx(graph, precision), self.providers, optimized_model_path=optimized)
        return optimized

    def file_runner(self, path: Path, name: str, ed: EngineDir) -> Runner:
        return OnnxRuntimeRunner(path, name, "fp32", self.providers, ed.input_name, ed.output_name)

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        d: dict[str, Any] = {"onnxruntime": ort.__version__, "providers": self.providers}
        if self._device is not None:
            d["device"] = self._device.name
        return d
