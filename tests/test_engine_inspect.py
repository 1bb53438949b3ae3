"""Layer-by-layer engine identity (toolchain.backends.engine_inspect) and verify's
`structure.engine_layers_identical` check, on hand-written engine-inspector JSON.

FIXTURES, NOT TENSORRT OUTPUT: the JSON below is written by hand in the format TensorRT's engine
inspector emits with ProfilingVerbosity.DETAILED and LayerInformationFormat.JSON -- an object with
"Layers" (each with "Name", "LayerType", "Inputs"/"Outputs" of {"Name", "Location", "Dimensions",
"Format/Datatype"}, "ParameterType", "Origin", "TacticName"/"TacticValue", parameters such as "Weights":
{"Type", "Count"}) and "Bindings" -- as documented in TensorRT's developer guide ("Engine Inspector")
and parsed by Polygraphy's backend/trt/util.py. Layer names, tactics and counts are invented."""

from __future__ import annotations

import copy

import pytest

from toolchain.backends.base import Backend
from toolchain.backends.engine_inspect import (compare_engine_layers, layer_precisions, normalise_name,
                                               parse_engine_information, profile_layers, tactic)
from toolchain.errors import EdgetoolError
from toolchain.stages.verify import engine_structure_checks


def _tensor(name: str, dims: list[int], fmt: str) -> dict:
    return {"Name": name, "Location": "Device", "Dimensions": dims, "Format/Datatype": fmt}


def _engine(batch: int = 1) -> dict:
    """A conv+relu, a global pool, a Myelin-compiled head (TacticName only) and the output reformat."""
    return {
        "Layers": [
            {"Name": "/stem/conv/Conv + /stem/relu/Relu", "LayerType": "CaskConvolution",
             "Inputs": [_tensor("input", [batch, 3, 100], "Row major linear FP32 format")],
             "Outputs": [_tensor("/stem/relu/Relu_output_0", [batch, 8, 100], "Channel major FP16 format where channel % 8 == 0")],
             "ParameterType": "Convolution", "Kernel": [3], "PaddingMode": "kEXPLICIT_ROUND_DOWN", "PrePadding": [1],
             "PostPadding": [1], "Stride": [1], "Dilation": [1], "OutMaps": 8, "Groups": 1,
             "Weights": {"Type": "Half", "Count": 72}, "Bias": {"Type": "Half", "Count": 8}, "HasBias": 1, "HasReLU": 1,
             "Activation": "RELU", "Origin": "CONVOLUTION",
             "TacticName": "sm87_xmma_fprop_implicit_gemm_f16f16_f16f16_f16_nhwckrsc_nhwc_tilesize32x32x64_stage4",
             "TacticValue": "0x2a3b4c5d6e7f8091", "StreamId": 0, "Metadata": "[ONNX Layer: /stem/conv/Conv]"},
            {"Name": "/pool/GlobalAveragePool", "LayerType": "CaskPooling",
             "Inputs": [_tensor("/stem/relu/Relu_output_0", [batch, 8, 100], "Channel major FP16 format where channel % 8 == 0")],
             "Outputs": [_tensor("onnx::Flatten_41", [batch, 8, 1], "Row major linear FP16 format")],
             "ParameterType": "Pooling", "PoolingType": "AVERAGE", "WindowSize": [100], "Origin": "REDUCE",
             "TacticValue": "0x0000000000000007", "StreamId": 0, "Metadata": "[ONNX Layer: /pool/GlobalAveragePool]"},
            {"Name": "{ForeignNode[/head/Flatten.../head/Gemm]}", "LayerType": "Myelin",
             "Inputs": [_tensor("onnx::Flatten_41", [batch, 8, 1], "Row major linear FP16 format")],
             "Outputs": [_tensor("logits_fp16", [batch, 4], "Row major linear FP16 format")],
             "TacticName": "__myl_FcAdd_0x9f1c", "StreamId": 0, "Metadata": ""},
            {"Name": "Reformatting CopyNode for Output Tensor 0 to logits", "LayerType": "Reformat",
             "Inputs": [_tensor("logits_fp16", [batch, 4], "Row major linear FP16 format")],
             "Outputs": [_tensor("logits", [batch, 4], "Row major linear FP32 format")],
             "ParameterType": "Reformat", "Origin": "CAST", "TacticValue": "0x00000000000003e8", "StreamId": 0},
        ],
        "Bindings": ["input", "logits"],
    }


def test_identical_engines_are_identical_and_summarised():
    cmp = compare_engine_layers(_engine(), copy.deepcopy(_engine()))
    assert cmp.identical and cmp.differences == [] and cmp.layers == (4, 4)
    assert cmp.precisions == {"FP16": 3, "FP32": 1}
    assert "4 layers, same types, tensor formats/precisions and tactics" in cmp.summary()


def test_a_different_tactic_is_reported_layer_by_layer():
    fused = _engine()
    fused["Layers"][0]["TacticName"] = "sm87_xmma_fprop_implicit_gemm_f16f16_f16f16_f16_nhwckrsc_nhwc_tilesize64x32x64"
    fused["Layers"][0]["TacticValue"] = "0x1111111111111111"
    cmp = compare_engine_layers(_engine(), fused)
    assert not cmp.identical and len(cmp.differences) == 2
    assert cmp.differences[0].startswith("layer 0 ('/stem/conv/Conv + /stem/relu/Relu'): TacticName: ")
    assert "tilesize32x32x64_stage4' vs 'sm87" in cmp.differences[0]  # long tactic names are shown in full
    assert "TacticValue: '0x2a3b4c5d6e7f8091' vs '0x1111111111111111'" in cmp.differences[1]


def test_a_different_precision_and_a_myelin_tactic_are_reported():
    fused = _engine()
    fused["Layers"][1]["Outputs"][0]["Format/Datatype"] = "Row major linear FP32 format"
    fused["Layers"][2]["TacticName"] = "__myl_FcAdd_0x0000"
    diffs = compare_engine_layers(_engine(), fused).differences
    assert diffs == ["layer 1 ('/pool/GlobalAveragePool'): Outputs[0].Format/Datatype: 'Row major linear FP16 format' "
                     "vs 'Row major linear FP32 format'",
                     "layer 2 ('{ForeignNode[/head/Flatten.../head/Gemm]}'): TacticName: '__myl_FcAdd_0x9f1c' vs "
                     "'__myl_FcAdd_0x0000'"]
    assert tactic(_engine()["Layers"][2]) == "__myl_FcAdd_0x9f1c" and tactic(_engine()["Layers"][1]) == "0x0000000000000007"


def test_a_different_fusion_shows_as_layers_only_in_one_engine():
    # Fused engine where TensorRT did not fuse the ReLU into the conv: two layers where the original has one.
    fused = _engine()
    conv = fused["Layers"][0]
    relu = {"Name": "/stem/relu/Relu", "LayerType": "PointWiseV2", "Inputs": conv["Outputs"], "Outputs": conv["Outputs"],
            "TacticValue": "0x0000000000000001"}
    conv["Name"], conv["HasReLU"] = "/stem/conv/Conv", 0
    fused["Layers"].insert(1, relu)
    cmp = compare_engine_layers(_engine(), fused)
    assert not cmp.identical and cmp.layers == (4, 5)
    assert cmp.differences == ["layer count 4 vs 5",
                               "layer 0 ('/stem/conv/Conv + /stem/relu/Relu') only in original",
                               "fused layer 0 ('/stem/conv/Conv') only in fused",
                               "fused layer 1 ('/stem/relu/Relu') only in fused"]  # the layers after it still pair up
    dropped = _engine()
    del dropped["Layers"][3]
    assert compare_engine_layers(_engine(), dropped).differences == [
        "layer count 4 vs 3", "layer 3 ('Reformatting CopyNode for Output Tensor 0 to logits') only in original"]


def test_exporter_counters_are_masked_but_real_names_are_not():
    renumbered = _engine()
    for t in renumbered["Layers"][1]["Outputs"] + renumbered["Layers"][2]["Inputs"]:
        t["Name"] = "onnx::Flatten_97"
    assert compare_engine_layers(_engine(), renumbered).identical
    assert normalise_name("onnx::Flatten_41 + onnx::Conv_7") == "onnx::Flatten_# + onnx::Conv_#"
    renamed = _engine()
    renamed["Layers"][1]["Name"] = "/pool2/GlobalAveragePool"
    assert not compare_engine_layers(_engine(), renamed).identical


def test_parameters_and_bindings_are_compared():
    other = _engine()
    other["Layers"][0]["Weights"]["Type"] = "Float"
    other["Bindings"] = ["input", "logits", "extra"]
    diffs = compare_engine_layers(_engine(), other).differences
    assert any("Weights.Type: 'Half' vs 'Float'" in d for d in diffs)
    assert "Bindings: 2 vs 3 entries" in diffs
    missing = _engine()
    del missing["Layers"][3]["Origin"]
    assert compare_engine_layers(_engine(), missing).differences == [
        "layer 3 ('Reformatting CopyNode for Output Tensor 0 to logits'): Origin only in original ('CAST')"]


def _tagged(info: dict, profile: int) -> dict:
    # How the inspector names profile N > 0's layers, tensors and bindings (trt-engine-explorer's
    # trex/parser.py: a "[profile N]" suffix; profile 0 has none).
    def tag(value):
        if isinstance(value, str):
            return f"{value} [profile {profile}]"
        if isinstance(value, list):
            return [tag(v) for v in value]
        if isinstance(value, dict):
            return {k: tag(v) if k == "Name" or k in ("Inputs", "Outputs") else v for k, v in value.items()}
        return value

    return {"Layers": [tag(x) for x in info["Layers"]], "Bindings": tag(info["Bindings"])}


def test_each_batch_compares_only_its_own_profiles_layers():
    # A two-profile engine: the JSON lists both graphs whatever execution context is set.
    one, thirty_two = _engine(1), _tagged(_engine(32), 1)
    both = {"Layers": one["Layers"] + thirty_two["Layers"], "Bindings": one["Bindings"] + thirty_two["Bindings"]}
    assert profile_layers(both, 0) == one
    p1 = profile_layers(both, 1)
    assert p1 == _engine(32)  # tags removed, so every profile's graph reads alike
    assert len(p1["Layers"]) == len(one["Layers"])
    # Counting and comparing then concerns the batch's own graph: a difference in profile 1 only shows
    # at batch 32, and the layer count is that of one graph, not the sum over profiles.
    fused = copy.deepcopy(both)
    fused["Layers"][len(one["Layers"])]["TacticValue"] = "0x1"
    assert compare_engine_layers(profile_layers(both, 0), profile_layers(fused, 0)).identical
    cmp32 = compare_engine_layers(profile_layers(both, 1), profile_layers(fused, 1))
    assert not cmp32.identical and cmp32.layers == (len(one["Layers"]),) * 2


def test_inlined_literals_are_compared_by_structure_not_value():
    # DETAILED verbosity may list a PointWise layer's inlined constants; they are values, like weights.
    a, b = _engine(), _engine()
    a["Layers"][0]["Literals"] = ["1.000000e+00", "5.000000e-01"]
    b["Layers"][0]["Literals"] = ["1.000000e+00", "2.500000e-01"]
    assert compare_engine_layers(a, b).identical
    b["Layers"][0]["Literals"] = ["1.000000e+00"]  # a different structure still shows
    cmp = compare_engine_layers(a, b)
    assert not cmp.identical and "Literals: 2 vs 1 entries" in cmp.differences[0]


def test_engines_without_detailed_verbosity_cannot_be_proven_identical():
    names_only = {"Layers": [layer["Name"] for layer in _engine()["Layers"]], "Bindings": ["input", "logits"]}
    cmp = compare_engine_layers(names_only, copy.deepcopy(names_only))
    assert not cmp.identical and not cmp.detailed and "DETAILED" in cmp.differences[0]


def test_inspector_output_is_parsed_or_refused():
    import json

    assert parse_engine_information(json.dumps(_engine()))["Bindings"] == ["input", "logits"]
    with pytest.raises(EdgetoolError, match="no JSON for fused.plan"):
        parse_engine_information("Layers: conv", "fused.plan")
    with pytest.raises(EdgetoolError, match='no "Layers" list'):
        parse_engine_information('{"Bindings": []}')


def test_layer_precisions_read_both_format_spellings():
    # TensorRT 8.x writes "Half"/"Float", 10.x "... FP16 format"; dynamic dims without a context give "N/A".
    info = {"Layers": [{"Outputs": [{"Format/Datatype": "Half"}, {"Format/Datatype": "Float"}]},
                       {"Outputs": [{"Format/Datatype": "Row major linear FP16 format"}]},
                       {"Outputs": [{"Format/Datatype": "N/A due to dynamic shapes"}]}]}
    assert layer_precisions(info) == {"FP16": 2, "FP32": 1, "unknown": 1}


# ------------------------------------------------------------------------ verify's check over a backend


class _InspectedBackend(Backend):
    """A stand-in backend serving fixture layer information (not TensorRT): it tests verify's check only."""

    name = "inspected-fixture"

    def __init__(self, layers):
        self.layers = layers

    def probe(self):
        raise NotImplementedError

    def accuracy_precisions(self):
        return ["fp16"]

    def latency_precision(self):
        return "fp16"

    def runner(self, *args, **kwargs):
        raise NotImplementedError

    def engine_layers(self, ed, batch_sizes, echo=None):
        return self.layers


def test_verify_check_passes_on_identical_engines_and_names_the_difference_otherwise():
    same = {"original": {1: _engine(1), 32: _engine(32)}, "fused": {1: _engine(1), 32: _engine(32)}}
    checks, figures = engine_structure_checks(_InspectedBackend(same), None, (1, 32), None)
    assert [c.name for c in checks] == ["structure.engine_layers_identical"] and checks[0].passed
    assert checks[0].message.endswith("at batch 1, 32") and figures["32"]["layers"] == [4, 4]

    slower = _engine(32)
    slower["Layers"][0]["TacticValue"] = "0x1111111111111111"
    differs = {"original": same["original"], "fused": {1: _engine(1), 32: slower}}
    checks, figures = engine_structure_checks(_InspectedBackend(differs), None, (1, 32), None)
    assert not checks[0].passed and checks[0].message.startswith("batch 32: layer 0 (")
    assert "TacticValue" in checks[0].message and figures["1"]["identical"] and not figures["32"]["identical"]


def test_backends_without_engines_add_no_check():
    assert engine_structure_checks(_InspectedBackend(None), None, (1,), None) == ([], {})
