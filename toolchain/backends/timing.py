"""How long to time, apart from what the clock is: warm up for a time, then measure until both a count
and a duration are reached (trtexec's --warmUp / --iterations / --duration), and interleave several
runners round by round so drift hits them alike. The clock is the runner's: the host wall clock around
`infer` by default, CUDA events around the enqueue for TensorRT (`Runner.time_batch`)."""

from __future__ import annotations

import time
from typing import Callable, ContextManager, Protocol

import numpy as np


class TimedRunner(Protocol):
    """What interleaving needs of a runner (backends.base.Runner has it); a protocol, so that this module,
    which Runner's own timing uses, does not import the runners."""

    round_iterations: int

    def time_batch(self, x: np.ndarray, warmup_s: float = 0.0, min_iters: int = 1, min_seconds: float = 0.0) -> np.ndarray: ...


def timed_loop(run_chunk: Callable[[int], np.ndarray], warmup_s: float, min_iters: int, min_seconds: float,
               chunk: int = 1, clock: Callable[[], float] = time.perf_counter) -> np.ndarray:
    """Per-iteration seconds: `run_chunk(n)` runs n iterations and returns their n timings. Warm-up runs
    chunks until `warmup_s` has passed (at least one chunk when it is positive); the measurement runs
    chunks until at least `min_iters` iterations AND `min_seconds` of wall time are done."""
    chunk = max(1, int(chunk))
    if warmup_s > 0:
        start = clock()
        while True:
            run_chunk(chunk)
            if clock() - start >= warmup_s:
                break
    parts: list[np.ndarray] = []
    done, start = 0, clock()
    while done < min_iters or (min_seconds > 0 and clock() - start < min_seconds):
        n = chunk if done >= min_iters else min(chunk, min_iters - done)
        t = np.asarray(run_chunk(n), dtype=float)
        parts.append(t)
        done += t.size
    return np.concatenate(parts) if parts else np.empty(0)


def interleaved_rounds(runners: dict[str, TimedRunner], x: np.ndarray, warmup_rounds: int, rounds: int,
                       warmup_s: float = 0.0, min_seconds: float = 0.0,
                       clock: Callable[[], float] = time.perf_counter) -> dict[str, np.ndarray]:
    """One figure per runner and round: the median of `runner.time_batch(x, 0, runner.round_iterations, 0)`.
    First all runners warm up in turn until each has run `warmup_s` and `warmup_rounds` untimed rounds;
    then rounds run until there are `rounds` of them and `min_seconds` have passed, every runner once per
    round, the order rotating each round (A B C, B C A, C A B, ...) so position effects cancel."""
    names = list(runners)

    def one(n: str) -> float:
        r = runners[n]
        return float(np.median(r.time_batch(x, 0.0, r.round_iterations, 0.0)))

    spent = dict.fromkeys(names, 0.0)
    done_rounds = 0
    while done_rounds < warmup_rounds or min(spent.values(), default=warmup_s) < warmup_s:
        for n in names:
            t0 = clock()
            one(n)
            spent[n] += clock() - t0
        done_rounds += 1
    times: dict[str, list[float]] = {n: [] for n in names}
    i, start = 0, clock()
    while i < rounds or (min_seconds > 0 and clock() - start < min_seconds):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(one(n))
        i += 1
    return {n: np.asarray(v) for n, v in times.items()}


def session_rounds(open_runners: Callable[[list[str]], ContextManager[dict[str, TimedRunner]]], names: list[str],
                   x: np.ndarray, sessions: int, warmup_rounds: int, rounds: int, warmup_s: float = 0.0,
                   min_seconds: float = 0.0, clock: Callable[[], float] = time.perf_counter
                   ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`interleaved_rounds` split over min(`sessions`, `rounds`) blocks, each on fresh runners:
    `open_runners(order)` creates and activates one runner per name, in that order, and closes them when
    the block ends. Returns the per-round seconds of each runner and, per round, the index of its block.

    Why: a runtime session carries effects of its own that last as long as it does (where its thread
    pool's threads land next to other processes, its memory placement), as large as 1.3x on a loaded
    machine. Timed in one session per graph, such an effect is indistinguishable from a slower graph
    however many rounds are run; across fresh sessions it becomes a sampled variation the verdict's
    interval, taken over blocks, accounts for. Creation order and the first runner of a round rotate
    from block to block, so neither favours one graph. Warm-up rounds, warm-up time and the minimum
    duration are shared out over the blocks; the rounds are ceil(rounds / blocks) per block."""
    blocks = max(1, min(int(sessions), int(rounds)))
    per_block, warm = -(-rounds // blocks), -(-warmup_rounds // blocks)
    times: dict[str, list[float]] = {n: [] for n in names}
    block_of_round: list[int] = []
    for j in range(blocks):
        k = j % len(names)
        order = names[k:] + names[:k]
        with open_runners(order) as runners:
            t = interleaved_rounds({n: runners[n] for n in order}, x, warm, per_block, warmup_s / blocks,
                                   min_seconds / blocks, clock)
        for n in names:
            times[n].extend(t[n].tolist())
        block_of_round += [j] * len(t[names[0]])
    return {n: np.asarray(v) for n, v in times.items()}, np.asarray(block_of_round, dtype=int)
