"""Benchmark cases: the lightning indexer (SPEC 7) at V4-Pro sizes (64 heads of 128, top-1024).

Decode: one query per sequence against every compressed entry.  The scoring pass alone
is memory bound on the keys: BF16 keys are 256 B each (FP4 rows from
``pack_indexer_keys``: 68 B, 64 B of codes + 4 E8M0 scales), 2 * 64 * 128 FLOP per key =
64 FLOP/B: memory bound.  FP4 rows raise that to 241 FLOP/B, about the H100's measured
ridge (bf16 matmul rate / copy bandwidth ~ 240), and add an in-register decode per key.
Its byte count: keys + qi + w read once, FP32 scores written once.
End to end (score + exact top-k) is counted on the same bytes; the selection re-reads
the scores (4 B/key, L2-resident for one row): few long rows by the row-parallel select
(each row in chunks, one program each: four radix-level launches whose chunk histograms
are summed by integer atomics, each launch making the previous level's pick, then one
launch where each chunk makes the last pick, sums the counts the last level stored for the
chunks before it and writes), many rows by one program per row segment (one or two
launches).

Prefill: 16k queries, causal (entry s valid for query t when s < (t+1)//4), 4096 entries;
FLOP of the causal half: 2 * 64 * 128 per (query, valid entry) pair.

Inputs are small integers (exactly representable in BF16, as QAT'd FP4 values are), so
scores are exact in FP32 and the error column compares the selection itself (0 = the
oracle's indices exactly); timing does not depend on the values.
"""

from functools import partial

import torch

from cuda_fallback import indexer as cuda_indexer

from .. import ops, registry
from ..kernels import indexer as kernels
from ..reference import indexer as ref
from .case import Case, runs_cuda

HEADS = 64
HEAD_DIM = 128
TOP_K = 1024
KEY_BYTES = HEAD_DIM * 2


def _inputs(seed, bsz, seq, n_keys, n_valid):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qi = torch.randint(-3, 4, (bsz, seq, HEADS, HEAD_DIM), device="cuda", generator=g).to(torch.bfloat16)
    keys = torch.randint(-3, 4, (bsz, n_keys, HEAD_DIM), device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randint(-4, 5, (bsz, seq, HEADS), device="cuda", generator=g).float()
    return qi, w, keys, n_valid.to("cuda")


def _eager_scores(qi, w, keys):
    logits = torch.einsum("bshd,bnd->bshn", qi, keys).float()
    return (logits.relu() * w[..., None]).sum(2)


def _eager_topk(qi, w, keys, n_valid, k, chunk=None):
    """What a user writes: scores, mask the invalid entries, torch.topk (chunked over queries
    in prefill so the [S, H, Nk] logits fit)."""
    seq = qi.shape[1]
    chunk = chunk or seq
    outs = []
    for s0 in range(0, seq, chunk):
        scores = _eager_scores(qi[:, s0:s0 + chunk], w[:, s0:s0 + chunk], keys)
        pos = torch.arange(keys.shape[1], device=keys.device)
        valid = pos < n_valid[:, s0:s0 + chunk, None]
        top = scores.masked_fill(~valid, float("-inf")).topk(k, dim=-1)
        outs.append(torch.where(torch.gather(valid, -1, top.indices), top.indices, -1).to(torch.int32))
    return torch.cat(outs, 1)


# Scoring configs timed on their own (``indexer_scores[<form> <tile>]``), beside the tuned
# choice, to compare the two product forms on the same tiles: (BLOCK_N, TILES, warps, stages).
FORM_TILES = {False: (128, 4, 4, 3), True: (128, 1, 8, 3)}  # BF16 / FP4 keys: the old tuned choices


def _decode_cases(quick):
    shapes = [(1, 262144, False), (32, 32768, False), (1, 262144, True), (1, 32768, True), (32, 32768, True),
              (32, 262144, True)] \
        if quick else [(1, 32768, False), (1, 262144, False), (32, 32768, False), (32, 262144, False),
                       (1, 262144, True), (1, 32768, True), (32, 32768, True), (32, 262144, True)]
    out = []
    for bsz, n_keys, fp4 in shapes:
        n_valid = torch.full((bsz, 1), n_keys, dtype=torch.int32)

        def make(seed, bsz=bsz, n_keys=n_keys, n_valid=n_valid, fp4=fp4):
            qi, w, keys, nv = _inputs(seed, bsz, 1, n_keys, n_valid)
            return qi, w, (ops.pack_indexer_keys(keys) if fp4 else keys), nv

        key_bytes = bsz * n_keys * (ref.FP4_KEY_BYTES if fp4 else KEY_BYTES)
        small = bsz * HEADS * (HEAD_DIM * 2 + 4)
        flops = 2 * bsz * n_keys * HEADS * HEAD_DIM
        layout = "FP4 keys 68 B" if fp4 else "BF16 keys 256 B"
        shape = f"decode B={bsz} Nk={n_keys} Hi={HEADS} {layout}"
        eager_keys = (lambda keys: ref.key_values(keys).to(torch.bfloat16)) if fp4 else (lambda keys: keys)
        scores_oracle = lambda qi, w, keys, nv: ref.indexer_scores(qi, w, keys).reshape(-1, keys.shape[1])
        out.append(Case(
            op="indexer_scores", shape=shape, make_inputs=make,
            run=lambda qi, w, keys, nv: kernels.indexer_scores(qi, w, keys, nv),
            eager=lambda qi, w, keys, nv, ek=eager_keys: _eager_scores(qi, w, ek(keys)),
            oracle=scores_oracle,
            bytes=key_bytes + small + bsz * n_keys * 4, flops=flops, ceiling="copy", launches=1,
            notes=f"scoring pass alone over {layout}/key; target >= 70% of copy"))
        if fp4 and cuda_indexer.scoring_covers(_meta_qi(bsz), _meta_keys(bsz, n_keys, fp4)) == "" \
                and _runs_cuda(bsz, n_keys, fp4):
            out.append(Case(
                op="indexer_scores[cuda]", shape=shape, make_inputs=make,
                run=lambda qi, w, keys, nv: cuda_indexer.indexer_scores(qi, w, keys, nv),
                eager=None, oracle=scores_oracle,
                bytes=key_bytes + small + bsz * n_keys * 4, flops=flops, ceiling="copy", launches=1,
                notes="scoring pass alone, the sm_90a CUDA kernel (the registry's choice for these FP4 keys)"))
        if bsz == 32:
            block_n, tiles, warps, stages = FORM_TILES[fp4]
            for keys_as_a in (True, False):
                config = dict(BLOCK_N=block_n, TILES=tiles, KEYS_AS_A=keys_as_a, num_warps=warps, num_stages=stages)
                form = f"{'A' if keys_as_a else 'B'} {block_n}x{tiles} w{warps} s{stages}"
                out.append(Case(
                    op=f"indexer_scores[{form}]", shape=shape, make_inputs=make,
                    run=lambda qi, w, keys, nv, config=config: kernels.indexer_scores(qi, w, keys, nv, config=config),
                    eager=None, oracle=scores_oracle,
                    bytes=key_bytes + small + bsz * n_keys * 4, flops=flops, ceiling="copy", launches=1,
                    notes=("one config, keys as the MMA's A operand (the tuned form)" if keys_as_a else
                           "one config, keys as the MMA's B operand (comparison only: never tuned)")))
        cuda = torch.device("cuda")
        parts = kernels.plan_parts(bsz, n_keys, TOP_K, cuda)
        splits = kernels.plan_splits(bsz, n_keys, TOP_K, cuda)
        # Row-parallel: scores, 4 radix levels, write.
        triton_launches = 6 if parts else 2 if splits == 1 else 3
        triton_plan = f"row-parallel, {parts} chunks per row" if parts else f"{splits} segment(s) per row"
        cuda_selects = _runs_cuda(bsz, n_keys, fp4) and cuda_indexer.selection_covers(n_keys) == ""
        topk = dict(shape=shape + f" k={TOP_K}", make_inputs=make,
                    oracle=lambda qi, w, keys, nv: ref.indexer_topk(qi, w, keys, nv, TOP_K),
                    bytes=key_bytes + small + bsz * TOP_K * 4, flops=flops, ceiling="copy")
        out.append(Case(
            op="indexer_topk", run=lambda qi, w, keys, nv: ops.indexer_topk(qi, w, keys, nv, TOP_K),
            eager=lambda qi, w, keys, nv, ek=eager_keys: _eager_topk(qi, w, ek(keys), nv, TOP_K),
            launches=2 if cuda_selects else triton_launches,
            notes=("score + exact FP32 top-k (" + ("one launch, a CTA or a CTA cluster a row" if cuda_selects else triton_plan)
                   + "); target within 2x of the scoring pass"), **topk))
        if cuda_selects:
            triton_topk = registry.ops()["indexer_topk"].impls["triton"].fn
            out.append(Case(
                op="indexer_topk[triton]", run=lambda qi, w, keys, nv, fn=triton_topk: fn(qi, w, keys, nv, TOP_K),
                eager=None, launches=triton_launches,
                notes=f"the Triton backend, for comparison ({triton_plan})", **topk))
    return out


def _meta_qi(bsz):
    return torch.empty(bsz, 1, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="meta")


def _meta_keys(bsz, n_keys, fp4):
    return torch.empty(bsz, n_keys, *((ref.FP4_KEY_BYTES,) if fp4 else (HEAD_DIM,)),
                       dtype=torch.uint8 if fp4 else torch.bfloat16, device="meta")


def _runs_cuda(bsz, n_keys, fp4):
    """Whether the registry sends a decode case to the cuda backend here (its scoring kernel,
    its selection kernel or both take it)."""
    meta = partial(torch.empty, device="meta")
    return runs_cuda("indexer_topk", _meta_qi(bsz), meta(bsz, 1, HEADS), _meta_keys(bsz, n_keys, fp4),
                     meta(bsz, 1, dtype=torch.int32), TOP_K)


def _prefill_case():
    seq, n_keys = 16384, 4096
    n_valid = ((torch.arange(seq) + 1) // 4).to(torch.int32)[None]
    pairs = int(n_valid.clamp(max=n_keys).sum())
    make = lambda seed: _inputs(seed, 1, seq, n_keys, n_valid)
    return Case(
        op="indexer_topk", shape=f"prefill S={seq} Nk={n_keys} Hi={HEADS} k={TOP_K} causal", make_inputs=make,
        run=lambda qi, w, keys, nv: ops.indexer_topk(qi, w, keys, nv, TOP_K),
        eager=lambda qi, w, keys, nv: _eager_topk(qi, w, keys, nv, TOP_K, chunk=1024),
        compile_eager=False,  # a 16-chunk Python loop: compiling it measures the compiler, not the op
        oracle=lambda qi, w, keys, nv: ref.indexer_topk(qi, w, keys, nv, TOP_K),
        bytes=seq * HEADS * (HEAD_DIM * 2 + 4) + n_keys * KEY_BYTES + seq * TOP_K * 4,
        flops=2 * HEADS * HEAD_DIM * pairs, ceiling="bf16", launches=2,
        notes="TFLOP/s over the causal half (2*64*128 FLOP per valid pair); scores workspace 256 MB")


def cases(quick: bool):
    return _decode_cases(quick) + [_prefill_case()]
