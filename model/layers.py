"""The modules of DeepSeek-V4, as thin glue over ``dsv4_triton.ops``.

Every numeric step is an op of the registry (so the backend can be swapped underneath);
these modules only hold the weights, reshape, build indices and keep the cache.  Weights
are buffers whose names are the release's tensor names (SPEC 10): ``state_dict()`` of the
model *is* the checkpoint.  Each buffer is declared with ``declare`` together with its kind
(how it is stored, checked, converted and randomly initialised, see ``checkpoint.py``);
modules are built on the ``meta`` device and their weights assigned when loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from dsv4_triton import ops

from .cache import INDEX, MAIN, KVCache
from .config import CSA_RATIO, DSV4Config

E8M0 = torch.float8_e8m0fnu
FP8 = torch.float8_e4m3fn
BF16, FP32 = torch.bfloat16, torch.float32


@dataclass(frozen=True)
class WeightInfo:
    """What a weight buffer is (the checkpoint code keys conversions and init on ``kind``)."""

    kind: str  # fp8 | fp8_scale | fp4 | fp4_scale | linear | wo_a | embed | norm | hc_fn | hc_base
    #            | hc_scale | sink | ape | bias | tid2eid
    shape: Tuple[int, ...]
    dtype: torch.dtype  # as the model stores it (an FP8 weight's scale may also be kept in FP32)
    fan_in: int = 0
    init_gain: float = 1.0  # random init: std = init_gain / sqrt(fan_in) (see RESIDUAL_OUT_GAIN)


# Random init of the projections that end a residual branch (attention ``wo_b``, the experts'
# ``w2``): trained models keep each branch small against the residual stream it is added to
# (the stream's norm grows over the layers, each layer adds a small update).  With the plain
# 1/sqrt(fan_in) init every branch of the random model is as large as the stream itself
# (rms ~0.4 for attention, ~0.9 for the MoE against ~1-2), so a one-ulp BF16 difference,
# which the FP8 activation quantisers turn into whole FP8 steps (3 mantissa bits) on a few
# per cent of the elements and which flips near-tied router and indexer choices, moves the
# logits by 10-50 %; at 1/8 the branches are ~5-10 % of the stream and the same noise moves
# the logits by ~6 % (tests/test_model_backends.py).
RESIDUAL_OUT_GAIN = 0.125


class Weights(nn.Module):
    """A module whose weight buffers are declared with a kind (see ``WeightInfo``)."""

    def __init__(self):
        super().__init__()
        self.weight_info: Dict[str, WeightInfo] = {}

    def declare(self, name: str, shape: Tuple[int, ...], dtype: torch.dtype, kind: str, fan_in: int = 0,
                init_gain: float = 1.0) -> None:
        self.register_buffer(name, torch.empty(shape, dtype=dtype, device="meta"))
        self.weight_info[name] = WeightInfo(kind, tuple(shape), dtype, fan_in, init_gain)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# The FP8 codes and scales of an activation quantised once for the projections that read it.
Quantised = Optional[Tuple[torch.Tensor, torch.Tensor]]


class FP8Linear(Weights):
    """FP8 weight ``[out, in]`` with E8M0 (or FP32) 128x128 block scales (SPEC 3)."""

    def __init__(self, in_features: int, out_features: int, init_gain: float = 1.0):
        super().__init__()
        self.declare("weight", (out_features, in_features), FP8, "fp8", in_features, init_gain)
        self.declare("scale", (_cdiv(out_features, 128), _cdiv(in_features, 128)), E8M0, "fp8_scale")

    def forward(self, x: torch.Tensor, quantised: Quantised = None) -> torch.Tensor:
        """``x``'s BF16 rows, or with ``quantised`` the codes and scales of those rows (``normed``)."""
        if quantised is None:
            return ops.fp8_linear(x, self.weight, self.scale)
        return ops.fp8_linear(quantised[0], self.weight, self.scale, quantised[1])


def normed(x: torch.Tensor, weight: torch.Tensor, eps: float, quantise: bool) -> Tuple[torch.Tensor, Quantised]:
    """``rms_norm(x, weight)`` and, with ``quantise``, the FP8 codes and scales of its rows from
    the same pass (``rms_norm_act_quant``), which every FP8 projection reading those rows then
    takes instead of quantising them again.  The model quantises so in prefill; at decode the
    few BF16 rows go to the FP8 GEMMs as they are (the one-launch decode GEMM quantises inside)."""
    if not quantise:
        return ops.rms_norm(x, weight, eps), None
    y, codes, scales = ops.rms_norm_act_quant(x, weight, eps)
    return y, (codes, scales)


class Linear(Weights):
    """A plain BF16 weight ``[out, in]`` (compressor projections, indexer weights, router)."""

    def __init__(self, in_features: int, out_features: int, kind: str = "linear"):
        super().__init__()
        self.declare("weight", (out_features, in_features), BF16, kind, in_features)


class FP4Weight(Weights):
    """A routed expert's packed MXFP4 weight ``[out, in/2]`` and its E8M0 scales ``[out, in/32]``."""

    def __init__(self, in_features: int, out_features: int, init_gain: float = 1.0):
        super().__init__()
        self.declare("weight", (out_features, in_features // 2), torch.uint8, "fp4", in_features, init_gain)
        self.declare("scale", (out_features, in_features // 32), E8M0, "fp4_scale")


class Embedding(Weights):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.declare("weight", (vocab, dim), BF16, "embed")


class Norm(Weights):
    def __init__(self, dim: int):
        super().__init__()
        self.declare("weight", (dim,), BF16, "norm")


@dataclass
class Step:
    """What every layer of one forward call shares."""

    decode: bool
    positions: torch.Tensor  # [B, S] int64 absolute positions
    lengths: torch.Tensor  # [B] int64: tokens each request holds once this call is done
    token_ids: torch.Tensor  # [B*S] for hash routing
    cache: KVCache
    freqs_window: torch.Tensor  # rope_theta, no YaRN (pure sliding-window layers)
    freqs_compressed: torch.Tensor  # compress_rope_theta with YaRN (CSA/HCA layers)
    # Decode: per (ratio, compressor), the entry ids and destination rows of this step, made
    # once and shared by every layer of that ratio.
    entry_rows: Dict[Tuple[int, str], Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class Compressor(Weights):
    """Pools windows of ``ratio`` tokens into one compressed entry (SPEC 6)."""

    def __init__(self, dim: int, head_dim: int, ratio: int, eps: float):
        super().__init__()
        self.ratio, self.head_dim, self.eps = ratio, head_dim, eps
        width = 2 * head_dim if ratio == CSA_RATIO else head_dim
        self.declare("ape", (ratio, width), FP32, "ape")
        self.wkv = Linear(dim, width)
        self.wgate = Linear(dim, width)
        self.norm = Norm(head_dim)

    def _project(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return ops.linear(x, self.wkv.weight, out_dtype=FP32), ops.linear(x, self.wgate.weight, out_dtype=FP32)

    def prefill(self, x: torch.Tensor, step: Step, layer: int, which: str, kind: str) -> torch.Tensor:
        """Entries of the prompt's complete windows, ``[B, S // ratio, d]`` BF16 (prefill
        attention and the indexer read them with the prompt's tokens); the same launch writes
        them encoded into the cache, which also takes the partial window decode continues."""
        B, S, _ = x.shape
        a, z = self._project(x)
        cache = step.cache
        cache.fill_state(layer, which, a, z, step.lengths)
        r, n = self.ratio, S // self.ratio
        if n == 0:
            return a.new_empty(B, 0, self.head_dim, dtype=BF16)
        if r == CSA_RATIO:
            # Window i pools tokens 4i-4..4i+3: prepend 4 rows (never read for entry 0) and
            # take overlapping windows of 8 rows with stride 4.
            pad = a.new_zeros(B, r, a.shape[-1])
            a_win = torch.cat([pad, a[:, :n * r]], 1).unfold(1, 2 * r, r).transpose(-1, -2)
            z_win = torch.cat([pad, z[:, :n * r]], 1).unfold(1, 2 * r, r).transpose(-1, -2)
        else:
            a_win, z_win = a[:, :n * r].unflatten(1, (n, r)), z[:, :n * r].unflatten(1, (n, r))
        entry_idx = torch.arange(n, device=x.device).repeat(B)
        entries = ops.compress_entries(a_win.flatten(0, 1), z_win.flatten(0, 1), self.ape, self.norm.weight,
                                       step.freqs_compressed, entry_idx, r, kind, self.eps,
                                       cache=cache.entry_store(layer, which),
                                       rows=cache.prefill_entry_rows(layer, which, B, n))
        return entries.view(B, n, self.head_dim)

    def decode(self, x: torch.Tensor, step: Step, layer: int, which: str, kind: str) -> None:
        """Adds the new tokens to the partial windows; writes the entries that complete into
        the cache, encoded (one launch; requests whose window stays open write nothing)."""
        cache, B = step.cache, x.shape[0]
        positions = step.positions[:, 0]
        a, z = self._project(x[:, 0])
        cache.push_state(layer, which, a, z, positions)
        a_win, z_win = cache.state(layer, which, B)
        key = (self.ratio, which)
        if key not in step.entry_rows:
            step.entry_rows[key] = (positions // self.ratio, cache.decode_entry_rows(layer, which, positions))
        entry_idx, rows = step.entry_rows[key]
        ops.compress_entries_to_cache(a_win, z_win, self.ape, self.norm.weight, step.freqs_compressed, entry_idx,
                                      cache.entry_store(layer, which), rows, self.ratio, kind, self.eps)
        cache.advance_state(layer, which, positions)


class Indexer(Weights):
    """The lightning indexer of a CSA layer: picks the top-k compressed entries (SPEC 7)."""

    def __init__(self, config: DSV4Config):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = config.index_n_heads, config.index_head_dim, config.index_topk
        self.wq_b = FP8Linear(config.q_lora_rank, self.n_heads * self.head_dim)
        self.weights_proj = Linear(config.hidden_size, self.n_heads)
        self.compressor = Compressor(config.hidden_size, self.head_dim, CSA_RATIO, config.rms_norm_eps)
        # 128^-0.5 * 64^-0.5 for the releases (SPEC 7): head_dim^-0.5 * n_heads^-0.5.
        self.weight_scale = self.head_dim ** -0.5 * self.n_heads ** -0.5

    def forward(self, x: torch.Tensor, qr: torch.Tensor, step: Step, layer: int,
                qr_quantised: Quantised = None) -> Optional[torch.Tensor]:
        """``[B, S, k]`` entry ids (-1 padded), or None when the prompt has no entry yet."""
        B, S, _ = x.shape
        if step.decode:
            self.compressor.decode(x, step, layer, INDEX, "indexer")
            keys = step.cache.index_keys(layer, B)
        else:
            keys = self.compressor.prefill(x, step, layer, INDEX, "indexer")
            if keys.shape[1] == 0:
                return None
        qi = self.wq_b(qr, qr_quantised).view(B, S, self.n_heads, self.head_dim)
        qi = ops.rope_hadamard_qat4(qi, step.freqs_compressed, step.positions)
        w = ops.linear(x, self.weights_proj.weight, out_dtype=FP32) * self.weight_scale
        n_valid = ((step.positions + 1) // CSA_RATIO).to(torch.int32)
        return ops.indexer_topk(qi, w, keys, n_valid, self.topk)


class Attention(Weights):
    """MQA over a sliding window plus compressed entries, with a per-head sink (SPEC 5)."""

    def __init__(self, config: DSV4Config, ratio: int):
        super().__init__()
        c = config
        self.ratio, self.eps = ratio, c.rms_norm_eps
        self.n_heads, self.head_dim, self.window = c.num_attention_heads, c.head_dim, c.sliding_window
        self.groups, self.o_rank = c.o_groups, c.o_lora_rank
        self.declare("attn_sink", (self.n_heads,), FP32, "sink")
        self.wq_a = FP8Linear(c.hidden_size, c.q_lora_rank)
        self.q_norm = Norm(c.q_lora_rank)
        self.wq_b = FP8Linear(c.q_lora_rank, self.n_heads * self.head_dim)
        self.wkv = FP8Linear(c.hidden_size, self.head_dim)
        self.kv_norm = Norm(self.head_dim)
        group_in = self.n_heads * self.head_dim // self.groups
        # wo_a may arrive as FP8 + scale; it is kept in BF16 (dequantised on load, SPEC 10).
        self.wo_a = Linear(group_in, self.groups * self.o_rank, kind="wo_a")
        self.wo_b = FP8Linear(self.groups * self.o_rank, c.hidden_size, RESIDUAL_OUT_GAIN)
        self.compressor = Compressor(c.hidden_size, self.head_dim, ratio, self.eps) if ratio else None
        self.indexer = Indexer(c) if ratio == CSA_RATIO else None

    def forward(self, x: torch.Tensor, step: Step, layer: int, x_quantised: Quantised = None) -> torch.Tensor:
        """``x``: the normed rows ``[B, S, dim]``; ``x_quantised``: their codes and scales, if made."""
        B, S, _ = x.shape
        H, D = self.n_heads, self.head_dim
        freqs = step.freqs_compressed if self.ratio else step.freqs_window
        qr, qr_quantised = normed(self.wq_a(x, x_quantised), self.q_norm.weight, self.eps, x_quantised is not None)
        q = ops.rms_norm(self.wq_b(qr, qr_quantised).view(B, S, H, D), None, self.eps)
        q = ops.apply_rope_(q, freqs, step.positions)  # q is the norm's fresh output: rotate in place
        kv = ops.rms_norm(self.wkv(x, x_quantised), self.kv_norm.weight, self.eps)
        cache = step.cache
        if step.decode:
            # RoPE + qat8 + FP8 row into the ring slot, one launch; attention reads the rows.
            cache.store_window(layer, kv[:, 0], freqs, step.positions[:, 0])
            if self.compressor is not None:
                self.compressor.decode(x, step, layer, MAIN, "kv")
            topk = self.indexer(x, qr, step, layer, qr_quantised) if self.indexer is not None else None
            idx = cache.decode_candidates(layer, step.positions[:, 0], topk)
            kv_all = cache.kv(layer, B)
        else:
            cache.store_window(layer, kv, freqs, step.positions, step.lengths)
            kv = ops.rope_qat8(kv, freqs, step.positions)  # the prompt's own attention reads BF16
            n_entries, kv_all = 0, kv
            if self.compressor is not None:
                entries = self.compressor.prefill(x, step, layer, MAIN, "kv")
                n_entries = entries.shape[1]
                if n_entries:
                    kv_all = torch.cat([kv, entries], dim=1)
            topk = self.indexer(x, qr, step, layer, qr_quantised) if self.indexer is not None else None
            idx = KVCache.prefill_candidates(S, self.window, self.ratio, n_entries, topk, x.device)
            idx = idx.expand(B, -1, -1)
        o = ops.sparse_attention(q, kv_all, self.attn_sink, idx, D ** -0.5, freqs, step.positions)
        o = ops.grouped_linear(o.view(B * S, self.groups, H * D // self.groups),
                               self.wo_a.weight.view(self.groups, self.o_rank, H * D // self.groups))
        return self.wo_b(o.reshape(B, S, self.groups * self.o_rank))


class Expert(nn.Module):
    """One routed expert's three MXFP4 weights (w1, w3: ``[inter, dim]``, w2: ``[dim, inter]``)."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.w1 = FP4Weight(dim, inter)
        self.w2 = FP4Weight(inter, dim, RESIDUAL_OUT_GAIN)
        self.w3 = FP4Weight(dim, inter)


class SharedExpert(nn.Module):
    """The always-on expert: the same SwiGLU MLP with FP8 weights and no routing weight (SPEC 8)."""

    def __init__(self, dim: int, inter: int, limit: float):
        super().__init__()
        self.limit = limit
        self.w1 = FP8Linear(dim, inter)
        self.w2 = FP8Linear(inter, dim, RESIDUAL_OUT_GAIN)
        self.w3 = FP8Linear(dim, inter)

    def forward(self, x: torch.Tensor, x_quantised: Quantised = None) -> torch.Tensor:
        return self.w2(ops.swiglu(self.w1(x, x_quantised), self.w3(x, x_quantised), self.limit))


class Gate(Weights):
    """The router: score routing (``bias``) or, in the first layers, hash routing (``tid2eid``)."""

    def __init__(self, config: DSV4Config, hashed: bool):
        super().__init__()
        self.hashed = hashed
        self.declare("weight", (config.n_routed_experts, config.hidden_size), BF16, "linear", config.hidden_size)
        if hashed:
            self.declare("tid2eid", (config.vocab_size, config.num_experts_per_tok), torch.int32, "tid2eid")
        else:
            self.declare("bias", (config.n_routed_experts,), FP32, "bias")


class MoE(nn.Module):
    def __init__(self, config: DSV4Config, hashed: bool):
        super().__init__()
        c = config
        self.topk, self.route_scale, self.limit = c.num_experts_per_tok, c.routed_scaling_factor, c.swiglu_limit
        self.gate = Gate(c, hashed)
        self.experts = nn.ModuleList(Expert(c.hidden_size, c.moe_intermediate_size) for _ in range(c.n_routed_experts))
        self.shared_experts = SharedExpert(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts, self.limit)
        self.packed: Optional[Tuple[torch.Tensor, ...]] = None

    def pack(self) -> None:
        """The one-time repack of the experts' weights for ``moe_experts`` (after loading)."""
        e = self.experts
        self.packed = ops.moe_pack_experts(
            [x.w1.weight for x in e], [x.w1.scale for x in e], [x.w3.weight for x in e],
            [x.w3.scale for x in e], [x.w2.weight for x in e], [x.w2.scale for x in e])

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor, x_quantised: Quantised = None) -> torch.Tensor:
        g = self.gate
        if g.hashed:
            weights, ids = ops.route(x, g.weight, None, g.tid2eid, token_ids, self.topk, self.route_scale)
        else:
            weights, ids = ops.route(x, g.weight, g.bias, None, None, self.topk, self.route_scale)
        routed = ops.moe_experts(x, weights, ids, *self.packed, limit=self.limit, fmt="mxfp4")
        shared = self.shared_experts(x, x_quantised)
        # The two sums meet in FP32 (SPEC 8): torch adds BF16 tensors in FP32 and rounds once, so
        # this is (routed.float() + shared.float()).to(BF16) in one pass, without FP32 temporaries.
        return routed + shared


class Block(Weights):
    """One layer: mHC around attention, then around the MoE (SPEC 9)."""

    def __init__(self, config: DSV4Config, layer: int):
        super().__init__()
        c = config
        self.layer, self.ratio = layer, c.compress_ratios[layer]
        self.eps, self.hc_eps, self.iters = c.rms_norm_eps, c.hc_eps, c.hc_sinkhorn_iters
        n, mix = c.hc_mult, (2 + c.hc_mult) * c.hc_mult
        for part in ("attn", "ffn"):
            self.declare(f"hc_{part}_fn", (mix, n * c.hidden_size), FP32, "hc_fn", n * c.hidden_size)
            self.declare(f"hc_{part}_base", (mix,), FP32, "hc_base")
            self.declare(f"hc_{part}_scale", (3,), FP32, "hc_scale")
        self.attn_norm = Norm(c.hidden_size)
        self.ffn_norm = Norm(c.hidden_size)
        self.attn = Attention(c, self.ratio)
        self.ffn = MoE(c, hashed=layer < c.num_hash_layers)

    def forward(self, X: torch.Tensor, step: Step) -> torch.Tensor:
        """``X``: the residual streams ``[B*S, 4, dim]`` (bf16)."""
        B, S = step.positions.shape
        y, post, comb = ops.hc_pre(X, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base,
                                   self.iters, self.hc_eps, self.eps)
        h, hq = normed(y.view(B, S, -1), self.attn_norm.weight, self.eps, not step.decode)
        X = ops.hc_post(self.attn(h, step, self.layer, hq).view(B * S, -1), X, post, comb)
        y, post, comb = ops.hc_pre(X, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base,
                                   self.iters, self.hc_eps, self.eps)
        h, hq = normed(y, self.ffn_norm.weight, self.eps, not step.decode)
        return ops.hc_post(self.ffn(h, step.token_ids, hq), X, post, comb)


class MTPLayer(Block):
    """The optional multi-token-prediction layer (``mtp.0.*``): loaded and saved with the
    model, not run by ``forward`` (it drafts a further token for speculative decoding)."""

    def __init__(self, config: DSV4Config, index: int):
        super().__init__(config, config.num_hidden_layers + index)
        dim, n = config.hidden_size, config.hc_mult
        self.e_proj = FP8Linear(dim, dim)
        self.h_proj = FP8Linear(dim, dim)
        self.enorm, self.hnorm, self.norm = Norm(dim), Norm(dim), Norm(dim)
        self.declare("hc_head_fn", (n, n * dim), FP32, "hc_fn", n * dim)
        self.declare("hc_head_base", (n,), FP32, "hc_base")
        self.declare("hc_head_scale", (1,), FP32, "hc_scale")
