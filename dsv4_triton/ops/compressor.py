"""Public op of the compressor family: compress_entries (SPEC 6)."""


import torch

from .. import validate as V
from ..kernels import compressor as _kernels  # noqa: F401  (registers the triton backend)
from ..reference import compressor as _reference  # noqa: F401  (registers the reference backend)
from ..registry import call, define_op

__all__ = ["compress_entries"]

RATIOS = (4, 128)
KINDS = ("kv", "indexer")
INDEX_DTYPES = (torch.int32, torch.int64)
HADAMARD_SIZES = (64, 128, 256, 512)
ROPE_DIM = 64  # SPEC 1: every configuration rotates the last 64 dims
# A kernel program holds one whole entry row (the rmsnorm needs it): rows up to this long.
MAX_HEAD_DIM = 1024


def _slots(ratio: int) -> int:
    return 2 * ratio if ratio == 4 else ratio


def _halves(ratio: int) -> int:
    return 2 if ratio == 4 else 1


def _stub(a: torch.Tensor, z: torch.Tensor, ape: torch.Tensor, norm_w: torch.Tensor, freqs: torch.Tensor,
          entry_idx: torch.Tensor, ratio: int, kind: str, eps: float) -> torch.Tensor:
    raise NotImplementedError


define_op("compress_entries", _stub, fake=lambda a, z, ape, norm_w, freqs, entry_idx, ratio, kind, eps: torch.empty(
    a.shape[0], a.shape[-1] // _halves(ratio), dtype=torch.bfloat16, device=a.device))


def compress_entries(a: torch.Tensor, z: torch.Tensor, ape: torch.Tensor, norm_w: torch.Tensor,
                     freqs: torch.Tensor, entry_idx: torch.Tensor, ratio: int, kind: str = "kv",
                     eps: float = 1e-6) -> torch.Tensor:
    """Compressed KV (or indexer) entries from their windows' projected tokens (SPEC 6): bf16 ``[N, d]``.

    a, z: fp32 ``[N, L, c*d]`` (``wkv x`` and ``wgate x`` of each slot; any strides, e.g. a
    strided view of the token-major projections).  ratio 128: ``c = 1``, ``L = 128``, the
    window's tokens.  ratio 4: ``c = 2``, ``L = 8``: rows 0..3 the previous window's tokens
    (their lo half ``[:d]`` is used), rows 4..7 the window's tokens (hi half ``[d:]``).
    ape: fp32 ``[ratio, c*d]``.  norm_w: ``[d]``.  freqs: the ``rope_freqs`` table
    ``[max_pos, 32, 2]`` (R = 64).  entry_idx: int32/int64 ``[N]``, entry i is rotated at position
    ``ratio * i``; for ``i == 0`` at ratio 4 rows 0..3 are absent and never read.

    Per entry: softmax pooling over the L slots per channel, rmsnorm(norm_w, eps), RoPE on
    the last R dims, then kind ``"kv"``: qat8 (block 64, power-of-two scales) on ``[:d-R]``;
    kind ``"indexer"``: Hadamard over all d, then qat4 (block 32).  Positions outside
    ``[0, freqs.shape[0])`` raise ``ValueError`` in checked mode (``DSV4_CHECKS=1``) and
    are clamped into range otherwise.
    """
    ratio = V.positive_int("ratio", ratio, allowed=RATIOS)
    if not isinstance(kind, str):
        raise TypeError(f"kind: expected a str, got {type(kind).__name__}")
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    V.number("eps", eps, positive=True)
    V.tensor("a", a, (torch.float32,), ndim=3)
    V.tensor("z", z, (torch.float32,), ndim=3)
    n_entries, slots, width = a.shape
    if slots != _slots(ratio):
        raise ValueError(f"a: expected {_slots(ratio)} slots (dim 1) for ratio {ratio}, got shape {tuple(a.shape)}")
    V.divisible("a", width, _halves(ratio))
    d = width // _halves(ratio)
    V.shape("z", z, a.shape)
    V.same_device("z", z, "a", a)
    V.tensor("ape", ape, (torch.float32,), ndim=2)
    V.shape("ape", ape, (ratio, width))
    V.same_device("ape", ape, "a", a)
    V.tensor("norm_w", norm_w, V.FLOAT_DTYPES, ndim=1)
    V.shape("norm_w", norm_w, (d,))
    V.same_device("norm_w", norm_w, "a", a)
    V.tensor("freqs", freqs, (torch.float32,), ndim=3)
    if freqs.shape[0] < 1 or freqs.shape[1] < 1 or freqs.shape[2] != 2:
        raise ValueError(f"freqs: expected shape [max_pos >= 1, rope_dim/2 >= 1, 2], got {tuple(freqs.shape)}")
    V.same_device("freqs", freqs, "a", a)
    V.tensor("entry_idx", entry_idx, INDEX_DTYPES, ndim=1)
    V.shape("entry_idx", entry_idx, (n_entries,))
    V.same_device("entry_idx", entry_idx, "a", a)
    rope_dim = 2 * freqs.shape[1]
    if rope_dim != ROPE_DIM:
        raise ValueError(f"freqs: expected a rope_dim {ROPE_DIM} table (shape [max_pos, {ROPE_DIM // 2}, 2]), "
                         f"got shape {tuple(freqs.shape)}")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"a: expected an entry length d <= {MAX_HEAD_DIM}, got d = {d}")
    if kind == "kv":
        if d <= rope_dim or (d - rope_dim) % 64:
            raise ValueError(f"a: kind 'kv' needs d - rope_dim to be a positive multiple of 64 (the qat8 block), "
                             f"got d = {d}, rope_dim = {rope_dim}")
    elif d not in HADAMARD_SIZES or rope_dim > d:
        raise ValueError(f"a: kind 'indexer' needs d in {HADAMARD_SIZES} (Hadamard) and >= rope_dim = {rope_dim}, "
                         f"got d = {d}")
    if V.checks_enabled() and n_entries:
        lo, hi = int(entry_idx.min()), int(entry_idx.max())
        if lo < 0 or ratio * hi >= freqs.shape[0]:
            raise ValueError(f"entry_idx: expected values in [0, {-(-freqs.shape[0] // ratio)}) "
                             f"(positions ratio * i < freqs.shape[0] = {freqs.shape[0]}), got values in [{lo}, {hi}]")
    return call("compress_entries", a.device, a, z, ape, norm_w, freqs, entry_idx, ratio, kind, float(eps))
