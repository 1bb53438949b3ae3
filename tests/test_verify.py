"""`edgetool verify`: the checks, the latency machinery (with synthetic timings), the reports, exit codes,
the TensorRT-absent path, and a tampered engine that must fail naming its check.

Latency figures are never asserted here (this suite runs on loaded 2-core machines): the machinery is
(fields, ratios, verdicts). The latency decision itself is tested on synthetic timings in
tests/test_latency_verdict.py, integrity and report keeping in tests/test_integrity.py, the accuracy
criteria in tests/test_accuracy_parity.py."""

from __future__ import annotations

import json
import shutil
import sys
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from conftest import assert_parity_passed, needs_tensorrt
from toolchain.cli import main
from toolchain.proof.parity import Check, junit_xml, latency_input, latency_stats

FAST = ["--iterations", "5", "--warmup", "1"]


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def engine_dir(tiny_engine, tmp_path_factory):
    """A copy of the session's fuse-export of the tiny TT-LoRA run (this module writes reports into it)."""
    out = tmp_path_factory.mktemp("verify") / "engine"
    shutil.copytree(tiny_engine, out)
    return out


@pytest.fixture(scope="module")
def auto_run(engine_dir):
    """`verify --engine auto` on a machine without TensorRT (import made to fail, as it does there)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "tensorrt", None)
        res = CliRunner().invoke(main, ["verify", str(engine_dir), "--engine", "auto", *FAST])
    report = json.loads((engine_dir / "verify_report.json").read_text()) if res.exit_code in (0, 1) else None
    return res, report


def _copy(engine_dir, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(engine_dir, dst)
    for f in ("verify_report.json", "verify_junit.xml"):
        (dst / f).unlink(missing_ok=True)
    return dst


# ------------------------------------------------------------------------------------ end to end


def test_auto_falls_back_to_onnxruntime_says_why_and_passes(auto_run):
    res, report = auto_run
    assert "auto: TensorRT is not installed" in res.stdout and "using onnxruntime" in res.stdout
    assert report["engine"] == "onnxruntime"
    assert_parity_passed(res, report)
    assert ("PASSED" in res.stdout) == report["passed"]
    # 5 timed rounds cannot bound a 99 % interval: latency is inconclusive, which is not a failure
    assert report["inconclusive_checks"] == ["latency.batch_1", "latency.batch_8"]
    assert "PASSED (latency inconclusive at batch 1, 8: 5 rounds are too few" in res.stdout


def test_report_has_the_promised_fields_and_consistent_latency(auto_run):
    _, r = auto_run
    for key in ("engine", "precision", "passed", "argmax_agreement", "f1_torch", "f1_engine", "max_abs_error",
                "latency_ms", "latency_ratio", "unfused_latency_ratio", "failed_checks", "latency_band", "checks"):
        assert key in r, key
    assert r["precision"] == "fp32"  # CPU ONNX Runtime deploys FP32
    assert set(r["accuracy"]) == {"fp32", "fp16"}
    fp32 = r["accuracy"]["fp32"]
    assert fp32["argmax_agreement"] == 1.0 and fp32["f1_engine"] == fp32["f1_torch"]
    assert fp32["max_abs_error"] < 1e-4 and r["max_abs_error"] == fp32["max_abs_error"]
    assert r["accuracy"]["fp16"]["max_abs_error"] > 0  # FP16 really differs, within its own tolerances
    for acc in r["accuracy"].values():  # judged next to the original engine on the same inputs
        assert acc["baseline_valid"] and acc["original_argmax_agreement"] == 1.0
        assert acc["scaled_error"] == pytest.approx(acc["max_abs_error"] / acc["output_scale"])
        assert acc["error_limit"] == pytest.approx(acc["error_margin"] * acc["original_scaled_error"] + acc["error_floor"])
    assert "float16 graph on ONNX Runtime" in r["accuracy"]["fp16"]["executed_as"]
    for bs in ("1", "8"):
        for engine in ("original", "fused", "control"):
            st = r["latency_ms"][engine][bs]
            assert 0 < st["p50"] <= st["p90"] <= st["p99"] and st["n"] == 5
        rounds = {k: np.array(v) for k, v in r["latency_rounds_ms"][bs].items()}
        # the median of the per-round fused/original ratios (rounds are kept in the report, in ms)
        assert r["latency_ratio"][bs] == pytest.approx(np.median(rounds["fused"] / rounds["original"]), rel=1e-3)
        v = r["latency_verdict"][bs]
        assert v["verdict"] == "inconclusive" and v["rounds"] == 5 and "cannot bound a 99 % interval" in v["reason"]
        assert r["unfused_latency_ratio"]["torch"][bs] > 0
    assert r["latency_band"] == {"requested": 0.05, "max": 0.5, "confidence": 0.99, "noise_factor": 2.0}
    u = r["unfused_onnx"]
    assert u["unfused_nodes"] > u["fused_nodes"]  # the adapter is in that graph...
    assert u["unfused_nodes_after_ort_folding"] == u["fused_nodes"]  # ...until ONNX Runtime folds its constants
    # like for like: the same folding applied to fused.onnx (MobileNet's Clip bounds fold too, so its raw
    # node count is not comparable with the folded unfused count)
    assert u["fused_nodes_after_ort_folding"] == u["unfused_nodes_after_ort_folding"]
    assert [c["name"] for c in r["checks"]] == [
        "integrity.original.onnx", "integrity.fused.onnx", "integrity.original.fp16.onnx", "integrity.fused.fp16.onnx",
        "accuracy.fp32.argmax_agreement", "accuracy.fp32.f1_delta", "accuracy.fp32.output_error",
        "accuracy.fp32.original_engine", "accuracy.fp16.argmax_agreement", "accuracy.fp16.f1_delta",
        "accuracy.fp16.output_error", "accuracy.fp16.original_engine", "structure.fp32.graph_identical", "structure.fp16.graph_identical", "structure.fp32.runtime_graph_identical",
        "structure.fp16.runtime_graph_identical", "latency.batch_1", "latency.batch_8"]
    assert "as onnxruntime will run them" in next(c["message"] for c in r["checks"]
                                                  if c["name"] == "structure.fp32.runtime_graph_identical")
    assert r["changed_since_export"] == [] and r["warnings"] == []
    assert r["verdict"] == "passed, latency inconclusive"


def test_junit_has_one_testcase_per_check(auto_run, engine_dir):
    _, r = auto_run
    root = ET.parse(engine_dir / "verify_junit.xml").getroot()
    cases = root.findall(".//testcase")
    assert len(cases) == len(r["checks"]) and root.get("failures") == "0" and root.get("skipped") == "2"
    assert {c.get("name") for c in cases} >= {"fp32.output_error", "batch_1", "fused.onnx"}
    assert not root.findall(".//failure")
    skipped = root.findall(".//testcase/skipped/..")
    assert {c.get("name") for c in skipped} == {"batch_1", "batch_8"}
    assert all(c.find("skipped").get("message").startswith("inconclusive: ") for c in skipped)


def test_swapped_original_onnx_of_another_structure_fails_the_structure_check(engine_dir, tmp_path):
    """Latency parity only means something between identical graphs: verify re-proves it on the files it times."""
    eng = _copy(engine_dir, tmp_path, "swapped")
    model = onnx.load(eng / "original.onnx")
    model.graph.node[0].name = model.graph.node[0].name + "_other"  # still a valid graph, no longer the same one
    onnx.checker.check_model(model)
    onnx.save(model, eng / "original.onnx")

    res = CliRunner().invoke(main, ["verify", str(eng), "--engine", "onnxruntime", "--iterations", "3", "--warmup", "0"])
    assert res.exit_code == 1, res.output
    err = res.stderr.strip()
    assert "\n" not in err and "structure.fp32.graph_identical" in err and "integrity.original.onnx" in err
    r = json.loads((eng / "verify_report.json").read_text())
    assert "structure.fp32.graph_identical" in r["failed_checks"]
    # A renamed node is a name, not a computation: the runtime graph comparison, which ignores names (ONNX
    # Runtime makes up its own), finds the same graph; the file comparison above is the strict one.
    assert "structure.fp32.runtime_graph_identical" not in r["failed_checks"]
    # The fp16 pair is untouched and a renamed node computes the same thing (latency is not asserted: 3 runs).
    assert not any(c.startswith(("structure.fp16", "accuracy.")) for c in r["failed_checks"])


def test_tampered_fused_onnx_fails_naming_the_check(engine_dir, tmp_path):
    eng = _copy(engine_dir, tmp_path, "tampered")
    model = onnx.load(eng / "fused.onnx")
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    bias = next(t for t in model.graph.initializer if t.name == gemm.input[2])
    values = numpy_helper.to_array(bias).copy()
    values[0] += 1.0  # one initializer, one value: the graph stays valid, class 0's logit moves by 1.0
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.checker.check_model(model)
    onnx.save(model, eng / "fused.onnx")

    res = CliRunner().invoke(main, ["verify", str(eng), "--engine", "onnxruntime", "--iterations", "3", "--warmup", "0"])
    assert res.exit_code == 1, res.output
    err = res.stderr.strip()
    assert "\n" not in err and err.startswith("edgetool: error: parity check failed")
    assert "accuracy.fp32.output_error" in err and "integrity.fused.onnx" in err
    r = json.loads((eng / "verify_report.json").read_text())
    assert r["passed"] is False and "accuracy.fp32.output_error" in r["failed_checks"]
    assert r["failed_checks"][0] == "integrity.fused.onnx" and r["verdict"] == "failed"
    assert r["accuracy"]["fp32"]["max_abs_error"] == pytest.approx(1.0, abs=1e-3)
    assert not any(c.startswith("accuracy.fp16") for c in r["failed_checks"])  # fused.fp16.onnx is untouched
    assert r["changed_since_export"] == ["fused.onnx"]
    failures = ET.parse(eng / "verify_junit.xml").getroot().findall(".//testcase/failure/..")
    assert {"fp32.output_error", "fused.onnx"} <= {tc.get("name") for tc in failures}


def test_tensorrt_absent_exits_2_with_one_line(engine_dir, tmp_path, monkeypatch):
    eng = _copy(engine_dir, tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    res = CliRunner().invoke(main, ["verify", str(eng), "--engine", "tensorrt"])
    assert res.exit_code == 2
    err = res.stderr.strip()
    assert "\n" not in err and "Traceback" not in res.output
    assert err.startswith("edgetool: error: TensorRT is not installed")
    assert "python3-libnvinfer" in err and "pip install tensorrt" in err
    assert not (eng / "verify_report.json").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "incomplete", "bad_json", "malformed_report", "corrupt_onnx"])
def test_bad_engine_dir_exits_2(case, engine_dir, tmp_path):
    target = tmp_path / "eng"
    if case == "empty":
        target.mkdir()
    elif case == "incomplete":
        target = _copy(engine_dir, tmp_path)
        (target / "fused.fp16.onnx").unlink()
    elif case == "bad_json":
        target = _copy(engine_dir, tmp_path)
        (target / "fuse_report.json").write_text("{oops")
    elif case == "malformed_report":
        target = _copy(engine_dir, tmp_path)
        rep = json.loads((target / "fuse_report.json").read_text())
        (target / "fuse_report.json").write_text(json.dumps({**rep, "input_shape": ["6", "x"], "run_dir": None}))
    elif case == "corrupt_onnx":
        target = _copy(engine_dir, tmp_path)
        (target / "fused.onnx").write_bytes(b"not a protobuf")
    res = CliRunner().invoke(main, ["verify", str(target), "--engine", "onnxruntime"])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert "\n" not in err and err.startswith("edgetool: error:")
    expected = {"missing": "ENGINE_DIR not found", "empty": "no fuse_report.json",
                "incomplete": "fused.fp16.onnx not found", "bad_json": "not valid JSON", "malformed_report": "is malformed",
                "corrupt_onnx": "onnxruntime cannot load"}[case]
    assert expected in err


def _verify_fails_with_2(eng, expected):
    earlier = {f: (eng / f).read_bytes() for f in ("verify_report.json", "verify_junit.xml") if (eng / f).exists()}
    res = CliRunner().invoke(main, ["verify", str(eng), "--engine", "onnxruntime", *FAST])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert "\n" not in err and err.startswith("edgetool: error:") and expected in err
    # a run that stopped early writes nothing: earlier reports stay as they were (tests/test_integrity.py)
    assert {f: (eng / f).read_bytes() for f in earlier} == earlier


def test_earlier_reports_stay_when_engine_dir_became_incomplete(auto_run, engine_dir, tmp_path):
    assert (engine_dir / "verify_junit.xml").is_file()  # left by a passing verify
    eng = tmp_path / "eng"
    shutil.copytree(engine_dir, eng)
    (eng / "fused.fp16.onnx").unlink()
    _verify_fails_with_2(eng, "fused.fp16.onnx not found")
    # the earlier report records the hashes of the files it verified: a reader sees it is not of these
    r = json.loads((eng / "verify_report.json").read_text())
    assert "fused.fp16.onnx" in r["engine_files"] and not (eng / "fused.fp16.onnx").exists()


def test_engines_of_an_earlier_adapter_are_refused(auto_run, engine_dir, tiny_run, tmp_path):
    import torch

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    payload = torch.load(run / "adapter.pt", weights_only=True)
    payload["state"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in payload["state"].items()}
    torch.save(payload, run / "adapter.pt")  # the run adapted again after fuse-export
    eng = tmp_path / "eng"
    shutil.copytree(engine_dir, eng)
    rep = json.loads((eng / "fuse_report.json").read_text())
    (eng / "fuse_report.json").write_text(json.dumps({**rep, "run_dir": str(run)}))
    _verify_fails_with_2(eng, "changed since fuse-export")


def test_run_dir_gone_is_named_as_recorded(engine_dir, tmp_path):
    eng = _copy(engine_dir, tmp_path)
    rep = json.loads((eng / "fuse_report.json").read_text())
    (eng / "fuse_report.json").write_text(json.dumps({**rep, "run_dir": str(tmp_path / "moved-away")}))
    _verify_fails_with_2(eng, "no longer exists")


def test_unwritable_engine_dir_is_refused_before_any_work(engine_dir, tmp_path, monkeypatch):
    import toolchain.stages.verify as verify_mod

    eng = _copy(engine_dir, tmp_path)
    # chmod does not stop root (CI containers often run as root), so the permission answer is simulated
    monkeypatch.setattr(verify_mod.os, "access", lambda path, mode: not (mode & verify_mod.os.W_OK))
    res = CliRunner().invoke(main, ["verify", str(eng), "--engine", "onnxruntime", *FAST])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip().startswith("edgetool: error: ENGINE_DIR") and "not writable" in res.stderr


@needs_tensorrt
def test_tensorrt_engines_verify_and_are_cached(engine_dir, tmp_path):
    eng = _copy(engine_dir, tmp_path)
    res = CliRunner().invoke(main, ["verify", str(eng), "--engine", "tensorrt", *FAST])
    r = json.loads((eng / "verify_report.json").read_text())
    assert r["engine"] == "tensorrt" and r["precision"] == "fp16"
    assert not [c for c in r["failed_checks"] if c.startswith("accuracy.")], res.output
    plans = sorted(p.name for p in eng.glob("*.plan"))
    assert len(plans) == 2 and plans[0].startswith("fused.fp16.trt") and plans[1].startswith("original.fp16.trt")
    mtimes = {p: p.stat().st_mtime_ns for p in eng.glob("*.plan")}
    res2 = CliRunner().invoke(main, ["verify", str(eng), "--engine", "tensorrt", *FAST])
    assert "building TensorRT engine" not in res2.stdout  # reused from the cache
    assert {p: p.stat().st_mtime_ns for p in eng.glob("*.plan")} == mtimes


# ------------------------------------------------------------------------------------ latency machinery


def test_latency_stats_percentiles_in_ms():
    st = latency_stats(np.arange(1, 101) * 1e-3)
    assert st["p50"] == pytest.approx(50.5) and st["p90"] == pytest.approx(90.1) and st["p99"] == pytest.approx(99.01)
    assert st["n"] == 100


def test_latency_input_tiles_real_windows():
    X = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4)
    x = latency_input(X, 7)
    assert x.shape == (7, 2, 4) and np.array_equal(x[3], X[0]) and x.flags["C_CONTIGUOUS"]


def test_junit_xml_marks_failures():
    xml = junit_xml([Check("accuracy.fp32.output_error", "fail", "max 1.0 > 1e-4", 0.5),
                     Check("latency.batch_1", "pass", "ratio 1.0", 0.1)], "edgetool.verify", {"engine": "onnxruntime"})
    root = ET.fromstring(xml)
    assert root.tag == "testsuites" and root.get("tests") == "2" and root.get("failures") == "1"
    suite = root.find("testsuite")
    assert suite.find("properties/property").get("value") == "onnxruntime"
    failed = suite.find("testcase[@name='fp32.output_error']")
    assert failed.get("classname") == "edgetool.verify.accuracy"
    assert failed.find("failure").get("message") == "max 1.0 > 1e-4"
    assert suite.find("testcase[@name='batch_1']/failure") is None
