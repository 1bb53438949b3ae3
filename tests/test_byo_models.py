"""Bring-your-own models (issue 17): state dicts keep their metadata wherever they are saved and loaded (a
loader that needs its version, as torchvision's MNASNet's does), a conv classifier (SqueezeNet's
`classifier.1`) is a head wherever an nn.Linear is, grown for new classes too, messages name the model,
and a factory module whose import raises anything is one line. Tiny models from tests/fixtures_2d.py;
torchvision's own models go through the same path in tests/test_torchvision_zoo.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from conftest import adapt_fuse_verify, assert_one_line_error, cli, write_recipe
from toolchain.errors import EdgetoolError
from toolchain.methods.settings import method_settings
from toolchain.models.assembly import build_adapted
from toolchain.models.backbones import extend_head, find_head, model_name
from toolchain.models.checkpoints import load_state, load_state_checked

TESTS = Path(__file__).resolve().parent

# Tiny timing: these tests check the pipeline's exit codes and structure, not speed.
VERIFY = {"iterations": 10, "warmup": 2, "batch_sizes": [1], "warmup_seconds": 0, "min_seconds": 0,
          "unfused_iterations": 5}


@pytest.fixture()
def byo(tmp_path, monkeypatch):
    """make(factory, checkpoint, **data) -> a recipe for fixtures_2d's `factory` on generated 1x8x8 images."""
    monkeypatch.syspath_prepend(str(TESTS))
    from fixtures_2d import write_image_npz

    write_image_npz(tmp_path / "images.npz", per_class=8)

    def make(factory: str, checkpoint: str = "ckpt/base.pt", name: str = "byo", num_classes: int = 3, **data) -> Path:
        raw = {
            "name": name,
            "seed": 0,
            "data": {"format": "npz", "train_path": "images.npz", "source_domains": [0], "target_domains": [1], **data},
            "model": {"arch": "factory", "factory": f"fixtures_2d:{factory}", "checkpoint": checkpoint,
                      "kwargs": {"in_channels": 1, "num_classes": num_classes, "width": 4}},
            "pretrain": {"steps": 15, "lr": 0.01, "batch_size": 8},
            "method": {"name": "ttlora", "rank": 2},
            "train": {"steps": 6, "lr": 0.01, "batch_size": 6, "eval_every": 3},
            "verify": VERIFY,
        }
        return write_recipe(tmp_path / f"{name}.yaml", raw)

    return make




# ---------------------------------------------------------------------------------------------- metadata


def test_versioned_model_pretrains_adapts_fuses_and_verifies(tmp_path, byo):
    """MNASNet's failure: the base checkpoint and the adapter were rebuilt as plain dicts without `_metadata`, so
    a loader that needs its version refused them (fuse-export exited 3)."""
    from fixtures_2d import versioned_cnn

    adapt_fuse_verify(byo("versioned_cnn"), tmp_path, "fixtures_2d")
    # The base checkpoint carries the metadata, so it loads in plain PyTorch too.
    ckpt = torch.load(tmp_path / "ckpt" / "base.pt", map_location="cpu", weights_only=True)
    assert ckpt["state_dict"]._metadata[""] == {"version": 2}
    versioned_cnn().load_state_dict(ckpt["state_dict"])
    # So does the adapter: the metadata of the modules it holds tensors of.
    state = torch.load(tmp_path / "run" / "adapter.pt", map_location="cpu", weights_only=True)["state"]
    assert state._metadata and set(state._metadata) <= {k.rpartition(".")[0] for k in state}


def test_users_state_dict_of_a_versioned_model_goes_through_fuse_export(tmp_path, byo):
    """The issue's case: torch.save(model.state_dict()) as the checkpoint; adapt took it, fuse-export exited 3."""
    from fixtures_2d import versioned_cnn

    torch.manual_seed(0)
    torch.save(versioned_cnn().state_dict(), tmp_path / "user.pt")
    adapt_fuse_verify(byo("versioned_cnn", checkpoint="user.pt"), tmp_path, "fixtures_2d")


def test_a_state_without_metadata_loads_with_the_models_own():
    """Checkpoints written before the metadata was kept (plain dicts) still load."""
    from fixtures_2d import versioned_cnn

    torch.manual_seed(0)
    source = versioned_cnn()
    plain = {k: v.clone() for k, v in source.state_dict().items()}
    with pytest.raises(ValueError, match="version should be set to 2 instead of None"):
        versioned_cnn().load_state_dict(plain)
    target = versioned_cnn()
    load_state_checked(target, plain, "checkpoint")
    torch.testing.assert_close(target.state_dict(), source.state_dict(), atol=0, rtol=0)
    partial = {"fc.bias": torch.ones(3)}
    load_state(target, partial, strict=False)
    assert torch.equal(target.fc.bias, torch.ones(3))


# ---------------------------------------------------------------------------------------------- conv heads


def test_a_conv_classifier_is_found_named_or_refused_with_what_works():
    from fixtures_2d import conv_head_cnn, small_cnn

    model = conv_head_cnn()
    assert find_head(model) == ("classifier.1", model.classifier[1])  # no nn.Linear: the last conv
    assert find_head(model, "classifier.1")[1] is model.classifier[1]
    assert find_head(small_cnn())[0] == "fc"  # a Linear still wins where there is one
    with pytest.raises(EdgetoolError, match=r"'features.1' is a BatchNorm2d, not an nn.Linear, nn.Conv1d or nn.Conv2d"):
        find_head(model, "features.1")
    with pytest.raises(EdgetoolError, match="the model has no module 'head'"):
        find_head(model, "head")


def test_a_conv_head_grows_for_new_classes_keeping_the_source_outputs():
    from fixtures_2d import conv_head_cnn

    torch.manual_seed(0)
    base = conv_head_cnn(num_classes=2).eval()
    with torch.no_grad():
        base.classifier[1].bias.copy_(torch.tensor([0.3, 0.5]))
    grown = conv_head_cnn(num_classes=2).eval()
    grown.load_state_dict(base.state_dict())
    extend_head(grown, "classifier.1", 4)
    head = grown.classifier[1]
    assert isinstance(head, nn.Conv2d) and head.out_channels == 4 and head.kernel_size == (1, 1)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        out, ref = grown(x), base(x)
    torch.testing.assert_close(out[:, :2], ref, atol=1e-6, rtol=0)
    # New channels start at zero weight and the lowest source bias (through the ReLU and the pooling).
    torch.testing.assert_close(out[:, 2:], torch.full((5, 2), 0.3), atol=1e-6, rtol=0)
    grouped = nn.Sequential(nn.Conv2d(4, 2, 1, groups=2))
    with pytest.raises(EdgetoolError, match="cannot grow the grouped conv head '0' \\(groups=2\\)"):
        extend_head(grouped, "0", 4)


@pytest.mark.parametrize("method", [{"name": "ttlora", "rank": 2}, {"name": "head"}], ids=["ttlora", "head"])
def test_methods_train_a_conv_head_and_leave_it_unadapted(method):
    from fixtures_2d import conv_head_cnn

    from toolchain.models.assembly import ModelSpec

    base = conv_head_cnn(num_classes=2).eval()
    spec = ModelSpec((1, 8, 8), ["a", "b", "c"], 2)
    model, m = build_adapted(method_settings(**method), base, "classifier.1", spec)
    trainable = dict(m.trainable_parameters(model))
    assert {"classifier.1.weight", "classifier.1.bias"} <= set(trainable)  # new classes: the head trains
    assert isinstance(model.classifier[1], nn.Conv2d)  # never wrapped by the method


def test_conv_head_model_with_new_classes_end_to_end(tmp_path, byo):
    """SqueezeNet-style head, source classes 0 and 1, target 0, 1 and 2: the conv head grows and everything passes."""
    adapt_fuse_verify(byo("conv_head_cnn", num_classes=2, source_classes=["0", "1"]), tmp_path, "fixtures_2d")
    payload = torch.load(tmp_path / "run" / "adapter.pt", map_location="cpu", weights_only=True)
    assert payload["state"]["classifier.1.weight"].shape == (3, 8, 1, 1) and payload["head"] == "classifier.1"


# ---------------------------------------------------------------------------------------------- messages


def test_pretrain_names_the_model_not_the_word_factory(tmp_path, byo):
    result = cli("pretrain", byo("small_cnn"), "--quiet")
    assert result.exit_code == 0, result.output
    assert "pretrained fixtures_2d:small_cnn on " in result.stdout and "pretrained factory" not in result.stdout


def test_a_factory_module_whose_import_raises_is_one_line(tmp_path, byo, monkeypatch):
    """torchvision's CUDA wheel next to a CPU torch raises RuntimeError on import, not ImportError."""
    (tmp_path / "broken_ext.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = yaml.safe_load(byo("small_cnn").read_text())
    raw["model"]["factory"] = "broken_ext:build"
    result = cli("adapt", write_recipe(tmp_path / "broken.yaml", raw), "--out", tmp_path / "run", "--quiet")
    assert_one_line_error(result, "cannot import module 'broken_ext'", "RuntimeError: operator torchvision::nms")


def test_model_name_is_the_builtin_or_the_factory_with_its_named_arch(tmp_path):
    from toolchain.recipe import ModelConfig

    assert model_name(ModelConfig(arch="mobilenet1d", checkpoint=tmp_path / "c.pt")) == "mobilenet1d"
    cfg = ModelConfig(arch="factory", factory="torchvision_zoo:build", checkpoint=tmp_path / "c.pt",
                      kwargs={"arch": "mnasnet0_5", "num_classes": 4})
    assert model_name(cfg) == "torchvision_zoo:build(arch=mnasnet0_5)"
