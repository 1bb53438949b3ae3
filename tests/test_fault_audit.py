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


# ---------------------------------------------------------------------------------------------- 6. exit 2 or 1, never 3


class _FullDisk:
    """io.open, but files opened for writing under `root` fail their first write with ENOSPC (after the file
    was created, as a real full disk does)."""

    def __init__(self, root: Path, real_open):
        self.root, self.real_open = str(root), real_open

    def __call__(self, file, mode="r", *args, **kwargs):
        handle = self.real_open(file, mode, *args, **kwargs)
        name = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.path.abspath(file)
        if any(c in mode for c in "wax") and name.startswith(self.root):
            return _NoSpace(handle)
        return handle


class _NoSpace:
    def __init__(self, handle):
        self.handle = handle

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def __getattr__(self, name):
        return getattr(self.handle, name)


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


@pytest.mark.parametrize("command", ["adapt", "fuse-export", "verify"])
def test_a_full_disk_is_one_line_naming_the_device_and_leaves_nothing_partial(command, tmp_path, tiny_run, tiny_engine,
                                                                              tiny_checkpoint, monkeypatch):
    import io
    out = tmp_path / "full"
    out.mkdir()
    if command == "adapt":
        args = ["adapt", write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tiny_checkpoint, train={"steps": 2})),
                "--out", out / "run", "--quiet"]
    elif command == "fuse-export":
        args = ["fuse-export", tiny_run, "--out", out / "eng"]
    else:
        shutil.copytree(tiny_engine, out / "eng")
        args = ["verify", out / "eng", "--engine", "onnxruntime", "--iterations", "3", "--warmup", "0"]
    before = sorted(p.name for p in out.rglob("*"))
    monkeypatch.setattr(io, "open", _FullDisk(out, io.open))
    result = cli(*args)
    monkeypatch.undo()
    assert_one_line_error(result, "no space left on", "mounted at", "nothing partial was kept")
    assert sorted(p.name for p in out.rglob("*")) == before and _leftovers(out) == []


def _mount_tiny_tmpfs(where: Path, size: str) -> str | None:
    where.mkdir()
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run mount: {exc}"
    return None if res.returncode == 0 else f"mounting a tmpfs is not permitted here: {res.stderr.strip()}"


def test_a_really_full_disk_in_fuse_export(tmp_path, tiny_run):
    """The same on a real 64 KiB filesystem (where this test may mount one)."""
    small = tmp_path / "small"
    why = _mount_tiny_tmpfs(small, "64k")
    if why:
        pytest.skip(why)
    try:
        result = cli("fuse-export", tiny_run, "--out", small / "eng")
        assert_one_line_error(result, "no space left on tmpfs mounted at " + str(small))
        assert sorted(p.name for p in small.iterdir()) == []  # no lock, no temp, no half export
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_out_filesystem_root_is_refused(tmp_path, tiny_checkpoint):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tiny_checkpoint))
    assert_one_line_error(cli("adapt", recipe, "--out", "/", "--quiet"), "is a filesystem root")


def _npz_with_forged_shape(path: Path, name: str, shape: tuple[int, ...], **others) -> Path:
    """An .npz whose array `name` declares `shape` in its header but stores 8 bytes."""
    import io
    import zipfile
    from numpy.lib import format as npy
    with zipfile.ZipFile(path, "w") as zf:
        buf = io.BytesIO()
        npy.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
        zf.writestr(f"{name}.npy", buf.getvalue() + b"\0" * 8)
        for key, arr in others.items():
            b = io.BytesIO()
            np.save(b, arr)
            zf.writestr(f"{key}.npy", b.getvalue())
    return path


def test_an_npz_header_declaring_a_huge_shape_is_refused_before_loading(tmp_path, tiny_checkpoint, tiny_run):
    data = _npz_with_forged_shape(tmp_path / "d.npz", "X", (10 ** 12, 6, 100), y=np.zeros(4, np.int64))
    raw = tiny_recipe_dict(tiny_checkpoint)
    raw["data"] = {"format": "npz", "train_path": str(data), "source_domains": [0], "target_domains": [1]}
    result = cli("adapt", write_recipe(tmp_path / "r.yaml", raw), "--out", tmp_path / "run", "--quiet")
    assert_one_line_error(result, "array 'X' declares shape (1000000000000, 6, 100)", "stores 8 bytes")
    inputs = _npz_with_forged_shape(tmp_path / "i.npz", "X", (10 ** 12, 6, 100))
    assert_one_line_error(cli("fuse-export", tiny_run, "--out", tmp_path / "eng", "--inputs", inputs), "declares shape")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_weight_in_the_base_checkpoint_is_named(bad, tmp_path, tiny_checkpoint):
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    key = "features.1.body.0.weight"
    ckpt["state_dict"][key][0, 0, 0] = bad
    torch.save(ckpt, tmp_path / "base.pt")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tmp_path / "base.pt"))
    kind = "NaN" if bad != bad else "Inf"
    assert_one_line_error(cli("adapt", recipe, "--out", tmp_path / "run", "--quiet"),
                          f"base checkpoint {tmp_path / 'base.pt'}: tensor '{key}' holds {kind} values")


def test_batch_sizes_verify_cannot_run_are_refused_when_the_recipe_loads(tmp_path, tiny_checkpoint):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tiny_checkpoint, verify={"batch_sizes": [1, 10 ** 9]}))
    assert_one_line_error(cli("adapt", recipe, "--out", tmp_path / "run", "--quiet"),
                          "field 'verify.batch_sizes': must list batch sizes from 1 to 65536")
    assert not (tmp_path / "run").exists()


def _other_length_export(dst: Path) -> None:
    """fused.onnx (and its FP16 twin) from another run: same architecture, windows of 50 steps, not 100."""
    from toolchain.models.backbones import ResNet1d
    from toolchain.proof.export import export_onnx
    export_onnx(ResNet1d(6, 4, width=8).eval(), torch.zeros(2, 6, 50), dst / "fused.onnx", 17)
    shutil.copy(dst / "fused.onnx", dst / "fused.fp16.onnx")


@pytest.mark.parametrize("case", ["another-input-length", "truncated"])
def test_engine_files_no_runtime_can_run_fail_integrity_with_exit_1(case, tmp_path, tiny_engine):
    eng = tmp_path / "eng"
    shutil.copytree(tiny_engine, eng)
    if case == "another-input-length":
        _other_length_export(eng)
        why = "takes 'input' shaped [batch, 6, 50], this export's graphs take [N, 6, 100]"
    else:
        data = (eng / "fused.onnx").read_bytes()
        (eng / "fused.onnx").write_bytes(data[: len(data) // 2])
        why = "fused.onnx cannot be read as an ONNX graph"
    for extra in ([], ["--allow-modified"]):
        result = cli("verify", eng, "--engine", "onnxruntime", *extra)
        assert result.exit_code == 1, result.output
        err = result.stderr.strip()
        assert "\n" not in err and err.startswith("edgetool: error: parity check failed: integrity.")
        report = json.loads((eng / "verify_report.json").read_text())
        assert "integrity.io.fused.onnx" in report["failed_checks"] and report["verdict"] == "failed"
        assert why in next(c["message"] for c in report["checks"] if c["name"] == "integrity.io.fused.onnx")


# ---------------------------------------------------------------------------------------------- 8. one line, no noise


def test_a_window_length_of_zero_is_one_line_without_numpy_warnings(tmp_path, tiny_checkpoint):
    np.savez(tmp_path / "t0.npz", X=np.zeros((20, 6, 0), np.float32), y=np.repeat([0, 1], 10),
             domain=np.tile([0, 1], 10))
    raw = tiny_recipe_dict(tiny_checkpoint)
    raw["data"] = {"format": "npz", "train_path": str(tmp_path / "t0.npz"), "source_domains": [0], "target_domains": [1]}
    proc = _edgetool("adapt", write_recipe(tmp_path / "r.yaml", raw), "--out", tmp_path / "run", "--quiet",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and err.strip() == f"edgetool: error: {tmp_path / 't0.npz'}: X must be windows [N, C, T] " \
        "(or [N, C, H, W]) with no empty axis, got shape (20, 6, 0)", err


def test_a_raw_pickle_checkpoint_is_one_line_without_torch_warnings(tmp_path, tiny_checkpoint):
    import pickle
    (tmp_path / "base.pt").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tmp_path / "base.pt"))
    proc = _edgetool("adapt", recipe, "--out", tmp_path / "run", "--quiet", stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot be read as a weights-only torch checkpoint" in err


def test_library_warnings_are_kept_out_of_error_output(tmp_path, tiny_checkpoint, monkeypatch):
    """Whatever warns before a failure: the error is the one line, and the warning is dropped."""
    import warnings
    import toolchain.stages.adapt as adapt_mod
    real = adapt_mod.check_inputs_exist

    def noisy(*a, **k):
        warnings.warn("some library's warning", UserWarning)
        return real(*a, **k)
    monkeypatch.setattr(adapt_mod, "check_inputs_exist", noisy)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tmp_path / "missing.pt",
                                                                data={"format": "npz", "train_path": "nope.npz"}))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert_one_line_error(cli("adapt", recipe, "--out", tmp_path / "run"), "nope.npz")
    assert not [w for w in seen if "some library" in str(w.message)]


def test_a_directory_given_as_the_recipe_is_called_a_directory(tmp_path):
    assert_one_line_error(cli("adapt", tmp_path), f"recipe {tmp_path} is a directory")


def test_a_non_utf8_out_is_refused_before_any_work(tmp_path, tiny_run):
    out = os.fsdecode(os.fsencode(tmp_path) + b"/eng\xff")
    assert_one_line_error(cli("fuse-export", tiny_run, "--out", out), "is not valid UTF-8")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- single-test rules


@pytest.mark.parametrize("name", ["original.fp16.onnx", "fused.fp16.onnx"])
def test_a_swapped_fp16_graph_fails_its_own_integrity_check(name, tmp_path, tiny_engine):
    """The FP16 files are sealed like the FP32 ones: each swap fails integrity.<that file> (exit 1)."""
    eng = tmp_path / "eng"
    shutil.copytree(tiny_engine, eng)
    other = "fused.fp16.onnx" if name.startswith("original") else "original.fp16.onnx"
    shutil.copyfile(eng / other, eng / name)
    result = cli("verify", eng, "--engine", "onnxruntime", "--iterations", "3", "--warmup", "0")
    assert result.exit_code == 1, result.output
    report = json.loads((eng / "verify_report.json").read_text())
    assert report["failed_checks"][0] == f"integrity.{name}" and f"integrity.{other}" not in report["failed_checks"]


def test_trust_is_scoped_to_the_module_named():
    from toolchain.models.backbones import trusted_factory
    assert trusted_factory("mypkg.models:build", ["mypkg"]) and trusted_factory("mypkg.models:build", ["mypkg.models"])
    assert trusted_factory("mypkg.models:build", ["mypkg.models:build"])
    assert not trusted_factory("mypkg.models:other", ["mypkg.models:build"])
    assert not trusted_factory("mypkgx.models:build", ["mypkg"]) and not trusted_factory("os:system", ["o", ""])
