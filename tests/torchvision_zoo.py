"""torchvision's classification models as bring-your-own models: the architectures, a recipe factory, and a
small learnable image data set. Used by tests/test_torchvision_zoo.py and benchmarks/zoo.py.

A recipe names the factory `torchvision_zoo:build` with `kwargs: {arch: resnet18, num_classes: 4}` (the tests
directory on sys.path / PYTHONPATH), exactly as a user names `torchvision.models:resnet18` or their own module.

torchvision next to a CPU-only torch: PyPI's torchvision wheel is a CUDA build whose compiled ops (`_C.so`:
nms, roi_align, deform_conv2d) link against torch's CUDA libraries, so they cannot load next to the CPU
build of the same torch version. torchvision then goes on without them (`torchvision.extension._has_ops()`
is False), except that two fake-tensor registrations (`torchvision::nms`, `torchvision::qnms`, in
torchvision/_meta_registrations.py) do not check for that and make `import torchvision` itself fail with
"operator torchvision::nms does not exist". Classification models use none of these ops. `import_torchvision`
declares those two operators' schemas (no kernel) when, and only when, the import fails that way, then
imports again: the models work, and calling nms still fails with torchvision's own "Couldn't load custom C++
ops" error. With torchvision's CPU wheel (PyTorch's CPU index) the import simply succeeds first time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

# Every listed classifier takes 3 x 32 x 32 inputs; the width/size arguments keep the slow ones small
# enough for CI. Each entry: torchvision builder name -> extra builder kwargs.
ARCHS: dict[str, dict] = {
    "resnet18": {},
    "resnext50_32x4d": {},
    "mobilenet_v2": {},
    "mobilenet_v3_small": {},
    "efficientnet_b0": {},
    "shufflenet_v2_x0_5": {},
    "mnasnet0_5": {},
    "regnet_y_400mf": {},
    "squeezenet1_1": {},
    "convnext_tiny": {},
    # Beyond the list: other torchvision classifiers that take a small input.
    "resnet34": {},
    "wide_resnet50_2": {},
    "mobilenet_v3_large": {},
    "efficientnet_v2_s": {},
    "shufflenet_v2_x1_0": {},
    "mnasnet1_0": {},
    "regnet_x_400mf": {},
    "squeezenet1_0": {},
    "densenet121": {},
    "googlenet": {"aux_logits": False, "init_weights": True},
}

# The subset CI runs (tests/test_torchvision_zoo.py): a conv classifier, a state-dict version, squeeze-excite,
# channel shuffles, on the cheapest models (ResNet-18 alone takes about two minutes here). benchmarks/zoo.py
# runs them all.
CI_ARCHS = ("squeezenet1_1", "mnasnet0_5", "mobilenet_v3_small", "shufflenet_v2_x0_5")

_schema_library = None  # keeps the two declared operator schemas alive (a Library is dropped with its last reference)


def import_torchvision():
    """`import torchvision`, also where its compiled ops cannot load next to a CPU torch (see the module docstring)."""
    global _schema_library
    try:
        import torchvision
        return torchvision
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
    # The failed import left half-initialised modules behind: drop them before importing again.
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    _schema_library = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _schema_library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision
    return torchvision


def build(arch: str, num_classes: int = 4, **kwargs) -> torch.nn.Module:
    """torchvision.models.<arch>(weights=None, num_classes=...): random weights, as the recipe's factory."""
    models = import_torchvision().models
    return getattr(models, arch)(weights=None, num_classes=num_classes, **{**ARCHS.get(arch, {}), **kwargs})


def make_images(per_class: int, num_classes: int = 4, size: int = 32, seed: int = 0):
    """`num_classes` classes of 3 x size x size images: class c is a bright stripe at one of four orientations
    (horizontal, vertical, diagonal, anti-diagonal) in colour channel c % 3, at a random position, plus noise.
    Domain 0 is the source; domain 1 the same scenes rotated by 90 degrees and dimmer (a camera mounted
    sideways), so horizontal and vertical stripes swap: adaptation has something to learn."""
    rng = np.random.default_rng(seed)
    X, y, dom = [], [], []
    idx = np.arange(size)
    for d in (0, 1):
        for c in range(num_classes):
            for _ in range(per_class):
                img = rng.normal(0, 0.3, (3, size, size))
                pos = int(rng.integers(4, size - 4))
                kind, channel = c % 4, c % 3
                if kind == 0:
                    img[channel, pos - 2:pos + 2] += 2.0
                elif kind == 1:
                    img[channel, :, pos - 2:pos + 2] += 2.0
                else:
                    cols = idx if kind == 2 else idx[::-1]
                    for w in range(-2, 2):
                        img[channel, idx, np.clip(cols + w + pos - size // 2, 0, size - 1)] += 2.0
                if d == 1:
                    img = 0.8 * np.rot90(img, 1, axes=(1, 2))
                X.append(img)
                y.append(c)
                dom.append(d)
    return np.asarray(X, np.float32), np.asarray(y, np.int64), np.asarray(dom, np.int64)


def write_images(path: Path, per_class: int = 12, num_classes: int = 4, seed: int = 0) -> Path:
    X, y, dom = make_images(per_class, num_classes, seed=seed)
    np.savez(path, X=X, y=y, domain=dom)
    return path


def recipe_dict(arch: str, data: str, checkpoint: str, method: str = "ttlora", num_classes: int = 4,
                name: str | None = None) -> dict:
    """A short recipe: `arch` from random weights pretrained briefly on domain 0 (adapt does it when `checkpoint`
    does not exist; an existing one is taken as given), adapted to domain 1; few timed rounds (the structural
    proof is what the zoo checks; latency on a shared machine is noise). Pretraining matters even this short:
    it sets BatchNorm's statistics, without which some random-weights models (MobileNetV3, MNASNet) output
    logits ~1e-10 apart, ties that FP16 then breaks at random."""
    return {
        "name": name or f"zoo-{arch}-{method}",
        "seed": 0,
        "data": {"format": "npz", "train_path": data, "source_domains": [0], "target_domains": [1],
                 "target_shots": 3, "val_shots": 0},
        "model": {"arch": "factory", "factory": "torchvision_zoo:build", "checkpoint": checkpoint,
                  "kwargs": {"arch": arch, "num_classes": num_classes}},
        # Adam at 3e-4: at 1e-3 a few steps can push every SqueezeNet logit below its ReLU (all zero).
        "pretrain": {"steps": 10, "lr": 0.0003, "batch_size": 8},
        "method": {"name": method, "rank": 2},
        "train": {"steps": 6, "lr": 0.003, "batch_size": 8, "eval_every": 3},
        "fuse": {"random_inputs": 4},
        "verify": {"iterations": 10, "warmup": 2, "batch_sizes": [1], "warmup_seconds": 0, "min_seconds": 0,
                   "unfused_iterations": 5},
    }
