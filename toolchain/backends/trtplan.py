"""What verify builds with TensorRT, decided without TensorRT: which ONNX file, strongly or weakly typed,
which builder flags, which optimisation profiles, the engine cache key and when a cached engine is stale.
`backends/tensorrt.py` reads the facts off the installed TensorRT (`trt_facts`) and carries the plan out;
tests describe TensorRT 10.3 and 11 with stand-in facts.

One precision plan: by default engines are built from `*.fp16.onnx` -- the graph fuse-export calibrated
(its FP16 block list) and ONNX Runtime checked -- as strongly typed networks, so every tensor has exactly
the type that graph gives it, on TensorRT 10 (JetPack 6.1/6.2 ships 10.3) and 11 alike. The one
alternative, `weak-fp16-flag`, builds the FP32 graph with the FP16 builder flag: the classic
`trtexec --fp16` deployment, and the only FP16 path on TensorRT 8.6 (JetPack 6.0), which has no strongly
typed networks. TensorRT then picks each layer's precision itself, so that engine runs a graph nobody
checked on the CPU; verify still checks its accuracy against PyTorch, and the engine-identity check
shows whether original and fused got the same precisions. TensorRT 11 removed the FP16 flag. Like
`trtexec --fp16`, that build also allows TF32 for its FP32 layers (trtexec enables TF32 unless --noTF32;
Polygraphy's CreateConfig clears it unless asked).

On TensorRT 8.6 the engines are built with PreviewFeature.PROFILE_SHARING_0806 (off by default there;
deprecated and always on from TensorRT 10): the timing context shares its profile with the runner's
own, which 8.6 otherwise refuses ("Profile 0 has been chosen by another IExecutionContext")."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgetoolError

STRONGLY_TYPED = "strongly-typed"
WEAK_FP16_FLAG = "weak-fp16-flag"
BUILD_MODES = (STRONGLY_TYPED, WEAK_FP16_FLAG)

# The 8.6 preview feature that lets two execution contexts use one optimisation profile.
PROFILE_SHARING = "PROFILE_SHARING_0806"

# Polygraphy releases below this crash in CreateConfig on TensorRT 11 (it sets flags TensorRT 11 removed).
POLYGRAPHY_MIN_FOR_TRT11 = (0, 50)


def version_tuple(version: str) -> tuple[int, ...]:
    """(10, 3, 0) for "10.3.0.26" style versions: the leading run of dotted integers."""
    nums = []
    for part in str(version).split("."):
        m = re.match(r"\d+", part)
        if m is None:
            break
        nums.append(int(m.group()))
        if m.end() != len(part):
            break
    return tuple(nums)


@dataclass(frozen=True)
class TrtFacts:
    """What the installed TensorRT offers, read off the module (never guessed from the version number
    alone): its version, whether `BuilderFlag.FP16` and `NetworkDefinitionCreationFlag.STRONGLY_TYPED`
    exist, the Polygraphy version driving it, and whether `PreviewFeature.PROFILE_SHARING_0806` exists
    (8.6 to 10.x; it must be switched on in 8.6 only)."""

    version: str
    has_fp16_flag: bool
    has_strongly_typed: bool
    polygraphy: str
    has_profile_sharing_preview: bool = False

    @property
    def major(self) -> int:
        v = version_tuple(self.version)
        return v[0] if v else 0


def trt_facts(trt, polygraphy_version: str) -> TrtFacts:
    return TrtFacts(str(trt.__version__), hasattr(trt.BuilderFlag, "FP16"),
                    hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"), str(polygraphy_version),
                    hasattr(getattr(trt, "PreviewFeature", None), PROFILE_SHARING))


@dataclass(frozen=True)
class DeviceFacts:
    """The GPU an engine is built for: TensorRT's tactics are timed on it, so each fact is in the key."""

    name: str
    compute_capability: str
    sm_count: int
    slug: str
    l4t_release: str | None = None  # Jetson Linux release (from /etc/nv_tegra_release), None elsewhere


@dataclass(frozen=True)
class BuildPlan:
    mode: str
    onnx_precision: str  # which ONNX file of the engine dir is parsed: "fp16" -> <graph>.fp16.onnx
    strongly_typed: bool
    fp16_flag: bool
    profile_batches: tuple[int, ...]  # profile i has min = opt = max = profile_batches[i]
    key: dict[str, Any] = field(hash=False)
    tf32: bool = False  # BuilderFlag.TF32 (FP32 layers may run in TF32), as trtexec --fp16 builds
    preview_features: tuple[str, ...] = ()  # PreviewFeature members switched on (the others keep their defaults)

    def profile_for(self, batch: int) -> tuple[int, int]:
        """(profile index, its batch) for an input of `batch` rows: the timed batch sizes run on their own
        profile; any other size (the last chunk of the test split) is padded to the next larger one."""
        for i, b in enumerate(self.profile_batches):
            if batch <= b:
                return i, b
        raise EdgetoolError(f"the TensorRT engines were built for batches up to {self.profile_batches[-1]}, "
                            f"got a batch of {batch}")


def check_polygraphy(facts: TrtFacts) -> None:
    if facts.major >= 11 and version_tuple(facts.polygraphy)[:2] < POLYGRAPHY_MIN_FOR_TRT11:
        raise EdgetoolError(f"Polygraphy {facts.polygraphy} cannot build engines with TensorRT {facts.version} "
                            "(its CreateConfig fails on TensorRT 11): `pip install -U 'polygraphy>=0.53.4'`")


def plan_build(facts: TrtFacts, device: DeviceFacts, batch_sizes, mode: str = STRONGLY_TYPED) -> BuildPlan:
    """The build for these facts, or an EdgetoolError saying why this TensorRT cannot do `mode`."""
    check_polygraphy(facts)
    batches = tuple(sorted({int(b) for b in batch_sizes}))
    if not batches or batches[0] < 1:
        raise EdgetoolError(f"batch sizes must be positive, got {list(batch_sizes)}")
    if mode == STRONGLY_TYPED:
        if not facts.has_strongly_typed:
            raise EdgetoolError(f"TensorRT {facts.version} has no strongly typed networks (added in TensorRT 9), so "
                                "it cannot build the checked FP16 graph as it is: upgrade to JetPack 6.1+ (TensorRT "
                                "10.3), or pass `--trt-build weak-fp16-flag` to build the FP32 graph with the FP16 "
                                "builder flag")
        onnx_precision, strongly_typed, fp16_flag, tf32 = "fp16", True, False, False
    elif mode == WEAK_FP16_FLAG:
        if not facts.has_fp16_flag:
            raise EdgetoolError(f"`--trt-build {WEAK_FP16_FLAG}` needs TensorRT's FP16 builder flag, which TensorRT "
                                f"{facts.version} does not have (TensorRT 11 removed it); use the default "
                                f"`--trt-build {STRONGLY_TYPED}`")
        onnx_precision, strongly_typed, fp16_flag, tf32 = "fp32", False, True, True
    else:
        raise EdgetoolError(f"unknown TensorRT build mode '{mode}' (choose from {', '.join(BUILD_MODES)})")
    preview = (PROFILE_SHARING,) if facts.has_profile_sharing_preview and facts.major < 10 else ()
    key = {
        "tensorrt": facts.version,
        "polygraphy": facts.polygraphy,
        "device": device.name,
        "compute_capability": device.compute_capability,
        "sm_count": device.sm_count,
        "l4t_release": device.l4t_release,
        "build_mode": mode,
        "strongly_typed": strongly_typed,
        "fp16_flag": fp16_flag,
        "tf32": tf32,
        "preview_features": list(preview),
        "profiles": [{"min": b, "opt": b, "max": b} for b in batches],
        "profiling_verbosity": "detailed",
    }
    return BuildPlan(mode, onnx_precision, strongly_typed, fp16_flag, batches, key, tf32, preview)


def engine_staleness(plan: Path, sidecar: Path, onnx_path: Path, key: dict[str, Any]) -> str | None:
    """Why a cached engine must be rebuilt, or None when it is fresh."""
    if not plan.is_file() or not sidecar.is_file():
        return "no cached engine"
    try:
        cached = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return "unreadable cache key"
    if not isinstance(cached, dict):
        return "unreadable cache key"
    changed = sorted(k for k in key if cached.get(k) != key[k])
    if changed:
        return "cache key changed: " + ", ".join(changed)
    if onnx_path.stat().st_mtime > plan.stat().st_mtime:
        return f"{onnx_path.name} is newer than the engine"
    return None


def binding_error(facts: TrtFacts | None, what: str, exc: BaseException) -> EdgetoolError:
    """An AttributeError/TypeError raised inside TensorRT or Polygraphy calls: the Python bindings of the
    installed pair do not fit (a Polygraphy release older or newer than the TensorRT it drives)."""
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    pair = (f"TensorRT {facts.version} and Polygraphy {facts.polygraphy}" if facts is not None
            else "the installed TensorRT and Polygraphy")
    return EdgetoolError(f"{pair} do not fit together ({what}: {type(exc).__name__}: {text}); install the Polygraphy "
                         "release that supports this TensorRT (`pip install -U 'polygraphy>=0.53.4'`) or the "
                         "TensorRT this Polygraphy supports")
