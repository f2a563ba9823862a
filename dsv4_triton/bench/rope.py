"""Benchmark cases: apply_rope / apply_rope_ (memory bound).

Bytes counted are what each op must move at minimum:
* ``apply_rope`` returns a new tensor: all D dims read once and written once, plus the
  positions and the table rows they select (R FP32 per position).
* ``apply_rope_`` rotates in place: only the R rotated dims are read and written (the
  first D - R dims never move), plus positions and table rows.  For D = 512, R = 64 that
  is 1/8 of the functional op's traffic, so it is the form to use where x may be mutated.
"""

import torch

from .. import ops
from ..reference import rope as ref
from .case import Case

ROPE_DIM = 64
MAX_POS = 1 << 18


def _table():
    return ops.rope_freqs(ROPE_DIM, MAX_POS, 160000.0,
                          dict(factor=16, original_max_position_embeddings=65536, beta_fast=32, beta_slow=1),
                          device="cuda")


def _rotate_complex(rope_part, table, positions):
    """The release's formulation: the pairs as complex numbers times the table's cis."""
    pairs = torch.view_as_complex(rope_part.float().unflatten(-1, (-1, 2)).contiguous())
    cis = torch.view_as_complex(table[positions])
    cis = cis.reshape(*cis.shape[:-1], *([1] * (pairs.dim() - cis.dim())), cis.shape[-1])
    return torch.view_as_real(pairs * cis).flatten(-2)


def _rotate_real(rope_part, table, positions):
    """The same with real arithmetic on even/odd slices (what torch.compile fuses best)."""
    x = rope_part.float()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    cs = table[positions]
    cs = cs.reshape(*cs.shape[:-2], *([1] * (x.dim() - cs.dim() + 1)), *cs.shape[-2:])
    c, s = cs[..., 0], cs[..., 1]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).flatten(-2)


def _eager_complex(x, table, positions):
    return torch.cat((x[..., :-ROPE_DIM], _rotate_complex(x[..., -ROPE_DIM:], table, positions).to(x.dtype)), -1)


def _eager_real(x, table, positions):
    return torch.cat((x[..., :-ROPE_DIM], _rotate_real(x[..., -ROPE_DIM:], table, positions).to(x.dtype)), -1)


def _eager_inplace(x, table, positions):
    x[..., -ROPE_DIM:] = _rotate_complex(x[..., -ROPE_DIM:], table, positions).to(x.dtype)
    return x


def _make(lead, n_pos_dims, head_dim):
    def make(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(*lead, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
        n_pos = lead[:n_pos_dims]
        # A prefill chunk: consecutive positions per sequence, sequences at different offsets.
        positions = torch.arange(n_pos[-1], device="cuda").expand(*n_pos) + \
            torch.randint(0, MAX_POS - n_pos[-1], (*n_pos[:-1], 1), device="cuda", generator=g)
        return x, _table(), positions.contiguous()
    return make


def _bytes(lead, n_pos_dims, head_dim, inplace):
    rows = 1
    for v in lead:
        rows *= v
    n_pos = 1
    for v in lead[:n_pos_dims]:
        n_pos *= v
    moved_dims = ROPE_DIM if inplace else head_dim
    return 2 * rows * moved_dims * 2 + n_pos * (8 + ROPE_DIM * 4)


def cases(quick: bool):
    shapes = [((16384, 64), 1, 512, "q, Flash prefill"), ((131072,), 1, 512, "kv, one head")]
    if not quick:
        shapes += [((2, 4096, 128), 2, 512, "q, Pro, [B, S] positions"), ((16384, 64), 1, 128, "indexer q")]
    out = []
    for lead, n_pos_dims, head_dim, what in shapes:
        shape = f"[{', '.join(map(str, lead))}, {head_dim}] bf16, R {ROPE_DIM} ({what})"
        make = _make(lead, n_pos_dims, head_dim)
        out.append(Case(op="apply_rope", shape=shape, make_inputs=make,
                        run=lambda x, t, p: ops.apply_rope(x, t, p), eager=_eager_complex,
                        oracle=lambda x, t, p: ref.apply_rope(x, t, p, False),
                        bytes=_bytes(lead, n_pos_dims, head_dim, False), launches=1,
                        notes="eager: the release's view_as_complex multiply and cat"))
        if not quick and lead == (16384, 64) and head_dim == 512:
            out.append(Case(op="apply_rope", shape=shape + " vs real-arithmetic torch", make_inputs=make,
                            run=lambda x, t, p: ops.apply_rope(x, t, p), eager=_eager_real,
                            oracle=lambda x, t, p: ref.apply_rope(x, t, p, False),
                            bytes=_bytes(lead, n_pos_dims, head_dim, False), launches=1,
                            notes="eager: even/odd slices with real products, the form torch.compile fuses"))
        out.append(Case(op="apply_rope_", shape=shape, make_inputs=make,
                        run=lambda x, t, p: ops.apply_rope_(x, t, p), eager=_eager_inplace,
                        bytes=_bytes(lead, n_pos_dims, head_dim, True), launches=1,
                        notes="in place: moves only the rotated R dims; no error column because every "
                              "timed call rotates the same input again (tests check it bit-exact)"))
    return out
