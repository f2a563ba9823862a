"""The op registry: one place that decides which implementation runs each op.

Every public op has named implementations, one per backend:

* ``reference`` - pure torch, FP32 math, runs on any device (the oracle).
* ``triton``    - Triton kernels; on CUDA devices, or on the CPU when the Triton
                  interpreter is on (``TRITON_INTERPRET=1`` before the first import).
* ``cuda``      - hand-written kernels from ``cuda_fallback/`` built for sm_90a / sm_100a.

Dispatch picks, per op and tensor device, the first available backend in
``PREFERENCE`` order (on the CPU only ``reference`` is picked automatically: the
interpreter is for testing, not for speed).  An implementation may cover only some
arguments (a decode-sized CUDA kernel, say): it is registered with ``covers``, a function
of the op's arguments that returns ``""`` when it handles them and otherwise the reason it
does not; such calls go to the next available backend in the order, as a rule of the op
stated where the implementation is registered.  A backend can be forced globally with
the environment variable ``DSV4_BACKEND`` (read at import) or with the
``use_backend`` context manager, for all ops or a chosen subset.  Forcing a backend
that an op lacks or that cannot run on the device raises ``BackendUnavailableError``:
there is never a silent fallback.

Resolution results are cached per (op, device, override state), so the eager
per-call cost is one dict lookup.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import torch

BACKENDS: Tuple[str, ...] = ("cuda", "triton", "reference")
PREFERENCE: Tuple[str, ...] = BACKENDS  # fastest first


class BackendUnavailableError(RuntimeError):
    """A forced backend does not implement the op or cannot run on the device."""


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_available(device: torch.device) -> Tuple[bool, str]:
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and triton_interpreter_on():
        return True, ""
    if device.type == "cpu":
        return False, "Triton on the CPU needs TRITON_INTERPRET=1 set before dsv4_triton is imported"
    return False, f"Triton does not run on device type {device.type!r}"


def _cuda_available(device: torch.device, archs: Tuple[str, ...]) -> Tuple[bool, str]:
    if device.type != "cuda":
        return False, "the CUDA backend needs a CUDA device"
    from cuda_fallback import loader

    arch = loader.arch_of(device)
    if arch not in archs:
        return False, f"no CUDA kernel for {arch} (built for {', '.join(archs)})"
    ok, why = loader.extension_status()
    return ok, why


@dataclass
class Implementation:
    fn: Callable
    backend: str
    archs: Tuple[str, ...] = ()  # for the cuda backend: e.g. ("sm90a", "sm100a")
    covers: Optional[Callable[..., str]] = None  # "" for the arguments it handles, else why not

    def available(self, device: torch.device) -> Tuple[bool, str]:
        if self.backend == "reference":
            return True, ""
        if self.backend == "triton":
            return _triton_available(device)
        return _cuda_available(device, self.archs)


@dataclass
class Op:
    name: str
    impls: Dict[str, Implementation] = field(default_factory=dict)
    torch_op: Optional[Callable] = None  # the torch.library custom op (compile path)


_OPS: Dict[str, Op] = {}
_overrides: Dict[str, str] = {}  # op name or "*" -> backend
_cache: Dict[Tuple[str, str, Optional[int]], Callable] = {}


def _op(name: str) -> Op:
    op = _OPS.get(name)
    if op is None:
        op = _OPS[name] = Op(name)
    return op


def _check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def register(name: str, backend: str, archs: Iterable[str] = (),
             covers: Optional[Callable[..., str]] = None) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements op ``name`` for ``backend``. Returns ``fn`` unchanged.

    ``covers(*args)``: ``""`` when ``fn`` handles these arguments, else the reason it does
    not (then dispatch takes the next backend; a forced backend raises with the reason)."""
    _check_backend_name(backend)

    def deco(fn: Callable) -> Callable:
        _op(name).impls[backend] = Implementation(fn, backend, tuple(archs), covers)
        _cache.clear()
        return fn

    return deco


def declare_torch_op(name: str, torch_op: Callable) -> None:
    """Record the ``torch.library`` custom op that the compile path of ``name`` calls."""
    _op(name).torch_op = torch_op


def _device_of(args) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    raise TypeError("an op needs at least one tensor argument")


def define_op(name: str, stub: Callable, fake: Callable, mutates_args: Tuple[str, ...] = ()) -> Callable:
    """Define the ``torch.library`` custom op ``dsv4::name`` from a typed signature stub.

    Its body dispatches through the registry at run time, so ``torch.compile`` sees
    one opaque node per op (no graph break) and the backend choice still holds.
    ``fake`` computes output metadata for tracing.  Module files defining stubs must
    not use ``from __future__ import annotations`` (torch infers the schema from them).
    """

    @functools.wraps(stub)
    def body(*args):
        return dispatch(name, _device_of(args))(*args)

    torch_op = torch.library.custom_op(f"dsv4::{name}", body, mutates_args=mutates_args)
    torch_op.register_fake(fake)
    declare_torch_op(name, torch_op)
    return torch_op


def call(name: str, device: torch.device, *args):
    """Run op ``name``: straight to the implementation in eager mode (cheap), through
    the custom op while ``torch.compile`` traces (opaque node, no graph break)."""
    if torch.compiler.is_compiling():
        return _OPS[name].torch_op(*args)
    fn = _cache.get((name, device.type, device.index))
    if fn is None:
        fn = dispatch(name, device)
    return fn(*args)


def _forced_partial(name: str, impl: Implementation) -> Callable:
    def run(*args):
        why = impl.covers(*args)
        if why:
            raise BackendUnavailableError(
                f"op {name!r}: backend {impl.backend!r} does not cover these arguments: {why}")
        return impl.fn(*args)

    run.backends = (impl.backend,)
    return run


def _first_covering(impl: Implementation, rest: Callable, rest_backends: Tuple[str, ...]) -> Callable:
    def run(*args):
        return rest(*args) if impl.covers(*args) else impl.fn(*args)

    run.backends = (impl.backend, *rest_backends)
    return run


def _resolve(name: str, device: torch.device) -> Callable:
    op = _OPS.get(name)
    if op is None:
        raise KeyError(f"unknown op {name!r}; known: {sorted(_OPS)}")
    forced = _overrides.get(name, _overrides.get("*"))
    if forced is not None:
        impl = op.impls.get(forced)
        if impl is None:
            raise BackendUnavailableError(
                f"op {name!r} has no {forced!r} implementation (has: {sorted(op.impls)})")
        ok, why = impl.available(device)
        if not ok:
            raise BackendUnavailableError(f"op {name!r}: backend {forced!r} unavailable on {device}: {why}")
        return impl.fn if impl.covers is None else _forced_partial(name, impl)
    order = ("reference",) if device.type == "cpu" else PREFERENCE
    partial = []  # available implementations that cover some arguments only, in order
    for backend in order:
        impl = op.impls.get(backend)
        if impl is None or not impl.available(device)[0]:
            continue
        if impl.covers is not None:
            partial.append(impl)
            continue
        fn, backends = impl.fn, (impl.backend,)
        for covering in reversed(partial):
            fn = _first_covering(covering, fn, backends)
            backends = fn.backends
        return fn
    raise BackendUnavailableError(f"op {name!r}: no implementation runs on {device}"
                                  + (" for every argument" if partial else ""))


def dispatch(name: str, device: torch.device) -> Callable:
    """The implementation of op ``name`` for tensors on ``device`` (cached)."""
    key = (name, device.type, device.index)
    fn = _cache.get(key)
    if fn is None:
        fn = _cache[key] = _resolve(name, device)
    return fn


def selected_backend(name: str, device: torch.device) -> str:
    """The backend that runs op ``name`` on ``device``; where one covers only some arguments,
    e.g. ``"cuda, else triton"``."""
    fn = dispatch(name, device)
    backends = getattr(fn, "backends", None)
    if backends is not None:
        return ", else ".join(backends)
    for backend, impl in _OPS[name].impls.items():
        if impl.fn is fn:
            return backend
    raise AssertionError("unreachable")


def set_backend(backend: Optional[str], ops: Optional[Iterable[str]] = None) -> None:
    """Force ``backend`` for ``ops`` (all ops if None); ``backend=None`` removes the force."""
    keys = ["*"] if ops is None else list(ops)
    for key in keys:
        if key != "*" and key not in _OPS:
            raise ValueError(f"ops: unknown op {key!r}; known: {sorted(_OPS)}")
        if backend is None:
            _overrides.pop(key, None)
        else:
            _check_backend_name(backend)
            _overrides[key] = backend
    _cache.clear()


@contextlib.contextmanager
def use_backend(backend: str, ops: Optional[Iterable[str]] = None) -> Iterator[None]:
    """Context manager forcing ``backend`` for ``ops`` (all if None) inside the block."""
    saved = dict(_overrides)
    set_backend(backend, ops)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)
        _cache.clear()


def ops() -> Dict[str, Op]:
    return dict(_OPS)


def table(device: Optional[torch.device] = None) -> list:
    """Rows (op, backend, registered, available-on-device, reason) for every op and backend."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name in sorted(_OPS):
        for backend in BACKENDS:
            impl = _OPS[name].impls.get(backend)
            if impl is None:
                rows.append((name, backend, False, False, "not implemented"))
            else:
                ok, why = impl.available(device)
                rows.append((name, backend, True, ok, why))
    return rows


def format_table(device: Optional[torch.device] = None) -> str:
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = sorted(_OPS)
    width = max([len(n) for n in names] + [4])
    lines = [f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
             "op".ljust(width) + "  " + "  ".join(b.ljust(10) for b in BACKENDS) + "  selected"]
    for name in names:
        cells = []
        for backend in BACKENDS:
            impl = _OPS[name].impls.get(backend)
            cells.append(("-" if impl is None else ("yes" if impl.available(device)[0] else "no")).ljust(10))
        try:
            sel = selected_backend(name, device)
        except BackendUnavailableError as e:
            sel = f"error: {e}"
        lines.append(name.ljust(width) + "  " + "  ".join(cells) + "  " + sel)
    lines.append("yes = implemented and runnable here, no = implemented but not runnable here, - = not implemented")
    return "\n".join(lines)


def _apply_env() -> None:
    env = os.environ.get("DSV4_BACKEND")
    if env:
        if env not in BACKENDS:
            raise ValueError(f"DSV4_BACKEND must be one of {BACKENDS}, got {env!r}")
        _overrides["*"] = env


_apply_env()
