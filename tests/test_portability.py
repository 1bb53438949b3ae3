"""Portable runs: a run directory records its paths relative to itself and what its models need
without data, so a run and its base checkpoint copied to another machine (without the training data)
still go through fuse-export and verify; older runs with absolute paths still load."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import cli, tiny_recipe_dict, write_recipe

from toolchain.rundir import load_run


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_checkpoint) -> Path:
    """A project tree with its own data files (.ts, the embedded BasicMotions pair, so the session's base
    fits), base checkpoint and an adapted run: proj/{data,models,runs/ts}."""
    proj = tmp_path_factory.mktemp("proj")
    (proj / "data").mkdir()
    root = resources.files("toolchain.data") / "datasets" / "BasicMotions"
    for split in ("TRAIN", "TEST"):
        (proj / "data" / f"bm_{split}.ts").write_bytes((root / f"BasicMotions_{split}.ts").read_bytes())
    (proj / "models").mkdir()
    shutil.copy(tiny_checkpoint, proj / "models" / "base.pt")
    raw = tiny_recipe_dict(Path("models/base.pt"), name="ts", train={"steps": 5},
                           verify={"iterations": 3, "warmup": 1, "batch_sizes": [1, 4]})
    raw["data"] = {**raw["data"], "format": "ts", "train_path": "data/bm_TRAIN.ts", "test_path": "data/bm_TEST.ts"}
    recipe = write_recipe(proj / "recipe.yaml", raw)
    result = cli("adapt", recipe, "--out", proj / "runs" / "ts", "--quiet")
    assert result.exit_code == 0, result.output
    return proj


def test_run_directory_records_paths_relative_to_itself(project):
    run = project / "runs" / "ts"
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert recipe["model"]["checkpoint"] == "../../models/base.pt"
    assert recipe["data"]["train_path"] == "../../data/bm_TRAIN.ts"
    assert recipe["data"]["test_path"] == "../../data/bm_TEST.ts"
    payload = torch.load(run / "adapter.pt", weights_only=True)
    assert payload["base_checkpoint"] == "../../models/base.pt"
    assert payload["input_shape"] == [6, 100] and payload["class_names"] and payload["head"] == "classifier"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["absolute_paths"]["model.checkpoint"] == str(project / "models" / "base.pt")
    assert metrics["input_shape"] == [6, 100] and metrics["run_id"] == payload["run_id"]


def test_run_and_base_copied_elsewhere_without_data_go_through_the_pipeline(project, tmp_path):
    """The reviewer's case: copy the run dir and the base to another machine, leave the data behind."""
    other = tmp_path / "elsewhere"
    shutil.copytree(project / "runs", other / "runs")
    shutil.copytree(project / "models", other / "models")
    moved = tmp_path / "data-moved-away"
    shutil.move(project / "data", moved)
    try:
        out = other / "engines" / "ts"
        result = cli("fuse-export", other / "runs" / "ts", "--out", out)
        assert result.exit_code == 0, result.output
        assert "note: the recipe's data (field 'data.train_path') is not here" in result.stdout
        report = json.loads((out / "fuse_report.json").read_text())
        assert report["passed"] and report["data_available"] is False and report["notes"]
        assert report["equivalence_inputs"] == {"target_test": 0, "user": 0, "random": 32}
        assert report["torch_f1"] is None and report["ort_f1"] is None and report["fp16_f1"] is None  # not faked
        assert report["argmax_agreement"] == 1.0 and report["ort_predictions_identical"]
        assert report["run_dir"] == "../../runs/ts" and report["input_shape"] == [6, 100]

        result = cli("verify", out, "--engine", "onnxruntime")
        verify_report = json.loads((out / "verify_report.json").read_text())
        assert result.exit_code == (1 if verify_report["failed_checks"] else 0), result.output
        assert not [c for c in verify_report["failed_checks"] if not c.startswith("latency.")], result.output
        assert verify_report["data_available"] is False and verify_report["test_windows"] == 32
        names = [c["name"] for c in verify_report["checks"]]
        assert "accuracy.fp32.argmax_agreement" in names and not [n for n in names if n.endswith("f1_delta")]
        assert verify_report["f1_torch"] is None and "macro-F1 n/a" in result.stdout

        # The engine directory moves along with its run: the relative run_dir still finds it.
        shutil.move(other, tmp_path / "renamed")
        assert cli("fuse-export", tmp_path / "renamed" / "runs" / "ts", "--out", tmp_path / "e2").exit_code == 0
    finally:
        shutil.move(moved, project / "data")


def test_user_inputs_join_the_checks(project, tmp_path):
    run = load_run(project / "runs" / "ts")
    X = np.random.default_rng(3).standard_normal((5, *run.spec.input_shape)).astype(np.float32)
    np.savez(tmp_path / "windows.npz", X=X)
    np.savez(tmp_path / "wrong.npz", X=X[:, :3])
    out = tmp_path / "eng"
    result = cli("fuse-export", project / "runs" / "ts", "--out", out, "--inputs", tmp_path / "windows.npz")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "fuse_report.json").read_text())
    assert report["equivalence_inputs"] == {"target_test": 40, "user": 5, "random": 16}
    assert report["data_available"] is True and report["torch_f1"] is not None
    result = cli("fuse-export", project / "runs" / "ts", "--out", tmp_path / "e3", "--inputs", tmp_path / "wrong.npz")
    assert result.exit_code == 2 and "the model takes [N, 6, 100]" in result.stderr
    assert not (tmp_path / "e3").exists()


def test_user_inputs_stand_in_for_missing_data(project, tmp_path):
    other = tmp_path / "copy"
    shutil.copytree(project / "runs", other / "runs")
    shutil.copytree(project / "models", other / "models")
    X = np.random.default_rng(4).standard_normal((7, 6, 100)).astype(np.float32)
    np.savez(tmp_path / "windows.npz", X=X)
    # The run's data paths point to other/data, which does not exist; the recorded absolute ones would
    # find the project's data, so hide it.
    moved = tmp_path / "away"
    shutil.move(project / "data", moved)
    try:
        result = cli("fuse-export", other / "runs" / "ts", "--out", other / "eng", "--inputs", tmp_path / "windows.npz")
    finally:
        shutil.move(moved, project / "data")
    assert result.exit_code == 0, result.output
    report = json.loads((other / "eng" / "fuse_report.json").read_text())
    assert report["equivalence_inputs"] == {"target_test": 0, "user": 7, "random": 32}


def test_run_moved_on_its_own_finds_its_inputs_where_they_were(project, tmp_path):
    """Copy only the run directory: the relative paths point nowhere, the recorded absolute ones still work."""
    run = tmp_path / "archive" / "deep" / "ts"
    shutil.copytree(project / "runs" / "ts", run)
    notes = []
    loaded = load_run(run, echo=notes.append)
    assert loaded.data is not None and loaded.recipe.model.checkpoint == project / "models" / "base.pt"
    assert any("using " + str(project / "models" / "base.pt") in n for n in notes)


def test_old_run_with_absolute_paths_still_loads(project, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(project / "runs" / "ts", run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"]["checkpoint"] = str(project / "models" / "base.pt")
    recipe["data"]["train_path"] = str(project / "data" / "bm_TRAIN.ts")
    recipe["data"]["test_path"] = str(project / "data" / "bm_TEST.ts")
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    payload = torch.load(run / "adapter.pt", weights_only=True)
    for key in ("run_id", "recipe_name", "method_settings", "input_shape", "recipe_sha256"):
        payload.pop(key)
    payload["base_checkpoint"] = str(project / "models" / "base.pt")
    torch.save(payload, run / "adapter.pt")
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("run_id", "base_sha256", "input_shape", "class_names", "num_source_classes", "head", "absolute_paths"):
        metrics.pop(key)
    (run / "metrics.json").write_text(json.dumps(metrics))
    loaded = load_run(run)
    x = torch.from_numpy(loaded.data.target_test.X[:4])
    with torch.no_grad():
        assert torch.equal(loaded.adapted(x), load_run(project / "runs" / "ts").adapted(x))
