"""TensorRT through Polygraphy's loaders: FP16 engines for original and fused, cached in the engine dir."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..artifacts import atomic_write_bytes, atomic_write_json, sha256_file
from ..errors import EdgetoolError
from .base import Availability, Backend, PolygraphyRunner, Runner, first_line, quiet_polygraphy, register_backend
from .cuda import CudaDevice, cuda_device

if TYPE_CHECKING:
    from ..enginedir import EngineDir

TENSORRT_MISSING = (
    "TensorRT is not installed (the Python module 'tensorrt' cannot be imported): on a Jetson it ships with "
    "JetPack (`sudo apt install python3-libnvinfer`, then create the venv with --system-site-packages); on x86 "
    "`pip install tensorrt` (from NVIDIA's Python package index); or run `--engine onnxruntime`"
)



def import_tensorrt():
    """The tensorrt module, or an EdgetoolError saying how to install it (one line)."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        if exc.name == "tensorrt":  # the module itself is absent
            raise EdgetoolError(TENSORRT_MISSING) from None
        broken = exc
    except OSError as exc:  # e.g. libnvinfer.so missing or of another version
        broken = exc
    raise EdgetoolError(f"TensorRT is installed but `import tensorrt` fails ({first_line(broken)}): on a Jetson "
                        "reinstall JetPack's python3-libnvinfer; elsewhere reinstall the tensorrt wheel matching your "
                        "CUDA; or run `--engine onnxruntime`")


class TensorRTRunner(PolygraphyRunner):
    """Deserialises a cached engine file (see `TensorRTBackend.engine_for`) and runs it with TrtRunner."""

    backend = "tensorrt"

    def __init__(self, plan: Path, graph: str, precision: str, input_name: str, output_name: str):
        self.plan = Path(plan)

        def make():
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner

            return TrtRunner(EngineFromBytes(self.plan.read_bytes()), name=self.plan.name)

        super().__init__(self.plan.name, graph, precision, make, input_name, output_name)


@register_backend
class TensorRTBackend(Backend):
    """FP16 engines for `original` and `fused`, built once and cached in ENGINE_DIR.

    Two build paths, chosen by what the installed TensorRT offers (not by guessing from its version):
    - TensorRT 10 (JetPack 6): `trt.BuilderFlag.FP16` exists -> build from the FP32 ONNX with the FP16
      builder flag (weakly typed: TensorRT may pick FP16 kernels, falls back to FP32).
    - TensorRT 11: the FP16 builder flag is gone and every network is strongly typed -> build from
      `*.fp16.onnx` (FP16 weights/activations, FP32 I/O, as fuse-export wrote it) with a strongly typed
      network, so the precision is the graph's, exactly.
    Engines are keyed by TensorRT version and device (name and compute capability) in the file name,
    with a sidecar JSON recording the key, the ONNX file's sha256 and the build settings; a key
    mismatch, an ONNX file newer than the engine or a changed ONNX hash rebuilds it."""

    name = "tensorrt"

    def __init__(self):
        self._trt = None
        self._device: CudaDevice | None = None

    def probe(self) -> Availability:
        try:
            trt = import_tensorrt()
        except EdgetoolError as exc:
            return Availability(False, str(exc))
        device, why = cuda_device()
        if device is None:
            return Availability(False, f"TensorRT {trt.__version__} is installed but {why}")
        self._trt, self._device = trt, device
        return Availability(True, f"TensorRT {trt.__version__} on {device.name} (compute {device.compute_capability})",
                            self.describe())

    def require(self) -> None:
        if self._trt is None:
            avail = self.probe()
            if not avail.usable:
                raise EdgetoolError(avail.reason)

    @property
    def has_fp16_flag(self) -> bool:
        return hasattr(self._trt.BuilderFlag, "FP16")

    @property
    def build_mode(self) -> str:
        return "fp32-onnx+fp16-flag" if self.has_fp16_flag else "fp16-onnx+strongly-typed"

    def accuracy_precisions(self) -> list[str]:
        return ["fp16"]

    def executed_as(self, precision: str) -> str:
        return f"TensorRT FP16 engine ({self.build_mode})"

    def latency_precision(self) -> str:
        return "fp16"

    def describe(self) -> dict[str, Any]:
        if self._trt is None:
            return {}
        return {"tensorrt": self._trt.__version__, "device": self._device.name,
                "compute_capability": self._device.compute_capability, "build_mode": self.build_mode}

    def cache_key(self, ed: EngineDir, batch_sizes: tuple[int, ...]) -> dict[str, Any]:
        return {
            "tensorrt": self._trt.__version__,
            "device": self._device.name,
            "compute_capability": self._device.compute_capability,
            "build_mode": self.build_mode,
            "profile": {"min": 1, "opt": max(batch_sizes), "max": max(batch_sizes)},
        }

    def engine_for(self, ed: EngineDir, graph: str, batch_sizes: tuple[int, ...], echo=None) -> Path:
        """The cached FP16 engine for `graph`, rebuilt when stale."""
        self.require()
        onnx_path = ed.onnx(graph, "fp32" if self.has_fp16_flag else "fp16")
        if not onnx_path.is_file():
            raise EdgetoolError(f"{onnx_path} not found: ENGINE_DIR is incomplete; rerun `edgetool fuse-export`")
        plan = ed.plan(graph, "fp16", self._trt.__version__, self._device.slug)
        sidecar = plan.with_name(plan.name + ".json")
        key = {**self.cache_key(ed, batch_sizes), "onnx": onnx_path.name, "onnx_sha256": sha256_file(onnx_path)}
        why = engine_staleness(plan, sidecar, onnx_path, key)
        if why is None:
            return plan
        if echo is not None:
            echo(f"building TensorRT engine {plan.name} ({why}; {self.build_mode})")
        atomic_write_bytes(plan, self._build(ed, onnx_path, batch_sizes))
        atomic_write_json(sidecar, key)
        return plan

    def _build(self, ed: EngineDir, onnx_path: Path, batch_sizes: tuple[int, ...]) -> bytes:
        from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
        from polygraphy.exception import PolygraphyException

        shape, top = tuple(ed.input_shape), max(batch_sizes)
        profile = Profile().add(ed.input_name, min=(1, *shape), opt=(top, *shape), max=(top, *shape))
        typed = not self.has_fp16_flag
        try:
            with quiet_polygraphy():
                network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=typed)
                config = CreateConfig(fp16=not typed, profiles=[profile])
                return bytes(EngineBytesFromNetwork(network, config=config)())
        except PolygraphyException as exc:
            raise EdgetoolError(f"TensorRT could not build an engine from {onnx_path.name}: {first_line(exc)}") from None

    def runner(self, ed: EngineDir, graph: str, precision: str, batch_sizes: tuple[int, ...], echo=None) -> Runner:
        if precision != "fp16":
            raise EdgetoolError("the tensorrt backend builds FP16 engines only")
        return TensorRTRunner(self.engine_for(ed, graph, batch_sizes, echo), graph, precision, ed.input_name, ed.output_name)


def engine_staleness(plan: Path, sidecar: Path, onnx_path: Path, key: dict[str, Any]) -> str | None:
    """Why a cached engine must be rebuilt, or None when it is fresh."""
    if not plan.is_file() or not sidecar.is_file():
        return "no cached engine"
    try:
        cached = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return "unreadable cache key"
    changed = sorted(k for k in key if cached.get(k) != key[k])
    if changed:
        return "cache key changed: " + ", ".join(changed)
    if onnx_path.stat().st_mtime > plan.stat().st_mtime:
        return f"{onnx_path.name} is newer than the engine"
    return None
