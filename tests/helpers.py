"""Comparison helpers with explicit error metrics, shared by the op tests."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

# One rounding of the output dtype, relative: a kernel and the oracle that both compute
# in FP32 and round once may land on neighbouring values of the output dtype.
ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -20}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str = "") -> None:
    """Elementwise |a - e| <= atol + rtol * |e|, NaN where and only where expected is NaN,
    equal infinities.  Reports the worst element."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().float().cpu()
    e = expected.detach().float().cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), f"{what}: NaN mismatch at {(nan_a != nan_e).nonzero()[:5].tolist()}"
    inf_e = torch.isinf(e)
    assert torch.equal(a[inf_e], e[inf_e]), f"{what}: infinity mismatch"
    fin = ~nan_e & ~inf_e
    err = (a[fin] - e[fin]).abs()
    bound = atol + rtol * e[fin].abs()
    if err.numel() and not bool((err <= bound).all()):
        i = int(torch.argmax(err - bound))
        raise AssertionError(f"{what}: max excess error at flat {i}: got {a[fin][i].item()!r}, "
                             f"expected {e[fin][i].item()!r} (|err| {err[i].item():.3g} > {bound[i].item():.3g}); "
                             f"{int((err > bound).sum())} of {err.numel()} elements out of tolerance")


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bit-identical, except that any NaN matches any NaN (torch and GPUs write different
    NaN payloads into float outputs; codes and scale bytes are compared as plain bytes)."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().cpu(), expected.detach().cpu()
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    if a.dtype in (torch.bfloat16, torch.float16, torch.float32):
        nan_a, nan_e = torch.isnan(a), torch.isnan(e)
        assert torch.equal(nan_a, nan_e), f"{what}: NaN mismatch at {(nan_a != nan_e).nonzero()[:5].tolist()}"
        a, e = a.masked_fill(nan_a, 0), e.masked_fill(nan_e, 0)
    ab, eb = a.contiguous().view(ints), e.contiguous().view(ints)
    bad = (ab != eb).nonzero()
    assert bad.numel() == 0, (f"{what}: {bad.shape[0]} of {ab.numel()} differ, first at {bad[0].tolist()}: "
                              f"got {a[tuple(bad[0])].item()!r}, expected {e[tuple(bad[0])].item()!r}")


def needs_cuda_backend(op: str):
    """An autouse fixture for a test module of op ``op``'s cuda backend: skips its tests, with
    the reason, where that backend cannot run (no GPU, another architecture, no build)."""
    from dsv4_triton import registry

    @pytest.fixture(autouse=True)
    def _needs_cuda_backend(device):
        ok, why = registry.ops()[op].impls["cuda"].available(device)
        if not ok:
            pytest.skip(why)

    return _needs_cuda_backend


def backends_called(monkeypatch, op: str, backends=("cuda", "triton")) -> list:
    """From here on, the backends that op ``op`` runs, one entry a call, in order (the
    registry's dispatch resolved again with the counting functions in place)."""
    from dsv4_triton import registry

    impls = registry.ops()[op].impls
    ran = []
    for backend in backends:
        fn = impls[backend].fn
        monkeypatch.setattr(impls[backend], "fn", lambda *a, _fn=fn, _b=backend: ran.append(_b) or _fn(*a))
    registry.set_backend(None, ops=[op])  # clears the dispatch cache
    return ran


def counting_backends(op: str):
    """A fixture for a test module of op ``op``'s cuda backend: the backends that op runs, one
    entry a call (``backends_called``); afterwards the counting is undone and the dispatch
    cache cleared."""
    from dsv4_triton import registry

    @pytest.fixture
    def counted(monkeypatch):
        ran = backends_called(monkeypatch, op)
        yield ran
        monkeypatch.undo()
        registry.set_backend(None, ops=[op])

    return counted


def replayed_and_eager(call, eager, x: torch.Tensor, fresh: torch.Tensor):
    """``call()`` captured in a CUDA graph (after a warm-up call outside the capture, which builds
    what it needs), ``x`` refilled with ``fresh`` and the graph replayed: (the graph's output,
    ``eager()`` on the new ``x``)."""
    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = call()
    x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    return y, eager()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - e|| / ||e|| over finite elements (the metric the benchmarks report)."""
    a, e = actual.float(), expected.float()
    fin = torch.isfinite(e)
    den = e[fin].norm().item()
    return (a[fin] - e[fin]).norm().item() / (den if den else 1.0)


# Compiles a kernel for sm_90 with Triton's own ptxas, in a process without the interpreter,
# and prints the registers and stack (spill) bytes per thread, whether the loads are pipelined,
# whether the dots are warp-group MMAs, how many shared-memory tiles are loaded back into
# registers, and the FP32 FMA / multiply counts of the PTX.  Pointers and the integer
# arguments named in "aligned" are assumed 16-divisible, as the JIT specialises them at model
# sizes (that is what lets the loads pipeline).
SM90_COMPILE = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
module, kernel, types, consts, aligned, warps, stages = json.loads(sys.argv[1])
fn = getattr(__import__(module, fromlist=[kernel]), kernel)
if isinstance(fn, triton.runtime.Autotuner):
    fn = fn.fn
sig = {n: "constexpr" if n in consts else types.get(n, "*fp32" if n.endswith("_ptr") else "i32") for n in fn.arg_names}
attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
         if n not in consts and (sig[n].startswith("*") or n in aligned)}
compiled = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))
with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
    f.write(compiled.asm["cubin"])
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
os.unlink(f.name)
reg, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
ttgir = compiled.asm["ttgir"]
print(json.dumps(dict(reg=int(reg), stack=int(stack), pipelined="async_copy" in ttgir,
                      tensor_core_dot="warp_group_dot" in ttgir, tile_reloads=ttgir.count("ttg.local_load"),
                      fma=compiled.asm["ptx"].count("fma.rn.f32"), mul=compiled.asm["ptx"].count("mul.f32"))))
"""


def compile_for_sm90(module, kernel, types, consts, aligned, warps, stages=3):
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(pathlib.Path(__file__).resolve().parent.parent)
    run = subprocess.run([sys.executable, "-c", SM90_COMPILE, json.dumps([module, kernel, types, consts, aligned, warps, stages])],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
