"""route: Triton against the FP32 oracle, and the oracle against SPEC 8."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from dsv4_triton import ops, set_checks, use_backend
from dsv4_triton.reference import router as ref
from helpers import assert_close

FP32_EPS = 2.0 ** -24


def _inputs(T, E, dim, seed, device, logit_std=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, dim, generator=g).to(torch.bfloat16)
    weight = (torch.randn(E, dim, generator=g) * logit_std / math.sqrt(dim)).to(torch.bfloat16)
    bias = torch.randn(E, generator=g) * 0.1
    return x.to(device), weight.to(device), bias.to(device)


# ---------------------------------------------------------------- the oracle against SPEC 8

def test_oracle_is_spec_8():
    x, weight, bias = _inputs(9, 16, 64, 0, "cpu")
    w, ids = ref.route(x, weight, bias, None, None, 3, 2.5)
    s = torch.sqrt(F.softplus(x.float() @ weight.float().T))
    for t in range(9):
        order = sorted(range(16), key=lambda e: (-(s[t, e] + bias[e]).item(), e))[:3]
        assert ids[t].tolist() == order
        sel = s[t, order]
        assert_close(w[t], sel / sel.sum() * 2.5, rtol=1e-6, atol=0, what="weights")


def test_oracle_ties_go_to_the_lower_id_and_nan_ranks_first():
    key = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, float("nan"), 5.0, float("nan"), float("inf")]])
    assert ref.topk_lowest_id_ties(key, 3).tolist() == [[1, 2, 4], [1, 3, 4]]
