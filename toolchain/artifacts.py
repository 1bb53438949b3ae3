"""Atomic writes: every artifact is written to a temporary sibling and renamed into place, so an
interrupted or failed stage never leaves a half-written file or directory that looks complete."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import EdgetoolError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------- a full disk

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def device_of(path: Path | str) -> str:
    """The filesystem holding `path`, as the user knows it: '<source> mounted at <mount point>'."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    mount = p
    while not os.path.ismount(mount):
        mount = mount.parent
    source = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 1 and fields[1].replace("\\040", " ") == str(mount):
                source = fields[0]  # the last mount at a point is the one in effect
    return f"{source} mounted at {mount}" if source else f"the filesystem mounted at {mount}"


def os_error_message(exc: OSError, writing: Path | str | None = None) -> str:
    """One line for a failed system call: a full disk names its device and what was being written."""
    where = writing if writing is not None else exc.filename
    if exc.errno in NO_SPACE:
        quota = " (disk quota exceeded)" if exc.errno == errno.EDQUOT else ""
        target = f" while writing {where}" if where is not None else ""
        device = f" on {device_of(where)}" if where is not None else ""
        return (f"no space left{device}{quota}{target}: nothing partial was kept; free some space or write "
                "elsewhere (--out)")
    text = exc.strerror or str(exc) or type(exc).__name__
    return f"{text}: {where}" if where is not None else text


def _check_parent_writable(path: Path) -> None:
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgetoolError(f"cannot create output directory {parent}: {exc.strerror or exc}") from None
    if not os.access(parent, os.W_OK):
        raise EdgetoolError(f"output directory {parent} is not writable")


def default_output(root: Path | str, name: str, field: str = "recipe field 'name'") -> Path:
    """`root/name`, the default output of a stage. `name` must be a plain file name: an absolute path,
    '..' or a path separator would put the output outside `root`, so such a name is refused (not
    rewritten into another name the user never chose); an explicit --out is the way to write elsewhere."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or (os.altsep and os.altsep in name)):
        raise EdgetoolError(f"{field} {name!r} cannot name the default output directory {Path(root)}/<name>: it must be a "
                            "plain file name (no '/', no '..', not absolute); rename it or pass --out")
    return Path(root) / name


def _check_replaceable(out: Path) -> None:
    """An existing output is replaced by renaming it aside and deleting it: both need write access to it
    (and to every directory in it), which the parent's permissions do not show."""
    for d in [out, *(p for p in out.rglob("*") if p.is_dir() and not p.is_symlink())]:
        if not os.access(d, os.W_OK | os.X_OK):
            where = "" if d == out else f" ({d} is not)"
            raise EdgetoolError(f"output directory {out} exists and is not writable{where}: it could not be replaced "
                                "after the work; fix its permissions or choose another --out")


def check_output_dir(out: Path | str, own_files: tuple[str, ...], what: str,
                     protected: tuple[tuple[str, Path], ...] = ()) -> Path:
    """Guard a stage's --out before any work: the stage's output replaces whatever is at `out` (see
    atomic_dir), so refuse a file, a non-empty directory that is not an earlier output of the same stage
    (lacks one of `own_files`), a directory that is or contains a `protected` input and one that cannot be
    replaced (not writable); create the parent and check it is writable. Returns the resolved path."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise EdgetoolError(f"output path {out} exists and is not a directory")
    reasons = []
    if out.is_dir() and any(out.iterdir()) and not all((out / name).is_file() for name in own_files):
        reasons.append(f"exists and is not {what}")
    for noun, path in protected:
        path = Path(path).resolve()
        if out == path or out in path.parents:
            reasons.append(f"would replace the {noun} {path}" + ("" if out == path else " inside it"))
    if reasons:
        raise EdgetoolError(f"output directory {out} {' and '.join(reasons)}; refusing to replace it (choose another --out)")
    _check_parent_writable(out)
    if out.is_dir():
        _check_replaceable(out)
    return out


# ---------------------------------------------------------------------------------------------- one writer


def _lock_path(out: Path) -> Path:
    try:
        str(out).encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8, kept as surrogates: ONNX Runtime and others refuse them
        shown = str(out).encode("utf-8", "backslashreplace").decode()
        raise EdgetoolError(f"output path {shown} is not valid UTF-8 (ONNX Runtime cannot open such paths); "
                            "choose another --out") from None
    if out == out.parent:  # "/" (or a drive root): no parent to rename it in, no name for its lock
        raise EdgetoolError(f"output directory {out} is a filesystem root: it cannot be replaced; choose another --out")
    return out.with_name(f".{out.name}.lock")


def _open_lock(lock: Path, out: Path) -> int:
    """Open (creating) the lock file without following a link: a symbolic or hard link planted at its path
    could point at any file, which the pid written into the lock would overwrite."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(lock, flags, 0o666 & ~_umask())
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise EdgetoolError(f"lock file {lock} is a symbolic link: refusing to follow it (it could point at any "
                                "file); remove it and run again") from None
        raise EdgetoolError(f"cannot create the lock file {lock} for {out}: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        kind = "a hard link to another file" if stat.S_ISREG(st.st_mode) else "not a regular file"
        raise EdgetoolError(f"lock file {lock} is {kind}: refusing to write to it; remove it and run again")
    return fd


@contextlib.contextmanager
def output_lock(out: Path | str, wait: bool = False, on_wait=None) -> Iterator[Path]:
    """Hold the right to write `out` for the block: a second edgetool process writing the same output
    stops at once (exit 2) instead of both finishing and one result silently replacing the other;
    with `wait`, it waits for the first to finish instead (`on_wait(holder)` is called first).

    An flock on `.<name>.lock` beside `out`: the kernel drops it when the process dies, so a killed
    writer never leaves a stale lock. The file is removed on release; a process that opened it just
    before the removal re-checks that it locked the file still at that path."""
    out = Path(out).resolve()
    lock = _lock_path(out)
    _check_parent_writable(out)
    while True:
        fd = _open_lock(lock, out)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            by = f" (process {holder})" if holder.isdigit() else ""
            if not wait:
                os.close(fd)
                raise EdgetoolError(f"another edgetool process{by} is writing {out}; wait for it to finish or choose "
                                    "another --out") from None
            if on_wait is not None:
                on_wait(holder if holder.isdigit() else None)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # locked a file its holder had just removed: lock the one at the path now
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        remove_stale_temps(out)
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


@contextlib.contextmanager
def claimed_output(out: Path | str, own_files: tuple[str, ...], what: str,
                   protected: tuple[tuple[str, Path], ...] = ()) -> Iterator[Path]:
    """check_output_dir under output_lock, for the whole stage: yields the resolved output path."""
    out = Path(out).resolve()
    with output_lock(out):
        yield check_output_dir(out, own_files, what, protected)


# ---------------------------------------------------------------------------------------------- leftovers

# atomic_dir's temporary siblings carry the writer's pid: .<name>.tmp-<pid>-<random>, .<name>.old-<pid>
_TMP_PID = re.compile(r"(\d+)-[^/]+")
_OLD_PID = re.compile(r"(\d+)")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temps(final: Path | str) -> list[Path]:
    """Remove what a writer of `final` killed mid-write (kill -9, power loss) left beside it: temporary
    siblings whose pid is no longer alive. If it was killed between atomic_dir's two renames, `final` is
    missing and its previous content sits in `.old-<pid>`: that is moved back instead. Returns what was
    removed or restored."""
    final = Path(final)
    try:
        entries = sorted(final.parent.iterdir())
    except OSError:  # no such directory, or not ours to list: nothing to clean
        return []
    done = []
    for entry in entries:
        name = entry.name
        for prefix, pattern in ((f".{final.name}.tmp-", _TMP_PID), (f".{final.name}.old-", _OLD_PID)):
            m = pattern.fullmatch(name[len(prefix):]) if name.startswith(prefix) else None
            if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
                continue
            is_dir = entry.is_dir() and not entry.is_symlink()  # a link is removed, never followed
            try:
                if pattern is _OLD_PID and is_dir and not os.path.lexists(final):
                    os.replace(entry, final)
                elif is_dir:
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink()
            except OSError:  # gone already, or not ours to remove (a read-only directory): best effort
                continue
            done.append(entry)
    return done


_ANY_TMP = re.compile(r"\..+\.tmp-(\d+)-[^/]+")


def remove_stale_temps_in(directory: Path | str) -> list[Path]:
    """Remove the temporary files (atomic_write_files': .<name>.tmp-<pid>-<random>) that writers no longer
    alive left in `directory`, whatever file they were writing; links are removed, never followed."""
    try:
        entries = sorted(Path(directory).iterdir())
    except OSError:
        return []
    done = []
    for entry in entries:
        m = _ANY_TMP.fullmatch(entry.name)
        if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                continue  # atomic_dir's: remove_stale_temps of that output handles them
            entry.unlink()
        except OSError:
            continue
        done.append(entry)
    return done


# Scratch directories in $TMPDIR carry the owner's pid too: edgetool-<pid>-<what>-<random>.
_SCRATCH = re.compile(r"edgetool-(\d+)-.+")


@contextlib.contextmanager
def scratch_dir(what: str) -> Iterator[Path]:
    """A temporary directory in $TMPDIR for the block, named with this process's pid, so that what a
    killed process left there is recognised and removed by the next run (remove_stale_scratch)."""
    with tempfile.TemporaryDirectory(prefix=f"edgetool-{os.getpid()}-{what}-") as tmp:
        yield Path(tmp)


def remove_stale_scratch() -> list[Path]:
    """Remove this user's scratch directories in $TMPDIR whose process is no longer alive."""
    root, done = Path(tempfile.gettempdir()), []
    try:
        entries = list(root.iterdir())
    except OSError:
        return done
    for entry in entries:
        m = _SCRATCH.fullmatch(entry.name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        try:
            st = entry.lstat()
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            shutil.rmtree(entry, ignore_errors=True)
            done.append(entry)
    return done


@contextlib.contextmanager
def atomic_dir(final: Path | str) -> Iterator[Path]:
    """Yield a fresh temp directory next to `final`; on success it replaces `final` in one rename."""
    final = Path(final).resolve()
    _check_parent_writable(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    # mkdtemp makes 0700; give the result the usual umask permissions so other users (a TensorRT
    # container running as another uid, a CI collector) can read it.
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in NO_SPACE:
            raise EdgetoolError(os_error_message(exc, final)) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
    except OSError as exc:  # e.g. permissions changed during the run
        if old is not None and not final.exists():
            with contextlib.suppress(OSError):  # else remove_stale_temps puts it back on the next run
                os.replace(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise EdgetoolError(f"cannot replace {final}: {exc.strerror or exc}") from None
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
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
            temps.append((tmp, path))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException as exc:
        for tmp, _ in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            raise EdgetoolError(os_error_message(exc, (temps[-1][1] if temps else next(iter(files), None)))) from None
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
