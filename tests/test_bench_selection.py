"""Learning-rate selection in `bench`: chosen on the validation split only, never on the test split; the
grid, the refusal without validation windows, and what bench.json and bench.md report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from toolchain.models.assembly import load_base_model
from toolchain.bench.jobs import RunPool, selection_view
from toolchain.cli import main
from toolchain.data.protocol import load_data
from toolchain.errors import EdgetoolError
from toolchain.bench.selection import choose, rate_grids, select_rates
from toolchain.stages.bench import method_configs, seed_data

TINY = {"train": {"steps": 10, "lr": 0.01, "batch_size": 12, "eval_every": 5},
        "bench": {"timing_steps": 2, "lr_grid": [0.001, 0.03]}}


def _runs(*val_f1, diverged=(), loss=0.5):
    return [{"val_f1": None if i in diverged else v, "val_loss": None if i in diverged else loss,
             "diverged": "loss became nan" if i in diverged else None} for i, v in enumerate(val_f1)]


def test_choose_takes_the_best_mean_validation_f1():
    lr, grid = choose({0.001: _runs(0.5, 0.7), 0.01: _runs(0.9, 0.8), 0.1: _runs(1.0, 0.6)})
    assert lr == 0.01
    assert [g["lr"] for g in grid] == [0.001, 0.01, 0.1]
    assert grid[1]["val_f1_mean"] == pytest.approx(0.85) and grid[1]["val_f1_per_seed"] == [0.9, 0.8]
    assert grid[1]["val_f1_std"] == pytest.approx(np.std([0.9, 0.8], ddof=1))


def test_a_rate_that_diverged_on_any_seed_is_not_eligible():
    lr, grid = choose({0.01: _runs(0.6, 0.6), 0.1: _runs(1.0, 0.0, diverged=(1,))})
    assert lr == 0.01
    assert grid[1]["diverged_seeds"] == 1 and grid[1]["val_f1_mean"] is None
    assert choose({0.1: _runs(0.0, diverged=(0,))})[0] is None


def test_the_smallest_rate_within_one_standard_error_of_the_best_is_chosen():
    # best 0.03: mean 0.85, std 0.0707 over 2 seeds, SE 0.05; 0.01 (0.82) is within it, 0.003 (0.7) is not
    assert choose({0.003: _runs(0.7, 0.7), 0.01: _runs(0.82, 0.82), 0.03: _runs(0.8, 0.9)})[0] == 0.01
    # a difference far below the seeds' spread (here 0.002 against an SE of 0.1) does not decide
    assert choose({0.01: _runs(0.5, 0.7), 0.03: _runs(0.502, 0.702)})[0] == 0.01
    # no spread at the best rate: only an equal mean qualifies; exact ties go to the smaller rate
    assert choose({0.003: _runs(0.9, 0.9), 0.03: _runs(1.0, 1.0)})[0] == 0.03
    assert choose({0.03: _runs(1.0, 1.0, loss=0.2), 0.003: _runs(1.0, 1.0, loss=0.4)})[0] == 0.003
    # one seed: no standard error, the best mean wins
    assert choose({0.003: _runs(0.89), 0.03: _runs(0.9)})[0] == 0.03
    # the validation loss is recorded, not used
    assert choose({0.03: _runs(0.9, 0.9, loss=2.0), 0.003: _runs(0.8, 0.8, loss=0.1)})[0] == 0.03


@pytest.mark.parametrize("bench, message", [
    ({"lr_grid": [0.01, -1.0]}, "learning rates must be positive"),
    ({"lr_grid": [0.01, 0.01]}, "more than once"),
    ({"lr_grid": []}, "bench.lr_grid"),
    ({"lr_grids": {"warp": [0.01]}}, "unknown method(s) ['warp']"),
    ({"lr_grids": {"full": [0.0]}}, "full: learning rates must be positive"),
    ({"lr_grid": [0.01, 0.1], "train_overrides": {"full": {"lr": 0.003}}}, "bench.lr_grids.full"),
    ({"lr_grids": {"full": [0.01]}, "train_overrides": {"full": {"lr": 0.003}}}, "bench.lr_grids.full"),
    ({"convergence_fractions": [0.5, 1.5]}, "(0, 1]"),
    ({"eval_subsample": -1}, "bench.eval_subsample"),
])
def test_bad_grid_settings_are_recipe_errors(make_recipe, bench, message):
    with pytest.raises(EdgetoolError) as exc:
        make_recipe("badgrid", bench=bench)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_each_method_gets_its_own_grid_or_its_one_rate(make_recipe):
    recipe = make_recipe("grids", bench={"lr_grid": [0.03, 0.001], "lr_grids": {"full": [0.0003, 0.001]}})
    grids = rate_grids(recipe, method_configs(recipe, ["full", "head", "ttlora"]))
    assert grids == {"full": [0.0003, 0.001], "head": [0.001, 0.03], "ttlora": [0.001, 0.03]}  # sorted
    plain = make_recipe("nogrid", bench={"train_overrides": {"head": {"lr": 0.05}}})
    assert rate_grids(plain, method_configs(plain, ["full", "head"])) == {"full": [0.01], "head": [0.05]}


@pytest.mark.parametrize("data", [{"val_shots": 0}, {"target_shots": None}])
def test_selection_without_validation_windows_is_refused(make_recipe, tmp_path, data):
    recipe = make_recipe("noval", data=data, **TINY)
    res = CliRunner().invoke(main, ["bench", str(recipe.source), "--methods", "head", "--seeds", "1",
                                    "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.startswith("edgetool:")]
    assert len(lines) == 1 and "data.val_shots" in lines[0] and "data.val_domains" in lines[0], res.output
    assert not (tmp_path / "o").exists()


def _selection_inputs(recipe, n_seeds=2):
    data = load_data(recipe.data, recipe.seed)
    base, head_name, _ = load_base_model(recipe, data, echo=None)
    configs = method_configs(recipe, ["head", "ttlora"])
    bundles = [seed_data(recipe, i, data) for i in range(n_seeds)]
    return configs, rate_grids(recipe, configs), base, head_name, [recipe.seed + i for i in range(n_seeds)], bundles


def _poisoned(data):
    """The bundle with a test split no one could score well on: NaN windows, every label changed."""
    test = data.target_test
    return replace(data, target_test=replace(test, X=np.full_like(test.X, np.nan), y=(test.y + 1) % data.num_classes))


def test_selection_runs_never_see_the_test_split(make_recipe, tmp_path):
    """Instrumented: every window any model is run on during selection (training and scoring) is a shot or a
    validation window, and the runs' inputs hold no test or source window. Poisoned: a test split of NaNs
    with wrong labels changes nothing chosen."""
    recipe = make_recipe("select", **TINY)
    configs, grids, base, head_name, seeds, bundles = _selection_inputs(recipe)
    for view in map(selection_view, bundles):
        assert len(view.target_test) == 0 and len(view.source_train) == 0
        assert len(view.target_val) > 0 and len(view.target_train) > 0

    shape = bundles[0].target_test.X.shape[1:]
    seen = []

    def record(module, args):
        if args and torch.is_tensor(args[0]) and tuple(args[0].shape[1:]) == shape:
            seen.extend(x.numpy().tobytes() for x in args[0].detach())

    hook = register_module_forward_pre_hook(record)
    try:
        with RunPool(1, tmp_path) as pool:
            clean = select_rates(configs, grids, base, head_name, seeds, bundles, pool)
    finally:
        hook.remove()
    rows = lambda split: {x.tobytes() for x in split.X}  # noqa: E731
    val = set().union(*(rows(b.target_val) for b in bundles))
    shots = set().union(*(rows(b.target_train) for b in bundles))
    test = set().union(*(rows(b.target_test) for b in bundles))
    assert seen and set(seen) <= val | shots
    assert not set(seen) & test
    assert val <= set(seen)  # the validation windows were scored

    # The same instrumentation for the poisoned run: a global hook sends training down the plain autograd path
    # instead of the lean step (equal gradients, but not bit for bit), and the comparison is exact.
    hook = register_module_forward_pre_hook(lambda module, args: None)
    try:
        with RunPool(1, tmp_path) as pool:
            poisoned = select_rates(configs, grids, base, head_name, seeds, [_poisoned(b) for b in bundles], pool)
    finally:
        hook.remove()
    assert poisoned == clean
    assert set(clean) == {"head", "ttlora"} and all(c["lr"] in (0.001, 0.03) for c in clean.values())


def test_a_diverging_rate_is_recorded_and_never_chosen(make_recipe, tmp_path):
    recipe = make_recipe("diverge", train={"steps": 10, "lr": 0.01, "batch_size": 12, "eval_every": 5},
                         bench={"lr_grids": {"full": [0.001, 1e9]}})
    data = load_data(recipe.data, recipe.seed)
    base, head_name, _ = load_base_model(recipe, data, echo=None)
    configs = method_configs(recipe, ["full"])
    with RunPool(1, tmp_path) as pool:
        chosen = select_rates(configs, rate_grids(recipe, configs), base, head_name, [0], [data], pool)
    assert chosen["full"]["lr"] == 0.001
    assert chosen["full"]["grid"][1] == {"lr": 1e9, "val_f1_mean": None, "val_f1_std": None, "val_loss_mean": None,
                                         "val_f1_per_seed": [None], "diverged_seeds": 1}
    assert chosen["full"]["grid"][0]["val_loss_mean"] > 0
    with RunPool(1, tmp_path) as pool, pytest.raises(EdgetoolError, match=r"'full' diverged at every learning rate"):
        select_rates(configs, {"full": [1e9, 1e10]}, base, head_name, [0], [data], pool)


@pytest.mark.slow
def test_bench_reports_the_grid_and_the_chosen_rate(make_recipe, tmp_path):
    recipe = make_recipe("grid", **TINY)
    out = tmp_path / "b"
    res = CliRunner().invoke(main, ["bench", str(recipe.source), "--methods", "head,ttlora", "--seeds", "2",
                                    "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "bench.json").read_text())
    assert result["meta"]["selection"]["grids"] == {"head": [0.001, 0.03], "ttlora": [0.001, 0.03]}
    for row in result["rows"]:
        assert row["lr_selected_on"] == "validation" and [g["lr"] for g in row["lr_grid"]] == [0.001, 0.03]
        best = max(row["lr_grid"], key=lambda g: g["val_f1_mean"])
        floor = best["val_f1_mean"] - best["val_f1_std"] / np.sqrt(len(best["val_f1_per_seed"]))
        chosen = next(g for g in row["lr_grid"] if g["val_f1_mean"] >= floor)
        assert row["lr"] == chosen["lr"] == result["meta"]["selection"]["selected"][row["method"]]
        # the reported runs at the chosen rate are the selection runs again: same validation F1, seed by seed
        assert row["val_f1_per_seed"] == chosen["val_f1_per_seed"]
        assert row["train"]["lr"] == row["lr"]
        # the test split is scored at the chosen rate only
        assert all(set(g) == {"lr", "val_f1_mean", "val_f1_std", "val_loss_mean", "val_f1_per_seed", "diverged_seeds"}
                   for g in row["lr_grid"])
    table = (out / "bench.md").read_text()
    assert "## Learning rate, chosen on the validation split" in table and "| lr 0.001 | lr 0.03 |" in table
    for row in result["rows"]:  # with two rates the choice is always an end of the grid, and the table says so
        edge = "smallest" if row["lr"] == 0.001 else "largest"
        assert f"| {row['lr']:g} ({edge} in grid) | {row['f1_mean']:.3f} ± {row['f1_std']:.3f} |" in table
    assert (out / "val_f1_vs_lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shipped_bench_recipes_choose_rates_on_a_validation_split_for_every_seed():
    from toolchain.recipe import load_recipe

    paths = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("bench-*.yaml"))
    assert len(paths) == 4
    for path in paths:
        recipe = load_recipe(path)
        assert len(recipe.bench.lr_grid) >= 3 and recipe.train.lr in recipe.bench.lr_grid
        base = load_data(recipe.data, recipe.seed)
        for i in range(recipe.bench.seeds):
            data = seed_data(recipe, i, base)
            # 2 validation windows per class, none of them a shot (BasicMotions: one window = one recording)
            assert np.bincount(data.target_val.y, minlength=data.num_classes).tolist() == [2] * data.num_classes, path.name
            shots = {x.tobytes() for x in data.target_train.X}
            assert not any(x.tobytes() in shots for x in data.target_val.X)
