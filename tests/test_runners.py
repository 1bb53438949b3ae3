"""The runner interface and its backends on a small hand-built ONNX graph (no training needed).

ONNX Runtime runs here; TensorRT tests are marked `tensorrt` and skip with the reason when TensorRT or
a CUDA GPU is absent. The TensorRT-absent behaviour (one-line error, `auto` fallback) is tested here
by making `import tensorrt` fail, which is what a machine without TensorRT does."""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from conftest import needs_tensorrt
from toolchain.errors import EdgetoolError
from toolchain.backends import select_backend
from toolchain.backends.cuda import cuda_device
from toolchain.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeRunner
from toolchain.backends.pytorch import TorchRunner
from toolchain.backends.tensorrt import TENSORRT_MISSING, TensorRTBackend, engine_staleness
from toolchain.enginedir import EngineDir

C, T, K, CLASSES = 3, 16, 4, 2
BATCHES = (1, 8)


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"conv.w": rng.standard_normal((K, C, 3)).astype(np.float32) * 0.5,
            "conv.b": rng.standard_normal(K).astype(np.float32) * 0.1,
            "fc.w": rng.standard_normal((CLASSES, K)).astype(np.float32),
            "fc.b": rng.standard_normal(CLASSES).astype(np.float32) * 0.1}


def _graph(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Conv1d -> Relu -> GlobalAveragePool -> Flatten -> Gemm, input `input` [batch, C, T], output `logits`."""
    nodes = [
        helper.make_node("Conv", ["input", "conv.w", "conv.b"], ["h"], pads=[1, 1], kernel_shape=[3]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", C, T])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _torch_reference(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    t = {k: torch.from_numpy(v) for k, v in w.items()}
    h = F.relu(F.conv1d(torch.from_numpy(x), t["conv.w"], t["conv.b"], padding=1))
    return F.linear(h.mean(dim=2), t["fc.w"], t["fc.b"]).numpy()


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    """original/fused ONNX graphs (FP32 + FP16 via onnxconverter-common), same structure, other weights."""
    from onnxconverter_common import float16

    d = tmp_path_factory.mktemp("engines")
    for name, seed in (("original", 0), ("fused", 1)):
        model = _graph(_weights(seed))
        onnx.save(model, d / f"{name}.onnx")
        onnx.save(float16.convert_float_to_float16(model, keep_io_types=True), d / f"{name}.fp16.onnx")
    return d


@pytest.fixture()
def spec(engine_dir):
    return EngineDir(engine_dir, {}, engine_dir, "input", "logits", (C, T), 17)


@pytest.fixture()
def X():
    return np.random.default_rng(5).standard_normal((11, C, T)).astype(np.float32)


def test_onnxruntime_runner_lifecycle_matches_reference(engine_dir, X):
    runner = OnnxRuntimeRunner(engine_dir / "fused.onnx", "fused", "fp32", ["CPUExecutionProvider"], "input", "logits")
    with pytest.raises(RuntimeError, match="activated"):
        runner.infer(X[:1])
    with runner:
        assert runner.is_active
        ref = _torch_reference(_weights(1), X)
        np.testing.assert_allclose(runner.infer(X[:1]), ref[:1], atol=1e-5)
        np.testing.assert_allclose(runner.infer(X[:5]), ref[:5], atol=1e-5)  # dynamic batch axis
        batched = runner.infer_batched(X, 4)  # 4 + 4 + 3
        np.testing.assert_allclose(batched, ref, atol=1e-5)
        # outputs are copies: a later call must not overwrite an earlier result
        first = runner.infer(X[:2])
        runner.infer(X[2:4])
        np.testing.assert_allclose(first, ref[:2], atol=1e-5)
        t = runner.time_once(X[:8])
        assert isinstance(t, float) and 0 < t < 10
    assert not runner.is_active


def test_fp16_graph_runs_with_float32_io(engine_dir, X):
    with OnnxRuntimeRunner(engine_dir / "fused.fp16.onnx", "fused", "fp16", ["CPUExecutionProvider"], "input", "logits") as r:
        out = r.infer(X)
    assert out.dtype == np.float32
    ref = _torch_reference(_weights(1), X)
    np.testing.assert_allclose(out, ref, atol=2e-2, rtol=2e-2)
    assert np.abs(out - ref).max() > 0  # it really ran in half precision


def test_torch_runner_same_interface(X):
    w = _weights(1)
    conv = torch.nn.Conv1d(C, K, 3, padding=1)
    fc = torch.nn.Linear(K, CLASSES)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w["conv.w"])); conv.bias.copy_(torch.from_numpy(w["conv.b"]))
        fc.weight.copy_(torch.from_numpy(w["fc.w"])); fc.bias.copy_(torch.from_numpy(w["fc.b"]))
    model = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.AdaptiveAvgPool1d(1), torch.nn.Flatten(), fc)
    with TorchRunner(model, "torch", "fused") as r:
        np.testing.assert_allclose(r.infer(X), _torch_reference(w, X), atol=1e-5)
        assert r.time_once(X[:1]) > 0


def test_onnxruntime_backend_picks_graph_per_precision(spec, tmp_path):
    backend = OnnxRuntimeBackend()
    assert backend.probe().usable
    assert backend.accuracy_precisions() == ["fp32", "fp16"]
    assert backend.runner(spec, "fused", "fp16", BATCHES).path.name == "fused.fp16.onnx"
    assert backend.runner(spec, "original", "fp32", BATCHES).path.name == "original.onnx"
    if not backend.on_gpu:
        assert backend.providers == ["CPUExecutionProvider"]
        assert backend.latency_precision() == "fp32"
    empty = EngineDir(tmp_path, {}, tmp_path, "input", "logits", (C, T), 17)
    with pytest.raises(EdgetoolError, match="fuse-export"):
        backend.runner(empty, "fused", "fp32", BATCHES)


def _without_tensorrt(monkeypatch):
    # A None entry makes `import tensorrt` raise ImportError, exactly as on a machine without it.
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def test_tensorrt_absent_is_one_line_with_install_hint(monkeypatch):
    _without_tensorrt(monkeypatch)
    with pytest.raises(EdgetoolError) as err:
        select_backend("tensorrt")
    msg = str(err.value)
    assert err.value.exit_code == 2
    assert msg == TENSORRT_MISSING and "\n" not in msg
    assert "python3-libnvinfer" in msg and "pip install tensorrt" in msg and "Jetson" in msg


def test_broken_tensorrt_install_is_told_apart(monkeypatch, tmp_path):
    # A tensorrt package whose shared library is missing (a JetPack/CUDA mismatch) is not "not installed".
    # The real bindings (10.3, without libnvinfer) raise exactly this: their extension module is itself
    # named `tensorrt`, so exc.name is 'tensorrt' (tests/test_trt_bindings.py checks it on the real ones).
    pkg = tmp_path / "tensorrt"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "raise ImportError('libnvinfer.so.10: cannot open shared object file: No such file or directory', "
        "name='tensorrt', path=__file__)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    with pytest.raises(EdgetoolError) as err:
        select_backend("tensorrt")
    msg = str(err.value)
    assert "bindings are installed but the library libnvinfer.so.10" in msg and "\n" not in msg
    assert "python3-libnvinfer" in msg and msg != TENSORRT_MISSING
    backend, why = select_backend("auto")
    assert backend.name == "onnxruntime" and "libnvinfer.so.10" in why


def test_auto_falls_back_to_onnxruntime_and_says_why(monkeypatch):
    _without_tensorrt(monkeypatch)
    backend, why = select_backend("auto")
    assert backend.name == "onnxruntime"
    assert "TensorRT is not installed" in why and "using onnxruntime" in why


@pytest.mark.skipif(cuda_device()[0] is not None, reason="a CUDA device is present on this machine")
def test_auto_falls_back_when_no_gpu(monkeypatch):
    # TensorRT importable but no usable CUDA runtime/device: the real probe and the real CUDA look-up
    # (only the module is a stand-in) produce the reason, which is carried into the selection message.
    # tests/test_trt_bindings.py runs the same with the real bindings and a CUDA stand-in with 0 devices.
    import types

    monkeypatch.setattr("toolchain.backends.tensorrt.import_tensorrt", lambda: types.SimpleNamespace(__version__="10.3.0"))
    reason = TensorRTBackend().probe().reason
    assert reason.startswith("TensorRT 10.3.0 is installed but ") and reason.endswith(cuda_device()[1])
    backend, why = select_backend("auto")
    assert backend.name == "onnxruntime" and cuda_device()[1] in why


def test_unknown_engine_is_usage_error():
    with pytest.raises(EdgetoolError, match="unknown engine"):
        select_backend("openvino")


@pytest.mark.skipif(cuda_device()[0] is not None, reason="a CUDA device is present on this machine")
def test_cuda_probe_says_why_not():
    device, why = cuda_device()
    assert device is None and why


def test_engine_staleness(tmp_path):
    onnx_path, plan, sidecar = tmp_path / "fused.onnx", tmp_path / "fused.plan", tmp_path / "fused.plan.json"
    onnx_path.write_bytes(b"graph")
    key = {"tensorrt": "10.3.0", "device": "Orin", "compute_capability": "8.7", "onnx_sha256": "abc"}
    assert engine_staleness(plan, sidecar, onnx_path, key) == "no cached engine"
    plan.write_bytes(b"engine")
    import json

    sidecar.write_text(json.dumps(key))
    os.utime(onnx_path, (1_000, 1_000))
    assert engine_staleness(plan, sidecar, onnx_path, key) is None
    assert "tensorrt" in engine_staleness(plan, sidecar, onnx_path, {**key, "tensorrt": "11.0.0"})
    assert "compute_capability, device" in engine_staleness(plan, sidecar, onnx_path,
                                                             {**key, "device": "H100", "compute_capability": "9.0"})
    os.utime(onnx_path, (plan.stat().st_mtime + 10, plan.stat().st_mtime + 10))
    assert "newer" in engine_staleness(plan, sidecar, onnx_path, key)
    sidecar.write_text("{not json")
    assert engine_staleness(plan, sidecar, onnx_path, key) == "unreadable cache key"


# ------------------------------------------------------------------------- TensorRT (GPU machines only)


@needs_tensorrt
@pytest.mark.parametrize("graph,seed", [("original", 0), ("fused", 1)])
def test_tensorrt_fp16_engine_matches_reference(spec, X, graph, seed):
    backend = TensorRTBackend()
    assert backend.probe().usable
    with backend.runner(spec, graph, "fp16", BATCHES) as r:
        out = r.infer_batched(X, max(BATCHES))
        assert r.time_once(X[:1]) > 0
    np.testing.assert_allclose(out, _torch_reference(_weights(seed), X), atol=5e-2, rtol=5e-2)


@needs_tensorrt
def test_tensorrt_engine_cache_is_reused_and_rebuilt_when_stale(spec):
    backend = TensorRTBackend()
    backend.require()
    built = []
    plan = backend.engine_for(spec, "fused", BATCHES, echo=built.append)
    assert plan.suffix == ".plan" and plan.is_file() and len(built) == 1
    assert backend._device.slug in plan.name and backend._trt.__version__ in plan.name
    mtime = plan.stat().st_mtime_ns
    assert backend.engine_for(spec, "fused", BATCHES, echo=built.append) == plan and len(built) == 1  # cached
    assert plan.stat().st_mtime_ns == mtime
    src = spec.onnx("fused", backend.plan(BATCHES).onnx_precision)
    later = plan.stat().st_mtime + 5
    os.utime(src, (later, later))
    backend.engine_for(spec, "fused", BATCHES, echo=built.append)
    assert len(built) == 2 and "newer" in built[-1]
