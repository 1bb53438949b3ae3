"""The fault and attack audit (issue 18), one test per guarantee, each failing when its guarantee is
removed: a run or engine directory from elsewhere runs no code; locks and temp files never follow links;
replacing an output never removes an input; one writer per base checkpoint; verify holds the engine
directory's lock; bad input or a full disk is exit 2 (a failed check exit 1) in one line, never exit 3;
a killed process leaves nothing behind that the next run does not clean."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import assert_one_line_error, cli, tiny_recipe_dict, write_recipe

from toolchain import artifacts
from toolchain.errors import EdgetoolError

REPO = Path(__file__).resolve().parents[1]


def _edit_run(src: Path, dst: Path, edit, reseal: bool = True) -> Path:
    """A copy of run `src` at `dst` whose recipe.yaml `edit` changed; `reseal`: its adapter.pt records the
    edited recipe's sha256 too, as someone forging a run directory would make it."""
    shutil.copytree(src, dst)
    recipe = yaml.safe_load((dst / "recipe.yaml").read_text())
    edit(recipe)
    text = yaml.safe_dump(recipe, sort_keys=False).encode()
    (dst / "recipe.yaml").write_bytes(text)
    if reseal:
        payload = torch.load(dst / "adapter.pt", weights_only=True)
        payload["recipe_sha256"] = hashlib.sha256(text).hexdigest()
        torch.save(payload, dst / "adapter.pt")
    return dst


def _point_engine_at(engine: Path, dst: Path, run: Path) -> Path:
    """A copy of `engine` whose fuse report names `run` (with its adapter's and recipe's sha256: forged)."""
    shutil.copytree(engine, dst)
    rep = json.loads((dst / "fuse_report.json").read_text())
    rep.update(run_dir=str(run), adapter_sha256=artifacts.sha256_file(run / "adapter.pt"),
               recipe_sha256=artifacts.sha256_file(run / "recipe.yaml"))
    (dst / "fuse_report.json").write_text(json.dumps(rep))
    return dst


def _os_system_factory(marker: Path):
    def edit(recipe):
        recipe["model"] = {**recipe["model"], "arch": "factory", "factory": "os:system",
                           "kwargs": {"command": f"touch {marker}"}}
    return edit


# ---------------------------------------------------------------------------------------------- 1. no code without trust


@pytest.mark.parametrize("command", ["fuse-export", "verify"])
def test_a_factory_named_by_a_received_run_runs_no_code_without_trust(command, tmp_path, tiny_run, tiny_engine,
                                                                       monkeypatch):
    monkeypatch.delenv("EDGETOOL_TRUST_FACTORY", raising=False)
    marker = tmp_path / "pwned"
    run = _edit_run(tiny_run, tmp_path / "run", _os_system_factory(marker))
    target = run if command == "fuse-export" else _point_engine_at(tiny_engine, tmp_path / "eng", run)
    args = ["--out", tmp_path / "out"] if command == "fuse-export" else ["--engine", "onnxruntime"]
    result = cli(command, target, *args)
    assert_one_line_error(result, "names model factory 'os:system'", "--trust-factory os", "EDGETOOL_TRUST_FACTORY")
    assert not marker.exists()


def test_a_trusted_factory_is_imported(tmp_path, tiny_run, monkeypatch):
    """The flag and the variable are what let it run (and only for the module they name)."""
    marker = tmp_path / "ran"
    run = _edit_run(tiny_run, tmp_path / "run", _os_system_factory(marker))
    monkeypatch.setenv("EDGETOOL_TRUST_FACTORY", "numpy")  # another module: not trusted
    assert_one_line_error(cli("fuse-export", run, "--out", tmp_path / "a"), "--trust-factory os")
    assert not marker.exists()
    result = cli("fuse-export", run, "--out", tmp_path / "b", "--trust-factory", "os")
    assert marker.exists()  # os.system ran; it returns an int, not a model: exit 2
    assert_one_line_error(result, "returned int, not an nn.Module")
    marker.unlink()
    monkeypatch.setenv("EDGETOOL_TRUST_FACTORY", "numpy, os")
    assert_one_line_error(cli("fuse-export", run, "--out", tmp_path / "c"), "returned int")
    assert marker.exists()


def test_an_edited_recipe_yaml_is_refused_like_an_edited_adapter(tmp_path, tiny_run):
    def loosen(recipe):
        recipe["fuse"]["atol"] = 1.0
    run = _edit_run(tiny_run, tmp_path / "run", loosen, reseal=False)
    assert_one_line_error(cli("fuse-export", run, "--out", tmp_path / "out"), "recipe.yaml changed since this run was written")
    assert not (tmp_path / "out").exists()


def test_the_fuse_report_cannot_send_verify_to_another_run(tmp_path, tiny_run, tiny_engine):
    other = _edit_run(tiny_run, tmp_path / "other", lambda r: r["verify"].update(iterations=3))
    eng = tmp_path / "eng"
    shutil.copytree(tiny_engine, eng)
    rep = json.loads((eng / "fuse_report.json").read_text())
    (eng / "fuse_report.json").write_text(json.dumps({**rep, "run_dir": str(other)}))
    assert_one_line_error(cli("verify", eng, "--engine", "onnxruntime"), "is not the adapter.pt", "names another run")
    rep.pop("adapter_sha256")  # and a report without the hash fails closed
    (eng / "fuse_report.json").write_text(json.dumps({**rep, "run_dir": str(other)}))
    assert_one_line_error(cli("verify", eng, "--engine", "onnxruntime"), "records no sha256 of the run's adapter.pt")


# ---------------------------------------------------------------------------------------------- 2. links are not followed


def test_a_lock_file_planted_as_a_symlink_is_refused_and_its_target_untouched(tmp_path, tiny_run):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    engines = tmp_path / "ENGINES"
    engines.mkdir()
    (engines / ".lk.lock").symlink_to(victim)
    result = cli("fuse-export", tiny_run, "--out", engines / "lk")
    assert_one_line_error(result, ".lk.lock is a symbolic link", "refusing to follow it")
    assert victim.read_text() == "precious\n" and not (engines / "lk").exists()


def test_a_lock_file_planted_as_a_hard_link_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.link(victim, tmp_path / ".out.lock")
    with pytest.raises(EdgetoolError, match="is a hard link to another file"):
        with artifacts.output_lock(tmp_path / "out"):
            pass
    assert victim.read_text() == "precious\n"


def test_a_stale_temp_planted_as_a_link_is_removed_never_followed(tmp_path):
    """A dead writer's `.old-<pid>` that is a link to some directory is not moved into place as the output."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("x")
    dead = _dead_pid()
    (tmp_path / f".out.old-{dead}").symlink_to(elsewhere)
    (tmp_path / f".out.tmp-{dead}-abc").symlink_to(elsewhere)
    artifacts.remove_stale_temps(tmp_path / "out")
    assert not os.path.lexists(tmp_path / "out") and sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]
    assert (elsewhere / "keep").read_text() == "x"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------------------------- 3. inputs are never replaced


def test_adapt_into_a_run_dir_holding_its_data_refuses_and_keeps_the_data(tmp_path, tiny_run, tiny_checkpoint):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    data = run / "data.npz"
    from toolchain.data.protocol import load_data
    from toolchain.recipe import load_recipe
    bundle = load_data(load_recipe(tiny_run / "recipe.yaml").data, 0)
    X = np.concatenate([bundle.source_train.X, bundle.target_test.X])
    np.savez(data, X=X, y=np.zeros(len(X), np.int64), domain=np.r_[np.zeros(len(bundle.source_train.X)),
                                                                       np.ones(len(bundle.target_test.X))])
    raw = tiny_recipe_dict(tiny_checkpoint)
    raw["data"] = {"format": "npz", "train_path": str(data), "source_domains": [0], "target_domains": [1]}
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    before = data.read_bytes()
    result = cli("adapt", recipe, "--out", run, "--quiet")
    assert_one_line_error(result, f"would replace the training data (data.train_path) {data} inside it")
    assert data.read_bytes() == before


def test_fuse_export_into_a_dir_holding_the_base_checkpoint_refuses_and_keeps_it(tmp_path, tiny_run, tiny_engine,
                                                                                tiny_checkpoint):
    eng = tmp_path / "eng"
    shutil.copytree(tiny_engine, eng)
    ckpt = eng / "base.pt"
    shutil.copy(tiny_checkpoint, ckpt)
    run = _edit_run(tiny_run, tmp_path / "run", lambda r: r["model"].update(checkpoint=str(ckpt)))
    result = cli("fuse-export", run, "--out", eng)
    assert_one_line_error(result, f"would replace the base checkpoint (model.checkpoint) {ckpt} inside it")
    assert ckpt.read_bytes() == tiny_checkpoint.read_bytes()


def test_the_recipe_and_inputs_file_are_inputs_too(tmp_path, tiny_run, tiny_checkpoint):
    out = tmp_path / "out"
    shutil.copytree(tiny_run, out)
    recipe = write_recipe(out / "mine.yaml", tiny_recipe_dict(tiny_checkpoint))
    assert_one_line_error(cli("adapt", recipe, "--out", out, "--quiet"), f"would replace the recipe {recipe}")
    assert recipe.is_file()
    eng = tmp_path / "eng"
    assert cli("fuse-export", tiny_run, "--out", eng).exit_code == 0
    np.savez(eng / "more.npz", X=np.zeros((2, 6, 100), np.float32))
    assert_one_line_error(cli("fuse-export", tiny_run, "--out", eng, "--inputs", eng / "more.npz"),
                          "would replace the --inputs file")
    assert (eng / "more.npz").is_file()


# ---------------------------------------------------------------------------------------------- 4, 5. one writer


def _edgetool(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "toolchain.cli", *map(str, args)], env=env, text=True, **kw)


def _hold_lock(out: Path) -> subprocess.Popen:
    """Another process holding `out`'s lock (as a concurrent edgetool writing it would) until its stdin closes."""
    code = ("import sys\nfrom toolchain.artifacts import output_lock\n"
            "with output_lock(sys.argv[1]):\n    print('locked', flush=True)\n    sys.stdin.read()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_adapt_waits_for_the_pretraining_and_uses_its_checkpoint(tmp_path, tiny_checkpoint):
    """Two adapts pretraining the same missing base: the second waits for the first's checkpoint and
    trains on it, instead of pretraining again and replacing it (which orphans the first run)."""
    ckpt = tmp_path / "models" / "base.pt"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(ckpt, train={"steps": 2}))
    first = _hold_lock(ckpt)  # the first adapt, pretraining
    try:
        second = _edgetool("adapt", recipe, "--out", tmp_path / "run", "--quiet", stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
        line = second.stdout.readline()
        assert "waiting for process" in line and str(ckpt) in line, (line, second.stderr.read() if second.poll() else "")
        shutil.copy(tiny_checkpoint, ckpt.with_name("tmp.pt"))
        os.replace(ckpt.with_name("tmp.pt"), ckpt)  # the first one's checkpoint lands
    finally:
        first.stdin.close()
        first.wait(timeout=60)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, out + err
    assert "using the base checkpoint" in out and "pretraining it first" not in out
    assert ckpt.read_bytes() == tiny_checkpoint.read_bytes()  # not replaced
    payload = torch.load(tmp_path / "run" / "adapter.pt", weights_only=True)
    assert payload["base_sha256"] == artifacts.sha256_file(tiny_checkpoint)


def test_pretrain_refuses_a_checkpoint_being_written(tmp_path):
    ckpt = tmp_path / "base.pt"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(ckpt))
    holder = _hold_lock(ckpt)
    try:
        assert_one_line_error(cli("pretrain", recipe, "--quiet"), "another edgetool process", f"is writing {ckpt}")
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not ckpt.exists()


def test_verify_holds_the_engine_dirs_lock(tmp_path, tiny_engine):
    """A verify and a fuse-export of the same engine directory never run together: verify takes the lock
    fuse-export takes to replace the directory."""
    eng = tmp_path / "eng"
    shutil.copytree(tiny_engine, eng)
    holder = _hold_lock(eng)  # a fuse-export rewriting it
    try:
        assert_one_line_error(cli("verify", eng, "--engine", "onnxruntime"), "another edgetool process", "is writing")
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not (eng / "verify_report.json").exists()


# ---------------------------------------------------------------------------------------------- 7. nothing left behind


def test_the_next_adapt_removes_a_killed_checkpoint_writes_temp(tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "base.pt"
    shutil.copy(tiny_checkpoint, ckpt)
    stale = tmp_path / f".base.pt.tmp-{_dead_pid()}-x1y2"
    stale.write_bytes(b"\0" * (1 << 20))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(ckpt, train={"steps": 2}))
    assert cli("adapt", recipe, "--out", tmp_path / "run", "--quiet").exit_code == 0
    assert not stale.exists()


def test_the_next_verify_removes_what_a_killed_verify_left(tmp_path, tiny_engine, monkeypatch):
    import tempfile
    scratch_root = tmp_path / "tmpdir"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    dead = _dead_pid()
    left = [scratch_root / f"edgetool-{dead}-unfused-abc", scratch_root / f"edgetool-{dead}-verify-def"]
    for d in left:
        d.mkdir()
        (d / "unfused.onnx").write_bytes(b"\0" * 1000)
    eng = tmp_path / "eng"
    shutil.copytree(tiny_engine, eng)
    report_tmp = eng / f".verify_report.json.tmp-{dead}-abc"
    report_tmp.write_text("{")
    plan_tmp = eng / f".fused.fp16.trt10.x.plan.tmp-{dead}-abc"
    plan_tmp.write_bytes(b"\0")
    result = cli("verify", eng, "--engine", "onnxruntime", "--iterations", "3", "--warmup", "0")
    assert result.exit_code == 0, result.output
    assert not report_tmp.exists() and not plan_tmp.exists()
    assert list(scratch_root.iterdir()) == []  # the dead one's removed, its own gone with it
