"""The bench's runs as Ray tasks: on a local Ray sized to this machine, or on a running cluster.

`RayPool` has `RunPool`'s interface (toolchain.bench.jobs), so the bench stage does not know which one it
drives. A batch's inputs (data, base model, the original's ONNX graph) are pickled once by the driver, put
in Ray's object store and fetched by each worker process once per batch: nodes need edgetool installed,
not the recipe's files. Each task asks for one CPU (it trains on one thread) and, for a recipe training on
CUDA, one GPU. A task that raises, or whose worker or node is lost after Ray's retries, is one line naming
the run; nothing from a bench with a failed run is written. Leaving the pool early (Ctrl-C, a failed run)
cancels the tasks still outstanding, and a local Ray started here is shut down."""

from __future__ import annotations

import logging
import pickle
import signal
import socket
import threading
from typing import Any, Callable

import torch

from ..errors import EdgetoolError, first_line
from .jobs import Job, pickled_inputs, run_failed, run_name

INSTALL_HINT = 'pip install "edgetool[ray]"'
# Seconds to wait for a TCP answer from a cluster's address before calling it unreachable: without this
# check, ray.init waits about a minute (and logs retries) for an address where nothing listens.
CONNECT_TIMEOUT_S = 5.0
# Ray runs a task again when its worker process or node dies (runs are deterministic: a rerun gives the same
# figures); an exception raised by the run itself is never retried.
RETRIES_ON_LOST_WORKER = 3
CANCEL_ROUNDS, CANCEL_WAIT_S = 3, 2.0


def import_ray():
    try:
        import ray
    except ImportError:
        raise EdgetoolError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def _probe(address: str) -> None:
    """Exit 2 naming `address` when nothing answers at its host:port (or 'auto' finds no cluster)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")  # the form is checked by RayExecutor.check
    if not host or not port.isdigit():  # 'auto' this Ray could not resolve here: ray.init resolves it
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise EdgetoolError(f"--ray-address {address}: no Ray cluster can be reached there ({exc.strerror or exc}); "
                            "start one with `ray start --head` or give the address it printed") from None


def _cluster_address(ray, address: str) -> str:
    """'auto' as Ray resolves it (RAY_ADDRESS, else the cluster last started on this machine), else `address`."""
    if address != "auto":
        return address
    try:
        from ray._private.services import canonicalize_bootstrap_address
        found = canonicalize_bootstrap_address("auto")
    except (ImportError, AttributeError):  # a Ray whose internals moved: let ray.init resolve it
        return address
    except ConnectionError as exc:
        raise EdgetoolError(f"--ray-address auto: no running Ray cluster found ({first_line(exc)}); start one with "
                            "`ray start --head`, or give HOST:PORT") from None
    if not found:
        raise EdgetoolError("--ray-address auto: no running Ray cluster found; start one with `ray start --head`, "
                            "or give HOST:PORT")
    return found


# In a Ray worker process: the inputs of the batch it last ran, by object id (kept like RunPool's workers do,
# so a worker unpickles a batch's data and models once, not once per run).
_LOADED: dict[str, Any] = {}


def _run_task(fn: Callable, inputs_ref: list, job: Job) -> dict[str, Any]:
    # inputs_ref comes wrapped in a list so that Ray passes the reference itself, not the object.
    import ray

    key = inputs_ref[0].hex()
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = pickle.loads(ray.get(inputs_ref[0]))
    torch.set_num_threads(1)
    try:
        return fn(_LOADED[key], job)
    except Exception as exc:
        exc.edgetool_node = ray.util.get_node_ip_address()  # travels with the pickled exception to the driver
        raise


class RayPool:
    """RunPool's interface on Ray. `address`: None starts a local Ray sized to this machine (shut down on
    leaving); 'auto' or HOST:PORT joins a running cluster. A Ray this process had started already is used as
    it is (and left running)."""

    def __init__(self, address: str | None = None, gpus_per_run: int = 0):
        self.address, self.gpus_per_run = address, gpus_per_run
        self.ray = None
        self.started = False
        self.pending: list = []
        self._task = None

    def __enter__(self) -> "RayPool":
        ray = self.ray = import_ray()
        if not ray.is_initialized():
            options = {"logging_level": logging.ERROR, "log_to_driver": False, "configure_logging": True}
            if self.address is None:
                options.update(address="local", include_dashboard=False)
            else:
                _probe(_cluster_address(ray, self.address))
                # 'auto' itself, not what it resolved to: Ray takes the token of a token-authenticated cluster
                # (Ray >= 2.5x) from ~/.ray only for a cluster it found itself
                options["address"] = self.address
            try:
                ray.init(**options)
            except Exception as exc:  # noqa: BLE001  Ray raises plain Exception too, e.g. a node that timed out starting
                if self.address is None:
                    raise EdgetoolError(f"--executor ray: cannot start a local Ray ({first_line(exc)})") from None
                raise EdgetoolError(f"--ray-address {self.address}: cannot join the Ray cluster there ({first_line(exc)}); "
                                    "a cluster with token authentication also needs RAY_AUTH_MODE=token and its token "
                                    "(Ray's docs: token-auth)") from None
            self.started = True
        if threading.current_thread() is threading.main_thread():
            # Ray's core may take over SIGINT in this process; Ctrl-C must reach the driver itself as
            # KeyboardInterrupt (cancel, exit 130), not only the workers it happens to hit.
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self._task = ray.remote(_run_task)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._cancel()
        if self.started:
            self.ray.shutdown()

    def _cancel(self) -> None:
        # A task being handed to a worker while it is cancelled can miss the cancel and run to its end: cancel
        # again whatever has not stopped after a moment (a few rounds, then leave it to Ray).
        left = list(self.pending)
        for _ in range(CANCEL_ROUNDS):
            for ref in left:
                try:
                    self.ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001  the task finished or its worker is gone: nothing to cancel
                    pass
            if not left:
                break
            try:
                _, left = self.ray.wait(left, num_returns=len(left), timeout=CANCEL_WAIT_S)
            except Exception:  # noqa: BLE001  e.g. the cluster went away: nothing left to cancel there
                break
        self.pending.clear()

    def for_recipe(self, device: str) -> "RayPool":
        """This pool, for the next recipe's runs, which train on `device`: each asks Ray for one GPU when it
        is CUDA (Ray then shows the run only its GPU, as device cuda)."""
        kind = str(device).split(":")[0]
        if kind == "cuda" and ":" in str(device):
            raise EdgetoolError(f"--executor ray gives each run one GPU of its node: train on device cuda, not {device}")
        self.gpus_per_run = 1 if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()) else 0
        if self.gpus_per_run and self.ray.cluster_resources().get("GPU", 0) < 1:
            # Ray would wait for a GPU forever (an infeasible task), not fail
            raise EdgetoolError(f"training on {device}: the Ray cluster ({self.address or 'local'}) has no GPU; "
                                "add nodes with GPUs or train on --device cpu")
        return self

    def describe(self) -> dict[str, Any]:
        resources = self.ray.cluster_resources()
        return {"name": "ray", "address": self.address or "local",
                "nodes": len([n for n in self.ray.nodes() if n.get("Alive")]),
                "cpus": int(resources.get("CPU", 0)), "gpus": int(resources.get("GPU", 0)),
                "gpus_per_run": self.gpus_per_run}

    def run(self, fn: Callable[[Any, Job], dict[str, Any]], jobs: list[Job], inputs,
            on_done: Callable[[Job, dict[str, Any]], None] | None = None) -> dict[Job, dict[str, Any]]:
        """{job: fn(inputs, job)}; on_done(job, result) is called in this process as each run finishes."""
        ray = self.ray
        ref = ray.put(pickled_inputs(inputs, "--executor ray", "--executor local"))
        task = self._task.options(num_cpus=1, num_gpus=self.gpus_per_run, max_retries=RETRIES_ON_LOST_WORKER)
        waiting = {task.remote(fn, [ref], job): job for job in jobs}
        self.pending[:] = waiting
        results: dict[Job, dict[str, Any]] = {}
        try:
            while waiting:
                # a bounded wait, so that this thread runs Python (and a pending Ctrl-C) at least every second
                done, _ = ray.wait(list(waiting), num_returns=1, timeout=1.0)
                if not done:
                    continue
                job = waiting.pop(done[0])
                self.pending.remove(done[0])
                try:
                    results[job] = ray.get(done[0])
                except ray.exceptions.RayTaskError as exc:
                    if isinstance(exc.cause, KeyboardInterrupt):  # Ctrl-C reached the worker first
                        raise KeyboardInterrupt from None
                    node = getattr(exc.cause, "edgetool_node", None)
                    raise run_failed(run_name(fn, inputs, job), exc.cause, f" on node {node}" if node else "") from exc
                except ray.exceptions.RayError as exc:  # the worker or node died, also on every retry
                    raise EdgetoolError(f"run '{run_name(fn, inputs, job)}' failed: its Ray worker or node was lost "
                                        f"({type(exc).__name__}: {first_line(exc)})") from None
                if on_done is not None:
                    on_done(job, results[job])
        except BaseException:  # a failed run, Ctrl-C: the batch's other runs would only be thrown away
            self._cancel()
            raise
        return results
