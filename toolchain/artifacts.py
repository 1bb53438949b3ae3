"""Atomic writes: every artifact is written to a temporary sibling and renamed into place, so an
interrupted or failed stage never leaves a half-written file or directory that looks complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import EdgetoolError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_parent_writable(path: Path) -> None:
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgetoolError(f"cannot create output directory {parent}: {exc.strerror or exc}") from None
    if not os.access(parent, os.W_OK):
        raise EdgetoolError(f"output directory {parent} is not writable")


def check_output_dir(out: Path | str, own_files: tuple[str, ...], what: str,
                     protected: tuple[tuple[str, Path], ...] = ()) -> Path:
    """Guard a stage's --out before any work: the stage's output replaces whatever is at `out` (see
    atomic_dir), so refuse a file, a non-empty directory that is not an earlier output of the same stage
    (lacks one of `own_files`), and a directory that is or contains a `protected` input; create the parent
    and check it is writable. Returns the resolved path."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise EdgetoolError(f"output path {out} exists and is not a directory")
    reasons = []
    if out.is_dir() and any(out.iterdir()) and not all((out / name).is_file() for name in own_files):
        reasons.append(f"exists and is not {what}")
    for noun, path in protected:
        path = Path(path).resolve()
        if out == path or out in path.parents:
            reasons.append(f"would replace the {noun}: it is or contains the {noun} {path}")
    if reasons:
        raise EdgetoolError(f"output directory {out} {' and '.join(reasons)}; refusing to replace it (choose another --out)")
    _check_parent_writable(out)
    return out


@contextlib.contextmanager
def atomic_dir(final: Path | str) -> Iterator[Path]:
    """Yield a fresh temp directory next to `final`; on success it replaces `final` in one rename."""
    final = Path(final).resolve()
    _check_parent_writable(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    # mkdtemp makes 0700; give the result the usual umask permissions so other users (a TensorRT
    # container running as another uid, a CI collector) can read it.
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    atomic_write_files({Path(path): data})


def atomic_write_files(files: dict[Path, bytes]) -> None:
    """Write several files that belong together: every temp file is complete before the first rename,
    so a failure while writing leaves all the earlier files in place."""
    temps: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            _check_parent_writable(path)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
            temps.append((tmp, path))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_bytes(obj: Any) -> bytes:
    # Strict JSON: a NaN/inf figure (a diverged run, a failed check) is written as null, which every
    # parser reads, instead of Python's non-standard NaN token.
    text = json.dumps(_finite_or_null(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    return (text + "\n").encode("utf-8")


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def _finite_or_null(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy/torch scalars
        return _finite_or_null(obj.item())
    return obj


def _json_default(obj: Any) -> Any:
    # numpy scalars and Paths appear in metrics; keep JSON plain.
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: Path | str, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise EdgetoolError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EdgetoolError(f"{what} {path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
