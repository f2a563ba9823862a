"""The decode cache of a batch of requests, and the candidate indices attention reads.

One ``KVCache`` owns every layer's storage, sized ``[max_batch, ...]`` once at
construction (nothing is allocated per decode step), and hides its layout behind methods:

* a sliding-window ring of ``W`` KV slots: the token at position ``q`` lives in slot ``q % W``;
* the layer's compressed KV entries (CSA and HCA layers): entry ``j`` lives at ``W + j``,
  so one ``[W + n_entries]``-row tensor per request is what attention reads (SPEC 5,
  "index convention");
* for CSA layers the indexer's compressed keys, ``n_entries`` rows;
* each compressor's partial-window state (SPEC 6): the projected ``a`` and gate ``z`` of
  the tokens of the window being filled, ``[L, c*d]`` in FP32, in the row layout
  ``ops.compress_entries`` takes: ratio 128 (c = 1) rows ``0..127`` are the window's tokens
  (token ``q`` in row ``q % 128``); ratio 4 (c = 2) rows ``0..3`` hold the previous
  window's tokens and rows ``4..7`` the current one's (token ``q`` in row ``4 + q % 4``).

Storage format: entries are kept ENCODED, as the readers take them (SPEC 11).  KV rows
(window and compressed entries): uint8 ``[max_batch, W + n_entries, row_bytes]``, the FP8
row of ``ops.pack_kv_fp8`` (FP8 nope values with one E8M0 scale per 64, the 64 RoPE dims
in BF16: 584 bytes for D = 512 instead of 1024 in BF16).  Indexer keys: uint8
``[max_batch, n_entries, 68]``, the MXFP4 row of ``ops.pack_indexer_keys`` (64 code bytes
+ 4 scales instead of 256 bytes).  Both are exact: the model's KV vectors are ``qat8``-ed
and its keys ``qat4``-ed before they are stored (SPEC 2), so the rows decode to the very
values a BF16 cache would hold.  The kernels that make the values write the rows
(``ops.store_window_kv`` for new tokens' KV, ``ops.compress_entries`` /
``compress_entries_to_cache`` for entries, at flat row indices this class computes): the
cache never holds a BF16 copy.  The compressor state stays FP32 (the pooling reads it).

Decode steps have one shape whatever the positions (candidate rows are always ``W +
capacity`` or ``W + k`` long, masked with -1; entry writes go to row -1, i.e. nowhere, for
a request whose window did not close), and the index ranges they use are made once here,
so a step allocates nothing but its outputs, never synchronises, and can be captured in a
CUDA graph and replayed.

Positions are per request: every method takes the ``[B]`` positions (or lengths) of the
requests in rows ``0..B-1``.  Nothing here synchronises with the host: writes that only
some requests make in a step (a compressed entry is emitted when ``(p+1) % ratio == 0``)
are masked, not branched on.

Candidate indices (SPEC 5.3) are int32 rows, ``-1`` for an empty slot:
* decode (one token at ``p``, indices into the cache tensor above): the window's
  positions ``p-W+1..p`` in ascending order (ring slots), then the compressed entries,
  HCA: every ``j < (p+1) // 128``; CSA: the indexer's top-k (``W + j``).
* prefill (indices into ``[the S prompt tokens | the n compressed entries]``): token ``s``
  sees tokens ``s-W+1..s``, then entries as above, entry ``j`` at ``S + j``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from dsv4_triton import ops
from dsv4_triton.reference.attention import fp8_row_bytes
from dsv4_triton.reference.indexer import FP4_KEY_BYTES

from .config import CSA_RATIO, HCA_RATIO, WINDOW_ONLY, DSV4Config

MAIN, INDEX = "main", "index"  # the two compressors of a CSA layer


def state_rows(ratio: int) -> int:
    """Rows of a compressor's partial-window state (and of one ``compress_entries`` window)."""
    return 2 * ratio if ratio == CSA_RATIO else ratio


def _state_width(ratio: int, d: int) -> int:
    return 2 * d if ratio == CSA_RATIO else d


class KVCache:
    """Decode state of up to ``max_batch`` requests of up to ``max_seq_len`` tokens."""

    def __init__(self, config: DSV4Config, max_batch: int, max_seq_len: int, device: torch.device):
        if max_batch <= 0 or max_seq_len <= 0:
            raise ValueError(f"max_batch/max_seq_len: expected positive ints, got {max_batch}/{max_seq_len}")
        self.config = config
        self.window = config.sliding_window
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.device = torch.device(device)
        self.ratios: Tuple[int, ...] = config.compress_ratios[:config.num_hidden_layers]
        d, di = config.head_dim, config.index_head_dim
        self._kv: List[torch.Tensor] = []
        self._index_keys: List[Optional[torch.Tensor]] = []
        self._state: List[dict] = []
        for ratio in self.ratios:
            n_entries = max_seq_len // ratio if ratio else 0
            self._kv.append(torch.zeros(max_batch, self.window + n_entries, fp8_row_bytes(d), dtype=torch.uint8,
                                        device=device))
            states = {}
            if ratio:
                states[MAIN] = self._new_state(ratio, d)
            if ratio == CSA_RATIO:
                self._index_keys.append(torch.zeros(max_batch, n_entries, FP4_KEY_BYTES, dtype=torch.uint8,
                                                    device=device))
                states[INDEX] = self._new_state(ratio, di)
            else:
                self._index_keys.append(None)
            self._state.append(states)
        # Next position of each request (tokens cached so far), for checked-mode validation.
        self.next_pos = torch.zeros(max_batch, dtype=torch.int64, device=device)
        # Index ranges of the decode step, made once (a torch.arange per use is a launch each).
        self._batch_rows = torch.arange(max_batch, device=device)
        self._window_slots = torch.arange(self.window, device=device)
        self._entry_ids = torch.arange(max((self.n_entries(i) for i in range(len(self.ratios))), default=0),
                                       device=device)

    def _new_state(self, ratio: int, d: int) -> Tuple[torch.Tensor, torch.Tensor]:
        shape = (self.max_batch, state_rows(ratio), _state_width(ratio, d))
        return (torch.zeros(shape, dtype=torch.float32, device=self.device),
                torch.zeros(shape, dtype=torch.float32, device=self.device))

    # ------------------------------------------------------------------ bookkeeping
    def reset(self) -> None:
        """Forget every request (zero all storage, so a reused cache is deterministic)."""
        for t in self._kv:
            t.zero_()
        for t in self._index_keys:
            if t is not None:
                t.zero_()
        for states in self._state:
            for a, z in states.values():
                a.zero_()
                z.zero_()
        self.next_pos.zero_()

    def n_entries(self, layer: int) -> int:
        """Capacity of the layer's compressed-entry store (per request)."""
        ratio = self.ratios[layer]
        return self.max_seq_len // ratio if ratio else 0

    def nbytes(self) -> int:
        """Bytes of every storage tensor (encoded rows and FP32 compressor states)."""
        tensors = self._kv + [t for t in self._index_keys if t is not None]
        tensors += [t for states in self._state for pair in states.values() for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------------ views for attention
    def kv(self, layer: int, batch: int) -> torch.Tensor:
        """uint8 ``[batch, W + n_entries, row_bytes]``: the FP8 rows decode attention indexes into."""
        return self._kv[layer][:batch]

    def index_keys(self, layer: int, batch: int) -> torch.Tensor:
        """uint8 ``[batch, n_entries, 68]``: the indexer's compressed keys as FP4 rows (CSA layers)."""
        return self._keys(layer)[:batch]

    def _keys(self, layer: int) -> torch.Tensor:
        keys = self._index_keys[layer]
        if keys is None:
            raise ValueError(f"layer {layer}: ratio {self.ratios[layer]} has no indexer")
        return keys

    def entry_store(self, layer: int, which: str) -> torch.Tensor:
        """The whole tensor the ``which`` compressor's entries are written into (the flat row
        indices of ``prefill_entry_rows`` / ``decode_entry_rows`` index it)."""
        return self._kv[layer] if which == MAIN else self._keys(layer)

    def _entry_layout(self, layer: int, which: str) -> Tuple[int, int]:
        """(rows per request, row of entry 0) of ``entry_store``."""
        n = self.n_entries(layer)
        return (self.window + n, self.window) if which == MAIN else (n, 0)

    def state(self, layer: int, which: str, batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The compressor's ``(a, z)`` windows, ``[batch, L, c*d]`` FP32 each (rows as documented above)."""
        a, z = self._state[layer][which]
        return a[:batch], z[:batch]

    # ------------------------------------------------------------------ prefill writes
    def store_window(self, layer: int, kv: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor,
                     lengths: Optional[torch.Tensor] = None) -> None:
        """The new tokens' KV (the kv_norm output, before RoPE and qat8) into their ring slots
        as FP8 rows, one launch.  Prefill: ``kv [B, S, D]``, positions ``[B, S]`` and the
        requests' ``lengths``: slot ``s`` gets the latest real token ``q <= lengths-1`` with
        ``q % W == s`` (slots no real token reaches are left as they are).  Decode: ``kv [B, D]``
        at ``positions [B]``."""
        ops.store_window_kv(kv, freqs, positions, self._kv[layer], self.window, lengths)

    def prefill_entry_rows(self, layer: int, which: str, batch: int, n: int) -> torch.Tensor:
        """Flat rows of ``entry_store`` for entries ``0..n-1`` of requests ``0..batch-1``
        (request-major, as prefill pools them).

        Entries a request's padding produced (``j >= lengths[b] // ratio``) are stored too: no
        token sees them before decode rewrites them (entry j is emitted at position
        ``ratio*j + ratio - 1``, which is past every real prompt token)."""
        per_request, first = self._entry_layout(layer, which)
        rows = self._batch_rows[:batch, None] * per_request + first + self._entry_ids[:n]
        return rows.reshape(-1)

    def fill_state(self, layer: int, which: str, a: torch.Tensor, z: torch.Tensor, lengths: torch.Tensor) -> None:
        """After a prefill of projections ``a, z [B, S, c*d]``: the partial window that decode continues.

        Row r of the state holds token ``base + r`` with ``base = (len // ratio) * ratio``
        (ratio 128), or ``base - 4`` (ratio 4, whose rows 0..3 are the previous window);
        rows for tokens past the prompt are overwritten by decode before they are pooled,
        and rows before position 0 are ignored by the op (entry 0 has no previous window)."""
        ratio = self.ratios[layer]
        B, S, _ = a.shape
        rows = state_rows(ratio)
        first = (lengths.to(torch.int64) // ratio) * ratio - (ratio if ratio == CSA_RATIO else 0)
        src = (first[:, None] + torch.arange(rows, device=a.device)).clamp(0, S - 1)
        batch = torch.arange(B, device=a.device)[:, None]
        sa, sz = self._state[layer][which]
        sa[:B] = a[batch, src]
        sz[:B] = z[batch, src]

    def set_positions(self, positions: torch.Tensor) -> None:
        """Record ``[B]`` next positions (tokens cached) of rows ``0..B-1``."""
        self.next_pos[:positions.shape[0]] = positions

    # ------------------------------------------------------------------ decode writes
    def push_state(self, layer: int, which: str, a: torch.Tensor, z: torch.Tensor, positions: torch.Tensor) -> None:
        """Decode: the new tokens' projections ``a, z [B, c*d]`` into the partial window."""
        ratio = self.ratios[layer]
        row = torch.remainder(positions, ratio) + (CSA_RATIO if ratio == CSA_RATIO else 0)
        rows = self._batch_rows[:a.shape[0]]
        sa, sz = self._state[layer][which]
        sa[rows, row] = a
        sz[rows, row] = z

    def decode_entry_rows(self, layer: int, which: str, positions: torch.Tensor) -> torch.Tensor:
        """Decode: flat rows of ``entry_store`` for the entry ``p // ratio`` that the token at
        ``p`` completes, -1 (write nothing) for requests whose window stays open
        (``(p+1) % ratio != 0``).  The same for every layer of one ratio.  Masked, no host sync."""
        ratio = self.ratios[layer]
        per_request, first = self._entry_layout(layer, which)
        j = positions // ratio
        emit = (torch.remainder(positions + 1, ratio) == 0) & (j < self.n_entries(layer))
        return torch.where(emit, self._batch_rows[:positions.shape[0]] * per_request + first + j, -1)

    def advance_state(self, layer: int, which: str, positions: torch.Tensor) -> None:
        """Decode, after the step's entries are written: for ratio 4, the requests whose token
        completed a window keep it as their previous one.  Masked, no host sync."""
        if self.ratios[layer] != CSA_RATIO:
            return
        B = positions.shape[0]
        emit = (torch.remainder(positions + 1, CSA_RATIO) == 0)[:, None, None]
        for t in self._state[layer][which]:
            t[:B, :CSA_RATIO] = torch.where(emit, t[:B, CSA_RATIO:], t[:B, :CSA_RATIO])

    # ------------------------------------------------------------------ candidate indices
    def decode_candidates(self, layer: int, positions: torch.Tensor,
                          topk: Optional[torch.Tensor] = None) -> torch.Tensor:
        """int32 ``[B, 1, K]`` indices into ``kv(layer, B)`` for tokens at ``positions [B]``.

        ``topk`` (CSA layers): the indexer's ``[B, 1, k]`` entry ids, -1 padded."""
        ratio = self.ratios[layer]
        W = self.window
        p = positions.to(torch.int64)[:, None]
        q = p - (W - 1) + self._window_slots  # window positions, ascending
        parts = [torch.where(q >= 0, torch.remainder(q, W), -1)]
        if ratio == HCA_RATIO:
            j = self._entry_ids[:self.n_entries(layer)]
            parts.append(torch.where(j < (p + 1) // ratio, W + j, -1))
        elif ratio == CSA_RATIO:
            if topk is None:
                raise ValueError(f"topk: layer {layer} is a CSA layer, its candidates need the indexer's top-k")
            t = topk[:, 0].to(torch.int64)
            parts.append(torch.where(t >= 0, W + t, -1))
        return torch.cat(parts, dim=-1).to(torch.int32)[:, None, :]

    @staticmethod
    def prefill_candidates(seq_len: int, window: int, ratio: int, n_entries: int,
                           topk: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
        """int32 ``[1 or B, S, K]`` indices into ``[S prompt tokens | n_entries entries]`` for
        the tokens at positions ``0..S-1`` (every request's prompt starts at position 0)."""
        s = torch.arange(seq_len, device=device)[:, None]
        q = s - (window - 1) + torch.arange(window, device=device)
        parts = [torch.where(q >= 0, q, -1)[None]]
        if ratio == HCA_RATIO and n_entries:
            j = torch.arange(n_entries, device=device)
            parts.append(torch.where(j < (s + 1) // ratio, seq_len + j, -1)[None])
        elif ratio == CSA_RATIO and topk is not None:
            t = topk.to(torch.int64)
            parts.append(torch.where(t >= 0, seq_len + t, -1))
        elif ratio not in (WINDOW_ONLY, HCA_RATIO, CSA_RATIO):
            raise ValueError(f"ratio: expected one of 0, 4, 128, got {ratio}")
        batch = max(p.shape[0] for p in parts)
        return torch.cat([p.expand(batch, -1, -1) for p in parts], dim=-1).to(torch.int32)
