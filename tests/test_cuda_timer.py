"""How latency is timed: the time-and-count loop and round interleaving (toolchain.backends.timing), the
host-clock default of `Runner.time_batch`, and the CUDA-event timer and CUDA-graph capture
(toolchain.backends.cuda) -- the GPU tests time torch CUDA work on a torch stream, so they need a CUDA
build of torch and a GPU, not TensorRT, and skip with the reason elsewhere. No test asserts a speed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toolchain.backends.base import Runner
from toolchain.backends.cuda import host_bound
from toolchain.backends.pytorch import TorchRunner
from toolchain.backends.timing import interleaved_rounds, session_rounds, timed_loop

GPU = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU and a CUDA build of torch (torch.cuda.is_available() "
                                                "is False here)")


class FakeClock:
    """A clock that advances only when told: each iteration of the fake work costs `step` seconds."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _work(clock: FakeClock, step: float, calls: list[int]):
    def run_chunk(n: int) -> np.ndarray:
        calls.append(n)
        clock.now += n * step
        return np.full(n, step)
    return run_chunk


def test_timed_loop_warms_up_by_time_then_measures_by_count_and_time():
    clock, calls = FakeClock(), []
    t = timed_loop(_work(clock, 0.01, calls), warmup_s=0.2, min_iters=5, min_seconds=0.0, chunk=1, clock=clock)
    assert len(t) == 5 and sum(calls) == 20 + 5  # 200 ms of warm-up at 10 ms an iteration, then 5 timed
    clock, calls = FakeClock(), []
    t = timed_loop(_work(clock, 0.01, calls), warmup_s=0.0, min_iters=5, min_seconds=0.5, chunk=4, clock=clock)
    assert len(t) >= 50 and sum(calls) == len(t)  # time, not count, decided: at least 0.5 s of 10 ms iterations
    clock, calls = FakeClock(), []
    t = timed_loop(_work(clock, 1.0, calls), warmup_s=0.0, min_iters=10, min_seconds=0.5, chunk=4, clock=clock)
    assert len(t) == 10 and calls == [4, 4, 2]  # count decided; the last chunk stops at the count
    clock, calls = FakeClock(), []
    assert timed_loop(_work(clock, 1.0, calls), 0.5, 0, 0.0, chunk=3, clock=clock).size == 0 and calls == [3]


class _FakeRunner(Runner):
    """A runner whose time_batch logs its calls and returns fixed seconds (machinery test, no inference)."""

    def __init__(self, name, log, clock, seconds, round_iterations=1):
        super().__init__(name, name, "fp32")
        self.log, self.clock_, self.seconds, self.round_iterations = log, clock, seconds, round_iterations

    def _activate(self):
        pass

    def _infer(self, x):
        return x

    def time_batch(self, x, warmup_s=0.0, min_iters=1, min_seconds=0.0):
        self.log.append((self.name, min_iters))
        self.clock_.now += self.seconds * min_iters
        return np.full(min_iters, self.seconds)


def test_interleaved_rounds_warm_up_then_rotate_and_reach_count_and_time():
    clock, log = FakeClock(), []
    runners = {n: _FakeRunner(n, log, clock, s, k) for n, s, k in (("A", 0.001, 10), ("B", 0.002, 10), ("C", 0.001, 10))}
    times = interleaved_rounds(runners, np.zeros((1, 1)), warmup_rounds=1, rounds=3, warmup_s=0.05, min_seconds=0.0,
                               clock=clock)
    # warm-up: whole rounds until each has run 50 ms (A: 10 ms a round -> 5 rounds), then 3 rotating rounds
    assert [n for n, _ in log[:15]] == list("ABC") * 5
    assert [n for n, _ in log[15:]] == list("ABC") + list("BCA") + list("CAB")
    assert all(k == 10 for _, k in log)  # each call times the runner's own round_iterations
    assert {n: t.tolist() for n, t in times.items()} == {"A": [0.001] * 3, "B": [0.002] * 3, "C": [0.001] * 3}
    clock, log = FakeClock(), []
    runners = {n: _FakeRunner(n, log, clock, 0.01) for n in "AB"}
    times = interleaved_rounds(runners, np.zeros((1, 1)), 0, rounds=2, min_seconds=1.0, clock=clock)
    assert len(times["A"]) == 50  # 20 ms a round: 1 s of rounds, not 2


def test_session_rounds_time_each_block_on_fresh_runners_created_in_rotating_order():
    import contextlib

    clock, log, opened, closed = FakeClock(), [], [], []

    @contextlib.contextmanager
    def open_runners(order):
        runners = {n: _FakeRunner(n, log, clock, {"A": 0.001, "B": 0.002, "C": 0.003}[n]) for n in order}
        opened.append((list(order), [id(r) for r in runners.values()]))
        yield runners
        closed.append(list(order))

    times, session = session_rounds(open_runners, list("ABC"), np.zeros((1, 1)), sessions=4, warmup_rounds=8,
                                    rounds=10, clock=clock)
    assert [o for o, _ in opened] == [list("ABC"), list("BCA"), list("CAB"), list("ABC")] == closed
    assert len({i for _, ids in opened for i in ids}) == 12  # three new runners per block
    assert session.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3  # ceil(10 / 4) rounds per block
    assert times["B"].tolist() == [0.002] * 12
    # each block: 2 warm-up rounds (8 / 4), then its rounds, the first of them led by the block's first runner
    assert [n for n, _ in log[:9]] == list("ABC") * 2 + list("ABC") and [n for n, _ in log[15:18]] == list("BCA")
    times, session = session_rounds(open_runners, list("ABC"), np.zeros((1, 1)), sessions=8, warmup_rounds=0,
                                    rounds=5, clock=clock)
    assert session.tolist() == [0, 1, 2, 3, 4]  # fewer rounds than sessions: one round per block


def test_host_clock_default_of_time_batch():
    model = torch.nn.Sequential(torch.nn.Conv1d(3, 4, 3), torch.nn.ReLU()).eval()
    with TorchRunner(model, "tiny", "tiny") as r:
        t = r.time_batch(np.zeros((2, 3, 16), dtype=np.float32), warmup_s=0.0, min_iters=7)
        assert t.shape == (7,) and np.all(t > 0)
        assert "host wall clock" in r.clock and r.round_iterations == 1
        assert r.timing_report() == {"clock": r.clock}


def test_host_bound_compares_medians():
    assert host_bound(np.array([3e-5, 4e-5, 5e-5]), np.array([2e-5, 2e-5, 9e-5]))
    assert not host_bound(np.array([1e-5, 1e-5]), np.array([2e-5, 2e-5]))
    assert not host_bound(np.empty(0), np.array([1.0]))


# ------------------------------------------------------------------------------- on a CUDA GPU (torch)


def _sleep_cycles_lower_bound_s(cycles: int) -> float:
    # torch.cuda._sleep spins for at least `cycles` GPU clock cycles; no GPU clocks above 3 GHz.
    return cycles / 3e9


@needs_cuda
def test_cuda_device_probe_agrees_with_torch():
    from toolchain.backends.cuda import cuda_device

    device, why = cuda_device()
    assert device is not None, why
    props = torch.cuda.get_device_properties(0)
    assert device.sm_count == props.multi_processor_count
    assert device.compute_capability == f"{props.major}.{props.minor}"


@needs_cuda
def test_event_timer_times_gpu_work_enqueued_on_a_torch_stream():
    from toolchain.backends.cuda import EventTimer

    stream, cycles = torch.cuda.Stream(), 2_000_000
    timer = EventTimer()
    try:
        with torch.cuda.stream(stream):
            t = timer.time_chunk(lambda: torch.cuda._sleep(cycles), stream.cuda_stream, 5)
        assert t.shape == (5,) and np.all(np.isfinite(t))
        assert np.all(t >= _sleep_cycles_lower_bound_s(cycles))  # the kernel's time is in each interval
        assert timer.last_host_s.shape == (5,)
    finally:
        timer.close()


@needs_cuda
def test_cuda_graph_of_an_enqueue_is_captured_and_timed():
    from toolchain.backends.cuda import CudaGraph, EventTimer

    stream, cycles = torch.cuda.Stream(), 1_000_000
    a = torch.ones(1024, device="cuda")
    out = torch.empty_like(a)

    def enqueue():
        with torch.cuda.stream(stream):
            torch.cuda._sleep(cycles)
            torch.add(a, 1.0, out=out)
        return True

    graph, why = CudaGraph.capture(enqueue, stream.cuda_stream)
    assert graph is not None, why
    timer = EventTimer()
    try:
        out.zero_()
        t = timer.time_chunk(lambda: graph.launch(stream.cuda_stream), stream.cuda_stream, 4)
        assert np.all(t >= _sleep_cycles_lower_bound_s(cycles))
        stream.synchronize()
        assert torch.all(out == 2.0)  # the graph replays the captured work on the captured buffers
    finally:
        timer.close()
        graph.close()


@needs_cuda
def test_failed_capture_is_reported_not_raised():
    from toolchain.backends.cuda import CudaGraph

    stream = torch.cuda.Stream()
    graph, why = CudaGraph.capture(lambda: False, stream.cuda_stream)
    assert graph is None and "before capture" in why
    calls = []

    def refuses_under_capture():
        calls.append(1)
        return len(calls) == 1  # succeeds outside the capture, fails inside it (as TensorRT may)

    graph, why = CudaGraph.capture(refuses_under_capture, stream.cuda_stream)
    assert graph is None and "not permitted under CUDA graph capture" in why
    with torch.cuda.stream(stream):
        torch.cuda._sleep(1000)  # the stream still works after the aborted capture
    stream.synchronize()
