"""The ``cuda`` backend of ``hc_pre`` at prefill sizes: ``csrc/sm90_hc_pre.cu`` (sm_90a).

A cluster of 16 CTAs holds ``fn`` in registers (1/16 of its columns each) while X streams
through once: the Triton kernels read X twice, because without a cluster ``fn`` (2.75 MB at
dim 7168) would be re-read for every block of tokens.  It covers contiguous X with dim a
multiple of 512 up to 7168 (Pro's 7168, Flash's 4096), more than ``MIN_TOKENS`` tokens
(decode sizes keep the Triton one-launch form), on GPUs that place clusters of 16 CTAs
(non-portable: an sm_90 part needs a GPC with 16 free SMs); other calls go to the Triton
kernels, and forcing ``cuda`` on them raises ``BackendUnavailableError``.

Numerics: the products use fn as two BF16 parts (hi + mid, the rest below 2^-16 of each
element) where the Triton kernels use three (2^-24): the mixes err by at most 2^-16 of
sum |X fn| beyond the FP32 summation, which is the size of an FP32 dot's own rounding over
4 * dim terms; a mix that is a single product is no longer FP32-exact.  Sinkhorn, the
activations and y follow the oracle's order of operations, as the Triton kernels do.
"""

from __future__ import annotations

import functools

import torch

from dsv4_triton.registry import register

from .loader import extension_at

CLUSTER = 16
DIM_MULTIPLE = 512  # 16 CTAs x 8 warps x 4 streams' columns in 16-wide MMA steps
MAX_DIM = 7168  # 14 steps a warp: fn's fragments take 168 of the 232 registers a thread
MIN_TOKENS = 64  # up to this many tokens the Triton one-launch decode form runs
MAX_ITERS = 1 << 16


def hc_pre_covers(X: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int,
                  eps: float, norm_eps: float) -> str:
    """``""`` when the sm_90a cluster kernel handles these ``hc_pre`` arguments, else why not."""
    T, _, dim = X.shape
    if T <= MIN_TOKENS:
        return f"{T} tokens (the kernel takes more than {MIN_TOKENS}; decode sizes run the Triton one-launch form)"
    if dim % DIM_MULTIPLE or dim > MAX_DIM:
        return f"dim {dim} (the kernel takes multiples of {DIM_MULTIPLE} up to {MAX_DIM})"
    if not X.is_contiguous() or (X.device.type != "meta" and X.data_ptr() % 16):
        return "a strided or unaligned X (the kernel copies contiguous 16-byte pieces of each row)"
    if iters > MAX_ITERS:
        return f"{iters} Sinkhorn iterations (the kernel takes up to {MAX_ITERS})"
    device = torch.device("cuda") if X.device.type == "meta" else X.device
    if max_clusters(device.index if device.index is not None else torch.cuda.current_device(), dim) == 0:
        return "a GPU that places no cluster of 16 CTAs with this kernel's shared memory"
    return ""


@functools.lru_cache(maxsize=None)
def max_clusters(device_index: int, dim: int) -> int:
    """Clusters of the kernel that the GPU runs at once: the grid (each loops over batches)."""
    return extension_at(device_index).hc_pre_max_clusters(dim)


@register("hc_pre", "cuda", archs=("sm90a",), covers=hc_pre_covers)
def hc_pre(X: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int, eps: float,
           norm_eps: float):
    T, _, dim = X.shape
    y = torch.empty(T, dim, dtype=torch.bfloat16, device=X.device)
    post = torch.empty(T, 4, dtype=torch.float32, device=X.device)
    comb = torch.empty(T, 4, 4, dtype=torch.float32, device=X.device)
    index = X.device.index
    extension_at(index).hc_pre_cluster(X, fn.contiguous(), scale.contiguous(), base.contiguous(), y, post, comb,
                                       iters, eps, norm_eps, max_clusters(index, dim),
                                       torch._C._cuda_getCurrentRawStream(index))
    return y, post, comb
