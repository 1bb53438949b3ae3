"""Inference backends behind one runner interface, in Polygraphy's style.

A `Runner` is built cheaply (nothing is loaded), then `activate()` loads or builds what it needs,
`infer(x)` returns the output for one input batch, `time_once(x)` returns the wall-clock seconds of
one inference, and `deactivate()` frees it; runners are context managers. ONNX Runtime and
TensorRT runners wrap Polygraphy's runners and lazy loaders (`OnnxrtRunner` over a session made like
its `SessionFromOnnx`; `NetworkFromOnnxPath` + `CreateConfig` + `EngineBytesFromNetwork` +
`EngineFromBytes` + `TrtRunner`), which need no pycuda: Polygraphy talks to the CUDA runtime itself.

A `Backend` says whether it can run here (and why not), which precisions it checks and makes the
runners for the graphs of an ENGINE_DIR. Adding a backend = one subclass + `@register_backend`.
Comparison of outputs lives in `toolchain.verify`, apart from the backends.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from .artifacts import atomic_write_bytes, atomic_write_json, sha256_file
from .errors import EdgetoolError

TENSORRT_MISSING = (
    "TensorRT is not installed (the Python module 'tensorrt' cannot be imported): on a Jetson it ships with "
    "JetPack (`sudo apt install python3-libnvinfer`, then create the venv with --system-site-packages); on x86 "
    "`pip install tensorrt` (from NVIDIA's Python package index); or run `--engine onnxruntime`"
)


@contextlib.contextmanager
def quiet_polygraphy():
    """Polygraphy logs to stdout at INFO level; keep the terminal summary ours. Its critical errors
    still raise PolygraphyException, which callers turn into one-line EdgetoolErrors."""
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL + 10):
        yield


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------- runners


class Runner(ABC):
    """activate -> infer / time_once -> deactivate. `x` is a float32 array [batch, C, T...]."""

    backend: str = "?"

    def __init__(self, name: str, graph: str, precision: str):
        self.name = name
        self.graph = graph
        self.precision = precision
        self.is_active = False

    def activate(self) -> "Runner":
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def infer(self, x: np.ndarray) -> np.ndarray:
        if not self.is_active:
            raise RuntimeError(f"runner {self.name} must be activated before infer()")
        return self._infer(np.ascontiguousarray(x, dtype=np.float32))

    def time_once(self, x: np.ndarray) -> float:
        """Seconds for one inference of `x`, host to host (input copy, compute, output copy, sync)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        start = time.perf_counter()
        self._infer(x)
        return time.perf_counter() - start

    def infer_batched(self, X: np.ndarray, batch_size: int) -> np.ndarray:
        return np.concatenate([self.infer(X[i : i + batch_size]) for i in range(0, len(X), batch_size)])

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _infer(self, x: np.ndarray) -> np.ndarray: ...

    def _deactivate(self) -> None:
        pass


class TorchRunner(Runner):
    """A PyTorch module in eval mode on the CPU (the reference, and the unfused-model timing)."""

    backend = "torch"

    def __init__(self, model, name: str, graph: str):
        super().__init__(name, graph, "fp32")
        self._model = model

    def _activate(self) -> None:
        self._model.eval()

    def _infer(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self._model(torch.from_numpy(x)).float().numpy()


class PolygraphyRunner(Runner):
    """Wraps a Polygraphy runner made by `make_runner()` on activation (its loaders are lazy too)."""

    def __init__(self, name: str, graph: str, precision: str, make_runner: Callable[[], Any],
                 input_name: str, output_name: str):
        super().__init__(name, graph, precision)
        self._make_runner = make_runner
        self.input_name = input_name
        self.output_name = output_name
        self._runner = None

    def _activate(self) -> None:
        from polygraphy.exception import PolygraphyException

        try:
            with quiet_polygraphy():
                self._runner = self._make_runner()
                self._runner.activate()
        except PolygraphyException as exc:
            self._runner = None
            raise EdgetoolError(f"{self.backend}: cannot load {self.name}: {_first_line(exc)}") from None

    def _infer(self, x: np.ndarray) -> np.ndarray:
        out = self._runner.infer({self.input_name: x}, check_inputs=False)
        # Polygraphy runners may reuse output buffers between calls.
        return np.array(out[self.output_name], dtype=np.float32, copy=True)

    def _deactivate(self) -> None:
        with quiet_polygraphy():
            self._runner.deactivate()
        self._runner = None


class OnnxRuntimeRunner(PolygraphyRunner):
    backend = "onnxruntime"

    def __init__(self, path: Path, graph: str, precision: str, providers: list[str], input_name: str, output_name: str):
        self.path = Path(path)
        self.providers = providers

        def make():
            from polygraphy.backend.onnxrt import OnnxrtRunner

            return OnnxrtRunner(lambda: onnxruntime_session(self.path, providers), name=self.path.name)

        super().__init__(self.path.name, graph, precision, make, input_name, output_name)


def onnxruntime_session(path: Path, providers: list[str]):
    """An InferenceSession like Polygraphy's SessionFromOnnx makes (one intra-op thread per usable CPU,
    full graph optimisation), but with thread-pool spinning off: verify interleaves several sessions in
    one process, and a pool left spinning after its run competes with the next session's threads (on
    a 2-core CPU that made every session ~2.5x slower and the timings noisier)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    try:
        opts.intra_op_num_threads = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS, Windows): ONNX Runtime's default
        pass
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types (InvalidGraph, Fail, ...)
        raise EdgetoolError(f"onnxruntime cannot load {path}: {_first_line(exc)}") from None


class TensorRTRunner(PolygraphyRunner):
    """Deserialises a cached engine file (see `TensorRTBackend.engine_for`) and runs it with TrtRunner."""

    backend = "tensorrt"

    def __init__(self, plan: Path, graph: str, precision: str, input_name: str, output_name: str):
        self.plan = Path(plan)

        def make():
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner

            return TrtRunner(EngineFromBytes(self.plan.read_bytes()), name=self.plan.name)

        super().__init__(self.plan.name, graph, precision, make, input_name, output_name)


# --------------------------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class CudaDevice:
    name: str
    compute_capability: str  # "8.7"

    @property
    def slug(self) -> str:
        return f"sm{self.compute_capability.replace('.', '')}-{re.sub(r'[^a-z0-9]+', '-', self.name.lower()).strip('-')}"


def cuda_device() -> tuple[CudaDevice | None, str]:
    """The first CUDA device through the CUDA runtime Polygraphy loads (no pycuda, no torch.cuda needed),
    or None and the reason none is usable."""
    try:
        from polygraphy import cuda
        from polygraphy.exception import PolygraphyException

        with quiet_polygraphy():
            lib = cuda.wrapper().handle
    except (OSError, ImportError) as exc:
        return None, f"the CUDA runtime library cannot be loaded ({_first_line(exc)})"
    except PolygraphyException as exc:  # pragma: no cover - depends on the machine
        return None, f"the CUDA runtime library cannot be loaded ({_first_line(exc)})"
    count = ctypes.c_int(0)
    status = lib.cudaGetDeviceCount(ctypes.byref(count))
    if status != 0 or count.value < 1:
        return None, f"no CUDA device is usable (cudaGetDeviceCount returned status {status}, {count.value} devices)"
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    # cudaDevAttrComputeCapabilityMajor = 75, ...Minor = 76 (stable enum values of the runtime API).
    lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0)
    lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0)
    # cudaDeviceProp starts with `char name[256]` in every CUDA version; the buffer is larger than the struct.
    props = ctypes.create_string_buffer(8192)
    get_props = getattr(lib, "cudaGetDeviceProperties_v2", None) or lib.cudaGetDeviceProperties
    name = props.raw[:256].split(b"\0", 1)[0].decode(errors="replace") if get_props(props, 0) == 0 else "cuda-device"
    return CudaDevice(name or "cuda-device", f"{major.value}.{minor.value}"), ""


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
    raise EdgetoolError(f"TensorRT is installed but `import tensorrt` fails ({_first_line(broken)}): on a Jetson "
                        "reinstall JetPack's python3-libnvinfer; elsewhere reinstall the tensorrt wheel matching your "
                        "CUDA; or run `--engine onnxruntime`")


# --------------------------------------------------------------------------------------------- backends


@dataclass
class GraphSpec:
    """What the runners need to know about an ENGINE_DIR (from its fuse_report.json)."""

    engine_dir: Path
    input_name: str
    output_name: str
    input_shape: tuple[int, ...]  # without the batch axis
    max_batch: int  # largest batch any runner is asked to run
    opt_batch: int  # the batch TensorRT optimises for

    def onnx(self, graph: str, precision: str) -> Path:
        return self.engine_dir / (f"{graph}.onnx" if precision == "fp32" else f"{graph}.fp16.onnx")


@dataclass
class Availability:
    usable: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


class Backend(ABC):
    name: ClassVar[str]

    @abstractmethod
    def probe(self) -> Availability:
        """Can this backend run here? Never raises; says why not."""

    @abstractmethod
    def accuracy_precisions(self) -> list[str]:
        """Precisions whose fused engine is checked against the fused PyTorch model."""

    @abstractmethod
    def latency_precision(self) -> str:
        """The precision deployed on this backend: the one whose latency is compared."""

    @abstractmethod
    def runner(self, spec: GraphSpec, graph: str, precision: str, echo=None) -> Runner:
        """A (not yet active) runner for ENGINE_DIR's `graph` at `precision`."""

    def executed_as(self, precision: str) -> str:
        """How this backend actually computes a graph of `precision` (recorded next to its figures)."""
        return precision

    def describe(self) -> dict[str, Any]:
        return {}


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    BACKENDS[cls.name] = cls
    return cls


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
            return Availability(False, f"onnxruntime cannot be imported ({_first_line(exc)})")
        return Availability(True, f"onnxruntime {ort.__version__} with {self.providers[0]}", self.describe())

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

    def runner(self, spec: GraphSpec, graph: str, precision: str, echo=None) -> Runner:
        path = spec.onnx(graph, precision)
        if not path.is_file():
            raise EdgetoolError(f"{path} not found: ENGINE_DIR is incomplete; rerun `edgetool fuse-export`")
        return OnnxRuntimeRunner(path, graph, precision, self.providers, spec.input_name, spec.output_name)

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        d: dict[str, Any] = {"onnxruntime": ort.__version__, "providers": self.providers}
        if self._device is not None:
            d["device"] = self._device.name
        return d


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

    def cache_key(self, spec: GraphSpec) -> dict[str, Any]:
        return {
            "tensorrt": self._trt.__version__,
            "device": self._device.name,
            "compute_capability": self._device.compute_capability,
            "build_mode": self.build_mode,
            "profile": {"min": 1, "opt": spec.opt_batch, "max": spec.max_batch},
        }

    def engine_for(self, spec: GraphSpec, graph: str, echo=None) -> Path:
        """The cached FP16 engine for `graph`, rebuilt when stale."""
        self.require()
        onnx_path = spec.onnx(graph, "fp32" if self.has_fp16_flag else "fp16")
        if not onnx_path.is_file():
            raise EdgetoolError(f"{onnx_path} not found: ENGINE_DIR is incomplete; rerun `edgetool fuse-export`")
        plan = spec.engine_dir / f"{graph}.fp16.trt{self._trt.__version__}.{self._device.slug}.plan"
        sidecar = plan.with_name(plan.name + ".json")
        key = {**self.cache_key(spec), "onnx": onnx_path.name, "onnx_sha256": sha256_file(onnx_path)}
        why = engine_staleness(plan, sidecar, onnx_path, key)
        if why is None:
            return plan
        if echo is not None:
            echo(f"building TensorRT engine {plan.name} ({why}; {self.build_mode})")
        atomic_write_bytes(plan, self._build(spec, onnx_path))
        atomic_write_json(sidecar, key)
        return plan

    def _build(self, spec: GraphSpec, onnx_path: Path) -> bytes:
        from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
        from polygraphy.exception import PolygraphyException

        shape = tuple(spec.input_shape)
        profile = Profile().add(spec.input_name, min=(1, *shape), opt=(spec.opt_batch, *shape), max=(spec.max_batch, *shape))
        typed = not self.has_fp16_flag
        try:
            with quiet_polygraphy():
                network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=typed)
                config = CreateConfig(fp16=not typed, profiles=[profile])
                return bytes(EngineBytesFromNetwork(network, config=config)())
        except PolygraphyException as exc:
            raise EdgetoolError(f"TensorRT could not build an engine from {onnx_path.name}: {_first_line(exc)}") from None

    def runner(self, spec: GraphSpec, graph: str, precision: str, echo=None) -> Runner:
        if precision != "fp16":
            raise EdgetoolError("the tensorrt backend builds FP16 engines only")
        return TensorRTRunner(self.engine_for(spec, graph, echo), graph, precision, spec.input_name, spec.output_name)


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


# --------------------------------------------------------------------------------------------- selection


def select_backend(choice: str) -> tuple[Backend, str]:
    """The backend for `--engine` and a sentence saying which and why. `auto` takes TensorRT when it
    imports and a CUDA device is usable, else ONNX Runtime."""
    if choice == "auto":
        trt = TensorRTBackend()
        avail = trt.probe()
        if avail.usable:
            return trt, f"auto: {avail.reason}"
        ort = OnnxRuntimeBackend()
        ort_avail = ort.probe()
        if not ort_avail.usable:
            raise EdgetoolError(f"no backend is usable: {avail.reason}; {ort_avail.reason}")
        why = avail.reason.split(":")[0] if avail.reason.startswith("TensorRT is not installed") else avail.reason
        return ort, f"auto: {why}; using {ort_avail.reason}"
    if choice not in BACKENDS:
        raise EdgetoolError(f"unknown engine '{choice}' (choose from {', '.join([*BACKENDS, 'auto'])})")
    backend = BACKENDS[choice]()
    avail = backend.probe()
    if not avail.usable:
        raise EdgetoolError(avail.reason)
    return backend, avail.reason
