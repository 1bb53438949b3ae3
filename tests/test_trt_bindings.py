"""edgetool's TensorRT glue against the REAL TensorRT Python binding classes (8.6, 10.3, 11) and the real
Polygraphy. Run by scripts/tensorrt_bindings.sh, once per TensorRT version: it installs the binding wheel,
builds stub native libraries so `import tensorrt` succeeds, and a host-memory CUDA stand-in
(scripts/trt_stubs/cudart_host.c) that Polygraphy's CUDA wrapper loads. Outside that environment every
test here skips, saying so.

What this proves: every TensorRT attribute, enum, property and method the project and Polygraphy use on
these paths exists on the real class of that version and is called with arguments one of its real
overloads accepts (tests/trt_real.py's `Strict` checks each use), and the project's own logic around
them -- build configuration, padding and chunking, profile selection, CUDA-event timing and graph
capture, inspector filtering, error mapping, the CUDA probe -- does what it should. What it cannot: the
stand-ins compute nothing of TensorRT's (no engine is built, no kernel runs); their behaviour is written
from TensorRT's documentation. It is an API-surface check, not TensorRT."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

VERSION = os.environ.get("EDGETOOL_TRT_BINDINGS")
SITE = os.environ.get("EDGETOOL_TRT_BINDINGS_SITE")
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not VERSION, reason="needs the real TensorRT bindings over stub native libraries: run scripts/tensorrt_bindings.sh")

# What each checked release offers (TensorRT's own Python API docs and headers, per release).
EXPECTED_FACTS = {  # version prefix: (BuilderFlag.FP16, STRONGLY_TYPED, PreviewFeature.PROFILE_SHARING_0806)
    "8.6": (True, False, True),
    "10.3": (True, True, True),
    "11.": (False, True, False),
}
SAMPLE = (3, 10)  # one input sample: channels x time
INPUT, OUTPUT = "input", "logits"


def _major_minor() -> str:
    return next(k for k in EXPECTED_FACTS if (VERSION or "").startswith(k)) if VERSION else ""


@pytest.fixture(scope="module", params=[VERSION or "none"], ids=lambda v: f"trt-{v}")
def trt(request):
    import tensorrt  # in the script's environment this must import: a failure here fails the test

    assert tensorrt.__version__ == request.param, (tensorrt.__version__, request.param)
    return tensorrt


@pytest.fixture()
def used():
    return []


def _facts(trt):
    import polygraphy

    from toolchain.backends.trtplan import trt_facts

    return trt_facts(trt, polygraphy.__version__)


def _device():
    from toolchain.backends.trtplan import DeviceFacts

    return DeviceFacts("edgetool host-memory CUDA stand-in", "8.7", 8, "sm87-stand-in", None)


def _modes(trt) -> list[str]:
    from toolchain.backends.trtplan import STRONGLY_TYPED, WEAK_FP16_FLAG

    f = _facts(trt)
    return [m for m, ok in ((STRONGLY_TYPED, f.has_strongly_typed), (WEAK_FP16_FLAG, f.has_fp16_flag)) if ok]


# ------------------------------------------------------------------------------------------ the module itself

def test_facts_are_read_off_the_real_module(trt):
    f = _facts(trt)
    assert (f.has_fp16_flag, f.has_strongly_typed, f.has_profile_sharing_preview) == EXPECTED_FACTS[_major_minor()]
    print(f"TensorRT {trt.__version__}: {f}")


def test_every_trt_name_the_project_uses_exists(trt):
    """Every `trt.X.Y` / `self._trt.X.Y` written in the TensorRT modules exists on the real module, except
    BuilderFlag.FP16 on TensorRT 11, which trtplan reads with hasattr and refuses politely."""
    names = set()
    for name in ("tensorrt.py", "trtplan.py", "cuda.py", "engine_inspect.py"):  # where `trt` is the module
        path = REPO / "toolchain" / "backends" / name
        names |= set(re.findall(r"\b(?:self\._)?trt\.([A-Za-z_][\w.]*)", path.read_text()))
    names -= {"__version__"}
    assert {"nptype", "ProfilingVerbosity.DETAILED", "LayerInformationFormat.JSON"} <= names, names
    missing = []
    for dotted in sorted(names):
        obj = trt
        for part in dotted.split("."):
            if not hasattr(obj, part):
                missing.append(dotted)
                break
            obj = getattr(obj, part)
    allowed = {"BuilderFlag.FP16"} if not _facts(trt).has_fp16_flag else set()
    assert set(missing) <= allowed, missing
    from toolchain.backends.trtplan import PROFILE_SHARING

    assert hasattr(trt.PreviewFeature, PROFILE_SHARING) == _facts(trt).has_profile_sharing_preview


# --------------------------------------------------------------------------------------------------- build

class _Recorder:
    def __init__(self):
        self.flags: set[str] = set()
        self.cleared: set[str] = set()
        self.preview: dict[str, bool] = {}
        self.profiles: list[dict] = []
        self.network_flags = 0
        self.parsed: list[str] = []


def _build_fakes(trt, monkeypatch, used, rec: _Recorder):
    """Patches trt.Builder, trt.OnnxParser, trt.init_libnvinfer_plugins (the entry points into native code
    Polygraphy's loaders call) with stand-ins checked against the real classes."""
    from trt_real import Strict, real_class, real_function

    class HostMemory:
        def __init__(self, data: bytes):
            self.data = data
            self.nbytes = len(data)

        def __bytes__(self):
            return self.data

        def __enter__(self):
            return self.data

        def __exit__(self, *exc):
            return False

    class TimingCache:
        def __init__(self, data=b""):
            self.data = bytes(data)

        def serialize(self):
            return Strict(trt, trt.IHostMemory, HostMemory(self.data or b"timing-cache"), used)

        def combine(self, other, ignore_mismatch):
            return True

        def reset(self):
            return True

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, min, opt, max):  # noqa: A002 - the real parameter names
            self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

        def get_shape(self, name):
            return [trt.Dims(s) for s in self.shapes[name]]

        def get_shape_input(self, name):
            return []

        def __bool__(self):
            return True

    class Config:
        def __init__(self):
            self.profiling_verbosity = trt.ProfilingVerbosity.LAYER_NAMES_ONLY
            self.num_optimization_profiles = 0
            self.flags = 0
            self.default_device_type = trt.DeviceType.GPU
            self.DLA_core = -1
            self.engine_capability = trt.EngineCapability.STANDARD
            self.builder_optimization_level = 3
            self.hardware_compatibility_level = trt.HardwareCompatibilityLevel.NONE
            self.max_aux_streams = -1
            self.profile_stream = 0
            self.algorithm_selector = None
            self.int8_calibrator = None
            self.progress_monitor = None
            self.plugins_to_serialize = []
            self.runtime_platform = getattr(trt, "RuntimePlatform", None) and trt.RuntimePlatform.SAME_AS_BUILD
            self.tiling_optimization_level = getattr(trt, "TilingOptimizationLevel", None) and trt.TilingOptimizationLevel.NONE
            self.l2_limit_for_tiling = 0
            self.quantization_flags = 0
            self.cache = None

        def set_flag(self, flag):
            rec.flags.add(flag.name)
            rec.cleared.discard(flag.name)

        def clear_flag(self, flag):
            rec.cleared.add(flag.name)
            rec.flags.discard(flag.name)

        def get_flag(self, flag):
            return flag.name in rec.flags

        def set_preview_feature(self, feature, enable):
            rec.preview[feature.name] = bool(enable)

        def get_preview_feature(self, feature):
            return rec.preview.get(feature.name, False)

        def get_quantization_flag(self, flag):
            return False

        def add_optimization_profile(self, profile):
            rec.profiles.append(dict(object.__getattribute__(profile, "_impl").shapes))
            self.num_optimization_profiles += 1
            return self.num_optimization_profiles - 1

        def get_memory_pool_limit(self, pool):
            return 1 << 30

        def set_memory_pool_limit(self, pool, size):
            pass

        def get_tactic_sources(self):
            return 0

        def set_tactic_sources(self, sources):
            return True

        def create_timing_cache(self, data):
            return Strict(trt, trt.ITimingCache, TimingCache(data), used)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

        def get_calibration_profile(self):
            return None

        def get_device_type(self, layer):
            return trt.DeviceType.GPU

        def can_run_on_DLA(self, layer):
            return False

        def is_device_type_set(self, layer):
            return False

    class Network:
        def __init__(self, flags):
            self.flags = flags
            self.num_inputs = 1
            self.num_outputs = 1
            self.num_layers = 0
            self.name = "network"
            self.has_implicit_batch_dimension = False

        def get_input(self, i):
            return Strict(trt, trt.ITensor, Tensor(INPUT, (-1, *SAMPLE)), used)

        def get_output(self, i):
            return Strict(trt, trt.ITensor, Tensor(OUTPUT, (-1, 4)), used)

        def get_flag(self, flag):
            return bool(self.flags & (1 << int(flag)))

        def __len__(self):
            return self.num_layers

        def __getitem__(self, i):
            raise IndexError(i)

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, trt.Dims(shape)
            self.dtype = trt.DataType.FLOAT
            self.is_shape_tensor = False
            self.is_execution_tensor = True
            self.location = trt.TensorLocation.DEVICE
            self.is_network_input = name == INPUT
            self.is_network_output = name == OUTPUT

    class Builder:
        def __init__(self, logger):
            self.platform_has_fast_fp16 = True
            self.platform_has_tf32 = True
            self.num_DLA_cores = 0
            self.max_DLA_batch_size = 1

        def create_network(self, flags=0):
            rec.network_flags = flags
            return Strict(trt, trt.INetworkDefinition, Network(flags), used)

        def create_builder_config(self):
            return Strict(trt, trt.IBuilderConfig, Config(), used)

        def create_optimization_profile(self):
            return Strict(trt, trt.IOptimizationProfile, Profile(), used)

        def build_serialized_network(self, network, config):
            return Strict(trt, trt.IHostMemory, HostMemory(b"engine:" + json.dumps(sorted(rec.flags)).encode()), used)

    class Parser:
        def __init__(self, network, logger):
            self.num_errors = 0
            self.flags = 0

        def clear_flag(self, flag):
            pass

        def set_flag(self, flag):
            pass

        def parse_from_file(self, path):
            rec.parsed.append(Path(path).name)
            return True

        def get_error(self, i):
            raise AssertionError("no parser errors in these tests")

        def set_builder_config(self, config):
            return True

    def reraise(facts, what, exc):  # here a binding error is the API misuse under test: show it in full
        raise exc

    monkeypatch.setattr("toolchain.backends.tensorrt.binding_error", reraise)
    monkeypatch.setattr(trt, "Builder", real_class(trt, trt.Builder, Builder, used))
    monkeypatch.setattr(trt, "OnnxParser", real_class(trt, trt.OnnxParser, Parser, used))
    monkeypatch.setattr(trt, "init_libnvinfer_plugins",
                        real_function(trt, "init_libnvinfer_plugins", lambda logger, ns: True, used))


def _engine_dir(tmp_path):
    from toolchain.enginedir import EngineDir

    tmp_path.mkdir(parents=True, exist_ok=True)
    ed = EngineDir(tmp_path, {}, tmp_path, INPUT, OUTPUT, SAMPLE, 4)
    for g in ("original", "fused"):
        for prec in ("fp32", "fp16"):
            ed.onnx(g, prec).write_bytes(b"onnx " + g.encode() + prec.encode())
    return ed


def _backend(trt, mode):
    from toolchain.backends.cuda import cuda_device
    from toolchain.backends.tensorrt import TensorRTBackend

    backend = TensorRTBackend(mode)
    avail = backend.probe()  # the real probe: real bindings, the CUDA stand-in
    assert avail.usable, avail.reason
    assert cuda_device()[0].name == "edgetool host-memory CUDA stand-in"
    return backend


def _built(trt, monkeypatch, used, tmp_path, mode, batches=(1, 4)):
    rec = _Recorder()
    _build_fakes(trt, monkeypatch, used, rec)
    backend = _backend(trt, mode)
    ed = _engine_dir(tmp_path)
    paths = backend.engines(ed, batches)
    return backend, ed, paths, rec


@pytest.mark.parametrize("mode", ["strongly-typed", "weak-fp16-flag"])
def test_build_configures_the_real_classes_as_planned(trt, monkeypatch, used, tmp_path, mode):
    if mode not in _modes(trt):
        pytest.skip(f"TensorRT {trt.__version__} cannot build {mode} (plan_build refuses it; tested in test_tensorrt_plan.py)")
    backend, ed, paths, rec = _built(trt, monkeypatch, used, tmp_path, mode)
    plan = backend.plan((1, 4))
    assert set(paths) == {"original", "fused"} and all(p.is_file() for p in paths.values())
    assert rec.parsed == [ed.onnx(g, plan.onnx_precision).name for g in ("original", "fused")]
    assert [p[INPUT] for p in rec.profiles] == [((b, *SAMPLE),) * 3 for b in (1, 4)] * 2
    strongly = bool(rec.network_flags & (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))) \
        if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") else False
    assert strongly == plan.strongly_typed
    assert ("FP16" in rec.flags) == plan.fp16_flag
    if mode == "weak-fp16-flag":  # as trtexec --fp16: TF32 allowed for the FP32 layers
        assert "TF32" in rec.flags and "TF32" not in rec.cleared
    else:
        assert "TF32" not in rec.flags
    expected_preview = {f: True for f in plan.preview_features}
    assert {k: v for k, v in rec.preview.items() if v} == expected_preview
    assert ed.timing_cache(backend._facts.version, backend._device.slug).is_file()
    assert any(u[:2] == ("call", "IBuilderConfig") for u in used)


def test_trt86_enables_profile_sharing_only_where_it_is_off_by_default(trt, monkeypatch, used, tmp_path):
    mode = _modes(trt)[-1]
    backend, ed, paths, rec = _built(trt, monkeypatch, used, tmp_path, mode)
    on_86 = trt.__version__.startswith("8.6")
    assert rec.preview.get("PROFILE_SHARING_0806", False) is on_86
    if on_86:
        # Only that one feature is touched: the others keep TensorRT's defaults.
        assert set(rec.preview) == {"PROFILE_SHARING_0806"}


# ---------------------------------------------------------------------------------------- running engines

def _runner(trt, monkeypatch, used, tmp_path, mode=None, batches=(1, 4), profile_sharing=None):
    """A TensorRTRunner on the real Polygraphy TrtRunner, its engine deserialised by a stand-in
    trt.Runtime: an EngineImpl whose profile sharing follows what the build configured (8.6: only with
    PROFILE_SHARING_0806; from 10.0 always)."""
    from trt_real import EngineImpl, real_class

    mode = mode or _modes(trt)[-1]
    backend, ed, paths, rec = _built(trt, monkeypatch, used, tmp_path, mode, batches)
    if profile_sharing is None:
        profile_sharing = not trt.__version__.startswith("8.") or rec.preview.get("PROFILE_SHARING_0806", False)
    engines = []

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, serialized):
            impl = EngineImpl(trt, backend.plan(batches).profile_batches, SAMPLE, INPUT, OUTPUT,
                              profile_sharing=profile_sharing, used=used)
            engines.append(impl)
            return impl.strict()

    monkeypatch.setattr(trt, "Runtime", real_class(trt, trt.Runtime, Runtime, used))
    return backend, ed, backend.runner(ed, "fused", "fp16", batches), engines


def test_runner_returns_only_the_real_rows_of_a_padded_chunk(trt, monkeypatch, used, tmp_path):
    from trt_real import Model

    backend, ed, runner, engines = _runner(trt, monkeypatch, used, tmp_path)
    X = np.random.default_rng(0).standard_normal((7, *SAMPLE)).astype(np.float32)
    with runner:
        out = runner.infer_batched(X, 4)  # chunks of 4 and 3; the 3 are padded to the batch-4 profile
        one = runner.infer(X[:1])  # batch 1 runs on its own profile
    assert out.shape == (7, Model.classes) and one.shape == (1, Model.classes)
    np.testing.assert_allclose(out, Model.forward(X), rtol=1e-6)
    np.testing.assert_allclose(one, Model.forward(X[:1]), rtol=1e-6)
    ctx = engines[0].contexts[0]
    assert ctx.enqueues == 3 and ctx.profile == 0


def test_time_batch_times_each_iteration_on_its_profile(trt, monkeypatch, used, tmp_path):
    """The stand-in stream clock advances by ms_per_row x batch per enqueue, so each iteration's GPU time
    is known exactly: a timer that reports cumulative time, or times the wrong profile, fails."""
    backend, ed, runner, engines = _runner(trt, monkeypatch, used, tmp_path)
    x4 = np.ones((4, *SAMPLE), np.float32)
    x1 = np.ones((1, *SAMPLE), np.float32)
    with runner:
        t4 = runner.time_batch(x4, min_iters=25)
        t1 = runner.time_batch(x1, min_iters=5)
        report = runner.timing_report()
        with pytest.raises(Exception, match="profile batch sizes"):
            runner.time_batch(np.ones((3, *SAMPLE), np.float32))
    assert len(t4) >= 25 and len(t1) >= 5
    np.testing.assert_allclose(t4, 4 * 0.25e-3, rtol=1e-5)
    np.testing.assert_allclose(t1, 1 * 0.25e-3, rtol=1e-5)
    assert report["cuda_graph"] == {"4": True, "1": True}  # launched as captured CUDA graphs
    # The timing contexts sit beside the runner's own, each on its batch's profile.
    assert sorted(c.profile for c in engines[0].contexts) == [0, 0, 1]


def test_trt86_timing_context_shares_the_runners_profile(trt, monkeypatch, used, tmp_path):
    if not trt.__version__.startswith("8.6"):
        pytest.skip(f"profile sharing is always on in TensorRT {trt.__version__} (the preview feature is 8.6's)")
    from toolchain.errors import EdgetoolError

    x1 = np.ones((1, *SAMPLE), np.float32)
    # As 8.6 behaves without the preview feature: the second context on profile 0 is refused.
    _, _, unshared, _ = _runner(trt, monkeypatch, used, tmp_path / "a", profile_sharing=False)
    with unshared, pytest.raises(EdgetoolError, match="refused optimisation profile 0"):
        unshared.time_batch(x1)
    # The engine as edgetool builds it on 8.6 (with PROFILE_SHARING_0806): timing works.
    _, _, shared, engines = _runner(trt, monkeypatch, used, tmp_path / "b")
    with shared:
        assert len(shared.time_batch(x1, min_iters=3)) >= 3
    assert engines[0].profile_sharing


def test_event_timer_reports_each_interval_not_the_running_total(trt):
    from polygraphy import cuda

    from toolchain.backends.cuda import CudaGraph, EventTimer
    from trt_real import stub_cudart

    lib = stub_cudart()
    work = iter([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # ms of each enqueue; the first is the untimed one
    with cuda.Stream() as stream:
        timer = EventTimer()
        out = timer.time_chunk(lambda: lib.edgetool_stub_work(stream.ptr, next(work)), stream.ptr, 5)
        np.testing.assert_allclose(out, [2e-3, 3e-3, 4e-3, 5e-3, 6e-3], rtol=1e-6)
        graph, why = CudaGraph.capture(lambda: lib.edgetool_stub_work(stream.ptr, 0.5), stream.ptr)
        assert graph is not None, why
        np.testing.assert_allclose(timer.time_chunk(lambda: graph.launch(stream.ptr), stream.ptr, 3), 0.5e-3, rtol=1e-6)
        graph.close()
        timer.close()


# ---------------------------------------------------------------------------------------- engine inspector

def test_engine_layers_are_the_batchs_own_profile(trt, monkeypatch, used, tmp_path):
    backend, ed, runner, engines = _runner(trt, monkeypatch, used, tmp_path)
    layers = backend.engine_layers(ed, (1, 4))
    for g in ("original", "fused"):
        for b in (1, 4):
            info = layers[g][b]
            assert [x["Name"] for x in info["Layers"]] == ["conv1", "relu1", "fc"], info["Layers"]
            assert all(x["Outputs"][0]["Dimensions"][0] == b for x in info["Layers"])
    from toolchain.backends.engine_inspect import compare_engine_layers

    assert compare_engine_layers(layers["original"][4], layers["fused"][4]).layers == (3, 3)
    assert ("set", "EngineInspector", "execution_context") in used


# ---------------------------------------------------------------------------------------- errors and probe

def test_probe_without_a_cuda_device_says_so(trt, monkeypatch):
    from toolchain.backends.tensorrt import TensorRTBackend

    monkeypatch.setenv("EDGETOOL_STUB_CUDA_DEVICES", "0")
    avail = TensorRTBackend().probe()
    assert not avail.usable
    assert avail.reason == (f"TensorRT {trt.__version__} is installed but no CUDA device is usable "
                            "(cudaGetDeviceCount returned status 100, 0 devices)")
    monkeypatch.setenv("EDGETOOL_STUB_CUDA_DEVICES", "1")
    ok = TensorRTBackend().probe()
    assert ok.usable and ok.reason == (f"TensorRT {trt.__version__} on edgetool host-memory CUDA stand-in "
                                       "(compute 8.7, 8 SMs)")


def test_bindings_without_their_native_library_name_it(trt):
    """The real bindings with no libnvinfer on the loader path: `import tensorrt` raises
    ImportError(name='tensorrt'), and the message must name the library, not say "not installed"."""
    assert SITE, "EDGETOOL_TRT_BINDINGS_SITE is set by scripts/tensorrt_bindings.sh"
    code = ("from toolchain.backends.tensorrt import import_tensorrt\n"
            "from toolchain.errors import EdgetoolError\n"
            "try:\n    import_tensorrt()\nexcept EdgetoolError as e:\n    print(e)\n")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{SITE}", "LD_LIBRARY_PATH": ""}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    line = res.stdout.strip()
    major = trt.__version__.split(".")[0]
    assert re.search(rf"the library libnv\w+\.so\.{major} they link against is not found", line), (line, res.stderr)
    assert "not installed" not in line and "\n" not in line


def test_a_binding_type_error_names_both_versions(trt):
    from toolchain.backends.tensorrt import trt_calls
    from toolchain.errors import EdgetoolError

    facts = _facts(trt)
    with pytest.raises(EdgetoolError) as err:
        with trt_calls(facts, "loading x.plan"):
            trt.ICudaEngine()  # the real class has no Python constructor: a TypeError from the bindings
    msg = str(err.value)
    assert f"TensorRT {trt.__version__} and Polygraphy" in msg and "TypeError" in msg and "\n" not in msg
