"""`edgetool bench`: end to end on a tiny budget, what its numbers must satisfy, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from toolchain.models.assembly import build_adapted, load_base_model
from toolchain.stages.bench import method_configs, run_bench, seed_data
from toolchain.training.cost import measure_step_flops
from toolchain.cli import main
from toolchain.data.protocol import load_data
from toolchain.errors import EdgetoolError
from toolchain.methods.settings import method_names
from toolchain.models.backbones import CONV_TYPES
from toolchain.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
TINY_BENCH = {"train": {"steps": 10, "lr": 0.01, "batch_size": 12, "eval_every": 5},
              "bench": {"timing_steps": 2, "method_overrides": {"lora": {"rank": 1}}}}
# full, head and ttlora always; bn and lora when their modules are registered.
E2E_METHODS = ["full", "head", "bn", "lora", "ttlora"]




def _sample_std(xs: list[float]) -> float:
    return float(np.std(xs, ddof=1))


def _expected_trainable(name: str, reference: nn.Module, head_name: str, rank: int) -> int:
    """What each method claims to train, counted from the method-free reference model."""
    head = reference.get_submodule(head_name)
    convs = [m for n, m in reference.named_modules() if isinstance(m, CONV_TYPES)]
    if name == "full":
        return sum(p.numel() for p in reference.parameters())
    if name == "head":
        return sum(p.numel() for p in head.parameters())
    if name == "bn":
        return sum(p.numel() for m in reference.modules() if isinstance(m, nn.BatchNorm1d) for p in m.parameters())
    if name == "ttlora":  # G1 per conv: C_out x r (the TT rank is capped by C_out, never reached here)
        return sum(c.out_channels * min(rank, c.out_channels) for c in convs)
    if name == "lora":  # groups = 1 in ResNet1d: A is r x C_in x k, B is C_out x r
        return sum(rank * c.in_channels * c.kernel_size[0] + c.out_channels * rank for c in convs)
    raise AssertionError(name)


@pytest.mark.slow
def test_bench_cli_end_to_end_two_seeds(make_recipe, tmp_path):
    recipe = make_recipe("tinybench", **TINY_BENCH)
    out = tmp_path / "bench-out"
    res = CliRunner().invoke(main, ["bench", str(recipe.source), "--methods", ",".join(E2E_METHODS),
                                    "--seeds", "2", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output

    result = json.loads((out / "bench.json").read_text())
    meta, rows = result["meta"], result["rows"]
    assert meta["seeds"] == [0, 1] and meta["steps"] == 10
    assert [r["method"] for r in rows] == E2E_METHODS

    data = load_data(recipe.data, recipe.seed)
    base, head_name, _ = load_base_model(recipe, data, echo=None)
    total = sum(p.numel() for p in base.parameters())
    by_name = {r["method"]: r for r in rows}
    for r in rows:
        for key in ("method", "mergeable", "zero_overhead", "f1_mean", "f1_std", "accuracy_mean", "accuracy_std",
                    "trainable_params", "trainable_pct", "flops_per_step", "peak_memory_bytes_mean",
                    "steps_to_target_mean", "steps_to_target_reached", "wall_seconds_per_step_mean",
                    "adapter_bytes_mean"):
            assert key in r, (r["method"], key)
        # mean +- sample std over exactly the two seeds
        assert len(r["f1_per_seed"]) == 2 and r["seeds"] == [0, 1]
        assert r["f1_mean"] == pytest.approx(np.mean(r["f1_per_seed"]))
        assert r["f1_std"] == pytest.approx(_sample_std(r["f1_per_seed"]))
        assert r["accuracy_std"] == pytest.approx(_sample_std(r["accuracy_per_seed"]))
        assert all(0.0 <= f <= 1.0 for f in r["f1_per_seed"])
        reached = [s for s in r["steps_to_target_per_seed"] if s is not None]
        assert r["steps_to_target_reached"] == len(reached)
        if reached:
            assert r["steps_to_target_mean"] == pytest.approx(np.mean(reached))
        # trainable set is what the method claims
        rank = 1 if r["method"] == "lora" else recipe.method.rank
        assert r["trainable_params"] == _expected_trainable(r["method"], base, head_name, rank), r["method"]
        assert r["total_params"] == total
        assert r["trainable_pct"] == pytest.approx(100 * r["trainable_params"] / total)
        # every adapter starts as the identity, and every method sees the same data: all curves start equal
        assert r["curve_mean"][0]["step"] == 0
        assert r["curve_mean"][0]["f1_mean"] == pytest.approx(meta["zero_shot_f1_mean"])
        assert [p["step"] for p in r["curve_mean"]] == [0, 5, 10]
        assert r["peak_memory_bytes_mean"] > 0 and r["wall_seconds_per_step_mean"] > 0 and r["adapter_bytes_mean"] > 0
        # all these methods fold into the base architecture: the exported graphs are identical
        assert r["mergeable"] is True and r["zero_overhead"] is True, r["overhead_reason"]
        assert r["fused_max_abs_diff"] < 1e-4
    assert by_name["head"]["trainable_params"] < by_name["ttlora"]["trainable_params"] < by_name["full"]["trainable_params"]
    # the adapter checkpoint holds the update only: TT-LoRA's is far smaller than full fine-tuning's
    assert by_name["ttlora"]["adapter_bytes_mean"] < by_name["full"]["adapter_bytes_mean"]

    table = (out / "bench.md").read_text()
    assert "| method | macro-F1 |" in table
    for r in rows:
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {r['method']} |"))
        assert f"{r['f1_mean']:.3f} ± {r['f1_std']:.3f}" in line and f"{r['trainable_params']:,}" in line
    for png in ("f1_vs_step.png", "f1_vs_params.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary output left behind"


@pytest.mark.parametrize("lean_step", [False, True])
def test_training_flops_per_step_ordering(make_recipe, lean_step):
    """What must hold, and why (all methods run the same forward through the frozen convs):
    - head: backward stops at the classifier (nothing below it needs a gradient) -> ~0 backward FLOPs;
    - bn: needs activation gradients through every conv (BN parameters sit after them) but no conv
      weight gradients -> about one forward's worth;
    - ttlora, plain autograd (train.lean_step false): activation gradients AND the dense conv weight
      gradient dL/d(W + dW), which autograd then contracts into G1 -> at least full fine-tuning's
      backward minus the head's weight gradient, so no per-step compute saved over full fine-tuning;
    - ttlora, lean step: activation gradients and G1's gradient from the r-channel side output, no
      dense weight gradient -> about half of full fine-tuning's backward (input + weight gradients)."""
    recipe = make_recipe("flops")
    data = load_data(recipe.data, recipe.seed)
    base, head_name, _ = load_base_model(recipe, data, echo=None)
    configs = method_configs(recipe, ["head", "bn", "ttlora", "full"])
    flops = {}
    for name, (mcfg, tcfg) in configs.items():
        model, method = build_adapted(mcfg, base, head_name, data)
        flops[name] = measure_step_flops(model, method, tcfg.model_copy(update={"lean_step": lean_step}), data.target_train)
    head = base.get_submodule(head_name)
    batch = min(recipe.train.batch_size, len(data.target_train))
    head_weight_grad = 2 * batch * head.in_features * head.out_features

    assert flops["head"]["flops_forward"] == flops["bn"]["flops_forward"] == flops["full"]["flops_forward"]
    assert flops["ttlora"]["flops_forward"] > flops["full"]["flops_forward"]  # + the TT contraction / side output
    assert flops["head"]["flops_backward"] <= 2 * head_weight_grad
    assert flops["head"]["flops_backward"] < flops["bn"]["flops_backward"] < flops["ttlora"]["flops_backward"]
    assert flops["head"]["flops_per_step"] < flops["bn"]["flops_per_step"] < flops["ttlora"]["flops_per_step"]
    if lean_step:
        assert flops["ttlora"]["flops_backward"] < 0.6 * flops["full"]["flops_backward"]
        assert flops["ttlora"]["flops_per_step"] < flops["full"]["flops_per_step"]
    else:
        assert flops["ttlora"]["flops_backward"] >= flops["full"]["flops_backward"] - head_weight_grad
        assert flops["ttlora"]["flops_per_step"] >= 0.99 * flops["full"]["flops_per_step"]
    # the optimizer's elementwise work scales with what trains (Adam: 13 FLOPs per element here)
    assert flops["full"]["flops_optimizer_estimate"] == 13 * sum(p.numel() for p in base.parameters())
    for f in flops.values():
        assert f["flops_per_step"] == (f["flops_forward"] + f["flops_backward"] + f["flops_optimizer_counted"]
                                       + f["flops_optimizer_estimate"])


@pytest.mark.parametrize("groups", [1, 4, 8])
def test_conv_weight_gradient_flops_equal_forward_flops(groups):
    """dL/dW of a conv takes exactly as many MACs as its forward, grouped or not; torch's stock
    formula counts grouped convs `groups` times over, which bench corrects."""
    from torch.utils.flop_counter import FlopCounterMode

    from toolchain.training.cost import grouped_conv_backward_fix

    conv = nn.Conv1d(8, 16, 5, padding=2, groups=groups, bias=False)
    x = torch.randn(3, 8, 40)  # no grad: the backward computes the weight gradient only
    fix = grouped_conv_backward_fix()
    with FlopCounterMode(display=False, custom_mapping=fix) as fc:
        y = conv(x)
    forward = fc.get_total_flops()
    with FlopCounterMode(display=False, custom_mapping=fix) as fc:
        y.sum().backward()
    assert forward == 2 * 3 * 16 * (8 // groups) * 5 * 40
    assert fc.get_total_flops() == forward


def test_resampled_shots_change_per_seed_but_source_does_not(make_recipe):
    recipe = make_recipe("shots")
    base = load_data(recipe.data, recipe.seed)
    assert seed_data(recipe, 0, base) is base
    other = seed_data(recipe, 1, base)
    np.testing.assert_array_equal(other.source_train.X, base.source_train.X)
    np.testing.assert_array_equal(other.target_test.X, base.target_test.X)
    assert not np.array_equal(other.target_train.X, base.target_train.X)
    recipe.bench.resample_shots = False
    assert seed_data(recipe, 1, base) is base


@pytest.mark.parametrize("args, message", [
    (["--methods", "full,warp"], "unknown method 'warp'"),
    (["--methods", " , "], "--methods is empty"),
    (["--seeds", "0"], "--seeds must be a positive number"),
    (["--seeds", "-3"], "--seeds must be a positive number"),
])
def test_bad_arguments_exit_2_with_one_line(make_recipe, tmp_path, args, message):
    recipe = make_recipe("bad")
    res = CliRunner().invoke(main, ["bench", str(recipe.source), *args, "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and message in res.output
    assert not (tmp_path / "o").exists()


def test_every_method_name_has_an_implementation():
    from toolchain.methods.registry import method_class_by_name

    for name in method_names():
        assert method_class_by_name(name).__name__


@pytest.mark.parametrize("bench, message", [
    ({"train_overrides": {"lora": {"steps": 5}}}, "must be equal for every method"),
    ({"method_overrides": {"lora": {"rank": 0}}}, "bench.method_overrides.lora"),
    ({"methods": ["full", "warp"]}, "unknown method(s) ['warp']"),
])
def test_bad_bench_section_is_a_recipe_error(make_recipe, tmp_path, bench, message):
    with pytest.raises(EdgetoolError) as exc:
        recipe = make_recipe("badsec", bench=bench)
        method_configs(recipe, ["full", "lora"])
    assert message in str(exc.value)


def test_shipped_bench_recipes_cover_both_scenarios_and_backbones():
    combos = set()
    for path in sorted((REPO / "recipes").glob("bench-*.yaml")):
        recipe = load_recipe(path)
        scenario = "newclass" if recipe.data.source_classes else "shift"
        if scenario == "newclass":
            assert len(recipe.data.source_classes) == 2
        else:
            assert recipe.data.shift is not None
        assert recipe.data.target_shots is not None and recipe.data.target_shots <= 3
        assert recipe.model.checkpoint.parent == (REPO / "checkpoints")
        assert path.stem == f"bench-{scenario}-{recipe.model.arch}"
        method_configs(recipe, recipe.bench.methods)  # every override validates
        combos.add((scenario, recipe.model.arch))
    assert combos == {(s, a) for s in ("shift", "newclass") for a in ("resnet1d", "mobilenet1d")}


def test_out_never_replaces_what_is_not_a_bench_directory(make_recipe, tmp_path):
    """bench's output replaces its --out directory: a user's directory (or one holding the base
    checkpoint) is refused before any work, and an earlier bench directory may be replaced."""
    recipe = make_recipe("outguard")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("keep me")
    for out, message in ((mine, "is not an edgetool bench directory"),
                         (recipe.model.checkpoint.parent, "is not an edgetool bench directory"),
                         (mine / "thesis.txt", "exists and is not a directory")):
        res = CliRunner().invoke(main, ["bench", str(recipe.source), "--methods", "head", "--seeds", "1",
                                        "--out", str(out), "--quiet"])
        assert res.exit_code == 2, res.output
        assert res.output.strip().count("\n") == 0 and message in res.output
    assert (mine / "thesis.txt").read_text() == "keep me" and recipe.model.checkpoint.is_file()


def test_a_method_that_does_not_fit_fails_before_any_training(make_recipe, monkeypatch):
    """A bad per-method setting (here: a layer selection matching no conv) is found before the other
    methods spend their training budget, not after."""
    import toolchain.bench.jobs as benchjobs

    def no_training(*args, **kwargs):
        raise AssertionError("training started before every method was checked")

    monkeypatch.setattr(benchjobs, "fit", no_training)
    recipe = make_recipe("preflight", bench={"method_overrides": {"ttlora": {"layers": ["nomatch.*"]}}})
    with pytest.raises(EdgetoolError, match=r"'method.layers': \['nomatch.\*'\] matched no Conv1d/Conv2d layer"):
        run_bench(recipe, ["full", "head", "ttlora"], 1, progress=False, echo=None)
