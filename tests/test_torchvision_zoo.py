"""The model zoo in CI: torchvision classifiers (random weights, 3 x 32 x 32 images, 4 classes) through
adapt -> fuse-export -> verify --engine onnxruntime from the CLI, as a user brings them. CI runs the subset
torchvision_zoo.CI_ARCHS (a conv classifier, a state-dict version, squeeze-excite, channel shuffles);
benchmarks/zoo.py runs every architecture and the README lists which pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import adapt_fuse_verify, import_test_dependency

torchvision = import_test_dependency("torchvision", "torchvision", "torchvision's classifiers are the model zoo")

import torchvision_zoo  # noqa: E402


def run_zoo(tmp_path: Path, arch: str, method: str = "ttlora", checkpoint: str = "base.pt") -> dict:
    data = torchvision_zoo.write_images(tmp_path / "images.npz")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(torchvision_zoo.recipe_dict(arch, data.name, checkpoint, method)))
    report = adapt_fuse_verify(recipe, tmp_path, "torchvision_zoo")
    assert len([c for c in report["checks"] if c["name"].startswith("structure.")]) == 4
    assert report["argmax_agreement"] == 1.0
    return report


# The cheapest in every CI job (the min-versions job included); the rest of the subset in `make test`.
@pytest.mark.parametrize("arch", [pytest.param(a, marks=() if a == "squeezenet1_1" else pytest.mark.slow)
                                  for a in torchvision_zoo.CI_ARCHS])
def test_torchvision_classifier_adapts_fuses_and_verifies(tmp_path, arch):
    run_zoo(tmp_path, arch)


@pytest.mark.slow
def test_mnasnet_users_own_state_dict_goes_through_every_stage(tmp_path):
    """The issue's case: MNASNet's loader needs the state-dict version, and fuse-export exited 3 on a user's
    torch.save(model.state_dict()). The user's weights here: the base edgetool pretrained (whose checkpoint must
    keep the metadata too, or plain PyTorch could not load it), saved as a user would."""
    (tmp_path / "pretrained").mkdir()
    run_zoo(tmp_path / "pretrained", "mnasnet0_5")
    ckpt = torch.load(tmp_path / "pretrained" / "base.pt", map_location="cpu", weights_only=True)
    model = torchvision_zoo.build("mnasnet0_5")
    model.load_state_dict(ckpt["state_dict"])
    torch.save(model.state_dict(), tmp_path / "user.pt")
    run_zoo(tmp_path, "mnasnet0_5", checkpoint=str(tmp_path / "user.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_squeezenet_with_other_fusable_methods(tmp_path, method):
    run_zoo(tmp_path, "squeezenet1_1", method)


def test_every_listed_architecture_builds_for_small_inputs():
    """What benchmarks/zoo.py runs: each builder takes 3 x 32 x 32 and scores 4 classes."""
    x = torch.randn(2, 3, 32, 32)
    for arch in torchvision_zoo.ARCHS:
        with torch.no_grad():
            assert torchvision_zoo.build(arch).eval()(x).shape == (2, 4), arch
