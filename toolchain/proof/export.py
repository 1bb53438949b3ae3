"""ONNX side of `fuse-export`: export, structural comparison and FP16 conversion.

Exporter: torch.onnx's TorchScript exporter (`dynamo=False`) in eval mode with constant folding, which
folds every Conv -> BatchNorm pair into the Conv. It is used with `keep_initializers_as_inputs=True`
(the initializers are then removed from the graph inputs again) because that turns off the exporter's
*by-value* de-duplication of initializers: with it on, two weights that happen to hold equal values
(e.g. the all-zero folded biases of an untrained BN) are merged behind Identity nodes, so the graph's
structure would depend on the weights' values. Without it, the structure is a function of the
architecture only, which is what the zero-overhead proof compares. See docs/fuse-export.md.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import onnx
import torch
from torch import nn

from ..artifacts import atomic_write_bytes
from ..backends.onnxruntime import ort_session
from ..errors import EdgetoolError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_AXIS = "batch"
# The TorchScript exporter's range (torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET).
MAX_OPSET = 20
EXPORTER = "torch.onnx TorchScript exporter (dynamo=False, eval mode, do_constant_folding=True: BatchNorm folded into Conv)"

# float16's largest finite value; a tensor is kept in float32 if its observed |x| comes within a factor
# OVERFLOW_HEADROOM of it (inputs beyond the calibration data get some headroom), or if rounding it to
# float16 costs more than UNDERFLOW_REL_ERROR of its RMS. In float16's normal range rounding costs about
# 2.8e-4 of the RMS (unit roundoff 2^-11 / sqrt 3); only a tensor with much of its magnitude in the
# subnormal range (below 6.1e-5, where precision thins out and values flush to zero) exceeds 1e-3.
# A few tiny values in a tensor of ordinary scale do not: their absolute error is negligible.
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
OVERFLOW_HEADROOM = 2.0
UNDERFLOW_REL_ERROR = 1e-3


# ---------------------------------------------------------------------------------------------- export


def export_onnx(model: nn.Module, sample_input: torch.Tensor, path: Path | str, opset: int) -> onnx.ModelProto:
    """Export `model` (eval mode; the caller's module is not modified) to `path` with input `input`
    ([batch, ...], dynamic axis `batch`) and output `logits`; run onnx.checker and strict shape
    inference on the result. Returns the written model."""
    if not 13 <= opset <= MAX_OPSET:
        raise EdgetoolError(f"recipe field 'fuse.opset': {opset} is outside what the exporter supports (13..{MAX_OPSET})")
    model = copy.deepcopy(model).eval()
    buf = io.BytesIO()
    # torch >= 2.5 takes `dynamo` (and newer releases default it to True); older torch, e.g. a JetPack
    # 6 wheel, has only the TorchScript exporter and rejects the keyword.
    exporter = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings():
        # The TorchScript exporter announces its deprecation on every call; the choice is deliberate.
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(
                model, (sample_input,), buf, opset_version=opset, **exporter,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
                training=torch.onnx.TrainingMode.EVAL, do_constant_folding=True,
                keep_initializers_as_inputs=True,  # disables value de-duplication (see module docstring)
                export_params=True,
            )
    proto = onnx.load_from_string(buf.getvalue())
    _drop_initializer_inputs(proto.graph)
    check_onnx(proto, str(path))
    atomic_write_bytes(path, proto.SerializeToString())
    return proto


def _drop_initializer_inputs(graph: onnx.GraphProto) -> None:
    """Initializers listed as graph inputs would be overridable at run time; ours are constants."""
    inits = {t.name for t in graph.initializer}
    keep = [i for i in graph.input if i.name not in inits]
    del graph.input[:]
    graph.input.extend(keep)


def check_onnx(proto: onnx.ModelProto, what: str) -> onnx.ModelProto:
    """onnx.checker plus strict, type-checked shape inference; returns the shape-inferred model."""
    try:
        onnx.checker.check_model(proto)
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgetoolError(f"{what} fails ONNX validation: {first}") from None


# ---------------------------------------------------------------------------------------------- structure


@dataclass
class StructureReport:
    """Whether two ONNX graphs are the same computation up to initializer values."""

    identical: bool
    differences: list[str] = field(default_factory=list)


def _load(model: onnx.ModelProto | Path | str) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        return onnx.load(str(model))
    except Exception as exc:  # protobuf decode errors and missing files: bad input, not an internal error
        raise EdgetoolError(f"{model} is not a readable ONNX model ({type(exc).__name__}); rerun `edgetool fuse-export`") from None


def _value_info_sig(v: onnx.ValueInfoProto) -> tuple:
    t = v.type.tensor_type
    dims = tuple(d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
                 for d in t.shape.dim) if t.HasField("shape") else None
    return v.name, onnx.TensorProto.DataType.Name(t.elem_type), dims


def _tensor_sig(t: onnx.TensorProto) -> tuple:
    return tuple(t.dims), onnx.TensorProto.DataType.Name(t.data_type)


def _attr_text(a: onnx.AttributeProto) -> str:
    value = onnx.helper.get_attribute_value(a)
    if isinstance(value, onnx.TensorProto):
        return f"tensor{list(value.dims)}:{onnx.TensorProto.DataType.Name(value.data_type)}"
    return repr(value)


def compare_graph_structure(a: onnx.ModelProto | Path | str, b: onnx.ModelProto | Path | str,
                            max_differences: int = 50) -> StructureReport:
    """Same opsets, graph inputs/outputs (names, types, shapes), nodes in order (op type, domain, name,
    wiring and every attribute, Constant tensors included) and initializers (names, shapes, dtypes).
    Initializer values are deliberately not compared: they are the only thing fusion may change."""
    ma, mb = _load(a), _load(b)
    ga, gb = ma.graph, mb.graph
    diffs: list[str] = []

    opsets = lambda m: sorted((o.domain or "ai.onnx", o.version) for o in m.opset_import)  # noqa: E731
    if opsets(ma) != opsets(mb):
        diffs.append(f"opset imports differ: {opsets(ma)} vs {opsets(mb)}")

    for kind, xs, ys in (("input", ga.input, gb.input), ("output", ga.output, gb.output)):
        sa, sb = [_value_info_sig(v) for v in xs], [_value_info_sig(v) for v in ys]
        if sa != sb:
            diffs.append(f"graph {kind}s differ: {sa} vs {sb}")

    if len(ga.node) != len(gb.node):
        diffs.append(f"node count differs: {len(ga.node)} vs {len(gb.node)}")
    for i, (na, nb) in enumerate(zip(ga.node, gb.node)):
        where = f"node {i} ({na.name or na.op_type})"
        if (na.domain, na.op_type) != (nb.domain, nb.op_type):
            diffs.append(f"{where}: op {na.domain}{na.op_type} vs {nb.domain}{nb.op_type}")
            continue
        if na.name != nb.name:
            diffs.append(f"{where}: name {na.name!r} vs {nb.name!r}")
        if list(na.input) != list(nb.input) or list(na.output) != list(nb.output):
            diffs.append(f"{where}: wiring {list(na.input)}->{list(na.output)} vs {list(nb.input)}->{list(nb.output)}")
        attrs_a = {x.name: x for x in na.attribute}
        attrs_b = {x.name: x for x in nb.attribute}
        for name in sorted(attrs_a.keys() | attrs_b.keys()):
            xa, xb = attrs_a.get(name), attrs_b.get(name)
            if xa is None or xb is None:
                diffs.append(f"{where}: attribute '{name}' only in {'the first' if xb is None else 'the second'} graph")
            elif xa != xb:
                diffs.append(f"{where}: attribute '{name}' {_attr_text(xa)} vs {_attr_text(xb)}")
    if len(ga.node) != len(gb.node):
        longer = ga.node if len(ga.node) > len(gb.node) else gb.node
        extra = [n.op_type for n in longer[min(len(ga.node), len(gb.node)):]]
        diffs.append(f"extra nodes in the {'first' if longer is ga.node else 'second'} graph: {extra[:10]}")

    inits_a = {t.name: _tensor_sig(t) for t in ga.initializer}
    inits_b = {t.name: _tensor_sig(t) for t in gb.initializer}
    for name in [t.name for t in ga.initializer if t.name not in inits_b]:
        diffs.append(f"initializer '{name}' {inits_a[name]} only in the first graph")
    for name in [t.name for t in gb.initializer if t.name not in inits_a]:
        diffs.append(f"initializer '{name}' {inits_b[name]} only in the second graph")
    for name, sig in inits_a.items():
        if name in inits_b and inits_b[name] != sig:
            diffs.append(f"initializer '{name}': shape/dtype {sig} vs {inits_b[name]}")
    if [t.name for t in ga.initializer] != [t.name for t in gb.initializer] and inits_a.keys() == inits_b.keys():
        diffs.append("initializers are stored in a different order")
    for kind, xa, xb in (("sparse initializers", len(ga.sparse_initializer), len(gb.sparse_initializer)),
                         ("local functions", len(ma.functions), len(mb.functions))):
        if xa != xb:
            diffs.append(f"{kind}: {xa} vs {xb}")

    if len(diffs) > max_differences:
        diffs = diffs[:max_differences] + [f"... and {len(diffs) - max_differences} more"]
    return StructureReport(identical=not diffs, differences=diffs)


def canonical_nodes(model: onnx.ModelProto | Path | str) -> tuple[dict[str, onnx.NodeProto], list[tuple[str, str]]]:
    """A name-free identity for every node: a hash of its domain, op type, attributes and the identities of
    its inputs, where a graph input is known by its name, an initializer by its dtype and shape, and a node's
    output by its producer's identity and position. Returns ({identity: node}, the graph outputs as
    [(name, identity of the tensor)]). Node names, tensor names made up by an optimiser, and the order in
    which independent nodes are listed do not enter it; every op, attribute and edge does. A node that
    occurs twice (the same op on the same inputs) is counted twice: its second identity carries '#2'."""
    graph = _load(model).graph
    tensor: dict[str, str] = {"": "absent"}
    tensor.update({v.name: f"input:{v.name}" for v in graph.input})
    tensor.update({t.name: f"initializer:{_tensor_sig(t)}" for t in graph.initializer})
    pending = list(graph.node)
    nodes: dict[str, onnx.NodeProto] = {}
    while pending:  # producers before consumers, whatever order the file lists them in
        waiting = []
        for node in pending:
            if not all(i in tensor for i in node.input):
                waiting.append(node)
                continue
            attrs = sorted((a.name, a.SerializeToString(deterministic=True)) for a in node.attribute)
            key = repr((node.domain or "ai.onnx", node.op_type, attrs, [tensor[i] for i in node.input], len(node.output)))
            ident = hashlib.sha256(key.encode()).hexdigest()[:16]
            for j, out in enumerate(node.output):
                if out:
                    tensor[out] = f"{ident}:{j}"
            key, k = ident, 1
            while key in nodes:  # the same op on the same inputs again: one more of the same node
                k += 1
                key = f"{ident}#{k}"
            nodes[key] = node
        if len(waiting) == len(pending):
            missing = sorted({i for n in waiting for i in n.input if i not in tensor})
            raise EdgetoolError(f"the graph reads tensors nothing produces: {missing[:3]}")
        pending = waiting
    return nodes, [(o.name, tensor.get(o.name, "missing")) for o in graph.output]


def _describe_node(node: onnx.NodeProto) -> str:
    attrs = ", ".join(f"{a.name}={_attr_text(a)}" for a in node.attribute)
    return f"{node.domain + '.' if node.domain else ''}{node.op_type}({attrs}) '{node.name}'"


def compare_runtime_graphs(a: onnx.ModelProto | Path | str, b: onnx.ModelProto | Path | str,
                           max_differences: int = 10) -> StructureReport:
    """Whether two graphs as a runtime optimised them (ONNX Runtime's `optimized_model_filepath`) run the
    same computation: same opsets, graph inputs and outputs, and the same nodes by their name-free
    identity (`canonical_nodes`), compared as a whole. ONNX Runtime names the nodes and tensors its
    transformers insert from a counter, and lists independent nodes in an order that varies from one
    load of the same file to the next (its NCHWc layout transformer), so `compare_graph_structure`'s
    node-by-node, name-by-name comparison would fail two loads of one file. An extra node, a different
    op, attribute, edge or weight shape still differs. A node that differs makes every node downstream
    of it differ too; only the first ones (whose inputs match) are listed."""
    ma, mb = _load(a), _load(b)
    diffs: list[str] = []
    opsets = lambda m: sorted((o.domain or "ai.onnx", o.version) for o in m.opset_import)  # noqa: E731
    if opsets(ma) != opsets(mb):
        diffs.append(f"opset imports differ: {opsets(ma)} vs {opsets(mb)}")
    sa, sb = [_value_info_sig(v) for v in ma.graph.input], [_value_info_sig(v) for v in mb.graph.input]
    if sa != sb:
        diffs.append(f"graph inputs differ: {sa} vs {sb}")
    nodes_a, outs_a = canonical_nodes(ma)
    nodes_b, outs_b = canonical_nodes(mb)
    only = {"first": [k for k in nodes_a if k not in nodes_b], "second": [k for k in nodes_b if k not in nodes_a]}
    if only["first"] or only["second"]:
        diffs.append(f"{len(nodes_a)} vs {len(nodes_b)} nodes; {len(only['first'])} only in the first graph, "
                     f"{len(only['second'])} only in the second")
    for which, keys, nodes in (("first", only["first"], nodes_a), ("second", only["second"], nodes_b)):
        produced_here = {o for k in keys for o in nodes[k].output}
        roots = [nodes[k] for k in keys if not produced_here.intersection(nodes[k].input)]
        for node in roots[:max_differences]:
            diffs.append(f"only in the {which} graph: {_describe_node(node)}")
        if len(keys) > len(roots[:max_differences]):
            diffs.append(f"... and {len(keys) - len(roots[:max_differences])} more node(s) of the {which} graph downstream")
    sig = lambda m: [_value_info_sig(v) for v in m.graph.output]  # noqa: E731
    if sig(ma) != sig(mb):
        diffs.append(f"graph outputs differ: {sig(ma)} vs {sig(mb)}")
    elif not diffs and outs_a != outs_b:
        diffs.append("the graph outputs are computed by different nodes")
    return StructureReport(identical=not diffs, differences=diffs)


# ---------------------------------------------------------------------------------------------- FP16


@dataclass
class _RangeStats:
    absmax: float = 0.0
    sum_sq: float = 0.0
    sum_sq_rounding: float = 0.0

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        if not np.isfinite(x).all():  # inf/nan already in float32: certainly not representable in float16
            self.absmax = float("inf")
            return
        if x.size == 0:
            return
        self.absmax = max(self.absmax, float(np.abs(x).max()))
        fits = x[np.abs(x) <= FP16_MAX].astype(np.float64)  # beyond it, the overflow test decides
        self.sum_sq += float(np.sum(fits ** 2))
        self.sum_sq_rounding += float(np.sum((fits.astype(np.float16).astype(np.float64) - fits) ** 2))

    def problem(self) -> str | None:
        if self.absmax * OVERFLOW_HEADROOM > FP16_MAX:
            return f"|x| reaches {self.absmax:.3g} (float16 max {FP16_MAX:g}, headroom x{OVERFLOW_HEADROOM:g})"
        rel = (self.sum_sq_rounding / self.sum_sq) ** 0.5 if self.sum_sq > 0 else 0.0
        if rel > UNDERFLOW_REL_ERROR:
            return (f"float16 rounding costs {rel:.2g} of its RMS (limit {UNDERFLOW_REL_ERROR:g}): "
                    f"its values sit in float16's subnormal range (|x| max {self.absmax:.3g})")
        return None


def fp16_unsafe_nodes(path: Path | str, calibration_inputs: np.ndarray, batch_size: int = 64) -> dict[str, str]:
    """Nodes that must stay float32: {node name: reason}. A node is unsafe when one of its float32
    initializers, or one of its input or output activations observed while running
    `calibration_inputs` through ONNX Runtime with every intermediate tensor exposed, would overflow
    or underflow float16 (thresholds above)."""
    proto = _load(path)
    graph = proto.graph
    float_inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    stats: dict[str, _RangeStats] = {}
    for name, arr in float_inits.items():
        stats.setdefault(name, _RangeStats()).add(arr)

    # Expose every float32 node output as a graph output (types from shape inference).
    inferred = onnx.shape_inference.infer_shapes(proto)
    vi = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
    probe = copy.deepcopy(proto)
    existing = {o.name for o in probe.graph.output}
    exposed = [o for n in probe.graph.node for o in n.output
               if o and o in vi and vi[o].type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    for name in exposed:
        if name not in existing:
            probe.graph.output.append(vi[name])
    probe_inputs = [i.name for i in graph.input if i.name not in float_inits]
    # No graph optimisation, so every exposed name is computed exactly as the graph states it.
    sess = ort_session(probe, optimization="disabled")
    out_names = [o.name for o in sess.get_outputs()]
    X = np.ascontiguousarray(calibration_inputs, dtype=np.float32)
    for i in range(0, len(X), batch_size):
        feeds = {probe_inputs[0]: X[i: i + batch_size]}
        for name, value in zip(out_names, sess.run(None, feeds)):
            if value.dtype == np.float32:
                stats.setdefault(name, _RangeStats()).add(value)
        stats.setdefault(probe_inputs[0], _RangeStats()).add(feeds[probe_inputs[0]])

    unsafe: dict[str, str] = {}
    for node in graph.node:
        for tensor in list(node.input) + list(node.output):
            st = stats.get(tensor)
            reason = st.problem() if st is not None else None
            if reason is not None:
                unsafe[node.name] = f"{tensor}: {reason}"
                break
    return unsafe


def emulate_fp16_storage(model: onnx.ModelProto | Path | str) -> onnx.ModelProto:
    """A float32 graph that computes what the float16 graph `model` computes on hardware that stores every
    float16 tensor as float16 and does the arithmetic in float32 (TensorRT's FP16 with FP32 accumulation):
    float16 weights become float32 with the same values and every float16-typed tensor is rounded
    through a Cast pair. ONNX Runtime's CPU provider cannot show this by itself: it has few float16
    kernels, so it runs whole float16 subgraphs in float32 and drops the intermediate roundings (an
    overflowing activation stays finite there)."""
    proto = copy.deepcopy(_load(model))
    g = proto.graph
    inferred = onnx.shape_inference.infer_shapes(proto).graph
    fp16 = onnx.TensorProto.FLOAT16
    half = {v.name for v in list(inferred.value_info) + list(inferred.input) + list(inferred.output)
            if v.type.tensor_type.elem_type == fp16}
    half |= {t.name for t in g.initializer if t.data_type == fp16}

    def widen(t: onnx.TensorProto) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float32), t.name)

    for i, t in enumerate(g.initializer):
        if t.data_type == fp16:
            g.initializer[i].CopyFrom(widen(t))
    nodes: list[onnx.NodeProto] = []
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == fp16:
                a.t.CopyFrom(widen(a.t))
        rounded = [out for out in node.output if out in half]
        node.output[:] = [f"{out}__f32" if out in half else out for out in node.output]
        nodes.append(node)
        for name in rounded:  # computed in float32, stored as float16, read back
            nodes.append(onnx.helper.make_node("Cast", [f"{name}__f32"], [f"{name}__f16"], to=fp16, name=f"{name}__store16"))
            nodes.append(onnx.helper.make_node("Cast", [f"{name}__f16"], [name], to=onnx.TensorProto.FLOAT,
                                               name=f"{name}__read32"))
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    for v in list(g.input) + list(g.output):
        if v.type.tensor_type.elem_type == fp16:
            v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return proto


def fp16_converter_name() -> str:
    import onnxconverter_common

    return (f"onnxconverter-common {onnxconverter_common.__version__} float16.convert_float_to_float16 "
            f"(keep_io_types=True, node_block_list from calibrated float16 range checks)")


def convert_fp16(src: Path | str, dst: Path | str, calibration_inputs: np.ndarray | None,
                 block_list: Mapping[str, str] | Iterable[str] | None = None) -> dict:
    """Write `dst`: `src` with float16 weights and activations, float32 graph inputs/outputs, and every
    node found unsafe for float16 on `calibration_inputs` (skipped when None) plus those in `block_list`
    ({name: reason} or names) kept in float32. Returns {"converter", "blocked_nodes": {name: reason}, "nodes",
    "weight_clamps"}; the last counts the converter's notices that a weight tensor's extreme value (per sign)
    was clamped into float16's range."""
    from onnxconverter_common import float16

    unsafe = fp16_unsafe_nodes(src, calibration_inputs) if calibration_inputs is not None else {}
    extra = block_list if isinstance(block_list, Mapping) else {n: "listed by the caller" for n in block_list or ()}
    for name, why in extra.items():
        unsafe.setdefault(name, why)
    proto = _load(src)
    names = [n.name for n in proto.graph.node]
    if len(set(names)) != len(names) or not all(names):
        raise EdgetoolError(f"{src}: nodes must have unique names for the float16 block list")
    unknown = sorted(set(unsafe) - set(names))
    if unknown:
        raise EdgetoolError(f"{src}: the float16 block list names nodes the graph does not have: {unknown[:3]}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(
            proto, keep_io_types=True, node_block_list=sorted(unsafe),
            # Weights are clamped only at float16's true limits (nodes whose weights exceed them are blocked
            # above); the few nonzero weights below its smallest subnormal become that subnormal, not zero.
            max_finite_val=FP16_MAX, min_positive_val=float(np.finfo(np.float16).smallest_subnormal),
        )
    clamped = sum("truncated" in str(w.message) for w in caught)
    check_onnx(converted, str(dst))
    atomic_write_bytes(dst, converted.SerializeToString())
    return {"converter": fp16_converter_name(), "blocked_nodes": unsafe, "nodes": len(names),
            "weight_clamps": clamped}
