"""Every adaptation method: what trains, step-0 identity, adapter-state round trips, the adapter's refusal
to fuse, and GaLore's projection (fusion equivalence is tested in test_fuse.py)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from toolchain.errors import EdgetoolError, NotMergeableError
from toolchain.methods.base import AdapterLayer
from toolchain.methods.registry import get_method
from toolchain.methods.settings import method_settings
from toolchain.methods.galore import GaLoreOptimizer, orthogonal_basis, project, project_back
from toolchain.models.backbones import CONV_TYPES, find_head
from toolchain.recipe import OptimConfig
import zoo

RANK = 2




# name in tests -> MethodConfig fields
METHODS = {
    "full": {"name": "full"},
    "head": {"name": "head"},
    "bn": {"name": "bn"},
    "bias": {"name": "bias"},
    "lora": {"name": "lora", "rank": RANK, "alpha": 3.0},
    "dora": {"name": "dora", "rank": RANK},
    "galore": {"name": "galore", "rank": RANK, "update_proj_gap": 2},
    "adapter": {"name": "adapter", "adapter_reduction": 2},
    "adapter_linear": {"name": "adapter", "adapter_reduction": 2, "adapter_kind": "linear"},
    "ttlora": {"name": "ttlora", "rank": RANK},
}
ZERO_INIT = ["lora", "dora", "adapter", "adapter_linear", "ttlora"]


def mobilenet() -> tuple[nn.Module, torch.Tensor]:
    return zoo.backbone("mobilenet1d"), zoo.inputs_for("mobilenet1d", 4)


def toy2d() -> tuple[nn.Module, torch.Tensor]:
    return zoo.backbone("toy_conv2d"), zoo.inputs_for("toy_conv2d", 4)


BACKBONES = {"mobilenet1d": mobilenet, "toy_conv2d": toy2d}


def injected(method_key: str, backbone: str, train_head: bool | None = None):
    model, x = BACKBONES[backbone]()
    method = get_method(method_settings(**METHODS[method_key]))
    head_name, _ = find_head(model)
    method.inject(model, head_name, train_head=train_head)
    return model, method, x, head_name


def train_a_little(model: nn.Module, method, x: torch.Tensor, steps: int = 3) -> None:
    """A few optimizer steps with a large learning rate, then random noise on the trainable parameters,
    so every update (B, magnitude, adapter up-projection...) is clearly non-zero."""
    opt = method.build_optimizer(model, OptimConfig(lr=0.05))
    target = torch.randn(x.shape[0], model(x).shape[1], generator=torch.Generator().manual_seed(3))
    for _ in range(steps):
        method.set_train_mode(model)
        loss = (model(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for _, p in method.trainable_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    model.eval()


# ------------------------------------------------------------------------------------------------ trainable sets

def _convs(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CONV_TYPES)}


def expected_trainable(method_key: str, model: nn.Module, head_name: str) -> dict[str, int]:
    """Parameter name -> element count each method claims to train, derived from the base model alone."""
    params = dict(model.named_parameters())
    convs = _convs(model)
    head = {f"{head_name}.{k}": v.numel() for k, v in model.get_submodule(head_name).named_parameters()}
    if method_key in ("full", "galore"):
        return {n: p.numel() for n, p in params.items()}
    if method_key == "head":
        return head
    if method_key == "bn":
        return {f"{n}.{k}": p.numel() for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for k, p in m.named_parameters()}
    if method_key == "bias":  # conv/linear biases and BatchNorm beta
        return {n: p.numel() for n, p in params.items() if n.split(".")[-1] == "bias"}
    out: dict[str, int] = {}
    for n, c in convs.items():
        taps = math.prod(c.kernel_size)
        cin_g, cout_g, g = c.in_channels // c.groups, c.out_channels // c.groups, c.groups
        if method_key in ("lora", "dora"):
            r = min(RANK, cout_g, cin_g * taps)  # per-group rank, capped
            out[f"{n}.lora_A.weight"] = r * g * cin_g * taps
            out[f"{n}.lora_B.weight"] = c.out_channels * r
            if method_key == "dora":
                out[f"{n}.magnitude"] = c.out_channels
        elif method_key == "ttlora":
            out[f"{n}.g1"] = c.out_channels * min(RANK, c.out_channels, cin_g * taps)
        elif method_key.startswith("adapter"):
            if method_key == "adapter_linear" and c.groups != 1:
                continue
            b = max(1, c.out_channels // METHODS[method_key]["adapter_reduction"])
            out[f"{n}.down.weight"] = b * c.out_channels
            out[f"{n}.up.weight"] = c.out_channels * b
    return out


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("method_key", sorted(METHODS))
def test_trainable_set_is_exactly_what_the_method_claims(method_key, backbone):
    base, _ = BACKBONES[backbone]()
    head_name, _ = find_head(base)
    expected = expected_trainable(method_key, base, head_name)
    model, method, _, _ = injected(method_key, backbone)
    got = {n: p.numel() for n, p in method.trainable_parameters(model)}
    assert got == expected
    # requires_grad is the single source of truth: nothing else trains
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(expected)


@pytest.mark.parametrize("method_key", ["lora", "dora", "adapter", "ttlora", "bn"])
def test_train_head_adds_exactly_the_classifier(method_key):
    base, _ = mobilenet()
    head_name, _ = find_head(base)
    expected = expected_trainable(method_key, base, head_name) | expected_trainable("head", base, head_name)
    model, method, _, _ = injected(method_key, "mobilenet1d", train_head=True)
    assert {n: p.numel() for n, p in method.trainable_parameters(model)} == expected


def test_galore_projects_the_selected_conv_weights_only():
    model, method, _, _ = injected("galore", "mobilenet1d")
    assert method.projected_parameter_names(model) == [f"{n}.weight" for n in _convs(model)]
    opt = method.build_optimizer(model, OptimConfig())
    projected = [g for g in opt.param_groups if "rank" in g]
    assert len(projected) == 1 and sum(p.numel() for p in projected[0]["params"]) == sum(
        c.weight.numel() for c in _convs(model).values())
    # pointwise selection: the depthwise and the stem convs train unprojected
    model, _ = mobilenet()
    method = get_method(method_settings(name="galore", layers="pointwise"))
    method.inject(model, "classifier")
    names = method.projected_parameter_names(model)
    assert names and all(model.get_submodule(n.rsplit(".", 1)[0]).groups == 1 for n in names)
    assert "features.0.block.3.weight" not in names  # a depthwise conv


def test_linear_adapter_skips_grouped_convs_and_refuses_an_all_grouped_selection():
    model, method, _, _ = injected("adapter_linear", "toy_conv2d")
    assert method.skipped_layers == ["depthwise", "grouped"]
    assert isinstance(model.pointwise, AdapterLayer) and not isinstance(model.depthwise, AdapterLayer)
    model, _ = toy2d()
    method = get_method(method_settings(name="adapter", adapter_kind="linear", layers=["depthwise"]))
    with pytest.raises(EdgetoolError, match="groups=1"):
        method.inject(model, "classifier")


# ------------------------------------------------------------------------------------------------ step 0

@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("method_key", ZERO_INIT)
def test_zero_init_methods_leave_the_output_unchanged_at_step_0(method_key, backbone):
    base, x = BACKBONES[backbone]()
    with torch.no_grad():
        before = base(x)
    model, _, _, _ = injected(method_key, backbone)
    with torch.no_grad():
        after = model.eval()(x)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ fusion flags


def test_mergeable_flags_are_honest():
    from toolchain.methods.adapter import Adapter

    assert Adapter.mergeable is False  # the default kind, before any recipe is seen
    assert get_method(method_settings(name="adapter")).mergeable is False
    assert get_method(method_settings(name="adapter", adapter_kind="linear")).mergeable is True
    for name in ("full", "head", "bn", "bias", "lora", "dora", "galore", "ttlora"):
        assert get_method(method_settings(name=name)).mergeable is True


def test_dora_survives_an_all_zero_output_channel():
    from toolchain.methods.dora import DoRAConv

    conv = nn.Conv1d(4, 3, 3, padding=1)
    with torch.no_grad():
        conv.weight[1] = 0  # a pruned channel: ||W||_c = 0
    layer = DoRAConv(conv, rank=2)
    x = torch.randn(2, 4, 10)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x))
        assert torch.isfinite(layer.merged_weight()).all()


def test_nonlinear_adapter_refuses_to_merge_with_the_inference_cost():
    model, method, x, _ = injected("adapter", "mobilenet1d")
    assert method.mergeable is False
    train_a_little(model, method, x)
    with pytest.raises(NotMergeableError, match="inference cost"):
        method.merge(model)
    layer = next(m for m in model.modules() if isinstance(m, AdapterLayer))
    assert layer.mergeable is False
    with pytest.raises(NotMergeableError):
        layer.merge()
    # unload still gives the base model back
    base, _ = mobilenet()
    torch.testing.assert_close(method.unload(model)(x), base(x))


# ------------------------------------------------------------------------------------------------ adapter state

@pytest.mark.parametrize("method_key", sorted(METHODS))
def test_adapter_state_round_trips(method_key):
    model, method, x, _ = injected(method_key, "toy_conv2d")
    train_a_little(model, method, x)
    state = method.adapter_state(model)
    assert set(state) >= {n for n, _ in method.trainable_parameters(model)}
    fresh, fresh_method, _, _ = injected(method_key, "toy_conv2d")
    fresh_method.load_adapter_state(fresh, state)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x), rtol=0, atol=0)
    with pytest.raises(EdgetoolError, match="does not fit"):
        fresh_method.load_adapter_state(fresh, {**state, "not.a.key": torch.zeros(1)})


# ------------------------------------------------------------------------------------------------ galore optimizer

def _top_singular_space(g: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """Projector onto the top-r right (row) or left (column) singular subspace of g, from a float64 SVD."""
    U, _, Vh = torch.linalg.svd(g.double(), full_matrices=False)
    basis = Vh[:rank].T if side == "right" else U[:, :rank]
    return basis @ basis.T


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("shape", [(12, 5), (4, 6, 3)], ids=["linear_2d", "conv1d_weight"])
def test_galore_update_lies_in_the_rank_r_gradient_subspace(shape, kind):
    torch.manual_seed(0)
    rank = 2
    weight = nn.Parameter(torch.randn(shape))
    start = weight.detach().clone()
    opt = GaLoreOptimizer([{"params": [weight], "rank": rank, "update_proj_gap": 10, "scale": 0.5}], kind=kind, lr=0.1,
                          weight_decay=0.0)
    grad = torch.randn(shape)
    weight.grad = grad.clone()
    opt.step()
    update = (weight.detach() - start).reshape(shape[0], -1).double()
    matrix = grad.reshape(shape[0], -1)
    side = "right" if matrix.shape[0] >= matrix.shape[1] else "left"  # the smaller side
    assert opt.state[weight]["side"] == side
    assert torch.linalg.matrix_rank(update, rtol=1e-4).item() == rank < min(matrix.shape)  # float32 round-off aside
    proj = _top_singular_space(matrix, rank, side)
    inside = update @ proj if side == "right" else proj @ update
    torch.testing.assert_close(inside, update, rtol=0, atol=1e-6)
    assert update.abs().max() > 1e-3
    # optimizer state is low rank: the moments have the projected shape
    low_shape = (matrix.shape[0], rank) if side == "right" else (rank, matrix.shape[1])
    moment = opt.state[weight]["momentum_buffer" if kind == "sgd" else "exp_avg"]
    assert tuple(moment.shape) == low_shape


def test_galore_refreshes_the_projection_every_update_proj_gap_steps():
    torch.manual_seed(0)
    gap, rank = 3, 2
    weight = nn.Parameter(torch.randn(6, 4, 3))
    opt = GaLoreOptimizer([{"params": [weight], "rank": rank, "update_proj_gap": gap, "scale": 1.0}], lr=0.01)
    bases, grads = [], []
    for _ in range(7):
        before = weight.detach().clone()
        grads.append(torch.randn(weight.shape))
        weight.grad = grads[-1].clone()
        opt.step()
        ortho = opt.state[weight]["ortho"].clone()
        bases.append(ortho)
        # every step's update stays inside the current projection's subspace
        update = (weight.detach() - before).reshape(6, -1).double()
        proj = ortho.double() @ ortho.double().T  # 'left': ortho is (m, r)
        torch.testing.assert_close(proj @ update, update, rtol=0, atol=1e-6)
    assert opt.state[weight]["refreshes"] == 3  # steps 1, 4, 7 (state step 0, 3, 6)
    changed = [i for i in range(1, 7) if not torch.equal(bases[i], bases[i - 1])]
    assert changed == [3, 6]
    for i in (0, 3, 6):  # each refresh takes the SVD of that step's gradient
        torch.testing.assert_close(bases[i].double() @ bases[i].double().T,
                                   _top_singular_space(grads[i].reshape(6, -1), rank, "left"), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind,torch_cls,kw", [("adam", torch.optim.Adam, {}), ("adamw", torch.optim.AdamW, {}),
                                                ("sgd", torch.optim.SGD, {"momentum": 0.9})])
def test_galore_unprojected_group_matches_torch(kind, torch_cls, kw):
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(5, 3))
    b = nn.Parameter(a.detach().clone())
    ours = GaLoreOptimizer([a], kind=kind, lr=0.01, weight_decay=0.1)
    ref = torch_cls([b], lr=0.01, weight_decay=0.1, **kw)
    for _ in range(4):
        g = torch.randn(5, 3)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


def _galore_torch_projector():
    """galore_torch's GaLoreProjector, loaded from its file: the package's __init__ imports
    transformers and bitsandbytes, which the projector itself does not need."""
    spec = importlib.util.find_spec("galore_torch")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("galore-torch is not installed (optional reference for the GaLore cross-check)")
    path = Path(next(iter(spec.submodule_search_locations))) / "galore_projector.py"
    if not path.is_file():
        pytest.skip(f"galore-torch has no galore_projector.py at {path}")
    module_spec = importlib.util.spec_from_file_location("galore_torch_projector_reference", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.GaLoreProjector


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (6, 6)])
def test_galore_projection_matches_galore_torch_reference(shape):
    GaLoreProjector = _galore_torch_projector()
    torch.manual_seed(0)
    rank, scale = 2, 0.25
    reference = GaLoreProjector(rank, update_proj_gap=3, scale=scale, proj_type="std")
    grad = torch.randn(shape)
    low_ref = reference.project(grad, 0)
    side, ortho = orthogonal_basis(grad, rank)
    low = project(grad, side, ortho)
    torch.testing.assert_close(low, low_ref)
    update = torch.randn_like(low)
    torch.testing.assert_close(project_back(update, side, ortho) * scale, reference.project_back(update))
    # a later step within the gap reuses the projection in both
    grad2 = torch.randn(shape)
    torch.testing.assert_close(project(grad2, side, ortho), reference.project(grad2, 1))
