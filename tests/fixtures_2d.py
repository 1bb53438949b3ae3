"""A small image CNN and a generated image data set, for the bring-your-own-model tests.

A recipe names the factory as `fixtures_2d:small_cnn` (the tests directory is on sys.path while the
tests run), exactly as a user would name `mypackage.models:build` from their own environment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn


class SmallCNN(nn.Module):
    """Plain Conv2d/BatchNorm2d/Linear: a dense 3x3 conv, a depthwise 3x3 conv, a pointwise conv, a head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3, width: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def small_cnn(in_channels: int = 1, num_classes: int = 3, width: int = 4) -> nn.Module:
    return SmallCNN(in_channels, num_classes, width)


def not_a_module(**_):
    return "not a model"


def make_images(per_class: int, domains: tuple[int, ...], seed: int = 0, size: int = 8):
    """Three classes of 1-channel size x size images (a horizontal bar, a vertical bar, the diagonal)
    plus noise; domain d > 0 sees the same scenes with a contrast/brightness change (another camera)."""
    rng = np.random.default_rng(seed)
    X, y, dom = [], [], []
    for d in domains:
        for c in range(3):
            for _ in range(per_class):
                img = rng.normal(0, 0.3, (size, size))
                pos = rng.integers(1, size - 1)
                if c == 0:
                    img[pos] += 2.0
                elif c == 1:
                    img[:, pos] += 2.0
                else:
                    img[np.arange(size), np.arange(size)] += 2.0
                if d > 0:
                    img = -0.7 * img + 0.5 * d
                X.append(img[None])
                y.append(c)
                dom.append(d)
    return np.asarray(X, np.float32), np.asarray(y, np.int64), np.asarray(dom, np.int64)


def write_image_npz(path: Path, per_class: int = 8, seed: int = 0) -> Path:
    X, y, dom = make_images(per_class, (0, 1), seed)
    np.savez(path, X=X, y=y, domain=dom)
    return path


class VersionedCNN(SmallCNN):
    """SmallCNN whose state-dict loader needs the version its state was saved at, as torchvision's MNASNet's
    does ("version should be set to 1 or 2 instead of None"): a state without its metadata cannot load."""

    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        version = local_metadata.get("version")
        if version != 2:
            raise ValueError(f"version should be set to 2 instead of {version}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def versioned_cnn(in_channels: int = 1, num_classes: int = 3, width: int = 4) -> nn.Module:
    return VersionedCNN(in_channels, num_classes, width)


class ConvHeadCNN(nn.Module):
    """A classifier that is a 1x1 conv followed by ReLU and pooling, as SqueezeNet's `classifier.1`: no nn.Linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3, width: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Conv2d(2 * width, num_classes, 1), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return self.classifier(self.features(x)).flatten(1)


def conv_head_cnn(in_channels: int = 1, num_classes: int = 3, width: int = 4) -> nn.Module:
    return ConvHeadCNN(in_channels, num_classes, width)
