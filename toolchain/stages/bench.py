"""Stage `bench`: every adaptation method on the recipe's source -> target protocol, same budget, each at
a learning rate chosen on the validation split.

Two phases. Selection (toolchain.bench.selection): every method with a learning-rate grid trains at each rate on
every seed and is scored on the validation split only; its rate is the one with the best mean final
validation macro-F1. Report: every method trains again at its chosen rate on every seed and is measured;
only here is the test split used. For each seed the methods see the same few target shots and the same
batches in the same order (`fit`'s order depends only on the seed, batch size and step count, which
`BenchConfig` keeps shared), so differences between rows come from the methods. Runs go to `--workers`
processes or to Ray tasks (toolchain.bench.executors); each depends only on its (method, seed, rate). Several
recipes run in one call, one after another in one pool, each into its own directory. Output directory:
  bench.json        one row per method: mean/std over seeds of every measured figure (+ per-seed values), the
                    learning-rate grid with validation F1 per rate, and convergence to headroom targets
  bench.md          the same as markdown tables
  f1_vs_step.png    macro-F1 (fixed subsample of the test split) against training step, mean and seed spread
  f1_vs_params.png  final macro-F1 against trainable parameters
  val_f1_vs_lr.png  validation macro-F1 against learning rate, per method (when rates were chosen)

How each figure is measured: toolchain.bench.report.MEASUREMENT (also written into bench.json). Zero
inference overhead is the same proof fuse-export makes (toolchain.proof.fusion.prove_fusion), plus the
fused model's ONNX graph compared with the original's.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from tqdm import tqdm

from ..console import say, say_notes
from ..artifacts import (atomic_dir, atomic_write_json, atomic_write_text, claimed_output, default_output,
                         remove_stale_scratch, scratch_dir)
from ..models.assembly import build_adapted, check_model_io, ensure_base_model, original_model
from ..bench.executors import LocalExecutor
from ..bench.jobs import Job, ReportInputs, curve_subsample, report_run
from ..bench.report import (MEASUREMENT, add_cost_ratios, convergence_table, count_text, markdown_table, mean_std, selection_fields,
                           selection_table, summarise)
from ..bench.convergence import convergence
from ..data.protocol import DataBundle, load_data
from ..training.device import training_device
from ..enginedir import onnx_name
from ..errors import EdgetoolError, InternalError
from ..proof.export import export_onnx
from ..methods.settings import MethodSettings, method_names, settings_for
from ..metrics import evaluate
from ..models.backbones import count_params, model_name
from ..plots import plot_f1_curves, plot_lr_grid, plot_scatter
from ..recipe import OptimConfig, Recipe, check_inputs_exist, format_validation_error
from ..bench.selection import CRITERION as SELECTION_CRITERION
from ..bench.selection import check_validation, rate_grids, select_rates
from ..training.cost import full_step_cost

# What a bench directory always holds: `--out` may replace only a directory that has them.
BENCH_FILES = ("bench.json", "bench.md")


def parse_methods(text: str | None, default: list[str]) -> list[str]:
    if text is None:
        return list(default)
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise EdgetoolError("--methods is empty; give a comma-separated list such as full,head,ttlora")
    return list(dict.fromkeys(names))


def method_configs(recipe: Recipe, methods: list[str]) -> dict[str, tuple[MethodSettings, OptimConfig]]:
    """Per method: the recipe's method settings that this method also has, with bench.method_overrides[name]
    applied, and recipe.train with bench.train_overrides[name] applied (never the step budget, batch size
    or evaluation grid)."""
    known = method_names()
    for name in methods:
        if name not in known:
            raise EdgetoolError(f"unknown method '{name}' in --methods (known: {','.join(sorted(known))})")
    where = f"recipe {recipe.source}" if recipe.source else "recipe"
    out = {}
    for name in methods:
        overrides = recipe.bench.method_overrides.get(name, {})
        if "name" in overrides:
            raise EdgetoolError(f"{where}: field 'bench.method_overrides.{name}.name': the method name comes from the key")
        try:
            mcfg = settings_for(name, recipe.method.model_dump(), overrides)
        except ValidationError as exc:
            raise EdgetoolError(format_validation_error(exc, f"{where}: bench.method_overrides.{name}")) from None
        try:
            tcfg = OptimConfig.model_validate({**recipe.train.model_dump(), **recipe.bench.train_overrides.get(name, {})})
        except ValidationError as exc:
            raise EdgetoolError(format_validation_error(exc, f"{where}: bench.train_overrides.{name}")) from None
        out[name] = (mcfg, tcfg)
    return out


def seed_data(recipe: Recipe, index: int, base_data: DataBundle) -> DataBundle:
    """The protocol for seed `index`: a fresh draw of the few target shots when bench.resample_shots,
    refused when that would also change the source split the base was pretrained on."""
    if index == 0 or not recipe.bench.resample_shots:
        return base_data
    data = load_data(recipe.data, recipe.seed + index)
    same_source = (np.array_equal(data.source_train.X, base_data.source_train.X)
                   and np.array_equal(data.source_train.y, base_data.source_train.y))
    if not same_source:
        raise EdgetoolError("bench.resample_shots: in this recipe the data seed also changes the source split the base "
                            "was pretrained on (target windows could leak into pretraining); set bench.resample_shots: false")
    return data


class _Progress:
    """A bar over all runs on a terminal; otherwise (or with --quiet) one line per finished run."""

    def __init__(self, total: int, name: str, seeds: list[int], progress: bool, echo):
        self.lines = echo is not None and (not progress or not sys.stderr.isatty())
        self.echo, self.seeds, self.total, self.done = echo, seeds, total, 0
        self.bar = tqdm(total=total, desc=f"bench {name}", unit="run", disable=True if self.lines or not progress else None)

    def _finish(self, text: str) -> None:
        self.done += 1
        self.bar.update(1)
        if self.lines:
            self.echo(f"[{self.done}/{self.total}] {text}")

    def selected(self, job: Job, r: dict[str, Any]) -> None:
        val = f"{r['val_f1']:.3f}" if r["val_f1"] is not None else "— (diverged)"
        self._finish(f"select {job.method} seed {self.seeds[job.seed_index]} lr {job.lr:g}: val F1 {val} "
                     f"({r['seconds']:.1f} s)")

    def reported(self, job: Job, r: dict[str, Any]) -> None:
        val = f"{r['val_f1']:.3f}" if r["val_f1"] is not None else "—"
        self._finish(f"report {job.method} seed {self.seeds[job.seed_index]} lr {job.lr:g}: val F1 {val}, "
                     f"test F1 {r['f1']:.3f} ({r['seconds']:.1f} s)")

    def close(self) -> None:
        self.bar.close()


@dataclass
class _Planned:
    recipe: Recipe
    methods: list[str]
    n_seeds: int
    configs: dict[str, tuple[MethodSettings, OptimConfig]]
    grids: dict[str, list[float]]
    out_dir: Path


def bench_outputs(recipes: list[Recipe], out: Path | None) -> list[Path]:
    """Each recipe's bench directory: `out` for one recipe; for several, OUT/<recipe name> (default
    runs/bench/<recipe name>), refused when two recipes have one name."""
    if len(recipes) == 1:
        return [Path(out) if out is not None else default_output(Path("runs") / "bench", recipes[0].name)]
    seen: dict[str, Recipe] = {}
    for r in recipes:
        if r.name in seen:
            raise EdgetoolError(f"recipes {seen[r.name].source} and {r.source} have the same name '{r.name}': their "
                                "benches would share one output directory; rename one (recipe field 'name')")
        seen[r.name] = r
    root = Path(out) if out is not None else Path("runs") / "bench"
    return [default_output(root, r.name) for r in recipes]


def _plan(recipe: Recipe, methods: list[str] | None, seeds: int | None, out_dir: Path) -> _Planned:
    """Every check that needs no training, so a bad recipe fails before any recipe's work starts."""
    check_inputs_exist(recipe)
    training_device(recipe.train.device, recipe.train.precision, "train")  # refuse before any work
    methods = list(methods) if methods is not None else list(recipe.bench.methods)
    n_seeds = recipe.bench.seeds if seeds is None else seeds
    if n_seeds <= 0:
        raise EdgetoolError(f"--seeds must be a positive number of seeds, got {n_seeds}")
    configs = method_configs(recipe, methods)
    return _Planned(recipe, methods, n_seeds, configs, rate_grids(recipe, configs), Path(out_dir))


def run_bench(recipe: Recipe, methods: list[str] | None = None, seeds: int | None = None, out_dir: Path | None = None,
              progress: bool = True, echo=print, workers: int = 1, executor=None) -> Path:
    """Choose each method's learning rate on the validation split, then run every method at its rate over
    `seeds` seeds with the recipe's shared budget; write the bench directory. `executor` (default: a local
    pool of `workers` processes, toolchain.bench.executors) says where the training runs go."""
    return run_benches([recipe], methods, seeds, out_dir, progress, echo,
                       executor if executor is not None else LocalExecutor(workers))[0]


def run_benches(recipes: list[Recipe], methods: list[str] | None = None, seeds: int | None = None,
                out: Path | None = None, progress: bool = True, echo=print, executor=None) -> list[Path]:
    """run_bench for several recipes in one pool (one Ray cluster runs them all), one after another, each
    into its own directory (bench_outputs). Every recipe and output is checked before any work starts; a
    failure stops the call, and the benches finished before it stay complete."""
    executor = executor if executor is not None else LocalExecutor()
    executor.check()
    planned = [_plan(r, methods, seeds, o) for r, o in zip(recipes, bench_outputs(recipes, out))]
    with contextlib.ExitStack() as claims:
        for p in planned:
            p.out_dir = claims.enter_context(claimed_output(p.out_dir, BENCH_FILES, "an edgetool bench directory",
                                                            p.recipe.input_files()))
        written = []
        with executor.open() as pool:
            for p in planned:
                began = time.perf_counter()
                try:
                    written.append(_run_bench(p.recipe, p.methods, p.n_seeds, p.configs, p.grids, p.out_dir, progress,
                                              echo, pool.for_recipe(p.recipe.train.device), began))
                except EdgetoolError as exc:
                    if len(planned) > 1:  # say which recipe's bench failed
                        exc.args = (f"recipe {p.recipe.name}: {exc}",)
                    raise
        return written


def _run_bench(recipe: Recipe, methods: list[str], n_seeds: int, configs: dict[str, tuple[MethodSettings, OptimConfig]],
               grids: dict[str, list[float]], out_dir: Path, progress: bool, echo, pool, began: float) -> Path:
    base_data = load_data(recipe.data, recipe.seed)
    say_notes(echo, base_data.notes)
    base, head_name, _ = ensure_base_model(recipe, base_data, progress, echo)
    original = original_model(base, head_name, base_data)
    check_model_io(original, base_data)
    total = count_params(original)
    # Inject every method once before any training: one that does not fit this model (a layer selection
    # matching no conv, a linear adapter on grouped convs only) fails now, not after the others have run.
    for name, (mcfg, _) in configs.items():
        say_notes(echo, build_adapted(mcfg, base, head_name, base_data)[1].notes, prefix=f"{name}: ")

    seed_values = [recipe.seed + i for i in range(n_seeds)]
    bundles = [seed_data(recipe, i, base_data) for i in range(n_seeds)]
    if any(len(g) > 1 for g in grids.values()):
        check_validation(recipe, bundles)
    n_select = sum(len(g) for g in grids.values() if len(g) > 1) * n_seeds
    shown = _Progress(n_select + len(methods) * n_seeds, recipe.name, seed_values, progress, echo)
    remove_stale_scratch()  # what a killed bench left in $TMPDIR
    try:
        chosen = select_rates(configs, grids, base, head_name, seed_values, bundles, pool, shown.selected)
        rates = {m: chosen[m]["lr"] if m in chosen else grids[m][0] for m in methods}
        curve_splits = [curve_subsample(b.target_test, recipe.bench.eval_subsample, recipe.seed) for b in bundles]
        with scratch_dir("bench") as tmp:
            original_onnx = export_onnx(original, torch.from_numpy(base_data.target_test.X[:1]),
                                        Path(tmp) / onnx_name("original", "fp32"), recipe.fuse.opset)
        inputs = ReportInputs(recipe, base, head_name, configs, seed_values, bundles, curve_splits, original, original_onnx)
        jobs = [Job(m, i, rates[m]) for m in methods for i in range(n_seeds)]
        reports = pool.run(report_run, jobs, inputs, shown.reported)
    finally:
        shown.close()

    runs_of = {m: [reports[Job(m, i, rates[m])] for i in range(n_seeds)] for m in methods}
    rows = []
    for name, runs in runs_of.items():
        if len({r["trainable_params"] for r in runs}) != 1:
            raise InternalError(f"method '{name}' trains a different number of parameters on different seeds")
        once = {**runs[0]["once"], "trainable_params": runs[0]["trainable_params"], "total_params": total,
                "trainable_pct": 100.0 * runs[0]["trainable_params"] / total}
        row = summarise(name, runs, once)
        row.update(selection_fields(rates[name], grids[name], chosen.get(name), runs))
        rows.append(row)
    zero_shot = [evaluate(original, b.target_test)[0] for b in bundles]
    zero_shot_curve = [evaluate(original, s)[0] for s in curve_splits]
    reference = recipe.method.name if recipe.method.name in methods else None
    conv_run, conv_rows = convergence({m: [r["curve"] for r in runs] for m, runs in runs_of.items()},
                                      zero_shot_curve, recipe.bench.convergence_fractions, reference)
    for row in rows:
        row["convergence"] = conv_rows[row["method"]]

    if "full" in methods:
        full_row = next(r for r in rows if r["method"] == "full")
        reference = {"peak_memory_bytes": full_row["peak_memory_bytes_mean"],
                     "wall_seconds_per_step": full_row["wall_seconds_per_step_mean"], "measured": "the full row"}
    else:
        # The ratios are the point of the cost columns: full fine-tuning's step is measured on its own
        # (first seed's data, one metered step for memory, the same timed steps) when it is not benched.
        mcfg, tcfg = method_configs(recipe, ["full"])["full"]
        reference = {**full_step_cost(mcfg, tcfg, base, head_name, base_data, recipe.seed, recipe.bench.timing_steps),
                     "measured": "separately on the first seed (full is not among the benched methods)"}
    add_cost_ratios(rows, reference)
    device_info = runs_of[methods[0]][0]["device"]
    executor_info = pool.describe()

    zs_mean, zs_std = mean_std(zero_shot)
    scenario = (f"new classes ({base_data.num_source_classes} source classes -> {base_data.num_classes} target classes)"
                if base_data.num_classes > base_data.num_source_classes else "distribution shift")
    result = {
        "meta": {
            "recipe": recipe.name,
            "recipe_path": str(recipe.source) if recipe.source else None,
            "scenario": scenario,
            "arch": model_name(recipe.model),  # the factory and its arch, not the word "factory"
            "width": recipe.model.width,
            "total_params": total,
            "class_names": base_data.class_names,
            "target_train_windows": len(base_data.target_train),
            "target_val_windows": len(base_data.target_val),
            "target_test_windows": len(base_data.target_test),
            "curve_windows": [len(s) for s in curve_splits],
            "protocol": base_data.protocol_record(),
            "seeds": seed_values,
            "resample_shots": recipe.bench.resample_shots,
            "steps": recipe.train.steps,
            "batch_size": recipe.train.batch_size,
            "eval_every": recipe.train.eval_every,
            "target_f1": recipe.train.target_f1,
            "zero_shot_f1_mean": zs_mean,
            "zero_shot_f1_std": zs_std,
            "selection": {"criterion": SELECTION_CRITERION, "grids": grids, "selected": rates},
            "convergence": conv_run,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),  # this process's: pretraining a missing base used it
            "threads_per_run": 1,
            "workers": executor_info.get("workers", executor_info.get("cpus")),  # runs at once, at most
            "executor": executor_info,
            "wall_seconds": time.perf_counter() - began,
            "device": device_info,
            "full_reference": reference,
            "measurement": MEASUREMENT,
        },
        "rows": rows,
    }
    table = markdown_table(result) + "\n" + selection_table(result) + "\n" + convergence_table(result)
    seeds_text = count_text(n_seeds, "seed")
    with atomic_dir(out_dir) as tmp:
        atomic_write_json(tmp / "bench.json", result)
        atomic_write_text(tmp / "bench.md", table)
        plot_f1_curves({r["method"]: [(p["step"], p["f1_mean"], p["f1_std"]) for p in r["curve_mean"]] for r in rows},
                       tmp / "f1_vs_step.png", f"{recipe.name}: mean ± std over {seeds_text}", target=recipe.train.target_f1,
                       ylabel=f"macro-F1 ({_curve_label(curve_splits, bundles)})")
        plot_scatter({r["method"]: (r["trainable_params"], r["f1_mean"], r["f1_std"]) for r in rows}, tmp / "f1_vs_params.png",
                     "trainable parameters", f"final macro-F1 (target test, mean ± std over {seeds_text})",
                     f"{recipe.name}: F1 vs trainable parameters")
        if chosen:
            plot_lr_grid({m: [(g["lr"], g["val_f1_mean"], g["val_f1_std"]) for g in c["grid"]] for m, c in chosen.items()},
                         {m: c["lr"] for m, c in chosen.items()}, tmp / "val_f1_vs_lr.png",
                         f"{recipe.name}: validation F1 per learning rate ({seeds_text})")
    say(echo, table.rstrip())
    say(echo, f"-> {out_dir} ({time.perf_counter() - began:.0f} s)")
    return out_dir


def _curve_label(curve_splits, bundles) -> str:
    if all(len(s) == len(b.target_test) for s, b in zip(curve_splits, bundles)):
        return "target test split"
    return f"fixed subsample of {len(curve_splits[0])} target test windows"
