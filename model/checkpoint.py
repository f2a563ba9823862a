"""Checkpoints in the release layout (SPEC 10): load, save, and realistic random weights.

A checkpoint is a directory of safetensors shards (with or without
``model.safetensors.index.json``) and ``config.json``.  Loading opens one shard at a time
and reads one tensor at a time straight onto the model's device (``safe_open``), checks its
name, dtype and shape against what the model declares, converts where the release allows
several encodings, and assigns it:

* FP8 weights: float8_e4m3fn with a ``.scale`` companion (E8M0, or FP32 as some tools write
  it; ``weight_scale_inv`` is accepted as the scale's name).
* Routed experts (MXFP4): int8 / uint8 / float4_e2m1fn_x2 ``[out, in/2]`` (kept as uint8)
  with float8_e8m0fnu scales ``[out, in/32]``.
* ``wo_a``: BF16, or FP8 + scale, dequantised to BF16 on load.
* ``tid2eid``: int32 or int64 (kept as int32, ids checked against the expert count).
* Other tensors: any float dtype, cast to the model's (BF16 norms and projections, FP32
  mHC parameters, sinks, ``ape`` and router bias).

Anything missing, unexpected, wrongly shaped or wrongly typed is an error naming the tensor;
``strict=False`` instead skips unexpected tensors, fills missing ones with random weights
and returns (and logs) both lists.  A checkpoint without ``mtp.*`` tensors loads into a
model without its MTP layer.  ``save_checkpoint`` writes the same layout back, bit for bit.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dsv4_triton import formats as F
from dsv4_triton import ops

from .config import DSV4Config
from .layers import E8M0, FP8, Weights, WeightInfo

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SCALE_ALIAS = ".weight_scale_inv"
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP4_DTYPES = (torch.int8, torch.uint8, torch.float4_e2m1fn_x2)
FP8_BLOCK = 128  # FP8 weight scales: one per 128x128 block (SPEC 3)


class CheckpointError(ValueError):
    """A checkpoint that does not match the model (the message names the tensor or file)."""


@dataclass
class LoadReport:
    skipped: List[str] = field(default_factory=list)  # in the checkpoint, unknown to the model
    missing: List[str] = field(default_factory=list)  # expected by the model, filled randomly
    dropped_mtp: bool = False  # the checkpoint has no MTP layer; the model's was removed


# ---------------------------------------------------------------------------- weight specs
def weight_specs(model: torch.nn.Module) -> Dict[str, WeightInfo]:
    """Every weight the model declares, by release name, in module order."""
    specs = {}
    for prefix, module in model.named_modules():
        if isinstance(module, Weights):
            for name, info in module.weight_info.items():
                specs[f"{prefix}.{name}" if prefix else name] = info
    return specs


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    prefix, _, attr = name.rpartition(".")
    module = model.get_submodule(prefix) if prefix else model
    module._buffers[attr] = tensor


def _canonical(name: str) -> str:
    return name[:-len(SCALE_ALIAS)] + ".scale" if name.endswith(SCALE_ALIAS) else name


def _companion_scale(name: str) -> str:
    """``....weight`` -> ``....scale``."""
    return name[:-len("weight")] + "scale"


# ---------------------------------------------------------------------------- FP8 blocks
def quantize_fp8_blocks(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """FP32 ``[N, K]`` -> FP8 weight and E8M0 scales ``[ceil(N/128), ceil(K/128)]``: the
    activation quantiser's rule (SPEC 2) applied to 128x128 blocks, as release weights are."""
    n, k = w.shape
    nb, kb = -(-n // FP8_BLOCK), -(-k // FP8_BLOCK)
    padded = w.new_zeros(nb * FP8_BLOCK, kb * FP8_BLOCK)
    padded[:n, :k] = w
    blocks = padded.view(nb, FP8_BLOCK, kb, FP8_BLOCK)
    amax = blocks.permute(0, 2, 1, 3).reshape(nb, kb, -1).abs().amax(dim=-1).clamp_min(1e-4)
    exp = F.ceil_log2(amax / F.FP8_MAX)
    scale = F.exp2_int(exp)[:, None, :, None]
    q = F.fp8_encode((blocks / scale).clamp(-F.FP8_MAX, F.FP8_MAX)).view(nb * FP8_BLOCK, kb * FP8_BLOCK)
    return q[:n, :k].contiguous(), F.e8m0_encode(exp)


def dequantize_fp8_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 ``[N, K]`` with 128x128 block scales (E8M0 or FP32) -> FP32."""
    s = F.e8m0_to_float(scale) if scale.dtype == E8M0 else scale.float()
    s = s.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:q.shape[0], :q.shape[1]]
    return q.float() * s


# ---------------------------------------------------------------------------- random weights
def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """Each tensor draws from its own stream, so a weight does not depend on which others exist."""
    return torch.Generator(device=device).manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2 ** 63))


def _random_weight(name: str, info: WeightInfo, specs: Dict[str, WeightInfo], seed: int,
                   config: DSV4Config, device=None) -> Dict[str, torch.Tensor]:
    """Random values for ``name`` (and its scale, for quantised weights), drawn on ``device``
    (default CPU; a GPU draws other values from the same seed, much faster for big configs).

    Linear weights ~ N(0, 1/fan_in), times ``init_gain`` for the projections that end a
    residual branch (``RESIDUAL_OUT_GAIN``) (FP8 ones quantised in 128x128 blocks with E8M0
    scales, FP4 experts per 32 with E8M0 scales); norm weights ~ 1; mHC parameters small
    (the mix stays near its base: pre ~ 1/2, post ~ 1, comb ~ uniform); router bias 0;
    tid2eid distinct random experts per token."""
    device = torch.device("cpu") if device is None else torch.device(device)
    g = _generator(seed, name, device)
    kind, shape = info.kind, info.shape

    def normal(*s):
        return torch.randn(*s, generator=g, device=device)

    if kind == "fp8":
        q, scale = quantize_fp8_blocks(normal(*shape) * (info.init_gain * info.fan_in ** -0.5))
        return {name: q, _companion_scale(name): scale}
    if kind == "fp4":
        packed, scale = ops.fp4_quant(normal(shape[0], 2 * shape[1]) * (info.init_gain * info.fan_in ** -0.5), 32)
        return {name: packed, _companion_scale(name): scale}
    if kind in ("fp8_scale", "fp4_scale"):
        weight = name[:-len("scale")] + "weight"
        return {name: _random_weight(weight, specs[weight], specs, seed, config, device)[name]}
    if kind in ("linear", "wo_a"):
        value = normal(*shape) * info.fan_in ** -0.5
    elif kind == "embed":
        value = normal(*shape)
    elif kind == "norm":
        value = 1.0 + 0.05 * normal(*shape)
    elif kind == "hc_fn":
        value = 0.1 * info.fan_in ** -0.5 * normal(*shape)
    elif kind == "hc_base":
        value = 0.1 * normal(*shape)
    elif kind == "hc_scale":
        value = 0.1 + 0.05 * torch.rand(*shape, generator=g, device=device)
    elif kind == "sink":
        value = normal(*shape)
    elif kind == "ape":
        value = 0.1 * normal(*shape)
    elif kind == "bias":
        value = torch.zeros(*shape, device=device)
    elif kind == "tid2eid":
        ranks = torch.rand(shape[0], config.n_routed_experts, generator=g, device=device).argsort(dim=1)
        return {name: ranks[:, :shape[1]].to(torch.int32).contiguous()}
    else:
        raise AssertionError(f"no random init for kind {kind!r}")
    return {name: value.to(info.dtype)}


def random_init(config: DSV4Config, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Realistic random weights for ``config``, by release name (CPU tensors): what a
    checkpoint of that shape would hold, drawn deterministically from ``seed``."""
    from .dsv4 import DSV4Model

    specs = weight_specs(DSV4Model(config, device="meta"))
    out: Dict[str, torch.Tensor] = {}
    for name, info in specs.items():
        if name not in out:
            out.update(_random_weight(name, info, specs, seed, config))
    return out


def load_random(model, seed: int = 0) -> None:
    """Fill ``model`` (built by ``DSV4Model``) with random weights drawn on its device (on the
    CPU, exactly ``random_init``'s)."""
    specs = weight_specs(model)
    done = set()
    for name, info in specs.items():
        if name in done:
            continue
        for key, value in _random_weight(name, info, specs, seed, model.config, model.device).items():
            _assign(model, key, _convert(key, specs[key], value, model.config.n_routed_experts))
            done.add(key)
    model.weights_loaded()


# ---------------------------------------------------------------------------- loading
def is_checkpoint_dir(path) -> bool:
    path = os.fspath(path)
    return os.path.isdir(path) and (os.path.exists(os.path.join(path, INDEX_FILE))
                                    or bool(glob.glob(os.path.join(path, "*.safetensors"))))


def _open(path: str, device: str):
    try:
        return safe_open(path, framework="pt", device=device)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint file {path}: cannot be read (truncated or corrupt?): {e}") from None


def checkpoint_files(directory: str) -> Dict[str, str]:
    """Tensor name (as stored) -> shard path, from the index json or by reading each shard's header."""
    index_path = os.path.join(directory, INDEX_FILE)
    where: Dict[str, str] = {}
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a safetensors index (no weight_map): {e}") from None
        for name, file in weight_map.items():
            path = os.path.join(directory, file)
            if not os.path.exists(path):
                raise CheckpointError(f"{index_path}: tensor {name} is in {file}, which does not exist")
            where[name] = path
        return where
    shards = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not shards:
        raise CheckpointError(f"checkpoint {directory}: no *.safetensors files and no {INDEX_FILE}")
    for path in shards:
        with _open(path, "cpu") as f:
            for name in f.keys():
                if name in where:
                    raise CheckpointError(f"checkpoint {directory}: tensor {name} is in both "
                                          f"{os.path.basename(where[name])} and {os.path.basename(path)}")
                where[name] = path
    return where


def _expect_dtype(name: str, tensor: torch.Tensor, allowed: Tuple[torch.dtype, ...]) -> None:
    if tensor.dtype not in allowed:
        names = "/".join(str(d).replace("torch.", "") for d in allowed)
        got = str(tensor.dtype).replace("torch.", "")
        raise TypeError(f"checkpoint tensor {name}: expected dtype {names}, got {got}")


def _convert(name: str, info: WeightInfo, tensor: torch.Tensor, n_experts: int,
             scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Check a loaded tensor against its declaration and bring it to the model's encoding."""
    kind = info.kind
    if kind == "fp8":
        _expect_dtype(name, tensor, (FP8,))
    elif kind == "fp8_scale":
        _expect_dtype(name, tensor, (E8M0, torch.float32))  # kept as is: fp8_linear takes both
    elif kind == "fp4":
        _expect_dtype(name, tensor, FP4_DTYPES)
        tensor = tensor.view(torch.uint8)
    elif kind == "fp4_scale":
        _expect_dtype(name, tensor, (E8M0,))
    elif kind == "tid2eid":
        _expect_dtype(name, tensor, (torch.int32, torch.int64))
    elif kind == "wo_a" and tensor.dtype == FP8:
        if scale is None:
            raise CheckpointError(f"checkpoint tensor {name}: an FP8 wo_a needs its scale {_companion_scale(name)}")
        tensor = dequantize_fp8_blocks(tensor, scale)
    else:
        _expect_dtype(name, tensor, FLOAT_DTYPES + ((FP8,) if kind == "wo_a" else ()))
    if tuple(tensor.shape) != info.shape:
        raise CheckpointError(f"checkpoint tensor {name}: expected shape {info.shape}, got {tuple(tensor.shape)}")
    if kind == "tid2eid" and tensor.numel():
        lo, hi = int(tensor.min()), int(tensor.max())
        if lo < 0 or hi >= n_experts:
            raise CheckpointError(f"checkpoint tensor {name}: expert ids must lie in [0, {n_experts}), "
                                  f"got values in [{lo}, {hi}]")
    if kind in ("fp8_scale", "fp4"):
        return tensor
    return tensor.to(info.dtype)


def _device_str(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return str(device)


def _read(f, name: str, path: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except SafetensorError as e:
        raise CheckpointError(f"checkpoint file {path}: tensor {name} cannot be read (truncated or corrupt?): "
                              f"{e}") from None


def _listing(names: List[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def load_checkpoint(model, directory: Union[str, os.PathLike], strict: bool = True, seed: int = 0) -> LoadReport:
    """Load a release-layout checkpoint into ``model`` (a ``DSV4Model``), one tensor at a time,
    straight onto the model's device.  ``strict=False``: unexpected tensors are skipped and
    missing ones drawn from ``seed`` as ``random_init`` would; both are listed in the report."""
    directory = os.fspath(directory)
    stored = checkpoint_files(directory)
    by_name: Dict[str, str] = {}  # canonical name -> stored name
    for stored_name in stored:
        canon = _canonical(stored_name)
        if canon in by_name:
            raise CheckpointError(f"checkpoint {directory}: {by_name[canon]} and {stored_name} are the same tensor")
        by_name[canon] = stored_name
    report = LoadReport()
    if len(model.mtp) and not any(n.startswith("mtp.") for n in by_name):
        model.mtp = torch.nn.ModuleList()
        report.dropped_mtp = True
        log.info("checkpoint %s has no mtp.* tensors: the model is loaded without its MTP layer", directory)
    specs = weight_specs(model)
    wo_a_scales = {_companion_scale(n) for n, info in specs.items() if info.kind == "wo_a"}
    unexpected = sorted(n for n in by_name if n not in specs and n not in wo_a_scales)
    missing = [n for n in specs if n not in by_name]
    if strict and (unexpected or missing):
        parts = []
        if missing:
            parts.append(f"missing tensor(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected tensor(s): {_listing(unexpected)}")
        raise CheckpointError(f"checkpoint {directory} does not match the config: " + "; ".join(parts))

    device = _device_str(model.device)
    per_file: Dict[str, List[str]] = {}
    for canon, stored_name in by_name.items():
        if canon in specs:
            per_file.setdefault(stored[stored_name], []).append(canon)
    used_scales = set()
    for path in sorted(per_file):
        with _open(path, device) as f:
            keys = set(f.keys())
            for canon in per_file[path]:
                stored_name = by_name[canon]
                if stored_name not in keys:
                    raise CheckpointError(f"checkpoint file {path}: tensor {stored_name} (listed in the index) "
                                          f"is not in the file")
                tensor = _read(f, stored_name, path)
                scale = None
                if specs[canon].kind == "wo_a" and tensor.dtype == FP8:
                    scale_name = _companion_scale(canon)
                    if scale_name in by_name:
                        with _open(stored[by_name[scale_name]], device) as g:
                            scale = _read(g, by_name[scale_name], stored[by_name[scale_name]])
                        _expect_dtype(scale_name, scale, (E8M0, torch.float32))
                        used_scales.add(scale_name)
                _assign(model, canon, _convert(canon, specs[canon], tensor, model.config.n_routed_experts, scale))
    stray_scales = sorted(n for n in wo_a_scales & set(by_name) if n not in used_scales)
    if stray_scales and strict:
        raise CheckpointError(f"checkpoint {directory}: unexpected tensor(s) {_listing(stray_scales)} "
                              f"(a scale for a wo_a that is not FP8)")
    report.skipped = unexpected + stray_scales
    for name in missing:
        value = _random_weight(name, specs[name], specs, seed, model.config, model.device)[name]
        _assign(model, name, _convert(name, specs[name], value, model.config.n_routed_experts))
    report.missing = missing
    if report.skipped:
        log.warning("checkpoint %s: skipped %d unexpected tensor(s): %s", directory, len(report.skipped),
                    _listing(report.skipped))
    if report.missing:
        log.warning("checkpoint %s: %d missing tensor(s) filled with random weights: %s", directory,
                    len(report.missing), _listing(report.missing))
    model.weights_loaded()
    return report


# ---------------------------------------------------------------------------- saving
def _shard_tensors(model) -> Iterator[Tuple[str, torch.Tensor]]:
    for name, info in weight_specs(model).items():
        prefix, _, attr = name.rpartition(".")
        tensor = (model.get_submodule(prefix) if prefix else model)._buffers[attr]
        if tensor.device.type == "meta":
            raise ValueError(f"model: weight {name} was never loaded")
        if info.kind == "fp4":
            tensor = tensor.view(torch.int8)  # the release stores packed FP4 as int8
        yield name, tensor


def save_checkpoint(model, directory: Union[str, os.PathLike], shard_size: int = 4 << 30) -> List[str]:
    """Write ``model``'s weights in the release layout: shards of at most ``shard_size`` bytes
    (a larger tensor gets a shard of its own), the index json and ``config.json``.
    Returns the shard file names."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= 0:
        raise ValueError(f"shard_size: expected a positive number of bytes, got {shard_size!r}")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = total = 0
    for name, tensor in _shard_tensors(model):
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().to("cpu").contiguous()
        size += nbytes
        total += nbytes
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, file), metadata={"format": "pt"})
        files.append(file)
        weight_map.update({name: file for name in shard})
    with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    model.config.to_json(os.path.join(directory, "config.json"))
    return files
