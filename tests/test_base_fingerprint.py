"""The "pretrained under other settings" note compares what pretraining depended on: the source windows and
labels (as data), the source classes, the model and the pretrain settings; never target-side settings."""

from __future__ import annotations

import numpy as np
import pytest

from toolchain.models.assembly import base_fingerprint, load_base_model
from toolchain.data.protocol import load_data
from toolchain.recipe import load_recipe
from toolchain.stages.adapt import pretrain

from conftest import write_recipe


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """An npz data set with three domains and a base pretrained on domain 0 (recipe 'a')."""
    d = tmp_path_factory.mktemp("fp")
    rng = np.random.default_rng(0)
    y = np.tile(np.repeat(np.arange(4), 6), 3)
    domain = np.repeat([0, 1, 2], 24)
    X = (rng.standard_normal((len(y), 6, 32)) + y[:, None, None]).astype(np.float32)
    np.savez(d / "data.npz", X=X, y=y, domain=domain)

    def recipe(name, data=None, **top):
        raw = {"name": name, "seed": 0,
               "data": {"format": "npz", "train_path": "data.npz", "source_domains": [0], "target_domains": [1],
                        "target_shots": 2, **(data or {})},
               "model": {"arch": "resnet1d", "width": 8, "checkpoint": "base.pt"},
               "pretrain": {"steps": 5, "lr": 0.01, "batch_size": 8}, **top}
        return load_recipe(write_recipe(d / f"{name}.yaml", raw))

    pretrain(recipe("a"), progress=False, echo=None)
    return recipe


def _notes(recipe) -> list[str]:
    notes = []
    load_base_model(recipe, load_data(recipe.data, recipe.seed), echo=notes.append)
    return [n for n in notes if "pretrained on other source data" in n]


@pytest.mark.parametrize("data", [
    {},
    {"target_domains": [2]},
    {"target_shots": 1, "val_shots": 1},
    {"target_shots_per": "domain_class", "target_domains": [1, 2]},
    {"shift": {"rotation_deg": 90, "noise": 0.2, "seed": 3}},
    {"test_fraction": 0.3},
])
def test_target_side_settings_do_not_trigger_the_note(shared, data):
    assert _notes(shared("b", data)) == []


@pytest.mark.parametrize("data, top", [
    ({"source_domains": [2], "target_domains": [1]}, {}),             # other source windows
    ({"source_domains": [0, 2], "target_domains": [1]}, {}),          # more source windows
    ({}, {"pretrain": {"steps": 6, "lr": 0.01, "batch_size": 8}}),   # other pretraining
    ({}, {"seed": 1}),                                                # other initialisation and batch order
])
def test_other_source_data_or_pretraining_triggers_the_note(shared, data, top):
    notes = _notes(shared("c", data, **top))
    assert len(notes) == 1 and "base.pt" in notes[0]


def test_the_fingerprint_hashes_the_source_windows_as_data(shared):
    recipe = shared("d")
    data = load_data(recipe.data, recipe.seed)
    X = data.source_train.X.copy()
    X[0, 0, 0] += 1.0
    changed = type(data)(**{**data.__dict__, "source_train": type(data.source_train)(X, data.source_train.y)})
    assert base_fingerprint(recipe, data) != base_fingerprint(recipe, changed)
    assert base_fingerprint(recipe, data) == base_fingerprint(recipe, load_data(recipe.data, recipe.seed))
