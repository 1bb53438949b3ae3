"""Data stage: load what users have (UEA/UCR `.ts`, the UCI HAR directory layout, `.npz`), build the
source -> target protocol (domain split, physical shift, few shots, validation, new classes) and normalise
with source-only statistics. Windows cut from one recording (given, or found by overlap detection) are kept
in one part of the split, so no labelled, validation and test window share samples. Everything returns plain
numpy arrays in [N, C, ...] layout; docs/protocol.md describes the protocol."""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import EdgetoolError
from .recipe import DataConfig


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


@dataclass
class RawDataset:
    train: Split
    test: Split | None
    class_names: list[str]


@dataclass
class DataBundle:
    """The protocol every stage uses: pretrain on source_train, adapt on target_train, select (learning rate,
    method, step) on target_val only, score on target_test. target_val may be empty (len 0)."""

    source_train: Split
    target_train: Split
    target_test: Split
    class_names: list[str]  # source classes first, then classes only the target has
    num_source_classes: int
    mean: np.ndarray = field(repr=False)  # per-channel, from source_train only
    std: np.ndarray = field(repr=False)
    target_val: Split | None = None  # None only for hand-built bundles; build_protocol always sets a Split
    group_source: str = "none"  # where the recording groups came from: given | given + detected overlap | detected overlap | none
    notes: list[str] = field(default_factory=list)  # one-line remarks for the stages to print (reduced shots, dropped windows)

    def __post_init__(self) -> None:
        if self.target_val is None:
            self.target_val = _empty_like(self.target_test)

    def protocol_record(self) -> dict:
        """What a run records about the protocol (JSON-ready)."""
        return {
            "group_source": self.group_source,
            "windows": {part: len(getattr(self, part)) for part in ("source_train", "target_train", "target_val", "target_test")},
            "recordings": {part: int(len(np.unique(getattr(self, part).group))) if getattr(self, part).group is not None else None
                           for part in ("target_train", "target_val", "target_test")},
            "notes": list(self.notes),
        }

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.source_train.X.shape[1:])


# ---------------------------------------------------------------------------------------------- loaders


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
    root = resources.files("toolchain") / "datasets" / "BasicMotions"
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


# ---------------------------------------------------------------------------------------------- checks


def validate_split(split: Split, name: str, num_classes: int, required_classes: list[int] | None = None,
                   class_names: list[str] | None = None) -> None:
    X = split.X
    if not isinstance(X, np.ndarray) or not np.issubdtype(X.dtype, np.floating):
        raise EdgetoolError(f"{name}: X must be a float array, got {getattr(X, 'dtype', type(X).__name__)}")
    if X.ndim < 3:
        raise EdgetoolError(f"{name}: X must have rank >= 3 [N, C, T] (or [N, C, H, W]), got shape {X.shape}")
    if X.shape[0] != len(split.y):
        raise EdgetoolError(f"{name}: {X.shape[0]} inputs but {len(split.y)} labels")
    if len(split.y) == 0:
        raise EdgetoolError(f"{name}: no samples")
    if not np.isfinite(X).all():
        n_bad = int((~np.isfinite(X)).reshape(len(X), -1).any(axis=1).sum())
        raise EdgetoolError(f"{name}: {n_bad} window(s) contain NaN or inf")
    if split.y.min() < 0 or split.y.max() >= num_classes:
        raise EdgetoolError(f"{name}: labels outside 0..{num_classes - 1}")
    counts = np.bincount(split.y, minlength=num_classes)
    for c in required_classes if required_classes is not None else range(num_classes):
        if counts[c] == 0:
            label = class_names[c] if class_names else str(c)
            raise EdgetoolError(f"{name}: class '{label}' has no samples")


# ---------------------------------------------------------------------------------------------- shift


def rotation_matrix(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rodrigues' formula: rotation by `angle_rad` about unit `axis`."""
    axis = axis / np.linalg.norm(axis)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * K + (1 - np.cos(angle_rad)) * (K @ K)


@dataclass
class PhysicalShift:
    """A concrete, seeded sensor change. One rotation R is shared by every 3-axis group because a
    re-mounted device rotates its accelerometer and gyroscope frames together."""

    rotation: np.ndarray  # [3, 3]
    axis_groups: list[list[int]]
    gain: np.ndarray  # [C]
    offset: np.ndarray  # [C], absolute units
    noise_std: np.ndarray  # [C], absolute units
    seed: int

    def apply(self, X: np.ndarray, stream: int = 0) -> np.ndarray:
        out = X.astype(np.float64, copy=True)
        for group in self.axis_groups:
            out[:, group] = np.einsum("ij,njt->nit", self.rotation, out[:, group])
        bshape = (1, -1) + (1,) * (X.ndim - 2)
        out = out * self.gain.reshape(bshape) + self.offset.reshape(bshape)
        if self.noise_std.any():
            rng = np.random.default_rng([self.seed, 7919, stream])
            out = out + rng.standard_normal(out.shape) * self.noise_std.reshape(bshape)
        return out.astype(np.float32)


def make_shift(cfg, channel_std: np.ndarray) -> PhysicalShift:
    n_channels = len(channel_std)
    groups = cfg.axis_groups if cfg.axis_groups is not None else [[i, i + 1, i + 2] for i in range(0, n_channels - 2, 3)]
    if cfg.rotation_deg and (not groups or any(max(g) >= n_channels or min(g) < 0 for g in groups)):
        raise EdgetoolError(f"data.shift.axis_groups {groups} do not fit {n_channels} channels")
    rng = np.random.default_rng(cfg.seed)
    axis = rng.standard_normal(3)
    R = rotation_matrix(axis, np.deg2rad(cfg.rotation_deg))
    gain = rng.uniform(1 - cfg.gain, 1 + cfg.gain, n_channels)
    offset = rng.uniform(-cfg.offset, cfg.offset, n_channels) * channel_std
    return PhysicalShift(R, groups if cfg.rotation_deg else [], gain, offset, cfg.noise * channel_std, cfg.seed)


# ---------------------------------------------------------------------------------------------- recordings

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit reaches every output bit (uint64 arithmetic wraps)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def overlap_block(T: int) -> int:
    """Length of the sample blocks matched across windows; overlaps of at least this many samples are found."""
    return int(np.clip(T // 8, 4, 16))


def find_overlaps(X: np.ndarray) -> np.ndarray:
    """Pairs of windows that share samples, as rows (a, b, d): window b starts d >= 0 samples after window a
    and a[:, d:] equals b[:, :T-d] bit for bit (d = 0: duplicates). Enough pairs to join every set of
    overlapping windows, not every pair (windows 1 and 3 of a 75 %-overlap stream may be joined through 2
    only). Any offset is found whose overlap holds at least one non-constant block of overlap_block(T)
    samples; hashing every block and sorting the hashes costs O(N T log(N T)), then each proposed alignment
    is checked on the raw values."""
    N, C, T = X.shape
    k = overlap_block(T)
    if N < 2 or T < 2 * k:
        return np.zeros((0, 3), dtype=np.int64)
    words = np.ascontiguousarray(X, dtype=np.float32).view(np.uint32)
    h = np.full((N, T), _FNV_OFFSET, dtype=np.uint64)
    for c in range(C):  # one hash per sample vector (all channels at one time step)
        h = (h ^ words[:, c].astype(np.uint64)) * _FNV_PRIME
    h = _mix64(h)
    P = T - k + 1
    block = np.zeros((N, P), dtype=np.uint64)
    for j in range(k):  # polynomial hash of the k samples starting at each position
        block = block * _FNV_PRIME + h[:, j:j + P]
    # Constant blocks (a sensor at rest, zero padding) recur across unrelated windows: they propose nothing.
    runs = np.concatenate([np.zeros((N, 1), np.int64), np.cumsum(h[:, 1:] == h[:, :-1], axis=1)], axis=1)
    win, pos = np.nonzero((runs[:, k - 1:] - runs[:, :P]) != k - 1)
    keys = block[win, pos]
    order = np.lexsort((pos, win, keys))
    keys, win, pos = keys[order], win[order], pos[order]
    # Consecutive occurrences of one block in two windows propose an alignment: chained rather than all pairs,
    # so a block in m windows costs m - 1 proposals.
    hit = np.flatnonzero((keys[1:] == keys[:-1]) & (win[1:] != win[:-1]))
    a, b, d = win[hit], win[hit + 1], pos[hit] - pos[hit + 1]  # a's sample pos[hit] is b's sample pos[hit + 1]
    first, second = np.where(d >= 0, a, b).astype(np.int64), np.where(d >= 0, b, a).astype(np.int64)
    code = np.unique((first * N + second) * T + np.abs(d))
    cand = np.stack([code // T // N, code // T % N, code % T], axis=1)
    ok = np.zeros(len(cand), dtype=bool)
    for shift in np.unique(cand[:, 2]):
        rows = np.flatnonzero(cand[:, 2] == shift)
        for chunk in np.array_split(rows, len(rows) // 4096 + 1):  # bounded memory for large N
            ok[chunk] = (words[cand[chunk, 0], :, shift:] == words[cand[chunk, 1], :, :T - shift]).all(axis=(1, 2))
    return cand[ok]


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Union-find: component id per item 0..n-1 joined by `pairs` [M, 2], numbered by each component's
    first item (no pairs: 0..n-1)."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    for a, b in pairs.tolist():
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(i) for i in range(n)], dtype=np.int64)
    return np.unique(roots, return_inverse=True)[1].reshape(-1).astype(np.int64)


def recording_groups(X: np.ndarray, given: np.ndarray | None) -> tuple[np.ndarray, str, str | None]:
    """Recording id per window (0..G-1), where the grouping came from ("given", "given + detected overlap",
    "detected overlap", "none") and a one-line note. Windows that overlap join one recording even when the
    given ids say otherwise. Overlap detection runs on time series [N, C, T] only."""
    n = len(X)
    overlaps = find_overlaps(X) if X.ndim == 3 else np.zeros((0, 3), dtype=np.int64)
    links = [overlaps[:, :2]]
    if given is not None:
        _, first, inv = np.unique(given, return_index=True, return_inverse=True)
        links.append(np.stack([first[inv.reshape(-1)], np.arange(n)], axis=1))
    groups = _components(n, np.concatenate(links))
    G = int(groups.max()) + 1 if n else 0
    kept_apart = f"{n} windows in {G} recordings; labelled, validation and test windows come from different recordings"
    if given is not None:
        n_given = len(np.unique(given))
        if G < n_given:
            merged = f"recordings: {n_given} given, {n_given - G} merged because their windows overlap"
            return groups, "given + detected overlap", f"{merged} ({kept_apart})"
        return groups, "given", f"recordings given by the data ({kept_apart})"
    if len(overlaps):
        return groups, "detected overlap", f"overlapping windows detected: {len(overlaps)} pairs share samples ({kept_apart})"
    return groups, "none", None


# ---------------------------------------------------------------------------------------------- protocol


def _group_split(strata: np.ndarray, groups: np.ndarray, test_fraction: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) window indices: per stratum, whole recordings go to test until they hold test_fraction of
    the stratum's windows (at least one recording, never its last). A recording belongs to the stratum most
    of its windows have. With one window per recording this is the plain per-class split it replaces,
    random draws included."""
    g = np.unique(groups, return_inverse=True)[1].reshape(-1)
    s = np.unique(strata, return_inverse=True)[1].reshape(-1)
    counts = np.zeros((int(g.max(initial=-1)) + 1, int(s.max(initial=-1)) + 1), dtype=np.int64)
    np.add.at(counts, (g, s), 1)
    group_stratum, sizes = counts.argmax(axis=1), counts.sum(axis=1)
    test_groups = [np.zeros(0, dtype=np.int64)]
    for st in range(counts.shape[1]):
        members = np.flatnonzero(group_stratum == st)
        if len(members) == 0:
            continue
        perm = rng.permutation(members)
        if len(perm) > 1:
            n_test = max(1, int(round(sizes[members].sum() * test_fraction)))
            take = min(int(np.searchsorted(np.cumsum(sizes[perm]), n_test)) + 1, len(perm) - 1)
            test_groups.append(perm[:take])
    is_test = np.isin(g, np.concatenate(test_groups))
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def _pick(strata: np.ndarray, groups: np.ndarray | None, per: int, rng: np.random.Generator,
          fewest_recordings: bool) -> np.ndarray:
    """Up to `per` random windows of each stratum. fewest_recordings: fill from as few recordings as possible
    (a user labels a stretch of one recording), which leaves the others for validation; with one window per
    recording the draw is the same."""
    picked = [np.zeros(0, dtype=np.int64)]
    for st in np.unique(strata):
        idx = rng.permutation(np.flatnonzero(strata == st))
        if fewest_recordings and groups is not None:
            _, first, inv = np.unique(groups[idx], return_index=True, return_inverse=True)
            idx = idx[np.argsort(first[inv.reshape(-1)], kind="stable")]  # recordings in order of first draw
        picked.append(idx[:per])
    return np.sort(np.concatenate(picked))


def _concat(a: Split, b: Split | None) -> Split:
    if b is None:
        return a
    both = lambda x, y: None if x is None or y is None else np.concatenate([x, y])  # noqa: E731
    return Split(np.concatenate([a.X, b.X]), np.concatenate([a.y, b.y]), both(a.domain, b.domain), both(a.group, b.group))


def _empty_like(split: Split) -> Split:
    return split.take(np.zeros(0, dtype=np.int64))


def _without_recordings(split: Split, groups: np.ndarray, message: str, notes: list[str]) -> Split:
    """`split` less the windows of recordings in `groups`; the note says how many went."""
    shared = np.isin(split.group, groups)
    if not shared.any():
        return split
    notes.append(message.format(n=int(shared.sum())))
    return split.take(np.flatnonzero(~shared))


class _Strata:
    """Stratum key per window: its class, or its (domain, class) pair with target_shots_per: domain_class."""

    def __init__(self, per: str, names: list[str], pool: Split):
        if per == "domain_class" and pool.domain is None:
            raise EdgetoolError("data.target_shots_per: domain_class needs domain ids (npz 'domain' or UCI HAR subjects)")
        self.per, self.names, self.K = per, names, len(names)
        self.dmin = int(pool.domain.min()) if per == "domain_class" and len(pool.y) else 0

    def __call__(self, split: Split) -> np.ndarray:
        return split.y if self.per == "class" else (split.domain - self.dmin) * self.K + split.y

    def name(self, key: int) -> str:
        if self.per == "class":
            return f"class '{self.names[key]}'"
        return f"domain {key // self.K + self.dmin} class '{self.names[key % self.K]}'"

    def shortfall(self, field_name: str, per: int, have: Split, expected: np.ndarray, where: str) -> str | None:
        """A note naming the strata with fewer than `per` windows in `have` (issue: silently fewer shots)."""
        keys, counts = np.unique(self(have), return_counts=True)
        count = dict(zip(keys.tolist(), counts.tolist()))
        short = [(k, count.get(k, 0)) for k in np.unique(expected).tolist() if count.get(k, 0) < per]
        if not short:
            return None
        listed = ", ".join(f"{self.name(k)} {c}" for k, c in short[:6])
        listed += f", ... ({len(short)} in all)" if len(short) > 6 else ""
        return f"data.{field_name} {per}: only {listed} {where}; using what there is"


def build_protocol(raw: RawDataset, cfg: DataConfig, seed: int = 0) -> DataBundle:
    """Source/target splits by recording, shots, validation, new-class reordering, physical shift and
    source-only normalisation (docs/protocol.md)."""
    names = list(raw.class_names)
    K = len(names)
    for split, label in ((raw.train, "training data"), (raw.test, "test data")):
        if split is not None:
            validate_split(split, label, K, required_classes=[], class_names=names)
    if raw.test is not None and raw.test.X.shape[1:] != raw.train.X.shape[1:]:
        raise EdgetoolError(f"train and test inputs differ in shape: {raw.train.X.shape[1:]} vs {raw.test.X.shape[1:]}")
    rng = np.random.default_rng([seed, 17])
    notes: list[str] = []

    # Recordings over the windows of both files: one recording may have been cut into both.
    pool = _concat(raw.train, raw.test)
    groups, group_source, note = recording_groups(pool.X, pool.group)
    notes += [note] if note else []
    train = replace(raw.train, group=groups[: len(raw.train)])
    test = None if raw.test is None else replace(raw.test, group=groups[len(raw.train):])
    pool = _concat(train, test)
    strata = _Strata(cfg.target_shots_per, names, pool)
    val_pool = None

    if cfg.source_domains is not None:
        if pool.domain is None:
            raise EdgetoolError("data.source_domains is set but the data has no domain ids (npz 'domain' or UCI HAR subjects)")
        overlap = set(cfg.source_domains) & set(cfg.target_domains)
        if overlap:
            raise EdgetoolError(f"data.source_domains and data.target_domains overlap: {sorted(overlap)}")
        known = set(np.unique(pool.domain).tolist())
        for field_name in ("source_domains", "target_domains", "val_domains"):
            missing = sorted(set(getattr(cfg, field_name) or []) - known)
            if missing:
                raise EdgetoolError(f"data.{field_name}: domain id(s) {missing} not in the data (has {sorted(known)[:20]})")
        source = pool.take(np.flatnonzero(np.isin(pool.domain, cfg.source_domains)))
        target = pool.take(np.flatnonzero(np.isin(pool.domain, cfg.target_domains)))
        tr_idx, te_idx = _group_split(strata(target), target.group, cfg.test_fraction, rng)
        labelled, target_test = target.take(tr_idx), target.take(te_idx)
        held_out = target.group
        if cfg.val_domains is not None:
            val_pool = pool.take(np.flatnonzero(np.isin(pool.domain, cfg.val_domains)))
            val_pool = _without_recordings(val_pool, target.group, "dropped {n} validation-domain window(s) that share "
                                           "a recording with the target", notes)
            held_out = np.concatenate([held_out, val_pool.group])
        source = _without_recordings(source, held_out, "dropped {n} source window(s) that share a recording with "
                                     "the target or validation windows", notes)
    else:
        if raw.test is None:
            tr_idx, te_idx = _group_split(strata(train), train.group, cfg.test_fraction, rng)
            source, target_test = train.take(tr_idx), train.take(te_idx)
        else:
            target_test = test
            source = _without_recordings(train, test.group, "dropped {n} training window(s) that share a recording "
                                         "with the test file", notes)
        labelled = source  # the synthetic-shift protocol: target windows are shifted source windows
    expected = np.concatenate([strata(labelled), strata(target_test)])
    if group_source != "none":
        lost = sorted(set(labelled.y.tolist()) - set(target_test.y.tolist()))
        if lost and (raw.test is None or cfg.source_domains is not None):
            raise EdgetoolError(f"target test data: class '{names[lost[0]]}' has no windows: all of its target windows "
                                "are in one recording, and a recording is never split between labelled and test windows")

    rest = None  # labelled windows in recordings the shots do not use: the validation candidates
    if cfg.target_shots is not None:
        keys = strata(labelled)
        target_train = labelled.take(_pick(keys, labelled.group, cfg.target_shots, rng, fewest_recordings=True))
        note = strata.shortfall("target_shots", cfg.target_shots, target_train, expected, "labelled target window(s)")
        notes += [note] if note else []
        rest = labelled.take(np.flatnonzero(~np.isin(labelled.group, target_train.group)))
    else:
        target_train = labelled

    if val_pool is not None:
        target_val = val_pool
    elif cfg.val_shots and rest is None:
        target_val = _empty_like(labelled)
        notes.append("no validation split: data.target_shots is unset, so every labelled target window trains "
                     "(set data.target_shots or data.val_domains)")
    elif cfg.val_shots:
        # Its own random stream: the shots and the test split stay what they were before validation existed.
        val_rng = np.random.default_rng([seed, 17, 1])
        target_val = rest.take(_pick(strata(rest), rest.group, cfg.val_shots, val_rng, fewest_recordings=False))
        hint = "; data.val_domains can name a validation domain" if cfg.source_domains is not None else ""
        note = strata.shortfall("val_shots", cfg.val_shots, target_val, expected,
                                "target window(s) in recordings that neither the shots nor the test use")
        notes += [note + hint] if note else []
    else:
        target_val = _empty_like(labelled)

    # New classes: the source lacks some classes; put source classes first so the base head's rows
    # stay valid when the head is extended for the target.
    if cfg.source_classes is not None:
        unknown = sorted(set(cfg.source_classes) - set(names))
        if unknown:
            raise EdgetoolError(f"data.source_classes: {unknown} not among the classes {names}")
        order = list(cfg.source_classes) + [n for n in names if n not in cfg.source_classes]
        remap = np.array([order.index(n) for n in names], dtype=np.int64)
        source, target_train, target_val, target_test = (replace(s, y=remap[s.y])
                                                         for s in (source, target_train, target_val, target_test))
        source = source.take(np.flatnonzero(source.y < len(cfg.source_classes)))
        names, n_source = order, len(cfg.source_classes)
    else:
        n_source = K

    validate_split(source, "source training data", K, required_classes=list(range(n_source)), class_names=names)
    validate_split(target_train, "target training data", K, class_names=names)
    validate_split(target_test, "target test data", K, class_names=names)

    reduce_axes = (0,) + tuple(range(2, source.X.ndim))
    mean = source.X.mean(axis=reduce_axes).astype(np.float32)
    std = source.X.std(axis=reduce_axes).astype(np.float32)
    std = np.where(std > 1e-8, std, 1.0).astype(np.float32)

    if cfg.shift is not None:
        if source.X.ndim != 3:
            raise EdgetoolError("data.shift applies to time series [N, C, T] only")
        shift = make_shift(cfg.shift, std.astype(np.float64))
        target_train = replace(target_train, X=shift.apply(target_train.X, stream=1))
        target_test = replace(target_test, X=shift.apply(target_test.X, stream=2))
        target_val = replace(target_val, X=shift.apply(target_val.X, stream=3))

    bshape = (1, -1) + (1,) * (source.X.ndim - 2)
    norm = lambda s: replace(s, X=((s.X - mean.reshape(bshape)) / std.reshape(bshape)).astype(np.float32))  # noqa: E731
    return DataBundle(norm(source), norm(target_train), norm(target_test), names, n_source, mean, std,
                      target_val=norm(target_val), group_source=group_source, notes=notes)


def load_data(cfg: DataConfig, seed: int = 0) -> DataBundle:
    return build_protocol(load_raw(cfg), cfg, seed)
