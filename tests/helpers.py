"""Comparison helpers with explicit error metrics, shared by the op tests."""

from __future__ import annotations

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


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - e|| / ||e|| over finite elements (the metric the benchmarks report)."""
    a, e = actual.float(), expected.float()
    fin = torch.isfinite(e)
    den = e[fin].norm().item()
    return (a[fin] - e[fin]).norm().item() / (den if den else 1.0)
