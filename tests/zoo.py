"""The one catalog of conv kinds and backbones the tests run on. Every method, fusion and training test
draws its layers and models from here, so a new kind (or a new backbone) is covered everywhere at once."""

from __future__ import annotations

import torch
from torch import nn

from fixtures_2d import small_cnn
from toolchain.models.backbones import MobileNet1d, ResNet1d

# (conv factory, input shape without batch): every kind the issues name, incl. those PEFT refuses to merge.
CONV_KINDS = {
    "conv1d_bias": (lambda: nn.Conv1d(4, 6, 3, padding=1, bias=True), (4, 16)),
    "conv1d_nobias": (lambda: nn.Conv1d(4, 6, 5, stride=2, padding=2, bias=False), (4, 16)),
    "conv1d_dilated": (lambda: nn.Conv1d(4, 6, 3, padding=2, dilation=2, bias=True), (4, 16)),
    "conv1d_reflect": (lambda: nn.Conv1d(4, 6, 3, padding=1, padding_mode="reflect", bias=False), (4, 16)),
    "conv1d_grouped": (lambda: nn.Conv1d(4, 8, 3, padding=1, groups=2, bias=True), (4, 16)),
    "conv1d_depthwise": (lambda: nn.Conv1d(4, 4, 5, padding=2, groups=4, bias=False), (4, 16)),
    "conv1d_pointwise": (lambda: nn.Conv1d(4, 6, 1, bias=True), (4, 16)),
    "conv2d_bias": (lambda: nn.Conv2d(4, 6, 3, padding=1, bias=True), (4, 8, 8)),
    "conv2d_nobias": (lambda: nn.Conv2d(4, 6, (3, 1), stride=(2, 1), bias=False), (4, 8, 8)),
    "conv2d_replicate": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="replicate", bias=True), (4, 8, 8)),
    "conv2d_circular_strided": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="circular", bias=False),
                                (4, 8, 8)),
    "conv2d_grouped": (lambda: nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=False), (4, 8, 8)),
    "conv2d_depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=True), (4, 8, 8)),
}


def conv(kind: str) -> nn.Module:
    return CONV_KINDS[kind][0]()


def with_padding_mode(c: nn.Module, padding_mode: str) -> nn.Module:
    """`c` with another padding mode (a conv without padding is the same in every mode)."""
    c.padding_mode = padding_mode
    return c


def dense_kinds() -> list[str]:
    """Kinds with groups == 1, zero padding and no dilation: what HF PEFT's conv LoRA/DoRA also handles."""
    return [k for k in CONV_KINDS
            if conv(k).groups == 1 and conv(k).padding_mode == "zeros" and all(d == 1 for d in conv(k).dilation)]


def conv_model(kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    """conv -> BN -> ReLU -> pool -> head around one conv of `kind`, with non-trivial BN statistics as after
    pretraining; eval mode. Returns the model and its input shape."""
    make_conv, shape = CONV_KINDS[kind]
    c = make_conv()
    two_d = isinstance(c, nn.Conv2d)
    bn = nn.BatchNorm2d(c.out_channels) if two_d else nn.BatchNorm1d(c.out_channels)
    model = nn.Sequential()
    model.add_module("conv", c)
    model.add_module("bn", bn)
    model.add_module("act", nn.ReLU())
    model.add_module("pool", nn.AdaptiveAvgPool2d(1) if two_d else nn.AdaptiveAvgPool1d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("head", nn.Linear(c.out_channels, 3))
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model.eval(), shape


class ToyConv2dNet(nn.Module):
    """Conv2d net with a depthwise conv (circular padding, stride 2), a grouped dilated conv and biases."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False, padding_mode="circular")
        self.bn2 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 12, 3, padding=2, dilation=2, groups=4, bias=True)
        self.pointwise = nn.Conv2d(12, 16, 1, bias=True)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.stem(x)))
        x = torch.relu(self.bn2(self.depthwise(x)))
        x = torch.relu(self.pointwise(torch.relu(self.grouped(x))))
        return self.classifier(x.mean(dim=(2, 3)))


# name -> (factory, input shape without batch); every backbone has 4 output classes.
BACKBONES = {
    "resnet1d": (lambda: ResNet1d(6, 4, width=8), (6, 50)),
    "mobilenet1d": (lambda: MobileNet1d(6, 4, width=8), (6, 50)),
    "cnn2d": (lambda: small_cnn(in_channels=2, num_classes=4, width=4), (2, 8, 8)),
    "toy_conv2d": (lambda: ToyConv2dNet(3, 4), (3, 12, 12)),
}


def randomise_bn(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial BN statistics and affine parameters, so BN is not an identity in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def backbone(kind: str, seed: int = 0) -> nn.Module:
    """A base of `kind` with non-trivial BatchNorm, in eval mode."""
    torch.manual_seed(seed)
    model = BACKBONES[kind][0]()
    randomise_bn(model)
    return model.eval()


def inputs_for(kind: str, n: int = 5, seed: int = 1) -> torch.Tensor:
    shape = BACKBONES[kind][1] if kind in BACKBONES else CONV_KINDS[kind][1]
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
