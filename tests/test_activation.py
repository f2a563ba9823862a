"""swiglu: Triton against the FP32 oracle, the oracle against SPEC 4."""

import pytest
import torch
from hypothesis import given, strategies as st

from dsv4_triton import ops, use_backend
from dsv4_triton.reference import activation as ref
from helpers import ULP, assert_close

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def test_swiglu_oracle_matches_spec_formula():
    gate = torch.tensor([-30.0, -1.0, 0.0, 0.5, 9.0, 10.0, 11.0, 1e30])
    up = torch.tensor([1.0, -12.0, 3.0, 0.25, 10.0, -10.5, 2.0, -1e30])
    g = torch.minimum(gate.double(), torch.tensor(10.0, dtype=torch.float64))
    u = up.double().clamp(-10.0, 10.0)
    want = g / (1 + torch.exp(-g)) * u
    assert_close(ref.swiglu(gate, up, 10.0, None), want, rtol=4 * 2.0 ** -24, atol=0.0)
    rows = torch.stack((gate, gate)), torch.stack((up, up))
    assert_close(ref.swiglu(*rows, 10.0, torch.tensor([0.5, -3.0])), torch.stack((want * 0.5, want * -3.0)),
                 rtol=4 * 2.0 ** -24, atol=0.0)
