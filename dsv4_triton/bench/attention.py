"""Benchmark cases: sparse MQA attention with sink (decode and prefill, FP8 and BF16 caches).

Counts (SPEC 11): FLOP = 4 * H * D per valid candidate per query token (QK^T and PV);
bytes = each valid candidate's KV row read once per token (584 B FP8 / 1024 B BF16 at
D = 512) + q read + o written + the index rows.  Arithmetic intensity is then ~450 FLOP/B
(Pro, H = 128, FP8), ~256 (Pro, BF16), ~224 (Flash, H = 64, FP8), ~128 (Flash, BF16); the
H100's ridge (measured bf16 matmul rate / copy bandwidth) is near 250 FLOP/B, so the Pro
FP8 cases are held to the bf16 tensor-core ceiling and the Flash cases to the copy one.
Candidates are realistic: distinct random slots of the cache, every 64th slot -1.

``eager`` is what a user writes in torch: gather the candidate rows (decoding FP8 rows
first), two einsums, a softmax with the sink as an extra logit; chunked over tokens at
prefill, where the gathered [S, K, D] block would not fit (no torch.compile there).

Stage variants, ``sparse_attention[<variant>]``: the same kernel, launched as the op launches
it (tiles, K split, tuned config of the full case, which runs first), with one stage left out
or done twice (``kernels.attention.STAGE_VARIANTS``), to measure where the time goes.  Their
FLOP and byte counts are the full op's, so the rates compare directly; the error column is
against what the variant computes (``stage_variant_oracle``).

Backends: ``sparse_attention`` runs what the registry picks (on sm_90 the CUDA kernel for
decode over the FP8 cache: Pro's 128 heads at any batch size, with crossover, and 64 heads at
small batches; with a K split that is two launches: the slices, then their merge);
``sparse_attention[triton]`` forces the Triton kernel on the same inputs, so the two are
compared in one run where they differ.  The stage variants are the Triton kernel's (the
decode Pro ones explain the Triton row beside the op, the Flash ones the op itself).
"""

from functools import partial

import torch

from .. import ops, use_backend
from ..kernels import attention as kernels
from ..kernels.device import sm_count
from ..reference import attention as ref
from .case import Case, runs_cuda

HEAD_DIM = 512
HOLE_EVERY = 64  # every 64th candidate slot is -1
EAGER_TOKENS_PER_CHUNK = 512


def _decode_rows_eager(rows, d=HEAD_DIM):
    """FP8 cache rows [..., 584] -> bf16 [..., D], as a user would decode them in torch."""
    nope = d - ref.ROPE_DIM
    codes = rows[..., :nope].view(torch.float8_e4m3fn).float().unflatten(-1, (-1, 64))
    scales = torch.exp2(rows[..., nope + 128:nope + 128 + nope // 64].float() - 127.0)
    rope = rows[..., nope:nope + 128].contiguous().view(torch.bfloat16)
    return torch.cat(((codes * scales[..., None]).flatten(-2).to(torch.bfloat16), rope), -1)


def _attention_eager(q, kv, sink, idx, scale):
    b, s, h, d = q.shape
    out = torch.empty_like(q)
    batch = torch.arange(b, device=q.device)[:, None, None]
    for t0 in range(0, s, EAGER_TOKENS_PER_CHUNK):
        rows = idx[:, t0:t0 + EAGER_TOKENS_PER_CHUNK]
        cand = kv[batch, rows.clamp(min=0)]
        if cand.dtype == torch.uint8:
            cand = _decode_rows_eager(cand, d)
        z = torch.einsum("bshd,bskd->bshk", q[:, t0:t0 + EAGER_TOKENS_PER_CHUNK], cand).float() * scale
        z = z.masked_fill((rows < 0)[:, :, None, :], float("-inf"))
        z = torch.cat((z, sink.view(1, 1, h, 1).expand(*z.shape[:3], 1)), -1)
        p = torch.softmax(z, -1)[..., :-1]
        out[:, t0:t0 + EAGER_TOKENS_PER_CHUNK] = torch.einsum("bshk,bskd->bshd", p.to(q.dtype), cand)
    return out


def raw_bits_kv(rows):
    """The bf16 KV the no-dequant variant reads from FP8 cache rows: each code byte shifted left
    by 6 as bf16 bits (values in [0, 2)), the rope part as stored."""
    nope = ref.head_dim_of_row_bytes(rows.shape[-1]) - ref.ROPE_DIM
    raw = (rows[..., :nope].to(torch.int32) << 6).to(torch.int16).view(torch.bfloat16)
    return torch.cat((raw, rows[..., nope:nope + 2 * ref.ROPE_DIM].contiguous().view(torch.bfloat16)), -1)


def stage_variant_oracle(variant, q, kv, sink, idx, scale):
    """What ``kernels.attention.run_stage_variant(variant, ...)`` computes, from the oracle."""
    if variant == "QK-only":  # no P @ KV: the accumulator stays 0
        return torch.zeros(q.shape, dtype=torch.bfloat16, device=q.device)
    if variant == "contiguous":  # candidate slot c reads cache row c (empty past the cache)
        slots = torch.arange(idx.shape[-1], dtype=idx.dtype, device=idx.device)
        idx = torch.where(slots < kv.shape[1], slots, -1).expand(idx.shape)
    elif variant == "no-dequant":
        kv = raw_bits_kv(kv)
    elif variant not in ("QK-twice", "no-max"):
        raise ValueError(f"variant: unknown {variant!r}")
    # QK-twice (the scores twice, halved) and no-max (exponents against 0: the same function
    # while they stay in FP32's range) compute the op's output up to rounding.
    return ref.sparse_attention(q, kv, sink, idx, scale, None, None)


def _make(bsz, seq, heads, k, n, fp8):
    def make(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        q = torch.randn(bsz, seq, heads, HEAD_DIM, device="cuda", generator=g).to(torch.bfloat16)
        kv = torch.randn(bsz, n, HEAD_DIM, device="cuda", generator=g)
        kv[..., :-ref.ROPE_DIM] = ops.qat8(kv[..., :-ref.ROPE_DIM])
        kv = kv.to(torch.bfloat16)
        idx = torch.empty(bsz, seq, k, dtype=torch.int32, device="cuda")
        for b in range(bsz):  # distinct slots per token: the k largest of random keys
            idx[b] = torch.rand(seq, n, device="cuda", generator=g).topk(k, dim=-1).indices
        idx[..., ::HOLE_EVERY] = -1
        sink = torch.randn(heads, device="cuda", generator=g)
        return q, ops.pack_kv_fp8(kv) if fp8 else kv, sink, idx, HEAD_DIM ** -0.5
    return make


def _on_backend(backend, *args):
    with use_backend(backend, ops=["sparse_attention"]):
        return ops.sparse_attention(*args)


def _case(name, bsz, seq, heads, k, n, fp8, ceiling, compile_eager=True, variant=None, backend=None):
    tokens = bsz * seq
    valid = k - len(range(0, k, HOLE_EVERY))
    row_bytes = ref.fp8_row_bytes(HEAD_DIM) if fp8 else 2 * HEAD_DIM
    flops = 4 * heads * HEAD_DIM * valid * tokens
    nbytes = tokens * (valid * row_bytes + 2 * 2 * heads * HEAD_DIM + 4 * k)
    programs = tokens * -(-heads // kernels._block_h(heads))
    splits = kernels._choose_splits(programs, k, sm_count(torch.device("cuda")))
    cache = "FP8" if fp8 else "BF16"
    notes = f"{flops / nbytes:.0f} FLOP/B" + (f"; K split in {splits}" if splits > 1 else "")
    launches = 1
    if variant is None:
        op, run, eager = "sparse_attention", ops.sparse_attention, _attention_eager
        if backend is not None:
            op, run, eager = f"sparse_attention[{backend}]", partial(_on_backend, backend), None
        elif fp8 and splits > 1 and _runs_cuda(bsz, seq, heads, k, n):
            launches = 2
        oracle = lambda q, kv, sink, idx, scale: ref.sparse_attention(q, kv, sink, idx, scale, None, None)  # noqa: E731
    else:
        op, run, eager = f"sparse_attention[{variant}]", partial(kernels.run_stage_variant, variant), None
        oracle = partial(stage_variant_oracle, variant)
        notes = f"stage variant (not the op): {_VARIANT_NOTES[variant]}; counts of the full op"
    return Case(op=op, shape=f"{name} B={bsz} S={seq} H={heads} K={k} N={n} {cache}",
                make_inputs=_make(bsz, seq, heads, k, n, fp8), run=run, eager=eager, compile_eager=compile_eager,
                oracle=oracle, bytes=nbytes, flops=flops, ceiling=ceiling, launches=launches,
                notes=notes)


def _runs_cuda(bsz, seq, heads, k, n):
    """Whether the registry sends an FP8 case of these sizes to the CUDA kernel here."""
    meta = partial(torch.empty, device="meta")
    q = meta(bsz, seq, heads, HEAD_DIM, dtype=torch.bfloat16)
    kv = meta(bsz, n, ref.fp8_row_bytes(HEAD_DIM), dtype=torch.uint8)
    idx = meta(bsz, seq, k, dtype=torch.int32)
    return runs_cuda("sparse_attention", q, kv, meta(heads), idx, HEAD_DIM ** -0.5, None, None)


_VARIANT_NOTES = {
    "no-dequant": "FP8 code bytes used as raw bf16 bits, scales unread (same bytes loaded)",
    "QK-only": "P @ KV and the accumulator rescale left out",
    "contiguous": "candidate slot c reads cache row c: no index load, the same sequential rows for every "
                  "token (L2-resident), no -1 holes",
    "QK-twice": "the QK^T matmul done twice",
    "no-max": "no running max (exponents against 0: no row-max reduction across the warpgroups, no "
              "accumulator rescale)",
}


def _variants(name, bsz, seq, heads, k, n, fp8, ceiling, variants):
    return [_case(name, bsz, seq, heads, k, n, fp8, ceiling, variant=v) for v in variants]


def cases(quick: bool):
    # Decode caches: 128 window slots + 8192 compressed entries (a 32K-token context).
    n_decode = 128 + 8192
    decode_variants = ("no-dequant", "QK-only", "contiguous", "QK-twice", "no-max")
    # Each full case first: its tuned config is the one its stage variants run.
    out = [
        _case("decode Pro", 64, 1, 128, 1152, n_decode, True, "bf16"),
        _case("decode Pro", 64, 1, 128, 1152, n_decode, True, "bf16", backend="triton"),
        *_variants("decode Pro", 64, 1, 128, 1152, n_decode, True, "bf16", decode_variants),
        _case("decode Flash", 64, 1, 64, 640, n_decode, True, "copy"),
        *_variants("decode Flash", 64, 1, 64, 640, n_decode, True, "copy", decode_variants),
        _case("prefill Pro", 1, 8192, 128, 1152, 8192 + 2048, False, "bf16", compile_eager=False),
        *_variants("prefill Pro", 1, 8192, 128, 1152, 8192 + 2048, False, "bf16", ("QK-only", "QK-twice")),
        # Small-batch decode: the CUDA kernel where the registry picks it, beside the Triton kernel.
        *(_case(name, bsz, 1, heads, k, n_decode, True, ceiling, backend=backend)
          for name, bsz, heads, k, ceiling in (("decode Pro", 1, 128, 1152, "bf16"), ("decode Pro", 8, 128, 1152, "bf16"),
                                               ("decode Flash", 1, 64, 640, "copy"),
                                               ("decode Flash", 16, 64, 640, "copy"))
          for backend in (None, "triton")),
    ]
    if not quick:
        out += [
            _case("decode Pro", 64, 1, 128, 1152, n_decode, False, "bf16"),
            _case("decode Flash", 64, 1, 64, 640, n_decode, False, "copy"),
            _case("prefill Pro", 1, 8192, 128, 1152, 8192 + 2048, True, "bf16", compile_eager=False),
            _case("prefill Flash", 1, 8192, 64, 640, 8192 + 2048, False, "bf16", compile_eager=False),
        ]
    return out
