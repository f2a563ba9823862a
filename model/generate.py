"""Greedy generation demo: ``python -m model.generate``.

Without arguments: the tiny config with seeded random weights, a random prompt, greedy
decoding with a progress bar, then prefill and decode throughput and the backend the
registry chose for each op.  On a GPU a warm-up pass of the same shapes runs first (it
compiles the kernels and counts the kernel launches of one decode step), so the
throughput figures exclude compilation; the tuned kernels run their first config unless
``--autotune`` is given (tuning the model's shapes compiles every config: minutes), and
``--cuda-graph`` replays one captured decode step per token.  A decode step has the same
shapes at every position, so nothing is compiled or tuned again while decoding.
``--checkpoint DIR`` loads a release-layout checkpoint (and its
``tokenizer.json`` if the ``tokenizers`` package is installed, so ``--prompt "text"`` works).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

import torch

import dsv4_triton
from dsv4_triton import ops, registry

from .config import DSV4Config, get_config
from .dsv4 import DSV4Model, default_device


def truncated(config: DSV4Config, layers: int) -> DSV4Config:
    """The first ``layers`` layers of ``config`` (same dims and schedule), without MTP layers."""
    if layers > config.num_hidden_layers:
        raise SystemExit(f"--layers: the config has {config.num_hidden_layers} layers, got {layers}")
    return config.replace(num_hidden_layers=layers, compress_ratios=config.compress_ratios[:layers],
                          num_nextn_predict_layers=0, num_hash_layers=min(config.num_hash_layers, layers))


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model.generate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="checkpoint directory (release layout, with config.json)")
    p.add_argument("--config", default="tiny",
                   help="flash | pro | tiny | path to a config.json: random weights (ignored with --checkpoint)")
    p.add_argument("--layers", type=int,
                   help="keep only the first N layers of --config's schedule (no MTP layer): release-sized "
                        "layers that fit one GPU, e.g. --config flash --layers 4")
    p.add_argument("--prompt", help="prompt text (needs --checkpoint with a tokenizer.json and `tokenizers`)")
    p.add_argument("--batch", type=int, default=1, help="requests decoded together (random prompts)")
    p.add_argument("--prompt-len", type=int, default=256, help="tokens per random prompt")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to generate per request")
    p.add_argument("--backend", choices=registry.BACKENDS,
                   help="force one backend for every op (default: the registry's choice)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="random weights and prompts")
    p.add_argument("--autotune", action="store_true",
                   help="GPU: tune every kernel on the model's shapes (compiles every config: minutes; shapes "
                        "stored in autotune_cache/ use the stored choice); default: each kernel's first config")
    p.add_argument("--cuda-graph", action="store_true",
                   help="GPU: capture one decode step in a CUDA graph and replay it for every further token")
    p.add_argument("--no-warmup", action="store_true",
                   help="GPU: skip the warm-up pass (the timed figures then include compilation)")
    p.add_argument("--threads", type=int,
                   help="CPU intra-op threads (default on the CPU: 1; the tiny model's ops are too small to "
                        "gain from more, and on a busy machine idle threads spin)")
    args = p.parse_args(argv)
    for name in ("batch", "prompt_len", "new_tokens", "threads", "layers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.layers is not None and args.checkpoint is not None:
        p.error("--layers applies to --config (random weights), not to --checkpoint")
    if args.prompt is not None and args.checkpoint is None:
        p.error("--prompt needs --checkpoint (the tokenizer comes with the checkpoint)")
    if args.cuda_graph and args.device is not None and not args.device.startswith("cuda"):
        p.error("--cuda-graph needs a CUDA device")
    return args


def _tokenizer(checkpoint: str):
    path = os.path.join(checkpoint, "tokenizer.json")
    if not os.path.exists(path):
        raise SystemExit(f"--prompt: {path} does not exist")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise SystemExit("--prompt: the `tokenizers` package is not installed (pip install tokenizers)") from None
    return Tokenizer.from_file(path)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_launches(steps) -> Optional[int]:
    """GPU operations (kernels, copies, memsets) of the next step of ``steps``, counted by
    the profiler; None where the profiler cannot count them (no CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            next(steps)
            torch.cuda.synchronize()
    except RuntimeError:
        return None
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def warm_up(model: DSV4Model, prompts, new_tokens: int) -> Optional[int]:
    """GPU: a prefill and up to two decode steps of the timed run's shapes, so that every
    kernel is compiled (and tuned) before timing; returns the GPU operations of the second
    decode step (the first one compiles), or None."""
    n = min(new_tokens, 3)
    steps = model.generate_steps(prompts, n)
    for _ in range(min(n, 2)):  # the prefill and the first decode step
        next(steps)
    launches = decode_launches(steps) if n == 3 else None
    torch.cuda.synchronize()
    return launches


def backend_table(device: torch.device) -> str:
    """The implementation the registry runs for each public op on ``device``."""
    registered = registry.ops()
    rows = []
    for name in ops.__all__:
        if name not in registered:
            rows.append(f"  {name:20s} (host-side preparation, no backend)")
            continue
        try:
            rows.append(f"  {name:20s} {registry.selected_backend(name, device)}")
        except registry.BackendUnavailableError as e:
            rows.append(f"  {name:20s} unavailable: {e}")
    return "\n".join(rows)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(argv)
    try:
        return _run(args)
    except registry.BackendUnavailableError as e:
        raise SystemExit(f"--backend: {e}") from None


def _run(args: argparse.Namespace) -> int:
    device = torch.device(args.device) if args.device else default_device()
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.backend:
        dsv4_triton.set_backend(args.backend)
    if device.type == "cuda" and not args.autotune:
        dsv4_triton.autotune.disable_tuning()
    if args.cuda_graph and device.type != "cuda":
        raise SystemExit(f"--cuda-graph: needs a CUDA device, got {device}")
    tokenizer = _tokenizer(args.checkpoint) if args.prompt is not None else None
    g = torch.Generator().manual_seed(args.seed)
    source = args.checkpoint or get_config(args.config)
    if args.layers is not None:
        source = truncated(source, args.layers)
    name = args.checkpoint or args.config + (f" (first {args.layers} layers)" if args.layers else "")

    if tokenizer is not None:
        prompts = [tokenizer.encode(args.prompt).ids] * args.batch
    else:
        prompts = None  # drawn once the vocabulary is known
    prompt_len = len(prompts[0]) if prompts else args.prompt_len
    t0 = time.perf_counter()
    model = DSV4Model.from_pretrained(source, device=device, max_batch=args.batch,
                                      max_seq_len=prompt_len + args.new_tokens, seed=args.seed)
    print(f"model: {name} ({model.config.num_hidden_layers} layers, dim {model.config.hidden_size}) "
          f"on {device}, loaded in {time.perf_counter() - t0:.1f} s; cache {model.cache.nbytes() / 2**20:.1f} MiB "
          f"for {args.batch} x {prompt_len + args.new_tokens} tokens", flush=True)
    if prompts is None:
        prompts = torch.randint(0, model.config.vocab_size, (args.batch, prompt_len), generator=g).tolist()

    if device.type == "cuda" and not args.no_warmup:  # (nothing is compiled on the CPU)
        t0 = time.perf_counter()
        launches = warm_up(model, prompts, args.new_tokens)
        counted = f"; {launches} GPU kernels/copies per eager decode step" if launches is not None else ""
        print(f"warm-up (compiles the kernels for these shapes): {time.perf_counter() - t0:.1f} s{counted}",
              flush=True)

    steps = model.generate_steps(prompts, args.new_tokens, cuda_graph=args.cuda_graph)
    _sync(device)
    t0 = time.perf_counter()
    tokens = [next(steps)]
    _sync(device)
    prefill_s = time.perf_counter() - t0

    from tqdm import tqdm

    t0 = time.perf_counter()
    for token in tqdm(steps, total=args.new_tokens - 1, desc="decode", unit="step", file=sys.stdout):
        tokens.append(token)
    _sync(device)
    decode_s = time.perf_counter() - t0

    out = torch.stack(tokens, dim=1).tolist()
    for b, row in enumerate(out):
        text = f" {tokenizer.decode(row)!r}" if tokenizer is not None else ""
        print(f"request {b}: {row}{text}")
    n_prefill = args.batch * prompt_len
    print(f"prefill: {n_prefill} tokens in {prefill_s:.3f} s = {n_prefill / prefill_s:.1f} tokens/s")
    if args.new_tokens > 1:
        n_decode = args.batch * (args.new_tokens - 1)
        mode = ", one CUDA graph replay per step after the first" if args.cuda_graph else ""
        print(f"decode:  {n_decode} tokens in {decode_s:.3f} s = {n_decode / decode_s:.1f} tokens/s "
              f"({args.batch} per step{mode})")
    print(f"backend per op on {device}:\n{backend_table(device)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
