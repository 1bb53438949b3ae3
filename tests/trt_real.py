"""Helpers for tests/test_trt_bindings.py: objects that stand in for TensorRT's native objects (an engine,
an execution context, a builder...) but answer only to what the REAL binding class of the installed
TensorRT offers. `Strict(trt.ICudaEngine, impl)` forwards to `impl`, and on every use checks the real
class: an attribute the class lacks raises AttributeError (as the real object would, so feature probes
behave as on a device); a property write needs a settable property; a call must fit one of the overloads
in the method's pybind11 signature (arity, keyword names, and the simple types: int, float, str, bool,
TensorRT enums and classes). Something the real class has but `impl` does not model fails the test with
`NotModelled`. `isinstance(proxy, trt.ICudaEngine)` is True, as Polygraphy checks.

The stand-ins compute nothing of TensorRT's: their behaviour is written here, from TensorRT's
documentation, and each rule says where it comes from. What is checked is that the project and
Polygraphy call the real API correctly."""

from __future__ import annotations

import ctypes
import json
import re
from typing import Any

import numpy as np


class NotModelled(AssertionError):
    """The code under test used something the real class has but this stand-in does not model."""


class ApiMisuse(AssertionError):
    """The code under test used something the real class does not have, or called it wrongly."""


_SIG = re.compile(r"^(?:\d+\.\s+)?(\w+)\((.*)\)\s*->\s*(.*)$")


def _split_params(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[(<{":
            depth += 1
        elif ch in "])>}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def signatures(method: Any) -> list[list[tuple[str, str, bool]]]:
    """The overloads of a pybind11 method from its docstring: each a list of (name, type, has_default),
    `self` left out."""
    doc = getattr(method, "__doc__", None) or ""
    sigs = []
    for line in doc.splitlines():
        m = _SIG.match(line.strip())
        if not m or m.group(2).startswith("*args"):
            continue
        params = []
        for p in _split_params(m.group(2)):
            name, _, rest = p.partition(":")
            typ, eq, _default = rest.partition("=")
            params.append((name.strip(), typ.strip(), bool(eq)))
        if params and params[0][0] == "self":
            params = params[1:]
        sigs.append(params)
    return sigs


def _type_fits(trt, typ: str, value: Any) -> bool:
    if typ in ("int", "typing.SupportsInt"):
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool) or (
            typ == "typing.SupportsInt" and hasattr(value, "__int__") and not isinstance(value, (str, bytes)))
    if typ in ("float", "typing.SupportsFloat"):
        return isinstance(value, (int, float, np.number))
    if typ == "str":
        return isinstance(value, str)
    if typ == "bool":
        return isinstance(value, (bool, np.bool_))
    if typ.startswith("tensorrt.tensorrt."):
        cls = getattr(trt, typ.rsplit(".", 1)[1], None)
        if cls is None:
            return True
        if typ.endswith(".Dims") or typ.endswith(".Dims32") or typ.endswith(".Dims64"):
            return isinstance(value, (cls, tuple, list))
        return isinstance(value, cls) or value is None
    return True  # buffers, numpy arrays, capsules, typing.Any...: not checked


def check_call(trt, cls: type, name: str, args: tuple, kwargs: dict) -> None:
    method = getattr(cls, name)
    sigs = signatures(method)
    if not sigs:
        return
    reasons = []
    for params in sigs:
        if len(args) > len(params):
            reasons.append(f"{len(args)} positional arguments, takes {len(params)}")
            continue
        names = [p[0] for p in params]
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            reasons.append(f"no parameter {unknown}")
            continue
        given = dict(zip(names, args)) | kwargs
        missing = [p[0] for p in params if not p[2] and p[0] not in given]
        if missing:
            reasons.append(f"missing {missing}")
            continue
        wrong = [f"{p[0]}: {p[1]} got {type(given[p[0]]).__name__}" for p in params
                 if p[0] in given and not _type_fits(trt, p[1], given[p[0]])]
        if wrong:
            reasons.append(", ".join(wrong))
            continue
        return
    raise ApiMisuse(f"{cls.__name__}.{name}{args!r} {kwargs or ''} fits no overload of the real binding: "
                    + "; ".join(reasons))


class Strict:
    """A stand-in for an object of the real TensorRT class `cls`, answering through `impl` (see the module
    docstring). `used` records every attribute read, write and call."""

    def __init__(self, trt, cls: type, impl: Any, used: list | None = None):
        object.__setattr__(self, "_trt", trt)
        object.__setattr__(self, "_cls", cls)
        object.__setattr__(self, "_impl", impl)
        object.__setattr__(self, "used", used if used is not None else [])

    @property
    def __class__(self):  # isinstance(proxy, real class) holds, as Polygraphy checks
        return object.__getattribute__(self, "_cls")

    def __getattr__(self, name: str) -> Any:
        cls, impl = object.__getattribute__(self, "_cls"), object.__getattribute__(self, "_impl")
        if name.startswith("__"):
            raise AttributeError(name)
        if not hasattr(cls, name):
            self.used.append(("absent", cls.__name__, name))
            raise AttributeError(f"'{cls.__name__}' object has no attribute '{name}' (real TensorRT "
                                 f"{self._trt.__version__} binding)")
        real = getattr(cls, name)
        if not hasattr(impl, name):
            raise NotModelled(f"{cls.__name__}.{name} is used but not modelled by the stand-in")
        value = getattr(impl, name)
        if isinstance(cls.__dict__.get(name), property) or isinstance(real, property):
            self.used.append(("get", cls.__name__, name))
            return value
        if callable(value):
            trt = self._trt

            def call(*args, **kwargs):
                check_call(trt, cls, name, args, kwargs)
                self.used.append(("call", cls.__name__, name))
                return value(*args, **kwargs)

            return call
        self.used.append(("get", cls.__name__, name))
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        cls, impl = object.__getattribute__(self, "_cls"), object.__getattribute__(self, "_impl")
        prop = None
        for klass in cls.__mro__:
            if name in klass.__dict__:
                prop = klass.__dict__[name]
                break
        if not isinstance(prop, property) or prop.fset is None:
            # As the real object answers (Polygraphy probes some properties this way).
            self.used.append(("absent-set", cls.__name__, name))
            raise AttributeError(f"{cls.__name__}.{name} is not a settable property of the real TensorRT "
                                 f"{self._trt.__version__} binding")
        self.used.append(("set", cls.__name__, name))
        setattr(impl, name, value)

    def __bool__(self) -> bool:
        return True

    def _dunder(self, name: str):
        cls = object.__getattribute__(self, "_cls")
        if not hasattr(cls, name):
            raise TypeError(f"'{cls.__name__}' object does not support {name} (real binding)")
        return getattr(object.__getattribute__(self, "_impl"), name)

    def __len__(self) -> int:
        return self._dunder("__len__")()

    def __getitem__(self, key):
        return self._dunder("__getitem__")(key)

    def __iter__(self):
        cls = object.__getattribute__(self, "_cls")
        if hasattr(cls, "__iter__"):
            return iter(object.__getattribute__(self, "_impl"))
        getitem = self._dunder("__getitem__")  # Python iterates a class with __getitem__ by index
        return iter(getitem(i) for i in range(len(self)))

    def __bytes__(self) -> bytes:  # IHostMemory exposes the buffer protocol
        return bytes(object.__getattribute__(self, "_impl"))

    def __enter__(self):
        cls = object.__getattribute__(self, "_cls")
        if not hasattr(cls, "__enter__"):
            raise ApiMisuse(f"{cls.__name__} is not a context manager in the real binding")
        return object.__getattribute__(self, "_impl").__enter__()

    def __exit__(self, *exc):
        return object.__getattribute__(self, "_impl").__exit__(*exc)


def real_class(trt, cls: type, make_impl, used: list):
    """A stand-in for the real class `cls` itself (trt.Builder, trt.Runtime...): calling it checks the
    arguments against the real constructor's signature and returns `Strict(cls, make_impl(...))`;
    isinstance and attribute look-ups (enums nested in the class) go to the real class."""
    cls = getattr(cls, "_edgetool_real_class", cls)  # already replaced by an earlier call

    class _Meta(type):
        def __instancecheck__(self, obj):
            return isinstance(obj, cls)

        def __call__(self, *args, **kwargs):
            check_call(trt, cls, "__init__", args, kwargs)
            used.append(("new", cls.__name__, "__init__"))
            return Strict(trt, cls, make_impl(*args, **kwargs), used)

        def __getattr__(self, name):
            return getattr(cls, name)

    return _Meta(cls.__name__, (), {"_edgetool_real_class": cls})


def real_function(trt, name: str, impl, used: list):
    """A stand-in for the module function trt.<name>: the call is checked against its real signature."""
    fn = getattr(trt, name)
    fn = getattr(fn, "_edgetool_real_function", fn)

    def call(*args, **kwargs):
        sigs = signatures(fn)
        holder = type("F", (), {name: fn})
        if sigs:
            check_call(trt, holder, name, args, kwargs)
        used.append(("call", "tensorrt", name))
        return impl(*args, **kwargs)

    call._edgetool_real_function = fn
    return call


# --- the CUDA stand-in (scripts/trt_stubs/cudart_host.c) ------------------------------------------------------

def stub_cudart():
    """The host-memory CUDA stand-in Polygraphy loaded, with its test hooks typed."""
    from toolchain.backends.cuda import cuda_runtime

    lib = cuda_runtime()
    if not hasattr(lib, "edgetool_stub_work"):
        raise RuntimeError("the loaded CUDA runtime is not the host-memory stand-in")
    lib.edgetool_stub_work.argtypes = [ctypes.c_void_p, ctypes.c_double]
    lib.edgetool_stub_work.restype = None
    lib.edgetool_stub_clock.argtypes = [ctypes.c_void_p]
    lib.edgetool_stub_clock.restype = ctypes.c_double
    return lib


# --- an engine ------------------------------------------------------------------------------------------------

class Model:
    """What the fake engine computes, so a test can check outputs row by row: row i of the output is
    the mean of row i of the input plus the class index (a function of that row only)."""

    classes = 4

    @staticmethod
    def forward(x: np.ndarray) -> np.ndarray:
        m = x.reshape(len(x), -1).mean(axis=1, keepdims=True)
        return (m + np.arange(Model.classes)[None, :]).astype(np.float32)


class EngineImpl:
    """An engine of one input `x` [batch, *sample] and one output `y` [batch, classes], one optimisation
    profile per batch size (min = opt = max), as trtplan builds them.

    `profile_sharing`: TensorRT 8.6 lets two execution contexts use the same profile only when the engine
    was built with PreviewFeature.PROFILE_SHARING_0806 (off by default in 8.6, deprecated and always on
    from 10.0: TensorRT's API docs for PreviewFeature; NVIDIA/TensorRT#1597); otherwise
    set_optimization_profile_async fails and logs "Profile N has been chosen by another
    IExecutionContext". `ms_per_row` is the GPU time each enqueue adds to the stream's stand-in clock."""

    def __init__(self, trt, batches, sample_shape, input_name="x", output_name="y", profile_sharing=True,
                 ms_per_row=0.25, used=None):
        self.trt, self.batches, self.sample = trt, tuple(batches), tuple(sample_shape)
        self.input_name, self.output_name = input_name, output_name
        self.profile_sharing, self.ms_per_row = profile_sharing, ms_per_row
        self.used = used if used is not None else []
        self.contexts: list[ContextImpl] = []
        self.errors: list[str] = []
        self.num_io_tensors = 2
        self.num_optimization_profiles = len(self.batches)
        self.num_layers = 3
        self.name = "fake-engine"
        self.device_memory_size = 0
        self.device_memory_size_v2 = 0
        self.streamable_weights_size = 0

    def strict(self):
        return Strict(self.trt, self.trt.ICudaEngine, self, self.used)

    def get_tensor_name(self, index):
        return (self.input_name, self.output_name)[index]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name == self.input_name else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.trt.DataType.FLOAT

    def get_tensor_shape(self, name):
        return (-1, *self.sample) if name == self.input_name else (-1, Model.classes)

    def get_tensor_profile_shape(self, name, profile):
        b = self.batches[profile]
        return [(b, *self.sample)] * 3

    def get_tensor_format(self, name):
        return self.trt.TensorFormat.LINEAR

    def get_tensor_location(self, name):
        return self.trt.TensorLocation.DEVICE

    def is_shape_inference_io(self, name):
        return False

    def get_device_memory_size_for_profile(self, profile):
        return 0

    def get_device_memory_size_for_profile_v2(self, profile):
        return 0

    def get_aliased_input_tensor(self, name):
        return None

    def create_execution_context(self, strategy=None):
        ctx = ContextImpl(self)
        self.contexts.append(ctx)
        return Strict(self.trt, self.trt.IExecutionContext, ctx, self.used)

    def create_execution_context_without_device_memory(self):
        return self.create_execution_context()

    def create_engine_inspector(self):
        return Strict(self.trt, self.trt.EngineInspector, InspectorImpl(self), self.used)

    def serialize(self):
        return b"fake-engine"


class ContextImpl:
    def __init__(self, engine: EngineImpl):
        self._engine = engine
        self.profile: int | None = None
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.allocators: dict[str, Any] = {}
        self.alive = True
        self.debug_sync = False
        self.name = "fake-context"
        self.enqueues = 0
        # TensorRT gives a new context profile 0 when no other context holds it (IExecutionContext docs).
        if engine.profile_sharing or not any(c.profile == 0 for c in engine.contexts if c.alive):
            self.profile = 0

    @property
    def engine(self):
        return self._engine.strict()

    @property
    def active_optimization_profile(self):
        return -1 if self.profile is None else self.profile

    @property
    def all_binding_shapes_specified(self):
        return True

    @property
    def all_shape_inputs_specified(self):
        return True

    def infer_shapes(self):
        return []

    def set_optimization_profile_async(self, profile, stream):
        e = self._engine
        if not 0 <= profile < len(e.batches):
            e.errors.append(f"profile index {profile} out of range")
            return False
        if not e.profile_sharing and any(c is not self and c.alive and c.profile == profile for c in e.contexts):
            e.errors.append(f"Profile {profile} has been chosen by another IExecutionContext")
            return False
        self.profile = profile
        return True

    def set_input_shape(self, name, shape):
        e = self._engine
        shape = tuple(int(d) for d in shape)
        if name != e.input_name or self.profile is None or shape != (e.batches[self.profile], *e.sample):
            e.errors.append(f"input shape {shape} outside profile {self.profile}")
            return False
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name):
        e = self._engine
        if e.input_name not in self.shapes:
            return e.get_tensor_shape(name)
        batch = self.shapes[e.input_name][0]
        return (batch, *e.sample) if name == e.input_name else (batch, Model.classes)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = int(ptr)
        return True

    def get_tensor_address(self, name):
        return self.addresses.get(name, 0)

    def set_output_allocator(self, name, allocator):
        self.allocators[name] = allocator
        return True

    def get_output_allocator(self, name):
        return self.allocators.get(name)

    def set_all_tensors_debug_state(self, flag):
        self.debug_state = bool(flag)

    def set_debug_listener(self, listener):
        self.debug_listener = listener
        return True

    def get_debug_listener(self):
        return getattr(self, "debug_listener", None)

    def update_device_memory_size_for_shapes(self):
        return 0

    def set_device_memory(self, ptr, size):
        return None

    def execute_async_v3(self, stream_handle):
        """Computes `Model.forward` from the input address into the output address (host memory under
        the CUDA stand-in) and adds the batch's GPU time to the stream's clock."""
        e = self._engine
        if self.profile is None or e.input_name not in self.shapes:
            return False
        shape = self.shapes[e.input_name]
        n = int(np.prod(shape))
        x = np.ctypeslib.as_array((ctypes.c_float * n).from_address(self.addresses[e.input_name])).reshape(shape)
        y = Model.forward(x)
        out_ptr = self.addresses.get(e.output_name, 0)
        if e.output_name in self.allocators:
            alloc = self.allocators[e.output_name]
            out_ptr = alloc.reallocate_output_async(e.output_name, out_ptr, y.nbytes, 256, stream_handle)
            alloc.notify_shape(e.output_name, self._engine.trt.Dims(y.shape))
        if not out_ptr:
            return False
        ctypes.memmove(int(out_ptr), y.ctypes.data, y.nbytes)
        stub_cudart().edgetool_stub_work(stream_handle, e.ms_per_row * shape[0])
        self.enqueues += 1
        return True

    def __del__(self):
        self.alive = False


class InspectorImpl:
    """The engine inspector: for an engine with several profiles, TensorRT lists every profile's layer
    graph, those of profile N > 0 suffixed " [profile N]" (trt-engine-explorer, trex/parser.py), whatever
    execution context is set. Each layer carries its profile's batch in its output dimensions."""

    def __init__(self, engine: EngineImpl):
        self._engine = engine
        self.execution_context = None
        self.error_recorder = None

    def get_layer_information(self, index, fmt):
        return json.dumps(self._layers()[index])

    def _layers(self):
        e, layers = self._engine, []
        for p, b in enumerate(e.batches):
            suffix = f" [profile {p}]" if p else ""
            for name, kind in (("conv1", "CaskConvolution"), ("relu1", "PointWise"), ("fc", "CaskGemm")):
                layers.append({"Name": name + suffix, "LayerType": kind,
                               "Outputs": [{"Name": f"{name}_out{suffix}", "Dimensions": [b, 8],
                                            "Format/Datatype": "Row major linear FP16 format"}],
                               "TacticName": f"{kind.lower()}_tactic", "TacticValue": "0x1"})
        return layers

    def get_engine_information(self, fmt):
        assert fmt == self._engine.trt.LayerInformationFormat.JSON
        e = self._engine
        return json.dumps({"Layers": self._layers(),
                           "Bindings": [e.input_name, e.output_name]})
