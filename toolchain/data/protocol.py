"""Data stage: load what users have (UEA/UCR `.ts`, the UCI HAR directory layout, `.npz`), build the
source -> target protocol (domain split, physical shift, few shots, validation, new classes) and normalise
with source-only statistics. Windows cut from one recording (given, or found by overlap detection) are kept
in one part of the split, so no labelled, validation and test window share samples. Everything returns plain
numpy arrays in [N, C, ...] layout; docs/protocol.md describes the protocol."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import EdgetoolError
from .formats import RawDataset, Split, load_raw
from ..recipe import DataConfig
from .recordings import recording_groups


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
    pool = raw.train.concat(raw.test)
    groups, group_source, note = recording_groups(pool.X, pool.group)
    notes += [note] if note else []
    train = replace(raw.train, group=groups[: len(raw.train)])
    test = None if raw.test is None else replace(raw.test, group=groups[len(raw.train):])
    pool = replace(pool, group=groups)
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
