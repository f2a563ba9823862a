"""DeepSeek-V4 model configuration: the release's ``config.json`` as a validated dataclass.

Field names are those of the release's ``config.json`` (SPEC 1, 10).  Three presets are
built in: ``flash`` (V4-Flash), ``pro`` (V4-Pro) and ``tiny`` (a small model for tests and
demos with the same structure).  Reading a config rejects unknown keys and inconsistent
values with a ``ValueError`` naming the field; the descriptive keys a Hugging Face style
``config.json`` carries (``architectures``, ``torch_dtype``, token ids, ...) are accepted,
kept verbatim and written back, but play no part in the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

# Compression ratio of a layer: 0 = sliding window only, 4 = CSA, 128 = HCA (SPEC 1).
WINDOW_ONLY, CSA_RATIO, HCA_RATIO = 0, 4, 128
COMPRESS_RATIOS = (WINDOW_ONLY, CSA_RATIO, HCA_RATIO)

# Keys a release config.json may carry that describe the file rather than the network.
METADATA_KEYS = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "auto_map",
    "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "attention_bias",
    "attention_dropout", "initializer_range", "use_cache", "hidden_act",
})

YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")

# Values of release fields that select behaviour this model implements; anything else is
# a different architecture and is refused rather than silently run as this one.
FIXED_VALUES = {
    "n_shared_experts": 1,
    "num_key_value_heads": 1,
    "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "hc_mult": 4,
    "expert_dtype": "fp4",
}


def _fail(name: str, expected: str, got: Any) -> None:
    raise ValueError(f"config field {name!r}: expected {expected}, got {got!r}")


@dataclass(frozen=True)
class DSV4Config:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    compress_ratios: Tuple[int, ...]
    compress_rope_theta: float
    rope_theta: float
    rope_scaling: Optional[Dict[str, Any]]
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    routed_scaling_factor: float
    num_hash_layers: int
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    swiglu_limit: float = 10.0
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 0
    max_position_embeddings: int = 1 << 20
    quantization_config: Optional[Dict[str, Any]] = None
    expert_dtype: str = "fp4"
    n_shared_experts: int = 1
    num_key_value_heads: int = 1
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    # Descriptive keys of the file (see METADATA_KEYS), kept for the round trip.
    metadata: Dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compress_ratios", tuple(self.compress_ratios))
        self._validate()

    # ----------------------------------------------------------------- derived sizes
    @property
    def n_layers_total(self) -> int:
        """Main layers plus MTP layers (the length of ``compress_ratios``)."""
        return self.num_hidden_layers + self.num_nextn_predict_layers

    @property
    def yarn(self) -> Optional[Dict[str, float]]:
        """The YaRN arguments of ``ops.rope_freqs`` for compressed layers, or None."""
        if self.rope_scaling is None:
            return None
        return {k: self.rope_scaling[k] for k in YARN_KEYS}

    # ----------------------------------------------------------------- validation
    def _validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                    "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window",
                    "index_n_heads", "index_head_dim", "index_topk", "n_routed_experts",
                    "num_experts_per_tok", "moe_intermediate_size", "hc_sinkhorn_iters",
                    "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                _fail(name, "a positive int", value)
        for name in ("num_hash_layers", "num_nextn_predict_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                _fail(name, "a non-negative int", value)
        for name in ("compress_rope_theta", "rope_theta", "routed_scaling_factor", "hc_eps",
                     "swiglu_limit", "rms_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                    or not math.isfinite(value):
                _fail(name, "a positive finite number", value)
        for name, value in FIXED_VALUES.items():
            if getattr(self, name) != value:
                _fail(name, f"{value!r} (the only value this model implements)", getattr(self, name))

        if self.num_attention_heads % self.o_groups:
            _fail("o_groups", f"a divisor of num_attention_heads={self.num_attention_heads}", self.o_groups)
        rope = self.qk_rope_head_dim
        if rope % 2 or rope >= self.head_dim:
            _fail("qk_rope_head_dim", f"even and below head_dim={self.head_dim}", rope)
        if (self.head_dim - rope) % 64:
            # The KV vector's non-RoPE part is QAT'd in blocks of 64 (SPEC 5.2).
            _fail("head_dim", f"head_dim - qk_rope_head_dim a multiple of 64 (qk_rope_head_dim={rope})",
                  self.head_dim)
        idx = self.index_head_dim
        if idx & (idx - 1) or not 64 <= idx <= 512 or idx < rope:
            # The indexer vectors go through a Hadamard rotation (a power of two, SPEC 7).
            _fail("index_head_dim", f"a power of two in 64..512 and >= qk_rope_head_dim={rope}", idx)
        if self.hidden_size % 128 or self.q_lora_rank % 128:
            # act_quant blocks of 128 along the reduction dim of every FP8/FP4 linear (SPEC 3).
            bad = "hidden_size" if self.hidden_size % 128 else "q_lora_rank"
            _fail(bad, "a multiple of 128", getattr(self, bad))
        if self.moe_intermediate_size % 128:
            _fail("moe_intermediate_size", "a multiple of 128", self.moe_intermediate_size)
        if (self.o_groups * self.o_lora_rank) % 128:
            _fail("o_lora_rank", f"o_groups * o_lora_rank a multiple of 128 (o_groups={self.o_groups})",
                  self.o_lora_rank)
        if self.num_experts_per_tok > self.n_routed_experts:
            _fail("num_experts_per_tok", f"at most n_routed_experts={self.n_routed_experts}",
                  self.num_experts_per_tok)
        if self.num_hash_layers > self.num_hidden_layers:
            _fail("num_hash_layers", f"at most num_hidden_layers={self.num_hidden_layers}", self.num_hash_layers)

        ratios = self.compress_ratios
        if len(ratios) != self.n_layers_total:
            _fail("compress_ratios", f"{self.n_layers_total} entries (num_hidden_layers="
                  f"{self.num_hidden_layers} + num_nextn_predict_layers={self.num_nextn_predict_layers})",
                  list(ratios))
        for i, r in enumerate(ratios):
            if isinstance(r, bool) or r not in COMPRESS_RATIOS:
                _fail("compress_ratios", f"entries in {COMPRESS_RATIOS} (entry {i})", r)

        rs = self.rope_scaling
        if rs is not None:
            if not isinstance(rs, dict):
                _fail("rope_scaling", "a dict or None", rs)
            kind = rs.get("type", rs.get("rope_type"))
            if kind != "yarn":
                _fail("rope_scaling", "type 'yarn'", kind)
            unknown = set(rs) - set(YARN_KEYS) - {"type", "rope_type"}
            if unknown:
                _fail("rope_scaling", f"only the keys type, {', '.join(YARN_KEYS)}", sorted(unknown))
            for key in YARN_KEYS:
                value = rs.get(key)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                    _fail(f"rope_scaling.{key}", "a positive number", value)
        if self.quantization_config is not None and not isinstance(self.quantization_config, dict):
            _fail("quantization_config", "a dict or None", self.quantization_config)
        unknown = set(self.metadata) - METADATA_KEYS
        if unknown:
            _fail("metadata", f"only descriptive keys ({', '.join(sorted(METADATA_KEYS))})", sorted(unknown))

    # ----------------------------------------------------------------- (de)serialisation
    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "DSV4Config":
        if not isinstance(data, dict):
            raise ValueError(f"config: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"metadata"}
        unknown = sorted(set(data) - names - METADATA_KEYS)
        if unknown:
            raise ValueError(f"config: unknown field(s) {unknown}; known: {sorted(names)} "
                             f"(and descriptive keys {sorted(METADATA_KEYS)})")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name in names and f.name not in data
                         and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        if missing:
            raise ValueError(f"config: missing field(s) {missing}")
        kwargs = {k: v for k, v in data.items() if k in names}
        metadata = {k: v for k, v in data.items() if k in METADATA_KEYS}
        for name in ("compress_rope_theta", "rope_theta", "routed_scaling_factor", "hc_eps",
                     "swiglu_limit", "rms_norm_eps"):
            if isinstance(kwargs.get(name), int) and not isinstance(kwargs.get(name), bool):
                kwargs[name] = float(kwargs[name])
        if isinstance(kwargs.get("compress_ratios"), list):
            kwargs["compress_ratios"] = tuple(kwargs["compress_ratios"])
        return cls(**kwargs, metadata=metadata)

    def to_dict(self) -> Dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "metadata"}
        out["compress_ratios"] = list(self.compress_ratios)
        out.update(self.metadata)
        return out

    @classmethod
    def from_json(cls, path: Union[str, os.PathLike]) -> "DSV4Config":
        """Read a ``config.json`` file (or a directory holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"config: {path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def to_json(self, path: Union[str, os.PathLike, None] = None) -> str:
        """The config as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    def replace(self, **changes) -> "DSV4Config":
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- presets
_RELEASE_YARN = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                 "beta_fast": 32, "beta_slow": 1}
_RELEASE_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}


def _alternating(first: int, last: int) -> list:
    """Layers first..last: even layers CSA (4), odd layers HCA (128) (SPEC 1)."""
    return [CSA_RATIO if i % 2 == 0 else HCA_RATIO for i in range(first, last + 1)]


def flash() -> DSV4Config:
    return DSV4Config(
        vocab_size=129280, hidden_size=4096, num_hidden_layers=43, num_attention_heads=64, head_dim=512,
        qk_rope_head_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024, sliding_window=128,
        compress_ratios=tuple([0, 0] + _alternating(2, 42) + [0]), compress_rope_theta=160000.0,
        rope_theta=10000.0, rope_scaling=dict(_RELEASE_YARN), index_n_heads=64, index_head_dim=128,
        index_topk=512, n_routed_experts=256, num_experts_per_tok=6, moe_intermediate_size=2048,
        routed_scaling_factor=1.5, num_hash_layers=3, num_nextn_predict_layers=1,
        quantization_config=dict(_RELEASE_QUANT))


def pro() -> DSV4Config:
    return DSV4Config(
        vocab_size=129280, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, head_dim=512,
        qk_rope_head_dim=64, q_lora_rank=1536, o_groups=16, o_lora_rank=1024, sliding_window=128,
        compress_ratios=tuple([128, 128] + _alternating(2, 60) + [0]), compress_rope_theta=160000.0,
        rope_theta=10000.0, rope_scaling=dict(_RELEASE_YARN), index_n_heads=64, index_head_dim=128,
        index_topk=1024, n_routed_experts=384, num_experts_per_tok=6, moe_intermediate_size=3072,
        routed_scaling_factor=2.5, num_hash_layers=3, num_nextn_predict_layers=1,
        quantization_config=dict(_RELEASE_QUANT))


def tiny() -> DSV4Config:
    return DSV4Config(
        vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, head_dim=128,
        qk_rope_head_dim=64, q_lora_rank=128, o_groups=2, o_lora_rank=64, sliding_window=16,
        compress_ratios=(0, 4, 128, 4), compress_rope_theta=160000.0, rope_theta=10000.0,
        rope_scaling=dict(_RELEASE_YARN, original_max_position_embeddings=64), index_n_heads=4,
        index_head_dim=128, index_topk=8, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=128, routed_scaling_factor=1.5, num_hash_layers=1,
        num_nextn_predict_layers=0, max_position_embeddings=4096, quantization_config=dict(_RELEASE_QUANT))


PRESETS = {"flash": flash, "pro": pro, "tiny": tiny}


def get_config(name_or_path: Union[str, os.PathLike, DSV4Config]) -> DSV4Config:
    """A preset name (``flash``, ``pro``, ``tiny``), a ``config.json`` path or a directory holding one."""
    if isinstance(name_or_path, DSV4Config):
        return name_or_path
    if isinstance(name_or_path, str) and name_or_path in PRESETS:
        return PRESETS[name_or_path]()
    if os.path.exists(name_or_path):
        return DSV4Config.from_json(name_or_path)
    raise ValueError(f"config: expected a preset {sorted(PRESETS)}, a config.json path or a directory "
                     f"holding one, got {name_or_path!r}")
