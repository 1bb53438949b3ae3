"""Layer-by-layer identity of two TensorRT engines, from the JSON TensorRT's engine inspector writes
(`engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)` on an engine
built with `ProfilingVerbosity.DETAILED`). Pure functions over the parsed JSON; no TensorRT needed.

The format (TensorRT's developer guide, "Engine Inspector"; read the same way by Polygraphy's
`backend/trt/util.py`): `{"Layers": [...], "Bindings": [...]}`, each layer an object with "Name",
"LayerType", "Inputs"/"Outputs" (each tensor: "Name", "Location", "Dimensions", "Format/Datatype"),
"ParameterType", "Origin", "TacticName" and/or "TacticValue" (Myelin layers carry only a name), plus
layer parameters ("Kernel", "Weights": {"Type", "Count"}, ...). Weight *values* are never in it. Built
without DETAILED verbosity, each layer is only its name (a string).

Original and fused come from graphs proven identical except for initializer values, so every field of
every layer must match: same layers in the same order, same types, same tensor formats and precisions,
same tactics. Names are compared after masking the ONNX exporter's numeric suffixes (`onnx::Conv_123`),
which number tensors in export order rather than name them. Two things are compared by structure only:
"Literals" (with DETAILED verbosity a PointWise layer may list the constants it inlined; they are values,
like weights, and original and fused may differ there legitimately) -- how many and how nested, not what.

An engine with several optimisation profiles has one layer graph per profile in the inspector's JSON,
whatever execution context is set: profile 0's layers and bindings plain, those of profile N > 0 tagged
"[profile N]" in their names (trt-engine-explorer, `trex/parser.py`, `filter_profiles`).
`profile_layers` keeps one profile's graph."""

from __future__ import annotations

import difflib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..errors import EdgetoolError

_EXPORTER_COUNTER = re.compile(r"(onnx::[A-Za-z_]+?)_\d+")
_PROFILE_TAG = re.compile(r"\s*\[profile +(\d+)\]")
# Keys whose contents are values, not structure: compared by shape only (see the module docstring).
VALUE_KEYS = ("Literals",)


def parse_engine_information(text: str, what: str = "engine") -> dict[str, Any]:
    try:
        info = json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise EdgetoolError(f"TensorRT's engine inspector returned no JSON for {what} ({exc})") from None
    if not isinstance(info, dict) or not isinstance(info.get("Layers"), list):
        raise EdgetoolError(f"TensorRT's engine inspector output for {what} has no \"Layers\" list")
    return info


def _profile_of(name: Any) -> int:
    m = _PROFILE_TAG.search(str(name))
    return int(m.group(1)) if m else 0


def _untagged(value: Any) -> Any:
    if isinstance(value, str):
        return _PROFILE_TAG.sub("", value)
    if isinstance(value, list):
        return [_untagged(v) for v in value]
    if isinstance(value, dict):
        return {k: _untagged(v) for k, v in value.items()}
    return value


def profile_layers(info: dict[str, Any], profile: int) -> dict[str, Any]:
    """The inspector JSON of one optimisation profile: its layers and bindings only, their "[profile N]"
    tags removed (so every profile's graph reads alike), other top-level keys kept."""
    def keep(name: Any) -> bool:
        return _profile_of(name) == profile

    layers = [layer for layer in info.get("Layers", [])
              if keep(layer.get("Name", "") if isinstance(layer, dict) else layer)]
    out = {**info, "Layers": _untagged(layers)}
    if isinstance(info.get("Bindings"), list):
        out["Bindings"] = _untagged([b for b in info["Bindings"] if keep(b)])
    return out


def normalise_name(text: str) -> str:
    return _EXPORTER_COUNTER.sub(r"\1_#", text)


def _normalised(value: Any) -> Any:
    if isinstance(value, str):
        return normalise_name(value)
    if isinstance(value, list):
        return [_normalised(v) for v in value]
    if isinstance(value, dict):
        return {k: (_structure(v) if k in VALUE_KEYS else _normalised(v)) for k, v in value.items()}
    return value


def _structure(value: Any) -> Any:
    """`value` with every leaf replaced by its type: its shape without its contents."""
    if isinstance(value, list):
        return [_structure(v) for v in value]
    if isinstance(value, dict):
        return {k: _structure(v) for k, v in value.items()}
    return f"<{type(value).__name__}>"


def _diff(a: Any, b: Any, path: str, out: list[str]) -> None:
    """Every leaf where a and b differ, as 'path: a vs b'."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            where = f"{path}.{k}" if path else k
            if k not in b:
                out.append(f"{where} only in original ({_short(a[k])})")
            elif k not in a:
                out.append(f"{where} only in fused ({_short(b[k])})")
            else:
                _diff(a[k], b[k], where, out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: {len(a)} vs {len(b)} entries")
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{path}[{i}]", out)
    elif a != b:
        out.append(f"{path}: {_short(a)} vs {_short(b)}")


def _short(v: Any, limit: int = 160) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _layer_label(layer: Any) -> str:
    name = layer.get("Name", "?") if isinstance(layer, dict) else str(layer)
    return _short(name, 60)


def tactic(layer: dict[str, Any]) -> str:
    """The layer's tactic as the inspector names it (Myelin layers have a TacticName but no TacticValue)."""
    return str(layer.get("TacticName") or layer.get("TacticValue") or "?")


def layer_precisions(info: dict[str, Any]) -> dict[str, int]:
    """How many layer outputs are in each datatype, read off "Format/Datatype" (e.g. "Row major linear FP16
    format" or "Half" -> FP16): a summary for the report, so a reader sees the engine is the FP16 graph."""
    counts: Counter[str] = Counter()
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict):
            continue
        for t in layer.get("Outputs", []) or []:
            counts[_datatype(str(t.get("Format/Datatype", "")))] += 1
    return dict(sorted(counts.items()))


def _datatype(fmt: str) -> str:
    upper = fmt.upper()
    for token, name in (("BF16", "BF16"), ("BFLOAT16", "BF16"), ("FP16", "FP16"), ("HALF", "FP16"), ("FP8", "FP8"),
                        ("INT8", "INT8"), ("INT32", "INT32"), ("INT64", "INT64"), ("BOOL", "BOOL"),
                        ("FP32", "FP32"), ("FLOAT", "FP32"), ("N/A", "unknown")):
        if token in upper:
            return name
    return "unknown"


@dataclass
class EngineComparison:
    identical: bool
    layers: tuple[int, int]  # (original, fused)
    differences: list[str] = field(default_factory=list)
    detailed: bool = True
    precisions: dict[str, int] = field(default_factory=dict)  # of the original engine

    def summary(self) -> str:
        if self.identical:
            prec = ", ".join(f"{n} {p}" for p, n in self.precisions.items())
            return (f"{self.layers[0]} layers, same types, tensor formats/precisions and tactics"
                    + (f" (layer outputs: {prec})" if prec else ""))
        return "; ".join(self.differences[:3]) + (f"; ... {len(self.differences) - 3} more"
                                                  if len(self.differences) > 3 else "")


def _signature(layer: Any) -> str:
    if isinstance(layer, dict):
        return f"{normalise_name(str(layer.get('Name', '?')))}|{layer.get('LayerType', '?')}"
    return normalise_name(str(layer))


def compare_engine_layers(original: dict[str, Any], fused: dict[str, Any], max_differences: int = 20) -> EngineComparison:
    """Every field of every layer (names normalised) and the bindings. Layers are paired in order, aligned
    by name and type (difflib) so that a layer fused differently shows up as layers only in one engine
    rather than as a cascade of shifted differences."""
    la, lb = original.get("Layers", []), fused.get("Layers", [])
    detailed = all(isinstance(x, dict) for x in la + lb)
    diffs: list[str] = []
    if not detailed:
        diffs.append("an engine was built without ProfilingVerbosity.DETAILED: its inspector lists layer names only, "
                     "so types, precisions and tactics cannot be compared")
    if len(la) != len(lb):
        diffs.append(f"layer count {len(la)} vs {len(lb)}")

    def pair(i: int, j: int) -> None:
        found: list[str] = []
        _diff(_normalised(la[i]), _normalised(lb[j]), "", found)
        where = f"layer {i}" if i == j else f"layer {i} (fused {j})"
        diffs.extend(f"{where} ({_layer_label(la[i])}): {d}" for d in found)

    matcher = difflib.SequenceMatcher(None, [_signature(x) for x in la], [_signature(x) for x in lb], autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal" or (op == "replace" and i2 - i1 == j2 - j1):
            for k in range(i2 - i1):
                pair(i1 + k, j1 + k)
            continue
        diffs.extend(f"layer {i} ({_layer_label(la[i])}) only in original" for i in range(i1, i2))
        diffs.extend(f"fused layer {j} ({_layer_label(lb[j])}) only in fused" for j in range(j1, j2))
    found: list[str] = []
    _diff(_normalised(original.get("Bindings")), _normalised(fused.get("Bindings")), "Bindings", found)
    diffs += found
    if len(diffs) > max_differences:
        diffs = diffs[:max_differences] + [f"... and {len(diffs) - max_differences} more"]
    return EngineComparison(not diffs, (len(la), len(lb)), diffs, detailed, layer_precisions(original))
