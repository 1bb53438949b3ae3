"""LoRA and DoRA conv layers against HF PEFT (the reference implementation) for the same A, B,
magnitude and scaling: delta weight, forward output and merged weight, on Conv1d and Conv2d with
groups=1 and a bias (DoRA must leave the bias unscaled, as PEFT does).

PEFT builds its A conv without the base layer's dilation and padding_mode, so the convs compared
here use the defaults for both (ours honours them; tests/test_methods.py checks that by fusion)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import import_test_dependency

peft = import_test_dependency("peft", "peft", "HF PEFT is the reference for the LoRA/DoRA cross-check")

import zoo  # noqa: E402
from toolchain.methods.dora import DoRAConv  # noqa: E402
from toolchain.methods.lora import LoRAConv  # noqa: E402

RANK, ALPHA = 3, 5.0

# PEFT's conv LoRA/DoRA takes dense, zero-padded, undilated convs: that part of the zoo.
CONVS = {k: zoo.CONV_KINDS[k][0] for k in zoo.dense_kinds()}




class OneConv(nn.Module):
    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _input(conv: nn.Module) -> torch.Tensor:
    shape = (3, conv.in_channels) + (16,) * (conv.weight.dim() - 2)
    return torch.randn(shape, generator=torch.Generator().manual_seed(5))


def _pair(conv_key: str, use_dora: bool):
    """(ours, peft_model, peft_layer) sharing base weights and the same random A, B (and magnitude)."""
    torch.manual_seed(0)
    conv = CONVS[conv_key]()
    ours = (DoRAConv if use_dora else LoRAConv)(copy.deepcopy(conv), RANK, ALPHA)
    config = peft.LoraConfig(target_modules=["conv"], r=RANK, lora_alpha=ALPHA, use_dora=use_dora)
    peft_model = peft.get_peft_model(OneConv(copy.deepcopy(conv)), config)
    layer = peft_model.base_model.model.conv
    assert layer.scaling["default"] == ours.scaling == ALPHA / RANK
    with torch.no_grad():
        # Non-zero B (both start at zero) and a magnitude away from ||W||_c, copied ours -> PEFT.
        ours.lora_B.weight.normal_(0, 0.3)
        ours.lora_A.weight.normal_(0, 0.3)
        assert layer.lora_A["default"].weight.shape == ours.lora_A.weight.shape
        assert layer.lora_B["default"].weight.shape == ours.lora_B.weight.shape
        layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
        layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
        if use_dora:
            ours.magnitude.mul_(1 + 0.5 * torch.rand_like(ours.magnitude))
            ref_mag = layer.lora_magnitude_vector["default"].weight
            assert ref_mag.numel() == ours.magnitude.numel()
            ref_mag.copy_(ours.magnitude.reshape(ref_mag.shape))
    return ours.eval(), peft_model.eval(), layer


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("conv_key", sorted(CONVS))
def test_delta_weight_and_forward_match_peft(conv_key, use_dora):
    ours, peft_model, layer = _pair(conv_key, use_dora)
    ref_delta = layer.get_delta_weight("default").detach().double()
    assert ref_delta.abs().max() > 1e-2
    torch.testing.assert_close(ours.lora_delta_weight(), ref_delta, rtol=1e-5, atol=1e-6)
    if not use_dora:
        torch.testing.assert_close(ours.delta_weight(), ref_delta, rtol=1e-5, atol=1e-6)
    x = _input(ours.base)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("conv_key", sorted(CONVS))
def test_merged_weight_and_bias_match_peft_merge_and_unload(conv_key, use_dora):
    ours, peft_model, _ = _pair(conv_key, use_dora)
    x = _input(ours.base)
    with torch.no_grad():
        adapted_ref = peft_model(x)
    merged_ref = peft_model.merge_and_unload().conv
    assert type(merged_ref) is type(ours.base)
    torch.testing.assert_close(ours.merged_weight(), merged_ref.weight.detach().double(), rtol=1e-5, atol=1e-6)
    fused = ours.merge()
    torch.testing.assert_close(fused.bias, merged_ref.bias)  # the bias is not rescaled by DoRA
    torch.testing.assert_close(fused.bias, ours.base.bias)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), merged_ref(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused(x), adapted_ref, rtol=1e-5, atol=1e-5)


def test_dora_norm_is_detached_like_peft():
    """Same loss, same gradients for A, B and the magnitude: only possible if both treat ||W + s dW||_c
    as a constant in the backward pass."""
    ours, peft_model, layer = _pair("conv2d_bias", use_dora=True)
    ours.train()
    peft_model.train()
    x = _input(ours.base)
    ours(x).pow(2).sum().backward()
    peft_model(x).pow(2).sum().backward()
    ref_mag = layer.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(ours.magnitude.grad, ref_mag.grad.reshape(-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.lora_A.weight.grad, layer.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.lora_B.weight.grad, layer.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-5)


def test_lora_A_init_matches_peft_distribution():
    """PEFT's default init: A kaiming-uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)); B zeros."""
    ours = LoRAConv(nn.Conv1d(16, 32, 7, padding=3), rank=8)
    bound = 1 / (16 * 7) ** 0.5
    a = ours.lora_A.weight
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    assert torch.count_nonzero(ours.lora_B.weight) == 0
