"""`bench --workers N`: runs in parallel processes give the figures a serial run gives, and a bench without a
terminal says what it is doing, one line per finished run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from toolchain.cli import main

TINY = {"train": {"steps": 10, "lr": 0.01, "batch_size": 12, "eval_every": 5},
        "bench": {"timing_steps": 2, "lr_grid": [0.003, 0.03], "eval_subsample": 20}}
# Measured times differ between any two runs; everything else must not.
TIMING_KEYS = ("train_seconds", "wall_seconds", "seconds", "speedup_of_reference_seconds", "workers", "step_time_vs_full")


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if not k.startswith(TIMING_KEYS)}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def _bench(recipe, out, *args):
    res = CliRunner().invoke(main, ["bench", str(recipe.source), "--methods", "head,ttlora", "--seeds", "2",
                                    "--out", str(out), "--quiet", *args])
    assert res.exit_code == 0, res.output
    return res.output, json.loads((out / "bench.json").read_text())


@pytest.mark.slow
def test_two_workers_give_the_serial_figures(make_recipe, tmp_path):
    recipe = make_recipe("workers", **TINY)
    serial_out, serial = _bench(recipe, tmp_path / "serial")
    parallel_out, parallel = _bench(recipe, tmp_path / "parallel", "--workers", "2")
    assert parallel["meta"]["workers"] == 2 and serial["meta"]["workers"] == 1
    assert _without_timing(parallel) == _without_timing(serial)
    # the comparison is not vacuous: the runs trained, and timing fields were there to leave out
    assert serial["rows"][0]["convergence"]["90%"]["seconds_per_seed"]
    assert any(r["f1_mean"] != serial["meta"]["zero_shot_f1_mean"] for r in serial["rows"])

    # --quiet: one line per finished run (2 methods x 2 rates x 2 seeds to choose, 2 x 2 to report), each
    # naming method, seed, rate, validation F1 (+ test F1 when reported) and seconds
    for output in (serial_out, parallel_out):
        lines = [ln for ln in output.splitlines() if ln.startswith("[")]
        assert len(lines) == 12
        assert sum(" select " in ln for ln in lines) == 8 and sum(" report " in ln for ln in lines) == 4
        for ln in lines:
            assert re.fullmatch(r"\[\d+/12\] (select|report) (head|ttlora) seed [01] lr (0\.003|0\.03): val F1 \d\.\d{3}"
                                r"(, test F1 \d\.\d{3})? \(\d+\.\d s\)", ln), ln


@pytest.mark.parametrize("value", ["0", "-2"])
def test_workers_must_be_positive(make_recipe, tmp_path, value):
    recipe = make_recipe("badworkers")
    res = CliRunner().invoke(main, ["bench", str(recipe.source), "--workers", value, "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 2 and "--workers must be a positive number" in res.output
    assert res.output.strip().count("\n") == 0 and not (tmp_path / "o").exists()


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process parents from /proc (Linux)")
def test_workers_of_a_killed_bench_exit(tmp_path):
    """A bench killed from outside (a CI timeout) must not leave its worker processes waiting forever."""
    script = (
        "import os, sys, tempfile\n"
        "from toolchain.bench.jobs import RunPool\n"
        "with RunPool(2, tempfile.mkdtemp()) as pool:\n"
        "    [f.result() for f in [pool.pool.submit(os.getpid) for _ in range(4)]]\n"
        "    print('ready', flush=True)\n"
        "    sys.stdin.read()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        workers = [p for p in _children(proc.pid) if "spawn_main" in (Path("/proc") / str(p) / "cmdline").read_text()]
        assert len(workers) == 2
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 20
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in workers if _alive(p)]
    for p in left:  # do not leave them behind even when the test fails
        os.kill(p, signal.SIGKILL)
    assert not left


def test_inputs_that_cannot_reach_the_workers_are_a_clear_error(tmp_path):
    from toolchain.bench.jobs import Job, RunPool, selection_run
    from toolchain.errors import EdgetoolError

    with RunPool(2, tmp_path) as pool, pytest.raises(EdgetoolError, match=r"--workers 2: .*run with --workers 1"):
        pool.run(selection_run, [Job("head", 0, 0.01)], {"model": lambda x: x})
