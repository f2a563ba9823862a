"""Benchmark cases: the gemm family.

Shapes are V4-Pro's: (N, K) = (7168, 1536) ``wq_b``-like, (1536, 7168) ``wq_a``, (24576, 7168)
the widest projection; prefill M = 4096 (tensor-core bound: ceiling = the FP8 matmul rate
of ``torch._scaled_mm``), decode M in {1, 16, 64} (weight-stream bound: ceiling = copy
bandwidth, bytes = the weight and its scales read once + x + y).

``fp4_linear`` runs what dispatch picks: the ``cuda`` backend where it is built, up to 8 rows (16
where K >= 4096; MXFP4 and NVFP4) the act_quant pre-pass + ``fp4_decode_gemm.cu``, NVFP4 at 17-64
rows of a wide weight on sm_90 the pre-pass + ``sm90_nvfp4_decode_gemm.cu``, for MXFP4 at
prefill size on sm_90 the pre-pass + the re-encoding of the weight as FP8 blocks + the FP8 GEMM of
``sm90_fp8_gemm.cu``; beside those ``fp4_linear[triton]`` times the Triton GEMM at the same
shapes.  NVFP4 at prefill size: the dequantised activation and the weight expanded to BF16,
then a BF16 GEMM, on sm_90 the ``cuda`` backend's ``sm90_bf16_gemm.cu`` (elsewhere the Triton
GEMM of ``grouped_linear``).  ``grouped_linear`` from 256 tokens on sm_90: the same kernel.  ``fp8_linear`` at prefill size
likewise: the ``cuda`` backend where it is built and takes the shape (pre-pass + the TMA/wgmma
GEMM of ``sm90_fp8_gemm.cu``; at 1-16 rows the one-launch ``sm90_fp8_decode_gemm.cu``), beside
which ``fp8_linear[triton]`` times the Triton GEMM.

``fp8_linear (codes in)`` takes the activation already quantised (``act_quant`` codes and
scales, as ``rms_norm_act_quant`` hands them to the model's projections), so it times the
GEMM without the pre-pass; at M = 4096 for all three shapes, with cuBLAS beside each.

``scaled_mm per-tensor`` times cuBLAS FP8 with one scale per tensor at the same shapes, so
the block-scaled kernel's cost of its per-128 promotion can be read off as a ratio (target:
``fp8_linear`` >= 70% of it at M = 4096).  ``eager`` is what a user writes in torch for the
block-scaled op: dequantise both operands to bf16 and ``torch.matmul``.
"""

import torch

from cuda_fallback.gemm import FP8_DECODE_MAX_ROWS, WGMMA_MAX_ROWS, decode_takes

from .. import ops, use_backend
from ..kernels.gemm import NVFP4_EXPAND_MIN_ROWS
from ..reference import gemm as ref
from .case import Case, runs_cuda

PRO_SHAPES = ((7168, 1536), (1536, 7168), (24576, 7168))
# Few output rows against a long K (wq_a, wkv): at decode only column tiles would leave
# most SMs idle, which is what the split-K configs are for.
NARROW_SHAPES = ((1536, 7168), (512, 7168))
DECODE_M = (1, 16, 64)
PREFILL_M = 4096


def _gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def _x(m, k, g):
    return torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)


def _e8m0(shape, g):
    e = torch.randint(-10, -4, shape, device="cuda", generator=g, dtype=torch.int32)
    return (e + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def _fp8_inputs(m, n, k):
    def make(seed):
        g = _gen(seed)
        w = (torch.randn(n, k, device="cuda", generator=g) * 64).to(torch.float8_e4m3fn)
        return _x(m, k, g), w, _e8m0(((n + 127) // 128, (k + 127) // 128), g)
    return make


def _fp4_inputs(m, n, k, fmt):
    def make(seed):
        g = _gen(seed)
        w = torch.randint(0, 256, (n, k // 2), device="cuda", generator=g, dtype=torch.uint8)
        if fmt == "mxfp4":
            return _x(m, k, g), w, _e8m0((n, k // 32), g), None
        s = (torch.rand(n, k // 16, device="cuda", generator=g) + 0.5).to(torch.float8_e4m3fn)
        return _x(m, k, g), w, s, torch.tensor(0.01, device="cuda")
    return make


def _act_dequant_bf16(x):
    xb = x.float().unflatten(-1, (-1, 128))
    s = torch.exp2(torch.ceil(torch.log2(xb.abs().amax(-1, keepdim=True).clamp_min(1e-4) / 448.0)))
    return ((xb / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s).flatten(-2).to(torch.bfloat16)


def _fp8_weight_bf16(w, w_scale):
    s = torch.exp2(w_scale.view(torch.uint8).float() - 127.0)
    s = s.repeat_interleave(128, 0)[:w.shape[0]].repeat_interleave(128, 1)[:, :w.shape[1]]
    return (w.float() * s).to(torch.bfloat16)


def _fp8_eager(x, w, w_scale):
    return _act_dequant_bf16(x) @ _fp8_weight_bf16(w, w_scale).t()


def _fp4_eager(x, w, w_scale, global_scale):
    lut = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                       device=w.device)
    codes = torch.stack((w & 15, w >> 4), -1).flatten(-2).long()
    if global_scale is None:
        s = torch.exp2(w_scale.view(torch.uint8).float() - 127.0)
    else:
        s = w_scale.float() * global_scale
    wd = (lut[codes].unflatten(-1, (w_scale.shape[-1], -1)) * s[..., None]).flatten(-2)
    return _act_dequant_bf16(x) @ wd.to(torch.bfloat16).t()


def _fp4_triton(x, w, s, gs, fmt):
    with use_backend("triton", ops=["fp4_linear"]):
        return ops.fp4_linear(x, w, s, fmt, gs)


def _scaled_mm_inputs(m, n, k):
    def make(seed):
        g = _gen(seed)
        a = torch.randn(m, k, device="cuda", generator=g).to(torch.float8_e4m3fn)
        b = torch.randn(n, k, device="cuda", generator=g).to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda")
        return a, b, one, one
    return make


def _scaled_mm(a, b, sa, sb):
    return torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)


def _fp8_triton(x, w, s):
    with use_backend("triton", ops=["fp8_linear"]):
        return ops.fp8_linear(x, w, s)


def _fp8_runs_cuda(m, n, k):
    meta = lambda *shape, dtype: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731
    return runs_cuda("fp8_linear", meta(m, k, dtype=torch.bfloat16), meta(n, k, dtype=torch.float8_e4m3fn),
                     meta(-(-n // 128), -(-k // 128), dtype=torch.float8_e8m0fnu))


def _fp4_runs_cuda(m, n, k, fmt="mxfp4"):
    meta = lambda *shape, dtype: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731
    if fmt == "mxfp4":
        scale, global_scale = meta(n, k // 32, dtype=torch.float8_e8m0fnu), None
    else:
        scale, global_scale = meta(n, k // 16, dtype=torch.float8_e4m3fn), meta(1, dtype=torch.float32)
    return runs_cuda("fp4_linear", meta(m, k, dtype=torch.bfloat16), meta(n, k // 2, dtype=torch.uint8), scale,
                     fmt, global_scale)


def _fp8_codes_inputs(m, n, k):
    def make(seed):
        x, w, ws = _fp8_inputs(m, n, k)(seed)
        q, s = ops.act_quant(x)
        return q, w, ws, s
    return make


def _fp8_codes_eager(q, w, w_scale, x_scale):
    x = (q.float().unflatten(-1, (-1, 128)) * x_scale[..., None]).flatten(-2).to(torch.bfloat16)
    return x @ _fp8_weight_bf16(w, w_scale).t()


def _fp8_codes_case(m, n, k):
    cuda = runs_cuda("fp8_linear", *(torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in (
        ((m, k), torch.float8_e4m3fn), ((n, k), torch.float8_e4m3fn), ((n // 128, k // 128), torch.float8_e8m0fnu),
        ((m, k // 128), torch.float32))))
    return Case(op="fp8_linear (codes in)", shape=f"M={m} N={n} K={k}", make_inputs=_fp8_codes_inputs(m, n, k),
                run=lambda q, w, ws, s: ops.fp8_linear(q, w, ws, s), eager=_fp8_codes_eager,
                oracle=lambda q, w, ws, s: ref.fp8_linear(q, w, ws, s),
                bytes=m * k + 4 * m * (k // 128) + n * k + 4 * (n // 128) * (k // 128) + 2 * m * n,
                flops=2 * m * n * k, ceiling="fp8", launches=1,
                notes="cuda backend (TMA/wgmma GEMM, no pre-pass)" if cuda else "the Triton GEMM, no pre-pass")


def _scaled_mm_case(n, k):
    return Case(op="scaled_mm per-tensor (cuBLAS)", shape=f"M={PREFILL_M} N={n} K={k}",
                make_inputs=_scaled_mm_inputs(PREFILL_M, n, k), run=_scaled_mm,
                bytes=PREFILL_M * k + n * k + 2 * PREFILL_M * n, flops=2 * PREFILL_M * n * k, ceiling="fp8",
                notes="baseline for fp8_linear at the same shape (no block scales)")


def _fp8_case(m, n, k, notes="", triton=False):
    act_bytes = m * k * 2 + m * n * 2
    fp8_bytes = n * k + 4 * ((n + 127) // 128) * ((k + 127) // 128) + act_bytes
    return Case(op="fp8_linear[triton]" if triton else "fp8_linear", shape=f"M={m} N={n} K={k}",
                make_inputs=_fp8_inputs(m, n, k), run=_fp8_triton if triton else ops.fp8_linear,
                eager=None if triton else _fp8_eager, oracle=ref.fp8_linear, bytes=fp8_bytes,
                flops=2 * m * n * k, ceiling="fp8" if m == PREFILL_M else "copy", launches=1 if m <= 16 else 2,
                notes=notes)


def _fp8_cases(m, n, k):
    """``fp8_linear`` as dispatched, and beside it the Triton GEMM where the ``cuda`` backend takes
    the call."""
    if not _fp8_runs_cuda(m, n, k):
        return [_fp8_case(m, n, k)]
    if m > FP8_DECODE_MAX_ROWS:
        return [_fp8_case(m, n, k, "cuda backend (pre-pass + TMA/wgmma GEMM)"),
                _fp8_case(m, n, k, "the Triton GEMM (pre-pass + GEMM)", triton=True)]
    return [_fp8_case(m, n, k, "cuda backend (one launch: bulk copies, act_quant inside, mma.sync)"),
            _fp8_case(m, n, k, "the Triton GEMM", triton=True)]


def cases(quick: bool):
    out = []
    shapes = PRO_SHAPES[:1] + PRO_SHAPES[2:] if quick else PRO_SHAPES
    decode_ms = (1, 64) if quick else DECODE_M
    for n, k in shapes:
        for m in (PREFILL_M,) + decode_ms:
            prefill = m == PREFILL_M
            flops = 2 * m * n * k
            act_bytes = m * k * 2 + m * n * 2
            out.extend(_fp8_cases(m, n, k))
            for fmt in ("mxfp4",) if quick else ("mxfp4", "nvfp4"):
                per = 32 if fmt == "mxfp4" else 16
                fp4_bytes = n * k // 2 + n * k // per + act_bytes
                oracle = lambda x, w, s, gs, f=fmt: ref.fp4_linear(x, w, s, f, gs)  # noqa: E731
                cuda = _fp4_runs_cuda(m, n, k, fmt)
                nvfp4_bf16 = fmt == "nvfp4" and m >= NVFP4_EXPAND_MIN_ROWS
                if nvfp4_bf16:
                    launches = 3
                    notes = ("cuda backend (act dequant + weight expanded to BF16 + TMA/wgmma BF16 GEMM)"
                             if cuda else "act dequant + weight expanded to BF16 + BF16 GEMM")
                elif not cuda:
                    launches, notes = (1 if m <= 16 else 2), ""
                elif decode_takes(m, k):
                    launches, notes = 2, "cuda backend (pre-pass + decode GEMM)"
                elif fmt == "nvfp4" and m <= WGMMA_MAX_ROWS:
                    launches, notes = 2, "cuda backend (pre-pass + warp-group MMA decode GEMM)"
                else:
                    launches, notes = 3, "cuda backend (pre-pass + weight as FP8 blocks + TMA/wgmma GEMM)"
                out.append(Case(op="fp4_linear", shape=f"M={m} N={n} K={k} {fmt}",
                                make_inputs=_fp4_inputs(m, n, k, fmt),
                                run=lambda x, w, s, gs, f=fmt: ops.fp4_linear(x, w, s, f, gs),
                                eager=_fp4_eager, oracle=oracle, bytes=fp4_bytes, flops=flops,
                                ceiling="fp8" if prefill else "copy", launches=launches, notes=notes))
                if cuda and not nvfp4_bf16:
                    out.append(Case(op="fp4_linear[triton]", shape=f"M={m} N={n} K={k} {fmt}",
                                    make_inputs=_fp4_inputs(m, n, k, fmt),
                                    run=lambda x, w, s, gs, f=fmt: _fp4_triton(x, w, s, gs, f), oracle=oracle,
                                    bytes=fp4_bytes, flops=flops, ceiling="fp8" if prefill else "copy",
                                    launches=1 if m <= 16 else 2))
        out.append(_scaled_mm_case(n, k))
    for n, k in PRO_SHAPES:
        out.append(_fp8_codes_case(PREFILL_M, n, k))
        if (n, k) not in shapes:  # the quick set's third shape: its BF16-input rows and cuBLAS beside
            out.extend(_fp8_cases(PREFILL_M, n, k) + [_scaled_mm_case(n, k)])

    for n, k in NARROW_SHAPES:
        if (n, k) not in shapes:
            for m in decode_ms:
                out.extend(_fp8_cases(m, n, k))

    # wo_a of V4-Pro: 16 groups, [1024, 4096] each; x is the attention output viewed [T, G, K].
    g_, n, k = 16, 1024, 4096
    for t in (1, 64, 4096):
        def make(seed, t=t):
            gen = _gen(seed)
            x = torch.randn(g_, t, k, device="cuda", generator=gen).to(torch.bfloat16).transpose(0, 1)
            return x, (torch.randn(g_, n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
        meta_x = torch.empty(g_, t, k, dtype=torch.bfloat16, device="meta").transpose(0, 1)
        cuda = runs_cuda("grouped_linear", meta_x, torch.empty(g_, n, k, dtype=torch.bfloat16, device="meta"))
        out.append(Case(op="grouped_linear", shape=f"T={t} G={g_} N={n} K={k}", make_inputs=make,
                        run=ops.grouped_linear, eager=lambda x, w: torch.einsum("tgk,gnk->tgn", x, w),
                        oracle=ref.grouped_linear, bytes=2 * (t * g_ * k + g_ * n * k + t * g_ * n),
                        flops=2 * t * g_ * n * k, ceiling="bf16" if t >= 1024 else "copy", launches=1,
                        notes="cuda backend (TMA/wgmma BF16 GEMM)" if cuda else ""))

    # linear: the reference backend (cuBLAS with an FP32 output); the LM head at decode.
    vocab, dim = 129280, 7168
    out.append(Case(op="linear", shape=f"M=1 N={vocab} K={dim} -> fp32",
                    make_inputs=lambda seed: (_x(1, dim, _gen(seed)),
                                              (torch.randn(vocab, dim, device="cuda", generator=_gen(seed + 99))
                                               * 0.02).to(torch.bfloat16)),
                    run=lambda x, w: ops.linear(x, w, torch.float32),
                    eager=lambda x, w: torch.nn.functional.linear(x, w).float(),
                    bytes=2 * vocab * dim + 2 * dim + 4 * vocab, flops=2 * vocab * dim, ceiling="copy",
                    notes="cuBLAS (reference backend); eager rounds the logits to bf16 first"))
    return out
