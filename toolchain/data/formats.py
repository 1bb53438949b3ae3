"""Reading what users have into plain arrays: UEA/UCR `.ts` pairs, the UCI HAR directory layout,
`.npz`, and the embedded BasicMotions data. Each loader returns a RawDataset of Splits ([N, C, ...]
float32 windows, int labels, optional domain and recording ids); the protocol is built in data.py."""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import EdgetoolError
from ..recipe import DataConfig


@dataclass
class Split:
    X: np.ndarray  # float32 [N, C, ...]
    y: np.ndarray  # int64 [N], index into the class list
    domain: np.ndarray | None = None  # int64 [N] (subject, placement, ...)
    group: np.ndarray | None = None  # int64 [N] recording id; windows of one recording never go to two parts

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: np.ndarray) -> "Split":
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return Split(self.X[idx], self.y[idx], pick(self.domain), pick(self.group))

    def concat(self, other: "Split | None") -> "Split":
        """This split followed by `other` (itself when `other` is None); domain and group survive only when both have them."""
        if other is None:
            return self
        both = lambda a, b: None if a is None or b is None else np.concatenate([a, b])  # noqa: E731
        return Split(np.concatenate([self.X, other.X]), np.concatenate([self.y, other.y]),
                     both(self.domain, other.domain), both(self.group, other.group))


@dataclass
class RawDataset:
    train: Split
    test: Split | None
    class_names: list[str]


def _header_int(line: str) -> int | None:
    parts = line.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def parse_ts(path: Path | str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Parse a UEA/UCR `.ts` file (equal-length, no timestamps). Returns X [N, C, T], string labels, and
    the class order declared in `@classLabel` (None if absent)."""
    path = Path(path)
    if not path.is_file():
        raise EdgetoolError(f".ts file not found: {path}")
    declared: list[str] | None = None
    has_labels = True
    equal_length = True
    n_dims: int | None = None  # from @dimensions, else the first series
    length: int | None = None  # from @seriesLength (equal-length files), else the first series
    declared_length: int | None = None
    series: list[np.ndarray] = []
    labels: list[str] = []
    in_data = False
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    last = max((i for i, raw in enumerate(lines, 1) if raw.strip()), default=0)
    # A file cut off mid-write ends without a newline, usually mid-series: say so at that line.
    cut = not text.endswith(("\n", "\r"))

    def bad(lineno: int, problem: str) -> EdgetoolError:
        why = "the file looks truncated here" if cut and lineno == last else "malformed line"
        return EdgetoolError(f"{path}:{lineno}: {problem} ({why})")

    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            low = line.lower()
            if low.startswith("@classlabel"):
                parts = line.split()
                has_labels = len(parts) > 1 and parts[1].lower() == "true"
                declared = parts[2:] if has_labels else None
            elif low.startswith("@timestamps") and line.split()[-1].lower() == "true":
                raise EdgetoolError(f"{path}: .ts files with timestamps are not supported")
            elif low.startswith("@dimensions"):
                n_dims = _header_int(line)
            elif low.startswith("@equallength"):
                equal_length = line.split()[-1].lower() != "false"
            elif low.startswith("@serieslength"):
                length = _header_int(line)
            elif low.startswith("@data"):
                in_data = True
                declared_length = length = length if equal_length else None
            continue
        fields = line.split(":")
        label = None
        if has_labels:
            label, fields = fields[-1].strip(), fields[:-1]
        try:
            dims = [np.array([np.nan if v.strip() == "?" else float(v) for v in f.split(",")], dtype=np.float64) for f in fields]
        except ValueError as exc:
            if cut and lineno == last:
                raise bad(lineno, f"not a number in the series ({exc})") from None
            raise EdgetoolError(f"{path}:{lineno}: not a number in the series ({exc})") from None
        if not dims or (n_dims is not None and len(dims) != n_dims):
            raise bad(lineno, f"{len(dims)} dimension(s), expected {n_dims if n_dims is not None else 'at least 1'}")
        lengths = {len(d) for d in dims}
        if len(lengths) != 1:
            if cut and lineno == last:
                raise bad(lineno, f"dimensions of lengths {sorted(lengths)}")
            raise EdgetoolError(f"{path}:{lineno}: unequal-length dimensions are not supported")
        if length is not None and len(dims[0]) != length:
            if not equal_length:
                raise EdgetoolError(f"{path}:{lineno}: series of length {len(dims[0])} after length {length}; "
                                    "unequal-length data (@equalLength false) is not supported")
            expected = f"@seriesLength is {declared_length}" if declared_length is not None else f"the first series has {length}"
            raise bad(lineno, f"series of length {len(dims[0])}, {expected}")
        if label == "":
            raise bad(lineno, "no class label after the last ':'")
        if cut and lineno == last and declared and label not in declared:  # a label cut short
            raise bad(lineno, f"class label '{label}' is not one of @classLabel {declared}")
        n_dims, length = len(dims), len(dims[0])
        if label is not None:
            labels.append(label)
        series.append(np.stack(dims))
    if not in_data or not series:
        raise EdgetoolError(f"{path}: no @data section with series found; is this a .ts file?")
    if not has_labels:
        raise EdgetoolError(f"{path}: the file has no class labels (@classLabel false)")
    return np.stack(series).astype(np.float32), np.array(labels), declared


def _index_labels(labels: np.ndarray, class_names: list[str], where: str) -> np.ndarray:
    lookup = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({str(lab) for lab in labels} - set(lookup))
    if unknown:
        raise EdgetoolError(f"{where}: label(s) {unknown[:5]} not among the recipe's classes {class_names}")
    return np.array([lookup[str(lab)] for lab in labels], dtype=np.int64)


def load_ts_pair(train_path: Path, test_path: Path, classes: list[str] | None) -> RawDataset:
    Xtr, ytr, declared = parse_ts(train_path)
    Xte, yte, _ = parse_ts(test_path)
    if Xtr.shape[1:] != Xte.shape[1:]:
        raise EdgetoolError(f"train and test .ts files differ in shape: {Xtr.shape[1:]} vs {Xte.shape[1:]}")
    names = classes or declared or sorted(set(ytr.tolist()) | set(yte.tolist()))
    return RawDataset(
        Split(Xtr, _index_labels(ytr, names, str(train_path))),
        Split(Xte, _index_labels(yte, names, str(test_path))),
        list(names),
    )


def load_basicmotions() -> RawDataset:
    """The embedded default: BasicMotions, shipped inside the package (see datasets/BasicMotions/ATTRIBUTION.md)."""
    root = resources.files("toolchain.data") / "datasets" / "BasicMotions"
    with resources.as_file(root / "BasicMotions_TRAIN.ts") as tr, resources.as_file(root / "BasicMotions_TEST.ts") as te:
        return load_ts_pair(Path(tr), Path(te), None)


UCI_HAR_SIGNALS = [f"{kind}_{axis}" for kind in ("body_acc", "body_gyro", "total_acc") for axis in "xyz"]


def _read_matrix(path: Path) -> np.ndarray:
    if not path.is_file():
        raise EdgetoolError(f"UCI HAR file missing: {path}")
    try:
        return np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise EdgetoolError(f"{path}: not a whitespace-separated numeric matrix ({exc})") from None


def load_uci_har(root: Path | str, classes: list[str] | None = None) -> RawDataset:
    """The UCI HAR Dataset layout: {train,test}/Inertial Signals/<signal>_<split>.txt (N x 128 each),
    {train,test}/y_<split>.txt (1-based activity ids), subject_<split>.txt, activity_labels.txt.
    Channels: body_acc xyz, body_gyro xyz, total_acc xyz (consecutive triples, so rotation shifts apply).
    Groups: the rows are in recording order (each subject's block, activities in the order performed, 50 %
    overlapping windows), so a run of consecutive rows with one subject and one activity is one recording."""
    root = Path(root)
    if (root / "UCI HAR Dataset").is_dir():
        root = root / "UCI HAR Dataset"
    label_file = root / "activity_labels.txt"
    if not label_file.is_file():
        raise EdgetoolError(f"not a UCI HAR Dataset directory (no activity_labels.txt): {root}")
    pairs = [line.split(maxsplit=1) for line in label_file.read_text().splitlines() if line.strip()]
    if not pairs or any(len(p) != 2 or not p[0].isdigit() for p in pairs):
        raise EdgetoolError(f"{label_file}: expected lines '<activity id> <name>' (e.g. '1 WALKING')")
    ids = [int(p[0]) for p in pairs]
    declared = [p[1].strip() for p in pairs]
    names = classes or declared
    splits = {}
    next_group = 0
    for split in ("train", "test"):
        signals = [_read_matrix(root / split / "Inertial Signals" / f"{sig}_{split}.txt") for sig in UCI_HAR_SIGNALS]
        if len({s.shape for s in signals}) != 1:
            raise EdgetoolError(f"UCI HAR {split}: inertial signal files have different shapes")
        X = np.stack(signals, axis=1).astype(np.float32)
        y_ids = _read_matrix(root / split / f"y_{split}.txt").astype(np.int64).ravel()
        subjects = _read_matrix(root / split / f"subject_{split}.txt").astype(np.int64).ravel()
        if not (len(y_ids) == len(subjects) == len(X)):
            raise EdgetoolError(f"UCI HAR {split}: {len(X)} windows, {len(y_ids)} labels, {len(subjects)} subject ids")
        id_to_name = dict(zip(ids, declared))
        bad = sorted(set(y_ids.tolist()) - set(id_to_name))
        if bad:
            raise EdgetoolError(f"UCI HAR {split}: activity id(s) {bad[:5]} not in activity_labels.txt")
        labels = np.array([id_to_name[i] for i in y_ids])
        group = _runs(subjects, y_ids) + next_group  # ids stay unique across the train and test files
        next_group = int(group.max()) + 1 if len(group) else next_group
        splits[split] = Split(X, _index_labels(labels, names, f"UCI HAR {split}"), subjects, group)
    return RawDataset(splits["train"], splits["test"], list(names))


def _runs(*keys: np.ndarray) -> np.ndarray:
    """Run id per row (0, 1, ...): a new run starts wherever any key differs from the row before."""
    change = np.zeros(len(keys[0]), dtype=bool)
    for key in keys:
        change[1:] |= key[1:] != key[:-1]
    return np.cumsum(change).astype(np.int64)


NPZ_LAYOUT = "expected X [N, C, T], y [N], optional domain [N], group [N], class_names"


def check_npz_sizes(path: Path) -> None:
    """Every array in the .npz stores the bytes its header's shape declares: a damaged or forged header (a
    huge shape) is refused in one line before numpy tries to allocate it."""
    import math

    from numpy.lib import format as npy

    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as fh:
                    version = npy.read_magic(fh)
                    read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                    shape, _, dtype = read(fh)
                    header = fh.tell()
                if dtype.hasobject:
                    continue  # refused when loaded (allow_pickle=False), with its own message
                declared = math.prod(shape) * dtype.itemsize
                if declared != info.file_size - header:
                    raise EdgetoolError(f"{path}: array '{info.filename[:-4]}' declares shape {tuple(shape)} ({declared} "
                                        f"bytes) but stores {info.file_size - header} bytes: the file is damaged")
    except EdgetoolError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise EdgetoolError(f"{path}: not a valid .npz (zip) archive ({type(exc).__name__}: {exc})") from None


def _load_npz_split(path: Path, classes: list[str] | None) -> tuple[Split, list[str] | None]:
    if not path.is_file():
        raise EdgetoolError(f".npz file not found: {path}")
    # np.load falls back to unpickling for anything that is not a zip or .npy, and its error then suggests
    # allow_pickle: check the magic bytes first so the message says what the file is.
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic.startswith(b"\x93NUMPY"):
        raise EdgetoolError(f"{path}: a single .npy array, not an .npz archive ({NPZ_LAYOUT}; write it with np.savez)")
    if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise EdgetoolError(f"{path}: not a valid .npz (zip) archive ({NPZ_LAYOUT}; write it with np.savez)")
    check_npz_sizes(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {}
            for k in z.files:
                try:
                    arrays[k] = z[k]
                except ValueError as exc:
                    if "allow_pickle" not in str(exc):
                        raise
                    raise EdgetoolError(f"{path}: array '{k}' holds Python objects, which are not loaded "
                                        "(store strings as a str array, e.g. np.array(names, dtype=str))") from None
    except EdgetoolError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:  # a damaged archive
        raise EdgetoolError(f"{path}: not a valid .npz (zip) archive ({type(exc).__name__}: {exc})") from None
    for key in ("X", "y"):
        if key not in arrays:
            raise EdgetoolError(f"{path}: missing array '{key}' ({NPZ_LAYOUT})")
    X, y = arrays["X"], arrays["y"]
    if X.ndim >= 3 and 0 in X.shape[1:]:  # before any statistic is taken over an empty axis
        raise EdgetoolError(f"{path}: X must be windows [N, C, T] (or [N, C, H, W]) with no empty axis, got shape "
                            f"{X.shape}")
    if y.ndim != 1:
        raise EdgetoolError(f"{path}: y must be one-dimensional [N] class ids, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise EdgetoolError(f"{path}: y must be integer class ids, got dtype {y.dtype}")
    names = [str(n) for n in arrays["class_names"].tolist()] if "class_names" in arrays else None
    domain, group = arrays.get("domain"), arrays.get("group")
    for key, arr in (("domain", domain), ("group", group)):
        if arr is not None and (arr.shape != y.shape or not np.issubdtype(arr.dtype, np.integer)):
            raise EdgetoolError(f"{path}: {key} must be integers shaped like y {y.shape}, got {arr.dtype} {arr.shape}")
    as_int = lambda a: None if a is None else a.astype(np.int64)  # noqa: E731
    split = Split(np.asarray(X, dtype=np.float32) if np.issubdtype(X.dtype, np.number) else X, y.astype(np.int64),
                  as_int(domain), as_int(group))
    return split, classes or names


def load_npz(train_path: Path, test_path: Path | None, classes: list[str] | None) -> RawDataset:
    train, names = _load_npz_split(Path(train_path), classes)
    test = _load_npz_split(Path(test_path), classes)[0] if test_path is not None else None
    if test is not None and (train.group is None) != (test.group is None):
        has, lacks = (train_path, test_path) if test.group is None else (test_path, train_path)
        raise EdgetoolError(f"{has} has a 'group' array but {lacks} has none: give recording ids in both files or neither")
    all_y = train.y if test is None else np.concatenate([train.y, test.y])
    if names is None:
        names = [str(i) for i in range(int(all_y.max()) + 1 if len(all_y) else 0)]
    for split, path in ((train, train_path), (test, test_path)):
        if split is not None and len(split.y) and (split.y.min() < 0 or split.y.max() >= len(names)):
            bad = sorted({int(v) for v in split.y if v < 0 or v >= len(names)})
            raise EdgetoolError(f"{path}: label(s) {bad[:5]} not among the recipe's {len(names)} classes {names}")
    return RawDataset(train, test, names)


def load_raw(cfg: DataConfig) -> RawDataset:
    if cfg.format == "basicmotions":
        raw = load_basicmotions()
        if cfg.classes is not None:
            raw = _reorder_classes(raw, cfg.classes)
        return raw
    if cfg.format == "ts":
        return load_ts_pair(cfg.train_path, cfg.test_path, cfg.classes)
    if cfg.format == "uci_har":
        return load_uci_har(cfg.train_path, cfg.classes)
    return load_npz(cfg.train_path, cfg.test_path, cfg.classes)


def _reorder_classes(raw: RawDataset, order: list[str]) -> RawDataset:
    missing = sorted(set(raw.class_names) - set(order))
    if missing:
        raise EdgetoolError(f"data.classes does not list class(es) {missing} present in the data")
    remap = np.array([order.index(n) for n in raw.class_names], dtype=np.int64)
    conv = lambda s: None if s is None else replace(s, y=remap[s.y])  # noqa: E731
    return RawDataset(conv(raw.train), conv(raw.test), list(order))
