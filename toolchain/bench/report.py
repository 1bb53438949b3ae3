"""The bench's figures: per-method rows (mean/std over seeds), the markdown table, and how each figure
is measured (written into bench.json)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InternalError
from ..training.fit import EvalPoint

MEASUREMENT = {
    "flops_per_step": (
        "torch.utils.flop_counter.FlopCounterMode over one forward + backward + optimizer step on a fresh copy of "
        "the adapted model (batch = train.batch_size); counts matmul/conv-type ops (2 FLOPs per MAC; the grouped-conv "
        "weight-gradient formula corrected by 1/groups), not "
        "elementwise ops; flops_optimizer_estimate adds the optimizer's elementwise update "
        "(Adam 13, AdamW 14, SGD-momentum 4 FLOPs per trainable element, +2 with L2 weight decay); GaLore's "
        "projection matmuls are counted, its periodic SVD is not"),
    "peak_memory_bytes": (
        "measured on the first training step. CPU: bytes of parameters + buffers, gradients, optimizer state "
        "(after the step) and tensors autograd saves for backward (saved_tensors_hooks), storages counted once. "
        "CUDA: torch.cuda.max_memory_allocated during that step minus what was allocated before it, plus the "
        "model's parameter and buffer bytes"),
    "wall_seconds_per_step": ("median of timed training steps (after 2 warm-up) on a copy of the adapted model, on the "
                              "training device in the training precision: CUDA events on a GPU, the host clock on CPU"),
    "step_time_vs_full": ("wall_seconds_per_step_mean / full fine-tuning's, same device and precision, same run "
                          "(meta.full_reference says whether full was a benched row or measured on its own)"),
    "peak_memory_vs_full": "peak_memory_bytes_mean / full fine-tuning's, same device and precision, same run",
    "adapter_bytes": "len(torch.save(method.adapter_state(model)))",
    "lean_step": ("with train.lean_step (the default) the measured steps (fit's, the timed and the FLOP-counted one) run "
                  "through toolchain.training.lean: frozen layers keep only what the gradients need; TT-LoRA computes no dense "
                  "weight gradient"),
    "zero_overhead": ("fuse-export's fusion proof (architecture, per-layer and end-to-end equivalence) passes and the "
                      "fused model exported to ONNX is structurally identical to the method-free original "
                      "(toolchain.proof.export.compare_graph_structure), checked on the first seed"),
    "std": "sample standard deviation over seeds (ddof=1; 0 for one seed)",
    "steps_to_target": ("first evaluation step with macro-F1 >= train.target_f1 (the absolute target) on the curve "
                        "subsample; mean/std over the seeds that reached it"),
    "curve": ("macro-F1 every train.eval_every steps on a fixed class-stratified subsample of the target test split "
              "(bench.eval_subsample windows, drawn once per seed, the same for every method and rate)"),
    "f1": "macro-F1 / accuracy of the final model on the whole target test split, at the method's chosen learning rate",
    "lr": ("chosen per method on the validation split: final macro-F1 on data.target_val, mean over seeds; the smallest "
           "rate within one standard error of the best mean (toolchain/bench/selection.py), rates where a seed diverged not "
           "eligible; the test split is not used for choosing"),
    "convergence": ("per seed, targets zero-shot F1 + fraction x (best final F1 of any method - zero-shot F1) on the "
                    "curve subsample; steps = first evaluation step reaching it; seconds = training time to that step "
                    "without evaluations; speed-ups paired by seed against the recipe's method, geometric mean of "
                    "method/reference over seeds where both reached"),
}


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = float(np.mean(values))
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return mean, std


def mean_curve(curves: list[list[EvalPoint]]) -> list[dict[str, float]]:
    """Mean/std of macro-F1 per evaluation step; every seed evaluates at the same steps (shared train config)."""
    steps = [p.step for p in curves[0]]
    if any([p.step for p in c] != steps for c in curves):
        raise InternalError("seeds were evaluated at different steps")
    out = []
    for i, step in enumerate(steps):
        m, s = mean_std([c[i].f1 for c in curves])
        out.append({"step": step, "f1_mean": m, "f1_std": s})
    return out


def summarise(name: str, runs: list[dict[str, Any]], once: dict[str, Any]) -> dict[str, Any]:
    """One bench.json row from the per-seed runs of a method and its seed-independent figures."""
    row: dict[str, Any] = {"method": name, "mergeable": once["mergeable"]}
    for key in ("f1", "accuracy", "peak_memory_bytes", "wall_seconds_per_step", "train_seconds", "adapter_bytes"):
        row[f"{key}_mean"], row[f"{key}_std"] = mean_std([r[key] for r in runs])
    reached = [r["steps_to_target"] for r in runs if r["steps_to_target"] is not None]
    row["steps_to_target_mean"], row["steps_to_target_std"] = mean_std(reached)
    row["steps_to_target_reached"] = len(reached)
    row.update(once)
    row["seeds"] = [r["seed"] for r in runs]
    row["f1_per_seed"] = [r["f1"] for r in runs]
    row["accuracy_per_seed"] = [r["accuracy"] for r in runs]
    row["steps_to_target_per_seed"] = [r["steps_to_target"] for r in runs]
    row["peak_memory_breakdown"] = runs[0]["memory_breakdown"]
    row["curve_mean"] = mean_curve([r["curve"] for r in runs])
    return row


def add_cost_ratios(rows: list[dict[str, Any]], reference: dict[str, Any]) -> None:
    """Each row's step time and peak memory as a ratio to full fine-tuning's (`reference`)."""
    for r in rows:
        r["step_time_vs_full"] = r["wall_seconds_per_step_mean"] / reference["wall_seconds_per_step"]
        r["peak_memory_vs_full"] = r["peak_memory_bytes_mean"] / reference["peak_memory_bytes"]


def _pm(mean: float | None, std: float | None, fmt: str) -> str:
    if mean is None:
        return "—"
    return f"{mean:{fmt}} ± {std:{fmt}}"


def count_text(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


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


def _trained_on(meta: dict[str, Any]) -> str:
    dev = meta.get("device") or {}
    if not dev:
        return ""
    tf32 = ", TF32 on" if dev.get("tf32_in_effect") else ""
    return f" Trained on {dev['name']} ({dev['type']}, {dev['precision']}{tf32}), torch {dev['torch']}."


def markdown_table(result: dict[str, Any]) -> str:
    meta = result["meta"]
    n = len(meta["seeds"])
    lines = [
        f"# edgetool bench: {meta['recipe']}",
        "",
        f"{meta['scenario']}; backbone {meta['arch']} (width {meta['width']}, {meta['total_params']:,} parameters); "
        f"{meta['target_train_windows']} labelled target windows; {meta['steps']} steps per method, batch "
        f"{meta['batch_size']}; {count_text(n, 'seed')} {meta['seeds']}; zero-shot target macro-F1 "
        f"{_pm(meta['zero_shot_f1_mean'], meta['zero_shot_f1_std'], '.3f')}.{_trained_on(meta)}",
        "",
        f"| method | macro-F1 | accuracy | trainable | % of model | FLOPs/step (fwd+bwd+opt) | peak train memory | "
        f"steps to F1 ≥ {meta['target_f1']:g} (reached) | ms/step | step time vs full | memory vs full | adapter bytes "
        f"| fused: zero overhead |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        steps = _pm(r["steps_to_target_mean"], r["steps_to_target_std"], ".0f") if r["steps_to_target_reached"] else "not reached"
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
            f"| {1000 * r['wall_seconds_per_step_mean']:.1f} | {r['step_time_vs_full']:.2f}× "
            f"| {r['peak_memory_vs_full']:.2f}× | {r['adapter_bytes_mean']:,.0f} | {fused} |"
        )
    lines += [
        "",
        "Mean ± sample std over seeds. FLOPs: torch.utils.flop_counter (matmul/conv-type ops, forward + backward + "
        "optimizer) plus an estimate of the optimizer's elementwise update; peak memory: parameters + buffers, "
        "gradients, optimizer state and tensors saved for backward, measured on the first step "
        "(on CUDA: the allocator's peak). Ratios: to full fine-tuning on the same device and precision "
        f"({meta['full_reference']['measured']}). "
        "Steps to F1 ≥ target: the absolute train.target_f1 on the curve windows, mean over the seeds that reached it; "
        "the convergence table below uses targets relative to each seed's headroom.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- learning rate


def selection_fields(lr: float, grid: list[float], chosen: dict[str, Any] | None, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A row's learning-rate figures: the rate it ran at, how it was chosen, the grid's validation F1 per rate
    (from the selection runs) and the validation F1 of the reported runs."""
    val = [r["val_f1"] for r in runs]
    val_mean, val_std = mean_std([v for v in val if v is not None])
    if chosen is not None:
        record = chosen["grid"]
    else:  # one rate: nothing was chosen; its validation F1 comes from the reported runs
        record = [{"lr": grid[0], "val_f1_mean": val_mean, "val_f1_std": val_std, "val_loss_mean": None,
                   "val_f1_per_seed": val, "diverged_seeds": 0}]
    return {"lr": lr, "lr_selected_on": "validation" if chosen is not None else "fixed", "lr_grid": record,
            "val_f1_mean": val_mean, "val_f1_std": val_std, "val_f1_per_seed": val}


def selection_table(result: dict[str, Any]) -> str:
    rows, meta = result["rows"], result["meta"]
    rates = sorted({g["lr"] for r in rows for g in r["lr_grid"]})
    lines = [
        "## Learning rate, chosen on the validation split",
        "",
        f"Validation macro-F1 per learning rate (mean ± std over {count_text(len(meta['seeds']), 'seed')}; "
        f"{meta['target_val_windows']} validation windows"
        f"{' per seed' if meta['resample_shots'] else ''}); the chosen rate in bold. Chosen by {meta['selection']['criterion']}. "
        "The test split is not used for choosing. A rate chosen at the end of its grid may not be the method's best "
        "(widen bench.lr_grid).",
        "",
        "| method | " + " | ".join(f"lr {lr:g}" for lr in rates) + " | chosen lr | test macro-F1 at chosen lr |",
        "|---|" + "---|" * (len(rates) + 2),
    ]
    for r in rows:
        by_lr = {g["lr"]: g for g in r["lr_grid"]}
        cells = []
        for lr in rates:
            g = by_lr.get(lr)
            if g is None:
                cells.append("")
            elif g["diverged_seeds"]:
                cells.append(f"diverged ({g['diverged_seeds']}/{len(g['val_f1_per_seed'])})")
            else:
                text = _pm(g["val_f1_mean"], g["val_f1_std"], ".3f")
                cells.append(f"**{text}**" if lr == r["lr"] and r["lr_selected_on"] == "validation" else text)
        how = " (fixed)" if r["lr_selected_on"] != "validation" else _edge(r["lr"], [g["lr"] for g in r["lr_grid"]])
        lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {r['lr']:g}{how} | {_pm(r['f1_mean'], r['f1_std'], '.3f')} |")
    return "\n".join(lines) + "\n"


def _edge(lr: float, grid: list[float]) -> str:
    """A rate chosen at the end of its grid may not be the method's best: the grid should go further."""
    if lr == max(grid):
        return " (largest in grid)"
    if lr == min(grid):
        return " (smallest in grid)"
    return ""


# ---------------------------------------------------------------------------------------------- convergence


def steps_cell(cell: dict[str, Any], n: int, key: str, fmt: str) -> str:
    if not cell["reached"]:
        return f"not reached (0/{n})"
    return f"{_pm(cell[f'{key}_mean'], cell[f'{key}_std'], fmt)} ({cell['reached']}/{n})"


def speedup_cell(s: dict[str, Any] | None, reference: str, method: str) -> str:
    if s is None:
        return "—"
    ratio = f"{s['geomean']:.2f}× ({count_text(s['pairs'], 'pair')})" if s["geomean"] is not None else "no pair"
    others = [f"only {reference} reached: {s['reference_only']}"] if s["reference_only"] else []
    others += [f"only {method} reached: {s['method_only']}"] if s["method_only"] else []
    return ratio + (f"; {', '.join(others)}" if others else "")


def convergence_table(result: dict[str, Any]) -> str:
    meta, rows = result["meta"], result["rows"]
    conv = meta["convergence"]
    n = len(meta["seeds"])
    keys = list(conv["targets_per_seed"])
    last = keys[-1]
    ref = conv["reference"]
    zs = ", ".join(f"{v:.3f}" for v in conv["zero_shot_f1_per_seed"])
    best = ", ".join(f"{v:.3f} ({m})" for v, m in zip(conv["best_final_f1_per_seed"], conv["best_final_method_per_seed"]))
    header = " | ".join(f"steps to {k}" for k in keys) + f" | seconds to {last}"
    sep = "---|" * (len(keys) + 1)
    if ref:
        header += f" | {ref}'s speed-up to {last}: steps | {ref}'s speed-up to {last}: seconds"
        sep += "---|---|"
    lines = [
        "## Convergence to headroom targets",
        "",
        f"Per seed, a target is zero-shot F1 + fraction × (best final F1 of any method − zero-shot F1), scored on the "
        f"curve subsample ({meta['curve_windows'][0]} target test windows). Zero-shot per seed: {zs}; best final: {best}. "
        f"Steps: mean ± std over the seeds that reached the target (reached/{n}); seconds: training time to that step, "
        "evaluations excluded.",
    ]
    if ref:
        lines[-1] += (f" Speed-up: geometric mean over the seeds where both reached of steps (or seconds) of the method ÷ "
                      f"{ref}'s; > 1 means {ref} got there first.")
    lines += ["", f"| method | {header} |", "|---|" + sep]
    for r in rows:
        c = r["convergence"]
        cells = [steps_cell(c[k], n, "steps", ".0f") for k in keys] + [steps_cell(c[last], n, "seconds", ".2f")]
        if ref:
            cells += [speedup_cell(c[last].get("speedup_of_reference_steps"), ref, r["method"]),
                      speedup_cell(c[last].get("speedup_of_reference_seconds"), ref, r["method"])]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
