"""The engine directory, written by `fuse-export` and read by `verify`:

  original.onnx, fused.onnx                 FP32 graphs of the method-free original and the fused model
  original.fp16.onnx, fused.fp16.onnx       their FP16 graphs (one precision plan for both)
  fuse_report.json                          what fuse-export proved, and the sha256 of every file above
  verify_report.json, verify_junit.xml      what verify proved (written by verify)
  <graph>.fp16.trt<version>.<device>.plan   TensorRT engines cached by verify (+ .json cache key)
  timing.trt<version>.<device>.cache        TensorRT's tactic timing cache, shared by both engines

A failed fuse-export writes no directory; its report goes to `<dir>.failed-report.json` beside it.
This module is the only one that spells these names."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .artifacts import (atomic_dir, atomic_write_files, atomic_write_json, check_output_dir, claimed_output,
                        default_output, json_bytes, output_lock, read_json, remove_stale_scratch,
                        remove_stale_temps_in, sha256_file)
from .errors import EdgetoolError
from .rundir import ADAPTER_FILE, RECIPE_FILE

GRAPHS = ("original", "fused")
PRECISIONS = ("fp32", "fp16")
FUSE_REPORT = "fuse_report.json"
VERIFY_REPORT = "verify_report.json"
VERIFY_JUNIT = "verify_junit.xml"
WHAT = f"an edgetool export (no {FUSE_REPORT})"


def onnx_name(graph: str, precision: str) -> str:
    return f"{graph}.onnx" if precision == "fp32" else f"{graph}.{precision}.onnx"


EXPORT_FILES = tuple(onnx_name(g, p) for p in PRECISIONS for g in GRAPHS)


def plan_name(graph: str, precision: str, tensorrt_version: str, device_slug: str) -> str:
    return f"{graph}.{precision}.trt{tensorrt_version}.{device_slug}.plan"


def timing_cache_name(tensorrt_version: str, device_slug: str) -> str:
    return f"timing.trt{tensorrt_version}.{device_slug}.cache"


def failed_report_path(out: Path) -> Path:
    return out.with_name(f"{out.name}.failed-report.json")


def _export_dir(run_dir: Path, out: Path | None) -> Path:
    return Path(out) if out is not None else default_output("engines", run_dir.name, "the run directory's name")


def check_export_dir(run_dir: Path, out: Path | None, inputs: tuple[tuple[str, Path], ...] = ()) -> Path:
    """The directory fuse-export will write (default engines/<run name>), checked before any work:
    never one holding the run directory or another of `inputs` (base checkpoint, data, --inputs)."""
    return check_output_dir(_export_dir(run_dir, out), (FUSE_REPORT,), WHAT, (("run directory", run_dir), *inputs))


@contextlib.contextmanager
def claimed_export_dir(run_dir: Path, out: Path | None, inputs: tuple[tuple[str, Path], ...] = ()) -> Iterator[Path]:
    """check_export_dir, holding the output's lock for the block (one writer per engine directory)."""
    with claimed_output(_export_dir(run_dir, out), (FUSE_REPORT,), WHAT, (("run directory", run_dir), *inputs)) as path:
        yield path


@contextlib.contextmanager
def writing(out: Path) -> Iterator[Path]:
    """A temp directory that replaces `out` in one rename when the block completes."""
    with atomic_dir(out) as tmp:
        yield tmp


def seal(tmp: Path, report: dict[str, Any]) -> None:
    """Record every exported file's sha256 in the report and write it: the last step of an export."""
    report["files"] = {f: sha256_file(tmp / f) for f in EXPORT_FILES}
    atomic_write_json(tmp / FUSE_REPORT, report)


@dataclass
class EngineDir:
    """An engine directory read back: where its graphs are and what fuse-export recorded."""

    path: Path
    fuse_report: dict[str, Any]
    run_dir: Path
    input_name: str
    output_name: str
    input_shape: tuple[int, ...]  # without the batch axis
    opset: int

    def onnx(self, graph: str, precision: str) -> Path:
        return self.path / onnx_name(graph, precision)

    def plan(self, graph: str, precision: str, tensorrt_version: str, device_slug: str) -> Path:
        return self.path / plan_name(graph, precision, tensorrt_version, device_slug)

    def timing_cache(self, tensorrt_version: str, device_slug: str) -> Path:
        return self.path / timing_cache_name(tensorrt_version, device_slug)

    @property
    def report_path(self) -> Path:
        return self.path / VERIFY_REPORT

    @property
    def junit_path(self) -> Path:
        return self.path / VERIFY_JUNIT

    def write_verify_reports(self, report: dict[str, Any], junit: bytes) -> None:
        """Both reports replace the earlier ones together, only once both are complete."""
        atomic_write_files({self.report_path: json_bytes(report), self.junit_path: junit})


def _not_found(engine_dir: Path) -> EdgetoolError:
    return EdgetoolError(f"ENGINE_DIR not found: {engine_dir} (create it with `edgetool fuse-export RUN_DIR`)")


@contextlib.contextmanager
def verifying(engine_dir: Path | str) -> Iterator[None]:
    """verify's hold on ENGINE_DIR for the block: the lock fuse-export takes to replace it, so the files
    verify reads and the reports it writes are never replaced mid-way (a second writer stops, exit 2).
    What a killed verify left (report temps, TensorRT plan temps, scratch in $TMPDIR) is removed."""
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise _not_found(engine_dir)
    if not os.access(engine_dir, os.W_OK | os.X_OK):
        raise EdgetoolError(f"ENGINE_DIR {engine_dir} is not writable (verify writes {VERIFY_REPORT} and "
                            f"{VERIFY_JUNIT} there)")
    with output_lock(engine_dir):
        remove_stale_temps_in(engine_dir)
        remove_stale_scratch()
        yield


def read_engine_dir(engine_dir: Path | str) -> EngineDir:
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise _not_found(engine_dir)
    report_path = engine_dir / FUSE_REPORT
    if not report_path.is_file():
        raise EdgetoolError(f"{engine_dir} is not an edgetool engine directory (no {FUSE_REPORT}); "
                            "create one with `edgetool fuse-export RUN_DIR`")
    rep = read_json(report_path, "fuse report")
    if not isinstance(rep, dict):
        raise EdgetoolError(f"{report_path} is not a fuse report (expected a JSON object)")
    missing = [k for k in ("run_dir", "input_shape") if k not in rep]
    if missing:
        raise EdgetoolError(f"{report_path} lacks {', '.join(missing)}; rerun `edgetool fuse-export`")
    for name in EXPORT_FILES:
        if not (engine_dir / name).is_file():
            raise EdgetoolError(f"{engine_dir / name} not found: ENGINE_DIR is incomplete; rerun `edgetool fuse-export`")
    try:
        run_dir = Path(rep["run_dir"])
        input_shape = tuple(int(d) for d in rep["input_shape"])
        opset = int(rep.get("opset", 17))
    except (TypeError, ValueError) as exc:
        raise EdgetoolError(f"{report_path} is malformed ({exc}); rerun `edgetool fuse-export`") from None
    if not run_dir.is_absolute():
        run_dir = (engine_dir / run_dir).resolve()
        # The engine directory moved without its run: the absolute path recorded at export, if it is still there.
        fallback = Path(rep.get("run_dir_absolute") or run_dir)
        if not run_dir.is_dir() and fallback.is_dir():
            run_dir = fallback
    if not run_dir.is_dir():
        raise EdgetoolError(f"the run directory ENGINE_DIR was exported from, {run_dir} (recorded in {report_path}), "
                            "no longer exists; rerun `edgetool fuse-export RUN_DIR` on the run where it is now")
    check_exported_from(run_dir, rep, engine_dir)
    return EngineDir(engine_dir, rep, run_dir, rep.get("input_name", "input"), rep.get("output_name", "logits"),
                     input_shape, opset)


def check_exported_from(run_dir: Path, rep: dict[str, Any], engine_dir: Path) -> None:
    """The run directory the fuse report names is the one these engines were exported from: its adapter.pt
    (which records its recipe.yaml's sha256) and recipe.yaml have the sha256 the report records. Fails
    closed: a report without the adapter's hash cannot show which run it belongs to, so editing `run_dir`
    never sends verify to another run."""
    if not isinstance(rep.get("adapter_sha256"), str):
        raise EdgetoolError(f"{engine_dir / FUSE_REPORT} records no sha256 of the run's {ADAPTER_FILE}: it cannot show "
                            "which run it was exported from; rerun `edgetool fuse-export RUN_DIR`")
    for name, key in ((ADAPTER_FILE, "adapter_sha256"), (RECIPE_FILE, "recipe_sha256")):
        path = run_dir / name
        if key not in rep:
            continue  # recipe_sha256: reports from before it was recorded (the adapter's hash covers it since)
        if not path.is_file():
            raise EdgetoolError(f"{run_dir}, the run directory {engine_dir / FUSE_REPORT} names, has no {name}: "
                                f"rerun `edgetool fuse-export RUN_DIR` on the run these engines came from")
        if sha256_file(path) != rep[key]:
            raise EdgetoolError(f"{path} is not the {name} {engine_dir} was exported from (its sha256 is not the one "
                                f"{FUSE_REPORT} records): it changed since fuse-export wrote the engines (the run was "
                                f"adapted again), or the report names another run; rerun `edgetool fuse-export {run_dir}`")


def engine_file_hashes(ed: EngineDir) -> dict[str, str]:
    """The sha256 of every exported file as it is now (read_engine_dir checked they exist)."""
    return {f: sha256_file(ed.path / f) for f in EXPORT_FILES}


def integrity_problems(ed: EngineDir, hashes: dict[str, str]) -> dict[str, str]:
    """{file: what is wrong} for every exported file whose sha256 (`hashes`, as now) is not the one
    fuse-export sealed into fuse_report.json; a file with no recorded hash counts as changed."""
    recorded = ed.fuse_report.get("files")
    if not isinstance(recorded, dict):
        recorded = {}
    problems = {}
    for f in EXPORT_FILES:
        if f not in recorded:
            problems[f] = f"{FUSE_REPORT} records no sha256 for {f}"
        elif recorded[f] != hashes[f]:
            problems[f] = (f"{f} changed since fuse-export sealed it (sha256 {hashes[f][:12]}, "
                           f"{FUSE_REPORT} records {str(recorded[f])[:12]})")
    return problems


def changed_since_export(ed: EngineDir, hashes: dict[str, str] | None = None) -> list[str]:
    """Files whose sha256 differs from what fuse-export recorded."""
    return sorted(integrity_problems(ed, hashes or engine_file_hashes(ed)))
