"""Stage `bench`: every adaptation method on the recipe's source -> target protocol, same budget.

For each seed the methods see the same few target shots and the same batches in the same order
(`fit`'s order depends only on the seed, batch size and step count, which `BenchConfig` keeps shared),
so differences between rows come from the methods. Output directory:
  bench.json        one row per method: mean/std over seeds of every measured figure (+ per-seed values)
  bench.md          the same as a markdown table
  f1_vs_step.png    mean macro-F1 on the target test split against training step, one line per method
  f1_vs_params.png  final mean macro-F1 against trainable parameters

How each figure is measured (also written into bench.json under "measurement"):
- FLOPs per training step: torch.utils.flop_counter.FlopCounterMode around one forward, one backward
  and one optimizer step on a fresh copy of the adapted model, batch = the recipe's batch size.
  It counts matmul/conv-type ops only (mm, addmm, bmm, convolution and its backward), 2 FLOPs per MAC;
  its grouped-conv weight-gradient formula (g times too high) is corrected (`grouped_conv_backward_fix`).
  Elementwise work (BatchNorm, activations, the optimizer's moment updates) is not counted by it;
  the optimizer's elementwise update is added as an explicit estimate (`OPTIMIZER_FLOPS_PER_ELEMENT`).
- Peak training memory: `fit`'s TrainResult.peak_memory_bytes (parameters + buffers, gradients,
  optimizer state after the first step, tensors autograd saved for backward via saved_tensors_hooks).
- Wall time per step: median of `bench.timing_steps` timed training steps (after 2 warm-up steps) on a
  copy of the adapted model; `fit`'s own time also includes its periodic evaluations.
- Adapter checkpoint size: bytes of torch.save(method.adapter_state(model)).
- Zero inference overhead: the method's fused model is exported to ONNX next to the method-free
  reference and the two graphs must be structurally identical (toolchain.export.compare_graph_structure).
"""

from __future__ import annotations

import copy
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from pydantic import ValidationError
from torch import nn
from tqdm import tqdm

from .adapt import build_adapted, check_model_io, ensure_base_model, reference_model
from .artifacts import atomic_dir, check_output_dir, atomic_write_json, atomic_write_text
from .cliutil import echo as _echo
from .cliutil import reports_errors
from .data import DataBundle, load_data
from .errors import EdgetoolError, NotMergeableError
from .export import compare_graph_structure, export_onnx
from .models import count_params
from .plots import plot_f1_curves, plot_scatter
from .recipe import (MethodConfig, OptimConfig, Recipe, format_validation_error, method_names, check_inputs_exist,
                     load_recipe)
from .train import EvalPoint, evaluate, fit, seed_everything

# Elementwise FLOPs per trainable element of one optimizer step (FlopCounterMode does not see them).
# Adam (torch, single-tensor path): exp_avg.lerp_ 3 + exp_avg_sq.mul_.addcmul_ 4 + sqrt/div/add eps 3
# + param.addcdiv_ 3 = 13; L2 weight decay adds grad + wd * param (2); AdamW's decoupled decay 1.
# SGD with momentum: buf.mul_.add_ 2 + param.add_(buf, alpha=-lr) 2 = 4 (+2 with weight decay).
OPTIMIZER_FLOPS_PER_ELEMENT = {"adam": 13, "adamw": 14, "sgd": 4}
WEIGHT_DECAY_FLOPS_PER_ELEMENT = {"adam": 2, "adamw": 0, "sgd": 2}

MEASUREMENT = {
    "flops_per_step": (
        "torch.utils.flop_counter.FlopCounterMode over one forward + backward + optimizer step on a fresh copy of "
        "the adapted model (batch = train.batch_size); counts matmul/conv-type ops (2 FLOPs per MAC; the grouped-conv "
        "weight-gradient formula corrected by 1/groups), not "
        "elementwise ops; flops_optimizer_estimate adds the optimizer's elementwise update "
        "(Adam 13, AdamW 14, SGD-momentum 4 FLOPs per trainable element, +2 with L2 weight decay); GaLore's "
        "projection matmuls are counted, its periodic SVD is not"),
    "peak_memory_bytes": (
        "measured on the first training step on CPU: bytes of parameters + buffers, gradients, optimizer state "
        "(after the step) and tensors autograd saves for backward (saved_tensors_hooks), storages counted once"),
    "wall_seconds_per_step": "median of timed training steps (after 2 warm-up) on a copy of the adapted model",
    "adapter_bytes": "len(torch.save(method.adapter_state(model)))",
    "zero_overhead": ("fused model exported to ONNX is structurally identical to the method-free reference "
                      "(toolchain.export.compare_graph_structure), checked on the first seed"),
    "std": "sample standard deviation over seeds (ddof=1; 0 for one seed)",
    "steps_to_target": "first evaluation step with macro-F1 >= train.target_f1; mean/std over the seeds that reached it",
}


# What a bench directory always holds: `--out` may replace only a directory that has them.
BENCH_FILES = ("bench.json", "bench.md")

# ---------------------------------------------------------------------------------------------- set-up


def parse_methods(text: str | None, default: list[str]) -> list[str]:
    if text is None:
        return list(default)
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise EdgetoolError("--methods is empty; give a comma-separated list such as full,head,ttlora")
    return list(dict.fromkeys(names))


def method_configs(recipe: Recipe, methods: list[str]) -> dict[str, tuple[MethodConfig, OptimConfig]]:
    """Per method: recipe.method with bench.method_overrides[name] applied, and recipe.train with
    bench.train_overrides[name] applied (never the step budget, batch size or evaluation grid)."""
    from .methods import METHODS
    from .methods import _load_all  # noqa: F401  (registers every built-in method)

    known = set(method_names())
    for name in methods:
        if name not in known:
            raise EdgetoolError(f"unknown method '{name}' in --methods (known: {','.join(sorted(known))})")
        if name not in METHODS:
            raise EdgetoolError(f"method '{name}' is not implemented in this installation (available: {','.join(sorted(METHODS))})")
    where = f"recipe {recipe.source}" if recipe.source else "recipe"
    out = {}
    for name in methods:
        overrides = recipe.bench.method_overrides.get(name, {})
        if "name" in overrides:
            raise EdgetoolError(f"{where}: field 'bench.method_overrides.{name}.name': the method name comes from the key")
        try:
            mcfg = MethodConfig.model_validate({**recipe.method.model_dump(), **overrides, "name": name})
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


# ---------------------------------------------------------------------------------------------- measurements


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor) -> None:
    loss = nn.functional.cross_entropy(model(xb), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _batch(split, cfg: OptimConfig) -> tuple[torch.Tensor, torch.Tensor]:
    bs = min(cfg.batch_size, len(split))
    return torch.from_numpy(split.X[:bs]), torch.from_numpy(split.y[:bs])


def grouped_conv_backward_fix() -> dict:
    """A FlopCounterMode custom_mapping correcting its grouped-conv weight gradient, or {} if not needed.

    torch's stock formula for aten.convolution_backward counts dL/dW of a conv with `groups` g as if
    every output channel saw all C_in inputs: g times too many FLOPs (a depthwise conv's weight
    gradient is counted C times over; see pytorch/pytorch PR 183405). The weight gradient of a conv has
    exactly as many MACs as its forward, so the correction divides that term by g. The stock formula is
    probed first, so a torch that already divides by groups is left alone."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    raw = getattr(flop_counter.flop_registry.get(aten.convolution_backward), "__wrapped__", None)
    if raw is None:
        return {}
    # depthwise probe: N=2, C=4, groups=4, k=3, T=10 -> dL/dW takes 2 * 2*4*1*3*10 FLOPs, like the forward
    probe = raw([2, 4, 10], [2, 4, 10], [4, 1, 3], None, [1], [1], [1], False, [0], 4, [False, True, False],
                out_shape=[None, [4, 1, 3], None])
    if probe == 2 * 2 * 4 * 1 * 3 * 10:
        return {}

    def conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                           output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
        args = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups)
        total = 0
        if output_mask[0]:
            total += raw(*args, [True, False, False], out_shape=out_shape)
        if output_mask[1]:
            total += raw(*args, [False, True, False], out_shape=out_shape) // groups
        return total

    return {aten.convolution_backward: conv_backward_flop}


def measure_step_flops(model: nn.Module, method, cfg: OptimConfig, split) -> dict[str, int]:
    """Counted FLOPs of one training step, split into forward / backward / optimizer, plus the estimate
    of the optimizer's elementwise work. `model` is copied; the caller's model is not touched."""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(model)
    opt = method.build_optimizer(model, cfg)
    method.set_train_mode(model)
    xb, yb = _batch(split, cfg)
    fix = grouped_conv_backward_fix()
    with FlopCounterMode(display=False, custom_mapping=fix) as fc:
        loss = nn.functional.cross_entropy(model(xb), yb)
    forward = fc.get_total_flops()
    opt.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False, custom_mapping=fix) as fc:
        loss.backward()
    backward = fc.get_total_flops()
    with FlopCounterMode(display=False, custom_mapping=fix) as fc:
        opt.step()
    optimizer_counted = fc.get_total_flops()
    trainable = sum(p.numel() for _, p in method.trainable_parameters(model))
    per_element = OPTIMIZER_FLOPS_PER_ELEMENT[cfg.optimizer]
    if cfg.weight_decay > 0:
        per_element += WEIGHT_DECAY_FLOPS_PER_ELEMENT[cfg.optimizer]
    optimizer_estimate = per_element * trainable
    return {
        "flops_forward": int(forward),
        "flops_backward": int(backward),
        "flops_optimizer_counted": int(optimizer_counted),
        "flops_optimizer_estimate": int(optimizer_estimate),
        "flops_per_step": int(forward + backward + optimizer_counted + optimizer_estimate),
    }


def time_train_steps(model: nn.Module, method, cfg: OptimConfig, split, steps: int, warmup: int = 2) -> float:
    """Median wall seconds of one training step (forward, backward, optimizer) on a copy of `model`."""
    model = copy.deepcopy(model)
    opt = method.build_optimizer(model, cfg)
    method.set_train_mode(model)
    xb, yb = _batch(split, cfg)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        _train_step(model, opt, xb, yb)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return float(statistics.median(times))


def adapter_bytes(method, model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(method.adapter_state(model), buf)
    return len(buf.getvalue())


def fusion_check(method, adapted: nn.Module, reference_onnx: Path, sample: torch.Tensor, test_X: np.ndarray,
                 workdir: Path, opset: int) -> dict[str, Any]:
    """Merge the trained adapter; for a mergeable method export the fused model to ONNX and compare its
    graph with the method-free reference's (identical graph = zero inference overhead)."""
    try:
        fused = method.merge(adapted)
    except NotMergeableError as exc:
        return {"mergeable": False, "zero_overhead": False, "overhead_reason": str(exc), "fused_max_abs_diff": None}
    x = torch.from_numpy(test_X)
    with torch.no_grad():
        diff = float((fused.eval()(x) - adapted.eval()(x)).abs().max())
    row: dict[str, Any] = {"mergeable": True, "fused_max_abs_diff": diff}
    path = workdir / f"fused-{method.name}.onnx"
    export_onnx(fused, sample, path, opset)
    report = compare_graph_structure(reference_onnx, path)
    row["zero_overhead"] = bool(report.identical)
    row["overhead_reason"] = None if report.identical else "fused graph differs from the reference: " + "; ".join(report.differences[:3])
    return row


# ---------------------------------------------------------------------------------------------- statistics


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = float(np.mean(values))
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return mean, std


def mean_curve(curves: list[list[EvalPoint]]) -> list[dict[str, float]]:
    """Mean/std of macro-F1 per evaluation step; every seed evaluates at the same steps (shared train config)."""
    steps = [p.step for p in curves[0]]
    if any([p.step for p in c] != steps for c in curves):
        raise EdgetoolError("internal: seeds were evaluated at different steps")
    out = []
    for i, step in enumerate(steps):
        m, s = _mean_std([c[i].f1 for c in curves])
        out.append({"step": step, "f1_mean": m, "f1_std": s})
    return out


def summarise(name: str, runs: list[dict[str, Any]], once: dict[str, Any]) -> dict[str, Any]:
    """One bench.json row from the per-seed runs of a method and its seed-independent figures."""
    row: dict[str, Any] = {"method": name, "mergeable": once["mergeable"]}
    for key in ("f1", "accuracy", "peak_memory_bytes", "wall_seconds_per_step", "train_seconds", "adapter_bytes"):
        row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([r[key] for r in runs])
    reached = [r["steps_to_target"] for r in runs if r["steps_to_target"] is not None]
    row["steps_to_target_mean"], row["steps_to_target_std"] = _mean_std(reached)
    row["steps_to_target_reached"] = len(reached)
    row.update(once)
    row["seeds"] = [r["seed"] for r in runs]
    row["f1_per_seed"] = [r["f1"] for r in runs]
    row["accuracy_per_seed"] = [r["accuracy"] for r in runs]
    row["steps_to_target_per_seed"] = [r["steps_to_target"] for r in runs]
    row["peak_memory_breakdown"] = runs[0]["memory_breakdown"]
    row["curve_mean"] = mean_curve([r["curve"] for r in runs])
    return row


# ---------------------------------------------------------------------------------------------- tables


def _pm(mean: float | None, std: float | None, fmt: str) -> str:
    if mean is None:
        return "—"
    return f"{mean:{fmt}} ± {std:{fmt}}"


def _si(n: float) -> str:
    for div, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f} "


def _bytes(n: float) -> str:
    for div, unit in ((1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def markdown_table(result: dict[str, Any]) -> str:
    meta = result["meta"]
    n = len(meta["seeds"])
    lines = [
        f"# edgetool bench: {meta['recipe']}",
        "",
        f"{meta['scenario']}; backbone {meta['arch']} (width {meta['width']}, {meta['total_params']:,} parameters); "
        f"{meta['target_train_windows']} labelled target windows; {meta['steps']} steps per method, batch "
        f"{meta['batch_size']}; {n} seeds {meta['seeds']}; zero-shot target macro-F1 "
        f"{_pm(meta['zero_shot_f1_mean'], meta['zero_shot_f1_std'], '.3f')}.",
        "",
        f"| method | macro-F1 | accuracy | trainable | % of model | FLOPs/step (fwd+bwd+opt) | peak train memory | "
        f"steps to F1 ≥ {meta['target_f1']:g} (reached) | ms/step | adapter bytes | fused: zero overhead |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        steps = _pm(r["steps_to_target_mean"], r["steps_to_target_std"], ".0f") if r["steps_to_target_reached"] else "never"
        if r["zero_overhead"] is True:
            fused = "yes (graph identical)"
        elif r["mergeable"]:
            fused = "no (graph differs)"
        else:
            fused = "no (not mergeable)"
        lines.append(
            f"| {r['method']} | {_pm(r['f1_mean'], r['f1_std'], '.3f')} | {_pm(r['accuracy_mean'], r['accuracy_std'], '.3f')} "
            f"| {r['trainable_params']:,} | {r['trainable_pct']:.2f} % | {_si(r['flops_per_step'])}FLOP "
            f"| {_bytes(r['peak_memory_bytes_mean'])} | {steps} ({r['steps_to_target_reached']}/{n}) "
            f"| {1000 * r['wall_seconds_per_step_mean']:.1f} | {r['adapter_bytes_mean']:,.0f} | {fused} |"
        )
    lines += [
        "",
        "Mean ± sample std over seeds. FLOPs: torch.utils.flop_counter (matmul/conv-type ops, forward + backward + "
        "optimizer) plus an estimate of the optimizer's elementwise update; peak memory: parameters + buffers, "
        "gradients, optimizer state and tensors saved for backward, measured on the first step. "
        "Steps to target: mean over the seeds that reached it.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- the stage


def run_bench(recipe: Recipe, methods: list[str] | None = None, seeds: int | None = None, out_dir: Path | None = None,
              progress: bool = True, echo=print) -> Path:
    """Run every method over `seeds` seeds with the recipe's shared budget; write the bench directory."""
    check_inputs_exist(recipe)
    methods = list(methods) if methods is not None else list(recipe.bench.methods)
    n_seeds = recipe.bench.seeds if seeds is None else seeds
    if n_seeds <= 0:
        raise EdgetoolError(f"--seeds must be a positive number of seeds, got {n_seeds}")
    configs = method_configs(recipe, methods)
    out_dir = Path(out_dir) if out_dir is not None else Path("runs") / "bench" / recipe.name
    check_output_dir(out_dir, BENCH_FILES, "an edgetool bench directory", (("model.checkpoint", recipe.model.checkpoint),))

    base_data = load_data(recipe.data, recipe.seed)
    base, head_name, _ = ensure_base_model(recipe, base_data, progress, echo)
    reference = reference_model(base, head_name, base_data)
    check_model_io(reference, base_data)
    total = count_params(reference)
    # Inject every method once before any training: one that does not fit this model (a layer selection
    # matching no conv, a linear adapter on grouped convs only) fails now, not after the others have run.
    for mcfg, _ in configs.values():
        build_adapted(recipe, mcfg, base, head_name, base_data)

    seed_values = [recipe.seed + i for i in range(n_seeds)]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    once: dict[str, dict[str, Any]] = {}
    zero_shot = []
    with tempfile.TemporaryDirectory(prefix="edgetool-bench-") as tmp:
        workdir = Path(tmp)
        sample = torch.from_numpy(base_data.target_test.X[:1])
        reference_onnx = workdir / "reference.onnx"
        export_onnx(reference, sample, reference_onnx, recipe.fuse.opset)
        bar = tqdm(total=len(methods) * n_seeds, desc=f"bench {recipe.name}", unit="run",
                   disable=None if progress else True)
        for index, seed in enumerate(seed_values):
            data = seed_data(recipe, index, base_data)
            zero_shot.append(evaluate(reference, data.target_test)[0])
            for name in methods:
                bar.set_postfix(method=name, seed=seed)
                mcfg, tcfg = configs[name]
                # Adapter initialisation (e.g. LoRA's A) draws from the global RNG: seed it per run so a
                # method's result does not depend on which methods ran before it.
                seed_everything(seed)
                model, method = build_adapted(recipe, mcfg, base, head_name, data)
                trainable = sum(p.numel() for _, p in method.trainable_parameters(model))
                if name not in once:
                    once[name] = {
                        "description": method.description,
                        "config": mcfg.model_dump(mode="json"),
                        "train": tcfg.model_dump(mode="json"),
                        "trainable_params": trainable,
                        "total_params": total,
                        "trainable_pct": 100.0 * trainable / total,
                        **measure_step_flops(model, method, tcfg, data.target_train),
                    }
                elif once[name]["trainable_params"] != trainable:
                    raise EdgetoolError(f"internal: method '{name}' trains {trainable} parameters on seed {seed}, "
                                        f"{once[name]['trainable_params']} on the first seed")
                untrained = copy.deepcopy(model)
                result = fit(model, method, data.target_train, tcfg, seed, eval_split=data.target_test,
                             desc=f"{name} seed {seed}", progress=False)
                f1, acc = evaluate(model, data.target_test)
                if index == 0:
                    once[name].update(fusion_check(method, model, reference_onnx, sample, data.target_test.X,
                                                   workdir, recipe.fuse.opset))
                runs[name].append({
                    "seed": seed,
                    "f1": f1,
                    "accuracy": acc,
                    "steps_to_target": result.steps_to_target,
                    "train_seconds": result.train_seconds,
                    "peak_memory_bytes": result.peak_memory_bytes,
                    "memory_breakdown": result.memory_breakdown,
                    "curve": result.curve,
                    "adapter_bytes": adapter_bytes(method, model),
                    "wall_seconds_per_step": time_train_steps(untrained, method, tcfg, data.target_train,
                                                              recipe.bench.timing_steps),
                })
                bar.update(1)
        bar.close()

    rows = [summarise(name, runs[name], once[name]) for name in methods]
    zs_mean, zs_std = _mean_std(zero_shot)
    scenario = (f"new classes ({base_data.num_source_classes} source classes -> {base_data.num_classes} target classes)"
                if base_data.num_classes > base_data.num_source_classes else "distribution shift")
    result = {
        "meta": {
            "recipe": recipe.name,
            "recipe_path": str(recipe.source) if recipe.source else None,
            "scenario": scenario,
            "arch": recipe.model.arch,
            "width": recipe.model.width,
            "total_params": total,
            "class_names": base_data.class_names,
            "target_train_windows": len(base_data.target_train),
            "target_test_windows": len(base_data.target_test),
            "seeds": seed_values,
            "resample_shots": recipe.bench.resample_shots,
            "steps": recipe.train.steps,
            "batch_size": recipe.train.batch_size,
            "eval_every": recipe.train.eval_every,
            "target_f1": recipe.train.target_f1,
            "zero_shot_f1_mean": zs_mean,
            "zero_shot_f1_std": zs_std,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "measurement": MEASUREMENT,
        },
        "rows": rows,
    }
    table = markdown_table(result)
    with atomic_dir(out_dir) as tmp:
        atomic_write_json(tmp / "bench.json", result)
        atomic_write_text(tmp / "bench.md", table)
        plot_f1_curves({r["method"]: [(p["step"], p["f1_mean"]) for p in r["curve_mean"]] for r in rows},
                       tmp / "f1_vs_step.png", f"{recipe.name}: mean over {n_seeds} seeds", target=recipe.train.target_f1)
        plot_scatter({r["method"]: (r["trainable_params"], r["f1_mean"]) for r in rows}, tmp / "f1_vs_params.png",
                     "trainable parameters", "final macro-F1 (target test, mean over seeds)",
                     f"{recipe.name}: F1 vs trainable parameters")
    if echo is not None:
        echo(table.rstrip())
        echo(f"-> {out_dir}")
    return out_dir


@click.command("bench")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--methods", help="Comma-separated methods (default: the recipe's bench.methods), "
                                "e.g. full,head,bn,bias,lora,dora,galore,adapter,ttlora.")
@click.option("--seeds", type=int, help="Number of seeds (default: bench.seeds); seed i uses recipe seed + i.")
@click.option("--out", type=click.Path(path_type=Path), help="Output directory (default: runs/bench/<recipe name>).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@reports_errors
def cli_command(recipe: Path, methods: str | None, seeds: int | None, out: Path | None, quiet: bool) -> None:
    """Compare adaptation methods on the recipe's protocol with equal step budgets over several seeds.

    Writes bench.json, bench.md and F1 plots (pretrains the base first when model.checkpoint is missing)."""
    if seeds is not None and seeds <= 0:
        raise EdgetoolError(f"--seeds must be a positive number of seeds, got {seeds}")
    r = load_recipe(recipe)
    chosen = parse_methods(methods, r.bench.methods)
    run_bench(r, chosen, seeds, out, progress=not quiet, echo=_echo)
