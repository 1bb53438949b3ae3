"""ONNX Runtime is an extra (a Jetson keeps onnxruntime-gpu): without it, the stages that need it stop with
one line saying how to install it, never an internal error."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from toolchain.cli import main


def test_fuse_export_without_onnxruntime_is_one_line_exit_2(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    res = CliRunner().invoke(main, ["fuse-export", str(tiny_run), "--out", str(tmp_path / "eng")])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("edgetool:")]
    assert len(lines) == 1 and 'edgetool[onnxruntime]' in lines[0] and "internal error" not in lines[0]
    assert not (tmp_path / "eng").exists()


@pytest.mark.parametrize("engine", ["onnxruntime", "auto"])
def test_verify_without_onnxruntime_is_one_line_exit_2(tiny_run, tmp_path, monkeypatch, engine):
    out = tmp_path / "eng"
    assert CliRunner().invoke(main, ["fuse-export", str(tiny_run), "--out", str(out)]).exit_code == 0
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    res = CliRunner().invoke(main, ["verify", str(out), "--engine", engine])
    assert res.exit_code == 2, res.output
    assert "internal error" not in res.output and "onnxruntime" in res.output
