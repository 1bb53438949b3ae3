"""Recipe schema: one-line errors naming the field, path resolution, the resolved form a run records,
and the embedded default recipe (recipes/basicmotions-ttlora.yaml)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from toolchain.errors import EdgetoolError
from toolchain.recipe import check_inputs_exist, load_recipe

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "recipes" / "basicmotions-ttlora.yaml"

MINIMAL = {"name": "r", "model": {"checkpoint": "base.pt"}}


def write(tmp_path: Path, raw, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def with_(**sections) -> dict:
    raw = copy.deepcopy(MINIMAL)
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


@pytest.mark.parametrize(
    "raw, message",
    [
        (with_(modle={"width": 4}), r"field 'modle': unknown key"),
        (with_(data={"formt": "ts"}), r"field 'data.formt': unknown key"),
        (with_(method={"name": "lorax"}), r"field 'method.name': unknown method 'lorax'"),
        (with_(method={"rank": 0}), r"field 'method.rank': .*greater than 0"),
        (with_(method={"rank": -3}), r"field 'method.rank'"),
        (with_(method={"layers": []}), r"field 'method.layers'"),
        (with_(train={"lr": 0}), r"field 'train.lr'"),
        (with_(train={"steps": "many"}), r"field 'train.steps'"),
        (with_(data={"format": "npz"}), r"data.train_path is required for format 'npz'"),
        (with_(data={"format": "ts", "train_path": "a.ts"}), r"data.test_path is required"),
        (with_(data={"source_domains": [1]}), r"set both data.source_domains and data.target_domains"),
        (with_(data={"shift": {"rotation_deg": 270}}), r"field 'data.shift.rotation_deg'"),
        (with_(data={"shift": {"axis_groups": [[0, 1]]}}), r"every axis group must list exactly 3 channels"),
        (with_(model={"arch": "factory"}), r"model.factory .* is required"),
        (with_(model={"arch": "factory", "factory": "no_colon"}), r"must look like 'package.module:function'"),
        ({"name": "r"}, r"field 'model': Field required"),
        ("- just\n- a list\n", r"expected a mapping at the top level, got list"),
        ("", r"the file is empty"),
        ("name: [unclosed\n", r"malformed YAML at line 2"),
        ("name: r\nmodel:\n  checkpoint: a.pt\n\twidth: 3\n", r"malformed YAML at line 4"),
        # numpy's seeded generators refuse negative seeds: a recipe error, not an internal one at run time
        (with_(seed=-1), r"field 'seed': .*greater than or equal to 0"),
        (with_(data={"shift": {"seed": -5}}), r"field 'data.shift.seed': .*greater than or equal to 0"),
        # an empty domain list used to crash the protocol with numpy's "need at least one array"
        (with_(data={"source_domains": [1], "target_domains": []}), r"field 'data.target_domains': .*at least 1 item"),
        (with_(data={"classes": ["sit", "walk", "sit"]}), r"field 'data.classes': lists \['sit'\] more than once"),
        (with_(data={"source_domains": [1, 1], "target_domains": [2]}), r"field 'data.source_domains': lists \[1\]"),
        # a single pattern given as a string: name the field and the fix, not pydantic's union branch
        (with_(method={"layers": "features.*"}), r"field 'method.layers': expected 'all', 'pointwise' or a list "
                                                 r"of name patterns such as \['features.\*'\]"),
        (with_(method={"layers": [3]}), r"field 'method.layers': layer name patterns must be strings"),
    ],
    ids=["unknown-top-key", "unknown-nested-key", "unknown-method", "rank-0", "rank-negative", "no-layers",
         "lr-0", "steps-type", "npz-no-path", "ts-no-test", "half-domains", "rotation-range", "axis-group",
         "factory-missing", "factory-format", "no-model", "list", "empty", "yaml-unclosed", "yaml-tab",
         "negative-seed", "negative-shift-seed", "empty-domains", "duplicate-classes", "duplicate-domains",
         "layers-string", "layers-not-strings"],
)
def test_recipe_errors_are_one_line_naming_the_problem(tmp_path, raw, message):
    path = write(tmp_path, raw)
    with pytest.raises(EdgetoolError, match=message) as info:
        load_recipe(path)
    text = str(info.value)
    assert "\n" not in text and str(path) in text


def test_non_text_and_missing_recipes(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"name: \xff\xfe\x00\n")
    with pytest.raises(EdgetoolError, match="not UTF-8 text"):
        load_recipe(tmp_path / "bin.yaml")
    with pytest.raises(EdgetoolError, match="recipe not found"):
        load_recipe(tmp_path / "absent.yaml")
    with pytest.raises(EdgetoolError, match="is a directory: name the recipe's YAML file"):
        load_recipe(tmp_path)  # a directory is not a recipe


def test_relative_paths_resolve_against_the_recipe_file(tmp_path, monkeypatch):
    sub = tmp_path / "recipes"
    sub.mkdir()
    raw = with_(data={"format": "npz", "train_path": "../data/d.npz"}, model={"checkpoint": "ckpt/base.pt"})
    path = write(sub, raw)
    monkeypatch.chdir(tmp_path / "..")  # the working directory must not matter
    recipe = load_recipe(path)
    assert recipe.data.train_path == tmp_path / "data" / "d.npz"
    assert recipe.model.checkpoint == sub / "ckpt" / "base.pt"
    assert recipe.source == path
    with pytest.raises(EdgetoolError, match=r"field 'data.train_path': path does not exist: .*d\.npz"):
        check_inputs_exist(recipe)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d.npz").write_bytes(b"")
    check_inputs_exist(recipe)


def test_name_defaults_to_the_file_stem_and_absolute_paths_stay(tmp_path):
    raw = {"model": {"checkpoint": str(tmp_path / "abs.pt")}}
    recipe = load_recipe(write(tmp_path, raw, "my-recipe.yaml"))
    assert recipe.name == "my-recipe" and recipe.model.checkpoint == tmp_path / "abs.pt"


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, with_(method={"rank": 3, "layers": ["features.*"]})))
    resolved = recipe.resolved_dict()
    assert "source" not in resolved
    assert resolved["model"]["checkpoint"] == str(tmp_path / "base.pt")  # absolute
    # Every default is spelled out, so a run's recipe.yaml does not depend on future defaults.
    assert resolved["train"]["steps"] == recipe.train.steps and resolved["method"]["bn"] == "frozen"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = load_recipe(write(elsewhere, resolved, "recipe.yaml"))
    assert again.resolved_dict() == resolved


# ---------------------------------------------------------------------------------------------- embedded default


def default_recipe(tmp_path: Path):
    """The embedded default, with its base checkpoint redirected into tmp_path (never the repo's)."""
    recipe = load_recipe(DEFAULT_RECIPE)
    recipe.model.checkpoint = tmp_path / "base.pt"
    return recipe


def test_default_recipe_trains_at_most_1_5_percent_with_ttlora(tmp_path):
    from toolchain.models.assembly import build_adapted
    from toolchain.data.protocol import load_data
    from toolchain.models.backbones import CONV_TYPES, build_model, count_params, find_head

    recipe = default_recipe(tmp_path)
    assert recipe.method.name == "ttlora" and recipe.data.format == "basicmotions"
    data = load_data(recipe.data, recipe.seed)
    base = build_model(recipe.model, data.input_shape[0], data.num_source_classes)
    head_name, _ = find_head(base)
    model, method = build_adapted(recipe.method, base, head_name, data)
    trainable = sum(p.numel() for _, p in method.trainable_parameters(model))
    convs = [m for m in base.modules() if isinstance(m, CONV_TYPES)]
    rank = recipe.method.rank
    assert trainable == sum(m.out_channels * min(rank, m.out_channels, m.weight[0].numel()) for m in convs)
    pct = 100 * trainable / count_params(base)
    assert pct <= 1.5, f"TT-LoRA trains {pct:.2f} % of the default model"


@pytest.mark.slow
def test_default_recipe_shift_clearly_drops_zero_shot_f1(tmp_path):
    """Pretrain the default base exactly as the recipe says, then score it on the target test windows
    without and with the recipe's physical shift: the shift must cost a clear share of macro-F1."""
    from toolchain.models.assembly import load_base_model
    from toolchain.stages.adapt import pretrain
    from toolchain.data.protocol import load_data
    from toolchain.metrics import evaluate

    recipe = default_recipe(tmp_path)
    data = load_data(recipe.data, recipe.seed)
    pretrain(recipe, data, progress=False, echo=None)
    base, _, _ = load_base_model(recipe, data, echo=None)
    clean = load_data(recipe.data.model_copy(update={"shift": None}), recipe.seed)
    f1_clean, _ = evaluate(base, clean.target_test)
    f1_shifted, _ = evaluate(base, data.target_test)
    assert f1_clean >= 0.85, f"the base should solve the unshifted task (F1 {f1_clean:.3f})"
    assert f1_clean - f1_shifted >= 0.2, f"zero-shot F1 {f1_clean:.3f} -> {f1_shifted:.3f} under the shift"
