"""`edgetool pretrain` / `edgetool adapt` end to end through the CLI: the run directory and its metrics,
determinism, atomic output, one-line errors, the new-classes scenario and a bring-your-own Conv2d model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import assert_one_line_error, cli, tiny_recipe_dict, write_recipe

from toolchain import __version__
from toolchain.models.assembly import build_adapted
from toolchain.rundir import ADAPTER_FORMAT, load_run
from toolchain.artifacts import sha256_file
from toolchain.cli import main
from toolchain.errors import EdgetoolError
from toolchain.data.protocol import load_data
from toolchain.methods.ttlora import TTLoRAConv
from toolchain.models.backbones import CONV_TYPES, ResNet1d, build_model, count_params
from toolchain.models.checkpoints import load_state_checked
from toolchain.methods.settings import method_settings
from toolchain.recipe import DataConfig, load_recipe
from toolchain.metrics import evaluate

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
# The console script of the environment running the tests (.venv for make test, .venv-min in the
# minimum-versions job), not always .venv's.
EDGETOOL = Path(sys.executable).parent / "edgetool"

METRIC_FIELDS = ("f1_before", "f1_after", "accuracy_before", "accuracy_after", "trainable_params", "total_params",
                 "trainable_pct", "steps_to_target", "train_seconds", "peak_memory_bytes")
TIMING_FIELDS = {"train_seconds"}


def expected_ttlora_count(model: torch.nn.Module, rank: int) -> int:
    return sum(m.out_channels * min(rank, m.out_channels, m.weight[0].numel())
               for m in model.modules() if isinstance(m, CONV_TYPES))


def leftovers(parent: Path) -> list[str]:
    """Temporary siblings an atomic write would leave if it were not atomic."""
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# ---------------------------------------------------------------------------------------------- help, version


def test_help_and_version():
    result = cli("--help")
    assert result.exit_code == 0
    assert "adapt" in result.output and "pretrain" in result.output
    result = cli("adapt", "--help")
    assert result.exit_code == 0 and "--out" in result.output and "RECIPE" in result.output
    result = cli("pretrain", "--help")
    assert result.exit_code == 0 and "model.checkpoint" in result.output
    result = cli("--version")
    assert result.exit_code == 0 and result.output.strip() == f"edgetool, version {__version__}"


@pytest.mark.skipif(not EDGETOOL.exists(), reason="the console script is installed by the README's install command")
def test_installed_console_script(tmp_path):
    """The real entry point (not just the Click object): a bad recipe is one line on stderr, exit 2."""
    done = subprocess.run([EDGETOOL, "adapt", tmp_path / "absent.yaml", "--out", tmp_path / "run"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"edgetool: error: recipe not found: {tmp_path / 'absent.yaml'}"]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_checkpoint):
    """The embedded protocol, shrunk (conftest's tiny recipe, 10 steps), adapted twice with the same seed:
    once with --out, once with the default output directory runs/<name> under the working directory."""
    d = tmp_path_factory.mktemp("e2e")
    raw = tiny_recipe_dict(tiny_checkpoint, name="tiny-e2e", train={"steps": 10, "eval_every": 5, "target_f1": 0.5})
    recipe_path = write_recipe(d / "tiny.yaml", raw)
    first = cli("adapt", recipe_path, "--out", d / "run1", "--quiet")
    assert first.exit_code == 0, first.output
    cwd = d / "cwd"
    cwd.mkdir()
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=cwd) as where:
        second = runner.invoke(main, ["adapt", str(recipe_path), "--quiet"], catch_exceptions=False)
        run2 = Path(where) / "runs" / "tiny-e2e"
    assert second.exit_code == 0, second.output
    return {"recipe": recipe_path, "run1": d / "run1", "run2": run2, "stdout": first.stdout}


def test_run_directory_has_every_artifact(two_runs, tiny_checkpoint):
    run = two_runs["run1"]
    assert sorted(p.name for p in run.iterdir()) == ["adapter.pt", "f1_curve.png", "metrics.json", "recipe.yaml"]
    assert leftovers(run.parent) == []
    assert "target macro-F1" in two_runs["stdout"] and str(run) in two_runs["stdout"]

    metrics = json.loads((run / "metrics.json").read_text())
    for name in METRIC_FIELDS:
        assert name in metrics, name
    assert metrics["method"] == "ttlora"
    for name in ("f1_before", "f1_after", "accuracy_before", "accuracy_after"):
        assert 0.0 <= metrics[name] <= 1.0
    assert metrics["total_params"] == count_params(ResNet1d(6, 4, width=8))
    assert metrics["trainable_params"] == expected_ttlora_count(ResNet1d(6, 4, width=8), rank=2)
    assert metrics["trainable_pct"] == pytest.approx(100 * metrics["trainable_params"] / metrics["total_params"])
    assert metrics["train_seconds"] > 0
    assert metrics["peak_memory_bytes"] == sum(metrics["peak_memory_breakdown"].values()) > 0
    curve = metrics["curve"]
    assert [p["step"] for p in curve] == [0, 5, 10]
    assert curve[0]["f1"] == metrics["f1_before"] and curve[-1]["f1"] == metrics["f1_after"]
    reached = [p["step"] for p in curve if p["f1"] >= metrics["target_f1"]]
    assert metrics["steps_to_target"] == (reached[0] if reached else None)
    assert metrics["target_test_windows"] == 40 and metrics["target_train_windows"] == 12  # 3 shots x 4 classes

    png = (run / "f1_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(run / "f1_curve.png") as img:
        img.verify()
    with Image.open(run / "f1_curve.png") as img:
        assert img.size[0] > 200 and img.size[1] > 100

    resolved = load_recipe(run / "recipe.yaml")
    assert resolved.model.checkpoint == tiny_checkpoint  # stored relative to the run, resolved on load
    assert resolved.resolved_dict() == load_recipe(two_runs["recipe"]).resolved_dict()

    payload = torch.load(run / "adapter.pt", map_location="cpu", weights_only=True)
    assert payload["format"] == ADAPTER_FORMAT and payload["method"] == "ttlora"
    assert payload["base_sha256"] == sha256_file(tiny_checkpoint)
    state = payload["state"]
    assert state and not any(k.endswith("base.weight") or "running_" in k for k in state)
    assert sum(state[k].numel() for k in state if k.endswith(".g1")) == metrics["trainable_params"]
    # Adapter-only: the file you ship is much smaller than the base checkpoint it applies to.
    assert (run / "adapter.pt").stat().st_size < tiny_checkpoint.stat().st_size


def test_same_seed_gives_identical_runs(two_runs):
    m1 = json.loads((two_runs["run1"] / "metrics.json").read_text())
    m2 = json.loads((two_runs["run2"] / "metrics.json").read_text())
    strip = lambda m: {k: v for k, v in m.items() if k not in TIMING_FIELDS}  # noqa: E731
    assert strip(m1) == strip(m2)
    s1 = torch.load(two_runs["run1"] / "adapter.pt", weights_only=True)["state"]
    s2 = torch.load(two_runs["run2"] / "adapter.pt", weights_only=True)["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert m1["f1_after"] != m1["f1_before"] or m1["accuracy_after"] != m1["accuracy_before"]  # it did train


def test_pretrain_is_deterministic_whatever_ran_before(tmp_path):
    """Two pretrainings of one recipe in one process give the same weights, even when other work has
    consumed the global random state in between (the initial weights come from the recipe's seed)."""
    from toolchain.stages.adapt import pretrain

    states = []
    for i in range(2):
        raw = tiny_recipe_dict(tmp_path / f"b{i}.pt", model={"width": 4}, pretrain={"steps": 3})
        recipe = load_recipe(write_recipe(tmp_path / f"r{i}.yaml", raw))
        torch.rand(100 + i)  # unrelated work between the two runs
        pretrain(recipe, progress=False, echo=None)
        states.append(torch.load(tmp_path / f"b{i}.pt", weights_only=True)["state_dict"])
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_load_run_restores_the_trained_adapter(two_runs):
    run = load_run(two_runs["run1"])
    metrics = run.metrics
    f1, acc = evaluate(run.adapted, run.data.target_test)
    assert (f1, acc) == (metrics["f1_after"], metrics["accuracy_after"])
    f1_ref, acc_ref = evaluate(run.original, run.data.target_test)
    assert (f1_ref, acc_ref) == (metrics["f1_before"], metrics["accuracy_before"])
    assert not any(isinstance(m, TTLoRAConv) for m in run.original.modules())
    x = torch.from_numpy(run.data.target_test.X[:8])
    with torch.no_grad():
        torch.testing.assert_close(run.method.merge(run.adapted)(x), run.adapted(x), atol=1e-5, rtol=1e-4)


def test_failed_adapt_keeps_the_previous_run_and_leaves_nothing(two_runs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(two_runs["run1"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_plot(*args, **kwargs):
        raise OSError("disk full while writing the plot")

    monkeypatch.setattr("toolchain.rundir.plot_f1_curves", broken_plot)
    result = cli("adapt", two_runs["recipe"], "--out", out, "--quiet", "--steps", "1")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []
    fresh = tmp_path / "fresh"
    assert cli("adapt", two_runs["recipe"], "--out", fresh, "--quiet", "--steps", "1").exit_code != 0
    assert not fresh.exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------- bad inputs


def _bad_recipes(tmp_path: Path, checkpoint: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    base = tiny_recipe_dict(checkpoint)
    recipes = {}

    def add(name: str, raw, *needles: str) -> None:
        path = tmp_path / f"{name}.yaml"
        path.write_text(raw if isinstance(raw, str) else json.dumps(raw))
        recipes[name] = (path, needles)

    add("unknown-key", {**base, "trian": {"steps": 3}}, "field 'trian'", "unknown key")
    add("unknown-nested-key", {**base, "method": {"name": "ttlora", "rnak": 2}}, "field 'method.rnak'", "unknown key")
    add("unknown-method", {**base, "method": {"name": "prefix-tuning"}}, "field 'method.name'")
    add("rank-zero", {**base, "method": {"name": "ttlora", "rank": 0}}, "field 'method.rank'")
    add("rank-negative", {**base, "method": {"name": "ttlora", "rank": -2}}, "field 'method.rank'")
    add("missing-data", {**base, "data": {"format": "npz", "train_path": "nowhere/data.npz"}},
        "field 'data.train_path'", "nowhere/data.npz")
    (tmp_path / "a_TRAIN.ts").write_text("@classLabel true a\n@data\n1,2,3:a\n")
    add("missing-ts-test", {**base, "data": {"format": "ts", "train_path": "a_TRAIN.ts", "test_path": "absent.ts"}},
        "field 'data.test_path'", "absent.ts")
    add("malformed-yaml", "name: tiny\nmodel: {checkpoint: base.pt\n", "malformed YAML")
    add("bad-factory", {**base, "model": {"arch": "factory", "factory": "no_such_pkg.models:build",
                                          "checkpoint": str(tmp_path / "never.pt")}},
        "model.factory", "no_such_pkg.models")
    add("not-a-module", {**base, "model": {"arch": "factory", "factory": "fixtures_2d:not_a_module",
                                           "checkpoint": str(tmp_path / "never.pt")}}, "not an nn.Module")
    add("bad-builtin-kwargs", {**base, "model": {**base["model"], "kwargs": {"depth": 3}}}, "model.kwargs", "depth")
    add("layers-match-nothing", {**base, "method": {"name": "ttlora", "layers": ["decoder.*"]}}, "method.layers")
    return recipes


BAD = ["unknown-key", "unknown-nested-key", "unknown-method", "rank-zero", "rank-negative", "missing-data",
       "missing-ts-test", "malformed-yaml", "bad-factory", "not-a-module", "bad-builtin-kwargs",
       "layers-match-nothing", "missing-recipe"]


@pytest.mark.parametrize("case", BAD)
def test_bad_recipe_is_one_line_exit_2_and_no_run_dir(case, tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    if case == "missing-recipe":
        path, needles = tmp_path / "absent.yaml", ("recipe not found", "absent.yaml")
    else:
        path, needles = _bad_recipes(tmp_path, tiny_checkpoint)[case]
    out = tmp_path / "out" / "run"
    result = cli("adapt", path, "--out", out, "--quiet")
    assert_one_line_error(result, *needles)
    assert not out.exists() and (not out.parent.exists() or leftovers(out.parent) == [])
    assert not (tmp_path / "never.pt").exists()


def test_bad_data_and_bad_options_via_cli(tmp_path, tiny_checkpoint):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 3, 20)).astype(np.float32)
    X[4, 1, 7] = np.nan
    np.savez(tmp_path / "nan.npz", X=X, y=np.arange(12) % 3)
    raw = tiny_recipe_dict(tmp_path / "never.pt")
    raw["data"] = {"format": "npz", "train_path": "nan.npz"}
    result = cli("adapt", write_recipe(tmp_path / "nan.yaml", raw), "--out", tmp_path / "run", "--quiet")
    assert_one_line_error(result, "contain NaN or inf")
    assert not (tmp_path / "run").exists() and not (tmp_path / "never.pt").exists()

    good = write_recipe(tmp_path / "good.yaml", tiny_recipe_dict(tiny_checkpoint))
    assert_one_line_error(cli("adapt", good, "--out", tmp_path / "run", "--steps", "0"), "--steps must be positive")
    assert not (tmp_path / "run").exists()
    result = cli("adapt", good, "--bogus")
    assert result.exit_code == 2 and "No such option" in result.output  # Click's usage error

    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    garbage = write_recipe(tmp_path / "garbage.yaml", tiny_recipe_dict(tmp_path / "garbage.pt"))
    assert_one_line_error(cli("adapt", garbage, "--out", tmp_path / "run", "--quiet"), "garbage.pt")
    assert not (tmp_path / "run").exists()


def test_out_never_replaces_what_is_not_a_run(tmp_path, tiny_checkpoint):
    recipe_path = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tiny_checkpoint))
    precious = tmp_path / "project"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert_one_line_error(cli("adapt", recipe_path, "--out", precious, "--quiet"), "not an edgetool run directory")
    assert (precious / "notes.txt").read_text() == "keep me"
    assert_one_line_error(cli("adapt", recipe_path, "--out", tmp_path, "--quiet"), "not an edgetool run directory")
    assert_one_line_error(cli("adapt", recipe_path, "--out", precious / "notes.txt", "--quiet"), "not a directory")
    inside = tiny_recipe_dict(tmp_path / "run" / "base.pt")
    result = cli("adapt", write_recipe(tmp_path / "inside.yaml", inside), "--out", tmp_path / "run", "--quiet")
    assert_one_line_error(result, "would replace the base checkpoint (model.checkpoint)")
    assert not (tmp_path / "run").exists()


def test_checkpoint_for_another_architecture_is_refused(tmp_path, tiny_checkpoint):
    raw = tiny_recipe_dict(tiny_checkpoint, model={"arch": "mobilenet1d"})
    result = cli("adapt", write_recipe(tmp_path / "other.yaml", raw), "--out", tmp_path / "run", "--quiet")
    assert_one_line_error(result, "does not fit this model architecture")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- new classes


def test_new_classes_extend_a_trainable_head_without_changing_source_logits(tmp_path):
    data = load_data(DataConfig(source_classes=["Walking", "Running"]), seed=0)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tmp_path / "b.pt")))
    torch.manual_seed(0)
    base = ResNet1d(6, data.num_source_classes, width=8).eval()
    model, method = build_adapted(method_settings(name="ttlora", rank=2, train_head=False), base,
                                  "classifier", data)
    assert model.classifier.out_features == 4 and base.classifier.out_features == 2
    assert all(p.requires_grad for p in model.classifier.parameters())  # forced on: new rows must train
    head = model.classifier.weight.numel() + model.classifier.bias.numel()
    assert sum(p.numel() for _, p in method.trainable_parameters(model)) == expected_ttlora_count(base, 2) + head
    x = torch.from_numpy(data.target_test.X)
    with torch.no_grad():
        out, ref = model.eval()(x), base(x)
    # The source classes' logits are those of the base at step 0 (up to the GEMM's summation order:
    # a 4-row and a 2-row Linear may block the same dot products differently) ...
    torch.testing.assert_close(out[:, :2], ref, atol=1e-6, rtol=0)
    assert out.shape == (len(x), 4)
    # ... and the new rows start at zero weight, so new classes get one constant logit: the lowest source bias.
    torch.testing.assert_close(out[:, 2:], base.classifier.bias.min().expand(len(x), 2), atol=0, rtol=0)
    torch.testing.assert_close(model.classifier.weight[:2], base.classifier.weight, atol=0, rtol=0)


def test_new_classes_end_to_end_pretrains_automatically(tmp_path):
    ckpt = tmp_path / "ckpt" / "base-2cls.pt"
    raw = tiny_recipe_dict(ckpt, name="newcls", data={"source_classes": ["Walking", "Running"]},
                           model={"width": 4}, pretrain={"steps": 8}, train={"steps": 4, "eval_every": 2})
    recipe_path = write_recipe(tmp_path / "newcls.yaml", raw)
    result = cli("adapt", recipe_path, "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.output
    assert "pretraining it first" in result.stdout
    ckpt_data = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert ckpt_data["class_names"] == ["Walking", "Running"]
    assert ckpt_data["state_dict"]["classifier.weight"].shape == (2, 8)
    payload = torch.load(tmp_path / "run" / "adapter.pt", weights_only=True)
    assert payload["class_names"] == ["Walking", "Running", "Standing", "Badminton"]
    assert payload["num_source_classes"] == 2
    assert payload["state"]["classifier.weight"].shape == (4, 8)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["total_params"] == count_params(ResNet1d(6, 4, width=4))
    run = load_run(tmp_path / "run")
    assert evaluate(run.adapted, run.data.target_test)[0] == metrics["f1_after"]


# ---------------------------------------------------------------------------------------------- bring your own


@pytest.fixture()
def byo_recipe(tmp_path, monkeypatch):
    """A user's image CNN (tests/fixtures_2d.py) on generated [N, 1, 8, 8] images, domain 0 -> domain 1."""
    monkeypatch.syspath_prepend(str(TESTS))
    from fixtures_2d import write_image_npz

    write_image_npz(tmp_path / "images.npz", per_class=8)

    def make(checkpoint: str, name: str = "byo") -> Path:
        raw = {
            "name": name,
            "seed": 0,
            "data": {"format": "npz", "train_path": "images.npz", "source_domains": [0], "target_domains": [1]},
            "model": {"arch": "factory", "factory": "fixtures_2d:small_cnn", "checkpoint": checkpoint,
                      "kwargs": {"in_channels": 1, "num_classes": 3, "width": 4}},
            "pretrain": {"steps": 15, "lr": 0.01, "batch_size": 8},
            "method": {"name": "ttlora", "rank": 2},
            "train": {"steps": 6, "lr": 0.01, "batch_size": 6, "eval_every": 3},
        }
        return write_recipe(tmp_path / f"{name}.yaml", raw)

    return make


def test_byo_conv2d_model_pretrain_then_adapt(tmp_path, byo_recipe):
    from fixtures_2d import small_cnn

    recipe_path = byo_recipe("ckpt/byo.pt")
    result = cli("pretrain", recipe_path, "--quiet")
    assert result.exit_code == 0, result.output
    ckpt = torch.load(tmp_path / "ckpt" / "byo.pt", map_location="cpu", weights_only=True)
    assert ckpt["input_shape"] == [1, 8, 8] and ckpt["class_names"] == ["0", "1", "2"]

    result = cli("adapt", recipe_path, "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.output
    assert "pretraining it first" not in result.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    user_model = small_cnn(1, 3, 4)
    assert metrics["trainable_params"] == expected_ttlora_count(user_model, 2)
    assert metrics["total_params"] == count_params(user_model)
    # The zero-shot score is the user's pretrained model on the target images, computed independently.
    recipe = load_recipe(recipe_path)
    data = load_data(recipe.data, recipe.seed)
    assert data.input_shape == (1, 8, 8)
    load_state_checked(user_model, ckpt["state_dict"], "checkpoint")
    f1, acc = evaluate(user_model.eval(), data.target_test)
    assert (f1, acc) == (metrics["f1_before"], metrics["accuracy_before"])

    run = load_run(tmp_path / "run", trust_factories=["fixtures_2d"])  # a run dir's factory runs only when trusted
    wrapped = [m for m in run.adapted.modules() if isinstance(m, TTLoRAConv)]
    assert len(wrapped) == 3 and all(isinstance(m.base, torch.nn.Conv2d) for m in wrapped)
    assert any(m.base.groups > 1 for m in wrapped)  # the depthwise Conv2d is adapted too
    x = torch.from_numpy(data.target_test.X)
    with torch.no_grad():
        torch.testing.assert_close(run.method.merge(run.adapted)(x), run.adapted(x), atol=1e-5, rtol=1e-4)


def test_byo_plain_state_dict_checkpoint_is_used_as_given(tmp_path, byo_recipe):
    """A user's own weights (torch.save(model.state_dict())): adapt uses them, no pretraining."""
    from fixtures_2d import small_cnn

    torch.manual_seed(3)
    user_model = small_cnn(1, 3, 4).eval()
    torch.save(user_model.state_dict(), tmp_path / "user.pt")
    before = (tmp_path / "user.pt").read_bytes()
    recipe_path = byo_recipe("user.pt", name="byo-user")
    result = cli("adapt", recipe_path, "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.output
    assert "pretraining" not in result.stdout
    assert (tmp_path / "user.pt").read_bytes() == before  # never overwritten
    recipe = load_recipe(recipe_path)
    data = load_data(recipe.data, recipe.seed)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert evaluate(user_model, data.target_test) == (metrics["f1_before"], metrics["accuracy_before"])

    # A state dict for another model is refused with one line.
    torch.save(small_cnn(1, 3, 8).state_dict(), tmp_path / "user.pt")
    result = cli("adapt", recipe_path, "--out", tmp_path / "run2", "--quiet")
    assert_one_line_error(result, "does not fit this model architecture")
    assert not (tmp_path / "run2").exists()


def test_byo_factory_head_must_match_the_classes(tmp_path, byo_recipe):
    recipe_path = byo_recipe("never.pt", name="byo-head")
    recipe = load_recipe(recipe_path)
    recipe.model.kwargs = {"in_channels": 1, "num_classes": 5, "width": 4}
    with pytest.raises(EdgetoolError, match="head 'fc' has 5 outputs but the source domain has 3 classes"):
        build_model(recipe.model, 1, 3)
    # The head was guessed (last nn.Linear registered): the error says how to name the real classifier.
    with pytest.raises(EdgetoolError, match="; if it is not the classifier, set model.head to the classifier's module name"):
        build_model(recipe.model, 1, 3)
    with pytest.raises(EdgetoolError, match=r"has 5 outputs but the source domain has 3 classes$"):
        build_model(recipe.model.model_copy(update={"head": "fc"}), 1, 3)
    with pytest.raises(EdgetoolError, match=r"model factory fixtures_2d:small_cnn failed: TypeError"):
        build_model(recipe.model.model_copy(update={"kwargs": {"colour": "red"}}), 1, 3)
    with pytest.raises(EdgetoolError, match="'fixtures_2d' has no callable 'missing'"):
        build_model(recipe.model.model_copy(update={"factory": "fixtures_2d:missing"}), 1, 3)
    with pytest.raises(EdgetoolError, match="model.head.*'features.1' is a BatchNorm2d, not an nn.Linear"):
        build_model(recipe.model.model_copy(update={"kwargs": {}, "head": "features.1"}), 1, 3)
