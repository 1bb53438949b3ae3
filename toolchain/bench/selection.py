"""Choosing each method's learning rate on the validation split, never on the test split.

Criterion: the final macro-F1 on data.target_val after the full step budget, mean over the bench's seeds;
one rate per method (the same for all of its seeds). The rate chosen is the smallest whose mean is within
one standard error of the best mean (the best rate's sample standard deviation over seeds / sqrt(seeds)):
the "one-standard-error rule" of model selection (Hastie, Tibshirani & Friedman, The Elements of
Statistical Learning, 7.10), with the smaller rate as the more conservative choice (it moves the
pretrained model less). A few validation windows per seed make the means coarse and noisy (with 8 windows
one prediction moves a seed's F1 by about 0.1); picking the strict maximum would let differences far
below that noise, down to float rounding in training, decide the rate. Exact ties go to the smaller rate
too. A rate at which any seed's loss diverged is not eligible: a rate that blows up on some draws is not
one a user could pick. Final rather than best-step F1: the bench reports the final model, and picking a
step would be a second choice made on a few validation windows."""

from __future__ import annotations

import math
from typing import Any, Callable

from .jobs import Job, RunPool, SelectionInputs, selection_run, selection_view
from .report import mean_std
from ..data.protocol import DataBundle
from ..errors import EdgetoolError
from ..methods.settings import MethodSettings
from ..recipe import OptimConfig, Recipe

CRITERION = ("final macro-F1 on the validation split (data.target_val) after train.steps, mean over seeds; one rate "
             "per method: the smallest rate whose mean is within one standard error (sample std over seeds / "
             "sqrt(seeds)) of the best rate's mean; rates where any seed diverged are not eligible")


def rate_grids(recipe: Recipe, configs: dict[str, tuple[MethodSettings, OptimConfig]]) -> dict[str, list[float]]:
    """Per method, the rates it is tried at: bench.lr_grids[method], else bench.lr_grid, else its one rate."""
    return {m: recipe.bench.rate_grid(m) or [tcfg.lr] for m, (_, tcfg) in configs.items()}


def check_validation(recipe: Recipe, bundles: list[DataBundle]) -> None:
    """Refuse selection without validation windows (one line, naming the fields that give them)."""
    for i, data in enumerate(bundles):
        if len(data.target_val) == 0:
            seed = f" for data seed {recipe.seed + i}" if i else ""
            raise EdgetoolError("bench: choosing learning rates (bench.lr_grid / bench.lr_grids) needs a validation "
                                f"split, and this recipe's is empty{seed}; set data.val_shots (with data.target_shots) "
                                "or data.val_domains")


def choose(scores: dict[float, list[dict[str, Any]]]) -> tuple[float | None, list[dict[str, Any]]]:
    """(chosen rate, grid record) from per-rate, per-seed selection results."""
    grid = []
    for lr in sorted(scores):
        runs = scores[lr]
        diverged = sum(r["diverged"] is not None for r in runs)
        values = [r["val_f1"] for r in runs if r["val_f1"] is not None]
        mean, std = mean_std(values) if not diverged else (None, None)
        loss = mean_std([r["val_loss"] for r in runs])[0] if not diverged else None
        grid.append({"lr": lr, "val_f1_mean": mean, "val_f1_std": std, "val_loss_mean": loss,
                     "val_f1_per_seed": [r["val_f1"] for r in runs], "diverged_seeds": diverged})
    eligible = [g for g in grid if g["val_f1_mean"] is not None]
    if not eligible:
        return None, grid
    best = max(eligible, key=lambda g: g["val_f1_mean"])
    floor = best["val_f1_mean"] - best["val_f1_std"] / math.sqrt(len(best["val_f1_per_seed"]))
    # the grid is in increasing rate: the first rate at or above the floor is the smallest within one SE
    return next(g for g in eligible if g["val_f1_mean"] >= floor)["lr"], grid


def select_rates(configs: dict[str, tuple[MethodSettings, OptimConfig]], grids: dict[str, list[float]], base, head_name: str,
                 seeds: list[int], bundles: list[DataBundle], pool: RunPool,
                 on_done: Callable[[Job, dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
    """Per method with more than one rate: {"lr": chosen, "grid": [...]}. The runs see `selection_view`s of
    the bundles: the shots and the validation split, no test window."""
    inputs = SelectionInputs(base, head_name, configs, seeds, [selection_view(b) for b in bundles])
    jobs = [Job(m, i, lr) for m, grid in grids.items() if len(grid) > 1 for lr in grid for i in range(len(seeds))]
    results = pool.run(selection_run, jobs, inputs, on_done)
    chosen = {}
    for m, grid in grids.items():
        if len(grid) < 2:
            continue
        lr, record = choose({lr: [results[Job(m, i, lr)] for i in range(len(seeds))] for lr in grid})
        if lr is None:
            raise EdgetoolError(f"bench: method '{m}' diverged at every learning rate in its grid {grid} on at least "
                                f"one seed; add smaller rates (bench.lr_grids.{m})")
        chosen[m] = {"lr": lr, "grid": record}
    return chosen
