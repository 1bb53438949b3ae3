"""Atomic artifact writing: strict JSON, permissions, no partial directories."""

import json
import math
import os

import numpy as np
import pytest

from toolchain.artifacts import atomic_dir, atomic_write_json


def test_non_finite_figures_are_written_as_null_in_strict_json(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"err": float("nan"), "ratio": [1.0, float("inf")], "np": np.float32("nan"),
                                            "ok": np.float64(0.5), "n": np.int64(3)})
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    r = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert r == {"err": None, "ratio": [1.0, None], "np": None, "ok": 0.5, "n": 3}
    assert not math.isnan(r["ok"])


def test_atomic_dir_leaves_nothing_on_failure_and_keeps_the_previous_result(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as d:
        (d / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as d:
            (d / "a.txt").write_text("half")
            raise RuntimeError("stage failed")
    assert (final / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp directory left behind


def test_outputs_get_umask_permissions_not_mkdtemp_ones(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as d:
            atomic_write_json(d / "r.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "r.json").stat().st_mode & 0o777 == 0o644
