"""`bench --executor ray`: Ray tasks give the figures of a serial local run, several recipes run in one call,
and failures, interrupts and a missing or unreachable Ray are one line each.

The Ray tests use a local Ray of 2 CPUs started in this process (the pool uses a Ray that is already
running, and leaves it running); its temporary files and Ray's token (Ray writes one under $HOME) go to a
temporary directory, and the Ray is shut down at the end of the module."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import assert_one_line_error
from test_bench_workers import TINY, _without_timing
from toolchain.bench.jobs import Job, SelectionInputs, selection_run
from toolchain.cli import main
from toolchain.errors import EdgetoolError, InternalError

REPO = Path(__file__).resolve().parents[1]
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason='Ray is not installed (pip install "edgetool[ray]", or the test extra)')


@pytest.fixture(scope="module")
def ray_home():
    """A short directory for Ray's sockets and files (a Unix socket path must stay under 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="et-ray-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def _ray_module(ray_home):
    yield
    import ray

    ray.shutdown()


@pytest.fixture()
def local_ray(ray_home, _ray_module, monkeypatch):
    """A local Ray of 2 CPUs in this process, started on first use and shut down after the module."""
    import ray

    if not ray.is_initialized():
        monkeypatch.setenv("HOME", str(ray_home))  # Ray 2.5x writes ~/.ray/auth_token for a new local cluster
        import logging
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 _temp_dir=str(ray_home / "t"))
    return ray


def _figures(bench: dict) -> dict:
    """bench.json without timings and without the record of where the runs went."""
    return _without_timing({**bench, "meta": {k: v for k, v in bench["meta"].items() if k != "executor"}})


def _bench(recipes, out, *args):
    res = CliRunner().invoke(main, ["bench", *[str(r.source) for r in recipes], "--methods", "head,ttlora", "--seeds", "2",
                                    "--out", str(out), "--quiet", *args])
    assert res.exit_code == 0, res.output
    return res.output


@needs_ray
@pytest.mark.slow
def test_ray_gives_the_local_figures_for_several_recipes_in_one_call(make_recipe, tmp_path, local_ray):
    first = make_recipe("ray-a", **TINY)
    second = make_recipe("ray-b", **{**TINY, "bench": {**TINY["bench"], "lr_grid": [0.01, 0.1]}})
    output = _bench([first, second], tmp_path / "ray", "--executor", "ray")
    for recipe in (first, second):
        _bench([recipe], tmp_path / "serial" / recipe.name)
        serial = json.loads((tmp_path / "serial" / recipe.name / "bench.json").read_text())
        on_ray = json.loads((tmp_path / "ray" / recipe.name / "bench.json").read_text())
        assert on_ray["meta"]["executor"]["name"] == "ray" and on_ray["meta"]["executor"]["cpus"] == 2
        assert serial["meta"]["executor"] == {"name": "local", "workers": 1}
        assert _figures(on_ray) == _figures(serial)
    # each recipe has its own figures (the comparison above would hide two recipes written into one place)
    assert serial["meta"]["selection"]["grids"] != json.loads((tmp_path / "ray" / "ray-a" / "bench.json").read_text())["meta"]["selection"]["grids"]
    # --quiet lines as with the local pool: 12 runs per recipe, then the recipe's table
    lines = [ln for ln in output.splitlines() if ln.startswith("[")]
    assert len(lines) == 24 and sum(ln.startswith("[12/12] ") for ln in lines) == 2
    assert not [p for p in tmp_path.rglob(".*")], "temporary output left behind"


def _selection_inputs(make_recipe) -> SelectionInputs:
    from toolchain.data.protocol import load_data
    from toolchain.models.assembly import load_base_model
    from toolchain.stages.bench import method_configs

    recipe = make_recipe("ray-fail", **TINY)
    data = load_data(recipe.data, recipe.seed)
    base, head_name, _ = load_base_model(recipe, data, echo=None)
    return SelectionInputs(base, head_name, method_configs(recipe, ["head"]), [recipe.seed], [data])


@needs_ray
def test_a_run_that_raises_is_named_in_one_line(make_recipe, local_ray):
    from toolchain.bench.raypool import RayPool

    inputs = _selection_inputs(make_recipe)
    with RayPool() as pool:
        # a method the inputs have no settings for: the run raises KeyError in its worker
        with pytest.raises(InternalError, match=r"^run 'select nosuch seed 0 lr 0.01' failed on node \S+: 'nosuch' \(KeyError\)$"):
            pool.for_recipe("cpu").run(selection_run, [Job("head", 0, 0.01), Job("nosuch", 0, 0.01)], inputs)
        assert pool.pending == []  # nothing left running
        # the pool still works after a failed batch
        assert pool.run(selection_run, [Job("head", 0, 0.01)], inputs)[Job("head", 0, 0.01)]["val_f1"] is not None
    assert local_ray.is_initialized()  # a Ray the pool did not start is left running


@needs_ray
def test_a_failed_run_cancels_the_runs_still_outstanding(local_ray):
    from toolchain.bench.raypool import RayPool

    def _slow_or_failing(inputs, job):  # nested: Ray's workers get it by value (they cannot import this module)
        if job.method == "slow":
            time.sleep(600)  # far longer than the failing run needs on any machine: it must be cancelled
        raise KeyError(job.method)

    with RayPool() as pool:
        with pytest.raises(InternalError, match="run 'run fails seed 0 lr 0.1' failed"):
            pool.run(_slow_or_failing, [Job("slow", 0, 0.1), Job("fails", 0, 0.1), Job("slow", 1, 0.1)], None)
        # the slow runs are stopped once the failure is known, not left to hold the cluster's CPUs for ten minutes
        began = time.monotonic()
        while local_ray.available_resources().get("CPU", 0) < 2 and time.monotonic() - began < 60:
            time.sleep(0.5)
        assert local_ray.available_resources().get("CPU", 0) == 2 and time.monotonic() - began < 60


@needs_ray
def test_each_run_asks_for_one_gpu_when_training_on_cuda(local_ray):
    from toolchain.bench.raypool import RayPool

    with RayPool() as pool:
        assert pool.for_recipe("cpu").gpus_per_run == 0
        with pytest.raises(EdgetoolError, match=r"use --device cuda|train on device cuda, not cuda:1"):
            pool.for_recipe("cuda:1")
        # this Ray has CPUs only: a run asking for a GPU would wait forever, so it is refused
        with pytest.raises(EdgetoolError, match=r"training on cuda: the Ray cluster \(local\) has no GPU"):
            pool.for_recipe("cuda")
        assert pool.gpus_per_run == 1


def _crash_once(marker):
    def run(inputs, job):
        if not os.path.exists(marker):
            Path(marker).touch()
            os._exit(1)  # the worker process dies, as on a lost node
        return {"job": job.method}
    return run


@needs_ray
def test_a_lost_worker_is_rerun_and_one_lost_for_good_is_named(local_ray, tmp_path, monkeypatch):
    from toolchain.bench import raypool

    with raypool.RayPool() as pool:
        # runs are deterministic, so Ray reruns a run whose worker died
        assert pool.run(_crash_once(str(tmp_path / "crashed")), [Job("head", 0, 0.1)], None) == {Job("head", 0, 0.1): {"job": "head"}}
        monkeypatch.setattr(raypool, "RETRIES_ON_LOST_WORKER", 0)
        with pytest.raises(EdgetoolError, match=r"^run 'run head seed 0 lr 0.1' failed: its Ray worker or node was lost "
                                                r"\(WorkerCrashedError"):
            pool.run(_crash_once(str(tmp_path / "again")), [Job("head", 0, 0.1)], None)


def test_without_ray_installed_the_executor_names_the_extra(make_recipe, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    recipe = make_recipe("noray")
    res = CliRunner().invoke(main, ["bench", str(recipe.source), "--executor", "ray", "--out", str(tmp_path / "o"), "--quiet"])
    assert_one_line_error(res, "--executor ray needs Ray", 'pip install "edgetool[ray]"')
    assert not (tmp_path / "o").exists()


@needs_ray
def test_an_unreachable_cluster_is_exit_2_naming_the_address(make_recipe, tmp_path):
    import ray

    ray.shutdown()  # this process must not be attached to a Ray already (another test's)
    recipe = make_recipe("unreachable")
    began = time.monotonic()
    res = CliRunner().invoke(main, ["bench", str(recipe.source), "--executor", "ray", "--ray-address", "127.0.0.1:1",
                                    "--out", str(tmp_path / "o"), "--quiet"])
    assert_one_line_error(res, "--ray-address 127.0.0.1:1", "no Ray cluster can be reached")
    assert time.monotonic() - began < 30 and not (tmp_path / "o").exists() and not ray.is_initialized()


@needs_ray
def test_a_local_ray_that_fails_to_start_is_exit_2(make_recipe, tmp_path, monkeypatch):
    import ray

    def timed_out(**options):  # what Ray raises when its node does not come up in time (a very busy machine)
        raise Exception("The current node timed out during startup.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", timed_out)
    recipe = make_recipe("nostart")
    res = CliRunner().invoke(main, ["bench", str(recipe.source), "--executor", "ray", "--out", str(tmp_path / "o"), "--quiet"])
    assert_one_line_error(res, "--executor ray: cannot start a local Ray (The current node timed out during startup.)")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, needle", [
    (["--executor", "ray", "--workers", "2"], "drop --workers"),
    (["--ray-address", "auto"], "--ray-address joins a Ray cluster: it needs --executor ray"),
    (["--executor", "ray", "--ray-address", "nohost"], "expected auto or HOST:PORT"),
])
def test_executor_options_that_do_not_go_together(make_recipe, tmp_path, args, needle):
    recipe = make_recipe("badexec")
    res = CliRunner().invoke(main, ["bench", str(recipe.source), *args, "--out", str(tmp_path / "o"), "--quiet"])
    assert_one_line_error(res, needle)
    assert not (tmp_path / "o").exists()


def test_several_recipes_need_distinct_names(make_recipe, tmp_path):
    first = make_recipe("same")
    other = tmp_path / "other"
    other.mkdir()
    second = other / "same.yaml"
    second.write_text(first.source.read_text())
    res = CliRunner().invoke(main, ["bench", str(first.source), str(second), "--out", str(tmp_path / "o"), "--quiet"])
    assert_one_line_error(res, "have the same name 'same'")
    assert not (tmp_path / "o").exists()


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


@needs_ray
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds Ray's processes in /proc (Linux)")
def test_ctrl_c_cancels_the_runs_and_keeps_no_output(make_recipe, tmp_path, ray_home):
    """Ctrl-C (SIGINT to the terminal's process group) while Ray runs the bench: exit 130, no bench directory,
    and the local Ray the bench started is gone with its workers."""
    recipe = make_recipe("interrupted", **{**TINY, "train": {**TINY["train"], "steps": 300, "eval_every": 100}})
    temp = Path(tempfile.mkdtemp(prefix="et-int-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "RAY_TMPDIR": str(temp), "HOME": str(ray_home)}
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "toolchain.cli", "bench", str(recipe.source), "--methods", "head,ttlora",
                             "--seeds", "2", "--executor", "ray", "--quiet", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, start_new_session=True)
    try:
        first = proc.stdout.readline()
        while first and not first.startswith("[1/12] "):  # Ray's own notices (e.g. a task restarted on a full machine)
            first = proc.stdout.readline()
        assert first.startswith("[1/12] "), proc.stderr.read() if proc.poll() is not None else ""
        assert _processes_mentioning(str(temp)), "the bench runs no Ray of its own"
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 20
    while _processes_mentioning(str(temp)) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _processes_mentioning(str(temp))
    for pid in left:  # do not leave them behind even when the test fails
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "edgetool: interrupted; no partial output was kept", stderr
    assert not left, "Ray processes left behind"
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]
