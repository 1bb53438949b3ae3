"""The fault suite: what goes wrong around a run (a second writer, a killed writer, a read-only or
escaping output, a swapped adapter, a checkpoint path that is a directory, NaN in a recipe, a model
that cannot take the data before the base exists) and the surprises that used to pass silently (a
rank capped without a word, a method bigger than full fine-tuning, a base overwritten, an adaptation
that lowers F1, fewer shots than asked for). Each is exit 2 with one line, or a printed note/warning."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, cli, tiny_recipe_dict, write_recipe

from toolchain import artifacts
from toolchain.artifacts import atomic_dir, default_output, output_lock, remove_stale_temps
from toolchain.errors import EdgetoolError
from toolchain.methods.registry import get_method
from toolchain.methods.settings import method_settings
from toolchain.models.backbones import MobileNet1d, ResNet1d, count_params

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- one writer


@contextlib.contextmanager
def lock_held_by_another_process(out: Path):
    """A second process holding `out`'s lock, as a concurrent edgetool writing `out` would."""
    code = ("import sys\nfrom toolchain.artifacts import output_lock\n"
            "with output_lock(sys.argv[1]):\n    print('locked', flush=True)\n    sys.stdin.read()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_second_writer_of_the_same_output_stops_at_once(tmp_path):
    out = tmp_path / "run"
    with lock_held_by_another_process(out) as holder:
        with pytest.raises(EdgetoolError, match=rf"another edgetool process \(process {holder.pid}\) is writing"):
            with output_lock(out):
                pass
    assert not (tmp_path / ".run.lock").exists()  # released and removed by its holder
    with output_lock(out) as lock:  # free again
        assert lock.read_text().strip() == str(os.getpid())
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    with lock_held_by_another_process(out) as holder:
        holder.kill()  # kill -9: no cleanup runs, the lock file stays
        holder.wait(timeout=30)
        assert (tmp_path / ".run.lock").exists()
        with output_lock(out):  # the kernel dropped the flock with the process
            pass


@pytest.mark.parametrize("command", ["adapt", "fuse-export", "bench", "apply"])
def test_every_writing_stage_refuses_an_output_being_written(command, tmp_path, tiny_run, tiny_checkpoint):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tiny_checkpoint))
    out = tmp_path / "out"
    args = {"adapt": ["adapt", recipe, "--quiet"],
            "fuse-export": ["fuse-export", tiny_run],
            "bench": ["bench", recipe, "--methods", "head", "--seeds", "1", "--quiet"],
            "apply": ["apply", tiny_run / "adapter.pt", "--recipe", recipe]}[command]
    with lock_held_by_another_process(out):
        assert_one_line_error(cli(*args, "--out", out), "another edgetool process", str(out))
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- killed writers


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_a_killed_writer_are_removed_and_a_live_writers_kept(tmp_path):
    final = tmp_path / "run"
    dead, live = _dead_pid(), os.getppid()
    assert not artifacts.pid_alive(dead) and artifacts.pid_alive(live)
    stale = tmp_path / f".run.tmp-{dead}-abc123"
    stale.mkdir()
    (stale / "adapter.pt").write_bytes(b"half")
    kept = tmp_path / f".run.tmp-{live}-def456"
    kept.mkdir()
    stale_file = tmp_path / f".run.tmp-{dead}-x1"
    stale_file.write_bytes(b"")
    other = tmp_path / f".other.tmp-{dead}-abc"  # another output's: not ours to judge here
    other.mkdir()
    assert set(remove_stale_temps(final)) == {stale, stale_file}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([kept.name, other.name])


def test_a_writer_killed_between_the_two_renames_gets_its_previous_output_back(tmp_path):
    final = tmp_path / "run"
    with atomic_dir(final) as d:
        (d / "a.txt").write_text("previous")
    dead = _dead_pid()
    os.replace(final, tmp_path / f".run.old-{dead}")  # atomic_dir moved it aside, then the process died
    (tmp_path / f".run.tmp-{dead}-zz").mkdir()
    remove_stale_temps(final)
    assert (final / "a.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_writer_killed_with_sigkill_mid_write_is_cleaned_up_by_the_next(tmp_path):
    out = tmp_path / "run"
    code = ("import sys\nfrom pathlib import Path\nfrom toolchain.artifacts import atomic_dir\n"
            "with atomic_dir(sys.argv[1]) as d:\n    (Path(d) / 'adapter.pt').write_bytes(b'half')\n"
            "    print('writing', flush=True)\n    sys.stdin.read()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait(timeout=30)
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(f".run.tmp-{proc.pid}-") and (left / "adapter.pt").read_bytes() == b"half"
    with output_lock(out):  # what every writing stage takes first
        pass
    assert list(tmp_path.iterdir()) == []


def test_temp_names_carry_the_writers_pid(tmp_path):
    with atomic_dir(tmp_path / "run") as d:
        assert d.name.startswith(f".run.tmp-{os.getpid()}-")


def test_adapt_cleans_what_a_killed_adapt_left(tmp_path, tiny_checkpoint):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tiny_checkpoint, train={"steps": 1}))
    leftover = tmp_path / f".run.tmp-{_dead_pid()}-k9"
    leftover.mkdir()
    (leftover / "metrics.json").write_text("{")
    result = cli("adapt", recipe, "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ---------------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("name", ["/tmp/elsewhere", "../up", "a/b", "..", "."])
def test_default_output_never_leaves_its_root(name, tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EdgetoolError, match="plain file name"):
        default_output("runs", name)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tiny_checkpoint, name=name))
    assert_one_line_error(cli("adapt", recipe, "--quiet"), "cannot name the default output directory", "--out")
    assert_one_line_error(cli("bench", recipe, "--methods", "head", "--seeds", "1", "--quiet"), "default output directory")
    assert not (tmp_path / "runs").exists() and not Path("/tmp/elsewhere").exists()
    assert default_output("runs", "my-run.v2") == Path("runs") / "my-run.v2"


def test_read_only_output_is_refused_before_any_training(tmp_path, tiny_run, tiny_checkpoint, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    real_access = os.access
    # chmod does not stop root (CI containers often run as root), so the permission answer is simulated.
    monkeypatch.setattr(artifacts.os, "access",
                        lambda p, mode: False if Path(p) == out and mode & os.W_OK else real_access(p, mode))

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking the output")

    monkeypatch.setattr("toolchain.stages.adapt.fit", no_training)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tiny_checkpoint))
    assert_one_line_error(cli("adapt", recipe, "--out", out, "--quiet"), "exists and is not writable")


def test_a_failed_final_rename_is_one_line_and_keeps_the_previous_output(tmp_path, monkeypatch):
    final = tmp_path / "out"
    with atomic_dir(final) as d:
        (d / "a.txt").write_text("first")
    real = os.replace

    def refuse_install(src, dst):
        if Path(dst) == final and ".tmp-" in Path(src).name:
            raise PermissionError(13, "Permission denied")
        return real(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", refuse_install)
    with pytest.raises(EdgetoolError, match="cannot replace .*Permission denied"):
        with atomic_dir(final) as d:
            (d / "a.txt").write_text("second")
    assert (final / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------------------------- misleading messages


def test_checkpoint_path_that_is_a_directory_is_named_as_one(tmp_path):
    (tmp_path / "ckpt").mkdir()
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tmp_path / "ckpt"))
    assert_one_line_error(cli("adapt", recipe, "--out", tmp_path / "run", "--quiet"), "is a directory")
    assert_one_line_error(cli("pretrain", recipe, "--quiet"), "is a directory")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_recipe_number_is_called_so(value, tmp_path, tiny_checkpoint):
    path = tmp_path / "r.yaml"
    write_recipe(path, tiny_recipe_dict(tiny_checkpoint))
    path.write_text(path.read_text().replace("lr: 0.01\n  batch_size: 12", f"lr: {value}\n  batch_size: 12"))
    line = assert_one_line_error(cli("adapt", path, "--out", tmp_path / "run", "--quiet"), "field 'train.lr'",
                          "must be a finite number")
    assert "greater than" not in line


def test_swapped_adapter_is_named_as_another_runs_not_a_changed_base(tmp_path, tiny_run, tiny_checkpoint):
    other = write_recipe(tmp_path / "other.yaml", tiny_recipe_dict(tiny_checkpoint, name="other",
                                                                     method={"name": "ttlora", "rank": 3},
                                                                     train={"steps": 1}))
    assert cli("adapt", other, "--out", tmp_path / "other", "--quiet").exit_code == 0
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.copy(tmp_path / "other" / "adapter.pt", run / "adapter.pt")
    line = assert_one_line_error(cli("fuse-export", run, "--out", tmp_path / "eng"), "is not the adapter this run wrote",
                          "rank 3 (this run: 2)", "recipe 'other'", "edgetool apply")
    assert "changed since" not in line and "different base" not in line


def test_adapter_from_a_run_on_another_base_says_so(tmp_path, tiny_run):
    from toolchain.rundir import check_adapter_identity, load_recipe, read_adapter

    run = Path(tiny_run)
    payload = read_adapter(run / "adapter.pt")
    metrics = json.loads((run / "metrics.json").read_text())
    recipe = load_recipe(run / "recipe.yaml")
    check_adapter_identity(run / "adapter.pt", payload, recipe, metrics)  # its own adapter: fine
    swapped = {**payload, "run_id": "0" * 16, "base_sha256": "f" * 64}
    with pytest.raises(EdgetoolError, match=r"trained on a different base \(sha256 ffffffffffff, this run's "):
        check_adapter_identity(run / "adapter.pt", swapped, recipe, metrics)


# ---------------------------------------------------------------------------------------------- crash paths


def test_wrong_input_shape_before_the_base_exists_is_bad_input(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "img.npz", X=rng.normal(size=(24, 3, 4, 20)).astype(np.float32), y=np.arange(24) % 3)
    raw = tiny_recipe_dict(tmp_path / "base.pt")
    raw["data"] = {"format": "npz", "train_path": "img.npz", "shift": None}
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    assert_one_line_error(cli("adapt", recipe, "--out", tmp_path / "run", "--quiet"),
                   "does not accept inputs shaped (3, 4, 20)")
    assert_one_line_error(cli("pretrain", recipe, "--quiet"), "does not accept inputs shaped (3, 4, 20)")
    assert not (tmp_path / "base.pt").exists() and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- silent surprises


def test_rank_above_what_layers_can_use_is_capped_with_a_note():
    model = ResNet1d(6, 4, width=8)
    method = get_method(method_settings(name="ttlora", rank=1000))
    method.inject(model)
    (note,) = method.notes
    assert "method.rank 1000 is more than 12 of 12 adapted layer(s) can use" in note
    # The first conv is (8, 6, 7): TT-SVD bonds 8 x 42 and 48 x 7, so at most rank 8 there.
    assert "features.0.body.0 -> 8" in note and "(12 in all)" in note

    mobile = MobileNet1d(6, 4, width=8)
    depthwise = [n for n, m in mobile.named_modules() if isinstance(m, torch.nn.Conv1d) and m.groups > 1]
    lora = get_method(method_settings(name="lora", rank=2))
    lora.inject(mobile)
    (note,) = lora.notes
    assert depthwise and all(f"{n} -> 1" in note for n in depthwise[:6])  # a depthwise update has rank 1 per channel

    exact = get_method(method_settings(name="lora", rank=2))
    exact.inject(ResNet1d(6, 4, width=8))
    assert exact.notes == []


def test_rank_caps_are_printed_by_adapt(tmp_path, tiny_checkpoint):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tiny_checkpoint, method={"name": "ttlora", "rank": 1000},
                                                                train={"steps": 1}))
    result = cli("adapt", recipe, "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.output
    assert "note: method.rank 1000 is more than 12 of 12 adapted layer(s) can use" in result.stdout
    assert any("method.rank 1000" in n for n in json.loads((tmp_path / "run" / "metrics.json").read_text())["notes"])


def test_method_bigger_than_full_fine_tuning_is_refused(tmp_path, tiny_checkpoint):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tiny_checkpoint, method={"name": "lora", "rank": 1000}))
    line = assert_one_line_error(cli("adapt", recipe, "--out", tmp_path / "run", "--quiet"), "more than full fine-tuning",
                          "method.rank")
    trainable, total = map(int, re.search(r"would train (\d+) parameters, .*?\((\d+),", line).groups())
    assert total == count_params(ResNet1d(6, 4, width=8)) and trainable > total
    assert not (tmp_path / "run").exists()


def test_pretrain_never_overwrites_a_checkpoint_without_force(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tmp_path / "base.pt", model={"width": 4},
                                                                pretrain={"steps": 2}))
    assert cli("pretrain", recipe, "--quiet").exit_code == 0
    before = (tmp_path / "base.pt").read_bytes()
    assert_one_line_error(cli("pretrain", recipe, "--quiet"), "exists", "--force")
    assert (tmp_path / "base.pt").read_bytes() == before
    (tmp_path / "base.pt").write_bytes(b"replace me")
    assert cli("pretrain", recipe, "--quiet", "--force").exit_code == 0
    assert (tmp_path / "base.pt").read_bytes() == before  # deterministic pretraining, written again


def test_adaptation_that_lowers_f1_warns_and_records_it(tmp_path, tiny_checkpoint, monkeypatch):
    import toolchain.stages.adapt as adapt_stage

    real_fit = adapt_stage.fit

    def fit_then_break(model, *args, **kwargs):
        result = real_fit(model, *args, **kwargs)
        with torch.no_grad():  # the adapted model now always says class 0: macro-F1 0.1 on the 4 balanced classes
            model.get_submodule("classifier").bias[0] = 1e6
        return result

    monkeypatch.setattr(adapt_stage, "fit", fit_then_break)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tiny_checkpoint, train={"steps": 1}))
    result = cli("adapt", recipe, "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["f1_after"] < metrics["f1_before"] and metrics["f1_decreased"] is True
    assert len(metrics["warnings"]) == 1 and "lowered target macro-F1" in metrics["warnings"][0]
    assert f"warning: adaptation lowered target macro-F1 from {metrics['f1_before']:.3f}" in result.stdout


def test_an_improving_adaptation_records_no_warning(tiny_run):
    metrics = json.loads((Path(tiny_run) / "metrics.json").read_text())
    assert metrics["f1_after"] >= metrics["f1_before"]
    assert metrics["f1_decreased"] is False and metrics["warnings"] == []


def test_fewer_shots_than_asked_for_is_printed_and_recorded(tmp_path, tiny_checkpoint):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tiny_checkpoint, data={"target_shots": 500},
                                                                train={"steps": 1}))
    result = cli("adapt", recipe, "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.output
    assert "note: data.target_shots 500: only" in result.stdout
    protocol = json.loads((tmp_path / "run" / "metrics.json").read_text())["protocol"]
    assert any(n.startswith("data.target_shots 500: only") for n in protocol["notes"])
    assert protocol["windows"]["target_test"] == 40
