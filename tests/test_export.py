"""ONNX export, the structural comparison (and that it catches real differences), ONNX Runtime inference
and the calibrated FP16 conversion."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from toolchain.errors import EdgetoolError
from toolchain.backends.onnxruntime import run_onnx
from toolchain.proof.export import (FP16_MAX, compare_graph_structure, convert_fp16, emulate_fp16_storage, export_onnx, fp16_unsafe_nodes)
from toolchain.models.backbones import MobileNet1d


def _conv2d_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def _trained_like(model: nn.Module, seed: int) -> nn.Module:
    """Same architecture, other values everywhere (weights and BN statistics), as after training."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=g))
                if name.endswith("running_var"):
                    t.abs_()
    return model.eval()


@pytest.fixture(scope="module")
def mobilenet_pair(tmp_path_factory):
    """A fresh MobileNet1d (grouped/depthwise convs, zero BN biases) and a same-architecture twin with other values."""
    d = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    fresh = MobileNet1d(3, 4, width=4).eval()
    twin = _trained_like(fresh, 1)
    x = torch.randn(2, 3, 32)
    export_onnx(fresh, x, d / "fresh.onnx", 17)
    export_onnx(twin, x, d / "twin.onnx", 17)
    return d, fresh, twin


def test_export_folds_bn_has_dynamic_batch_and_matches_torch(mobilenet_pair):
    d, _, twin = mobilenet_pair
    proto = onnx.load(str(d / "twin.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" not in ops and "Conv" in ops
    assert [i.name for i in proto.graph.input] == ["input"]  # initializers are not graph inputs
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert {o.domain or "ai.onnx": o.version for o in proto.opset_import}["ai.onnx"] == 17
    for n in (1, 5):
        X = np.random.default_rng(n).standard_normal((n, 3, 32)).astype(np.float32)
        with torch.no_grad():
            expected = twin(torch.from_numpy(X)).numpy()
        np.testing.assert_allclose(run_onnx(d / "twin.onnx", X), expected, atol=1e-5, rtol=0)


def test_export_handles_conv2d_and_leaves_the_model_untouched(tmp_path):
    model = _trained_like(_conv2d_net(), 3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "c2d.onnx", 17)
    assert model.training  # the caller's module keeps its mode and values
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    X = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(run_onnx(tmp_path / "c2d.onnx", X, batch_size=3), expected, atol=1e-5, rtol=0)


def test_structure_depends_on_architecture_not_values(mobilenet_pair):
    """The fresh model's folded BN biases are all equal (zero); value de-duplication would merge them
    and change the graph. Both exports must still be structurally identical."""
    d, _, _ = mobilenet_pair
    fresh, twin = onnx.load(str(d / "fresh.onnx")), onnx.load(str(d / "twin.onnx"))
    assert "Identity" not in {n.op_type for n in fresh.graph.node}
    report = compare_graph_structure(fresh, twin)
    assert report.identical, report.differences
    # ... while the values do differ, so the comparison really ignores only values.
    a = {t.name: numpy_helper.to_array(t) for t in fresh.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in twin.graph.initializer}
    assert any(not np.array_equal(a[k], b[k]) for k in a)


def _variant(d, edit) -> onnx.ModelProto:
    proto = onnx.load(str(d / "twin.onnx"))
    edit(proto.graph)
    return proto


def _extra_node(g):
    out = g.output[0].name
    last = next(n for n in g.node if out in n.output)
    last.output[list(last.output).index(out)] = "pre_logits"
    g.node.append(helper.make_node("Relu", ["pre_logits"], [out], name="extra_relu"))


def _conv_attr(g, name, value):
    conv = next(n for n in g.node if n.op_type == "Conv")
    for a in conv.attribute:
        if a.name == name:
            a.ints[:] = value


def _rename_init(g):
    t = g.initializer[0]
    old, t.name = t.name, t.name + "_renamed"
    for n in g.node:
        n.input[:] = [t.name if i == old else i for i in n.input]


def _reshape_init(g):
    t = next(t for t in g.initializer if len(t.dims) == 3)
    arr = numpy_helper.to_array(t)
    t.CopyFrom(numpy_helper.from_array(arr.reshape(arr.shape[0], -1, 1), t.name))


def _retype_init(g):
    t = g.initializer[0]
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))


def _input_shape(g):
    g.input[0].type.tensor_type.shape.dim[2].dim_value = 64


@pytest.mark.parametrize("edit,expect", [
    (_extra_node, "node count differs"),
    (lambda g: _conv_attr(g, "pads", [0, 0]), "attribute 'pads'"),
    (lambda g: _conv_attr(g, "dilations", [2]), "attribute 'dilations'"),
    (_rename_init, "only in the first graph"),
    (_reshape_init, "shape/dtype"),
    (_retype_init, "DOUBLE"),
    (_input_shape, "graph inputs differ"),
], ids=["extra-node", "pads", "dilations", "renamed-initializer", "reshaped-initializer", "retyped-initializer",
        "input-shape"])
def test_structure_comparison_catches_a_different_graph(mobilenet_pair, edit, expect):
    d, _, _ = mobilenet_pair
    report = compare_graph_structure(d / "fresh.onnx", _variant(d, edit))
    assert not report.identical
    assert any(expect in diff for diff in report.differences), report.differences


def test_structure_comparison_catches_a_different_architecture(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32)
    export_onnx(MobileNet1d(3, 4, width=4).eval(), x, tmp_path / "a.onnx", 17)
    export_onnx(MobileNet1d(3, 4, width=8).eval(), x, tmp_path / "b.onnx", 17)
    export_onnx(MobileNet1d(3, 4, width=4).eval(), x, tmp_path / "c.onnx", 18)
    assert not compare_graph_structure(tmp_path / "a.onnx", tmp_path / "b.onnx").identical
    report = compare_graph_structure(tmp_path / "a.onnx", tmp_path / "c.onnx")
    assert not report.identical and any("opset" in d for d in report.differences)


def test_opset_outside_the_exporter_range_is_one_line(tmp_path):
    with pytest.raises(EdgetoolError, match="fuse.opset"):
        export_onnx(MobileNet1d(3, 4, width=4), torch.randn(1, 3, 32), tmp_path / "x.onnx", 23)
    assert not (tmp_path / "x.onnx").exists()


# ---------------------------------------------------------------------------------------------- FP16


def _range_net(first_scale: float) -> nn.Module:
    """conv1 output is scaled by `first_scale`; conv2 scales it back, so FP32 logits stay moderate."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 1), nn.AdaptiveAvgPool1d(1),
                        nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.mul_(first_scale)
        net[0].bias.mul_(first_scale)
        net[2].weight.div_(first_scale)
    return net.eval()


def _fp16_io(proto):
    return proto.graph.input[0].type.tensor_type.elem_type, proto.graph.output[0].type.tensor_type.elem_type


def test_fp16_plain_model_is_float16_inside_float32_outside(mobilenet_pair, tmp_path):
    d, _, _ = mobilenet_pair
    X = np.random.default_rng(0).standard_normal((16, 3, 32)).astype(np.float32)
    info = convert_fp16(d / "twin.onnx", tmp_path / "twin.fp16.onnx", X)
    assert info["blocked_nodes"] == {} and "onnxconverter-common" in info["converter"]
    proto = onnx.load(str(tmp_path / "twin.fp16.onnx"))
    onnx.checker.check_model(proto)
    assert _fp16_io(proto) == (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT)
    assert {t.data_type for t in proto.graph.initializer} == {onnx.TensorProto.FLOAT16}
    y32 = run_onnx(d / "twin.onnx", X)
    emulated = emulate_fp16_storage(proto)
    onnx.checker.check_model(emulated, full_check=True)
    assert sum(n.op_type == "Cast" for n in emulated.graph.node) > sum(n.op_type == "Cast" for n in proto.graph.node)
    for y16 in (run_onnx(tmp_path / "twin.fp16.onnx", X), run_onnx(emulated, X)):
        assert y16.dtype == np.float32
        assert 0 < np.abs(y16 - y32).max() < 1e-2 * max(1.0, np.abs(y32).max())


def test_fp16_keeps_overflowing_nodes_in_float32(tmp_path):
    net = _range_net(1e5)  # conv1's activations reach ~2e5: beyond float16's 65504
    export_onnx(net, torch.randn(1, 3, 16), tmp_path / "big.onnx", 17)
    X = np.random.default_rng(0).standard_normal((32, 3, 16)).astype(np.float32)
    unsafe = fp16_unsafe_nodes(tmp_path / "big.onnx", X)
    conv_nodes = [n.name for n in onnx.load(str(tmp_path / "big.onnx")).graph.node if n.op_type == "Conv"]
    assert conv_nodes[0] in unsafe and "float16 max" in unsafe[conv_nodes[0]]

    y32 = run_onnx(tmp_path / "big.onnx", X)
    convert_fp16(tmp_path / "big.onnx", tmp_path / "big.fp16.onnx", X)
    converted = onnx.load(str(tmp_path / "big.fp16.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT for t in converted.graph.initializer)  # blocked weights stay FP32
    for y16 in (run_onnx(emulate_fp16_storage(converted), X), run_onnx(converted, X)):
        assert np.isfinite(y16).all()
        np.testing.assert_allclose(y16, y32, atol=2e-2 * np.abs(y32).max())

    # Without the calibrated block list the same graph overflows once float16 tensors are stored as float16.
    # (ONNX Runtime's CPU provider alone would hide it: it runs float16 subgraphs in float32.)
    convert_fp16(tmp_path / "big.onnx", tmp_path / "naive.fp16.onnx", None)
    assert not np.isfinite(run_onnx(emulate_fp16_storage(tmp_path / "naive.fp16.onnx"), X)).all()
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "big.onnx")).graph.initializer]
    assert max(np.abs(w).max() for w in weights) < FP16_MAX  # the weights fit float16; the activations do not


def test_fp16_flags_underflowing_nodes(tmp_path):
    net = _range_net(1e-7)  # conv1's weights and activations ~1e-7: float16 subnormals
    export_onnx(net, torch.randn(1, 3, 16), tmp_path / "small.onnx", 17)
    X = np.random.default_rng(0).standard_normal((8, 3, 16)).astype(np.float32)
    unsafe = fp16_unsafe_nodes(tmp_path / "small.onnx", X)
    first_conv = next(n.name for n in onnx.load(str(tmp_path / "small.onnx")).graph.node if n.op_type == "Conv")
    assert first_conv in unsafe and "subnormal" in unsafe[first_conv]


def test_fp16_block_list_must_name_real_nodes(mobilenet_pair, tmp_path):
    d, _, _ = mobilenet_pair
    with pytest.raises(EdgetoolError, match="does not have"):
        convert_fp16(d / "twin.onnx", tmp_path / "x.onnx", None, block_list=["no-such-node"])


def test_fp16_does_not_block_ordinary_tensors_with_a_few_tiny_values(tmp_path):
    net = _range_net(1.0)
    with torch.no_grad():  # 5 % of conv1's weights far below float16's normal range; the rest ordinary
        w = net[0].weight.view(-1)
        w[:: 20] = 1e-7
    export_onnx(net, torch.randn(1, 3, 16), tmp_path / "mixed.onnx", 17)
    X = np.random.default_rng(0).standard_normal((8, 3, 16)).astype(np.float32)
    assert fp16_unsafe_nodes(tmp_path / "mixed.onnx", X) == {}
