"""TT-LoRA (LoRA-Edge): TT-SVD of conv kernels, the zero-initialised G1 core, what trains, the counts,
and the method interface (adapter state save/load, merge)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from toolchain.errors import EdgetoolError
from toolchain.methods.registry import get_method
from toolchain.methods.settings import method_settings
from toolchain.methods.ttlora import TTLoRAConv, tt_contract, tt_svd
from toolchain.models.backbones import CONV_TYPES, MobileNet1d, ResNet1d, find_head
from toolchain.recipe import OptimConfig

import zoo

BACKBONES = ["resnet1d", "mobilenet1d", "cnn2d"]


def base_model(kind: str, seed: int = 0) -> nn.Module:
    return zoo.backbone(kind, seed)


def x_for(kind: str, n: int = 5, seed: int = 1) -> torch.Tensor:
    return zoo.inputs_for(kind, n, seed)


def ttlora(rank: int = 2, **fields):
    return get_method(method_settings(name="ttlora", rank=rank, **fields))


def first_tt_rank(conv: nn.Module, rank: int) -> int:
    """TT rank r1 of the first unfolding (C_out x rest), capped at the recipe's rank."""
    w = conv.weight
    return min(rank, w.shape[0], w[0].numel())


# ---------------------------------------------------------------------------------------------- TT-SVD

KERNELS = {kind: make for kind, (make, _) in zoo.CONV_KINDS.items()}


@pytest.mark.parametrize("kind", KERNELS)
def test_full_rank_tt_svd_reproduces_the_kernel(kind):
    torch.manual_seed(0)
    W = KERNELS[kind]().weight.detach()
    cores = tt_svd(W, max_rank=10_000)
    assert len(cores) == W.dim()
    assert cores[0].shape[:2] == (1, W.shape[0])  # output side first
    assert [c.shape[1] for c in cores] == list(W.shape)
    assert all(c.dtype == torch.float64 for c in cores)
    torch.testing.assert_close(tt_contract(cores), W.double(), atol=1e-12, rtol=1e-10)


def test_truncated_tt_svd_core_shapes():
    W = torch.randn(32, 16, 5, dtype=torch.float64)
    cores = tt_svd(W, max_rank=3)
    assert [tuple(c.shape) for c in cores] == [(1, 32, 3), (3, 16, 3), (3, 5, 1)]
    W2 = torch.randn(32, 16, 3, 3, dtype=torch.float64)
    assert [tuple(c.shape) for c in tt_svd(W2, 2)] == [(1, 32, 2), (2, 16, 2), (2, 3, 2), (2, 3, 1)]
    # Ranks never exceed what the unfolding allows (depthwise kernel: C_in/groups = 1).
    Wd = torch.randn(8, 1, 5, dtype=torch.float64)
    assert [tuple(c.shape) for c in tt_svd(Wd, 8)] == [(1, 8, 5), (5, 1, 5), (5, 5, 1)]
    # Truncation is an approximation whose error shrinks with the rank (Eckart-Young on the first unfolding).
    errs = [torch.linalg.norm(tt_contract(tt_svd(W, r)) - W).item() for r in (1, 3, 8, 32)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-10 < errs[0]


@pytest.mark.parametrize("kind", KERNELS)
def test_ttlora_layer_shapes_and_frozen_cores(kind):
    torch.manual_seed(0)
    conv = KERNELS[kind]()
    layer = TTLoRAConv(conv, rank=3)
    r1 = first_tt_rank(conv, 3)
    assert tuple(layer.g1.shape) == (conv.out_channels, r1)
    assert torch.count_nonzero(layer.g1) == 0  # re-initialised to zero
    assert [n for n, _ in layer.named_parameters()] == ["g1", "base.weight"] + (["base.bias"] if conv.bias is not None else [])
    frozen = layer.frozen_cores()
    assert len(frozen) == conv.weight.dim() - 1 and frozen[0].shape[0] == r1
    assert {n for n, _ in layer.named_buffers()} == {f"g{i}" for i in range(2, conv.weight.dim() + 1)}
    # With G1 put back to the SVD's own first core, the layer's contraction is the rank-3 TT of W:
    # the frozen cores are the right ones, in the right order.
    cores = tt_svd(conv.weight.detach(), 3)
    with torch.no_grad():
        layer.g1.copy_(cores[0][0])
    torch.testing.assert_close(layer.delta_weight(), tt_contract(cores), atol=1e-6, rtol=1e-6)
    assert layer.delta_weight().dtype == torch.float64 and layer.delta_weight().shape == conv.weight.shape


@pytest.mark.parametrize("kind", KERNELS)
def test_full_rank_layer_with_the_svd_core_doubles_the_kernel(kind):
    torch.manual_seed(0)
    conv = KERNELS[kind]()
    layer = TTLoRAConv(conv, rank=10_000)
    with torch.no_grad():
        layer.g1.copy_(tt_svd(conv.weight.detach(), 10_000)[0][0])
    torch.testing.assert_close(layer.delta_weight(), conv.weight.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KERNELS)
def test_layer_forward_is_the_conv_with_the_merged_weight(kind):
    torch.manual_seed(0)
    conv = KERNELS[kind]()
    layer = TTLoRAConv(conv, rank=2)
    with torch.no_grad():
        layer.g1.normal_()
    x = torch.randn(3, conv.in_channels, *([9] * (conv.weight.dim() - 2)))
    expected = conv._conv_forward(x, (conv.weight.double() + layer.delta_weight()).float(), conv.bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(layer(x), conv(x), atol=1e-3)  # the update does change the output


# ---------------------------------------------------------------------------------------------- injection


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("layers", ["all", "pointwise"])
def test_zero_init_adapted_model_equals_the_base_exactly(kind, layers):
    base = base_model(kind)
    head_name, _ = find_head(base)
    adapted = ttlora(rank=3, layers=layers).inject(copy.deepcopy(base), head_name)
    wrapped = [m for m in adapted.modules() if isinstance(m, TTLoRAConv)]
    assert wrapped
    x = x_for(kind)
    with torch.no_grad():
        assert torch.equal(adapted.eval()(x), base(x))


def test_layer_selection_all_pointwise_and_patterns():
    base = base_model("mobilenet1d")
    convs = {n: m for n, m in base.named_modules() if isinstance(m, CONV_TYPES)}
    depthwise = {n for n, m in convs.items() if m.groups > 1}
    pointwise = {n for n, m in convs.items() if m.kernel_size == (1,) and m.groups == 1}
    assert depthwise and pointwise

    def wrapped(**fields):
        model = ttlora(**fields).inject(copy.deepcopy(base), "classifier")
        return {n for n, m in model.named_modules() if isinstance(m, TTLoRAConv)}

    assert wrapped(layers="all") == set(convs)  # depthwise (grouped) convs included
    assert wrapped(layers="pointwise") == pointwise
    assert wrapped(layers=["features.1.*", "stem.0"]) == {n for n in convs if n.startswith("features.1.")} | {"stem.0"}
    with pytest.raises(EdgetoolError, match="method.layers.*matched no Conv1d/Conv2d"):
        wrapped(layers=["nothing.*"])


@pytest.mark.parametrize("kind", BACKBONES)
def test_one_backward_pass_reaches_only_g1(kind):
    base = base_model(kind)
    head_name, _ = find_head(base)
    method = ttlora(rank=2)
    model = method.inject(copy.deepcopy(base), head_name)
    bn_before = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    method.set_train_mode(model)
    loss = nn.functional.cross_entropy(model(x_for(kind, 8)), torch.arange(8) % 4)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    g1 = {n for n, _ in model.named_parameters() if n.endswith(".g1")}
    assert with_grad == g1
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in g1)
    # Frozen cores are buffers (never parameters); BN statistics stay frozen (bn: frozen).
    assert not any(n.rsplit(".", 1)[-1] in {"g2", "g3", "g4"} for n, _ in model.named_parameters())
    for n, b in model.named_buffers():
        if n in bn_before:
            assert torch.equal(b, bn_before[n]), n


def test_an_optimizer_step_changes_g1_only():
    base = base_model("resnet1d")
    method = ttlora(rank=2)
    model = method.inject(copy.deepcopy(base), "classifier")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = method.build_optimizer(model, OptimConfig(lr=0.01))
    method.set_train_mode(model)
    nn.functional.cross_entropy(model(x_for("resnet1d", 8)), torch.arange(8) % 4).backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if k.endswith(".g1")}
    with torch.no_grad():
        assert not torch.allclose(model.eval()(x_for("resnet1d")), base(x_for("resnet1d")))


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("train_head", [False, True])
def test_trainable_count_is_sum_of_c_out_times_r(kind, rank, train_head):
    base = base_model(kind)
    head_name, head = find_head(base)
    expected = sum(m.out_channels * first_tt_rank(m, rank) for m in base.modules() if isinstance(m, CONV_TYPES))
    if train_head:
        expected += head.weight.numel() + head.bias.numel()
    method = ttlora(rank=rank, train_head=train_head)
    model = method.inject(copy.deepcopy(base), head_name)
    assert sum(p.numel() for _, p in method.trainable_parameters(model)) == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


# ---------------------------------------------------------------------------------------------- interface


def trained_like(kind: str, seed: int = 5, **fields):
    """An adapted model whose G1 cores (and head, if trained) hold non-zero values."""
    base = base_model(kind)
    method = ttlora(rank=2, **fields)
    model = method.inject(copy.deepcopy(base), find_head(base)[0])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in method.trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return base, method, model.eval()


@pytest.mark.parametrize("kind", BACKBONES)
def test_adapter_state_round_trip_gives_identical_outputs(kind):
    base, method, model = trained_like(kind, train_head=True)
    state = method.adapter_state(model)
    assert not any(k.endswith("base.weight") for k in state)  # adapter-only: no base conv weights
    assert any(k.endswith(".g1") for k in state) and any(k.endswith(".g2") for k in state)
    head_name = find_head(base)[0]
    assert f"{head_name}.weight" in state
    fresh_method = ttlora(rank=2, train_head=True)
    fresh = fresh_method.inject(copy.deepcopy(base), head_name)
    x = x_for(kind)
    with torch.no_grad():
        assert not torch.equal(fresh.eval()(x), model(x))
        fresh_method.load_adapter_state(fresh, state)
        assert torch.equal(fresh.eval()(x), model(x))
    # The state is a copy: training the model further does not change what was saved.
    key = next(k for k in state if k.endswith(".g1"))
    with torch.no_grad():
        model.get_parameter(key).add_(1.0)
    assert not torch.equal(state[key], method.adapter_state(model)[key])


@pytest.mark.parametrize(
    "other, fields",
    [
        (lambda: MobileNet1d(6, 4, width=8), {}),  # another architecture
        (lambda: ResNet1d(6, 4, width=16), {}),  # same architecture, other width
        (lambda: ResNet1d(6, 4, width=8), {"rank": 3}),  # another rank
        (lambda: ResNet1d(6, 4, width=8), {"layers": "pointwise"}),  # other layers adapted
        (lambda: ResNet1d(6, 4, width=8), {"train_head": True}),  # the adapter lacks the head
    ],
    ids=["mobilenet", "width", "rank", "layers", "head"],
)
def test_adapter_state_refuses_a_model_it_does_not_fit(other, fields):
    _, method, model = trained_like("resnet1d")
    state = method.adapter_state(model)
    target_method = ttlora(**{"rank": 2, **fields})
    target = target_method.inject(other(), "classifier")
    with pytest.raises(EdgetoolError, match="does not fit"):
        target_method.load_adapter_state(target, state)


def test_adapter_state_may_not_overwrite_base_weights():
    base, method, model = trained_like("resnet1d")
    state = method.adapter_state(model)
    state["features.0.body.0.base.weight"] = torch.zeros_like(model.features[0].body[0].base.weight)
    fresh = method.inject(copy.deepcopy(base), "classifier")
    with pytest.raises(EdgetoolError, match="unexpected"):
        method.load_adapter_state(fresh, state)


def test_rank_must_be_positive():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        method_settings(name="ttlora", rank=0)
