"""Accuracy judged as parity (toolchain.proof.parity.accuracy_parity): the fused engine's error against its
reference next to the original engine's on the same inputs, scaled by the output's magnitude; the same
function and FP16 criteria in verify and fuse-export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from toolchain.proof.parity import ParityCriteria, accuracy_parity, criteria, original_engine_check, output_error
from toolchain.recipe import VerifyConfig, load_recipe

FP16 = criteria(VerifyConfig(), "fp16")
FP32 = criteria(VerifyConfig(), "fp32")


def _mlp(rng, d_in=24, hidden=64, classes=10):
    return rng.standard_normal((d_in, hidden)) / np.sqrt(d_in), rng.standard_normal((hidden, classes)) / np.sqrt(hidden)


def _forward(x, w1, w2, scale, dtype=np.float64):
    """A two-layer network; dtype float16 stores weights and activations in float16 (one rounding plan)."""
    cast = lambda a: np.asarray(a, dtype).astype(np.float64)  # noqa: E731
    h = cast(np.maximum(cast(cast(x) @ cast(w1)), 0))
    return (cast(h @ cast(w2)) * scale).astype(np.float32)


def _case(scale: float, seed: int = 0):
    """Original and fused (original + a small update) networks with logits scaled by `scale`, each run
    exactly (reference) and with FP16 storage (engine): the same FP16 treatment for both."""
    rng = np.random.default_rng(seed)
    w1, w2 = _mlp(rng)
    f1, f2 = w1 + 0.05 * rng.standard_normal(w1.shape), w2 + 0.05 * rng.standard_normal(w2.shape)
    x = rng.standard_normal((200, 24))
    ref_o, ref_f = _forward(x, w1, w2, scale), _forward(x, f1, f2, scale)
    eng_o, eng_f = _forward(x, w1, w2, scale, np.float16), _forward(x, f1, f2, scale, np.float16)
    y = ref_f.argmax(1)
    return eng_f, ref_f, eng_o, ref_o, y


def test_large_logits_with_the_same_fp16_rounding_pass():
    """Logits x100 (max |logit| in the hundreds): FP16 rounding alone is far beyond a fixed absolute
    tolerance such as the former 0.05, yet the fused engine is exactly as close to its reference as the
    original engine is to its own."""
    eng_f, ref_f, eng_o, ref_o, y = _case(scale=100.0)
    res, checks = accuracy_parity(eng_f, ref_f, eng_o, ref_o, y, "fp16", FP16)
    assert res.max_abs_error > 0.05 and res.output_scale > 100  # the old fixed atol would have failed it
    assert all(c.passed for c in checks), [c.message for c in checks]
    assert res.baseline_valid and res.scaled_error <= res.error_limit


def test_verdict_does_not_depend_on_the_output_scale():
    small = accuracy_parity(*_case(scale=0.01), "fp16", FP16)[0]
    large = accuracy_parity(*_case(scale=100.0), "fp16", FP16)[0]
    assert small.output_error_passed and large.output_error_passed
    assert small.scaled_error == pytest.approx(large.scaled_error, rel=0.3)  # FP16 rounding is relative


def test_fused_error_much_larger_than_the_originals_fails():
    eng_f, ref_f, eng_o, ref_o, y = _case(scale=100.0)
    noisy = ref_f + 20 * (eng_f - ref_f) + 0.02 * np.abs(ref_f).max() * np.sign(ref_f)  # 20x the error, plus a bias
    res, checks = accuracy_parity(noisy.astype(np.float32), ref_f, eng_o, ref_o, y, "fp16", FP16)
    failed = {c.name: c for c in checks if c.failed}
    assert "accuracy.fp16.output_error" in failed
    assert res.scaled_error > res.error_limit == pytest.approx(FP16.error_margin * res.original_scaled_error + FP16.error_floor)
    assert "original engine" in failed["accuracy.fp16.output_error"].message


def test_a_broken_original_engine_is_no_excuse():
    """If the original engine itself disagrees with its reference, its error is not a baseline: only the floor."""
    eng_f, ref_f, eng_o, ref_o, y = _case(scale=1.0)
    broken_original = np.roll(ref_o, 1, axis=1)  # other predictions, huge error
    bad_fused = ref_f + 0.05 * np.abs(ref_f).max()
    res, checks = accuracy_parity(bad_fused.astype(np.float32), ref_f, broken_original, ref_o, y, "fp16", FP16)
    assert not res.baseline_valid and res.error_limit == FP16.error_floor
    out = next(c for c in checks if c.name == "accuracy.fp16.output_error")
    assert out.failed and "no baseline" in out.message
    # with a sound original the same broken original term would have excused it
    assert accuracy_parity(bad_fused.astype(np.float32), ref_f, ref_o + 0.1 * np.abs(ref_o).max(), ref_o, y,
                           "fp16", FP16)[0].output_error_passed


def test_agreement_and_f1_thresholds_and_the_originals_figures():
    y = np.array([0, 1, 0, 1])
    ref = np.array([[2, 0], [0, 2], [2, 0], [0, 2]], dtype=np.float32)
    res, checks = accuracy_parity(ref.copy(), ref, ref.copy(), ref, y, "fp32", FP32)
    assert all(c.passed for c in checks) and res.argmax_agreement == 1.0 and res.f1_engine == 1.0
    flipped = ref.copy(); flipped[0] = [0, 2]  # noqa: E702 -- one prediction flips
    res, checks = accuracy_parity(flipped, ref, ref.copy(), ref, y, "fp32", FP32)
    assert {c.name for c in checks if c.failed} == {"accuracy.fp32.argmax_agreement", "accuracy.fp32.f1_delta",
                                                    "accuracy.fp32.output_error"}
    assert res.argmax_agreement == 0.75 and res.f1_delta > 0 and res.original_argmax_agreement == 1.0
    # the original engine flips the same window: the message says precision, not fusion, misses the threshold
    _, checks = accuracy_parity(flipped, ref, flipped.copy(), ref, y, "fp32", FP32)
    assert "the original engine misses it too" in checks[0].message


def test_non_finite_output_fails():
    eng_f, ref_f, eng_o, ref_o, y = _case(scale=1.0)
    eng_f = eng_f.copy(); eng_f[3, 2] = np.inf  # noqa: E702
    res, checks = accuracy_parity(eng_f, ref_f, eng_o, ref_o, y, "fp16", FP16)
    assert not res.output_error_passed and checks[2].failed
    assert output_error(np.array([[np.nan]]), np.array([[1.0]]))["scaled"] == np.inf


def test_margin_and_floor_come_from_the_recipe_and_old_keys_still_load(tmp_path):
    cfg = VerifyConfig(error_margin=3.0, fp16_error_floor=2e-3, fp16_atol=0.1, rtol=1e-4)
    assert criteria(cfg, "fp16") == ParityCriteria(0.95, 0.05, 3.0, 2e-3)
    assert criteria(cfg, "fp32") == ParityCriteria(1.0, 0.0, 3.0, 1e-5)
    assert cfg.unused_fields() == ["rtol", "fp16_atol"]
    assert "fp16_atol" not in cfg.model_dump() and "error_margin" in cfg.model_dump()  # not written to new runs
    old = tmp_path / "old.yaml"  # a recipe (or a run's recipe.yaml) from before the change
    old.write_text("name: old\nmodel: {checkpoint: base.pt}\nverify: {atol: 0.0001, rtol: 0.0001, fp16_atol: 0.05, "
                   "fp16_rtol: 0.05}\n")
    assert load_recipe(old).verify.unused_fields() == ["atol", "rtol", "fp16_atol", "fp16_rtol"]


def test_fuse_export_judges_fp16_with_the_same_function_and_criteria(tiny_engine, tiny_run):
    import toolchain.proof.parity as parity
    import toolchain.stages.fuse_export as fx

    assert fx.accuracy_parity is parity.accuracy_parity and fx.criteria is parity.criteria
    rep = json.loads((tiny_engine / "fuse_report.json").read_text())
    recipe = load_recipe(tiny_run / "recipe.yaml")
    expected = criteria(recipe.verify, "fp16")
    for which in ("storage", "onnxruntime_cpu"):
        p = rep["fp16_parity"][which]
        assert (p["error_margin"], p["error_floor"], p["max_f1_delta"]) == (expected.error_margin, expected.error_floor,
                                                                            expected.max_f1_delta)
        assert p["min_agreement"] == recipe.fuse.fp16_min_agreement
        assert p["output_error_passed"] and p["baseline_valid"]
    assert rep["fp16_parity"]["storage"]["max_abs_error"] == pytest.approx(rep["fp16_max_abs_error"])


def _original_check(eng_o, y=np.array([0, 1, 0, 1, 0, 1, 0, 1]), crit=FP32):
    ref = np.tile(np.array([[2, 0], [0, 2]], dtype=np.float32), (4, 1))
    res, _ = accuracy_parity(ref + 1e-7, ref, eng_o, ref, y, "fp32", crit)
    return original_engine_check(res, "original.onnx")


def test_original_engine_is_judged_against_the_original_model_by_each_rule():
    """Each rule of the original engine's check on its own: agreement, F1 delta, scaled output error."""
    ref = np.tile(np.array([[2, 0], [0, 2]], dtype=np.float32), (4, 1))
    ok = _original_check(ref + 2e-7)
    assert ok.name == "accuracy.fp32.original_engine" and ok.passed, ok.message
    assert ok.message.startswith("original.onnx against the original model")
    flipped = ref.copy(); flipped[0] = [1.0, 1.1]  # noqa: E702 -- one window flips, small error otherwise
    c = _original_check(flipped)
    assert c.failed and "argmax agreement 0.8750 < 1" in c.message
    assert c.message.startswith("original.onnx does not compute the original model")
    assert "F1" in c.message  # the flip also moves macro-F1
    # an agreement threshold the flip meets: the F1 rule alone fails it (and without labels there is no F1)
    loose = ParityCriteria(min_agreement=0.5, max_f1_delta=0.0, error_margin=4.0, error_floor=1.0)
    c = _original_check(flipped, crit=loose)
    assert c.failed and "|macro-F1 delta|" in c.message and "argmax" not in c.message
    assert _original_check(flipped, y=None, crit=loose).passed
    # every argmax right, but logits off by 1 % of their scale: the output error rule alone
    c = _original_check(ref * 1.01)
    assert c.failed and "max |error| 0.01 of max |logit|" in c.message and "argmax" not in c.message
