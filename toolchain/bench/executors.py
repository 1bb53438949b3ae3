"""Where the bench's runs go: `--executor local` (this machine) or `--executor ray` (a Ray cluster).

An executor is a small settings object; `open()` gives the pool that runs the jobs (toolchain.bench.jobs
RunPool, toolchain.bench.raypool RayPool: one interface). EXECUTORS, keyed by each class's `name`, is the
only list of them (the CLI's choices come from it). This module imports neither torch nor Ray, so the
CLI's --help stays instant; the pools are imported when opened."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import EdgetoolError


@dataclass(frozen=True)
class LocalExecutor:
    """This machine: the runs in this process (workers 1) or in `workers` processes, one thread each."""

    workers: int = 1
    name: ClassVar[str] = "local"

    @classmethod
    def from_options(cls, workers: int | None, ray_address: str | None) -> "LocalExecutor":
        if ray_address is not None:
            raise EdgetoolError("--ray-address joins a Ray cluster: it needs --executor ray")
        return cls(1 if workers is None else workers)

    def check(self) -> None:
        if self.workers <= 0:
            raise EdgetoolError(f"--workers must be a positive number of processes, got {self.workers}")

    def open(self):
        from .jobs import RunPool

        self.check()
        return RunPool(self.workers)


@dataclass(frozen=True)
class RayExecutor:
    """Ray tasks, one CPU (and one GPU when training on CUDA) each. `address` None: a local Ray sized to this
    machine, started and stopped by the bench; 'auto' or HOST:PORT: a running cluster (`ray start`)."""

    address: str | None = None
    name: ClassVar[str] = "ray"

    @classmethod
    def from_options(cls, workers: int | None, ray_address: str | None) -> "RayExecutor":
        if workers is not None:
            raise EdgetoolError("--workers sizes the local process pool; with --executor ray every CPU of the Ray "
                                "cluster runs one run at a time (drop --workers)")
        return cls(ray_address)

    def check(self) -> None:
        if self.address is None or self.address == "auto":
            return
        host, sep, port = self.address.removeprefix("ray://").rpartition(":")
        if not host or not sep or not port.isdigit():
            raise EdgetoolError(f"--ray-address {self.address}: expected auto or HOST:PORT (the address `ray start --head` "
                                "printed)")

    def open(self):
        from .raypool import RayPool

        self.check()
        return RayPool(self.address)


EXECUTORS: dict[str, type[LocalExecutor] | type[RayExecutor]] = {e.name: e for e in (LocalExecutor, RayExecutor)}
