"""DSV4Model: the whole DeepSeek-V4 network over the op registry, with its own decode cache.

Batches of prompts of different lengths are **right padded**: row b of ``input_ids`` holds
its ``lengths[b]`` tokens first, then any valid token ids (never read by the real tokens:
attention is causal and compressed entries that contain padding are never candidates of a
real token, see ``cache.py``).  Every request starts at position 0 and then decodes at its
own position, so ``start_pos`` of a decode step is a ``[B]`` tensor.
"""

from __future__ import annotations

import os
from typing import Iterator, List, Optional, Sequence, Union

import torch
from torch import nn

from dsv4_triton import ops
from dsv4_triton import validate as V

from . import checkpoint
from .cache import KVCache
from .config import DSV4Config, get_config
from .layers import FP32, Block, Embedding, Linear, MTPLayer, Norm, Step, Weights

Prompts = Union[torch.Tensor, Sequence[Sequence[int]]]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class DSV4Model(Weights):
    """DeepSeek-V4 for inference.  Build with ``from_pretrained``; weights are buffers named
    as in the release checkpoint, the cache is sized ``[max_batch, max_seq_len]`` up front."""

    def __init__(self, config: DSV4Config, device=None, max_batch: int = 1, max_seq_len: int = 4096):
        super().__init__()
        V.positive_int("max_batch", max_batch)
        V.positive_int("max_seq_len", max_seq_len)
        c = self.config = config
        self.device = torch.device(device) if device is not None else default_device()
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.embed = Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.num_hidden_layers))
        self.mtp = nn.ModuleList(MTPLayer(c, k) for k in range(c.num_nextn_predict_layers))
        self.norm = Norm(c.hidden_size)
        self.head = Linear(c.hidden_size, c.vocab_size)
        n = c.hc_mult
        self.declare("hc_head_fn", (n, n * c.hidden_size), FP32, "hc_fn", n * c.hidden_size)
        self.declare("hc_head_base", (n,), FP32, "hc_base")
        self.declare("hc_head_scale", (1,), FP32, "hc_scale")
        if self.device.type == "meta":  # a skeleton that only describes the weights
            self.cache = None
            return
        self.cache = KVCache(c, max_batch, max_seq_len, self.device)
        self.build_rope_tables()

    def build_rope_tables(self) -> None:
        """(Re)compute the RoPE tables.  Pure sliding-window layers: rope_theta without YaRN;
        compressed layers (their queries, KV and entries alike): compress_rope_theta with
        YaRN (SPEC 6)."""
        c, rope = self.config, self.config.qk_rope_head_dim
        self.register_buffer("freqs_window", ops.rope_freqs(rope, self.max_seq_len, c.rope_theta, None, self.device),
                             persistent=False)
        self.register_buffer("freqs_compressed", ops.rope_freqs(rope, self.max_seq_len, c.compress_rope_theta,
                                                                c.yarn, self.device), persistent=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path_or_preset: Union[str, os.PathLike, DSV4Config], device=None, max_batch: int = 1,
                        max_seq_len: int = 4096, seed: int = 0, strict: bool = True) -> "DSV4Model":
        """A checkpoint directory (release layout, its ``config.json`` beside the shards), or a
        preset name (``tiny``, ``flash``, ``pro``), a ``config.json`` path or a ``DSV4Config``
        with random weights drawn from ``seed`` (see ``checkpoint.random_init``)."""
        if isinstance(path_or_preset, (str, os.PathLike)) and checkpoint.is_checkpoint_dir(path_or_preset):
            model = cls(DSV4Config.from_json(path_or_preset), device, max_batch, max_seq_len)
            checkpoint.load_checkpoint(model, path_or_preset, strict=strict, seed=seed)
        else:
            model = cls(get_config(path_or_preset), device, max_batch, max_seq_len)
            checkpoint.load_random(model, seed)
        return model.eval()

    def weights_loaded(self) -> None:
        """One-time preparation after the weights are in place (repacks the experts)."""
        for block in list(self.layers) + list(self.mtp):
            block.ffn.pack()

    # ------------------------------------------------------------------ inference
    def reset(self) -> None:
        """Forget every request in the cache."""
        self.cache.reset()

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, start_pos: Union[int, torch.Tensor] = 0,
                lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """FP32 logits ``[B, vocab]`` of each request's last position.

        Prefill (``start_pos == 0``): ``input_ids [B, S]``, right padded, request b's tokens
        are ``input_ids[b, :lengths[b]]`` (``lengths`` None: all S); the cache rows ``0..B-1``
        are (re)filled.  Decode (``start_pos`` a positive int or a ``[B]`` tensor of per-request
        positions): ``input_ids [B, 1]``, the token at that position of each request.
        """
        V.tensor("input_ids", input_ids, (torch.int32, torch.int64), ndim=2)
        B, S = input_ids.shape
        if not 1 <= B <= self.max_batch:
            raise ValueError(f"input_ids: expected 1..{self.max_batch} rows (max_batch), "
                             f"got shape {tuple(input_ids.shape)}")
        if S < 1:
            raise ValueError(f"input_ids: expected at least one token per row, got shape {tuple(input_ids.shape)}")
        V.same_device("input_ids", input_ids, "the model", self.freqs_window)
        step = self._step(input_ids, start_pos, lengths)
        if V.checks_enabled():
            self._check_values(input_ids, step)
        X = self.embed.weight[input_ids.reshape(-1)]  # [B*S, dim]
        X = X[:, None, :].expand(-1, self.config.hc_mult, -1).contiguous()  # one copy per mHC stream
        for block in self.layers:
            X = block(X, step)
        X = X.view(B, S, self.config.hc_mult, -1)
        last = X[:, 0] if step.decode else X[torch.arange(B, device=X.device), step.lengths - 1]
        self.cache.set_positions(step.lengths)
        c = self.config
        y = ops.hc_head(last, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, c.hc_eps, c.rms_norm_eps)
        y = ops.rms_norm(y, self.norm.weight, c.rms_norm_eps)
        return ops.linear(y, self.head.weight, out_dtype=torch.float32)

    def _step(self, input_ids: torch.Tensor, start_pos, lengths) -> Step:
        B, S = input_ids.shape
        dev = input_ids.device
        if isinstance(start_pos, torch.Tensor):
            V.tensor("start_pos", start_pos, (torch.int32, torch.int64), ndim=1)
            V.shape("start_pos", start_pos, (B,))
            V.same_device("start_pos", start_pos, "input_ids", input_ids)
            decode, pos = True, start_pos.to(torch.int64)
        else:
            if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
                raise TypeError(f"start_pos: expected a non-negative int or a [B] tensor, got {start_pos!r}")
            if start_pos >= self.max_seq_len:
                raise ValueError(f"start_pos: expected < max_seq_len = {self.max_seq_len}, got {start_pos}")
            decode = start_pos > 0
            pos = torch.full((B,), start_pos, dtype=torch.int64, device=dev)
        if decode:
            if S != 1:
                raise ValueError(f"input_ids: a decode step (start_pos != 0) takes one token per request, "
                                 f"got shape {tuple(input_ids.shape)}")
            if lengths is not None:
                raise ValueError("lengths: only a prefill (start_pos == 0) takes lengths")
            positions, lengths = pos[:, None], pos + 1
        else:
            if S > self.max_seq_len:
                raise ValueError(f"input_ids: expected at most max_seq_len = {self.max_seq_len} tokens, got {S}")
            if lengths is None:
                lengths = torch.full((B,), S, dtype=torch.int64, device=dev)
            else:
                V.tensor("lengths", lengths, (torch.int32, torch.int64), ndim=1)
                V.shape("lengths", lengths, (B,))
                V.same_device("lengths", lengths, "input_ids", input_ids)
                lengths = lengths.to(torch.int64)
            positions = torch.arange(S, device=dev).expand(B, S).contiguous()
        return Step(decode=decode, positions=positions, lengths=lengths, token_ids=input_ids.reshape(-1),
                    cache=self.cache, freqs_window=self.freqs_window, freqs_compressed=self.freqs_compressed)

    def _check_values(self, input_ids: torch.Tensor, step: Step) -> None:
        """Checked mode (``DSV4_CHECKS=1``): value checks that need a host sync."""
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"input_ids: expected token ids in [0, {self.config.vocab_size}), got [{lo}, {hi}]")
        B, S = input_ids.shape
        if step.decode:
            pos = step.positions[:, 0]
            if int(pos.max()) >= self.max_seq_len:
                raise ValueError(f"start_pos: expected positions < max_seq_len = {self.max_seq_len}, "
                                 f"got {pos.tolist()}")
            expected = self.cache.next_pos[:B]
            if not torch.equal(pos, expected):
                raise ValueError(f"start_pos: expected each request's next position {expected.tolist()}, "
                                 f"got {pos.tolist()}")
        elif int(step.lengths.min()) < 1 or int(step.lengths.max()) > S:
            raise ValueError(f"lengths: expected values in [1, {S}], got {step.lengths.tolist()}")

    # ------------------------------------------------------------------ greedy generation
    def _pad(self, prompts: Prompts):
        if isinstance(prompts, torch.Tensor):
            V.tensor("prompts", prompts, (torch.int32, torch.int64), ndim=2)
            ids = prompts.to(self.device)
            return ids, torch.full((ids.shape[0],), ids.shape[1], dtype=torch.int64, device=self.device)
        rows = [list(map(int, p)) for p in prompts]
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("prompts: expected at least one prompt, each of at least one token")
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.int64)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r)
        lengths = torch.tensor([len(r) for r in rows])
        return ids.to(self.device), lengths.to(self.device)

    @torch.no_grad()
    def generate_steps(self, prompts: Prompts, max_new_tokens: int, cuda_graph: bool = False) -> Iterator[torch.Tensor]:
        """Greedy decoding, one ``[B]`` tensor of new tokens per step (the first right after the
        prefill).  Prompts: a ``[B, S]`` tensor or lists of token ids of any lengths.
        ``cuda_graph`` (CUDA devices): decode steps after the first are replays of one
        captured step (see ``_graph_decode``)."""
        V.positive_int("max_new_tokens", max_new_tokens)
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph: needs the model on a CUDA device, got {self.device}")
        ids, lengths = self._pad(prompts)
        longest = ids.shape[1] if isinstance(prompts, torch.Tensor) else max(len(p) for p in prompts)
        if longest + max_new_tokens - 1 > self.max_seq_len:
            raise ValueError(f"max_new_tokens: the longest prompt ({longest}) plus {max_new_tokens} new tokens "
                             f"exceeds max_seq_len = {self.max_seq_len}")
        self.reset()
        token = self(ids, 0, lengths).argmax(-1)
        yield token
        if cuda_graph:
            yield from self._graph_decode(token, lengths, max_new_tokens - 1)
            return
        pos = lengths
        for _ in range(max_new_tokens - 1):
            token = self(token[:, None], pos).argmax(-1)
            pos = pos + 1
            yield token

    def _graph_decode(self, token: torch.Tensor, pos: torch.Tensor, steps: int) -> Iterator[torch.Tensor]:
        """``steps`` greedy decode steps from ``token`` at positions ``pos``: the first runs
        eagerly on the capture stream (so every kernel is compiled and tuned, and every
        library handle made, before capture), then one step is captured, whose last kernels
        write its token and next positions into its own inputs; each further step is one
        replay.  A decode step has fixed shapes and neither syncs nor allocates outside the
        graph's pool (``cache.py``), which is what makes it capturable; checked mode
        (``DSV4_CHECKS=1``) syncs and cannot be captured."""
        if steps <= 0:
            return
        if V.checks_enabled():
            raise ValueError("cuda_graph: checked mode (DSV4_CHECKS=1) syncs with the host and cannot be captured")
        static_token = token[:, None].clone()
        static_pos = pos.to(torch.int64).clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            first = self(static_token, static_pos).argmax(-1)
            static_token.copy_(first[:, None])
            static_pos.add_(1)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        yield first
        if steps == 1:
            return
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = self(static_token, static_pos).argmax(-1)
            static_token.copy_(out[:, None])
            static_pos.add_(1)
        for _ in range(steps - 1):
            graph.replay()
            yield out.clone()

    def generate(self, prompts: Prompts, max_new_tokens: int, eos_token_id: Optional[int] = None,
                 progress: bool = False) -> List[List[int]]:
        """Greedy continuation of each prompt: ``max_new_tokens`` ids per request, cut after
        ``eos_token_id`` when given."""
        steps = self.generate_steps(prompts, max_new_tokens)
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, total=max_new_tokens, desc="decode", unit="tok")
        out = torch.stack(list(steps), dim=1).tolist()
        if eos_token_id is not None:
            out = [row[:row.index(eos_token_id) + 1] if eos_token_id in row else row for row in out]
        return out
