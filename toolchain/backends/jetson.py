"""Jetson facts that bear on engines and timings: the Jetson Linux (L4T) release, the power mode
(`nvpmodel -q`) and whether the clocks are pinned (what `jetson_clocks` does: every CPU's, the GPU's and
the memory controller's (EMC) minimum frequency raised to its maximum). Read from files and one command that need no root, parsed by
pure functions; a fact that cannot be read is recorded as missing, never an error.

A Jetson is recognised by `/etc/nv_tegra_release`, whose first line reads like
`# R36 (release), REVISION: 4.0, GCID: ..., BOARD: generic, EABI: aarch64, DATE: ...` (L4T 36.4.0,
JetPack 6.1). `jetson_clocks --show` needs root, so the clock state comes from sysfs instead. The EMC
clock is only in debugfs (`/sys/kernel/debug/bpmp/debug/clk/emc/`, where jetson_clocks pins it), which
only root can read: without it the clock state says "unknown" rather than "pinned"."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

L4T_RELEASE_FILE = Path("/etc/nv_tegra_release")
SYSFS = Path("/sys")
# devfreq device names of Jetson GPUs (Orin: 17000000.gpu on JetPack 6, 17000000.ga10b on JetPack 5).
_GPU_DEVFREQ = re.compile(r"gpu|ga10b|gv11b|gp10b|gm20b", re.IGNORECASE)
# Where jetson_clocks pins the memory (EMC) clock on Orin (BPMP debugfs; root only). Rates in Hz.
EMC_DEBUGFS = Path("kernel/debug/bpmp/debug/clk/emc")
_L4T = re.compile(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", re.IGNORECASE)


def parse_l4t_release(text: str) -> str | None:
    """"36.4.0" for "# R36 (release), REVISION: 4.0, ..."; None when the text is not of that form."""
    m = _L4T.search(text or "")
    return f"{m.group(1)}.{m.group(2)}" if m else None


def parse_nvpmodel(text: str) -> dict[str, Any]:
    """`nvpmodel -q` prints the mode's name after "NV Power Mode:" and its number on the next line:
    {"name": "15W", "id": 0}; keys whose value cannot be found are left out."""
    out: dict[str, Any] = {}
    lines = (text or "").splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"NV Power Mode:\s*(.+)", line)
        if m:
            out["name"] = m.group(1).strip()
            for nxt in lines[i + 1:]:
                if nxt.strip().isdigit():
                    out["id"] = int(nxt.strip())
                    break
                if nxt.strip() and not nxt.startswith("NVPM"):
                    break
    return out


def clock_state(freqs: dict[str, dict[str, int]]) -> dict[str, Any]:
    """From {"gpu": {"min": hz, "max": hz, "cur": hz}, "emc": {... hz}, "cpu0": {... kHz}, ...}: whether
    every clock is pinned (min == max, as jetson_clocks leaves them), and the current GPU and memory (EMC)
    frequencies in MHz. `pinned` is True only when the GPU, every CPU and the EMC clock were read and are
    pinned, False when one read is not, and None ("unknown") when all read ones are but the EMC clock
    could not be read (debugfs needs root)."""
    complete = {k: v for k, v in freqs.items() if {"min", "max"} <= v.keys()}
    out: dict[str, Any] = {"pinned": bool(complete) and all(map(_pinned, complete.values())),
                           "unpinned": sorted(k for k, v in complete.items() if not _pinned(v))}
    gpu = freqs.get("gpu", {})
    if "cur" in gpu:
        out["gpu_mhz"] = round(gpu["cur"] / 1e6, 1)
    if "max" in gpu:
        out["gpu_max_mhz"] = round(gpu["max"] / 1e6, 1)
    emc = freqs.get("emc", {})
    if "cur" in emc:
        out["emc_mhz"] = round(emc["cur"] / 1e6, 1)
    if "gpu" not in complete:
        out["pinned"] = False
        out["note"] = "GPU frequency limits not readable"
    elif "emc" not in complete and out["pinned"]:
        out["pinned"] = None
        out["note"] = (f"memory (EMC) clock not readable (/sys/{EMC_DEBUGFS} needs root): CPU and GPU clocks are "
                       "pinned, the memory clock is unknown")
    return out


def _pinned(clock: dict[str, int]) -> bool:
    # jetson_clocks pins the EMC clock by locking its rate at the maximum (mrq_rate_locked) rather than
    # raising its minimum, so a locked clock at its maximum counts as pinned too.
    return clock["min"] == clock["max"] or (clock.get("locked") == 1 and clock.get("cur") == clock["max"])


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def read_frequencies(sysfs: Path = SYSFS) -> dict[str, dict[str, int]]:
    freqs: dict[str, dict[str, int]] = {}
    devfreq = sysfs / "class" / "devfreq"
    gpus = sorted(p for p in devfreq.glob("*") if _GPU_DEVFREQ.search(p.name)) if devfreq.is_dir() else []
    if gpus:
        vals = {k: _read_int(gpus[0] / f"{k}_freq") for k in ("min", "max", "cur")}
        freqs["gpu"] = {k: v for k, v in vals.items() if v is not None}
    emc = {k: _read_int(sysfs / EMC_DEBUGFS / f) for k, f in (("min", "min_rate"), ("max", "max_rate"), ("cur", "rate"),
                                                                 ("locked", "mrq_rate_locked"))}
    if any(v is not None for v in emc.values()):
        freqs["emc"] = {k: v for k, v in emc.items() if v is not None}
    for cpu in sorted((sysfs / "devices" / "system" / "cpu").glob("cpu[0-9]*")):
        vals = {k: _read_int(cpu / "cpufreq" / f"scaling_{k}_freq") for k in ("min", "max", "cur")}
        got = {k: v for k, v in vals.items() if v is not None}
        if got:
            freqs[cpu.name] = got
    return freqs


def read_nvpmodel(timeout: float = 10.0) -> dict[str, Any]:
    exe = shutil.which("nvpmodel")
    if exe is None:
        return {"error": "nvpmodel not found"}
    try:
        res = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"nvpmodel -q failed ({type(exc).__name__})"}
    parsed = parse_nvpmodel(res.stdout + "\n" + res.stderr)
    return parsed or {"error": f"nvpmodel -q printed no power mode (exit {res.returncode})"}


def l4t_release(release_file: Path = L4T_RELEASE_FILE) -> str | None:
    """The L4T release of this Jetson, or None when this is not one (or the file is unreadable)."""
    try:
        return parse_l4t_release(release_file.read_text(errors="replace"))
    except OSError:
        return None


def jetson_state(release_file: Path = L4T_RELEASE_FILE, sysfs: Path = SYSFS) -> dict[str, Any] | None:
    """Power mode and clock state on a Jetson (None elsewhere), for the report next to the timings."""
    release = l4t_release(release_file)
    if release is None and not release_file.exists():
        return None
    return {"l4t_release": release, "power_mode": read_nvpmodel(), "clocks": clock_state(read_frequencies(sysfs))}
