#!/usr/bin/env python3
"""Print `name==floor` for each dependency declared in pyproject.toml (plus the chosen extras): the
declared minimum versions, which the minimum-versions CI job installs and tests. The floors are read
from pyproject.toml, never restated, so they cannot drift from what the job checks.

    python scripts/min_constraints.py --extra onnxruntime --extra test --skip torch --skip peft

Every selected requirement must carry a lower bound (>=, == or ~=): a dependency without one has no
minimum to test, which is reported as an error (exit 2) rather than silently left out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


class FloorError(Exception):
    pass


def floor_pins(project: dict, extras: list[str], skip: list[str]) -> list[str]:
    """`name==floor` lines for project.dependencies plus the named extras, minus the skipped names."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise FloorError(f"unknown extra(s) {', '.join(unknown)}; pyproject defines: {', '.join(sorted(optional)) or 'none'}")
    selected = list(project.get("dependencies", [])) + [r for e in extras for r in optional[e]]
    skipped = {canonicalize_name(s) for s in skip}
    seen: set[str] = set()
    lines = []
    for text in selected:
        try:
            req = Requirement(text)
        except InvalidRequirement as exc:
            raise FloorError(f"invalid requirement {text!r} in pyproject.toml: {exc}") from None
        name = canonicalize_name(req.name)
        if req.marker is not None and not req.marker.evaluate():
            continue
        seen.add(name)
        if name in skipped:
            continue
        lows = [s.version for s in req.specifier if s.operator in (">=", "==", "~=", "===")]
        if len(lows) != 1:
            raise FloorError(f"{text!r} has {'no' if not lows else 'more than one'} lower bound: "
                             "every dependency needs exactly one floor (>=) for the minimum-versions job")
        extras_part = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        lines.append(f"{req.name}{extras_part}=={lows[0]}")
    # A stale --skip (the package was renamed or dropped) would otherwise hide nothing and say nothing.
    stale = sorted(skipped - seen)
    if stale:
        raise FloorError(f"--skip {', '.join(stale)}: not among the selected requirements")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", action="append", default=[], help="also include this optional-dependency group")
    parser.add_argument("--skip", action="append", default=[], help="leave this package out (installed otherwise)")
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT)
    args = parser.parse_args(argv)
    try:
        import tomllib
    except ImportError:
        print("min_constraints: error: needs Python 3.11+ (tomllib)", file=sys.stderr)
        return 2
    try:
        project = tomllib.loads(args.pyproject.read_text())["project"]
        lines = floor_pins(project, args.extra, args.skip)
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        print(f"min_constraints: error: cannot read {args.pyproject}: {exc}", file=sys.stderr)
        return 2
    except FloorError as exc:
        print(f"min_constraints: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
