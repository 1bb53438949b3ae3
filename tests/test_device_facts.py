"""Facts recorded next to GPU timings: a Jetson's L4T release, power mode and clock state
(toolchain.backends.jetson) and trtexec's GPU Compute Time (toolchain.backends.trtexec).

FIXTURES: the texts below are written by hand in the formats the real tools print -- /etc/nv_tegra_release's
first line (`# R36 (release), REVISION: 4.0, GCID: ..., BOARD: generic, EABI: aarch64, DATE: ...`),
`nvpmodel -q` ("NV Power Mode: <name>" then the mode number), trtexec's performance summary
(samples/common/sampleReporting.cpp, printEpilog, behind its "[date] [I] " log prefix) -- with invented
numbers. The sysfs tree is built in a temporary directory, and `run_trtexec` runs a stand-in script that
prints such a summary (not trtexec, not TensorRT)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from toolchain.backends.jetson import clock_state, jetson_state, parse_l4t_release, parse_nvpmodel, read_frequencies
from toolchain.backends.trtexec import parse_gpu_compute_time, run_trtexec, trtexec_command

NV_TEGRA_RELEASE = ("# R36 (release), REVISION: 4.0, GCID: 12345678, BOARD: generic, EABI: aarch64, "
                    "DATE: Mon Sep  9 10:00:00 UTC 2024\n# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n")

NVPMODEL_Q = "NV Power Mode: 15W\n0\n"
NVPMODEL_Q_VERBOSE = ("NVPM VERB: Config file: /etc/nvpmodel.conf\nNVPM VERB: parsing done for /etc/nvpmodel.conf\n"
                      "NVPM VERB: Current mode: NV Power Mode: MAXN_SUPER\n2\n"
                      "NVPM VERB: PARAM CPU_ONLINE: ARG CORE_0: PATH /sys/devices/system/cpu/cpu0/online: REAL_VAL: 1\n")

TRTEXEC_SUMMARY = """\
[09/12/2024-14:02:11] [I] === Performance summary ===
[09/12/2024-14:02:11] [I] Throughput: 9123.45 qps
[09/12/2024-14:02:11] [I] Latency: min = 0.101 ms, max = 0.412 ms, mean = 0.108 ms, median = 0.106 ms, percentile(90%) = 0.111 ms, percentile(95%) = 0.114 ms, percentile(99%) = 0.131 ms
[09/12/2024-14:02:11] [I] Enqueue Time: min = 0.0121 ms, max = 0.0712 ms, mean = 0.0142 ms, median = 0.0137 ms, percentile(90%) = 0.0155 ms, percentile(95%) = 0.0161 ms, percentile(99%) = 0.0203 ms
[09/12/2024-14:02:11] [I] H2D Latency: min = 0 ms, max = 0 ms, mean = 0 ms, median = 0 ms, percentile(90%) = 0 ms, percentile(95%) = 0 ms, percentile(99%) = 0 ms
[09/12/2024-14:02:11] [I] GPU Compute Time: min = 0.0981 ms, max = 0.405 ms, mean = 0.1042 ms, median = 0.1027 ms, percentile(90%) = 0.1078 ms, percentile(95%) = 0.1109 ms, percentile(99%) = 0.1264 ms
[09/12/2024-14:02:11] [I] D2H Latency: min = 0 ms, max = 0 ms, mean = 0 ms, median = 0 ms, percentile(90%) = 0 ms, percentile(95%) = 0 ms, percentile(99%) = 0 ms
[09/12/2024-14:02:11] [I] Total Host Walltime: 2.00031 s
[09/12/2024-14:02:11] [I] Total GPU Compute Time: 1.9877 s
[09/12/2024-14:02:11] [I] Explanations of the performance metrics are printed in the verbose logs.
&&&& PASSED TensorRT.trtexec [TensorRT v100300] # trtexec --loadEngine=fused.plan
"""


def test_l4t_release_is_parsed():
    assert parse_l4t_release(NV_TEGRA_RELEASE) == "36.4.0"
    assert parse_l4t_release("# R35 (release), REVISION: 5.0, GCID: 1, BOARD: t186ref") == "35.5.0"
    assert parse_l4t_release("Ubuntu 22.04") is None and parse_l4t_release("") is None


def test_nvpmodel_query_is_parsed():
    assert parse_nvpmodel(NVPMODEL_Q) == {"name": "15W", "id": 0}
    assert parse_nvpmodel(NVPMODEL_Q_VERBOSE) == {"name": "MAXN_SUPER", "id": 2}
    assert parse_nvpmodel("nvpmodel: command failed") == {}


def test_clock_state_pinned_only_when_every_clock_is():
    pinned = {"gpu": {"min": 1_020_000_000, "max": 1_020_000_000, "cur": 1_020_000_000},
              "cpu0": {"min": 1_510_400, "max": 1_510_400, "cur": 1_510_400}}
    emc = {"min": 3_199_000_000, "max": 3_199_000_000, "cur": 3_199_000_000}
    assert clock_state({**pinned, "emc": emc}) == {"pinned": True, "unpinned": [], "gpu_mhz": 1020.0,
                                                   "gpu_max_mhz": 1020.0, "emc_mhz": 3199.0}
    scaling = {**pinned, "gpu": {"min": 306_000_000, "max": 1_020_000_000, "cur": 306_000_000}}
    st = clock_state(scaling)
    assert not st["pinned"] and st["unpinned"] == ["gpu"] and st["gpu_mhz"] == 306.0
    no_gpu = clock_state({"cpu0": pinned["cpu0"]})
    assert not no_gpu["pinned"] and "GPU" in no_gpu["note"]


def test_memory_clock_counts_toward_pinned():
    # jetson_clocks also pins the EMC (memory) clock: locks its rate at the maximum (BPMP debugfs).
    cpu_gpu = {"gpu": {"min": 1_020_000_000, "max": 1_020_000_000, "cur": 1_020_000_000},
               "cpu0": {"min": 1_510_400, "max": 1_510_400, "cur": 1_510_400}}
    emc_pinned = {"min": 204_000_000, "max": 3_199_000_000, "cur": 3_199_000_000, "locked": 1}
    assert clock_state({**cpu_gpu, "emc": emc_pinned})["pinned"] is True
    scaling = clock_state({**cpu_gpu, "emc": {**emc_pinned, "locked": 0, "cur": 665_600_000}})
    assert scaling["pinned"] is False and scaling["unpinned"] == ["emc"] and scaling["emc_mhz"] == 665.6
    unknown = clock_state(cpu_gpu)  # debugfs unreadable without root
    assert unknown["pinned"] is None and "EMC" in unknown["note"] and "needs root" in unknown["note"]


def test_memory_clock_is_read_from_bpmp_debugfs(tmp_path):
    emc = tmp_path / "kernel" / "debug" / "bpmp" / "debug" / "clk" / "emc"
    emc.mkdir(parents=True)
    for name, value in (("min_rate", 204_000_000), ("max_rate", 3_199_000_000), ("rate", 3_199_000_000),
                        ("mrq_rate_locked", 1)):
        (emc / name).write_text(f"{value}\n")
    assert read_frequencies(tmp_path)["emc"] == {"min": 204_000_000, "max": 3_199_000_000, "cur": 3_199_000_000,
                                                 "locked": 1}


def _sysfs(root: Path, gpu_min: int, gpu_max: int) -> Path:
    gpu = root / "class" / "devfreq" / "17000000.gpu"
    gpu.mkdir(parents=True)
    for name, value in (("min_freq", gpu_min), ("max_freq", gpu_max), ("cur_freq", gpu_min)):
        (gpu / name).write_text(f"{value}\n")
    (root / "class" / "devfreq" / "15340000.vic").mkdir()  # another devfreq device, not the GPU
    for cpu in ("cpu0", "cpu1"):
        d = root / "devices" / "system" / "cpu" / cpu / "cpufreq"
        d.mkdir(parents=True)
        for name in ("scaling_min_freq", "scaling_max_freq", "scaling_cur_freq"):
            (d / name).write_text("1510400\n")
    return root


def test_frequencies_are_read_from_sysfs(tmp_path):
    freqs = read_frequencies(_sysfs(tmp_path, 306_000_000, 1_020_000_000))
    assert freqs == {"gpu": {"min": 306_000_000, "max": 1_020_000_000, "cur": 306_000_000},
                     "cpu0": {"min": 1_510_400, "max": 1_510_400, "cur": 1_510_400},
                     "cpu1": {"min": 1_510_400, "max": 1_510_400, "cur": 1_510_400}}
    assert read_frequencies(tmp_path / "absent") == {}


def test_jetson_state_only_on_a_jetson_and_never_fails(tmp_path, monkeypatch):
    assert jetson_state(tmp_path / "no_nv_tegra_release", tmp_path) is None
    release = tmp_path / "nv_tegra_release"
    release.write_text(NV_TEGRA_RELEASE)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no nvpmodel here
    state = jetson_state(release, _sysfs(tmp_path / "sys", 1_020_000_000, 1_020_000_000))
    assert state["l4t_release"] == "36.4.0" and state["power_mode"] == {"error": "nvpmodel not found"}
    assert state["clocks"]["pinned"] is None and state["clocks"]["gpu_mhz"] == 1020.0  # EMC unreadable here


def test_trtexec_gpu_compute_time_is_parsed_not_the_total():
    stats = parse_gpu_compute_time(TRTEXEC_SUMMARY)
    assert stats == {"min": 0.0981, "max": 0.405, "mean": 0.1042, "median": 0.1027, "p90": 0.1078, "p95": 0.1109,
                     "p99": 0.1264}
    assert parse_gpu_compute_time("[I] Total GPU Compute Time: 1.9877 s\n") is None
    assert parse_gpu_compute_time("") is None


def test_trtexec_command_times_the_cached_plan_on_its_profile():
    cmd = trtexec_command("trtexec", Path("e/fused.fp16.trt10.3.0.sm87-orin.plan"), "input", (32, 9, 100), 1)
    assert cmd == ["trtexec", "--loadEngine=e/fused.fp16.trt10.3.0.sm87-orin.plan", "--shapes=input:32x9x100",
                   "--useProfile=1", "--useCudaGraph", "--noDataTransfers", "--warmUp=200", "--duration=2"]


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "trtexec-stand-in"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_run_trtexec_records_figures_or_the_reason(tmp_path):
    summary = tmp_path / "summary.txt"
    summary.write_text(TRTEXEC_SUMMARY)
    ok = run_trtexec([_script(tmp_path, f'cat "{summary}"\n'), "--loadEngine=x.plan"])
    assert ok["gpu_compute_ms"]["median"] == 0.1027 and ok["command"].endswith("--loadEngine=x.plan")
    bad = run_trtexec([_script(tmp_path, 'echo "[01/01/2025-00:00:00] [E] Error[1]: [runtime.cpp::parsePlan::314] '
                                         'Serialization assertion plan->header.magicTag == rt::kPLAN_MAGIC_TAG failed."\n'
                                         "exit 1\n")])
    assert bad["error"].startswith("trtexec exited 1 without a GPU Compute Time: [01/01/2025-00:00:00] [E] Error[1]")
    missing = run_trtexec([os.fspath(tmp_path / "no-such-trtexec")])
    assert missing["error"] == "trtexec did not finish (FileNotFoundError)"
