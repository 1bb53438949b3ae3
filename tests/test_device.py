"""Training device and precision: resolving `train.device` / `--device`, refusing what a machine cannot do
(one line, exit 2), fp16/bf16 autocast training, what metrics.json and bench.json record, runs trained
in any precision accepted by fuse-export and verify, and bench's cost ratios to full fine-tuning.

Tests marked "stand-in" replace torch.cuda's answers with a monkeypatch to test a decision function on a
machine without a GPU; they never claim to run CUDA. The `needs_cuda` tests do, and skip without one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, cli, tiny_recipe_dict, write_recipe

from toolchain.artifacts import sha256_file
from toolchain.training import device as devmod
from toolchain.models.assembly import base_fingerprint, build_adapted, load_base_model
from toolchain.data.protocol import load_data
from toolchain.training.device import check_precision, describe_device, resolve_device, training_device
from toolchain.errors import EdgetoolError
from toolchain.recipe import load_recipe
from toolchain.rundir import load_run
from toolchain.stages.adapt import adapt
from toolchain.stages.bench import method_configs, run_bench
from toolchain.training.fit import fit
from toolchain.training.cost import full_step_cost, time_train_steps

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")
no_cuda_here = pytest.mark.skipif(CUDA, reason="this machine has a usable CUDA device")
DEVICE_FIELDS = ("type", "name", "torch", "torch_cuda", "cudnn_allow_tf32", "matmul_allow_tf32", "tf32_in_effect",
                 "precision")


# ---- resolution and refusals ---------------------------------------------------------------------

def test_resolve_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    with pytest.raises(EdgetoolError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("gpu", "train.device")


@no_cuda_here
def test_cuda_refused_without_a_gpu():
    for spec in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(EdgetoolError, match=rf"train.device '{spec}': no CUDA device is usable"):
            resolve_device(spec, "train.device")


def _fake_cuda(monkeypatch, count=1, bf16=True, capability=(7, 5), name="Stand-in GPU"):
    """Stand-in for torch.cuda's answers (decision-function tests only; nothing runs on a GPU)."""
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_cuda_index_out_of_range_refused_stand_in(monkeypatch):
    _fake_cuda(monkeypatch, count=1)
    with pytest.raises(EdgetoolError, match="there is no CUDA device 3 .this machine has 1."):
        resolve_device("cuda:3", "--device")


def test_bf16_refused_on_a_gpu_without_it_stand_in(monkeypatch):
    _fake_cuda(monkeypatch, bf16=False, capability=(7, 5), name="Tesla T4")
    gpu = torch.device("cuda", 0)
    with pytest.raises(EdgetoolError, match=r"'bf16': Tesla T4 \(compute capability 7.5\) has no native bfloat16"):
        check_precision(gpu, "bf16", "train.precision")
    check_precision(gpu, "fp16")  # every CUDA GPU trains in fp16
    _fake_cuda(monkeypatch, bf16=True, capability=(8, 7), name="Orin")
    check_precision(gpu, "bf16")


def test_cpu_precisions():
    """This torch autocasts to fp16 and bf16 on the CPU and has a CPU gradient scaler: both are allowed
    (the fp16 path, scaler included, is then exercised without a GPU)."""
    for precision in ("fp32", "fp16", "bf16"):
        td = training_device("cpu", precision)
        with td.autocast():
            out = torch.nn.functional.conv1d(torch.ones(1, 2, 8), torch.ones(3, 2, 3))
        assert out.dtype == {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        assert td.grad_scaler().is_enabled() == (precision == "fp16")


def test_cpu_precision_refused_where_autocast_cannot(monkeypatch):
    """A torch whose CPU autocast ignores the dtype (older builds warn and compute in fp32) is refused."""
    monkeypatch.setattr(devmod, "_cpu_autocast_works", lambda dtype: False)
    with pytest.raises(EdgetoolError, match="cannot autocast to fp16 on the CPU; use fp32"):
        check_precision(torch.device("cpu"), "fp16", "--precision")


@no_cuda_here
@pytest.mark.parametrize("command", ["adapt", "pretrain", "bench"])
def test_cli_device_cuda_refused_in_one_line(make_recipe, tmp_path, command):
    recipe = make_recipe("nocuda")
    result = cli(command, recipe.source, "--device", "cuda", "--quiet")
    assert_one_line_error(result, "--device 'cuda': no CUDA device is usable")
    assert not (tmp_path / "runs").exists()


def test_cli_bad_device_and_recipe_field(make_recipe, tmp_path):
    recipe = make_recipe("baddev")
    assert_one_line_error(cli("adapt", recipe.source, "--device", "gpu0", "--quiet"), "--device 'gpu0'")
    raw = tiny_recipe_dict(recipe.model.checkpoint, train={"steps": 2, "device": "tpu"})
    path = write_recipe(tmp_path / "tpu.yaml", raw)
    assert_one_line_error(cli("adapt", path, "--quiet"), "field 'train.device'", "expected auto, cpu, cuda or cuda:N")
    raw = tiny_recipe_dict(recipe.model.checkpoint, pretrain={"precision": "fp8"})
    assert_one_line_error(cli("pretrain", write_recipe(tmp_path / "fp8.yaml", raw)), "field 'pretrain.precision'")


@no_cuda_here
def test_recipe_cuda_refused_before_any_work(make_recipe, tmp_path):
    recipe = make_recipe("recipecuda", train={"device": "cuda:1"})
    out = tmp_path / "run"
    assert_one_line_error(cli("adapt", recipe.source, "--out", out, "--quiet"), "train.device 'cuda:1'")
    assert not out.exists()


def test_bench_device_is_shared(make_recipe):
    with pytest.raises(EdgetoolError, match=r"bench.train_overrides.*'precision'.*must be equal for every method"):
        make_recipe("benchdev", bench={"train_overrides": {"lora": {"precision": "bf16"}}})


def test_base_fingerprint_ignores_where_it_trained(make_recipe):
    from toolchain.data.protocol import load_data

    plain = make_recipe("fp")
    data = load_data(plain.data, plain.seed)
    moved = make_recipe("fp", pretrain={"device": "cpu", "precision": "bf16"})
    assert base_fingerprint(plain, data) == base_fingerprint(moved, data)
    assert base_fingerprint(plain, data) != base_fingerprint(make_recipe("fp", pretrain={"lr": 0.02}), data)


# ---- training in fp16 / bf16 on the CPU, and what is recorded --------------------------------------

def test_describe_cpu():
    info = describe_device(torch.device("cpu"))
    assert info["type"] == "cpu" and info["name"] and info["torch"] == torch.__version__
    assert info["torch_cuda"] == torch.version.cuda
    assert info["cudnn_allow_tf32"] == torch.backends.cudnn.allow_tf32
    assert info["tf32_in_effect"] is False  # TF32 is a GPU format


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("arch", ["resnet1d", "mobilenet1d"])
def test_every_method_trains_under_autocast(arch, precision):
    """One fit-style step of every method under CPU autocast: an adapter whose weight arithmetic mixes
    dtypes under autocast (TT-LoRA's core contraction did) fails here, on CUDA it would fail the same way."""
    from toolchain.methods.registry import get_method
    from toolchain.methods.settings import method_names, settings_for
    from toolchain.models.backbones import build_model, find_head
    from toolchain.recipe import ModelConfig, OptimConfig

    torch.manual_seed(0)
    base = build_model(ModelConfig(arch=arch, width=8, checkpoint="unused.pt"), 6, 4)
    head_name, _ = find_head(base, None)
    td = training_device("cpu", precision)
    x, y = torch.randn(4, 6, 100), torch.tensor([0, 1, 2, 3])
    for name in method_names():
        overrides = {"layers": "pointwise"} if name == "adapter" else {}
        model = __import__("copy").deepcopy(base)
        method = get_method(settings_for(name, {}, overrides))
        method.inject(model, head_name)
        opt, scaler = method.build_optimizer(model, OptimConfig()), td.grad_scaler()
        method.set_train_mode(model)
        before = {n: p.detach().clone() for n, p in method.trainable_parameters(model)}
        with td.autocast():
            out = model(x)
            loss = torch.nn.functional.cross_entropy(out, y)
        assert out.dtype == td.autocast().fast_dtype and torch.isfinite(loss), name
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert any(not torch.equal(p, before[n]) for n, p in method.trainable_parameters(model)), name


@pytest.fixture(scope="module")
def precision_runs(tmp_path_factory, tiny_checkpoint) -> dict[str, Path]:
    """The tiny TT-LoRA run trained on the CPU in fp32, fp16 and bf16 (same seed, same batches)."""
    d = tmp_path_factory.mktemp("precision")
    runs = {}
    for precision in ("fp32", "fp16", "bf16"):
        raw = tiny_recipe_dict(tiny_checkpoint, name=f"tiny-{precision}",
                               train={"device": "cpu", "precision": precision})
        runs[precision] = adapt(load_recipe(write_recipe(d / f"{precision}.yaml", raw)), d / precision,
                                progress=False, echo=None)
    return runs


def test_precision_runs_train_and_record(precision_runs):
    states = {}
    for precision, run in precision_runs.items():
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["device"]["precision"] == precision
        assert all(k in metrics["device"] for k in DEVICE_FIELDS), metrics["device"]
        assert metrics["device"]["type"] == "cpu" and metrics["peak_memory_source"] == "tensor-account"
        assert np.isfinite(metrics["f1_after"]) and all(np.isfinite(p["f1"]) for p in metrics["curve"])
        assert metrics["skipped_steps"] >= 0 and (precision == "fp16" or metrics["skipped_steps"] == 0)
        payload = torch.load(run / "adapter.pt", weights_only=True)
        assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in payload["state"].values())
        states[precision] = payload["state"]
    # autocast really changed the arithmetic: the same seed and batches give other weights than fp32
    for precision in ("fp16", "bf16"):
        assert any(not torch.equal(states[precision][k], states["fp32"][k]) for k in states["fp32"]), precision


@no_cuda_here  # tiny_run trains on device auto, which is CUDA where one is usable
def test_fp32_cpu_training_unchanged_by_explicit_settings(precision_runs, tiny_run):
    """train.device: cpu + precision: fp32 is the default path: bit-identical to the tiny_run fixture."""
    a = torch.load(precision_runs["fp32"] / "adapter.pt", weights_only=True)["state"]
    b = torch.load(Path(tiny_run) / "adapter.pt", weights_only=True)["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_fuse_export_accepts_reduced_precision_runs(precision_runs, tmp_path, precision):
    run = load_run(precision_runs[precision])
    assert run.recipe.train.precision == precision
    result = cli("fuse-export", precision_runs[precision], "--out", tmp_path / "eng")
    assert result.exit_code == 0, result.output


def test_fuse_export_accepts_a_run_from_a_gpu_machine(tiny_run, tmp_path):
    """A run directory copied from a GPU machine (its recipe says cuda, fp16) exports on a CPU-only one:
    nothing after training resolves the training device."""
    import shutil

    import yaml

    run = tmp_path / "from-gpu"
    shutil.copytree(tiny_run, run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["train"].update(device="cuda:1", precision="fp16")
    recipe["pretrain"].update(device="cuda", precision="bf16")
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    # As the GPU machine wrote it: its adapter records that recipe's sha256.
    payload = torch.load(run / "adapter.pt", weights_only=True)
    torch.save({**payload, "recipe_sha256": sha256_file(run / "recipe.yaml")}, run / "adapter.pt")
    result = cli("fuse-export", run, "--out", tmp_path / "eng")
    assert result.exit_code == 0, result.output


def test_verify_accepts_an_fp16_trained_run(precision_runs, tmp_path):
    eng = tmp_path / "eng"
    assert cli("fuse-export", precision_runs["fp16"], "--out", eng).exit_code == 0
    result = cli("verify", eng, "--engine", "onnxruntime", "--iterations", "5", "--warmup", "1")
    report = json.loads((eng / "verify_report.json").read_text())
    assert not [c for c in report["failed_checks"] if not c.startswith("latency.")], result.output


# ---- bench: cost ratios to full fine-tuning --------------------------------------------------------

# On the CPU, where peak memory is an exact tensor account (the CUDA allocator's peak also holds
# workspaces that the first user in a process allocates); test_cuda_bench_ratios runs it on a GPU.
TINY_BENCH = {"train": {"steps": 4, "lr": 0.01, "batch_size": 12, "eval_every": 2, "device": "cpu"},
              "bench": {"timing_steps": 2}}


def test_bench_ratio_columns(make_recipe, tmp_path):
    recipe = make_recipe("ratios", **TINY_BENCH)
    out = run_bench(recipe, ["full", "head", "ttlora"], 1, tmp_path / "b", progress=False, echo=None)
    result = json.loads((out / "bench.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    full = rows["full"]
    assert full["step_time_vs_full"] == 1.0 and full["peak_memory_vs_full"] == 1.0
    for r in rows.values():
        assert r["step_time_vs_full"] == pytest.approx(r["wall_seconds_per_step_mean"] / full["wall_seconds_per_step_mean"])
        assert r["peak_memory_vs_full"] == pytest.approx(r["peak_memory_bytes_mean"] / full["peak_memory_bytes_mean"])
    # counted on the CPU: the head alone keeps fewer gradients, moments and saved tensors than full FT
    assert rows["head"]["peak_memory_vs_full"] < 1.0
    meta = result["meta"]
    assert meta["full_reference"]["measured"] == "the full row"
    assert all(k in meta["device"] for k in DEVICE_FIELDS) and meta["device"]["precision"] == "fp32"
    table = (out / "bench.md").read_text()
    assert "| step time vs full | memory vs full |" in table
    assert "| 1.00× | 1.00× |" in next(ln for ln in table.splitlines() if ln.startswith("| full |"))


def test_bench_without_full_measures_the_reference(make_recipe, tmp_path):
    recipe = make_recipe("noref", **TINY_BENCH)
    out = run_bench(recipe, ["head"], 1, tmp_path / "b", progress=False, echo=None)
    result = json.loads((out / "bench.json").read_text())
    ref = result["meta"]["full_reference"]
    assert "separately" in ref["measured"]
    head = result["rows"][0]
    assert head["peak_memory_vs_full"] == pytest.approx(head["peak_memory_bytes_mean"] / ref["peak_memory_bytes"])
    assert head["peak_memory_vs_full"] < 1.0
    # the separate measurement is the same first-step account a benched full row gets
    data = load_data(recipe.data, recipe.seed)
    base, head_name, _ = load_base_model(recipe, data, echo=None)
    mcfg, tcfg = method_configs(recipe, ["full"])["full"]
    model, method = build_adapted(mcfg, base, head_name, data)
    assert fit(model, method, data.target_train, tcfg, recipe.seed, progress=False).peak_memory_bytes == \
        ref["peak_memory_bytes"]
    assert full_step_cost(mcfg, tcfg, base, head_name, data, recipe.seed, 2)["peak_memory_bytes"] == \
        ref["peak_memory_bytes"]


# ---- on a CUDA GPU (skipped here; run on a GPU machine, e.g. benchmarks/cuda_smoke.sh) -------------

@needs_cuda
def test_cuda_fp16_run_is_accepted_by_fuse_export(tiny_checkpoint, tmp_path):
    raw = tiny_recipe_dict(tiny_checkpoint, name="tiny-cuda", train={"device": "cuda", "precision": "fp16"})
    run = adapt(load_recipe(write_recipe(tmp_path / "cuda.yaml", raw)), tmp_path / "run", progress=False, echo=None)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["device"]["type"] == "cuda" and metrics["device"]["precision"] == "fp16"
    assert metrics["device"]["name"] == torch.cuda.get_device_name(0)
    assert metrics["peak_memory_source"] == "cuda-allocator" and metrics["peak_memory_bytes"] > 0
    assert np.isfinite(metrics["f1_after"])
    payload = torch.load(run / "adapter.pt", weights_only=True)  # no map_location: must already be CPU
    assert all(t.device.type == "cpu" for t in payload["state"].values())
    result = cli("fuse-export", run, "--out", tmp_path / "eng")
    assert result.exit_code == 0, result.output


@needs_cuda
def test_cuda_pretrained_base_loads_on_cpu(tmp_path):
    raw = tiny_recipe_dict(tmp_path / "base.pt", pretrain={"steps": 5, "device": "cuda"})
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", raw))
    result = cli("pretrain", recipe.source, "--quiet")
    assert result.exit_code == 0, result.output
    ckpt = torch.load(tmp_path / "base.pt", weights_only=True)
    assert all(t.device.type == "cpu" for t in ckpt["state_dict"].values())
    assert ckpt["trained_on"]["type"] == "cuda"


@needs_cuda
def test_cuda_bf16_where_supported_and_timing(tiny_checkpoint, tmp_path):
    precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(
        tiny_checkpoint, train={"device": "cuda:0", "precision": precision, "steps": 4})))
    data = load_data(recipe.data, recipe.seed)
    base, head_name, _ = load_base_model(recipe, data, echo=None)
    model, method = build_adapted(recipe.method, base, head_name, data)
    seconds = time_train_steps(model, method, recipe.train, data.target_train, steps=3)
    assert seconds > 0 and next(model.parameters()).device.type == "cpu"  # timed on a copy
    result = fit(model, method, data.target_train, recipe.train, recipe.seed, eval_split=data.target_test,
                 progress=False)
    assert next(model.parameters()).is_cuda and result.device["precision"] == precision
    assert result.peak_memory_source == "cuda-allocator"
    # the allocator's peak includes at least the model, its gradients and optimizer state
    b = result.memory_breakdown
    assert result.peak_memory_bytes >= b["parameters_and_buffers"] + b["gradients"] + b["optimizer_state"]


@needs_cuda
def test_cuda_bench_ratios(make_recipe, tmp_path):
    recipe = make_recipe("cudabench", **TINY_BENCH)
    out = run_bench(recipe.model_copy(update={"train": recipe.train.model_copy(update={"device": "cuda"})}),
                    ["full", "ttlora"], 1, tmp_path / "b", progress=False, echo=None)
    result = json.loads((out / "bench.json").read_text())
    assert result["meta"]["device"]["type"] == "cuda"
    full = next(r for r in result["rows"] if r["method"] == "full")
    assert full["step_time_vs_full"] == 1.0 and full["peak_memory_vs_full"] == 1.0
