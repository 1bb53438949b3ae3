"""The TensorRT build decisions (toolchain.backends.trtplan) and the way TensorRT/Polygraphy failures are
reported, without TensorRT.

STAND-INS, NOT TENSORRT: `TrtFacts` values below describe what the real releases offer, as read from
NVIDIA/TensorRT's sources (python/src/infer/pyCore.cpp at tags v8.6.1, v10.3.0 and v11.0): 8.6 has
`BuilderFlag.FP16` but no `NetworkDefinitionCreationFlag.STRONGLY_TYPED`; 10.3 (JetPack 6.1/6.2) has
both; 11 has STRONGLY_TYPED and no FP16 flag. Nothing here runs TensorRT; the engine builds themselves
are tested by the `tensorrt`-marked tests, which skip where TensorRT is absent."""

from __future__ import annotations

import json
import os
import types

import pytest

from toolchain.backends.base import cause_of_failure, logged_errors, polygraphy_errors
from toolchain.backends.tensorrt import trt_calls
from toolchain.backends.trtplan import (STRONGLY_TYPED, WEAK_FP16_FLAG, DeviceFacts, TrtFacts, binding_error,
                                        engine_staleness, plan_build, trt_facts, version_tuple)
from toolchain.errors import EdgetoolError

# Stand-ins for the facts `trt_facts` reads off the installed module (see the module docstring).
TRT_8_6 = TrtFacts("8.6.2", has_fp16_flag=True, has_strongly_typed=False, polygraphy="0.53.6",
                   has_profile_sharing_preview=True)
TRT_10_3 = TrtFacts("10.3.0", has_fp16_flag=True, has_strongly_typed=True, polygraphy="0.53.6",
                    has_profile_sharing_preview=True)
TRT_11 = TrtFacts("11.0.0", has_fp16_flag=False, has_strongly_typed=True, polygraphy="0.53.6")
ORIN_NANO = DeviceFacts("Orin", "8.7", 8, "sm87-orin", "36.4.0")


def test_one_precision_plan_on_tensorrt_10_and_11():
    # The checked FP16 graph, strongly typed, no FP16 flag: the same build on JetPack 6 and on TensorRT 11.
    p10, p11 = plan_build(TRT_10_3, ORIN_NANO, (1, 32)), plan_build(TRT_11, ORIN_NANO, (1, 32))
    for p in (p10, p11):
        assert (p.mode, p.onnx_precision, p.strongly_typed, p.fp16_flag) == (STRONGLY_TYPED, "fp16", True, False)
    assert {k: v for k, v in p10.key.items() if k != "tensorrt"} == {k: v for k, v in p11.key.items() if k != "tensorrt"}


def test_weak_fp16_flag_build_only_where_the_flag_exists():
    weak = plan_build(TRT_10_3, ORIN_NANO, (1, 32), WEAK_FP16_FLAG)
    assert (weak.onnx_precision, weak.strongly_typed, weak.fp16_flag) == ("fp32", False, True)
    assert weak.key["build_mode"] == WEAK_FP16_FLAG
    with pytest.raises(EdgetoolError, match="TensorRT 11 removed it"):
        plan_build(TRT_11, ORIN_NANO, (1,), WEAK_FP16_FLAG)
    with pytest.raises(EdgetoolError, match="unknown TensorRT build mode"):
        plan_build(TRT_10_3, ORIN_NANO, (1,), "fp16")


def test_tensorrt_8_6_has_no_strongly_typed_networks_and_says_what_to_do():
    with pytest.raises(EdgetoolError) as exc:
        plan_build(TRT_8_6, ORIN_NANO, (1,))
    assert "no strongly typed networks" in str(exc.value) and "--trt-build weak-fp16-flag" in str(exc.value)
    assert plan_build(TRT_8_6, ORIN_NANO, (1,), WEAK_FP16_FLAG).fp16_flag


def test_polygraphy_too_old_for_tensorrt_11_is_refused_before_building():
    old = TrtFacts("11.0.0", False, True, polygraphy="0.49.9")
    with pytest.raises(EdgetoolError, match=r"Polygraphy 0\.49\.9 cannot build.*TensorRT 11\.0\.0"):
        plan_build(old, ORIN_NANO, (1,))
    plan_build(TrtFacts("10.3.0", True, True, polygraphy="0.49.9"), ORIN_NANO, (1,))  # fine on TensorRT 10


def test_one_static_profile_per_timed_batch_and_padding_for_other_sizes():
    p = plan_build(TRT_10_3, ORIN_NANO, (32, 1, 32))
    assert p.profile_batches == (1, 32)
    assert p.key["profiles"] == [{"min": 1, "opt": 1, "max": 1}, {"min": 32, "opt": 32, "max": 32}]
    assert p.profile_for(1) == (0, 1) and p.profile_for(32) == (1, 32)
    assert p.profile_for(8) == (1, 32)  # the last chunk of the test split, padded to the batch-32 profile
    with pytest.raises(EdgetoolError, match="up to 32, got a batch of 33"):
        p.profile_for(33)
    with pytest.raises(EdgetoolError, match="positive"):
        plan_build(TRT_10_3, ORIN_NANO, (0, 1))


def test_cache_key_has_tensorrt_device_sm_count_and_l4t_release():
    key = plan_build(TRT_10_3, ORIN_NANO, (1, 32)).key
    assert key["tensorrt"] == "10.3.0" and key["device"] == "Orin" and key["compute_capability"] == "8.7"
    assert key["sm_count"] == 8 and key["l4t_release"] == "36.4.0" and key["profiling_verbosity"] == "detailed"
    four_gb = plan_build(TRT_10_3, DeviceFacts("Orin", "8.7", 4, "sm87-orin", "36.4.0"), (1, 32)).key
    reflashed = plan_build(TRT_10_3, DeviceFacts("Orin", "8.7", 8, "sm87-orin", "36.4.3"), (1, 32)).key
    assert [k for k in key if key[k] != four_gb[k]] == ["sm_count"]
    assert [k for k in key if key[k] != reflashed[k]] == ["l4t_release"]


def test_profile_sharing_switched_on_for_trt86_only_not_trt10_3_or_trt11():
    # TensorRT 8.6 refuses a second execution context on a profile another one holds unless the engine
    # was built with PROFILE_SHARING_0806 (off by default there; always on from 10.0).
    p86 = plan_build(TRT_8_6, ORIN_NANO, (1, 32), WEAK_FP16_FLAG)
    assert p86.preview_features == ("PROFILE_SHARING_0806",)
    assert p86.key["preview_features"] == ["PROFILE_SHARING_0806"]
    for facts, mode in ((TRT_10_3, WEAK_FP16_FLAG), (TRT_10_3, STRONGLY_TYPED), (TRT_11, STRONGLY_TYPED)):
        assert plan_build(facts, ORIN_NANO, (1,), mode).preview_features == ()


def test_weak_fp16_flag_allows_tf32_like_trtexec_fp16_trt10_3():
    # trtexec enables TF32 unless --noTF32; Polygraphy's CreateConfig clears it unless tf32=True.
    weak = plan_build(TRT_10_3, ORIN_NANO, (1,), WEAK_FP16_FLAG)
    assert weak.tf32 and weak.fp16_flag and weak.key["tf32"] is True
    strong = plan_build(TRT_10_3, ORIN_NANO, (1,), STRONGLY_TYPED)
    assert not strong.tf32 and strong.key["tf32"] is False


def test_engine_staleness_names_what_changed(tmp_path):
    onnx_path, plan, sidecar = tmp_path / "fused.fp16.onnx", tmp_path / "fused.plan", tmp_path / "fused.plan.json"
    onnx_path.write_bytes(b"graph")
    key = {**plan_build(TRT_10_3, ORIN_NANO, (1, 32)).key, "onnx": onnx_path.name, "onnx_sha256": "abc"}
    assert engine_staleness(plan, sidecar, onnx_path, key) == "no cached engine"
    plan.write_bytes(b"engine")
    sidecar.write_text(json.dumps(key))
    os.utime(onnx_path, (1_000, 1_000))
    assert engine_staleness(plan, sidecar, onnx_path, key) is None
    moved = {**plan_build(TRT_10_3, DeviceFacts("Orin", "8.7", 4, "sm87-orin", "36.4.3"), (1, 32)).key,
             "onnx": onnx_path.name, "onnx_sha256": "abc"}
    assert engine_staleness(plan, sidecar, onnx_path, moved) == "cache key changed: l4t_release, sm_count"
    weak = {**plan_build(TRT_10_3, ORIN_NANO, (1, 32), WEAK_FP16_FLAG).key, "onnx": "fused.onnx", "onnx_sha256": "d"}
    assert "build_mode" in engine_staleness(plan, sidecar, onnx_path, weak)
    sidecar.write_text("[1, 2]")
    assert engine_staleness(plan, sidecar, onnx_path, key) == "unreadable cache key"


def test_facts_are_read_off_the_module():
    # Stand-in module objects carrying only the attributes trt_facts reads (not TensorRT).
    ten = types.SimpleNamespace(__version__="10.3.0", BuilderFlag=types.SimpleNamespace(FP16=1),
                                NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1),
                                PreviewFeature=types.SimpleNamespace(PROFILE_SHARING_0806=1))
    eleven = types.SimpleNamespace(__version__="11.0.0", BuilderFlag=types.SimpleNamespace(DEBUG=2),
                                   NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1))
    assert trt_facts(ten, "0.53.6") == TRT_10_3
    assert trt_facts(eleven, "0.53.6") == TRT_11
    assert version_tuple("10.3.0.26") == (10, 3, 0, 26) and version_tuple("0.53.6") == (0, 53, 6)
    assert version_tuple("11.0.0rc1") == (11, 0, 0) and TRT_11.major == 11


# ------------------------------------------------------------------------------ errors that name the cause


def test_polygraphy_errors_are_captured_not_printed(capsys):
    from polygraphy.logger import G_LOGGER

    with polygraphy_errors() as errors:
        G_LOGGER.warning("a warning that must stay out of the summary")
        G_LOGGER.error("first line of the error\nits second line")
        G_LOGGER.info("chatter")
    assert errors == ["first line of the error its second line"]
    out = capsys.readouterr()
    assert "error" not in out.out + out.err and "chatter" not in out.out


def test_onnx_parser_error_reaches_the_one_line_message_not_polygraphys_summary():
    # Polygraphy's own check_onnx_parser_errors, fed a stand-in parser whose errors read as TensorRT's ONNX
    # parser prints them; TensorRT's logger errors reach Polygraphy's G_LOGGER.error the same way.
    from polygraphy.backend.trt.util import check_onnx_parser_errors
    from polygraphy.logger import G_LOGGER

    parser = types.SimpleNamespace(num_errors=1, get_error=lambda i: (
        "In node 3 with name: /layer1/conv/Conv and operator: Conv (importConv): UNSUPPORTED_NODE: "
        "Assertion failed: nbSpatialDims == kernelWeights.shape.nbDims - 2"))
    with pytest.raises(EdgetoolError) as exc:
        with trt_calls(TRT_10_3, "could not build an engine from fused.fp16.onnx"):
            G_LOGGER.error("WeightsContext.cpp:178: Failed to open file: fused.fp16.onnx_data")
            check_onnx_parser_errors(parser, success=False)
    msg = str(exc.value)
    assert exc.value.exit_code == 2 and "\n" not in msg
    assert msg.startswith("TensorRT: could not build an engine from fused.fp16.onnx: In node 3 with name: "
                          "/layer1/conv/Conv") and "UNSUPPORTED_NODE" in msg
    assert "Could not parse ONNX correctly" not in msg


def test_cause_of_failure_skips_summaries_and_falls_back_to_the_exception():
    logged = logged_errors("[W] TensorRT warning\n"
                           "[E] 4: [network.cpp::validate::2925] Error Code 4: Internal Error (input: dynamic input is\n"
                           "    missing dimensions in profile 0.)\n"
                           "[!] Invalid Engine. Please ensure the engine was built correctly\n")
    assert logged == ["4: [network.cpp::validate::2925] Error Code 4: Internal Error (input: dynamic input is "
                      "missing dimensions in profile 0.)", "Invalid Engine. Please ensure the engine was built correctly"]
    assert cause_of_failure(logged).startswith("4: [network.cpp::validate::2925] Error Code 4")
    assert cause_of_failure(["Could not parse ONNX correctly"], RuntimeError("boom\nmore")) == "boom"


@pytest.mark.parametrize("exc", [AttributeError("'tensorrt.tensorrt.IBuilderConfig' object has no attribute "
                                                "'set_preview_feature'"),
                                 TypeError("create_network(): incompatible function arguments")])
def test_binding_errors_are_exit_2_naming_both_versions(exc):
    with pytest.raises(EdgetoolError) as caught:
        with trt_calls(TRT_11, "could not build an engine from fused.fp16.onnx"):
            raise exc
    msg = str(caught.value)
    assert caught.value.exit_code == 2 and "\n" not in msg
    assert msg.startswith("TensorRT 11.0.0 and Polygraphy 0.53.6 do not fit together")
    assert type(exc).__name__ in msg and "polygraphy>=0.53.4" in msg
    assert "the installed TensorRT and Polygraphy" in str(binding_error(None, "x", exc))


def test_edgetool_errors_pass_through_trt_calls_unchanged():
    with pytest.raises(EdgetoolError, match="^the TensorRT engines were built for batches up to 32"):
        with trt_calls(TRT_10_3, "running fused"):
            plan_build(TRT_10_3, ORIN_NANO, (1, 32)).profile_for(64)


# ------------------------------------------------------------------------------------- --trt-build


def test_trt_build_option_reaches_the_tensorrt_backend_and_is_noted_elsewhere():
    from toolchain.backends.onnxruntime import OnnxRuntimeBackend
    from toolchain.backends.tensorrt import TensorRTBackend
    from toolchain.stages.verify import _apply_trt_build

    trt_backend, notes = TensorRTBackend(), []
    assert trt_backend.build == STRONGLY_TYPED
    _apply_trt_build(trt_backend, WEAK_FP16_FLAG, notes.append)
    assert trt_backend.build == WEAK_FP16_FLAG and notes == []
    _apply_trt_build(OnnxRuntimeBackend(), WEAK_FP16_FLAG, notes.append)
    assert notes == ["note: --trt-build weak-fp16-flag ignored: the engine is onnxruntime"]


def test_trt_build_choices_are_checked_by_the_cli(tmp_path):
    from click.testing import CliRunner

    from toolchain.cli import main

    res = CliRunner().invoke(main, ["verify", str(tmp_path), "--trt-build", "fp16"])
    assert res.exit_code == 2 and "'strongly-typed', 'weak-fp16-flag'" in res.output
