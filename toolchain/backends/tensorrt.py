"""TensorRT through Polygraphy's loaders: FP16 engines for original and fused, built together from one
precision plan (`trtplan.plan_build`) with one shared timing cache, cached in the engine dir, inspected
layer by layer and timed on the GPU with CUDA events. The decisions live in trtplan.py (pure), the
layer comparison in engine_inspect.py (pure); this module only carries them out."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..console import say
from ..artifacts import atomic_write_bytes, atomic_write_json, scratch_dir, sha256_file
from ..enginedir import GRAPHS
from ..errors import EdgetoolError
from .base import (Availability, Backend, PolygraphyRunner, Runner, cause_of_failure, first_line, polygraphy_errors,
                   register_backend)
from .cuda import CudaDevice, CudaGraph, EventTimer, cuda_device, host_bound
from .engine_inspect import parse_engine_information, profile_layers
from .jetson import jetson_state, l4t_release
from .timing import timed_loop
from .trtexec import find_trtexec, run_trtexec, trtexec_command
from .trtplan import (STRONGLY_TYPED, BuildPlan, DeviceFacts, TrtFacts, binding_error, engine_staleness, plan_build,
                      trt_facts)

if TYPE_CHECKING:
    from ..enginedir import EngineDir

TENSORRT_MISSING = (
    "TensorRT is not installed (the Python module 'tensorrt' cannot be imported): on a Jetson it ships with "
    "JetPack (`sudo apt install python3-libnvinfer`, then create the venv with --system-site-packages); on x86 "
    "`pip install tensorrt` (from NVIDIA's Python package index); or run `--engine onnxruntime`"
)

__all__ = ["TENSORRT_MISSING", "TensorRTBackend", "TensorRTRunner", "engine_staleness", "import_tensorrt"]


_MISSING_LIBRARY = re.compile(r"(lib[\w+-]+\.so[\w.]*)")


def import_tensorrt():
    """The tensorrt module, or an EdgetoolError saying how to install it (one line)."""
    if importlib.util.find_spec("tensorrt") is None:  # the Python module itself is absent
        raise EdgetoolError(TENSORRT_MISSING)
    try:
        return importlib.import_module("tensorrt")
    except (ImportError, OSError) as exc:
        # The bindings are there but will not load: their extension module is itself named `tensorrt`, so
        # a missing libnvinfer.so.N surfaces as ImportError(name='tensorrt'), like an absent module.
        raise EdgetoolError(broken_tensorrt_message(exc)) from None


def broken_tensorrt_message(exc: BaseException) -> str:
    """One line for a TensorRT whose Python bindings are installed but do not load: the shared library
    that is missing or of another version (libnvinfer.so.10, ...) when the loader names one."""
    text = first_line(exc)
    lib = _MISSING_LIBRARY.search(text)
    if lib and "cannot open shared object file" in text:
        cause = (f"the TensorRT Python bindings are installed but the library {lib.group(1)} they link against is "
                 "not found (TensorRT's native libraries are missing or of another major version)")
    elif lib:
        cause = (f"the TensorRT Python bindings are installed but do not fit {lib.group(1)} ({text}): the bindings and "
                 "TensorRT's native libraries are of different versions")
    else:
        cause = f"TensorRT is installed but `import tensorrt` fails ({text})"
    return (f"{cause}: on a Jetson reinstall JetPack's TensorRT (`sudo apt install --reinstall tensorrt "
            "python3-libnvinfer`); elsewhere install the tensorrt wheel matching your CUDA together with its "
            "libraries (`pip install tensorrt-cu12`); or run `--engine onnxruntime`")


@contextlib.contextmanager
def trt_calls(facts: TrtFacts | None, what: str):
    """TensorRT/Polygraphy work whose failure becomes one line naming its cause: the last error TensorRT or
    the ONNX parser logged (not Polygraphy's "Could not parse ONNX correctly"), or, for an AttributeError /
    TypeError from the bindings, the mismatched TensorRT/Polygraphy pair."""
    from polygraphy.exception import PolygraphyException

    errors: list[str] = []
    try:
        with polygraphy_errors() as errors:
            yield
    except PolygraphyException as exc:
        raise EdgetoolError(f"TensorRT: {what}: {cause_of_failure(errors, exc)}") from None
    except (AttributeError, TypeError) as exc:
        raise binding_error(facts, what, exc) from None


class _DeviceResident:
    """A second execution context of a runner's engine for timing: one profile, one input shape, the input
    copied to the GPU once and the outputs allocated there, so an iteration is the enqueue alone --
    `execute_async_v3`, or the CUDA graph captured from it (as trtexec --useCudaGraph) when it captures."""

    def __init__(self, trt, engine, profile: int, x: np.ndarray, input_name: str):
        from polygraphy import cuda

        self.stream = cuda.Stream()
        self.buffers: list[Any] = []
        self.graph: CudaGraph | None = None
        self.context = engine.create_execution_context()
        if not self.context.set_optimization_profile_async(profile, self.stream.ptr):
            raise EdgetoolError(f"TensorRT refused optimisation profile {profile}")
        self.stream.synchronize()
        if not self.context.set_input_shape(input_name, tuple(x.shape)):
            raise EdgetoolError(f"TensorRT refused input shape {tuple(x.shape)} on profile {profile}")
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            nbytes = int(np.prod(tuple(self.context.get_tensor_shape(name)))) * dtype.itemsize
            buf = cuda.DeviceArray.raw((max(nbytes, 1),))
            self.buffers.append(buf)
            if name == input_name:
                buf.copy_from(np.ascontiguousarray(x, dtype=dtype).view(np.uint8).reshape(-1))
            if not self.context.set_tensor_address(name, buf.ptr):
                raise EdgetoolError(f"TensorRT refused the device address of tensor '{name}'")
        self.graph, self.graph_note = CudaGraph.capture(self.enqueue, self.stream.ptr)
        self.timer = EventTimer()
        self.chunks = self.host_bound_chunks = 0

    def enqueue(self) -> bool:
        return bool(self.context.execute_async_v3(self.stream.ptr))

    def launch(self) -> None:
        if self.graph is not None:
            self.graph.launch(self.stream.ptr)
        elif not self.enqueue():
            raise EdgetoolError("TensorRT's execute_async_v3 failed while timing")

    def run(self, n: int) -> np.ndarray:
        gpu = self.timer.time_chunk(self.launch, self.stream.ptr, n)
        self.chunks += 1
        self.host_bound_chunks += host_bound(self.timer.last_host_s, gpu)
        return gpu

    def close(self) -> None:
        if self.graph is not None:
            self.graph.close()
        self.timer.close()
        self.stream.synchronize()
        for b in self.buffers:
            b.free()
        self.context = None
        self.stream.free()


class TensorRTRunner(PolygraphyRunner):
    """Runs a cached engine with Polygraphy's TrtRunner (`infer`, for accuracy) and times it on the GPU
    (`time_batch`). Each input uses the profile of its batch size; other sizes are padded to the next
    profile (the last chunk of the test split)."""

    backend = "tensorrt"
    clock = ("CUDA events around each enqueue (execute_async_v3, launched as a CUDA graph when it captures), "
             "inputs and outputs resident on the GPU")
    round_iterations = 10

    def __init__(self, plan_path: Path, build: BuildPlan, facts: TrtFacts, graph: str, precision: str,
                 input_name: str, output_name: str):
        self.plan_path, self.build, self._facts = Path(plan_path), build, facts

        def make():
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner

            return TrtRunner(EngineFromBytes(self.plan_path.read_bytes()), name=self.plan_path.name,
                             optimization_profile=0)

        super().__init__(self.plan_path.name, graph, precision, make, input_name, output_name)
        self._profile = 0
        self._resident: dict[int, _DeviceResident] = {}

    def _activate(self) -> None:
        try:
            with trt_calls(self._facts, f"loading {self.name}"):
                self._runner = self._make_runner()
                self._runner.activate()
        except EdgetoolError:
            self._runner = None
            raise
        self._profile = 0

    def _infer(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        profile, rows = self.build.profile_for(n)
        if rows > n:
            x = np.concatenate([x, np.repeat(x[-1:], rows - n, axis=0)])
        with trt_calls(self._facts, f"running {self.name}"):
            if profile != self._profile:
                self._runner.set_profile(profile)
                self._profile = profile
            out = self._runner.infer({self.input_name: x}, check_inputs=False)
        return np.array(out[self.output_name][:n], dtype=np.float32, copy=True)

    def time_batch(self, x: np.ndarray, warmup_s: float = 0.0, min_iters: int = 1, min_seconds: float = 0.0) -> np.ndarray:
        if not self.is_active:
            raise RuntimeError(f"runner {self.name} must be activated before time_batch()")
        profile, rows = self.build.profile_for(len(x))
        if rows != len(x):
            raise EdgetoolError(f"latency is timed at the engines' profile batch sizes {self.build.profile_batches}, "
                                f"not at {len(x)}")
        if profile not in self._resident:
            with trt_calls(self._facts, f"preparing {self.name} for timing"):
                self._resident[profile] = _DeviceResident(importlib.import_module("tensorrt"), self._runner.engine,
                                                          profile, np.ascontiguousarray(x, dtype=np.float32),
                                                          self.input_name)
        return timed_loop(self._resident[profile].run, warmup_s, min_iters, min_seconds, chunk=self.round_iterations)

    def timing_report(self) -> dict[str, Any]:
        res = self._resident
        return {"clock": self.clock,
                "cuda_graph": {str(self.build.profile_batches[p]): r.graph is not None for p, r in res.items()},
                "cuda_graph_notes": {str(self.build.profile_batches[p]): r.graph_note for p, r in res.items() if r.graph_note},
                "host_bound_chunks": {str(self.build.profile_batches[p]): f"{r.host_bound_chunks}/{r.chunks}"
                                      for p, r in res.items()}}

    def _deactivate(self) -> None:
        for r in self._resident.values():
            r.close()
        self._resident = {}
        super()._deactivate()


@register_backend
class TensorRTBackend(Backend):
    """FP16 engines for `original` and `fused`, built once, together, and cached in ENGINE_DIR; see
    trtplan.py for what is built and README/docs/verify.md for why."""

    name = "tensorrt"

    def __init__(self, build: str = STRONGLY_TYPED):
        self.build = build
        self._trt = None
        self._device: CudaDevice | None = None
        self._facts: TrtFacts | None = None
        self._l4t: str | None = None

    def probe(self) -> Availability:
        try:
            trt = import_tensorrt()
        except EdgetoolError as exc:
            return Availability(False, str(exc))
        device, why = cuda_device()
        if device is None:
            return Availability(False, f"TensorRT {trt.__version__} is installed but {why}")
        import polygraphy

        self._trt, self._device = trt, device
        self._facts = trt_facts(trt, polygraphy.__version__)
        self._l4t = l4t_release()
        return Availability(True, f"TensorRT {trt.__version__} on {device.name} (compute {device.compute_capability}, "
                                  f"{device.sm_count} SMs)")

    def require(self) -> None:
        if self._trt is None:
            avail = self.probe()
            if not avail.usable:
                raise EdgetoolError(avail.reason)

    @property
    def device_facts(self) -> DeviceFacts:
        d = self._device
        return DeviceFacts(d.name, d.compute_capability, d.sm_count, d.slug, self._l4t)

    def plan(self, batch_sizes: tuple[int, ...]) -> BuildPlan:
        self.require()
        return plan_build(self._facts, self.device_facts, batch_sizes, self.build)

    def accuracy_precisions(self) -> list[str]:
        return ["fp16"]

    def executed_as(self, precision: str) -> str:
        if self.build == STRONGLY_TYPED:
            return "TensorRT FP16 engine: strongly typed network from *.fp16.onnx (the checked graph's precisions)"
        return "TensorRT FP16 engine: weakly typed network from the FP32 ONNX with the FP16 flag (TensorRT's precisions)"

    def latency_precision(self) -> str:
        return "fp16"

    def describe(self) -> dict[str, Any]:
        if self._trt is None:
            return {}
        return {"tensorrt": self._trt.__version__, "polygraphy": self._facts.polygraphy, "device": self._device.name,
                "compute_capability": self._device.compute_capability, "sm_count": self._device.sm_count,
                "l4t_release": self._l4t, "build_mode": self.build}

    def engines(self, ed: EngineDir, batch_sizes: tuple[int, ...], echo=None) -> dict[str, Path]:
        """The cached engines of both graphs. When either is stale both are rebuilt, original first, with
        one timing cache, so identical layers get identical tactics."""
        plan = self.plan(batch_sizes)
        version, slug = self._facts.version, self._device.slug
        sources, paths, keys, stale = {}, {}, {}, {}
        for g in GRAPHS:
            sources[g] = ed.onnx(g, plan.onnx_precision)
            if not sources[g].is_file():
                raise EdgetoolError(f"{sources[g]} not found: ENGINE_DIR is incomplete; rerun `edgetool fuse-export`")
            paths[g] = ed.plan(g, "fp16", version, slug)
            keys[g] = {**plan.key, "onnx": sources[g].name, "onnx_sha256": sha256_file(sources[g])}
            stale[g] = engine_staleness(paths[g], _sidecar(paths[g]), sources[g], keys[g])
        if any(stale.values()):
            cache = ed.timing_cache(version, slug)
            why = "; ".join(f"{g}: {w}" for g, w in stale.items() if w)
            say(echo, f"building TensorRT engines for original and fused ({why}; {plan.mode}, timing cache {cache.name})")
            for g in GRAPHS:
                atomic_write_bytes(paths[g], self._build(ed, sources[g], plan, cache))
                atomic_write_json(_sidecar(paths[g]), keys[g])
        return paths

    def engine_for(self, ed: EngineDir, graph: str, batch_sizes: tuple[int, ...], echo=None) -> Path:
        return self.engines(ed, batch_sizes, echo)[graph]

    def _build(self, ed: EngineDir, onnx_path: Path, plan: BuildPlan, cache: Path) -> bytes:
        from polygraphy.backend.trt import (CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, PostprocessConfig,
                                            Profile)

        shape = tuple(ed.input_shape)
        # Polygraphy reads and extends the cache in place (with a .lock file beside it): let it work on a copy
        # in a temporary directory and put the result back atomically, so ENGINE_DIR never holds a torn cache.
        with scratch_dir("trt") as tmp:
            work = tmp / cache.name
            if cache.is_file():
                shutil.copyfile(cache, work)
            with trt_calls(self._facts, f"could not build an engine from {onnx_path.name}"):
                profiles = [Profile().add(ed.input_name, min=(b, *shape), opt=(b, *shape), max=(b, *shape))
                            for b in plan.profile_batches]
                network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=plan.strongly_typed)
                config = CreateConfig(fp16=plan.fp16_flag, tf32=plan.tf32, profiles=profiles,
                                      load_timing_cache=str(work), profiling_verbosity=self._trt.ProfilingVerbosity.DETAILED)
                if plan.preview_features:
                    # Switched on one by one: CreateConfig(preview_features=...) would switch every other off.
                    features = [getattr(self._trt.PreviewFeature, f) for f in plan.preview_features]
                    config = PostprocessConfig(config, lambda builder, network, cfg: [
                        cfg.set_preview_feature(f, True) for f in features])
                engine = bytes(EngineBytesFromNetwork(network, config=config, save_timing_cache=str(work))())
            if work.is_file():
                atomic_write_bytes(cache, work.read_bytes())
        return engine

    def runner(self, ed: EngineDir, graph: str, precision: str, batch_sizes: tuple[int, ...], echo=None) -> Runner:
        if precision != "fp16":
            raise EdgetoolError("the tensorrt backend builds FP16 engines only")
        path = self.engine_for(ed, graph, batch_sizes, echo)
        return TensorRTRunner(path, self.plan(batch_sizes), self._facts, graph, precision, ed.input_name, ed.output_name)

    def engine_layers(self, ed: EngineDir, batch_sizes: tuple[int, ...], echo=None) -> dict[str, dict[int, Any]]:
        """Per graph and timed batch size, TensorRT's engine inspector JSON for an execution context on that
        batch's profile with its input shape set (so formats and tactics are concrete)."""
        from polygraphy import cuda
        from polygraphy.backend.trt import EngineFromBytes

        plan, trt = self.plan(batch_sizes), self._trt
        out: dict[str, dict[int, Any]] = {}
        for g, path in self.engines(ed, batch_sizes, echo).items():
            out[g] = {}
            with trt_calls(self._facts, f"inspecting {path.name}"), cuda.Stream() as stream:
                engine = EngineFromBytes(path.read_bytes())()
                inspector = engine.create_engine_inspector()
                context = engine.create_execution_context()
                for i, b in enumerate(plan.profile_batches):
                    if not context.set_optimization_profile_async(i, stream.ptr):
                        raise EdgetoolError(f"TensorRT refused optimisation profile {i} of {path.name}")
                    stream.synchronize()
                    context.set_input_shape(ed.input_name, (b, *ed.input_shape))
                    inspector.execution_context = context
                    # The JSON holds every profile's graph, whatever the context: keep this batch's.
                    out[g][b] = profile_layers(parse_engine_information(
                        inspector.get_engine_information(trt.LayerInformationFormat.JSON), path.name), i)
                del inspector, context, engine  # in this order: the inspector refers to the context
        return out

    def device_state(self) -> dict[str, Any]:
        state = jetson_state()
        return {"jetson": state} if state is not None else {}

    def latency_crosscheck(self, ed: EngineDir, batch_sizes: tuple[int, ...], echo=None) -> dict[str, Any]:
        """trtexec's GPU Compute Time of the same plan files, per graph and batch, and the fused/original
        ratio of its medians; a note when trtexec is not found."""
        exe = find_trtexec()
        if exe is None:
            return {"trtexec": "not found (looked on the PATH and in /usr/src/tensorrt/bin)"}
        plan = self.plan(batch_sizes)
        say(echo, f"cross-checking GPU latency with {exe}")
        runs: dict[str, dict[str, Any]] = {}
        for g, path in self.engines(ed, batch_sizes).items():
            runs[g] = {str(b): run_trtexec(trtexec_command(exe, path, ed.input_name, (b, *ed.input_shape), i))
                       for i, b in enumerate(plan.profile_batches)}
        ratio = {}
        for b in map(str, plan.profile_batches):
            o, f = (runs[g][b].get("gpu_compute_ms", {}).get("median") for g in ("original", "fused"))
            ratio[b] = f / o if o and f else None
        return {"trtexec": exe, "gpu_compute_ms": runs, "median_ratio": ratio}


def _sidecar(plan: Path) -> Path:
    return plan.with_name(plan.name + ".json")
