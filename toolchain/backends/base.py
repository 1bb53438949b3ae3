"""The backend interface, in Polygraphy's style: a `Runner` is built cheaply (nothing is loaded), then
`activate()` loads or builds what it needs, `infer(x)` returns the output for one input batch,
`time_once(x)` the seconds of one inference, `time_batch(x, ...)` per-iteration seconds on the runner's
own clock (`clock` says which), and `deactivate()` frees it; runners are context managers.
A `Backend` says whether it can run here (and why not), which precisions it checks, and makes the
runners for the graphs of an engine directory. Adding a backend = one subclass + `@register_backend`.
Comparison of outputs lives in toolchain.proof.parity, apart from the backends."""

from __future__ import annotations

import contextlib
import io
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

from ..errors import EdgetoolError, first_line
from .timing import timed_loop

if TYPE_CHECKING:
    from ..enginedir import EngineDir


@contextlib.contextmanager
def quiet_polygraphy():
    """Polygraphy logs to stdout at INFO level; keep the terminal summary ours. Its critical errors
    still raise PolygraphyException, which callers turn into one-line EdgetoolErrors."""
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL + 10):
        yield


@contextlib.contextmanager
def polygraphy_errors():
    """Like `quiet_polygraphy`, but Polygraphy's ERROR and CRITICAL messages -- TensorRT's own errors and
    the ONNX parser's reach Polygraphy's logger at ERROR -- are captured instead of silenced: yields a
    list that holds them, oldest first, once the block exits (also when it raises)."""
    from polygraphy.logger import G_LOGGER

    captured: list[str] = []
    out = io.StringIO()
    try:
        with G_LOGGER.verbosity(G_LOGGER.ERROR), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield captured
    finally:
        captured.extend(logged_errors(out.getvalue()))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SEVERITY = re.compile(r"^\[(E|!)\]\s?")
# Polygraphy's summaries of an error already logged above them: never the cause.
_GENERIC = ("Could not parse ONNX correctly", "Failed to parse ONNX model", "Invalid Engine", "Invalid network",
            "See logging output above", "Please see the logging output above", "See error log for details")


def logged_errors(text: str) -> list[str]:
    """The messages of Polygraphy's log lines prefixed "[E]" (error) or "[!]" (critical), continuation
    lines joined with spaces."""
    messages: list[str] = []
    current: list[str] | None = None
    for raw in _ANSI.sub("", text).splitlines():
        m = _SEVERITY.match(raw)
        if m:
            if current:
                messages.append(" ".join(current))
            current = [raw[m.end():].strip()]
        elif current is not None and raw.startswith(" ") and raw.strip():
            current.append(raw.strip())
        else:
            if current:
                messages.append(" ".join(current))
            current = None
    if current:
        messages.append(" ".join(current))
    return [m for m in messages if m]


def cause_of_failure(errors: list[str], exc: BaseException | None = None, limit: int = 300) -> str:
    """The last logged error that names a cause (not one of Polygraphy's "see above" summaries); else
    the exception's first line."""
    for msg in reversed(errors):
        if not any(g in msg for g in _GENERIC):
            return msg if len(msg) <= limit else msg[: limit - 3] + "..."
    return first_line(exc) if exc is not None else "no error was logged"



class Runner(ABC):
    """activate -> infer / time_once / time_batch -> deactivate. `x` is a float32 array [batch, C, T...]."""

    backend: str = "?"
    clock: str = "host wall clock around one inference (input copy, compute, output copy, synchronisation)"
    # Iterations one interleaved latency round times on this runner (the round's figure is their median).
    round_iterations: int = 1

    def __init__(self, name: str, graph: str, precision: str):
        self.name = name
        self.graph = graph
        self.precision = precision
        self.is_active = False

    def activate(self) -> "Runner":
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def infer(self, x: np.ndarray) -> np.ndarray:
        if not self.is_active:
            raise RuntimeError(f"runner {self.name} must be activated before infer()")
        return self._infer(np.ascontiguousarray(x, dtype=np.float32))

    def time_once(self, x: np.ndarray) -> float:
        """Seconds for one inference of `x`, host to host (input copy, compute, output copy, sync)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        start = time.perf_counter()
        self._infer(x)
        return time.perf_counter() - start

    def time_batch(self, x: np.ndarray, warmup_s: float = 0.0, min_iters: int = 1, min_seconds: float = 0.0) -> np.ndarray:
        """Per-iteration seconds of inferring `x`: warm up for `warmup_s`, then at least `min_iters`
        iterations and `min_seconds`. This default times with the host clock (`time_once`); a runner
        with a better clock overrides it."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        return timed_loop(lambda n: np.array([self.time_once(x) for _ in range(n)]), warmup_s, min_iters, min_seconds)

    def timing_report(self) -> dict[str, Any]:
        """How this runner's latency figures were taken, for the report."""
        return {"clock": self.clock}

    def infer_batched(self, X: np.ndarray, batch_size: int) -> np.ndarray:
        return np.concatenate([self.infer(X[i : i + batch_size]) for i in range(0, len(X), batch_size)])

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _infer(self, x: np.ndarray) -> np.ndarray: ...

    def _deactivate(self) -> None:
        pass


class PolygraphyRunner(Runner):
    """Wraps a Polygraphy runner made by `make_runner()` on activation (its loaders are lazy too)."""

    def __init__(self, name: str, graph: str, precision: str, make_runner: Callable[[], Any],
                 input_name: str, output_name: str):
        super().__init__(name, graph, precision)
        self._make_runner = make_runner
        self.input_name = input_name
        self.output_name = output_name
        self._runner = None

    def _activate(self) -> None:
        from polygraphy.exception import PolygraphyException

        try:
            with quiet_polygraphy():
                self._runner = self._make_runner()
                self._runner.activate()
        except PolygraphyException as exc:
            self._runner = None
            raise EdgetoolError(f"{self.backend}: cannot load {self.name}: {first_line(exc)}") from None

    def _infer(self, x: np.ndarray) -> np.ndarray:
        out = self._runner.infer({self.input_name: x}, check_inputs=False)
        # Polygraphy runners may reuse output buffers between calls.
        return np.array(out[self.output_name], dtype=np.float32, copy=True)

    def _deactivate(self) -> None:
        with quiet_polygraphy():
            self._runner.deactivate()
        self._runner = None


@dataclass
class Availability:
    usable: bool
    reason: str


class Backend(ABC):
    name: ClassVar[str]

    @abstractmethod
    def probe(self) -> Availability:
        """Can this backend run here? Never raises; says why not."""

    @abstractmethod
    def accuracy_precisions(self) -> list[str]:
        """Precisions whose fused engine is checked against the fused PyTorch model."""

    @abstractmethod
    def latency_precision(self) -> str:
        """The precision deployed on this backend: the one whose latency is compared."""

    @abstractmethod
    def runner(self, ed: EngineDir, graph: str, precision: str, batch_sizes: tuple[int, ...], echo=None) -> Runner:
        """A (not yet active) runner for ENGINE_DIR's `graph` at `precision`, for inputs of `batch_sizes`."""

    def file_runner(self, path: Path, name: str, ed: EngineDir) -> Runner | None:
        """A runner for an FP32 ONNX file outside the engine directory (the unfused model), or None when
        this backend cannot run one directly."""
        return None

    def runtime_graph(self, ed: EngineDir, graph: str, precision: str, out_dir: Path) -> Path | None:
        """The graph as this backend will execute it, as an ONNX file written under `out_dir`, where the
        backend exposes one (verify compares original and fused there too); None where it does not."""
        return None

    def executed_as(self, precision: str) -> str:
        """How this backend actually computes a graph of `precision` (recorded next to its figures)."""
        return precision

    def describe(self) -> dict[str, Any]:
        return {}

    def engine_layers(self, ed: EngineDir, batch_sizes: tuple[int, ...], echo=None) -> dict[str, dict[int, Any]] | None:
        """The engines' layer information per graph and batch size (TensorRT's engine inspector JSON), or
        None for a backend without built engines to inspect."""
        return None

    def device_state(self) -> dict[str, Any]:
        """Facts about the device that bear on timings (power mode, clocks), recorded next to them."""
        return {}

    def latency_crosscheck(self, ed: EngineDir, batch_sizes: tuple[int, ...], echo=None) -> dict[str, Any] | None:
        """An independent timing of the same engines (e.g. trtexec's GPU Compute Time), or None."""
        return None


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    BACKENDS[cls.name] = cls
    return cls
