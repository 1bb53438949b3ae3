"""Stage `bench`: every adaptation method on the recipe's source -> target protocol, same budget.

For each seed the methods see the same few target shots and the same batches in the same order
(`fit`'s order depends only on the seed, batch size and step count, which `BenchConfig` keeps shared),
so differences between rows come from the methods. Output directory:
  bench.json        one row per method: mean/std over seeds of every measured figure (+ per-seed values)
  bench.md          the same as a markdown table
  f1_vs_step.png    mean macro-F1 on the target test split against training step, one line per method
  f1_vs_params.png  final mean macro-F1 against trainable parameters

How each figure is measured: toolchain.benchreport.MEASUREMENT (also written into bench.json). Zero
inference overhead is the same proof fuse-export makes (toolchain.fusion.prove_fusion), plus the
fused model's ONNX graph compared with the original's.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn
from tqdm import tqdm

from ..artifacts import atomic_dir, atomic_write_json, atomic_write_text, claimed_output, default_output
from ..basemodel import build_adapted, check_model_io, ensure_base_model, original_model
from ..benchreport import MEASUREMENT, add_cost_ratios, mean_std, markdown_table, summarise
from ..data import DataBundle, load_data
from ..device import training_device
from ..enginedir import onnx_name
from ..errors import EdgetoolError, InternalError, NotMergeableError
from ..export import compare_graph_structure, export_onnx
from ..fusion import prove_fusion
from ..methods.settings import MethodSettings, method_names, settings_for
from ..metrics import evaluate
from ..models import count_params
from ..plots import plot_f1_curves, plot_scatter
from ..recipe import OptimConfig, Recipe, check_inputs_exist, format_validation_error
from ..traincost import adapter_bytes, full_step_cost, measure_step_flops, time_train_steps
from ..train import fit, seed_everything

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


def fusion_row(method, adapted: nn.Module, original: nn.Module, original_onnx: Path, sample: torch.Tensor,
               X: np.ndarray, workdir: Path, recipe: Recipe) -> dict[str, Any]:
    """fuse-export's proof (architecture + equivalence), then the fused ONNX graph against the original's:
    identical graph and proof passed = zero inference overhead."""
    try:
        proof = prove_fusion(method, adapted, original, X, recipe.fuse.atol, recipe.fuse.rtol,
                             source=f"method '{method.name}'")
    except NotMergeableError as exc:
        return {"mergeable": False, "zero_overhead": False, "overhead_reason": str(exc), "fused_max_abs_diff": None}
    row: dict[str, Any] = {"mergeable": True, "fused_max_abs_diff": proof.equivalence.max_abs_error,
                           "architecture_identical": not proof.architecture_differences,
                           "fusion_equivalent": proof.equivalence.passed}
    path = workdir / f"fused-{method.name}.onnx"
    export_onnx(proof.fused, sample, path, recipe.fuse.opset)
    graph = compare_graph_structure(original_onnx, path)
    reasons = list(proof.failures)
    if not graph.identical:
        reasons.append("fused graph differs from the original: " + "; ".join(graph.differences[:3]))
    row["zero_overhead"] = not reasons
    row["overhead_reason"] = "; ".join(reasons) or None
    return row


def run_bench(recipe: Recipe, methods: list[str] | None = None, seeds: int | None = None, out_dir: Path | None = None,
              progress: bool = True, echo=print) -> Path:
    """Run every method over `seeds` seeds with the recipe's shared budget; write the bench directory."""
    check_inputs_exist(recipe)
    training_device(recipe.train.device, recipe.train.precision, "train")  # refuse before any work
    methods = list(methods) if methods is not None else list(recipe.bench.methods)
    n_seeds = recipe.bench.seeds if seeds is None else seeds
    if n_seeds <= 0:
        raise EdgetoolError(f"--seeds must be a positive number of seeds, got {n_seeds}")
    configs = method_configs(recipe, methods)
    out_dir = Path(out_dir) if out_dir is not None else default_output(Path("runs") / "bench", recipe.name)
    with claimed_output(out_dir, BENCH_FILES, "an edgetool bench directory",
                        (("model.checkpoint", recipe.model.checkpoint),)):
        return _run_bench(recipe, methods, n_seeds, configs, out_dir, progress, echo)


def _run_bench(recipe: Recipe, methods: list[str], n_seeds: int, configs: dict[str, tuple[MethodSettings, OptimConfig]],
               out_dir: Path, progress: bool, echo) -> Path:
    base_data = load_data(recipe.data, recipe.seed)
    base, head_name, _ = ensure_base_model(recipe, base_data, progress, echo)
    original = original_model(base, head_name, base_data)
    check_model_io(original, base_data)
    total = count_params(original)
    # Inject every method once before any training: one that does not fit this model (a layer selection
    # matching no conv, a linear adapter on grouped convs only) fails now, not after the others have run.
    for name, (mcfg, _) in configs.items():
        for note in build_adapted(mcfg, base, head_name, base_data)[1].notes:
            if echo is not None:
                echo(f"note: {name}: {note}")

    seed_values = [recipe.seed + i for i in range(n_seeds)]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    once: dict[str, dict[str, Any]] = {}
    zero_shot = []
    device_info: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgetool-bench-") as tmp:
        workdir = Path(tmp)
        sample = torch.from_numpy(base_data.target_test.X[:1])
        original_onnx = workdir / onnx_name("original", "fp32")
        export_onnx(original, sample, original_onnx, recipe.fuse.opset)
        bar = tqdm(total=len(methods) * n_seeds, desc=f"bench {recipe.name}", unit="run",
                   disable=None if progress else True)
        for index, seed in enumerate(seed_values):
            data = seed_data(recipe, index, base_data)
            zero_shot.append(evaluate(original, data.target_test)[0])
            for name in methods:
                bar.set_postfix(method=name, seed=seed)
                mcfg, tcfg = configs[name]
                # Adapter initialisation (e.g. LoRA's A) draws from the global RNG: seed it per run so a
                # method's result does not depend on which methods ran before it.
                seed_everything(seed)
                model, method = build_adapted(mcfg, base, head_name, data)
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
                    raise InternalError(f"method '{name}' trains {trainable} parameters on seed {seed}, "
                                        f"{once[name]['trainable_params']} on the first seed")
                untrained = copy.deepcopy(model)
                result = fit(model, method, data.target_train, tcfg, seed, eval_split=data.target_test,
                             desc=f"{name} seed {seed}", progress=False)
                f1, acc = evaluate(model, data.target_test)
                model.cpu()  # fusion and export run on the CPU whatever device trained
                device_info = device_info or result.device
                if index == 0:
                    once[name].update(fusion_row(method, model, original, original_onnx, sample, data.target_test.X,
                                                 workdir, recipe))
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
    zs_mean, zs_std = mean_std(zero_shot)
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
            "device": device_info,
            "full_reference": reference,
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
