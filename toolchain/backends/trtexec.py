"""An independent timing of verify's engines: NVIDIA's `trtexec` loads the same plan file and reports
its "GPU Compute Time" (CUDA graph, no host/device copies). Recorded next to verify's own figures when
trtexec is found; its absence or failure is recorded, never an error.

trtexec prints its summary as log lines such as
`[05/19/2024-17:33:07] [I] GPU Compute Time: min = 0.185 ms, max = 0.941 ms, mean = 0.191 ms, median = 0.187 ms, percentile(90%) = 0.188 ms, ...`
(samples/common/sampleReporting.cpp, `printEpilog`)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

# JetPack installs trtexec here, off the PATH.
JETPACK_TRTEXEC = Path("/usr/src/tensorrt/bin/trtexec")

_LINE = re.compile(r"(?<!Total )GPU Compute Time:\s*(.+)$", re.MULTILINE)
_STAT = re.compile(r"(min|max|mean|median|percentile\((\d+(?:\.\d+)?)%\))\s*=\s*([0-9.eE+-]+)\s*ms")


def find_trtexec() -> str | None:
    exe = shutil.which("trtexec")
    if exe is None and JETPACK_TRTEXEC.is_file():
        exe = str(JETPACK_TRTEXEC)
    return exe


def parse_gpu_compute_time(text: str) -> dict[str, float] | None:
    """{"min", "max", "mean", "median", "p90", "p99", ...} in ms from trtexec's last "GPU Compute Time"
    line, or None when it printed none."""
    lines = _LINE.findall(text or "")
    if not lines:
        return None
    stats: dict[str, float] = {}
    for name, pct, value in _STAT.findall(lines[-1]):
        key = f"p{pct}" if pct else name
        stats[key] = float(value)
    return stats or None


def trtexec_command(exe: str, plan: Path, input_name: str, shape: tuple[int, ...], profile: int,
                    warmup_ms: int = 200, duration_s: int = 2) -> list[str]:
    dims = "x".join(str(d) for d in shape)
    # --useCudaGraph and --noDataTransfers are the defaults (and no-ops) from TensorRT 11 on.
    return [exe, f"--loadEngine={plan}", f"--shapes={input_name}:{dims}", f"--useProfile={profile}",
            "--useCudaGraph", "--noDataTransfers", f"--warmUp={warmup_ms}", f"--duration={duration_s}"]


def run_trtexec(cmd: list[str], timeout: float = 300.0) -> dict[str, Any]:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"trtexec did not finish ({type(exc).__name__})", "command": " ".join(cmd)}
    stats = parse_gpu_compute_time(res.stdout)
    if stats is None:
        tail = [ln for ln in (res.stdout + res.stderr).splitlines() if "[E]" in ln][-1:]
        return {"error": f"trtexec exited {res.returncode} without a GPU Compute Time"
                         + (f": {tail[0].strip()[:200]}" if tail else ""), "command": " ".join(cmd)}
    return {"gpu_compute_ms": stats, "command": " ".join(cmd)}
