"""Benchmark cases: the quant family (all memory bound: each byte read once, written once).

Bytes counted are the minimum each op moves: x read once, codes/values and scales written
once (fused ops: plus the positions and the table rows they select).  The Hadamard's
tensor-core work (n MACs per element for n <= 128, A + 48 for n = 16A; see
``kernels/quant.py``) stays below the copy time on an H100 for bf16 input, so copy
bandwidth is the ceiling that binds.

``eager`` is the torch a user would write: block amax, ``exp2(ceil(log2(.)))`` scales,
clamp and cast (FP4 by threshold compares), the Hadamard as a bf16 matmul with the +-1 matrix.
"""

import torch

from .. import ops
from ..formats import fp4_encode
from ..reference import quant as ref
from .case import Case

ROPE_DIM = 64
MAX_POS = 1 << 16
FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# --- what a user writes in torch ---------------------------------------------------------

def _act_quant_eager(x, block=128):
    xb = x.float().unflatten(-1, (-1, block))
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    s = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
    q = (xb / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.flatten(-2), s.squeeze(-1)


def _qat8_eager(x, block=64):
    q, s = _act_quant_eager(x, block)
    return (q.float().unflatten(-1, (-1, block)) * s[..., None]).flatten(-2).to(x.dtype)


def _fp4_codes_eager(x, block=32):
    xb = x.float().unflatten(-1, (-1, block))
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(6.0 * 2.0 ** -126)
    e = torch.ceil(torch.log2(amax / 6.0))
    v = (xb / torch.exp2(e)).clamp(-6.0, 6.0)
    return fp4_encode(v).flatten(-2), e.squeeze(-1)  # threshold compares, ties to the even code


def _fp4_quant_eager(x, block=32):
    codes, e = _fp4_codes_eager(x, block)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, (e + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def _qat4_eager(x, block=32):
    codes, e = _fp4_codes_eager(x, block)
    lut = torch.tensor(FP4_MAGNITUDES + tuple(-m for m in FP4_MAGNITUDES), device=x.device)
    y = lut[codes.long()].unflatten(-1, (-1, block)) * torch.exp2(e)[..., None]
    return y.flatten(-2).to(x.dtype)


def _fp4_dequant_eager(packed, scale):
    lut = torch.tensor(FP4_MAGNITUDES + tuple(-m for m in FP4_MAGNITUDES), device=packed.device)
    codes = torch.stack((packed & 15, packed >> 4), -1).flatten(-2).long()
    s = torch.exp2(scale.view(torch.uint8).float() - 127.0)
    return (lut[codes].unflatten(-1, (scale.shape[-1], -1)) * s[..., None]).flatten(-2).to(torch.bfloat16)


_SYLVESTER = {}


def _hadamard_eager(x):
    n = x.shape[-1]
    h = _SYLVESTER.get((n, x.dtype))
    if h is None:
        h = _SYLVESTER[(n, x.dtype)] = ref.sylvester(n, x.device).to(x.dtype)
    return (x @ h) * n ** -0.5


def _rope_eager(x, table, positions):
    """Real-arithmetic RoPE on the last ROPE_DIM dims (what torch.compile fuses best)."""
    r = x[..., -ROPE_DIM:].float()
    cs = table[positions]
    cs = cs.reshape(*cs.shape[:-2], *([1] * (x.dim() - cs.dim() + 1)), *cs.shape[-2:])
    c, s = cs[..., 0], cs[..., 1]
    x0, x1 = r[..., 0::2], r[..., 1::2]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).flatten(-2).to(x.dtype)


def _rope_qat8_eager(x, table, positions):
    return torch.cat((_qat8_eager(x[..., :-ROPE_DIM], 64), _rope_eager(x, table, positions)), -1)


def _rope_hadamard_qat4_eager(x, table, positions):
    r = torch.cat((x[..., :-ROPE_DIM], _rope_eager(x, table, positions)), -1)
    return _qat4_eager(_hadamard_eager(r), 32)


# --- cases -------------------------------------------------------------------------------

def _randn(shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", dtype=torch.float32, generator=g).to(dtype)


def _n(shape):
    out = 1
    for v in shape:
        out *= v
    return out


def _table():
    return ops.rope_freqs(ROPE_DIM, MAX_POS, 160000.0,
                          dict(factor=16, original_max_position_embeddings=65536, beta_fast=32, beta_slow=1),
                          device="cuda")


def _with_positions(shape, dtype):
    def make(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        pos = torch.randint(0, MAX_POS, (shape[0],), device="cuda", generator=g)
        return _randn(shape, dtype, seed), _table(), pos
    return make


def cases(quick: bool):
    bf16 = torch.bfloat16
    out = []

    for shape in ([(16384, 7168)] if quick else [(16384, 7168), (8192, 4096), (64, 7168)]):
        n = _n(shape)
        out.append(Case(op="act_quant", shape=f"{list(shape)} bf16 block 128", launches=1,
                        make_inputs=lambda seed, s=shape: (_randn(s, bf16, seed),),
                        run=lambda x: ops.act_quant(x, 128), eager=_act_quant_eager,
                        oracle=lambda x: ref.act_quant(x, 128, True), bytes=2 * n + n + 4 * n // 128))

    for shape in ([(65536, 448)] if quick else [(65536, 448), (1024, 448)]):
        n = _n(shape)
        out.append(Case(op="qat8", shape=f"{list(shape)} bf16 block 64", launches=1,
                        make_inputs=lambda seed, s=shape: (_randn(s, bf16, seed),),
                        run=lambda x: ops.qat8(x, 64), eager=_qat8_eager,
                        oracle=lambda x: ref.qat8(x, 64, True), bytes=2 * n + 2 * n))

    shape = (16384, 7168)
    n = _n(shape)
    out.append(Case(op="fp4_quant", shape=f"{list(shape)} bf16 block 32", launches=1,
                    make_inputs=lambda seed, s=shape: (_randn(s, bf16, seed),),
                    run=lambda x: ops.fp4_quant(x, 32), eager=_fp4_quant_eager,
                    oracle=lambda x: ref.fp4_quant(x, 32), bytes=2 * n + n // 2 + n // 32))
    out.append(Case(op="fp4_dequant", shape=f"{list(shape)} -> bf16", launches=1,
                    make_inputs=lambda seed, s=shape: ref.fp4_quant(_randn(s, bf16, seed), 32),
                    run=lambda p, sc: ops.fp4_dequant(p, sc), eager=_fp4_dequant_eager,
                    oracle=lambda p, sc: ref.fp4_dequant(p, sc, torch.bfloat16), bytes=n // 2 + n // 32 + 2 * n))

    shape = (262144, 128)  # the indexer query: 4096 tokens x 64 heads
    n = _n(shape)
    out.append(Case(op="qat4", shape=f"{list(shape)} bf16 block 32", launches=1,
                    make_inputs=lambda seed, s=shape: (_randn(s, bf16, seed),),
                    run=lambda x: ops.qat4(x, 32), eager=_qat4_eager,
                    oracle=lambda x: ref.qat4(x, 32), bytes=2 * n + 2 * n))

    shapes = [((262144, 128), bf16), ((65536, 512), bf16)]
    if not quick:
        shapes += [((131072, 256), bf16), ((524288, 64), bf16), ((131072, 128), torch.float32)]
    for shape, dtype in shapes:
        n, size = _n(shape), torch.tensor([], dtype=dtype).element_size()
        out.append(Case(op="hadamard", shape=f"{list(shape)} {str(dtype).replace('torch.', '')}", launches=1,
                        make_inputs=lambda seed, s=shape, d=dtype: (_randn(s, d, seed),),
                        run=ops.hadamard, eager=_hadamard_eager, oracle=ref.hadamard, bytes=2 * size * n))

    shape = (65536, 512)  # KV vectors of 65536 tokens (one MQA head)
    n = _n(shape)
    out.append(Case(op="rope_qat8", shape=f"{list(shape)} bf16", launches=1,
                    make_inputs=_with_positions(shape, bf16),
                    run=lambda x, t, p: ops.rope_qat8(x, t, p), eager=_rope_qat8_eager,
                    oracle=lambda x, t, p: ref.rope_qat8(x, t, p, 64),
                    bytes=2 * 2 * n + shape[0] * (8 + 4 * ROPE_DIM)))

    shape = (4096, 64, 128)  # indexer queries of 4096 tokens
    n = _n(shape)
    out.append(Case(op="rope_hadamard_qat4", shape=f"{list(shape)} bf16", launches=1,
                    make_inputs=_with_positions(shape, bf16),
                    run=lambda x, t, p: ops.rope_hadamard_qat4(x, t, p), eager=_rope_hadamard_qat4_eager,
                    oracle=lambda x, t, p: ref.rope_hadamard_qat4(x, t, p),
                    bytes=2 * 2 * n + shape[0] * (8 + 4 * ROPE_DIM),
                    notes="oracle = the chain of FP32 oracles; rel err counts Hadamard sums that round "
                          "to the other side of an FP4 boundary"))
    return out
