"""The leakage-free protocol: recordings (given or found by overlap detection) never straddle two parts of the
split, shots per domain x class, the validation split, notes, and the shipped recipes' splits unchanged."""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from toolchain.data.protocol import build_protocol, load_data
from toolchain.data.formats import RawDataset, Split, load_basicmotions, load_uci_har
from toolchain.data.recordings import find_overlaps, recording_groups
from toolchain.errors import EdgetoolError
from toolchain.recipe import DataConfig, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------- helpers


def recordings(seed: int, n_rec: int, classes: int = 3, domains: int = 1, T: int = 32, C: int = 3,
               overlap: float = 0.5, windows: tuple[int, int] = (2, 7)) -> tuple[Split, np.ndarray]:
    """Windows cut from continuous random recordings with `overlap` (0.5: each window shares half its samples
    with the next). Recording r has class r % classes and domain (r // classes) % domains. Returns the split
    (no group array) and the true recording id of every window."""
    rng = np.random.default_rng(seed)
    stride = T - int(round(T * overlap))
    X, y, dom, rec = [], [], [], []
    for r in range(n_rec):
        n = int(rng.integers(*windows))
        stream = rng.normal(size=(C, stride * (n - 1) + T)).astype(np.float32)
        X += [stream[:, i * stride: i * stride + T] for i in range(n)]
        y += [r % classes] * n
        dom += [(r // classes) % domains] * n
        rec += [r] * n
    order = rng.permutation(len(y))  # files are not always in recording order
    split = Split(np.stack(X)[order], np.array(y, dtype=np.int64)[order], np.array(dom, dtype=np.int64)[order])
    return split, np.array(rec)[order]


def true_ids(part: Split, bundle, pool: np.ndarray) -> np.ndarray:
    """Row of `pool` (raw windows) each window of a bundle part came from (no shift: undo the normalisation
    and take the nearest raw window; random data makes the match unambiguous)."""
    if len(part) == 0:
        return np.zeros(0, dtype=np.int64)
    raw = part.X * bundle.std[None, :, None] + bundle.mean[None, :, None]
    dist = ((raw[:, None] - pool[None]) ** 2).sum(axis=(2, 3))
    assert (dist.min(axis=1) < 1e-6).all()
    return dist.argmin(axis=1)


def assert_parts_share_no_recording(bundle, pool_X: np.ndarray, rec: np.ndarray, source_may_share_labelled: bool):
    parts = {name: set(rec[true_ids(getattr(bundle, name), bundle, pool_X)].tolist())
             for name in ("source_train", "target_train", "target_val", "target_test")}
    assert not parts["target_train"] & parts["target_test"]
    assert not parts["target_train"] & parts["target_val"]
    assert not parts["target_val"] & parts["target_test"]
    assert not parts["source_train"] & parts["target_test"]
    if not source_may_share_labelled:  # the synthetic-shift protocol shifts source windows by design
        assert not parts["source_train"] & (parts["target_val"] | parts["target_train"])
    # The bundle's own group ids say the same.
    g = {name: set(getattr(bundle, name).group.tolist()) for name in parts}
    assert not (g["target_train"] & g["target_test"] or g["target_train"] & g["target_val"] or g["target_val"] & g["target_test"])


def cfg(**fields) -> DataConfig:
    return DataConfig(format="npz", train_path="unused.npz", **fields)


# ---------------------------------------------------------------------------------------------- unchanged splits

# Index-level fingerprints of the splits, computed with the code before recordings, target_shots_per and the
# validation split existed. Windows are replaced by tags (window number) so the fingerprint names which raw
# window went where, independent of floating-point summation order on another machine; the shift is left out
# because it never decided membership.
BEFORE = {
    'recipes/basicmotions-ttlora.yaml@0': '5b823a60b2c1be54',
    'recipes/basicmotions-ttlora.yaml@1': '63921c3932330dd7',
    'recipes/basicmotions-ttlora.yaml@2': '9ad7db4e30e4be85',
    'recipes/basicmotions-ttlora.yaml@3': '0a2fa3910497012d',
    'recipes/basicmotions-ttlora.yaml@4': '477a202caf4463e9',
    'recipes/bench-newclass-mobilenet1d.yaml@0': 'c377c45e3aa0889c',
    'recipes/bench-newclass-mobilenet1d.yaml@1': 'aceba9dca80845e3',
    'recipes/bench-newclass-mobilenet1d.yaml@2': '0fbea1801f335599',
    'recipes/bench-newclass-mobilenet1d.yaml@3': 'bbc2c24c1bf5eb62',
    'recipes/bench-newclass-mobilenet1d.yaml@4': 'b1283e1c7592ff75',
    'recipes/bench-newclass-resnet1d.yaml@0': 'c377c45e3aa0889c',
    'recipes/bench-newclass-resnet1d.yaml@1': 'aceba9dca80845e3',
    'recipes/bench-newclass-resnet1d.yaml@2': '0fbea1801f335599',
    'recipes/bench-newclass-resnet1d.yaml@3': 'bbc2c24c1bf5eb62',
    'recipes/bench-newclass-resnet1d.yaml@4': 'b1283e1c7592ff75',
    'recipes/bench-shift-mobilenet1d.yaml@0': 'e44c485c88351856',
    'recipes/bench-shift-mobilenet1d.yaml@1': '2e26f1f85a3cf81d',
    'recipes/bench-shift-mobilenet1d.yaml@2': '0f0990efdc954f87',
    'recipes/bench-shift-mobilenet1d.yaml@3': '393a7362d079abc6',
    'recipes/bench-shift-mobilenet1d.yaml@4': 'f2b3435f0648ed7e',
    'recipes/bench-shift-resnet1d.yaml@0': 'e44c485c88351856',
    'recipes/bench-shift-resnet1d.yaml@1': '2e26f1f85a3cf81d',
    'recipes/bench-shift-resnet1d.yaml@2': '0f0990efdc954f87',
    'recipes/bench-shift-resnet1d.yaml@3': '393a7362d079abc6',
    'recipes/bench-shift-resnet1d.yaml@4': 'f2b3435f0648ed7e',
    'default@0': 'bfcbc164ec982073',
    'default@1': 'bfcbc164ec982073',
    'domains-shots2@0': '91eb0fa4373b80bf',
    'domains-shots2@3': '131c304b67d8df5d',
    'domains-all@0': 'a1d6914518290f88',
    'domains-all@3': '9ea695e830ae254a',
    'notest-shots3@0': '1ef8409c3de2b62e',
    'notest-shots3@3': 'ea29f97f2a3eb8f7',
    'test-shots5@0': 'd1d5ec46ecbff98e',
    'test-shots5@3': 'c482b25a5b3585ef',
}


def _tagged(split: Split, offset: int) -> Split:
    X = np.broadcast_to((np.arange(len(split.y), dtype=np.float32) + offset)[:, None, None], split.X.shape).copy()
    X += np.arange(split.X.shape[1], dtype=np.float32)[None, :, None] * 0.25  # per-channel, so std > 0
    return replace(split, X=X)


def fingerprint(raw: RawDataset, data: DataConfig, seed: int) -> str:
    raw = RawDataset(_tagged(raw.train, 0), None if raw.test is None else _tagged(raw.test, 10000), raw.class_names)
    b = build_protocol(raw, data.model_copy(update={"shift": None}), seed)
    h = hashlib.sha256(repr(b.class_names).encode())
    for s in (b.source_train, b.target_train, b.target_test):
        window = np.rint(s.X[:, 0, 0] * b.std[0] + b.mean[0]).astype(np.int64)
        for a in (window, s.y, s.domain):
            h.update(b"-" if a is None else np.ascontiguousarray(a, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def _synthetic(with_test: bool, domains: bool) -> RawDataset:
    y = np.repeat(np.arange(4), 24)
    dom = np.tile(np.arange(4), 24) if domains else None
    X = np.zeros((len(y), 3, 8), np.float32)
    test = Split(X[:40].copy(), y[::24].repeat(10)[:40], None if dom is None else dom[:40]) if with_test else None
    return RawDataset(Split(X, y, dom), test, ["a", "b", "c", "d"])


def test_shipped_recipes_and_default_protocols_split_as_before():
    got = {}
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        for s in range(5):  # bench draws seeds recipe.seed + 0..4
            got[f"recipes/{path.name}@{recipe.seed + s}"] = fingerprint(load_basicmotions(), recipe.data, recipe.seed + s)
    for s in (0, 1):
        got[f"default@{s}"] = fingerprint(load_basicmotions(), DataConfig(), s)
    cases = {
        "domains-shots2": (_synthetic(False, True), cfg(source_domains=[0, 1], target_domains=[2, 3], target_shots=2)),
        "domains-all": (_synthetic(False, True), cfg(source_domains=[0, 1], target_domains=[2, 3])),
        "notest-shots3": (_synthetic(False, False), cfg(test_fraction=0.3, target_shots=3)),
        "test-shots5": (_synthetic(True, False), cfg(target_shots=5)),
    }
    for name, (raw, data) in cases.items():
        for s in (0, 3):
            got[f"{name}@{s}"] = fingerprint(raw, data, s)
    assert got == BEFORE


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_find_no_recordings_and_gain_a_validation_split(path):
    """BasicMotions windows do not overlap (within or across its two files), so the fingerprints above are the
    real data's path; every shipped recipe sets target_shots, so it gets validation windows by default."""
    recipe = load_recipe(path)
    bundle = load_data(recipe.data, recipe.seed)
    assert bundle.group_source == "none" and bundle.notes == []
    per_class = np.bincount(bundle.target_val.y, minlength=bundle.num_classes)
    assert per_class.tolist() == [2] * bundle.num_classes
    assert not set(bundle.target_val.group.tolist()) & set(bundle.target_train.group.tolist())
    # Validation windows are source windows moved by the target's shift, like the shots: none equals its
    # unshifted source window any more.
    val, src = bundle.target_val.X, bundle.source_train.X
    assert not np.isclose(val[:, None], src[None], atol=1e-3).all(axis=(2, 3)).any()
    assert bundle.protocol_record()["windows"]["target_val"] == 2 * bundle.num_classes


def test_validation_does_not_change_shots_or_test():
    data = DataConfig(target_shots=3)
    with_val, without = load_data(data, 0), load_data(data.model_copy(update={"val_shots": 0}), 0)
    for part in ("source_train", "target_train", "target_test"):
        np.testing.assert_array_equal(getattr(with_val, part).X, getattr(without, part).X)
    assert len(with_val.target_val) == 8 and len(without.target_val) == 0
    assert with_val.target_val.X.shape[1:] == without.target_val.X.shape[1:] == (6, 100)


# ---------------------------------------------------------------------------------------------- overlap detection


def stream_windows(n: int, T: int, stride: int, C: int = 4, seed: int = 0) -> np.ndarray:
    stream = np.random.default_rng(seed).normal(size=(C, stride * (n - 1) + T)).astype(np.float32)
    return np.stack([stream[:, i * stride: i * stride + T] for i in range(n)])


@pytest.mark.parametrize("overlap", [0.5, 0.25, 0.75, 0.125])
def test_overlap_detection_finds_each_consecutive_pair(overlap):
    T = 128
    stride = int(T * (1 - overlap))
    X = stream_windows(10, T, stride)
    pairs = {tuple(p) for p in find_overlaps(X).tolist()}
    # Window j starts (j - i) * stride samples after window i; every consecutive pair is found, and at 75 %
    # overlap, where windows two and three apart overlap too, only true pairs (not necessarily all of them:
    # the consecutive ones already join the recording).
    true_pairs = {(i, j, (j - i) * stride) for i in range(10) for j in range(i + 1, 10) if (j - i) * stride < T}
    assert {(i, i + 1, stride) for i in range(9)} <= pairs <= true_pairs
    groups, source, note = recording_groups(X, None)
    assert source == "detected overlap" and groups.tolist() == [0] * 10 and "10 windows in 1 recordings" in note


def test_overlap_detection_at_any_offset_and_across_shuffled_recordings():
    split, rec = recordings(seed=3, n_rec=12, T=40, overlap=0.3, windows=(2, 6))
    groups, source, _ = recording_groups(split.X, None)
    assert source == "detected overlap"
    # The detected groups are exactly the recordings (one id per recording, no two recordings merged).
    assert len(set(zip(groups.tolist(), rec.tolist()))) == len(set(rec.tolist())) == len(set(groups.tolist()))


def test_overlap_detection_invents_nothing():
    rng = np.random.default_rng(0)
    assert len(find_overlaps(rng.normal(size=(300, 3, 64)).astype(np.float32))) == 0
    # Adjacent windows of one stream that do not overlap (stride = T) share no sample.
    assert len(find_overlaps(stream_windows(20, 64, 64))) == 0
    # Constant stretches (a sensor at rest, zero padding) recur in every window without being one recording.
    X = rng.normal(size=(50, 3, 64)).astype(np.float32)
    X[:, :, 40:] = 0.0
    X[:, :, :8] = 1.5
    assert len(find_overlaps(X)) == 0
    # Windows that match in most samples but differ in one are not the same recording.
    Y = stream_windows(6, 64, 32)
    Y[3, 1, 5] += 1e-3  # window 3 no longer equals window 2's second half...
    pairs = {tuple(p[:2]) for p in find_overlaps(Y).tolist()}
    assert (2, 3) not in pairs and (3, 4) in pairs  # ...but its own second half still equals window 4's first
    raw = load_basicmotions()
    groups, source, note = recording_groups(np.concatenate([raw.train.X, raw.test.X]), None)
    assert source == "none" and note is None and groups.tolist() == list(range(80))


def test_exact_duplicates_are_one_recording():
    X = np.random.default_rng(0).normal(size=(5, 2, 32)).astype(np.float32)
    X[4] = X[1]
    assert find_overlaps(X).tolist() == [[1, 4, 0]]


def test_overlap_detection_is_fast_for_a_uci_har_sized_set():
    """~10k windows x 9 channels x 128 samples (UCI HAR's size), 50 % overlap, recordings of 6-48 windows.
    A pairwise comparison would take minutes; hashing takes well under a second (bound: generous, for a
    loaded CI machine)."""
    rng = np.random.default_rng(1)
    parts, rec, r = [], [], 0
    while sum(len(p) for p in parts) < 10_000:
        n = int(rng.integers(6, 48))
        parts.append(stream_windows(n, 128, 64, C=9, seed=r))
        rec += [r] * n
        r += 1
    X, rec = np.concatenate(parts), np.array(rec)
    start = time.perf_counter()
    groups, source, _ = recording_groups(X, None)
    elapsed = time.perf_counter() - start
    assert source == "detected overlap" and len(set(zip(groups.tolist(), rec.tolist()))) == r == groups.max() + 1
    assert elapsed < 30, f"{elapsed:.1f} s"


def test_given_groups_are_merged_where_windows_overlap():
    X = stream_windows(6, 32, 16)
    groups, source, note = recording_groups(X, np.array([7, 7, 7, 9, 9, 9]))  # one stream given as two recordings
    assert source == "given + detected overlap" and groups.tolist() == [0] * 6 and "1 merged" in note
    groups, source, _ = recording_groups(np.random.default_rng(0).normal(size=(4, 2, 32)).astype(np.float32),
                                         np.array([5, 2, 5, 2]))
    assert source == "given" and groups.tolist() == [0, 1, 0, 1]


# ---------------------------------------------------------------------------------------------- no recording in two parts


SHAPES = {
    # name: (overlap, give group ids, recordings, classes, domains, windows per recording)
    "50%-detected": (0.5, False, 36, 3, 4, (2, 7)),
    "25%-detected": (0.25, False, 30, 3, 3, (2, 6)),
    "no-overlap-given": (0.0, True, 36, 3, 4, (2, 7)),
    "50%-given": (0.5, True, 24, 2, 4, (3, 9)),
}
PROTOCOLS = {
    "domains": dict(source_domains=[0], target_domains=[1, 2], target_shots=2, val_shots=1),
    "domains-domain_class": dict(source_domains=[0], target_domains=[1, 2], target_shots=1,
                                 target_shots_per="domain_class", val_shots=1),
    "domains-val_domains": dict(source_domains=[0], target_domains=[1, 2], val_domains=[3], target_shots=3),
    "one-file": dict(test_fraction=0.3, target_shots=2, val_shots=2),
    "all-labelled": dict(test_fraction=0.4),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_no_recording_is_in_two_parts(shape, protocol, seed):
    overlap, give, n_rec, classes, domains, windows = SHAPES[shape]
    split, rec = recordings(seed, n_rec, classes=classes, domains=domains, overlap=overlap, windows=windows)
    if give:
        split = replace(split, group=rec * 3 + 100)  # any integers name recordings
    raw = RawDataset(split, None, [f"c{i}" for i in range(classes)])
    fields = PROTOCOLS[protocol]
    if "val_domains" in fields and domains < 4:
        pytest.skip("this shape has no fourth domain")
    bundle = build_protocol(raw, cfg(**fields), seed)
    assert bundle.group_source == ("given" if give else "detected overlap")
    assert_parts_share_no_recording(bundle, split.X, rec, source_may_share_labelled="source_domains" not in fields)
    if fields.get("target_shots_per") == "domain_class":
        pairs = np.stack([bundle.target_train.domain, bundle.target_train.y], axis=1)
        _, counts = np.unique(pairs, axis=0, return_counts=True)
        assert len(counts) == 2 * classes and (counts == 1).all()
    if "val_domains" in fields:
        assert set(bundle.target_val.domain.tolist()) == {3} and len(bundle.target_val) == int((split.domain == 3).sum())


def test_separate_test_file_that_shares_recordings_with_training_windows():
    split, rec = recordings(0, 20, overlap=0.5, windows=(4, 5))
    in_test = np.isin(rec, [0, 1, 2, 3, 4, 5])
    cut = np.flatnonzero(in_test)[::2]  # half of the windows of six recordings went to the "test file"
    keep = np.setdiff1d(np.arange(len(rec)), cut)
    raw = RawDataset(split.take(keep), split.take(cut), ["a", "b", "c"])
    bundle = build_protocol(raw, cfg(target_shots=2), 0)
    assert len(bundle.target_test) == len(cut)  # the test file is kept whole
    dropped = int(np.isin(rec[keep], rec[cut]).sum())  # training windows of a recording the test file has
    assert dropped > 0
    assert len(bundle.source_train) == len(keep) - dropped
    assert any(f"dropped {dropped} training window(s)" in n for n in bundle.notes)
    pool = np.concatenate([raw.train.X, raw.test.X])
    assert_parts_share_no_recording(bundle, pool, np.concatenate([rec[keep], rec[cut]]), source_may_share_labelled=True)


def test_a_class_in_one_recording_cannot_be_both_labelled_and_tested():
    split, rec = recordings(0, 7, classes=3, overlap=0.5, windows=(4, 6))  # class 0 has recordings 0, 3, 6
    only = split.take(np.flatnonzero((split.y != 2) | (rec == 2)))  # class 2: one recording
    with pytest.raises(EdgetoolError, match="class 'c' has no windows: all of its target windows are in one recording"):
        build_protocol(RawDataset(only, None, ["a", "b", "c"]), cfg(test_fraction=0.5), 0)


# ---------------------------------------------------------------------------------------------- shots and validation


def test_domain_class_gives_every_target_domain_class_pair_its_shots():
    split, _ = recordings(5, 48, classes=4, domains=4, overlap=0.0, windows=(3, 5))
    raw = RawDataset(split, None, ["a", "b", "c", "d"])
    fields = dict(source_domains=[0], target_domains=[1, 2, 3], target_shots=2, val_shots=0)
    per_pair = build_protocol(raw, cfg(**fields, target_shots_per="domain_class"), 0)
    counts = np.zeros((4, 4), dtype=int)
    np.add.at(counts, (per_pair.target_train.domain, per_pair.target_train.y), 1)
    assert (counts[1:] == 2).all() and (counts[0] == 0).all()
    pooled = build_protocol(raw, cfg(**fields), 0)  # per class: 2 per class over all target domains
    assert np.bincount(pooled.target_train.y).tolist() == [2, 2, 2, 2]


def test_domain_class_needs_domains():
    with pytest.raises(EdgetoolError, match="domain_class needs domain ids"):
        load_data(DataConfig(target_shots=2, target_shots_per="domain_class"))


def test_shots_come_from_as_few_recordings_as_possible():
    split, rec = recordings(1, 12, classes=2, overlap=0.5, windows=(6, 8))
    bundle = build_protocol(RawDataset(replace(split, group=rec), None, ["a", "b"]),
                            cfg(test_fraction=0.3, target_shots=3, val_shots=2), 0)
    # 3 shots fit in one recording of >= 6 windows: one recording per class, leaving the others for validation.
    assert len(np.unique(bundle.target_train.group)) == 2
    assert np.bincount(bundle.target_val.y).tolist() == [2, 2]


def test_reduced_shots_and_missing_validation_are_noted():
    bundle = load_data(DataConfig(target_shots=12), 0)  # BasicMotions: 10 training windows per class
    assert len(bundle.target_train) == 40
    assert bundle.notes[0] == ("data.target_shots 12: only class 'Standing' 10, class 'Running' 10, class 'Walking' 10, "
                               "class 'Badminton' 10 labelled target window(s); using what there is")
    assert len(bundle.target_val) == 0
    assert bundle.notes[1].startswith("data.val_shots 2: only class 'Standing' 0")
    assert load_data(DataConfig(target_shots=10), 0).notes[0].startswith("data.val_shots 2: only class 'Standing' 0")
    assert load_data(DataConfig(target_shots=8), 0).notes == []
    assert "target_shots is unset" in load_data(DataConfig(), 0).notes[0]
    assert load_data(DataConfig(val_shots=0), 0).notes == []


def test_validation_domains_and_their_recipe_errors(tmp_path):
    split, rec = recordings(2, 24, classes=2, domains=4, overlap=0.5)
    bundle = build_protocol(RawDataset(split, None, ["a", "b"]),
                            cfg(source_domains=[0, 1], target_domains=[2], val_domains=[3], target_shots=2), 0)
    assert set(bundle.target_val.domain.tolist()) == {3} and set(bundle.source_train.domain.tolist()) == {0, 1}
    with pytest.raises(EdgetoolError, match=r"data\.val_domains: domain id\(s\) \[7\] not in the data"):
        build_protocol(RawDataset(split, None, ["a", "b"]), cfg(source_domains=[0], target_domains=[2], val_domains=[7]), 0)

    def recipe(**data):
        return recipe_from_dict({"name": "t", "data": {"format": "npz", "train_path": "d.npz", **data},
                                 "model": {"checkpoint": "b.pt"}}, tmp_path)

    for data, message in [
        (dict(val_domains=[3]), "val_domains needs data.source_domains"),
        (dict(source_domains=[0], target_domains=[1], val_domains=[1]), r"val_domains \[1\] are also source or target"),
        (dict(source_domains=[0], target_domains=[1], val_domains=[2], val_shots=3), "val_domains or data.val_shots, not both"),
        (dict(target_shots_per="subject"), "target_shots_per"),
        (dict(val_shots=-1), "val_shots"),
    ]:
        with pytest.raises(EdgetoolError, match=message):
            recipe(**data)
    assert recipe(source_domains=[0], target_domains=[1], val_domains=[2], val_shots=0).data.val_domains == [2]


# ---------------------------------------------------------------------------------------------- loaders fill groups


def test_uci_har_recordings_are_runs_of_one_subject_and_activity(tmp_path):
    """The real layout: each subject's rows are contiguous, activities in the order performed (each twice),
    consecutive windows of a run overlap by 50 %. A run of rows with one subject and activity is a recording."""
    ds = tmp_path / "UCI HAR Dataset"
    ds.mkdir()
    (ds / "activity_labels.txt").write_text("1 WALKING\n2 SITTING\n3 LAYING\n")
    rng = np.random.default_rng(0)
    runs = {"train": [(1, a) for a in (2, 1, 3, 2, 3, 1)] + [(3, a) for a in (1, 2, 3, 1, 2, 3)],
            "test": [(2, a) for a in (3, 1, 2, 3, 1, 2)]}
    truth = {}
    for split, seq in runs.items():
        (ds / split / "Inertial Signals").mkdir(parents=True)
        windows, subjects, labels = [], [], []
        for subject, activity in seq:
            n = int(rng.integers(3, 6))
            windows.append(stream_windows(n, 128, 64, C=9, seed=int(rng.integers(1 << 30))))
            subjects += [subject] * n
            labels += [activity] * n
        X = np.concatenate(windows)
        for c, sig in enumerate(["body_acc_x", "body_acc_y", "body_acc_z", "body_gyro_x", "body_gyro_y", "body_gyro_z",
                                 "total_acc_x", "total_acc_y", "total_acc_z"]):
            np.savetxt(ds / split / "Inertial Signals" / f"{sig}_{split}.txt", X[:, c], fmt="%.9e")
        (ds / split / f"y_{split}.txt").write_text("".join(f"{v}\n" for v in labels))
        (ds / split / f"subject_{split}.txt").write_text("".join(f"{v}\n" for v in subjects))
        truth[split] = np.repeat(np.arange(len(seq)), [len(w) for w in windows])
    raw = load_uci_har(ds)
    np.testing.assert_array_equal(raw.train.group, truth["train"])
    np.testing.assert_array_equal(raw.test.group, truth["test"] + 12)  # unique across the two files
    data = DataConfig(format="uci_har", train_path=ds, source_domains=[1, 3], target_domains=[2], target_shots=2)
    bundle = load_data(data, 0)
    assert bundle.group_source == "given"  # the overlaps found agree with the runs
    pool = np.concatenate([raw.train.X, raw.test.X])
    assert_parts_share_no_recording(bundle, pool, np.concatenate([truth["train"], truth["test"] + 12]), False)
    # Subject 2 did each activity twice: one recording tests, the other gives the shots, none is left to validate.
    assert len(bundle.target_val) == 0 and "data.val_domains can name a validation domain" in bundle.notes[-1]


def test_npz_group_array(tmp_path):
    split, rec = recordings(0, 12, overlap=0.0, windows=(3, 5))
    np.savez(tmp_path / "d.npz", X=split.X, y=split.y, group=rec)
    bundle = load_data(DataConfig(format="npz", train_path=tmp_path / "d.npz", target_shots=1), 0)
    assert bundle.group_source == "given"
    assert_parts_share_no_recording(bundle, split.X, rec, source_may_share_labelled=True)
    np.savez(tmp_path / "bad.npz", X=split.X, y=split.y, group=rec[:-1])
    with pytest.raises(EdgetoolError, match=r"group must be integers shaped like y"):
        load_data(DataConfig(format="npz", train_path=tmp_path / "bad.npz"))
    np.savez(tmp_path / "test.npz", X=split.X[:6], y=split.y[:6])
    with pytest.raises(EdgetoolError, match=r"d\.npz has a 'group' array but .*test\.npz has none"):
        load_data(DataConfig(format="npz", train_path=tmp_path / "d.npz", test_path=tmp_path / "test.npz"))
