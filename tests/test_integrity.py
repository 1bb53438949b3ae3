"""verify's integrity rule (every exported file must have the sha256 fuse-export sealed, or verify exits
1 naming it; --allow-modified makes it a recorded warning), its reports (written together, only when
every check ran; earlier ones kept otherwise; the verified files' hashes recorded), and its warnings."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import onnx
import pytest
from click.testing import CliRunner

from toolchain.artifacts import atomic_write_files, sha256_file
from toolchain.cli import main

FAST = ["--iterations", "5", "--warmup", "1"]
REPORTS = ("verify_report.json", "verify_junit.xml")


def _verify(eng, *extra):
    res = CliRunner().invoke(main, ["verify", str(eng), "--engine", "onnxruntime", *FAST, *extra])
    report = json.loads((eng / "verify_report.json").read_text()) if (eng / "verify_report.json").exists() else None
    return res, report


def _copy(tiny_engine, tmp_path, name="eng"):
    eng = tmp_path / name
    shutil.copytree(tiny_engine, eng)
    return eng


def _checks(report):
    return {c["name"]: c for c in report["checks"]}


def test_swapped_original_fails_closed_naming_the_file(tiny_engine, tmp_path):
    """original.onnx replaced by fused.onnx: the graphs are identical, so only integrity can tell, and
    without it the latency proof would time the fused model against itself."""
    eng = _copy(tiny_engine, tmp_path)
    shutil.copyfile(eng / "fused.onnx", eng / "original.onnx")
    res, r = _verify(eng)
    assert res.exit_code == 1, res.output
    err = res.stderr.strip()
    assert "\n" not in err and err.startswith("edgetool: error: parity check failed: integrity.original.onnx")
    assert "original.onnx changed since fuse-export sealed it" in err
    # ... and the original engine, judged against the original model, is not it either.
    assert r["failed_checks"] == ["integrity.original.onnx", "accuracy.fp32.original_engine"]
    assert r["verdict"] == "failed"
    assert _checks(r)["integrity.fused.onnx"]["verdict"] == "pass"
    assert r["changed_since_export"] == ["original.onnx"] and r["allow_modified"] is False
    junit = ET.parse(eng / "verify_junit.xml").getroot()
    case = junit.find(".//testcase[@classname='edgetool.verify.integrity'][@name='original.onnx']")
    assert "original.onnx changed" in case.find("failure").get("message")
    assert "integrity original.onnx: " in res.stdout and res.stdout.splitlines()[-1].startswith("FAILED (2 of")


def test_allow_modified_records_a_warning_and_the_other_checks_decide(tiny_engine, tmp_path):
    """An edit on purpose that keeps the computation (a doc string): a recorded warning, and a pass."""
    eng = _copy(tiny_engine, tmp_path)
    model = onnx.load(str(eng / "original.onnx"))
    model.doc_string = "edited on purpose"
    onnx.save(model, str(eng / "original.onnx"))
    res, r = _verify(eng, "--allow-modified")
    assert res.exit_code == 0, res.output
    c = _checks(r)["integrity.original.onnx"]
    assert c["verdict"] == "warning" and "allowed by --allow-modified" in c["message"]
    assert r["allow_modified"] is True and r["failed_checks"] == []
    assert _checks(r)["accuracy.fp32.original_engine"]["verdict"] == "pass"
    assert any("original.onnx changed since fuse-export" in w for w in r["warnings"])
    assert "warning: original.onnx changed" in res.stdout
    assert r["accuracy"]["fp32"]["baseline_valid"] is True
    junit = ET.parse(eng / "verify_junit.xml").getroot()
    skipped = junit.find(".//testcase[@name='original.onnx']/skipped")
    assert skipped.get("message").startswith("warning: ") and "allowed by --allow-modified" in junit.find(
        ".//system-err").text


@pytest.mark.parametrize("waiver", ["--allow-modified", "resealed"])
def test_a_wrong_original_fails_naming_it_even_when_integrity_is_waived(tiny_engine, tmp_path, waiver):
    """original.onnx replaced by another graph of the same structure (here the fused one) with the integrity
    check waived, or its hash resealed in fuse_report.json: the graphs are identical, so only judging the
    original engine against the original model can tell. Before, this passed."""
    eng = _copy(tiny_engine, tmp_path)
    shutil.copyfile(eng / "fused.onnx", eng / "original.onnx")
    if waiver == "resealed":
        rep = json.loads((eng / "fuse_report.json").read_text())
        rep["files"]["original.onnx"] = sha256_file(eng / "original.onnx")
        (eng / "fuse_report.json").write_text(json.dumps(rep))
    res, r = _verify(eng, *([waiver] if waiver.startswith("--") else []))
    assert res.exit_code == 1, res.output
    err = res.stderr.strip()
    assert "\n" not in err and "accuracy.fp32.original_engine" in err
    assert "original.onnx does not compute the original model" in err
    assert r["failed_checks"] == ["accuracy.fp32.original_engine"]
    assert _checks(r)["accuracy.fp16.original_engine"]["verdict"] == "pass"  # original.fp16.onnx is untouched


def test_another_export_as_fused_fails_integrity_and_accuracy(tiny_engine, tmp_path):
    """fused.onnx replaced by the original's graph (another base's export of the same architecture)."""
    eng = _copy(tiny_engine, tmp_path)
    shutil.copyfile(eng / "original.onnx", eng / "fused.onnx")
    res, r = _verify(eng)
    assert res.exit_code == 1, res.output
    assert r["failed_checks"][0] == "integrity.fused.onnx"
    assert "accuracy.fp32.output_error" in r["failed_checks"]  # the second line of defence agrees


def test_a_fuse_report_without_hashes_fails_closed(tiny_engine, tmp_path):
    eng = _copy(tiny_engine, tmp_path)
    rep = json.loads((eng / "fuse_report.json").read_text())
    del rep["files"]
    (eng / "fuse_report.json").write_text(json.dumps(rep))
    res, r = _verify(eng)
    assert res.exit_code == 1, res.output
    assert r["failed_checks"] == [f"integrity.{f}" for f in ("original.onnx", "fused.onnx", "original.fp16.onnx",
                                                              "fused.fp16.onnx")]
    assert "records no sha256 for original.onnx" in res.stderr


def test_report_records_the_hashes_of_the_files_it_verified(tiny_engine, tmp_path):
    eng = _copy(tiny_engine, tmp_path)
    res, r = _verify(eng)
    assert res.exit_code == 0, res.output
    assert r["engine_files"] == {f: sha256_file(eng / f) for f in r["engine_files"]}
    assert len(r["engine_files"]) == 4
    props = {p.get("name"): p.get("value") for p in ET.parse(eng / "verify_junit.xml").getroot().iter("property")}
    assert props["sha256.fused.onnx"] == r["engine_files"]["fused.onnx"]
    assert props["verdict"] == "passed, latency inconclusive"


@pytest.mark.parametrize("case", ["incomplete", "run_dir_gone"])
def test_a_verify_that_stops_early_leaves_earlier_reports_untouched(case, tiny_engine, tmp_path):
    eng = _copy(tiny_engine, tmp_path)
    res, _ = _verify(eng)
    assert res.exit_code == 0, res.output
    earlier = {f: (eng / f).read_bytes() for f in REPORTS}
    if case == "incomplete":
        (eng / "fused.fp16.onnx").unlink()
    else:
        rep = json.loads((eng / "fuse_report.json").read_text())
        (eng / "fuse_report.json").write_text(json.dumps({**rep, "run_dir": str(tmp_path / "gone")}))
    res, _ = _verify(eng)
    assert res.exit_code == 2, res.output
    assert {f: (eng / f).read_bytes() for f in REPORTS} == earlier
    assert sorted(p.name for p in eng.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_a_failed_verify_replaces_the_reports_with_complete_new_ones(tiny_engine, tmp_path):
    eng = _copy(tiny_engine, tmp_path)
    assert _verify(eng)[0].exit_code == 0
    shutil.copyfile(eng / "fused.onnx", eng / "original.onnx")
    res, r = _verify(eng)
    assert res.exit_code == 1 and r["passed"] is False
    junit = ET.parse(eng / "verify_junit.xml").getroot()
    assert junit.get("failures") == "2" and len(junit.findall(".//testcase")) == len(r["checks"])
    assert r["engine_files"]["original.onnx"] == sha256_file(eng / "fused.onnx")


def test_reports_are_written_together_or_not_at_all(tmp_path, monkeypatch):
    a, b = tmp_path / "verify_report.json", tmp_path / "verify_junit.xml"
    a.write_bytes(b"old report"), b.write_bytes(b"old junit")
    import toolchain.artifacts as artifacts

    real_replace, calls = artifacts.os.replace, []

    def refuse_rename(src, dst):
        calls.append(dst)
        raise OSError("simulated rename failure")

    with pytest.raises(TypeError):  # the second file's data is not bytes: the write fails before any rename
        atomic_write_files({a: b"new report", b: None})
    assert (a.read_bytes(), b.read_bytes()) == (b"old report", b"old junit")
    monkeypatch.setattr(artifacts.os, "replace", refuse_rename)
    with pytest.raises(OSError):
        atomic_write_files({a: b"new report", b: b"new junit"})
    monkeypatch.setattr(artifacts.os, "replace", real_replace)
    assert (a.read_bytes(), b.read_bytes()) == (b"old report", b"old junit") and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["verify_junit.xml", "verify_report.json"]  # temps removed
    atomic_write_files({a: b"new report", b: b"new junit"})
    assert (a.read_bytes(), b.read_bytes()) == (b"new report", b"new junit")


def test_warns_when_adaptation_lowered_f1_and_about_unused_recipe_keys(tiny_engine, tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "f1_before": 0.9, "f1_after": 0.6}))
    recipe = (run / "recipe.yaml").read_text()
    (run / "recipe.yaml").write_text(recipe.replace("verify:\n", "verify:\n  fp16_atol: 0.1\n", 1))
    eng = _copy(tiny_engine, tmp_path)
    rep = json.loads((eng / "fuse_report.json").read_text())
    (eng / "fuse_report.json").write_text(json.dumps({**rep, "run_dir": str(run)}))
    res, r = _verify(eng)
    assert res.exit_code == 0, res.output  # a warning, not a check
    assert "warning: adaptation lowered the target macro-F1 (0.900 -> 0.600" in res.stdout
    assert "warning: recipe field(s) verify.fp16_atol are no longer used" in res.stdout
    assert len(r["warnings"]) == 2 and "lowered the target macro-F1" in r["warnings"][0]
    assert "lowered the target macro-F1" in ET.parse(eng / "verify_junit.xml").getroot().find(".//system-err").text
