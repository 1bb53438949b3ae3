"""`structure.<p>.runtime_graph_identical`: the graphs ONNX Runtime will execute are compared by structure,
not by the names its optimisers make up or the order in which they list independent nodes.

ONNX Runtime's NCHWc layout transformer (x86 CPUs) inserts ReorderInput/ReorderOutput nodes named from a
counter (`ReorderOutput_token_17` on one load, `_token_18` on the next) and in an order that varies from
load to load of one and the same file. Squeeze-excite blocks (x * sigmoid(conv(relu(conv(mean(x))))),
as in MobileNetV3, EfficientNet, RegNetY) trigger it; plain conv stacks do not."""

from __future__ import annotations

import shutil

import onnx
import pytest
import torch
from onnx import helper
from torch import nn

from toolchain.backends.onnxruntime import OnnxRuntimeBackend, ort_session
from toolchain.enginedir import EngineDir, onnx_name
from toolchain.proof.export import compare_graph_structure, compare_runtime_graphs, export_onnx
from toolchain.stages.verify import structure_checks


class SqueezeExcite(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


def _se_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), SqueezeExcite(16),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), SqueezeExcite(32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5)).eval()


@pytest.fixture(scope="module")
def se_onnx(tmp_path_factory):
    d = tmp_path_factory.mktemp("se")
    export_onnx(_se_net(), torch.randn(1, 3, 32, 32), d / "se.onnx", 17)
    return d / "se.onnx"


def _optimised(src, dst) -> onnx.ModelProto:
    ort_session(src, optimized_model_path=dst)
    return onnx.load(str(dst))


def test_identical_files_give_identical_runtime_graphs_on_every_load(se_onnx, tmp_path):
    """The reproducer of the issue: six loads of one file. Before, most loads differed from the first."""
    first = _optimised(se_onnx, tmp_path / "0.onnx")
    for i in range(1, 6):
        rep = compare_runtime_graphs(first, _optimised(se_onnx, tmp_path / f"{i}.onnx"))
        assert rep.identical, rep.differences


def test_verify_structure_check_passes_two_copies_of_one_se_net(se_onnx, tmp_path):
    """What verify runs: original and fused are byte-identical copies, so every structure check must pass,
    each time (each check loads both files afresh, at FP32 and FP16)."""
    for graph in ("original", "fused"):
        for precision in ("fp32", "fp16"):
            shutil.copy(se_onnx, tmp_path / onnx_name(graph, precision))
    ed = EngineDir(tmp_path, {}, tmp_path, "input", "logits", (3, 32, 32), 17)
    for _ in range(4):
        checks = structure_checks(ed, OnnxRuntimeBackend())
        assert [c.name for c in checks if "runtime" in c.name] == [
            "structure.fp32.runtime_graph_identical", "structure.fp16.runtime_graph_identical"]
        assert all(c.passed for c in checks), [c.message for c in checks if not c.passed]


def _edited(src, dst, edit):
    proto = onnx.load(str(src))
    edit(proto.graph)
    onnx.save(proto, str(dst))
    return dst


def _extra_node(g):  # a Neg on the logits: nothing folds it away
    last = next(n for n in g.node if "logits" in n.output)
    last.output[list(last.output).index("logits")] = "pre_logits"
    g.node.append(helper.make_node("Neg", ["pre_logits"], ["logits"], name="extra_neg"))


def _other_op(g):  # the second squeeze-excite's gate: Sigmoid -> HardSigmoid (same shapes)
    sig = [n for n in g.node if n.op_type == "Sigmoid"][1]
    sig.op_type = "HardSigmoid"


def _other_attribute(g):  # the first conv dilated by 2 (pads widened so the shapes stay)
    conv = next(n for n in g.node if n.op_type == "Conv")
    for a in conv.attribute:
        if a.name == "dilations":
            a.ints[:] = [2, 2]
        if a.name == "pads":
            a.ints[:] = [2, 2, 2, 2]


@pytest.mark.parametrize("edit,expect", [
    (_extra_node, "Neg"), (_other_op, "HardSigmoid"), (_other_attribute, "dilations"),
], ids=["extra-node", "other-op", "other-attribute"])
def test_a_real_difference_in_the_runtime_graph_still_fails(se_onnx, tmp_path, edit, expect):
    original = _optimised(se_onnx, tmp_path / "a.onnx")
    other = _optimised(_edited(se_onnx, tmp_path / "edited.onnx", edit), tmp_path / "b.onnx")
    rep = compare_runtime_graphs(original, other)
    assert not rep.identical
    assert any(expect in d for d in rep.differences), rep.differences


def _tiny(names: dict[str, str], order: list[int], attr: int = 1, swap: bool = False) -> onnx.ModelProto:
    """x -> Relu -> a; x -> Sigmoid -> b; Add(a, b) -> y, with renamable nodes/tensors and node order."""
    t = lambda k: names.get(k, k)  # noqa: E731
    nodes = [helper.make_node("Relu", ["x"], [t("a")], name=t("n1")),
             helper.make_node("Sigmoid", ["x"], [t("b")], name=t("n2")),
             helper.make_node("Concat", [t("b"), t("a")] if swap else [t("a"), t("b")], ["y"], name=t("n3"), axis=attr)]
    vi = lambda n, s: helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s)  # noqa: E731
    g = helper.make_graph([nodes[i] for i in order], "g", [vi("x", [1, 4])], [vi("y", None)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_generated_names_and_listing_order_are_not_structure():
    a = _tiny({}, [0, 1, 2])
    b = _tiny({"a": "tok_9", "b": "tok_3", "n1": "x1", "n2": "x7", "n3": "x0"}, [1, 0, 2])
    assert not compare_graph_structure(a, b).identical  # the file comparison is (rightly) strict
    assert compare_runtime_graphs(a, b).identical


def test_swapped_edges_and_other_attributes_are_structure():
    a = _tiny({}, [0, 1, 2])
    swapped = _tiny({}, [0, 1, 2], swap=True)  # Concat(sigmoid, relu) instead of Concat(relu, sigmoid)
    rep = compare_runtime_graphs(a, swapped)
    assert not rep.identical and any("Concat" in d for d in rep.differences), rep.differences
    rep = compare_runtime_graphs(a, _tiny({}, [0, 1, 2], attr=0))
    assert not rep.identical and any("axis=0" in d for d in rep.differences), rep.differences
