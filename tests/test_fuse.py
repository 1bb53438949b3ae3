"""fuse-export: fusion through the method interface, equivalence checks that can fail, the architecture
identity of the fused model, and the CLI end to end (artifacts, ORT parity, FP16, bad input)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

import toolchain.enginedir as enginedir
import toolchain.proof.fusion as fusion_mod
from toolchain.artifacts import sha256_file
from toolchain.cli import main
from toolchain.errors import EdgetoolError, NotMergeableError
from toolchain.backends.onnxruntime import run_onnx
from toolchain.proof.export import compare_graph_structure
from toolchain.proof.fusion import architecture_differences, check_equivalence, fuse_model
from toolchain.methods.base import AdapterLayer
from toolchain.methods.registry import get_method
from toolchain.methods.settings import method_names, method_settings, settings_for
from toolchain.methods.base import AdaptationMethod
from toolchain.recipe import FuseConfig
from zoo import BACKBONES, CONV_KINDS, conv_model, inputs_for
from zoo import backbone as zoo_backbone

# ---------------------------------------------------------------------------------------------- per-kind fusion

REQUIRED_MERGEABLE = {"ttlora", "full"}


def _method_configs() -> list:
    """Every method (so new ones are picked up), rank 2 where it has one, plus the adapter's fusable variant."""
    cfgs = [settings_for(n, {"rank": 2}, {}) for n in sorted(method_names())]
    cfgs.append(method_settings(name="adapter", adapter_kind="linear"))
    return cfgs


def _cfg_id(cfg) -> str:
    return cfg.name + ("-linear" if cfg.name == "adapter" and cfg.adapter_kind == "linear" else "")


def _toy(kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    return conv_model(kind)


def _adapted_toy(cfg, kind: str, seed: int = 0):
    torch.manual_seed(seed)
    reference, shape = _toy(kind)
    method = get_method(cfg)
    adapted = method.inject(copy.deepcopy(reference), "head")
    with torch.no_grad():  # a trained update: adapters that start at zero (TT core G1, LoRA B) become active
        for _, p in method.trainable_parameters(adapted):
            p.add_(0.1 * torch.randn_like(p))
    return reference, adapted.eval(), method, shape


def _mergeable(method: AdaptationMethod, model: nn.Module) -> bool:
    return method.mergeable and all(m.mergeable for m in model.modules() if isinstance(m, AdapterLayer))


@pytest.mark.parametrize("kind", sorted(CONV_KINDS))
@pytest.mark.parametrize("cfg", _method_configs(), ids=_cfg_id)
def test_fusion_is_equivalent_for_every_conv_kind(cfg, kind):
    try:
        reference, adapted, method, shape = _adapted_toy(cfg, kind)
    except EdgetoolError as exc:  # a method may decline a conv kind up front, with a clear message
        assert cfg.name not in REQUIRED_MERGEABLE
        pytest.skip(f"method '{_cfg_id(cfg)}' does not apply to {kind}: {exc}")
    if not _mergeable(method, adapted):
        assert cfg.name not in REQUIRED_MERGEABLE
        pytest.skip(f"method '{_cfg_id(cfg)}' is not mergeable (its refusal is tested below)")
    fused = fuse_model(method, adapted)

    assert architecture_differences(fused, reference) == []
    X = np.random.default_rng(1).standard_normal((24, *shape)).astype(np.float32)
    fc = FuseConfig()
    report = check_equivalence(adapted, fused, X, fc.atol, fc.rtol)
    assert report.passed, report.failure()
    assert report.argmax_agreement == 1.0
    assert {l.name for l in report.layers} == {"conv", "bn", "head"}
    assert report.max_abs_error <= fc.atol
    # Not vacuous for methods whose update lives in the base's own parameters (full, head, bn, bias,
    # galore: the fused model is then a copy of the adapted one): a merge that dropped the update fails here.
    assert not check_equivalence(reference, fused, X, fc.atol, fc.rtol).passed

    # The check is not vacuous: where an adapter wraps the conv, the update is real (the unfused base
    # differs from the adapted model beyond tolerance) and the fused kernel is exactly W + dW cast from float64.
    layer = adapted.get_submodule("conv")
    if isinstance(layer, AdapterLayer):
        expected = (layer.base.weight.detach().double() + layer.delta_weight()).to(layer.base.weight.dtype)
        assert torch.equal(fused.get_submodule("conv").weight, expected)
        unfused = check_equivalence(adapted, method.unload(adapted), X, fc.atol, fc.rtol)
        assert not unfused.passed and unfused.worst_layer == "conv"


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("cfg", _method_configs(), ids=_cfg_id)
def test_fusion_is_equivalent_on_every_backbone(cfg, backbone):
    """Whole models (residual, depthwise-separable, 2-D with circular/dilated/grouped convs): the fused
    model is the base architecture and computes what the adapted one does."""
    original = zoo_backbone(backbone)
    method = get_method(cfg)
    head = "fc" if backbone == "cnn2d" else "classifier"
    try:
        adapted = method.inject(copy.deepcopy(original), head)
    except EdgetoolError as exc:  # a method may decline a model up front (e.g. linear adapter on grouped-only)
        assert cfg.name not in REQUIRED_MERGEABLE
        pytest.skip(f"{cfg.name} declines {backbone}: {exc}")
    with torch.no_grad():
        for _, p in method.trainable_parameters(adapted):
            p.add_(0.05 * torch.randn_like(p))
    adapted.eval()
    if not _mergeable(method, adapted):
        pytest.skip(f"{cfg.name} on {backbone} is not mergeable (nothing to fuse)")
    X = inputs_for(backbone, 6).numpy()
    fused = fuse_model(method, adapted)
    assert architecture_differences(fused, original) == []
    assert not any(p.requires_grad for p in fused.parameters())
    fc = FuseConfig()
    report = check_equivalence(adapted, fused, X, fc.atol, fc.rtol)
    assert report.passed, report.failure()
    if cfg.name not in ("full", "head", "bn", "bias", "galore"):  # an injected update must change the output
        assert not check_equivalence(adapted, method.unload(adapted), X, fc.atol, fc.rtol).passed
    # For full, head, bn, bias and galore the update lives in the base's own parameters, so the fused model
    # is a copy of the adapted one and the equivalence above compares a model with itself. What such a
    # merge can still get wrong is dropping the update (returning the base): the fused model must differ
    # from the original wherever the update reached the output.
    assert not check_equivalence(original, fused, X, fc.atol, fc.rtol).passed


def test_required_methods_are_registered():
    assert REQUIRED_MERGEABLE <= set(method_names())


class _NonlinearBottleneck(AdapterLayer):
    """A bottleneck with a ReLU after the conv: no dense kernel can express it."""

    mergeable = False

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.down = nn.Conv1d(base.out_channels, 2, 1)
        self.up = nn.Conv1d(2, base.out_channels, 1)

    def forward(self, x):
        y = self.base(x)
        return y + self.up(torch.relu(self.down(y)))


class _BottleneckMethod(AdaptationMethod):
    name = "test-bottleneck"

    def _inject(self, model, head_name):
        self.wrap_convs(model, _NonlinearBottleneck, head_name)


def _refused_configs() -> list:
    cfgs = [("test-bottleneck", None)]
    for cfg in _method_configs():
        _, adapted, method, _ = _adapted_toy(cfg, "conv1d_bias")
        if not _mergeable(method, adapted):
            cfgs.append((_cfg_id(cfg), cfg))
    return cfgs


@pytest.mark.parametrize("name,cfg", _refused_configs(), ids=[c[0] for c in _refused_configs()])
def test_unmergeable_method_is_refused_naming_inference_cost(name, cfg):
    if cfg is None:
        torch.manual_seed(0)
        model, _ = _toy("conv1d_bias")
        method = _BottleneckMethod(method_settings())
        adapted = method.inject(model, "head")
    else:
        _, adapted, method, _ = _adapted_toy(cfg, "conv1d_bias")
    with pytest.raises(NotMergeableError, match="inference cost") as info:
        fuse_model(method, adapted)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- checks can fail


def test_architecture_check_catches_a_model_that_is_not_the_base():
    reference, adapted, method, _ = _adapted_toy(method_settings(name="ttlora", rank=2), "conv1d_bias")
    fused = fuse_model(method, adapted)
    assert architecture_differences(fused, reference) == []
    assert any("TTLoRAConv" in d for d in architecture_differences(adapted, reference))  # unfused: extra modules
    assert any("float64" in d for d in architecture_differences(fused.double(), reference))
    other = fuse_model(method, adapted)
    other.conv = nn.Conv1d(4, 6, 3, padding=2, bias=True)  # same keys and shapes, different padding
    assert any("padding" in d for d in architecture_differences(other, reference))


def test_equivalence_check_names_a_broken_layer():
    reference, adapted, method, shape = _adapted_toy(method_settings(name="ttlora", rank=2), "conv2d_grouped")
    fused = fuse_model(method, adapted)
    with torch.no_grad():
        fused.conv.weight[0, 0, 0, 0] += 1e-3
    X = np.random.default_rng(2).standard_normal((8, *shape)).astype(np.float32)
    report = check_equivalence(adapted, fused, X, 1e-4, 1e-5)
    assert not report.passed
    assert report.worst_layer == "conv"
    assert "'conv'" in report.failure()
    bad = {l.name for l in report.layers if not l.passed}
    assert bad == {"conv"}  # each layer sees the adapted model's own input, so the error does not propagate


def test_equivalence_check_fails_a_layer_that_outputs_nan():
    # max() keeps its first argument against a NaN, so a NaN difference must be handled explicitly.
    reference, adapted, method, shape = _adapted_toy(method_settings(name="ttlora", rank=2), "conv1d_bias")
    fused = fuse_model(method, adapted)
    with torch.no_grad():
        fused.conv.weight[0, 0, 0] = float("nan")
    X = np.random.default_rng(3).standard_normal((8, *shape)).astype(np.float32)
    report = check_equivalence(adapted, fused, X, 1e-4, 1e-5)
    assert not report.passed and report.worst_layer == "conv"
    assert {l.name for l in report.layers if not l.passed} == {"conv"}


# ---------------------------------------------------------------------------------------------- CLI end to end


def _invoke(args: list[str]):
    result = CliRunner().invoke(main, args)
    output = result.output  # stdout and stderr together
    assert "Traceback" not in output
    return result, output


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "tiny"
    result, output = _invoke(["fuse-export", str(tiny_run), "--out", str(out)])
    assert result.exit_code == 0, output
    return out, output


def test_cli_end_to_end_writes_the_contracted_engine_dir(exported, tiny_run):
    out, output = exported
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["original.onnx", "fused.onnx", "original.fp16.onnx", "fused.fp16.onnx", "fuse_report.json"])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    assert "PASSED" in output and "worst layer" in output
    r = json.loads((out / "fuse_report.json").read_text())
    for key in ("max_abs_error", "max_rel_error", "argmax_agreement", "worst_layer", "graph_identical", "ort_max_abs_error",
                "ort_f1", "torch_f1", "fp16_argmax_agreement", "fp16_f1", "passed", "run_dir", "recipe", "opset",
                "input_name", "output_name", "input_shape", "fp16_converter", "layers"):
        assert key in r, key
    assert r["passed"] and r["graph_identical"] and r["architecture_identical"] and r["fp16_graph_identical"]
    # Relative to the engine directory, so the two can be moved together (tests/test_portability.py).
    assert (out / r["run_dir"]).resolve() == Path(tiny_run).resolve() == Path(r["run_dir_absolute"])
    assert (out / r["recipe"]).resolve() == Path(tiny_run).resolve() / "recipe.yaml"
    assert (r["input_name"], r["output_name"], r["opset"], r["input_shape"]) == ("input", "logits", 17, [6, 100])
    assert "onnxconverter-common" in r["fp16_converter"]
    assert r["max_abs_error"] <= r["atol"] and r["argmax_agreement"] == 1.0
    assert r["worst_layer"] in {l["name"] for l in r["layers"]}
    assert sum(l["type"] == "Conv1d" for l in r["layers"]) == 12  # every conv of the ResNet1d compared
    assert r["ort_f1"] == r["torch_f1"] and r["ort_predictions_identical"]
    assert r["fp16_argmax_agreement"] >= 0.95
    assert r["adapter_sha256"] == sha256_file(Path(tiny_run) / "adapter.pt")  # verify uses it to spot stale engines
    metrics = json.loads((Path(tiny_run) / "metrics.json").read_text())
    assert r["torch_f1"] == pytest.approx(metrics["f1_after"], abs=1e-9)  # the fused model scores as the adapted one


def test_exported_graphs_independently(exported, tiny_run):
    """Re-check the files from scratch: structure, BN folded, dynamic batch, ORT vs fused PyTorch, FP16 types."""
    from toolchain.rundir import load_run

    out, _ = exported
    assert compare_graph_structure(out / "original.onnx", out / "fused.onnx").identical
    assert compare_graph_structure(out / "original.fp16.onnx", out / "fused.fp16.onnx").identical
    fused_proto = onnx.load(str(out / "fused.onnx"))
    assert not [n for n in fused_proto.graph.node if n.op_type == "BatchNormalization"]
    assert fused_proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    run = load_run(tiny_run)
    fused = fuse_model(run.method, run.adapted)
    X = run.data.target_test.X[:7]
    with torch.no_grad():
        expected = fused(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(run_onnx(out / "fused.onnx", X), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(run_onnx(out / "fused.onnx", X[:1]), expected[:1], atol=1e-4, rtol=0)

    fp16 = onnx.load(str(out / "fused.fp16.onnx"))
    onnx.checker.check_model(fp16)
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert fp16.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    report = json.loads((out / "fuse_report.json").read_text())
    kinds = {t.data_type for t in fp16.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in kinds
    if not report["fp16_blocked_nodes"]:
        assert kinds == {onnx.TensorProto.FLOAT16}
    y16 = run_onnx(out / "fused.fp16.onnx", X)
    assert y16.dtype == np.float32 and np.isfinite(y16).all()
    assert np.abs(y16 - expected).max() < 0.05 * np.abs(expected).max()


def _copy_run(tiny_run: Path, dst: Path, **recipe_changes) -> Path:
    shutil.copytree(tiny_run, dst)
    raw = yaml.safe_load((dst / "recipe.yaml").read_text())
    for section, values in recipe_changes.items():
        raw[section].update(values)
    (dst / "recipe.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    # As if the run had been written with that recipe: its adapter records the recipe's sha256.
    payload = torch.load(dst / "adapter.pt", weights_only=True)
    torch.save({**payload, "recipe_sha256": sha256_file(dst / "recipe.yaml")}, dst / "adapter.pt")
    return dst


def test_parity_failure_exits_1_naming_the_layer_and_leaves_no_export(tiny_run, tmp_path, monkeypatch):
    real = fusion_mod.fuse_model

    def broken_fusion(method, adapted):  # a fusion bug in one layer
        fused = real(method, adapted)
        with torch.no_grad():
            fused.get_submodule("features.1.body.3").weight.mul_(1.01)
        return fused

    monkeypatch.setattr(fusion_mod, "fuse_model", broken_fusion)
    out = tmp_path / "eng" / "tiny"
    result, output = _invoke(["fuse-export", str(tiny_run), "--out", str(out)])
    assert result.exit_code == 1, output
    line = [l for l in output.splitlines() if l.startswith("edgetool: error:")]
    assert len(line) == 1 and "features.1.body.3" in line[0]
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == ["tiny.failed-report.json"]
    report = json.loads((out.parent / "tiny.failed-report.json").read_text())
    assert report["passed"] is False and report["worst_layer"] == "features.1.body.3"
    # Only that layer fails per layer (each sees the adapted input); the ONNX structure is still identical.
    assert [l["name"] for l in report["layers"] if not l["passed"]] == ["features.1.body.3"]
    assert report["graph_identical"] is True

    # Fixed, the next run exports and removes the stale failure report.
    monkeypatch.undo()
    result, output = _invoke(["fuse-export", str(tiny_run), "--out", str(out)])
    assert result.exit_code == 0, output
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]


def test_unmergeable_run_is_refused_with_one_line(tiny_run, tmp_path, monkeypatch):
    from toolchain.methods.ttlora import TTLoRA

    monkeypatch.setattr(TTLoRA, "mergeable", False)
    result, output = _invoke(["fuse-export", str(tiny_run), "--out", str(tmp_path / "eng")])
    assert result.exit_code == 2
    assert output.count("edgetool: error:") == 1 and "inference cost" in output
    assert not (tmp_path / "eng").exists()


def test_non_finite_adapter_is_refused_naming_the_weight(tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    payload = torch.load(run / "adapter.pt", weights_only=True)
    key = next(k for k, v in payload["state"].items() if v.is_floating_point())
    payload["state"][key].view(-1)[0] = float("nan")  # a diverged adaptation
    torch.save(payload, run / "adapter.pt")
    out = tmp_path / "eng"
    result, output = _invoke(["fuse-export", str(run), "--out", str(out)])
    assert result.exit_code == 2, output
    line = [l for l in output.splitlines() if l.startswith("edgetool: error:")]
    assert len(line) == 1 and "NaN or inf" in line[0] and str(run / "adapter.pt") in line[0]
    assert not out.exists() and not (tmp_path / "eng.failed-report.json").exists()


def test_not_a_run_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "missing", tmp_path / "empty"):
        result, output = _invoke(["fuse-export", str(target), "--out", str(tmp_path / "eng")])
        assert result.exit_code == 2 and output.count("edgetool: error:") == 1
        assert str(target) in output


def test_checkpoint_of_another_architecture(tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run", model={"arch": "mobilenet1d"})
    result, output = _invoke(["fuse-export", str(run), "--out", str(tmp_path / "eng")])
    assert result.exit_code == 2 and output.count("edgetool: error:") == 1
    assert "does not fit this model architecture" in output


def test_base_checkpoint_changed_since_adaptation(tiny_run, tmp_path):
    original = yaml.safe_load((Path(tiny_run) / "recipe.yaml").read_text())["model"]["checkpoint"]
    ckpt = torch.load(Path(tiny_run) / original, weights_only=True)  # recorded relative to the run directory
    key = next(iter(ckpt["state_dict"]))
    ckpt["state_dict"][key] = ckpt["state_dict"][key] + 0.01
    torch.save(ckpt, tmp_path / "other.pt")
    run = _copy_run(tiny_run, tmp_path / "run", model={"checkpoint": str(tmp_path / "other.pt")})
    result, output = _invoke(["fuse-export", str(run), "--out", str(tmp_path / "eng")])
    assert result.exit_code == 2 and "changed since this run was adapted" in output


def test_unwritable_or_unsafe_output(tiny_run, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    for out, expect in ((tmp_path / "a-file" / "eng", "cannot create output directory"),
                        (keep, "is not an edgetool export"),
                        (Path(tiny_run), "would replace the run directory"),
                        (Path(tiny_run).parent, "would replace the run directory")):
        result, output = _invoke(["fuse-export", str(tiny_run), "--out", str(out)])
        assert result.exit_code == 2, output
        assert output.count("edgetool: error:") == 1 and expect in output
    assert (keep / "notes.txt").read_text() == "mine"


def test_default_output_dir_is_engines_run_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "my-run"
    run.mkdir(parents=True)
    assert enginedir.check_export_dir(run, None) == tmp_path / "engines" / "my-run"
