"""Data stage: the `.ts`, UCI HAR and `.npz` loaders, validation errors, the source -> target protocol
(domains, physical shift, new classes) and source-only normalisation."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from toolchain.data.protocol import build_protocol, load_data, make_shift, rotation_matrix
from toolchain.data.formats import UCI_HAR_SIGNALS, load_basicmotions, load_ts_pair, load_uci_har, parse_ts
from toolchain.errors import EdgetoolError
from toolchain.recipe import DataConfig, ShiftConfig, recipe_from_dict

# ---------------------------------------------------------------------------------------------- helpers


def data_cfg(base_dir: Path, **fields) -> DataConfig:
    """A DataConfig resolved exactly as a recipe file in `base_dir` would be (relative paths included)."""
    raw = {"name": "t", "data": fields, "model": {"checkpoint": "base.pt"}}
    return recipe_from_dict(raw, base_dir).data


def write_ts(path: Path, rows: list[str], header: str | None = None) -> Path:
    header = header if header is not None else (
        "# a hand-written UEA file\n@problemName Toy\n@timeStamps false\n@missing true\n@univariate false\n"
        "@dimensions 2\n@equalLength true\n@seriesLength 3\n@classLabel true up down\n@data\n"
    )
    path.write_text(header + "\n".join(rows) + "\n")
    return path


# Realistic UCI HAR activity list (ids are 1-based in the files).
UCI_ACTIVITIES = ["WALKING", "WALKING_UPSTAIRS", "WALKING_DOWNSTAIRS", "SITTING", "STANDING", "LAYING"]


def signal_value(signal: int, window: int, t: np.ndarray) -> np.ndarray:
    """A value that encodes (signal, window, time), so channel order and row order can be checked. The time
    term stays below the window step, so no two windows share a sample (they would be one recording)."""
    return signal + 0.01 * window + 1e-5 * t


def make_uci_har(root: Path, subjects: dict[str, list[int]], windows_per_subject: int = 6, T: int = 128) -> Path:
    """Write a small data set in the exact UCI HAR layout under root/'UCI HAR Dataset'. Every subject
    performs every activity (cycled); returns the dataset directory."""
    ds = root / "UCI HAR Dataset"
    ds.mkdir(parents=True)
    (ds / "activity_labels.txt").write_text("".join(f"{i} {name}\n" for i, name in enumerate(UCI_ACTIVITIES, 1)))
    t = np.arange(T)
    for split, subs in subjects.items():
        inertial = ds / split / "Inertial Signals"
        inertial.mkdir(parents=True)
        n = windows_per_subject * len(subs)
        first = 0 if split == "train" else 500  # test windows are other recordings, not copies of train windows
        for s, sig in enumerate(UCI_HAR_SIGNALS):
            mat = np.stack([signal_value(s, first + w, t) for w in range(n)])
            # UCI HAR's own format: space-padded scientific notation, one window per line.
            np.savetxt(inertial / f"{sig}_{split}.txt", mat, fmt="%15.7e")
        y = [(w % len(UCI_ACTIVITIES)) + 1 for w in range(n)]
        subject = [sub for sub in subs for _ in range(windows_per_subject)]
        (ds / split / f"y_{split}.txt").write_text("".join(f"{v}\n" for v in y))
        (ds / split / f"subject_{split}.txt").write_text("".join(f"{v}\n" for v in subject))
    return ds


# ---------------------------------------------------------------------------------------------- .ts


def test_embedded_basicmotions_has_the_published_shape():
    raw = load_basicmotions()
    assert raw.class_names == ["Standing", "Running", "Walking", "Badminton"]  # order of @classLabel
    assert raw.train.X.shape == (40, 6, 100) and raw.test.X.shape == (40, 6, 100)
    assert raw.train.X.dtype == np.float32 and raw.train.y.dtype == np.int64
    assert np.bincount(raw.train.y).tolist() == [10, 10, 10, 10]
    assert np.bincount(raw.test.y).tolist() == [10, 10, 10, 10]
    assert np.isfinite(raw.train.X).all() and np.isfinite(raw.test.X).all()
    # First numbers of the shipped TRAIN file: series 0, dimension 0, t = 0..2.
    np.testing.assert_allclose(raw.train.X[0, 0, :3], [0.079106, 0.079106, -0.903497], rtol=1e-6)
    # The train and test files are different recordings.
    assert not np.array_equal(raw.train.X, raw.test.X)


def test_ts_dimensions_become_channels_and_missing_values_become_nan(tmp_path):
    path = write_ts(tmp_path / "toy.ts", ["1,2,3:4,5,6:up", "7,?,9:10,11,12:down"])
    X, labels, declared = parse_ts(path)
    assert X.shape == (2, 2, 3)
    np.testing.assert_array_equal(X[0], [[1, 2, 3], [4, 5, 6]])
    assert np.isnan(X[1, 0, 1]) and np.isfinite(np.delete(X.ravel(), 7)).all()
    assert labels.tolist() == ["up", "down"] and declared == ["up", "down"]


def test_ts_missing_values_are_rejected_at_validation(tmp_path):
    train = write_ts(tmp_path / "toy_TRAIN.ts", ["1,2,3:4,5,6:up", "7,?,9:10,11,12:down", "1,1,1:2,2,2:down"])
    test = write_ts(tmp_path / "toy_TEST.ts", ["1,2,3:4,5,6:up", "7,8,9:10,11,12:down"])
    cfg = data_cfg(tmp_path, format="ts", train_path="toy_TRAIN.ts", test_path="toy_TEST.ts")
    assert cfg.train_path == train and cfg.test_path == test  # relative to the recipe's directory
    with pytest.raises(EdgetoolError, match=r"training data: 1 window\(s\) contain NaN or inf"):
        load_data(cfg)


def test_ts_pair_loads_through_the_protocol(tmp_path):
    rows = ["1,2,3:4,5,6:up", "3,2,1:6,5,4:down", "1,2,4:4,5,7:up", "3,2,0:6,5,3:down"]
    write_ts(tmp_path / "a_TRAIN.ts", rows)
    write_ts(tmp_path / "a_TEST.ts", rows[::-1])
    bundle = load_data(data_cfg(tmp_path, format="ts", train_path="a_TRAIN.ts", test_path="a_TEST.ts"))
    assert bundle.class_names == ["up", "down"] and bundle.input_shape == (2, 3)
    assert bundle.target_test.y.tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize(
    "rows, header, message",
    [
        (["1,2,x:4,5,6:up"], None, r"toy\.ts:11: not a number"),
        (["1,2,3:4,5:up"], None, "unequal-length dimensions"),
        (["1,2,3:4,5,6:up", "1,2:4,5:down"], None, r"toy\.ts:12: series of length 2, @seriesLength is 3 \(malformed line\)"),
        (["1,2,3:4,5,6:sideways"], None, r"label\(s\) \['sideways'\] not among"),
        ([], None, "no @data section"),
        (["1,2,3:4,5,6"], "@classLabel false\n@data\n", "no class labels"),
        (["(0,1),(1,2):up"], "@timeStamps true\n@classLabel true up\n@data\n", "timestamps are not supported"),
        (["a plain csv line"], "x,y,z\n", "no @data section"),
    ],
    ids=["not-a-number", "unequal-dims", "unequal-series", "undeclared-label", "no-data", "no-labels",
         "timestamps", "not-ts"],
)
def test_malformed_ts_is_one_clear_error(tmp_path, rows, header, message):
    path = write_ts(tmp_path / "toy.ts", rows, header)
    with pytest.raises(EdgetoolError, match=message):

        load_ts_pair(path, path, None)


def test_missing_ts_file_is_an_error(tmp_path):
    with pytest.raises(EdgetoolError, match="not found"):
        parse_ts(tmp_path / "absent.ts")


# ---------------------------------------------------------------------------------------------- UCI HAR


def test_uci_har_layout_loads_channels_labels_and_subjects(tmp_path):
    make_uci_har(tmp_path, {"train": [1, 3, 5], "test": [2, 4]})
    raw = load_uci_har(tmp_path)  # the parent of "UCI HAR Dataset" is accepted too
    assert raw.class_names == UCI_ACTIVITIES
    assert raw.train.X.shape == (18, 9, 128) and raw.test.X.shape == (12, 9, 128)
    assert raw.train.X.dtype == np.float32
    t = np.arange(128)
    for s in range(len(UCI_HAR_SIGNALS)):  # channel s is file UCI_HAR_SIGNALS[s], row w is window w
        for w in (0, 7, 17):
            np.testing.assert_allclose(raw.train.X[w, s], signal_value(s, w, t), rtol=1e-6)
    assert UCI_HAR_SIGNALS[:3] == ["body_acc_x", "body_acc_y", "body_acc_z"]
    assert UCI_HAR_SIGNALS[3:6] == ["body_gyro_x", "body_gyro_y", "body_gyro_z"]
    # y files are 1-based activity ids; the loader indexes activity_labels.txt's order.
    assert raw.train.y.tolist() == [w % 6 for w in range(18)]
    assert raw.train.domain.tolist() == [1] * 6 + [3] * 6 + [5] * 6
    assert raw.test.domain.tolist() == [2] * 6 + [4] * 6
    same = load_uci_har(tmp_path / "UCI HAR Dataset")
    np.testing.assert_array_equal(same.test.X, raw.test.X)


def test_uci_har_cross_subject_protocol_end_to_end(tmp_path):
    make_uci_har(tmp_path / "har", {"train": [1, 3, 5], "test": [2, 4]}, windows_per_subject=12)
    cfg = data_cfg(tmp_path, format="uci_har", train_path="har", source_domains=[1, 2, 3], target_domains=[4],
                   test_fraction=0.5)
    bundle = load_data(cfg, seed=0)
    assert bundle.input_shape == (9, 128) and bundle.class_names == UCI_ACTIVITIES
    # Subjects 1 and 3 come from the train files, subject 2 from the test files: domains pool both.
    assert sorted(set(bundle.source_train.domain.tolist())) == [1, 2, 3]
    assert len(bundle.source_train) == 36
    assert set(bundle.target_train.domain.tolist()) == {4} == set(bundle.target_test.domain.tolist())
    assert len(bundle.target_train) + len(bundle.target_test) == 12
    # Every class is represented in both target splits (stratified), and they do not overlap.
    assert set(bundle.target_test.y.tolist()) == set(range(6)) == set(bundle.target_train.y.tolist())
    raw_t = bundle.target_train.X * bundle.std[None, :, None] + bundle.mean[None, :, None]
    raw_e = bundle.target_test.X * bundle.std[None, :, None] + bundle.mean[None, :, None]
    assert not np.isclose(raw_t[:, None, 0, 0], raw_e[None, :, 0, 0], atol=1e-4).any()
    # Normalised with the source's statistics: the source is standardised per channel.
    np.testing.assert_allclose(bundle.source_train.X.mean(axis=(0, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(bundle.source_train.X.std(axis=(0, 2)), 1, atol=1e-3)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"source_domains": [1], "target_domains": [9]}, r"data\.target_domains: domain id\(s\) \[9\] not in the data"),
        ({"source_domains": [1, 2], "target_domains": [2]}, "overlap"),
    ],
)
def test_uci_har_domain_errors(tmp_path, fields, message):
    make_uci_har(tmp_path / "har", {"train": [1, 3], "test": [2]})
    with pytest.raises(EdgetoolError, match=message):
        load_data(data_cfg(tmp_path, format="uci_har", train_path="har", **fields))


def test_uci_har_bad_layouts(tmp_path):
    with pytest.raises(EdgetoolError, match="not a UCI HAR Dataset directory"):
        load_uci_har(tmp_path)
    ds = make_uci_har(tmp_path, {"train": [1], "test": [2]})
    (ds / "test" / "Inertial Signals" / "body_gyro_y_test.txt").unlink()
    with pytest.raises(EdgetoolError, match="UCI HAR file missing: .*body_gyro_y_test.txt"):
        load_uci_har(tmp_path)
    ds = make_uci_har(tmp_path / "b", {"train": [1], "test": [2]})
    (ds / "train" / "y_train.txt").write_text("1\n2\n7\n1\n1\n1\n")
    with pytest.raises(EdgetoolError, match=r"activity id\(s\) \[7\] not in activity_labels.txt"):
        load_uci_har(ds)
    ds = make_uci_har(tmp_path / "c", {"train": [1], "test": [2]})
    (ds / "train" / "subject_train.txt").write_text("1\n1\n")
    with pytest.raises(EdgetoolError, match="6 windows, 6 labels, 2 subject ids"):
        load_uci_har(ds)
    ds = make_uci_har(tmp_path / "d", {"train": [1], "test": [2]})
    (ds / "activity_labels.txt").write_text("WALKING\n")
    with pytest.raises(EdgetoolError, match="activity_labels.txt"):
        load_uci_har(ds)


# ---------------------------------------------------------------------------------------------- .npz


def npz_arrays(n_per_class: int = 6, classes: int = 3, C: int = 3, T: int = 16, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    X = rng.normal(size=(len(y), C, T)).astype(np.float32) + y[:, None, None]
    domain = np.tile([0, 1], len(y) // 2)
    return {"X": X, "y": y, "domain": domain}


def load_npz_via_recipe(tmp_path: Path, arrays: dict, **fields):
    np.savez(tmp_path / "d.npz", **arrays)
    return load_data(data_cfg(tmp_path, format="npz", train_path="d.npz", **fields))


def test_npz_with_domains_builds_a_cross_domain_protocol(tmp_path):
    arrays = npz_arrays()
    bundle = load_npz_via_recipe(tmp_path, arrays, source_domains=[0], target_domains=[1])
    assert bundle.class_names == ["0", "1", "2"] and bundle.input_shape == (3, 16)
    assert set(bundle.source_train.domain.tolist()) == {0}
    assert set(bundle.target_test.domain.tolist()) == {1} == set(bundle.target_train.domain.tolist())
    assert len(bundle.source_train) == 9 and len(bundle.target_train) + len(bundle.target_test) == 9
    src = arrays["X"][arrays["domain"] == 0]
    np.testing.assert_allclose(bundle.mean, src.mean(axis=(0, 2)), rtol=1e-5)


def test_npz_class_names_and_separate_test_file(tmp_path):
    arrays = npz_arrays()
    keep = [0, 1, 6, 7, 12, 13]  # two windows per class
    np.savez(tmp_path / "test.npz", X=arrays["X"][keep], y=arrays["y"][keep])
    bundle = load_npz_via_recipe(tmp_path, {**arrays, "class_names": np.array(["sit", "walk", "run"])},
                                 test_path="test.npz", classes=None)
    assert bundle.class_names == ["sit", "walk", "run"]
    assert len(bundle.target_test) == 6


def _bad(arrays: dict, **changes) -> dict:
    out = dict(arrays)
    for k, v in changes.items():
        if v is None:
            out.pop(k)
        else:
            out[k] = v
    return out


@pytest.mark.parametrize(
    "change, fields, message",
    [
        (lambda a: _bad(a, X=a["X"][:, 0, :]), {}, r"rank >= 3 .* got shape \(18, 16\)"),
        (lambda a: _bad(a, X=np.where(np.arange(16) == 3, np.nan, a["X"]).astype(np.float32)), {},
         r"18 window\(s\) contain NaN or inf"),
        (lambda a: _bad(a, X=np.where(np.arange(16) == 3, np.inf, a["X"]).astype(np.float32)), {},
         "contain NaN or inf"),
        (lambda a: a, {"classes": ["a", "b"]}, r"label\(s\) \[2\] not among the recipe's 2 classes"),
        (lambda a: _bad(a, y=np.where(a["y"] == 0, -1, a["y"])), {}, r"label\(s\) \[-1\]"),
        (lambda a: _bad(a, y=np.where(a["y"] == 1, 2, a["y"])), {}, "class '1' has no samples"),
        (lambda a: a, {"classes": ["a", "b", "c", "d"]}, "class 'd' has no samples"),
        (lambda a: _bad(a, y=None), {}, "missing array 'y'"),
        (lambda a: _bad(a, X=None), {}, "missing array 'X'"),
        (lambda a: _bad(a, y=a["y"].astype(np.float32)), {}, "y must be integer class ids"),
        (lambda a: _bad(a, y=a["y"][:, None]), {}, r"y must be one-dimensional"),
        (lambda a: _bad(a, y=a["y"][:-1], domain=a["domain"][:-1]), {}, "18 inputs but 17 labels"),
        (lambda a: _bad(a, domain=a["domain"][:-1]), {}, "domain must be integers shaped like y"),
        (lambda a: _bad(a, domain=a["domain"].astype(np.float64)), {}, "domain must be integers"),
        (lambda a: _bad(a, X=a["X"].astype(str)), {}, "X must be a float array"),
    ],
    ids=["rank", "nan", "inf", "label-outside-classes", "negative-label", "empty-class", "empty-declared-class",
         "missing-y", "missing-X", "float-y", "2d-y", "length-mismatch", "domain-shape", "domain-dtype", "string-X"],
)
def test_bad_npz_is_one_clear_error(tmp_path, change, fields, message):
    with pytest.raises(EdgetoolError, match=message):
        load_npz_via_recipe(tmp_path, change(npz_arrays()), **fields)


def test_npz_bad_test_file_names_that_file(tmp_path):
    arrays = npz_arrays()
    np.savez(tmp_path / "test.npz", X=arrays["X"][:4], y=np.array([0, 1, 2, 5]))
    with pytest.raises(EdgetoolError, match=r"test\.npz: label\(s\) \[5\]"):
        load_npz_via_recipe(tmp_path, arrays, test_path="test.npz", classes=["a", "b", "c"])


def _zip_then_garbage(path: Path) -> None:
    np.savez(path, **npz_arrays())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a download cut short: zip magic, no central directory


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda p: p.write_text("hello"), r"d\.npz: not a valid \.npz \(zip\) archive \(expected X \[N, C, T\], y \[N\]"),
        (lambda p: p.write_bytes(b""), r"d\.npz: not a valid \.npz \(zip\) archive"),
        (_zip_then_garbage, r"d\.npz: not a valid \.npz \(zip\) archive \(BadZipFile"),
        (lambda p: np.save(open(p, "wb"), np.zeros((2, 3, 4))), r"d\.npz: a single \.npy array, not an \.npz archive"),
        (lambda p: np.savez(p, **npz_arrays(), class_names=np.array(["a", 1], dtype=object)),
         r"d\.npz: array 'class_names' holds Python objects"),
    ],
    ids=["text", "empty", "truncated-zip", "npy", "object-array"],
)
def test_not_an_npz_file_says_what_it_is(tmp_path, write, message):
    """np.load unpickles anything that is not a zip or .npy, and its error suggested allow_pickle (issue 11)."""
    write(tmp_path / "d.npz")
    with pytest.raises(EdgetoolError, match=message) as err:
        load_data(data_cfg(tmp_path, format="npz", train_path="d.npz"))
    assert "allow_pickle" not in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "tail, message",
    [
        ("1,2,3:4,", r"toy\.ts:13: 1 dimension\(s\), expected 2 \(the file looks truncated here\)"),
        ("1,2,3:4,5", r"toy\.ts:13: 1 dimension\(s\), expected 2 \(the file looks truncated here\)"),
        ("1,2,3:4,5,6:", r"toy\.ts:13: no class label after the last ':' \(the file looks truncated here\)"),
        ("1,2,3:4,5,6:do", r"toy\.ts:13: class label 'do' is not one of @classLabel \['up', 'down'\] \(the file looks truncated here\)"),
        ("1,2", r"toy\.ts:13: 0 dimension\(s\), expected 2 \(the file looks truncated here\)"),
        ("1,2,3:4,5,6:up\n1,2,3:4,5,6:down\n1,2,3:4,5,6:up\n1,2,3:4,5,6:down\n1,2,3:4,5,6:up\n1,2,3:4,5,6:down\n4.5e",
         r"toy\.ts:19: 0 dimension\(s\), expected 2 \(the file looks truncated here\)"),
    ],
    ids=["mid-dimension", "mid-value", "before-label", "mid-label", "first-dimension", "later-line"],
)
def test_truncated_ts_names_the_line(tmp_path, tail, message):
    """A .ts file cut off mid-write was reported as unequal-length data with no line (issue 11)."""
    path = write_ts(tmp_path / "toy.ts", [])
    path.write_text(path.read_text() + "1,2,3:4,5,6:up\n" + tail)  # no final newline: the write stopped here
    with pytest.raises(EdgetoolError, match=message):
        load_ts_pair(path, path, None)


def test_malformed_ts_line_in_the_middle_is_not_called_truncated(tmp_path):
    path = write_ts(tmp_path / "toy.ts", ["1,2,3:4,5,6:up", "1,2,3:down", "1,2,3:4,5,6:up"])
    with pytest.raises(EdgetoolError, match=r"toy\.ts:12: 1 dimension\(s\), expected 2 \(malformed line\)"):
        parse_ts(path)
    # Without @dimensions / @seriesLength the first series sets what the others must match.
    path = write_ts(tmp_path / "bare.ts", ["1,2,3:4,5,6:up", "1,2,3,4:4,5,6,7:down"], header="@classLabel true up down\n@data\n")
    with pytest.raises(EdgetoolError, match=r"bare\.ts:4: series of length 4, the first series has 3 \(malformed line\)"):
        parse_ts(path)
    path = write_ts(tmp_path / "ragged.ts", ["1,2,3:4,5,6:up", "1,2:4,5:down"],
                    header="@equalLength false\n@classLabel true up down\n@data\n")
    with pytest.raises(EdgetoolError, match=r"ragged\.ts:5: .*unequal-length data \(@equalLength false\) is not supported"):
        parse_ts(path)


def test_target_shots_above_what_is_there_is_noted():
    """target_shots larger than a class's labelled windows was reduced silently (issue 11): now a note."""
    bundle = load_data(DataConfig(target_shots=15, shift=ShiftConfig(rotation_deg=45)), seed=0)
    assert np.bincount(bundle.target_train.y).tolist() == [10, 10, 10, 10]
    assert "data.target_shots 15: only class 'Standing' 10" in bundle.notes[0]


# ---------------------------------------------------------------------------------------------- shift


@pytest.mark.parametrize("deg", [0, 30, 100, 180])
def test_rotation_matrix_is_a_proper_rotation_by_the_angle(deg):
    axis = np.array([0.3, -1.2, 0.5])
    R = rotation_matrix(axis, np.deg2rad(deg))
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(R) == pytest.approx(1.0, abs=1e-12)
    angle = np.degrees(np.arccos(np.clip((np.trace(R) - 1) / 2, -1, 1)))
    assert angle == pytest.approx(deg, abs=1e-6)
    np.testing.assert_allclose(R @ axis, axis, atol=1e-12)  # the axis is fixed


def test_make_shift_is_seeded():
    std = np.array([1.0, 2.0, 0.5, 1.0, 1.0, 3.0])
    cfg = ShiftConfig(rotation_deg=100, gain=0.2, offset=0.3, noise=0.1, seed=7)
    a, b = make_shift(cfg, std), make_shift(cfg, std)
    np.testing.assert_array_equal(a.rotation, b.rotation)
    np.testing.assert_array_equal(a.gain, b.gain)
    np.testing.assert_array_equal(a.offset, b.offset)
    X = np.random.default_rng(0).normal(size=(5, 6, 20)).astype(np.float32)
    np.testing.assert_array_equal(a.apply(X, stream=1), b.apply(X, stream=1))
    assert not np.array_equal(a.apply(X, stream=1), a.apply(X, stream=2))  # independent noise per split
    c = make_shift(cfg.model_copy(update={"seed": 8}), std)
    assert not np.allclose(a.rotation, c.rotation)
    angle = np.degrees(np.arccos((np.trace(a.rotation) - 1) / 2))
    assert angle == pytest.approx(100, abs=1e-6)
    assert a.axis_groups == [[0, 1, 2], [3, 4, 5]]
    assert ((a.gain >= 0.8) & (a.gain <= 1.2)).all()
    assert (np.abs(a.offset) <= 0.3 * std + 1e-12).all()
    np.testing.assert_allclose(a.noise_std, 0.1 * std)


def test_pure_rotation_preserves_each_groups_vector_norms():
    std = np.ones(9)
    shift = make_shift(ShiftConfig(rotation_deg=100, seed=3), std)
    X = np.random.default_rng(1).normal(size=(4, 9, 30)).astype(np.float32)
    Y = shift.apply(X)
    assert not np.allclose(X, Y, atol=1e-2)
    for g in ([0, 1, 2], [3, 4, 5], [6, 7, 8]):
        np.testing.assert_allclose(np.linalg.norm(Y[:, g], axis=1), np.linalg.norm(X[:, g], axis=1), rtol=1e-5)
        # The same rotation for every group (one re-mounted device).
        np.testing.assert_allclose(Y[:, g], np.einsum("ij,njt->nit", shift.rotation, X[:, g]), atol=1e-5)


def test_axis_groups_must_fit_the_channels():
    with pytest.raises(EdgetoolError, match="do not fit 6 channels"):
        make_shift(ShiftConfig(rotation_deg=10, axis_groups=[[4, 5, 6]]), np.ones(6))
    with pytest.raises(EdgetoolError, match="do not fit 2 channels"):
        make_shift(ShiftConfig(rotation_deg=10), np.ones(2))


def test_shift_is_applied_in_sensor_units_and_normalised_with_source_statistics():
    raw = load_basicmotions()
    clean = load_data(DataConfig(), seed=0)
    # Without a shift the target test split is the raw test split under the *source* statistics.
    np.testing.assert_allclose(clean.mean, raw.train.X.mean(axis=(0, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(clean.std, raw.train.X.std(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(clean.target_test.X, (raw.test.X - clean.mean[:, None]) / clean.std[:, None], atol=1e-5)
    np.testing.assert_allclose(clean.source_train.X.mean(axis=(0, 2)), 0, atol=1e-5)

    rotated = load_data(DataConfig(shift=ShiftConfig(rotation_deg=100, seed=7)), seed=0)
    np.testing.assert_array_equal(rotated.mean, clean.mean)  # the shift never touches the statistics
    denorm = rotated.target_test.X * rotated.std[:, None] + rotated.mean[:, None]
    for g in ([0, 1, 2], [3, 4, 5]):  # accelerometer and gyroscope rotate, vector norms stay
        np.testing.assert_allclose(np.linalg.norm(denorm[:, g], axis=1), np.linalg.norm(raw.test.X[:, g], axis=1),
                                   rtol=1e-4, atol=1e-4)
    # The shifted target is not standardised by its own statistics: its channel means move off 0.
    assert np.abs(rotated.target_test.X.mean(axis=(0, 2))).max() > 0.3
    assert np.abs(rotated.source_train.X.mean(axis=(0, 2))).max() < 1e-5


def test_target_shots_pick_that_many_per_class():
    bundle = load_data(DataConfig(target_shots=3, shift=ShiftConfig(rotation_deg=45)), seed=0)
    assert np.bincount(bundle.target_train.y).tolist() == [3, 3, 3, 3]
    again = load_data(DataConfig(target_shots=3, shift=ShiftConfig(rotation_deg=45)), seed=0)
    np.testing.assert_array_equal(bundle.target_train.X, again.target_train.X)
    other = load_data(DataConfig(target_shots=3, shift=ShiftConfig(rotation_deg=45)), seed=1)
    assert not np.array_equal(bundle.target_train.X, other.target_train.X)


def test_shift_on_images_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "img.npz", X=rng.normal(size=(8, 3, 4, 4)).astype(np.float32), y=np.tile([0, 1], 4))
    with pytest.raises(EdgetoolError, match="time series"):
        load_data(data_cfg(tmp_path, format="npz", train_path="img.npz", shift={"rotation_deg": 10}))


# ---------------------------------------------------------------------------------------------- new classes


def test_new_classes_scenario_puts_source_classes_first():
    raw = load_basicmotions()
    bundle = load_data(DataConfig(source_classes=["Walking", "Running"]), seed=0)
    assert bundle.class_names == ["Walking", "Running", "Standing", "Badminton"]
    assert bundle.num_source_classes == 2 and bundle.num_classes == 4
    assert sorted(set(bundle.source_train.y.tolist())) == [0, 1]  # the source lacks the new classes
    assert np.bincount(bundle.source_train.y).tolist() == [10, 10]
    assert sorted(set(bundle.target_test.y.tolist())) == [0, 1, 2, 3]
    assert sorted(set(bundle.target_train.y.tolist())) == [0, 1, 2, 3]
    # Labels keep their meaning through the reordering (the test split is not resampled).
    names = np.array(bundle.class_names)[bundle.target_test.y]
    assert names.tolist() == np.array(raw.class_names)[raw.test.y].tolist()
    # Statistics come from the source classes only.
    src = raw.train.X[np.isin(raw.train.y, [raw.class_names.index("Walking"), raw.class_names.index("Running")])]
    np.testing.assert_allclose(bundle.mean, src.mean(axis=(0, 2)), rtol=1e-5, atol=1e-6)


def test_new_classes_errors():
    with pytest.raises(EdgetoolError, match=r"source_classes: \['Jumping'\]"):
        load_data(DataConfig(source_classes=["Jumping"]))
    with pytest.raises(EdgetoolError, match=r"does not list class\(es\) \['Badminton'\]"):
        load_data(DataConfig(classes=["Standing", "Running", "Walking"]))


def test_classes_reorder_the_embedded_labels():
    raw = load_basicmotions()
    order = ["Badminton", "Walking", "Running", "Standing"]
    bundle = load_data(DataConfig(classes=order), seed=0)
    assert bundle.class_names == order
    assert (np.array(order)[bundle.target_test.y] == np.array(raw.class_names)[raw.test.y]).all()


def test_protocol_validates_before_any_work(tmp_path):
    raw = load_basicmotions()
    raw.train.X[3, 2, 5] = np.nan
    with pytest.raises(EdgetoolError, match=r"training data: 1 window\(s\)"):
        build_protocol(raw, DataConfig())


@pytest.mark.parametrize("test_shape", [(6, 4, 16), (6, 3, 20)], ids=["channels", "length"])
def test_npz_test_file_of_another_shape_is_refused(tmp_path, test_shape):
    """A separate test .npz must match the training inputs: other channels used to crash the
    normalisation (numpy broadcast error) and another length was accepted silently."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "test.npz", X=rng.normal(size=test_shape).astype(np.float32), y=np.repeat([0, 1, 2], 2))
    with pytest.raises(EdgetoolError, match=r"train and test inputs differ in shape: \(3, 16\) vs " + re.escape(str(test_shape[1:]))):
        load_npz_via_recipe(tmp_path, npz_arrays(), test_path="test.npz")
