"""The latency verdict (toolchain.proof.parity.latency_verdict) on synthetic, seeded per-round timings.

Identical-by-construction graphs (original, fused and control drawn from one distribution) under
multiplicative noise, heavy tails, drift, stalls, a loaded machine, position effects and instance effects
must never FAIL, over many seeds and round counts; a fused engine 20 % slower on a quiet machine must FAIL,
and a slow fused engine must never PASS, however noisy the machine. Then the end-to-end wiring: verify's
exit code and reports for each verdict, with stand-in timings in place of the runners' clocks."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from click.testing import CliRunner

from toolchain.cli import main
from toolchain.proof.parity import FAIL, INCONCLUSIVE, PASS, Check, junit_xml, latency_verdict, median_ci, min_rounds

BAND, BAND_MAX, CONF = 0.05, 0.5, 0.99
ROUNDS = (8, 20, 50, 200)
SEEDS = range(60)
T0 = 1e-3  # seconds per inference


def _noise(model: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative factors for n rounds x 3 runs (original, fused, control), column = runner."""
    shape = (n, 3)
    if model == "quiet":
        return np.exp(0.01 * rng.standard_normal(shape))
    if model == "multiplicative":
        return np.exp(0.2 * rng.standard_normal(shape))
    if model == "heavy_tails":  # Student t with 1.5 degrees of freedom: infinite variance
        return np.exp(0.1 * rng.standard_t(1.5, shape))
    if model == "stalls":  # 5 % of runs preempted for 5-50 x their time
        return np.exp(0.05 * rng.standard_normal(shape)) * np.where(rng.random(shape) < 0.05, rng.uniform(5, 50, shape), 1)
    if model == "loaded":  # half the runs preempted for 2-10 x: bimodal
        return np.exp(0.1 * rng.standard_normal(shape)) * np.where(rng.random(shape) < 0.5, rng.uniform(2, 10, shape), 1)
    if model == "drift":  # per run in time order (round-robin rotation): a 3x ramp and a +/-50 % wave
        slot = np.empty(shape)
        for i in range(n):
            k = i % 3
            order = [0, 1, 2][k:] + [0, 1, 2][:k]
            for pos, runner in enumerate(order):
                slot[i, runner] = 3 * i + pos
        u = slot / (3 * n)
        return (1 + 2 * u) * (1 + 0.5 * np.sin(2 * np.pi * 3.3 * u)) * np.exp(0.03 * rng.standard_normal(shape))
    if model == "position":  # whoever runs first in a round is 30 % slower (cold caches)
        first = np.array([[i % 3 == r for r in range(3)] for i in range(n)])  # rotation: runner i%3 starts round i
        return np.where(first, 1.3, 1.0) * np.exp(0.02 * rng.standard_normal(shape))
    raise ValueError(model)


NOISE_MODELS = ("quiet", "multiplicative", "heavy_tails", "stalls", "loaded", "drift", "position")


def _timings(model: str, n: int, seed: int, slowdown: float = 1.0, instance=(1.0, 1.0, 1.0)):
    z = _noise(model, n, np.random.default_rng([seed, n, NOISE_MODELS.index(model)]))
    t = T0 * z * np.array(instance)
    return t[:, 0], t[:, 1] * slowdown, t[:, 2]


def _verdicts(model, slowdown=1.0, rounds=ROUNDS, seeds=SEEDS, instance=(1.0, 1.0, 1.0)):
    return [latency_verdict(*_timings(model, n, s, slowdown, instance), BAND, BAND_MAX, CONF)
            for n in rounds for s in seeds]


# ------------------------------------------------------------------------------------ the promises


@pytest.mark.parametrize("model", NOISE_MODELS)
def test_identical_graphs_never_fail_under_noise(model):
    verdicts = _verdicts(model)
    assert not [v for v in verdicts if v.verdict == FAIL], [v.reason for v in verdicts if v.verdict == FAIL][:3]
    assert {v.verdict for v in verdicts} <= {PASS, INCONCLUSIVE}


def test_identical_graphs_on_a_quiet_machine_pass():
    """Never failing is not the same as never saying anything: a quiet machine resolves the band."""
    verdicts = _verdicts("quiet", rounds=(20, 200))
    assert all(v.verdict == PASS for v in verdicts), [v.reason for v in verdicts if v.verdict != PASS][:3]


def test_a_fused_instance_timed_faster_is_noise_not_a_failure():
    """The reported flap: identical graphs, fused timed 0.6x the original while the control stayed at 1.0."""
    verdicts = _verdicts("quiet", rounds=(20, 200), instance=(1.0, 0.6, 1.0))
    assert all(v.verdict == PASS for v in verdicts)
    assert all("timed faster" in v.reason for v in verdicts)
    assert not [v for v in _verdicts("loaded", rounds=(20,), instance=(1.0, 0.6, 1.0)) if v.verdict == FAIL]


@pytest.mark.parametrize("rounds", [50, 200])
def test_fused_20_percent_slower_on_a_quiet_machine_fails(rounds):
    verdicts = _verdicts("quiet", slowdown=1.2, rounds=(rounds,))
    assert all(v.verdict == FAIL for v in verdicts)
    v = verdicts[0]
    assert 1.18 < v.ratio < 1.22 and v.ci[0] > 1.05 and not v.widened and "slower" in v.reason


@pytest.mark.parametrize("model", NOISE_MODELS)
def test_a_slow_fused_engine_never_passes(model):
    verdicts = _verdicts(model, slowdown=1.2)
    assert not [v for v in verdicts if v.verdict == PASS]


def test_within_the_band_passes():
    assert all(v.verdict == PASS for v in _verdicts("quiet", slowdown=1.02, rounds=(200,)))


def test_a_noisy_machine_can_still_fail_a_grossly_slower_engine():
    """Too noisy for the 5 % band, but twice the control's deviation is far below a 2x slowdown."""
    verdicts = _verdicts("multiplicative", slowdown=2.0, rounds=(200,))
    assert all(v.verdict == FAIL and v.widened for v in verdicts)
    assert "band widened" in verdicts[0].reason and verdicts[0].fail_threshold > BAND


def test_noisy_machine_is_inconclusive_with_the_reason():
    v = latency_verdict(*_timings("loaded", 200, 0), BAND, BAND_MAX, CONF)
    assert v.verdict == INCONCLUSIVE and v.resolution > BAND
    assert "too noisy for the +/-5 % band" in v.reason and "apart" in v.short


def test_fail_threshold_beyond_band_max_is_inconclusive():
    """A machine so noisy that 2 x the control's deviation exceeds latency_band_max cannot fail anything."""
    a, b, c = _timings("loaded", 50, 3, slowdown=1.6)
    v = latency_verdict(a, b, c, BAND, 0.1, CONF)
    assert v.fail_threshold > 0.1 and v.verdict == INCONCLUSIVE
    assert latency_verdict(a, b, c, BAND, 0.99, CONF).fail_threshold == v.fail_threshold


def test_too_few_rounds_are_inconclusive():
    assert min_rounds(0.99) == 8 and min_rounds(0.95) == 6
    a, b, c = _timings("quiet", 7, 0, slowdown=3.0)
    v = latency_verdict(a, b, c, BAND, BAND_MAX, CONF)
    assert v.verdict == INCONCLUSIVE and v.ci == (0.0, float("inf")) and "at least 8" in v.reason
    assert latency_verdict(*_timings("quiet", 8, 0, slowdown=3.0), BAND, BAND_MAX, CONF).verdict == FAIL


def test_straddling_interval_is_inconclusive():
    """Fused 5 % slower on a moderately quiet machine: its interval reaches across 1 + band."""
    v = latency_verdict(*_timings("quiet", 20, 1, slowdown=1.05), BAND, BAND_MAX, CONF)
    assert v.verdict == INCONCLUSIVE and v.ci[0] < 1.05 < v.ci[1] and "neither" in v.short


def test_verdict_wants_one_entry_per_round():
    with pytest.raises(ValueError):
        latency_verdict(np.ones(10), np.ones(9), np.ones(10), BAND, BAND_MAX, CONF)


# ------------------------------------------------------------------------------------ sessions


def _session_timings(sessions: int, rounds_per: int, seed: int, slowdown: float = 1.0):
    """A busy neighbour: each runner's session lands badly with probability 1/3 and is then 1.15-1.35x
    slower for its whole life (the effect the issue measured), on top of 2 % round-to-round noise."""
    rng = np.random.default_rng([seed, sessions, rounds_per])
    s = np.repeat(np.arange(sessions), rounds_per)
    effect = np.where(rng.random((sessions, 3)) < 1 / 3, rng.uniform(1.15, 1.35, (sessions, 3)), 1.0)
    t = T0 * effect[s] * np.exp(0.02 * rng.standard_normal((len(s), 3)))
    return t[:, 0], t[:, 1] * slowdown, t[:, 2], s


@pytest.mark.parametrize("sessions", [8, 10, 16])
@pytest.mark.parametrize("rounds_per", [1, 3, 25])
def test_identical_graphs_never_fail_when_sessions_differ(sessions, rounds_per):
    for seed in range(100):
        a, b, c, s = _session_timings(sessions, rounds_per, seed)
        v = latency_verdict(a, b, c, BAND, BAND_MAX, CONF, s)
        assert v.verdict != FAIL, v.reason
        assert v.sessions == sessions and v.rounds == sessions * rounds_per


def test_a_graph_20_percent_slower_fails_across_fresh_sessions_on_a_quiet_machine():
    rng = np.random.default_rng(0)
    for rounds_per in (3, 25):
        s = np.repeat(np.arange(8), rounds_per)
        t = T0 * np.exp(0.01 * rng.standard_normal((len(s), 3)))
        v = latency_verdict(t[:, 0], 1.2 * t[:, 1], t[:, 2], BAND, BAND_MAX, CONF, s)
        assert v.verdict == FAIL and v.sessions == 8, v.reason


def test_one_slow_session_is_not_a_slow_graph():
    """The issue's FAIL: one session per graph, the fused one 1.325x slower all run long, the control not.
    Rounds of one session are not independent evidence about the graph: one session cannot fail (or pass)."""
    rng = np.random.default_rng(1)
    t = T0 * np.exp(0.01 * rng.standard_normal((200, 3)))
    a, b, c = t[:, 0], 1.325 * t[:, 1], t[:, 2]
    assert latency_verdict(a, b, c, BAND, BAND_MAX, CONF).verdict == FAIL  # each round its own unit: fooled
    v = latency_verdict(a, b, c, BAND, BAND_MAX, CONF, np.zeros(200, int))
    assert v.verdict == INCONCLUSIVE and v.sessions == 1 and "1 sessions are too few" in v.short


def test_the_interval_is_taken_over_sessions_not_rounds():
    """Identical graphs, 8 sessions of 25 rounds: the fused session landed badly (1.3x) in 5 of them.
    Pooled, the 200 rounds' interval sits above 1.3; over sessions its lower end is the good sessions' 1.0."""
    rng = np.random.default_rng(2)
    s = np.repeat(np.arange(8), 25)
    t = T0 * np.exp(0.01 * rng.standard_normal((200, 3)))
    b = t[:, 1] * np.where(s < 5, 1.3, 1.0)
    assert latency_verdict(t[:, 0], b, t[:, 2], BAND, BAND_MAX, CONF).verdict == FAIL  # pooled: fooled
    v = latency_verdict(t[:, 0], b, t[:, 2], BAND, BAND_MAX, CONF, s)
    assert v.verdict == INCONCLUSIVE and v.ci[0] < 1.05 < 1.25 < v.ci[1], v.reason


# ------------------------------------------------------------------------------------ each rule, pinned


def _per_session(fused: list[float], control: list[float], rounds_per: int = 3, band_max: float = BAND_MAX):
    """The verdict for sessions whose median fused/original and control/original ratios are exactly these."""
    s = np.repeat(np.arange(len(fused)), rounds_per)
    a = np.full(len(s), T0)
    return latency_verdict(a, a * np.repeat(fused, rounds_per), a * np.repeat(control, rounds_per), BAND, band_max,
                           CONF, s)


QUIET = [1.0] * 8


def test_rule_fail_needs_the_intervals_lower_end_above_the_threshold_not_the_median():
    v = _per_session([1.02] + [1.3] * 7, QUIET)  # median 1.3, lower end 1.02
    assert v.ratio == pytest.approx(1.3) and v.verdict == INCONCLUSIVE and "neither" in v.short
    assert _per_session([1.06] + [1.3] * 7, QUIET).verdict == FAIL  # lower end 1.06 > 1.05


def test_rule_pass_needs_the_intervals_upper_end_within_the_band():
    v = _per_session([1.0] * 7 + [1.08], QUIET)  # median 1.0, upper end 1.08
    assert v.verdict == INCONCLUSIVE and "neither" in v.short
    assert _per_session([1.0] * 7 + [1.04], QUIET).verdict == PASS


def test_rule_pass_needs_a_control_that_resolves_the_band():
    v = _per_session([1.0] * 8, [1.0] * 7 + [1.07])  # the fused interval is perfect; the control is not
    assert v.verdict == INCONCLUSIVE and "too noisy" in v.reason and v.resolution == pytest.approx(0.07)
    v = _per_session([1.0] * 8, [1.0] * 7 + [1 / 1.07])  # noisy on the fast side counts the same
    assert v.verdict == INCONCLUSIVE
    assert _per_session([1.0] * 8, [1.0] * 7 + [1.04]).verdict == PASS


def test_rule_fail_threshold_is_twice_the_controls_deviation():
    """Control deviation 10 %: the fail threshold is 1.1^2 - 1 = 21 %, not 10 % (factor 1) nor 33 % (factor 3)."""
    control = [1.0] * 7 + [1.1]
    v = _per_session([1.17] * 8, control)  # beyond 1 x the deviation, within 2 x
    assert v.verdict == INCONCLUSIVE and v.widened and v.fail_threshold == pytest.approx(1.1 ** 2 - 1)
    v = _per_session([1.25] * 8, control)  # beyond 2 x the deviation, within 3 x
    assert v.verdict == FAIL and "band widened" in v.reason


def test_rule_no_fail_when_the_widened_threshold_exceeds_band_max():
    control = [1.0] * 7 + [1.3]  # threshold 1.3^2 - 1 = 69 % > band_max 50 %
    v = _per_session([2.0] * 8, control)
    assert v.fail_threshold > BAND_MAX and v.verdict == INCONCLUSIVE and "latency_band_max" in v.reason
    assert _per_session([2.0] * 8, control, band_max=0.9).verdict == FAIL


def test_rule_faster_is_never_a_failure():
    v = _per_session([0.6] * 8, QUIET)
    assert v.verdict == PASS and "timed faster" in v.reason


def test_rule_at_least_eight_sessions():
    assert _per_session([3.0] * 7, [1.0] * 7).verdict == INCONCLUSIVE
    assert _per_session([3.0] * 8, [1.0] * 8).verdict == FAIL


# ------------------------------------------------------------------------------------ the interval


def test_median_ci_order_statistics():
    x = np.arange(1.0, 21.0)  # n = 20: P(Bin(20, .5) <= 3) = 0.0013 <= 0.005 < P(<= 4) = 0.0059
    med, lo, hi = median_ci(x[::-1], 0.99)
    assert (med, lo, hi) == (10.5, 4.0, 17.0)
    assert median_ci(np.arange(7.0), 0.99)[1:] == (-np.inf, np.inf)
    assert median_ci(np.arange(8.0), 0.99)[1:] == (0.0, 7.0)


def test_median_ci_covers_the_median_at_least_as_often_as_promised():
    rng = np.random.default_rng(7)
    for n in (8, 30, 101):
        hits = 0
        for _ in range(2000):
            x = rng.standard_t(2, n)  # population median 0
            _, lo, hi = median_ci(x, 0.95)
            hits += lo <= 0 <= hi
        assert hits / 2000 >= 0.94  # >= 95 % up to sampling error (the interval is conservative)


# ------------------------------------------------------------------------------------ reporting


def test_junit_reports_inconclusive_as_skipped_with_the_reason():
    xml = junit_xml([Check("latency.batch_1", INCONCLUSIVE, "too noisy"), Check("latency.batch_32", FAIL, "slower"),
                     Check("integrity.fused.onnx", "warning", "changed; allowed"), Check("accuracy.fp32.f1_delta", PASS, "ok")],
                    "edgetool.verify", {}, warnings=["adaptation lowered the target macro-F1"])
    root = ET.fromstring(xml)
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("4", "1", "2")
    suite = root.find("testsuite")
    assert suite.find("testcase[@name='batch_1']/skipped").get("message") == "inconclusive: too noisy"
    assert suite.find("testcase[@name='batch_1']/failure") is None
    assert suite.find("testcase[@name='batch_32']/failure").get("message") == "slower"
    assert suite.find("testcase[@name='fused.onnx']/skipped").get("message") == "warning: changed; allowed"
    assert "adaptation lowered" in suite.find("system-err").text


# ------------------------------------------------------------------------------------ end to end


def _stand_in_timings(slowdown: float, rounds: int = 60):
    """Replaces verify's timed rounds: quiet synthetic seconds, fused `slowdown` x the original.
    A stand-in for the runners' clocks (they still load and warm up nothing), to test the wiring."""

    def fake(open_runners, x, cfg):
        rng = np.random.default_rng(len(x))
        t = T0 * len(x) * np.exp(0.01 * rng.standard_normal((rounds, 3)))
        return {"original": t[:, 0], "fused": t[:, 1] * slowdown, "control": t[:, 2]}, np.arange(rounds) % 10

    return fake


@pytest.mark.parametrize("slowdown, exit_code, verdict", [(1.0, 0, "pass"), (1.3, 1, "fail")])
def test_verify_exit_code_and_reports_follow_the_latency_verdict(slowdown, exit_code, verdict, tiny_engine, tmp_path,
                                                                  monkeypatch):
    import toolchain.stages.verify as verify_mod

    eng = tmp_path / "eng"
    shutil.copytree(tiny_engine, eng)
    monkeypatch.setattr(verify_mod, "_timed_rounds", _stand_in_timings(slowdown))
    monkeypatch.setattr(verify_mod, "unfused_comparison", lambda *a, **k: {
        "unfused_latency_ratio": {}, "unfused_latency_ms": {}, "unfused_onnx": {}, "unfused_iterations": 0,
        "torch_threads": 1})
    res = CliRunner().invoke(main, ["verify", str(eng), "--engine", "onnxruntime"])
    assert res.exit_code == exit_code, res.output
    r = json.loads((eng / "verify_report.json").read_text())
    assert {b: v["verdict"] for b, v in r["latency_verdict"].items()} == {"1": verdict, "8": verdict}
    assert [c["verdict"] for c in r["checks"] if c["name"].startswith("latency.")] == [verdict, verdict]
    cases = ET.parse(eng / "verify_junit.xml").getroot().findall(".//testcase[@classname='edgetool.verify.latency']")
    assert [c.find("failure") is not None for c in cases] == [verdict == "fail"] * 2
    if verdict == "fail":
        assert r["failed_checks"] == ["latency.batch_1", "latency.batch_8"] and r["verdict"] == "failed"
        assert "latency.batch_1" in res.stderr and "slower than 1 + 0.050" in res.stderr
        assert "FAILED (2 of" in res.stdout
    else:
        assert r["verdict"] == "passed" and r["inconclusive_checks"] == []
        assert "\nPASSED: " in res.stdout and "PASS" in [ln.split()[-1] for ln in res.stdout.splitlines()
                                                         if ln.startswith("latency fp32 batch 8")]
