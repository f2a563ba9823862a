"""One DeepSeek-V4 layer at a release's full size on a GPU: prefill time and where it goes.

Builds a model of one layer with the shapes of a preset (``pro`` or ``flash``; a CSA layer with
score routing by default, random weights drawn on the GPU), prefills ``--tokens`` tokens of one
request, and prints the GPU time of a whole forward call (embedding, the layer, the head on the
last token; CUDA events over repeated calls after warm-up calls that also tune), the host time
to issue one call (when it exceeds the kernels' sum, the GPU waits for the host: a one-layer
model has no later layer whose kernels would cover it) and the kernels that take the GPU time
(``torch.profiler``), grouped by kernel name, largest first.

    PYTHONPATH=. python benchmarks/profile_layer.py --preset pro --tokens 4096
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from dsv4_triton import autotune

from model import DSV4Model
from model.config import get_config


def one_layer_config(preset: str, ratio: int):
    return dataclasses.replace(get_config(preset), num_hidden_layers=1, num_nextn_predict_layers=0,
                               num_hash_layers=0, compress_ratios=(ratio,))


def time_calls(fn, repeats: int) -> float:
    """Median GPU milliseconds of ``fn()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def host_ms(fn, repeats: int) -> float:
    """Median host milliseconds to issue ``fn()`` (the GPU idle and drained before each)."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    torch.cuda.synchronize()
    return statistics.median(times)


def kernel_table(fn, top: int) -> str:
    """The kernels of one ``fn()`` call by total GPU time (name cut to 90 characters)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name[:90]
            count, us = totals.get(name, (0, 0.0))
            totals[name] = (count + 1, us + event.device_time)
    whole = sum(us for _, us in totals.values())
    lines = [f"{'us':>10} {'share':>6} {'calls':>5}  kernel", ]
    for name, (count, us) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{us:10.1f} {100 * us / whole:5.1f}% {count:5d}  {name}")
    lines.append(f"{whole:10.1f} 100.0%        all kernels")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="pro", choices=("pro", "flash"))
    p.add_argument("--ratio", type=int, default=4, choices=(0, 4, 128), help="the layer's compression ratio")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--save-tuning", type=Path, default=None, metavar="DIR",
                   help="after the warm-up calls, write the tuned configs (the committed ones and those "
                        "the model's shapes added) to DIR/<gpu>.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_layer: needs a CUDA GPU")
    config = one_layer_config(args.preset, args.ratio)
    model = DSV4Model.from_pretrained(config, device="cuda", max_seq_len=args.tokens + 16, seed=0)
    ids = torch.randint(0, config.vocab_size, (1, args.tokens), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    for _ in range(2):  # the first calls tune the kernels new shapes meet
        model(ids)
    torch.cuda.synchronize()
    if args.save_tuning is not None:
        print(f"tuned configs written to {autotune.save(args.save_tuning)}", flush=True)
    ms = time_calls(lambda: model(ids), args.repeats)
    print(f"{args.preset}, one layer (ratio {args.ratio}), prefill of {args.tokens} tokens: {ms:.2f} ms a forward "
          f"call (median of {args.repeats}), {host_ms(lambda: model(ids), args.repeats):.2f} ms of host time to issue "
          f"it; {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB peak", flush=True)
    print(kernel_table(lambda: model(ids), args.top), flush=True)


if __name__ == "__main__":
    main()
