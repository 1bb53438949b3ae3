"""The lean training step (toolchain/training/lean/): same forward, same gradients, fewer saved bytes.

Every equivalence is against the plain path (the same modules run by stock autograd, TT-LoRA as
W + Delta W); relative error = max |lean - plain| / max |plain|, fp32, bound 1e-5. The memory check is
a deterministic byte count (saved_tensors_hooks, storages once, as fit's meter counts), not a timing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import toolchain.training.lean.functions as lean_functions
import toolchain.training.lean.plan as lean_plan
import toolchain.training.lean.sidepath as lean_sidepath
from toolchain.training.lean import lean_training
from toolchain.training.lean.geometry import ConvGeometry
from toolchain.methods.registry import get_method
from toolchain.methods.settings import settings_for
from toolchain.methods.ttlora import TTLoRAConv
from toolchain.models.backbones import MobileNet1d, ResNet1d, find_head
from toolchain.recipe import OptimConfig
from toolchain.training.fit import SavedActivationMeter

import zoo

TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def randomise_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.randn(m.num_features, generator=g))
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)


def randomise_trainable(model: nn.Module, seed: int = 1) -> None:
    """Zero-initialised updates (G1, LoRA's B, the adapter's up-projection) made non-zero, so every
    gradient path is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def run(model: nn.Module, x: torch.Tensor, lean_on: bool, seed: int = 5):
    """Forward + backward of a fixed random projection of the output: (output, input grad, param grads)."""
    model.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    with lean_training(model, enabled=lean_on):
        y = model(xi)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    (y * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return y.detach(), xi.grad, grads


def assert_same_training(model: nn.Module, x: torch.Tensor) -> None:
    y0, gx0, g0 = run(model, x, lean_on=False)
    y1, gx1, g1 = run(model, x, lean_on=True)
    assert rel(y1, y0) <= TOL
    assert rel(gx1, gx0) <= TOL
    assert g0.keys() == g1.keys() and g0
    for name in g0:
        assert rel(g1[name], g0[name]) <= TOL, name


# ---------------------------------------------------------------------------------------------- TT-LoRA, every conv kind

# The zoo's conv kinds, each rebuilt in every padding mode (zoo.with_padding_mode).
CONVS = {kind: (lambda pm, k=kind: zoo.with_padding_mode(zoo.conv(k), pm)) for kind in zoo.CONV_KINDS}
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


def input_for(conv: nn.Module) -> torch.Tensor:
    shape = (3, conv.in_channels, 17) if isinstance(conv, nn.Conv1d) else (3, conv.in_channels, 9, 8)
    return torch.randn(shape, generator=torch.Generator().manual_seed(2))


def ttlora_block(conv: nn.Module, tail: str, rank: int = 3) -> nn.Module:
    """TTLoRAConv (+ eval BatchNorm + ReLU/ReLU6 in a Sequential, the fused case) with G1 != 0."""
    torch.manual_seed(0)
    layer = TTLoRAConv(conv.requires_grad_(False), rank)
    bn_type = nn.BatchNorm1d if isinstance(conv, nn.Conv1d) else nn.BatchNorm2d
    model = {"alone": lambda: layer,
             "bn": lambda: nn.Sequential(layer, bn_type(conv.out_channels)),
             "bn_relu": lambda: nn.Sequential(layer, bn_type(conv.out_channels), nn.ReLU()),
             "relu6": lambda: nn.Sequential(layer, nn.ReLU6())}[tail]()
    for p in model.parameters():
        p.requires_grad_(False)
    layer.g1.requires_grad_(True)
    randomise_bn(model)
    randomise_trainable(model)
    return model.eval()


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's own note on even kernels, plain path
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("kind", CONVS)
def test_ttlora_gradients_equal_the_dense_formulation(kind, padding_mode, monkeypatch):
    """G1's gradient, the input gradient and the output equal TTLoRAConv's W + Delta W path, for the
    side-output and the saved-input variants and both ways of producing the side output."""
    for side_path in ("separate", "factored", "combined"):
        monkeypatch.setattr(lean_sidepath, "SIDE_PATH", side_path)
        for save_input in (False, True):
            monkeypatch.setattr(lean_plan.Unit, "_save_input", lambda self, shape, s=save_input: s)
            for tail in ("alone", "bn_relu", "relu6"):
                model = ttlora_block(CONVS[kind](padding_mode), tail)
                x = input_for(model.base if tail == "alone" else model[0].base)
                with lean_training(model) as plan:
                    assert plan.treatments  # the lean path really runs
                assert_same_training(model, x)


@pytest.mark.parametrize("conv, factored", [
    (nn.Conv1d(16, 24, 5, padding=2), True),                  # r1 r2 (C_in + k) = 16 x 21 < 8 x 16 x 5
    (nn.Conv1d(16, 24, 1), False),                            # a 1x1 conv: K is already one small conv
    (nn.Conv1d(16, 16, 5, padding=2, groups=4), False),       # grouped: K runs per group
    (nn.Conv2d(16, 24, 3, padding=1), False),                 # 2-D: three frozen cores
])
def test_factored_side_conv_where_it_is_cheaper(conv, factored):
    """The side output through the cores (1x1 to r1 r2 channels, then G3's taps) is chosen for a Conv1d with
    groups = 1 when it takes fewer multiply-adds than the padded K conv, and it equals conv(x, K)."""
    layer = TTLoRAConv(conv, 4)
    k, side = lean_functions.contracted_cores(layer)
    assert (side.pointwise is not None) == factored
    if factored:
        geo = ConvGeometry.of(conv)
        x = torch.randn(3, 16, 40, generator=torch.Generator().manual_seed(0))
        assert rel(side.conv(x, geo, k.shape[0]), geo.conv(x, k, None)) <= TOL


def test_side_output_or_input_whichever_is_smaller():
    """A dense conv keeps the r-channel side output; a depthwise conv, whose side output (r per
    channel) would be larger than its input, keeps the input instead."""
    def largest_saved(model, x):
        params = {p.data_ptr() for p in model.parameters()}
        sizes = []

        def pack(t):
            if t.data_ptr() not in params:  # the frozen weight is the model's own, not an activation
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), lean_training(model):
            model(x)
        return max(sizes)

    dense = ttlora_block(nn.Conv1d(16, 16, 5, padding=2, bias=False), "alone", rank=2)
    x = torch.randn(4, 16, 32)
    assert largest_saved(dense, x) == 4 * 2 * 32  # N x r x L: the side output
    depthwise = ttlora_block(nn.Conv1d(16, 16, 5, padding=2, groups=16, bias=False), "alone", rank=4)
    assert largest_saved(depthwise, x) == x.numel()  # the input, not N x 16*4 x L


# ---------------------------------------------------------------------------------------------- every method, whole models

BACKBONES = {kind: (lambda k=kind: (zoo.BACKBONES[k][0](), zoo.inputs_for(k, 4, seed=3))) for kind in ("resnet1d", "mobilenet1d", "cnn2d")}
METHODS = {
    "ttlora": {"name": "ttlora", "rank": 2},
    "ttlora_bn_stats": {"name": "ttlora", "rank": 2, "bn": "stats"},
    "lora": {"name": "lora", "rank": 2},
    "dora": {"name": "dora", "rank": 2},
    "adapter": {"name": "adapter"},
    "adapter_linear": {"name": "adapter", "adapter_kind": "linear", "layers": "pointwise"},
    "bn": {"name": "bn"},
    "bias": {"name": "bias"},
    "head": {"name": "head"},
    "galore": {"name": "galore", "rank": 2},
    "full": {"name": "full"},
}


def adapted(method_key: str, backbone: str):
    torch.manual_seed(0)
    model, x = BACKBONES[backbone]()
    randomise_bn(model)
    method = get_method(settings_for(METHODS[method_key]["name"], {}, {k: v for k, v in METHODS[method_key].items() if k != "name"}))
    head_name, _ = find_head(model)
    method.inject(model, head_name)
    randomise_trainable(model)
    method.set_train_mode(model)
    return model, method, x


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("method_key", METHODS)
def test_every_method_trains_identically(method_key, backbone):
    """Output, input gradient and every trainable parameter's gradient equal the plain path's; for
    `bn: stats` (BatchNorm in train mode) the running statistics update identically too. The output is
    the plain path's bit for bit (same ops on the same tensors), which is what keeps a rounding-sensitive
    training run (a few shots, Adam from a zero-initialised update) on the plain path's trajectory."""
    model, _, x = adapted(method_key, backbone)
    twin = copy.deepcopy(model)
    assert torch.equal(run(model, x, lean_on=True)[0], run(model, x, lean_on=False)[0])
    assert_same_training(model, x)
    for _ in range(4):  # model ran 4 times (lean, plain, plain, lean): the twin's statistics likewise
        run(twin, x, lean_on=False)
    for (n, a), (_, b) in zip(model.named_buffers(), twin.named_buffers()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), n


# Methods whose trainable parameters sit next to frozen convs and eval BatchNorms, not inside them: the lean
# step runs aten's own backward ops for those layers, so on the CPU in fp32 training is the plain path's bit
# for bit (TT-LoRA's G1 gradient is a different contraction, equal to rounding only).
BIT_EXACT_METHODS = [k for k, v in METHODS.items() if v["name"] not in ("ttlora", "full") and v.get("bn") != "stats"]


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("method_key", BIT_EXACT_METHODS)
def test_frozen_layer_methods_train_bit_for_bit(method_key, backbone):
    model, _, x = adapted(method_key, backbone)
    y0, gx0, g0 = run(model, x, lean_on=False)
    y1, gx1, g1 = run(model, x, lean_on=True)
    assert torch.equal(y1, y0) and torch.equal(gx1, gx0)
    assert g0.keys() == g1.keys() and g0
    for name in g0:
        assert torch.equal(g1[name], g0[name]), name


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("kind", sorted(zoo.CONV_KINDS))
def test_frozen_conv_bn_relu_gradients_are_the_plain_ones_bit_for_bit(kind, padding_mode):
    """Every conv kind in every padding mode, frozen, with a trainable conv bias and BatchNorm shift
    (the `bias` method's case): input and bias gradients equal autograd's exactly."""
    conv = CONVS[kind](padding_mode)
    bn_type = nn.BatchNorm1d if isinstance(conv, nn.Conv1d) else nn.BatchNorm2d
    model = nn.Sequential(conv, bn_type(conv.out_channels), nn.ReLU())
    randomise_bn(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if conv.bias is not None:
        conv.bias.requires_grad_(True)
    model[1].bias.requires_grad_(True)
    x = input_for(conv)
    y0, gx0, g0 = run(model, x, lean_on=False)
    y1, gx1, g1 = run(model, x, lean_on=True)
    assert torch.equal(y1, y0) and torch.equal(gx1, gx0)
    assert g0.keys() == g1.keys() and "1.bias" in g0
    for name in g0:
        assert torch.equal(g1[name], g0[name]), name


def test_lean_changes_nothing_about_the_model():
    """Inside the context the module tree and the state dict (keys, tensors, storage) are the model's
    own; on exit no override is left, so copies, fusion and export see the plain model."""
    model, method, x = adapted("ttlora", "mobilenet1d")
    tree = [(n, type(m)) for n, m in model.named_modules()]
    state = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    with lean_training(model) as plan:
        assert plan.fused and plan.frozen_backbone
        assert [(n, type(m)) for n, m in model.named_modules()] == tree
        inside = model.state_dict()
        assert inside.keys() == state.keys()
        assert all(inside[k].data_ptr() == ptr and torch.equal(inside[k], v) for k, (ptr, v) in state.items())
        model(x).sum().backward()
    assert not [n for n, m in model.named_modules() if "forward" in m.__dict__]
    copy.deepcopy(model)


@pytest.mark.parametrize("method_key", ["ttlora", "lora", "dora", "adapter_linear"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_lean_forward_equals_the_fused_model(method_key, backbone):
    """The forward training runs (lean, gradients on, BatchNorm frozen) equals the fused model's."""
    model, method, x = adapted(method_key, backbone)
    fused = method.merge(model)
    with lean_training(model):
        y = model(x)
    assert y.requires_grad
    with torch.no_grad():
        assert rel(y.detach(), fused(x)) <= TOL


# ---------------------------------------------------------------------------------------------- the memory claim

def saved_bytes(model: nn.Module, method, x: torch.Tensor, y: torch.Tensor, lean_on: bool) -> int:
    """Bytes autograd keeps for backward, counted exactly as fit's SavedActivationMeter counts them."""
    method.set_train_mode(model)
    meter = SavedActivationMeter.for_model(model)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack), lean_training(model, enabled=lean_on):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return meter.bytes


def test_the_meter_counts_activations_not_the_models_own_tensors():
    """An eval BatchNorm's backward keeps its input and the model's running statistics and weight: only the
    input is an activation (the model's tensors are counted once, as parameters and buffers)."""
    bn = nn.BatchNorm1d(8).eval()
    x = torch.randn(4, 8, 16, requires_grad=True)
    meter = SavedActivationMeter.for_model(bn)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        y = bn(x * 2.0)
    y.sum().backward()
    assert meter.bytes == x.numel() * x.element_size()


@pytest.mark.parametrize("arch,width,bound", [("resnet1d", 48, 0.25), ("mobilenet1d", 32, 0.4)])
def test_ttlora_saves_a_fraction_of_full_fine_tuning(arch, width, bound):
    """Batch 32, input 6 x 128, TT-LoRA rank 4 on all convs, bn: frozen: the bytes saved for backward are
    at most `bound` x those of full fine-tuning of the same model; the plain TT-LoRA step saves more than
    full fine-tuning (its W + Delta W makes every conv keep its input)."""
    torch.manual_seed(0)
    base = (ResNet1d if arch == "resnet1d" else MobileNet1d)(6, 4, width=width).eval()
    randomise_bn(base)
    x = torch.randn(32, 6, 128, generator=torch.Generator().manual_seed(0))
    y = torch.arange(32) % 4
    counts = {}
    for name, lean_on in (("full", False), ("ttlora", False), ("ttlora", True)):
        model = copy.deepcopy(base)
        method = get_method(settings_for(name, {'rank': 4, 'bn': "frozen"}, {}))
        method.inject(model, "classifier")
        counts[name, lean_on] = saved_bytes(model, method, x, y, lean_on)
    assert counts["ttlora", False] >= counts["full", False]
    assert counts["ttlora", True] <= bound * counts["full", False], counts


def test_full_fine_tuning_is_untouched():
    """Nothing of a fully trainable model is frozen: the context overrides nothing and the step is
    bit-identical."""
    model, method, x = adapted("full", "resnet1d")
    with lean_training(model) as plan:
        assert not plan.treatments and not plan.fused
        assert not [n for n, m in model.named_modules() if "forward" in m.__dict__]
    y0, gx0, g0 = run(model, x, lean_on=False)
    y1, gx1, g1 = run(model, x, lean_on=True)
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1) and all(torch.equal(g0[n], g1[n]) for n in g0)


# ---------------------------------------------------------------------------------------------- fallbacks and details

def test_no_grad_runs_the_plain_modules_bit_for_bit():
    model, _, x = adapted("ttlora", "resnet1d")
    model.eval()
    with torch.no_grad():
        plain = model(x)
        with lean_training(model):
            leaned = model(x)
    assert torch.equal(plain, leaned)


def test_unknown_modules_and_hooks_are_respected():
    """A Conv1d subclass with its own forward runs as it is; a hook on a conv inside a fusable
    Sequential still fires (the run is not fused) and the result is unchanged."""

    class Doubling(nn.Conv1d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(),
                          Doubling(4, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(), nn.Conv1d(4, 2, 1))
    randomise_bn(model)
    model.eval().requires_grad_(False)
    model[6].bias.requires_grad_(True)
    calls = []
    model[0].register_forward_hook(lambda *_: calls.append(1))
    with lean_training(model) as plan:
        assert "3" not in plan.treatments
        assert ["0", "1", "2"] not in plan.fused and ["4", "5"] in plan.fused
    x = torch.randn(2, 3, 10)
    assert_same_training(model, x)
    assert len(calls) == 2  # the plain and the lean run both called the hook


@pytest.mark.parametrize("inplace", [False, True])
def test_standalone_activations_keep_a_mask_and_respect_inplace(inplace):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 5, 3, padding=1)
            self.act, self.act6 = nn.ReLU(inplace=inplace), nn.ReLU6(inplace=inplace)
            self.out = nn.Conv1d(5, 2, 1)

        def forward(self, x):
            return self.out(self.act6(self.act(self.conv(x)) * 4 - 1))

    model = Net().requires_grad_(False)
    model.out.bias.requires_grad_(True)
    with lean_training(model) as plan:
        assert plan.treatments["act"] == "relu-mask" and plan.treatments["act6"] == "relu6-mask"
        params = {p.data_ptr() for p in model.parameters()}
        dtypes = []

        def pack(t):
            if t.data_ptr() not in params:
                dtypes.append(t.dtype)
            return t

        x = torch.randn(2, 3, 12, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        assert dtypes == [torch.bool, torch.bool]  # two masks; the frozen convs keep no activation
    assert_same_training(model, torch.randn(2, 3, 12) * 3)


def test_cpu_autocast_bf16_step_is_close_to_fp32():
    """Under CPU autocast the lean TT-LoRA step runs its convs in bfloat16, as autocast would, and
    returns float32 gradients for float32 parameters. (The plain TTLoRAConv cannot serve as the
    reference here: its tensordot of cores fails under CPU autocast, so fp32 plain is the reference.)"""
    model, _, x = adapted("ttlora", "mobilenet1d")
    y0, _, g0 = run(model, x, lean_on=False)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), lean_training(model):
        y = model(x)
    assert y.dtype == torch.bfloat16
    (y.float() * torch.randn(y.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
    assert rel(y.detach().float(), y0) < 0.05
    for n, g in g0.items():
        got = dict(model.named_parameters())[n].grad
        assert got.dtype == torch.float32 and rel(got, g) < 0.1, n
    assert_same_training(model, x)  # nothing computed under autocast (cached cores, BN scale) leaks into fp32


def test_fit_trains_the_same_with_less_memory():
    """fit with train.lean_step on and off: the same trained G1 (to float rounding over 6 Adam steps)
    and a fraction of the saved activations."""
    from toolchain.data.formats import Split

    torch.manual_seed(0)
    base = ResNet1d(6, 4, width=8).eval()
    randomise_bn(base)
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randn(24, 6, 32, generator=g).numpy(), (torch.arange(24) % 4).numpy())
    results, g1 = {}, {}
    for lean_on in (False, True):
        from toolchain.training.fit import fit

        model = copy.deepcopy(base)
        method = get_method(settings_for("ttlora", {'rank': 2}, {}))
        method.inject(model, "classifier")
        cfg = OptimConfig(lr=0.01, steps=6, batch_size=8, eval_every=3, lean_step=lean_on)
        results[lean_on] = fit(model, method, split, cfg, seed=0, progress=False)
        g1[lean_on] = torch.cat([p.detach().flatten() for _, p in method.trainable_parameters(model)])
    assert rel(g1[True], g1[False]) < 1e-4
    saved = {k: r.memory_breakdown["saved_activations"] for k, r in results.items()}
    assert saved[True] < 0.5 * saved[False]


# ---------------------------------------------------------------------------------------------- CUDA

CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("kind", ["conv1d_bias", "conv1d_depthwise", "conv2d_circular_strided", "conv2d_grouped"])
def test_cuda_fp32_equals_the_dense_formulation(kind, monkeypatch):
    """On CUDA with TF32 off (TF32 convs/matmuls round to 10 mantissa bits and would hide real errors)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    for side_path in ("combined", "separate", "factored"):
        monkeypatch.setattr(lean_sidepath, "SIDE_PATH", side_path)
        model = ttlora_block(CONVS[kind]("zeros"), "bn_relu").cuda()
        assert_same_training(model, input_for(model[0].base).cuda())


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none on this machine)")
def test_cuda_fp16_autocast_step_with_grad_scaler():
    model, method, x = adapted("ttlora", "mobilenet1d")
    model.cuda()
    x = x.cuda()
    grads = {}
    for lean_on in (False, True):
        model.zero_grad(set_to_none=True)
        scaler = torch.amp.GradScaler("cuda")
        with torch.autocast("cuda", dtype=torch.float16), lean_training(model, enabled=lean_on):
            loss = model(x).float().pow(2).mean()
        scaler.scale(loss).backward()
        grads[lean_on] = {n: p.grad.float() / scaler.get_scale() for n, p in model.named_parameters() if p.grad is not None}
    for n, g in grads[False].items():
        assert torch.isfinite(grads[True][n]).all()
        assert rel(grads[True][n], g) < 0.05, n


class ConvNormActivation(nn.Sequential):
    """A Sequential subclass keeping Sequential's forward, like torchvision's Conv2dNormActivation."""

    def __init__(self, c_in, c_out, k, stride=1, groups=1):
        super().__init__(nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU6())


def test_nested_sequentials_share_the_output_a_depthwise_layer_keeps():
    """An expand unit whose reader (the first unit of the next, nested Sequential) is a TT-LoRA
    depthwise layer that saves its input keeps its output instead of a mask: one tensor, not two."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(ConvNormActivation(4, 8, 1), ConvNormActivation(8, 8, 3, stride=2, groups=8),
                                        nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)))
    randomise_bn(model)
    method = get_method(settings_for("ttlora", {'rank': 4}, {}))
    method.inject(model)
    randomise_trainable(model)
    method.set_train_mode(model)
    x = torch.randn(2, 4, 8, 8)
    params = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append((t.dtype, tuple(t.shape), t.untyped_storage().data_ptr()))
        return t

    with lean_training(model) as plan, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        assert ["0.0.0", "0.0.1", "0.0.2"] in plan.fused and ["0.1.0", "0.1.1", "0.1.2"] in plan.fused
        model(x)
    expand_out = [s for s in saved if s[1] == (2, 8, 8, 8)]
    assert {s[0] for s in expand_out} == {torch.float32}  # no mask of it
    assert len({s[2] for s in expand_out}) == 1  # the expand unit and the depthwise unit keep the same tensor
    assert_same_training(model, x)
