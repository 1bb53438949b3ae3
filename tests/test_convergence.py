"""Convergence to headroom targets, paired speed-ups, the fixed curve subsample, and how bench prints them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from toolchain.bench.jobs import curve_subsample
from toolchain.bench.convergence import convergence, first_reaching, headroom_targets, paired_speedup
from toolchain.data.formats import Split
from toolchain.stages.bench import run_bench
from toolchain.training.fit import EvalPoint


def _curve(*f1, every=5, step_seconds=0.1):
    return [EvalPoint(i * every, f, f, i * every * step_seconds) for i, f in enumerate(f1)]


def test_headroom_targets_scale_with_what_the_run_could_gain():
    assert headroom_targets(0.8, 1.0, [0.5, 0.9]) == {0.5: pytest.approx(0.9), 0.9: pytest.approx(0.98)}
    assert headroom_targets(0.4, 0.6, [0.5]) == {0.5: pytest.approx(0.5)}
    # nothing gained (or lost): no target, so nobody "reaches" it at step 0
    assert headroom_targets(0.7, 0.7, [0.5, 0.9]) == {0.5: None, 0.9: None}
    assert headroom_targets(0.7, 0.6, [0.5]) == {0.5: None}


def test_first_reaching():
    curve = _curve(0.5, 0.7, 0.9, 0.8)
    assert first_reaching(curve, 0.7).step == 5
    assert first_reaching(curve, 0.85).step == 10
    assert first_reaching(curve, 0.95) is None and first_reaching(curve, None) is None


def test_paired_speedup_is_a_geometric_mean_over_seeds_where_both_reached():
    s = paired_speedup([20, 10, None, 30, None], [10, 10, 5, None, None])
    assert s["geomean"] == pytest.approx(math.sqrt(2 * 1))
    assert (s["pairs"], s["reference_only"], s["method_only"], s["neither"]) == (2, 1, 1, 1)
    assert paired_speedup([None], [5])["geomean"] is None


def test_convergence_per_seed_targets_steps_seconds_and_speedups():
    # seed 0: zero-shot 0.5, best final 0.9 (full) -> targets 0.7 (50 %) and 0.86 (90 %)
    # seed 1: zero-shot 0.6, best final 1.0 (ttlora) -> targets 0.8 and 0.96
    curves = {
        "full": [_curve(0.5, 0.6, 0.75, 0.9), _curve(0.6, 0.65, 0.7, 0.85)],
        "ttlora": [_curve(0.5, 0.8, 0.88, 0.88), _curve(0.6, 0.9, 0.97, 1.0)],
        "head": [_curve(0.5, 0.5, 0.5, 0.55), _curve(0.6, 0.6, 0.6, 0.6)],
    }
    run, rows = convergence(curves, [0.5, 0.6], [0.5, 0.9], reference="ttlora")
    assert run["best_final_f1_per_seed"] == [0.9, 1.0] and run["best_final_method_per_seed"] == ["full", "ttlora"]
    assert run["targets_per_seed"]["50%"] == pytest.approx([0.7, 0.8])
    assert run["targets_per_seed"]["90%"] == pytest.approx([0.86, 0.96])
    full, tt, head = rows["full"], rows["ttlora"], rows["head"]
    assert full["50%"]["steps_per_seed"] == [10, 15] and full["90%"]["steps_per_seed"] == [15, None]
    assert tt["50%"]["steps_per_seed"] == [5, 5] and tt["90%"]["steps_per_seed"] == [10, 10]
    assert head["90%"]["reached"] == 0 and head["90%"]["steps_mean"] is None
    assert full["90%"]["seconds_per_seed"] == pytest.approx([1.5, None])
    assert full["50%"]["steps_mean"] == 12.5 and full["50%"]["reached"] == 2
    # full vs ttlora at 50 %: 10/5 and 15/5 -> geometric mean sqrt(6)
    assert full["50%"]["speedup_of_reference_steps"]["geomean"] == pytest.approx(math.sqrt(6))
    assert full["90%"]["speedup_of_reference_steps"]["pairs"] == 1
    assert full["90%"]["speedup_of_reference_steps"]["reference_only"] == 1
    assert "speedup_of_reference_steps" not in tt["50%"]
    _, no_ref = convergence(curves, [0.5, 0.6], [0.5], reference=None)
    assert "speedup_of_reference_steps" not in no_ref["full"]["50%"]


def _split(counts):
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)]).astype(np.int64)
    X = np.arange(len(y), dtype=np.float32).reshape(-1, 1, 1)
    return Split(X, y)


def test_curve_subsample_is_stratified_fixed_and_whole_when_small():
    split = _split([500, 300, 150, 50, 3])
    sub = curve_subsample(split, 100, seed=0)
    assert len(sub) == 100
    counts = np.bincount(sub.y, minlength=5)
    # shares x 100 = 49.85, 29.9, 14.96, 4.99, 0.30: floors 49, 29, 14, 4, then 1 for the smallest class (at
    # least one per class), then the largest remainders get the 3 windows left
    assert counts.tolist() == [49, 30, 15, 5, 1]
    assert len(np.unique(sub.X)) == 100  # no window twice
    again = curve_subsample(split, 100, seed=0)
    np.testing.assert_array_equal(again.X, sub.X)
    assert not np.array_equal(curve_subsample(split, 100, seed=1).X, sub.X)
    assert curve_subsample(split, 0, seed=0) is split and curve_subsample(split, 5000, seed=0) is split


def test_one_seed_bench_text_and_convergence_fields(make_recipe, tmp_path):
    """The text slips of one-seed runs ("1 seeds"), and convergence fields in bench.json."""
    recipe = make_recipe("oneseed", train={"steps": 10, "lr": 0.01, "batch_size": 12, "eval_every": 5, "target_f1": 1.0},
                         bench={"timing_steps": 2, "eval_subsample": 12})
    lines = []
    out = run_bench(recipe, ["head", "ttlora"], 1, tmp_path / "b", progress=False, echo=lines.append)
    table = (out / "bench.md").read_text()
    assert "1 seed [0]" in table and "1 seeds" not in table and "None" not in table
    result = json.loads((out / "bench.json").read_text())
    meta = result["meta"]
    assert meta["curve_windows"] == [12]
    conv = meta["convergence"]
    assert conv["reference"] == "ttlora" and conv["fractions"] == [0.5, 0.9]
    rows = {r["method"]: r for r in result["rows"]}
    curve_f1_end = {m: r["curve_mean"][-1]["f1_mean"] for m, r in rows.items()}
    assert conv["best_final_f1_per_seed"] == [max(curve_f1_end.values())]
    assert conv["zero_shot_f1_per_seed"] == [rows["head"]["curve_mean"][0]["f1_mean"]]
    for r in rows.values():
        assert set(r["convergence"]) == {"50%", "90%"}
        assert r["lr_selected_on"] == "fixed" and r["lr"] == 0.01
    assert "## Convergence to headroom targets" in table
    # a method that never reaches the absolute target reads "not reached"
    if not all(rows[m]["steps_to_target_reached"] for m in rows):
        assert "not reached (0/1)" in table
    assert any(ln.startswith("[1/2] report ") for ln in lines)
