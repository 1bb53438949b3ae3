"""Convergence that can be compared between methods: the step (and training seconds) at which a method has
covered a fraction of the headroom between the zero-shot F1 and the best final F1 any method reached on the
same seed, and speed-ups paired by seed against a reference method.

A fixed F1 target (train.target_f1) says little when zero-shot F1 already sits just below it and the best
methods end just above it: whether a seed crosses it is then chance. Headroom targets scale with what the
run could gain, so "half way" and "90 % of the way" mean the same on every seed and recipe."""

from __future__ import annotations

import math
from typing import Any

from .report import mean_std
from ..errors import InternalError
from ..training.fit import EvalPoint


def fraction_key(fraction: float) -> str:
    """JSON key of a headroom fraction: 0.5 -> '50%'."""
    return f"{100 * fraction:g}%"


def headroom_targets(zero_shot: float, best_final: float, fractions: list[float]) -> dict[float, float | None]:
    """F1 that covers `fraction` of the way from zero_shot to best_final; None when no method gained anything."""
    if not best_final > zero_shot:
        return {f: None for f in fractions}
    return {f: zero_shot + f * (best_final - zero_shot) for f in fractions}


def first_reaching(curve: list[EvalPoint], target: float | None) -> EvalPoint | None:
    """The first evaluation point at or above `target`."""
    if target is None:
        return None
    return next((p for p in curve if p.f1 >= target), None)


def _geomean(ratios: list[float]) -> float | None:
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else None


def paired_speedup(method: list[float | None], reference: list[float | None]) -> dict[str, Any]:
    """How much sooner the reference got there, paired by seed: geometric mean over the seeds where both
    reached of method / reference (> 1: the reference was faster), and how the other seeds went."""
    if len(method) != len(reference):
        raise InternalError("paired speed-up over different numbers of seeds")
    both = [(m, r) for m, r in zip(method, reference) if m is not None and r is not None]
    ratios = [m / r for m, r in both if m > 0 and r > 0]
    return {
        "geomean": _geomean(ratios),
        "pairs": len(ratios),
        "reference_only": sum(m is None and r is not None for m, r in zip(method, reference)),
        "method_only": sum(m is not None and r is None for m, r in zip(method, reference)),
        "neither": sum(m is None and r is None for m, r in zip(method, reference)),
    }


def convergence(curves: dict[str, list[list[EvalPoint]]], zero_shot: list[float], fractions: list[float],
                reference: str | None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(run-level record, per-method record) for curves[method][seed index] scored on the same windows as
    zero_shot[seed index]. The best final F1 of a seed is the highest last curve point of any method."""
    methods = list(curves)
    n = len(zero_shot)
    if any(len(c) != n for c in curves.values()):
        raise InternalError("every method needs one curve per seed")
    best = [max(curves[m][i][-1].f1 for m in methods) for i in range(n)]
    best_method = [max(methods, key=lambda m: curves[m][i][-1].f1) for i in range(n)]
    targets = [headroom_targets(zero_shot[i], best[i], fractions) for i in range(n)]
    run = {
        "fractions": fractions,
        "reference": reference,
        "zero_shot_f1_per_seed": zero_shot,
        "best_final_f1_per_seed": best,
        "best_final_method_per_seed": best_method,
        "targets_per_seed": {fraction_key(f): [t[f] for t in targets] for f in fractions},
    }
    per_method: dict[str, dict[str, Any]] = {}
    for m in methods:
        rec: dict[str, Any] = {}
        for f in fractions:
            points = [first_reaching(curves[m][i], targets[i][f]) for i in range(n)]
            steps = [p.step if p else None for p in points]
            seconds = [p.seconds if p else None for p in points]
            reached_steps = [s for s in steps if s is not None]
            steps_mean, steps_std = mean_std(reached_steps)
            seconds_mean, seconds_std = mean_std([s for s in seconds if s is not None])
            rec[fraction_key(f)] = {"steps_per_seed": steps, "seconds_per_seed": seconds, "reached": len(reached_steps),
                                    "steps_mean": steps_mean, "steps_std": steps_std,
                                    "seconds_mean": seconds_mean, "seconds_std": seconds_std}
        per_method[m] = rec
    if reference in per_method:
        ref = per_method[reference]
        for m in methods:
            if m == reference:
                continue
            for f in fractions:
                key = fraction_key(f)
                cell = per_method[m][key]
                cell["speedup_of_reference_steps"] = paired_speedup(cell["steps_per_seed"], ref[key]["steps_per_seed"])
                cell["speedup_of_reference_seconds"] = paired_speedup(cell["seconds_per_seed"], ref[key]["seconds_per_seed"])
    return run, per_method
