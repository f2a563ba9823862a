"""Autotuning with a committed cache, so users do not pay tuning time.

Kernels with more than one good configuration are decorated with ``autotune`` (a thin
layer over ``triton.autotune``).  At import, the choices stored for the current GPU
in ``autotune_cache/<gpu-name>.json`` are put into each tuner's cache, so a shape that
was tuned on that GPU runs its best config on the first call.  A shape missing from the
file is tuned on first use, as plain ``triton.autotune`` would (do that before
capturing a CUDA graph).

``python -m dsv4_triton.autotune [ops]`` runs the benchmark shapes (which tunes every
kernel on them) and writes the file for the GPU it runs on.

Under the Triton interpreter (CPU tests) only the first config is used: timing configs
on the interpreter measures nothing.  ``DSV4_AUTOTUNE=0`` (read at import) does the same on
a GPU: the test suite sets it, because tuning every hypothesis shape compiles every config
(minutes); the benchmarks tune, and check the tuned kernels against the oracles.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Dict, List

import triton

from ..registry import triton_interpreter_on

CACHE_DIR = Path(__file__).resolve().parent.parent.parent / "autotune_cache"
_TUNERS: Dict[str, "triton.runtime.Autotuner"] = {}
_TUNING_ON = os.environ.get("DSV4_AUTOTUNE", "1") != "0"
_loaded_for: Dict[str, str] = {}


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _cache_file(device_name: str) -> Path:
    return CACHE_DIR / f"{gpu_slug(device_name)}.json"


def _current_gpu_name() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name()


def _config_to_json(cfg: "triton.Config") -> dict:
    return {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _load_into(name: str, tuner) -> None:
    gpu = _current_gpu_name()
    if gpu is None:
        return
    path = _cache_file(gpu)
    if not path.exists():
        return
    entries = json.loads(path.read_text()).get(name, [])
    # A stored choice is used only if it is still one of the kernel's configs: after a kernel
    # changes, stale entries are ignored (tuned again on first use), never launched.
    current = {json.dumps(_config_to_json(c), sort_keys=True): c for c in tuner.configs}
    for entry in entries:
        cfg = current.get(json.dumps(entry["config"], sort_keys=True))
        if cfg is not None:
            tuner.cache[tuple(entry["key"])] = cfg
    _loaded_for[name] = gpu


def token_bucket(T: int) -> int:
    """Tuning key for the token count: 16, 64, 256, 1024 or 4096 (the next power of 4, capped),
    so varying batch sizes share a few tuned entries instead of tuning every T."""
    b = 16
    while b < min(T, 4096):
        b *= 4
    return b


def autotune(configs: List["triton.Config"], key: List[str], name: str | None = None, **kwargs):
    """``triton.autotune`` whose choices are persisted per GPU (see module doc)."""

    def deco(fn):
        tuner_name = name or fn.__name__
        chosen = configs[:1] if (triton_interpreter_on() or not _TUNING_ON) else configs
        tuner = triton.autotune(chosen, key=key, **kwargs)(fn)
        _TUNERS[tuner_name] = tuner
        if not triton_interpreter_on():
            _load_into(tuner_name, tuner)
        return tuner

    return deco


def launcher(tuner, config: "triton.Config | None" = None):
    """(kernel, launch kwargs) to run ``tuner``'s kernel with its tuned choice (``config`` None)
    or with ``config`` given explicitly (to test or time one form): ``kernel[grid](..., **kw)``."""
    if config is None:
        return tuner, {}
    return tuner.fn, dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def disable_tuning() -> None:
    """From now on, a shape with no stored choice runs its kernel's first config instead of
    timing every config (as ``DSV4_AUTOTUNE=0`` does from import); stored choices still apply.
    For short runs where tuning time would dominate (demos)."""
    for tuner in _TUNERS.values():
        tuner.configs = tuner.configs[:1]


def save(directory: Path | None = None) -> Path:
    """Write every tuner's cache for the current GPU (merging with what the file had)."""
    gpu = _current_gpu_name()
    if gpu is None:
        raise RuntimeError("autotune.save needs a CUDA GPU")
    path = (Path(directory) / _cache_file(gpu).name) if directory else _cache_file(gpu)
    data = json.loads(path.read_text()) if path.exists() else {}
    data["_gpu"] = gpu
    for tuner_name, tuner in sorted(_TUNERS.items()):
        merged = {json.dumps(e["key"]): e for e in data.get(tuner_name, [])}
        for k, cfg in tuner.cache.items():
            key = [v if isinstance(v, (int, float, str, bool)) else str(v) for v in k]
            merged[json.dumps(key)] = {"key": key, "config": _config_to_json(cfg)}
        if merged:
            data[tuner_name] = [merged[k] for k in sorted(merged)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


def main(argv: List[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if _current_gpu_name() is None:
        print("autotune: no CUDA GPU here; nothing to tune (the committed caches stay as they are)")
        return 0
    from ..bench.__main__ import run_benchmarks

    os.environ.setdefault("DSV4_BENCH_QUICK", "1")
    run_benchmarks(argv, write_results=False, compile_baselines=False)
    print(f"autotune: wrote {save()}")
    return 0


