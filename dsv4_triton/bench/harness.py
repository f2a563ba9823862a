"""Benchmark harness: device ceilings, then every family's cases, as a table.

Method (each figure is a median over many calls of ``triton.testing.do_bench``, which
flushes L2 before every call; inputs also rotate among several sets whose total size
exceeds L2, so no call reads another's cached data):

* ceilings: device-to-device copy bandwidth (bytes read + written), bf16 matmul rate
  (8192^3, random data) and fp8 matmul rate (``torch._scaled_mm``, per-tensor scales).
* per case: our op, the torch eager version a user would write, and ``torch.compile`` of
  it; achieved GB/s and TFLOP/s from the case's minimum byte/FLOP counts; the fraction of
  the ceiling that binds; the relative error ||ours - oracle|| / ||oracle||; the number of
  kernel launches of one call (from the profiler), and for ops of more than one launch the
  GPU time of each kernel (profiler, eager calls), so a multi-launch op shows where its
  time goes.
* GPU time is taken from CUDA-graph replays of the rotated calls
  (``do_bench_cudagraph``): on the H100 machine a Python-side launch costs tens of
  microseconds of host time, which would otherwise be timed instead of the kernel for
  small shapes.  The "with launch" column is the plain ``do_bench`` time of one eager call
  (host launch cost included when it exceeds the GPU time), so both are visible.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .case import Case

RESULTS_DIR = Path(__file__).resolve().parent.parent.parent / "benchmarks" / "results"


def _median_ms(fn, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def measure_ceilings() -> Dict[str, float]:
    """Copy bandwidth (GB/s) and bf16/fp8 matmul rates (TFLOP/s) measured on this device."""
    dev = torch.device("cuda")
    n = 1 << 30  # 1 GiB each way
    src = torch.randn(n // 4, device=dev)
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src))
    del src, dst
    m = 8192
    a = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    mm_ms = _median_ms(lambda: torch.matmul(a, b))
    a8 = a.to(torch.float8_e4m3fn)
    b8 = b.to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
    one = torch.ones((), device=dev)
    fp8_ms = _median_ms(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    flops = 2 * m ** 3
    return {"copy": 2 * n / copy_ms / 1e6, "bf16": flops / mm_ms / 1e9, "fp8": flops / fp8_ms / 1e9}


def _is_kernel(event) -> bool:
    name = event.name.lower()
    return (event.device_type == torch.autograd.DeviceType.CUDA and "memset" not in name
            and "memcpy" not in name)


def count_launches(fn, *args) -> int:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if _is_kernel(e))


def kernel_times_us(fn, sets: List[tuple], calls: int = 20) -> List[List]:
    """GPU time per call of each kernel ``fn`` launches, ``[[name, us], ...]``, largest first
    (profiler device times of ``calls`` eager calls over the rotated sets; kernels of the
    same name are summed)."""
    from torch.profiler import ProfilerActivity, profile

    it = itertools.cycle(sets)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn(*next(it))
        torch.cuda.synchronize()
    per_name: Dict[str, float] = {}
    for e in prof.events():
        if _is_kernel(e):
            per_name[e.name] = per_name.get(e.name, 0.0) + e.device_time_total / calls
    return sorted(([name[:80], us] for name, us in per_name.items()), key=lambda kv: -kv[1])


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def rel_err(actual, expected) -> float:
    a, e = _first(actual), _first(expected)
    if a.dtype in (torch.float8_e4m3fn, torch.uint8, torch.int32, torch.int64):
        a, e = a.view(torch.uint8).float() if a.dtype == torch.float8_e4m3fn else a.float(), \
            e.view(torch.uint8).float() if e.dtype == torch.float8_e4m3fn else e.float()
        return float((a != e).float().mean())  # fraction of differing codes/ids
    a, e = a.float(), e.float()
    fin = torch.isfinite(e)
    den = e[fin].norm().item()
    return (a[fin] - e[fin]).norm().item() / (den if den else 1.0)


@dataclass
class Row:
    family: str
    op: str
    shape: str
    ms: float  # GPU time per call (graph replay when capturable)
    launch_ms: float  # one eager call under do_bench, host launch cost included
    graphed: bool
    gbps: float
    tflops: float
    ceiling: str
    frac: float
    eager_ms: Optional[float]
    compiled_ms: Optional[float]
    err: Optional[float]
    launches: Optional[int]
    launches_expected: Optional[int]
    notes: str
    kernels: Optional[List[List]] = None  # [[kernel name, GPU us per call], ...] when launches > 1


def _input_sets(case: Case) -> List[tuple]:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    free, _ = torch.cuda.mem_get_info()
    want = max(1, math.ceil(3 * l2 / max(case.bytes, 1)))
    fit = max(1, int(0.3 * free / max(case.bytes, 1)))
    return [case.make_inputs(seed) for seed in range(min(want, fit, 8))]


def _timed(fn, sets: List[tuple]) -> float:
    it = itertools.cycle(sets)
    return _median_ms(lambda: fn(*next(it)))


def _graph_timed(fn, sets: List[tuple]) -> Optional[float]:
    """GPU time per call from CUDA-graph replays of ``fn`` over the rotated sets, or None if
    ``fn`` cannot be captured (a host sync, say)."""
    from triton.testing import do_bench_cudagraph

    it = itertools.cycle(sets)
    try:
        return float(do_bench_cudagraph(lambda: fn(*next(it)), rep=50, return_mode="median"))
    except Exception:
        torch.cuda.synchronize()
        return None


def run_case(family: str, case: Case, ceilings: Dict[str, float], compile_baselines: bool = True,
             baselines: bool = True) -> Row:
    sets = _input_sets(case)
    out = case.run(*sets[0])  # warm up (and autotune) outside the timing
    torch.cuda.synchronize()
    launch_ms = _timed(case.run, sets)
    graph_ms = _graph_timed(case.run, sets)
    ms = graph_ms if graph_ms is not None else launch_ms
    gbps = case.bytes / ms / 1e6
    tflops = case.flops / ms / 1e9 if case.flops else 0.0
    roof = ceilings[case.ceiling]
    frac = (gbps if case.ceiling == "copy" else tflops) / roof
    err = rel_err(out, case.oracle(*sets[0])) if case.oracle is not None else None
    eager_ms = compiled_ms = None
    if case.eager is not None and baselines:
        eager_ms = _graph_timed(case.eager, sets) or _timed(case.eager, sets)
        if compile_baselines and case.compile_eager:
            # Cases share their eager functions across shapes; past dynamo's recompile limit
            # (8 shapes of one function) torch.compile would quietly run it eagerly.
            torch._dynamo.reset()
            compiled = torch.compile(case.eager, dynamic=False)
            compiled(*sets[0])
            compiled_ms = _graph_timed(compiled, sets) or _timed(compiled, sets)
    launches = count_launches(case.run, *sets[0])
    kernels = kernel_times_us(case.run, sets) if launches > 1 else None
    del sets, out
    torch.cuda.empty_cache()
    return Row(family, case.op, case.shape, ms, launch_ms, graph_ms is not None, gbps, tflops, case.ceiling,
               frac, eager_ms, compiled_ms, err, launches, case.launches, case.notes, kernels)


def dispatch_overhead_us(calls: int = 3000) -> Dict[str, float]:
    """Host time per call of ``ops.rms_norm`` vs a bare launch of its kernel (tiny input, so
    the GPU is idle and the host path is what is timed)."""
    from .. import ops, registry
    from .. import validate as V
    from ..kernels import norm as kn

    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)

    def bare():
        kn._rms_norm_kernel[(1,)](x, x, y, y, y, 1, 256, 256, 1e-6, HAS_W=False, QUANT=False, BLOCK=256)

    def public():
        ops.rms_norm(x)

    def launcher():  # the triton implementation called directly: no checks, no registry
        kn.rms_norm(x, None, 1e-6)

    def alloc():
        torch.empty_like(x)

    def validate_only():
        V.tensor("x", x, V.FLOAT_DTYPES, min_ndim=1)
        V.number("eps", 1e-6, positive=True)

    res = {}
    with registry.use_backend("triton", ops=["rms_norm"]):
        for name, fn in (("bare_launch_us", bare), ("public_op_us", public), ("launcher_us", launcher),
                         ("alloc_us", alloc), ("validate_us", validate_only)):
            for _ in range(200):
                fn()
            torch.cuda.synchronize()
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                torch.cuda.synchronize()
                best = min(best, (time.perf_counter() - t0) / calls * 1e6)
            res[name] = best
    res["overhead_us"] = res["public_op_us"] - res["bare_launch_us"]
    return res


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _overhead_line(overhead: Dict[str, float]) -> str:
    what = "Per-call overhead of the public op over a bare kernel launch (rms_norm, tiny input): "
    if "overhead_us" not in overhead:
        return what + "not in these results (each run's own figure, where it measured one, is in merged_runs above)."
    return (what + f"{overhead['overhead_us']:.2f} us (public {overhead['public_op_us']:.2f} us, "
            f"bare launch {overhead['bare_launch_us']:.2f} us).")


def to_markdown(device: str, ceilings: Dict[str, float], rows: List[Row], overhead: Dict[str, float],
                env: Dict[str, str]) -> str:
    lines = [f"# Benchmark results: {device}", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             ("Rows come from several runs (merged_runs above); each row's % is of the ceilings of "
              "the run that measured it. " if "merged_runs" in env else "") +
             "Ceilings measured in the same run: "
             f"copy {ceilings['copy']:.0f} GB/s (read + write), bf16 matmul {ceilings['bf16']:.0f} TFLOP/s, "
             f"fp8 matmul {ceilings['fp8']:.0f} TFLOP/s (torch._scaled_mm, per-tensor scales).", "",
             _overhead_line(overhead), "",
             "Times are GPU time per call from CUDA-graph replays (marked * where the op could not be "
             "captured and a plain timed call was used); 'with launch' is one eager call including "
             "host launch cost. Eager and compiled are the torch versions a user would write.", "",
             "| family | op | shape | ours (us) | with launch (us) | GB/s | TFLOP/s | % of ceiling | eager (us) | "
             "x eager | compiled (us) | x compiled | rel err | launches |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x_e = r.eager_ms / r.ms if r.eager_ms else None
        x_c = r.compiled_ms / r.ms if r.compiled_ms else None
        launches = _fmt(r.launches, "d") + (f" (want {r.launches_expected})" if r.launches_expected else "")
        lines.append(
            f"| {r.family} | {r.op} | {r.shape} | {r.ms * 1e3:.1f}{'' if r.graphed else '*'} | "
            f"{r.launch_ms * 1e3:.1f} | {r.gbps:.0f} | {r.tflops:.1f} | "
            f"{100 * r.frac:.0f}% of {r.ceiling} | {_fmt(r.eager_ms and r.eager_ms * 1e3, '.1f')} | "
            f"{_fmt(x_e, '.2f')} | {_fmt(r.compiled_ms and r.compiled_ms * 1e3, '.1f')} | {_fmt(x_c, '.2f')} | "
            f"{_fmt(r.err, '.2e')} | {launches} |")
    notes = [f"- {r.op} {r.shape}: {r.notes}" for r in rows if r.notes]
    if notes:
        lines += ["", "Notes:"] + notes
    split = [r for r in rows if r.kernels]
    if split:
        lines += ["", "Where the time goes in ops of several launches (GPU time per call of each kernel, "
                  "profiler over eager calls; the 8 largest):", ""]
        for r in split:
            parts = ", ".join(f"{name} {us:.1f}" for name, us in r.kernels[:8])
            lines.append(f"- {r.op} {r.shape}: {parts} us")
    return "\n".join(lines) + "\n"


def write_results(device: str, ceilings, rows: List[Row], overhead, env, out_dir: Path) -> Path:
    from ..autotune import gpu_slug

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / gpu_slug(device)
    stem.with_suffix(".json").write_text(json.dumps(
        {"device": device, "env": env, "ceilings": ceilings, "dispatch_overhead": overhead,
         "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    md = stem.with_suffix(".md")
    md.write_text(to_markdown(device, ceilings, rows, overhead, env))
    return md


def merge_results(paths: List[Path]):
    """Combine result JSONs of several partial runs on one device: later files replace rows
    of the same (family, op, shape); the ceilings are those of the last file, the dispatch
    overhead that of the last file that measured it."""
    rows: Dict[tuple, Row] = {}
    data, runs, overhead = {}, [], {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        overhead = data["dispatch_overhead"] or overhead
        c = data["ceilings"]
        families = sorted({r["family"] for r in data["rows"]})
        # A file that is itself a merge keeps the list of the runs it was made from.
        measured = data["dispatch_overhead"].get("overhead_us")
        runs.append(data["env"].get("merged_runs") or
                    f"[{', '.join(families)}: copy {c['copy']:.0f} GB/s, bf16 {c['bf16']:.0f}, fp8 {c['fp8']:.0f} "
                    f"TFLOP/s, overhead {'not measured' if measured is None else f'{measured:.1f} us'}]")
        for r in data["rows"]:
            row = Row(**r)
            key = (row.family, row.op, row.shape)
            old = rows.get(key)
            if old is not None:  # a re-run without baselines keeps the earlier ones
                row.eager_ms = row.eager_ms if row.eager_ms is not None else old.eager_ms
                row.compiled_ms = row.compiled_ms if row.compiled_ms is not None else old.compiled_ms
            rows[key] = row
    env = dict(data["env"], merged_runs=" ".join(runs))  # each row's % is of its own run's ceiling
    return data["device"], data["ceilings"], list(rows.values()), overhead, env


def environment() -> Dict[str, str]:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__,
            "cuda": str(torch.version.cuda), "quick": os.environ.get("DSV4_BENCH_QUICK", "0")}
