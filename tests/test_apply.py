"""`edgetool apply ADAPTER --base CKPT --recipe RECIPE --out RUN_DIR`: an adapter trained anywhere becomes
a run directory that fuse-export takes; the recorded base sha256 guards it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from conftest import cli, tiny_recipe_dict, write_recipe

from toolchain.artifacts import sha256_file
from toolchain.rundir import load_run


def test_apply_round_trip_gives_the_run_back(tiny_run, tiny_checkpoint, tmp_path):
    """The adapter alone (copied away from its run) + its base + a recipe -> the same adapted model, and
    fuse-export accepts the result."""
    shipped = tmp_path / "from-device" / "adapter.pt"
    shipped.parent.mkdir()
    shutil.copy(Path(tiny_run) / "adapter.pt", shipped)
    base = tmp_path / "base.pt"
    shutil.copy(tiny_checkpoint, base)
    # The recipe says rank 4; the adapter was trained with rank 2, and its own settings win.
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tmp_path / "elsewhere.pt",
                                                                method={"name": "ttlora", "rank": 4}))
    out = tmp_path / "applied"
    result = cli("apply", shipped, "--base", base, "--recipe", recipe, "--out", out)
    assert result.exit_code == 0, result.output
    assert "note: using the adapter's method settings" in result.stdout and "'rank': 2" in result.stdout

    original = load_run(tiny_run)
    applied = load_run(out)
    assert applied.recipe.method == original.recipe.method and applied.recipe.model.checkpoint == base.resolve()
    x = torch.from_numpy(original.data.target_test.X)
    with torch.no_grad():
        assert torch.equal(applied.adapted(x), original.adapted(x))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["f1_after"] == original.metrics["f1_after"] and metrics["f1_before"] == original.metrics["f1_before"]
    assert metrics["applied_from"]["adapter_sha256"] == sha256_file(shipped)
    assert metrics["run_id"] == original.metrics["run_id"]  # the adapter keeps its identity

    eng = tmp_path / "eng"
    result = cli("fuse-export", out, "--out", eng)
    assert result.exit_code == 0, result.output
    assert json.loads((eng / "fuse_report.json").read_text())["torch_f1"] == metrics["f1_after"]


def test_apply_refuses_another_base_naming_both_hashes(tiny_run, tiny_checkpoint, tmp_path):
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    key = next(iter(ckpt["state_dict"]))
    ckpt["state_dict"][key] = ckpt["state_dict"][key] + 0.01
    torch.save(ckpt, tmp_path / "other.pt")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tiny_checkpoint))
    result = cli("apply", Path(tiny_run) / "adapter.pt", "--base", tmp_path / "other.pt", "--recipe", recipe,
                 "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert line.count("\n") == 0 and sha256_file(tiny_checkpoint) in line and sha256_file(tmp_path / "other.pt") in line
    assert not (tmp_path / "out").exists()


def test_apply_without_the_data_then_fuse_export(tiny_run, tiny_checkpoint, tmp_path):
    """A device-trained adapter, and a workstation without the training data: the run directory is still
    made (no F1 recorded) and fuse-export checks it on random windows."""
    raw = tiny_recipe_dict(tiny_checkpoint)
    raw["data"] = {**raw["data"], "format": "ts", "train_path": "gone_TRAIN.ts", "test_path": "gone_TEST.ts"}
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    out = tmp_path / "applied"
    result = cli("apply", Path(tiny_run) / "adapter.pt", "--recipe", recipe, "--out", out)
    assert result.exit_code == 0, result.output
    assert "is not here" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data_available"] is False and metrics["f1_after"] is None
    result = cli("fuse-export", out, "--out", tmp_path / "eng")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eng" / "fuse_report.json").read_text())
    assert report["data_available"] is False and report["argmax_agreement"] == 1.0


def test_apply_bad_inputs_are_one_line(tiny_run, tiny_checkpoint, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tiny_checkpoint))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    cases = [
        (tmp_path / "missing.pt", "adapter not found"),
        (tmp_path, "is a directory, not an adapter file"),
        (tmp_path / "junk.pt", "cannot be read as a weights-only checkpoint"),
        (tiny_checkpoint, "is not an edgetool adapter checkpoint"),
    ]
    for adapter, needle in cases:
        result = cli("apply", adapter, "--recipe", recipe, "--out", tmp_path / "out")
        assert result.exit_code == 2 and needle in result.stderr, (adapter, result.output)
    # Never into the run directory the adapter comes from.
    result = cli("apply", Path(tiny_run) / "adapter.pt", "--recipe", recipe, "--out", tiny_run)
    assert result.exit_code == 2 and "would replace the adapter" in result.stderr
    assert not (tmp_path / "out").exists()
