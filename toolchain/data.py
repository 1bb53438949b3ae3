"""Data stage: load what users have (UEA/UCR `.ts`, the UCI HAR directory layout, `.npz`), build the
source -> target protocol (domain split, physical shift, few shots, new classes) and normalise with
source-only statistics. Everything returns plain numpy arrays in [N, C, ...] layout."""

from __future__ import annotations

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

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: np.ndarray) -> "Split":
        return Split(self.X[idx], self.y[idx], None if self.domain is None else self.domain[idx])


@dataclass
class RawDataset:
    train: Split
    test: Split | None
    class_names: list[str]


@dataclass
class DataBundle:
    """The protocol every stage uses: pretrain on source_train, adapt on target_train, score on target_test."""

    source_train: Split
    target_train: Split
    target_test: Split
    class_names: list[str]  # source classes first, then classes only the target has
    num_source_classes: int
    mean: np.ndarray = field(repr=False)  # per-channel, from source_train only
    std: np.ndarray = field(repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.source_train.X.shape[1:])


# ---------------------------------------------------------------------------------------------- loaders


def parse_ts(path: Path | str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Parse a UEA/UCR `.ts` file (equal-length, no timestamps). Returns X [N, C, T], string labels, and
    the class order declared in `@classLabel` (None if absent)."""
    path = Path(path)
    if not path.is_file():
        raise EdgetoolError(f".ts file not found: {path}")
    declared: list[str] | None = None
    has_labels = True
    series: list[np.ndarray] = []
    labels: list[str] = []
    in_data = False
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, raw in enumerate(fh, 1):
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
                elif low.startswith("@data"):
                    in_data = True
                continue
            fields = line.split(":")
            if has_labels:
                labels.append(fields[-1].strip())
                fields = fields[:-1]
            try:
                dims = [np.array([np.nan if v.strip() == "?" else float(v) for v in f.split(",")], dtype=np.float64) for f in fields]
            except ValueError as exc:
                raise EdgetoolError(f"{path}:{lineno}: not a number in the series ({exc})") from None
            lengths = {len(d) for d in dims}
            if len(lengths) != 1:
                raise EdgetoolError(f"{path}:{lineno}: unequal-length dimensions are not supported")
            series.append(np.stack(dims))
    if not in_data or not series:
        raise EdgetoolError(f"{path}: no @data section with series found; is this a .ts file?")
    shapes = {s.shape for s in series}
    if len(shapes) != 1:
        raise EdgetoolError(f"{path}: series have different shapes {sorted(shapes)[:3]}; unequal-length data is not supported")
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
    Channels: body_acc xyz, body_gyro xyz, total_acc xyz (consecutive triples, so rotation shifts apply)."""
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
        splits[split] = Split(X, _index_labels(labels, names, f"UCI HAR {split}"), subjects)
    return RawDataset(splits["train"], splits["test"], list(names))


def _load_npz_split(path: Path, classes: list[str] | None) -> tuple[Split, list[str] | None]:
    if not path.is_file():
        raise EdgetoolError(f".npz file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError) as exc:
        raise EdgetoolError(f"{path}: cannot read as .npz ({exc})") from None
    for key in ("X", "y"):
        if key not in arrays:
            raise EdgetoolError(f"{path}: missing array '{key}' (expected X [N, C, T], y [N], optional domain [N])")
    X, y = arrays["X"], arrays["y"]
    if y.ndim != 1:
        raise EdgetoolError(f"{path}: y must be one-dimensional [N] class ids, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise EdgetoolError(f"{path}: y must be integer class ids, got dtype {y.dtype}")
    names = [str(n) for n in arrays["class_names"].tolist()] if "class_names" in arrays else None
    domain = arrays.get("domain")
    if domain is not None and (domain.shape != y.shape or not np.issubdtype(domain.dtype, np.integer)):
        raise EdgetoolError(f"{path}: domain must be integers shaped like y {y.shape}, got {domain.dtype} {domain.shape}")
    split = Split(np.asarray(X, dtype=np.float32) if np.issubdtype(X.dtype, np.number) else X, y.astype(np.int64),
                  None if domain is None else domain.astype(np.int64))
    return split, classes or names


def load_npz(train_path: Path, test_path: Path | None, classes: list[str] | None) -> RawDataset:
    train, names = _load_npz_split(Path(train_path), classes)
    test = _load_npz_split(Path(test_path), classes)[0] if test_path is not None else None
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


# ---------------------------------------------------------------------------------------------- protocol


def _stratified_pick(y: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    picked = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        picked.append(rng.permutation(idx)[: min(per_class, len(idx))])
    return np.sort(np.concatenate(picked))


def _stratified_split(y: np.ndarray, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = max(1, int(round(len(idx) * test_fraction))) if len(idx) > 1 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _concat(a: Split, b: Split | None) -> Split:
    if b is None:
        return a
    dom = None if a.domain is None or b.domain is None else np.concatenate([a.domain, b.domain])
    return Split(np.concatenate([a.X, b.X]), np.concatenate([a.y, b.y]), dom)


def build_protocol(raw: RawDataset, cfg: DataConfig, seed: int = 0) -> DataBundle:
    """Source/target splits, new-class reordering, physical shift and source-only normalisation."""
    names = list(raw.class_names)
    K = len(names)
    for split, label in ((raw.train, "training data"), (raw.test, "test data")):
        if split is not None:
            validate_split(split, label, K, required_classes=[], class_names=names)
    if raw.test is not None and raw.test.X.shape[1:] != raw.train.X.shape[1:]:
        raise EdgetoolError(f"train and test inputs differ in shape: {raw.train.X.shape[1:]} vs {raw.test.X.shape[1:]}")
    rng = np.random.default_rng([seed, 17])

    if cfg.source_domains is not None:
        pool = _concat(raw.train, raw.test)
        if pool.domain is None:
            raise EdgetoolError("data.source_domains is set but the data has no domain ids (npz 'domain' or UCI HAR subjects)")
        overlap = set(cfg.source_domains) & set(cfg.target_domains)
        if overlap:
            raise EdgetoolError(f"data.source_domains and data.target_domains overlap: {sorted(overlap)}")
        known = set(np.unique(pool.domain).tolist())
        for field_name, doms in (("source_domains", cfg.source_domains), ("target_domains", cfg.target_domains)):
            missing = sorted(set(doms) - known)
            if missing:
                raise EdgetoolError(f"data.{field_name}: domain id(s) {missing} not in the data (has {sorted(known)[:20]})")
        source = pool.take(np.flatnonzero(np.isin(pool.domain, cfg.source_domains)))
        target = pool.take(np.flatnonzero(np.isin(pool.domain, cfg.target_domains)))
        tr_idx, te_idx = _stratified_split(target.y, cfg.test_fraction, rng)
        target_train, target_test = target.take(tr_idx), target.take(te_idx)
    else:
        source = raw.train
        if raw.test is None:
            tr_idx, te_idx = _stratified_split(raw.train.y, cfg.test_fraction, rng)
            source, target_test = raw.train.take(tr_idx), raw.train.take(te_idx)
        else:
            target_test = raw.test
        target_train = source

    if cfg.target_shots is not None:
        target_train = target_train.take(_stratified_pick(target_train.y, cfg.target_shots, rng))

    # New classes: the source lacks some classes; put source classes first so the base head's rows
    # stay valid when the head is extended for the target.
    if cfg.source_classes is not None:
        unknown = sorted(set(cfg.source_classes) - set(names))
        if unknown:
            raise EdgetoolError(f"data.source_classes: {unknown} not among the classes {names}")
        order = list(cfg.source_classes) + [n for n in names if n not in cfg.source_classes]
        remap = np.array([order.index(n) for n in names], dtype=np.int64)
        source, target_train, target_test = (replace(s, y=remap[s.y]) for s in (source, target_train, target_test))
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

    bshape = (1, -1) + (1,) * (source.X.ndim - 2)
    norm = lambda s: replace(s, X=((s.X - mean.reshape(bshape)) / std.reshape(bshape)).astype(np.float32))  # noqa: E731
    return DataBundle(norm(source), norm(target_train), norm(target_test), names, n_source, mean, std)


def load_data(cfg: DataConfig, seed: int = 0) -> DataBundle:
    return build_protocol(load_raw(cfg), cfg, seed)
