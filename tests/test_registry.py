"""The op registry: dispatch, forcing, clear errors, torch.compile without graph breaks."""

import os
import subprocess
import sys

import pytest
import torch

import dsv4_triton
from dsv4_triton import ops, registry
from dsv4_triton.registry import BackendUnavailableError


def test_every_public_op_is_registered_with_a_reference():
    names = set(registry.ops())
    for fam in ops.FAMILIES:
        for public in fam.__all__:
            assert callable(getattr(ops, public))
    for name, op in registry.ops().items():
        assert "reference" in op.impls, f"{name} has no reference oracle"
        assert op.torch_op is not None, f"{name} has no torch.library op"
    assert "rms_norm" in names


def test_cpu_dispatch_picks_reference_and_forcing_switches():
    cpu = torch.device("cpu")
    assert registry.selected_backend("rms_norm", cpu) == "reference"
    with dsv4_triton.use_backend("triton", ops=["rms_norm"]):
        if registry.triton_interpreter_on():
            assert registry.selected_backend("rms_norm", cpu) == "triton"
        else:
            with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
                ops.rms_norm(torch.ones(2, 4))
    assert registry.selected_backend("rms_norm", cpu) == "reference"


def test_forcing_a_missing_backend_is_an_error_not_a_fallback():
    with dsv4_triton.use_backend("cuda"):
        with pytest.raises(BackendUnavailableError, match="rms_norm"):
            ops.rms_norm(torch.ones(2, 4))


def test_bad_backend_and_op_names():
    with pytest.raises(ValueError, match="backend"):
        registry.set_backend("fastest")
    with pytest.raises(ValueError, match="unknown op"):
        registry.set_backend("reference", ops=["no_such_op"])


def test_env_variable_forces_backend():
    code = ("import torch, dsv4_triton; from dsv4_triton import registry; "
            "print(registry.selected_backend('rms_norm', torch.device('cpu')))")
    env = dict(os.environ, DSV4_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["DSV4_BACKEND"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "DSV4_BACKEND" in bad.stderr


def test_registry_table_command_lists_ops():
    out = subprocess.run([sys.executable, "-m", "dsv4_triton.registry"], capture_output=True, text=True, check=True)
    assert "rms_norm" in out.stdout and "reference" in out.stdout and "triton" in out.stdout
    assert "Warning" not in out.stderr


def test_torch_compile_fullgraph_has_no_graph_break():
    def f(x, w):
        return ops.rms_norm(x * 2.0, w) + 1.0

    x, w = torch.randn(3, 64), torch.randn(64)
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x, w), f(x, w))
    explanation = torch._dynamo.explain(f)(x, w)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_backend_covering_some_arguments_hands_the_rest_to_the_next():
    name = "test_partial_cover"
    calls = []
    registry.register(name, "triton", covers=lambda x: "" if x < 10 else f"x = {x} is too large")(
        lambda x: calls.append("triton") or x)
    registry.register(name, "reference")(lambda x: calls.append("reference") or x)
    gpu = torch.device("cuda")  # Triton counts as available on any CUDA device: no GPU needed to resolve
    try:
        fn = registry.dispatch(name, gpu)
        assert fn(3) == 3 and fn(12) == 12
        assert calls == ["triton", "reference"]
        assert registry.selected_backend(name, gpu) == "triton, else reference"
        with dsv4_triton.use_backend("triton", ops=[name]):
            assert registry.dispatch(name, gpu)(4) == 4
            with pytest.raises(BackendUnavailableError, match="does not cover these arguments: x = 12 is too large"):
                registry.dispatch(name, gpu)(12)
        assert registry.selected_backend(name, torch.device("cpu")) == "reference"
    finally:
        registry._OPS.pop(name)
        registry._cache.clear()
