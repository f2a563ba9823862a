"""``python -m dsv4_triton.bench [family ...] [--quick] [--no-compile] [--ops OP ...] [--out DIR]``

Measures the device's ceilings, then each family's cases (all families by default),
prints the table and writes it as markdown + JSON (default ``benchmarks/results/``).
Without a GPU it says so and exits 0: there is nothing meaningful to time on a CPU.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from pathlib import Path

import torch

FAMILIES = ("norm", "rope", "quant", "activation", "mhc", "router", "attention", "gemm", "moe",
            "compressor", "indexer")


def run_benchmarks(families, write_results: bool = True, out_dir: Path | None = None,
                   compile_baselines: bool = True, baselines: bool = True, ops=None) -> int:
    from . import harness

    families = list(families) or list(FAMILIES)
    for fam in families:
        if fam not in FAMILIES:
            raise SystemExit(f"unknown family {fam!r}; choose from {', '.join(FAMILIES)}")
    quick = os.environ.get("DSV4_BENCH_QUICK", "0") == "1"
    device = torch.cuda.get_device_name()
    ceilings = harness.measure_ceilings()
    print(f"ceilings on {device}: copy {ceilings['copy']:.0f} GB/s, bf16 {ceilings['bf16']:.0f} TFLOP/s, "
          f"fp8 {ceilings['fp8']:.0f} TFLOP/s", flush=True)
    overhead = harness.dispatch_overhead_us()
    print(f"dispatch overhead: {overhead}", flush=True)
    rows, failures = [], 0
    for fam in families:
        module = importlib.import_module(f"dsv4_triton.bench.{fam}")
        for case in module.cases(quick):
            if ops and not case.op.startswith(tuple(ops)):
                continue
            try:
                row = harness.run_case(fam, case, ceilings, compile_baselines, baselines)
            except Exception:  # one broken case must not hide the others' figures
                failures += 1
                print(f"FAILED {fam} {case.op} {case.shape}:\n{traceback.format_exc()}", flush=True)
                torch.cuda.empty_cache()
                continue
            rows.append(row)
            if write_results:  # after every case, so a run cut short keeps what it measured
                harness.write_results(device, ceilings, rows, overhead, harness.environment(),
                                      out_dir or harness.RESULTS_DIR)
            print(f"{fam:10s} {row.op:22s} {row.shape:36s} {row.ms * 1e3:9.1f} us  "
                  f"{100 * row.frac:5.1f}% of {row.ceiling}", flush=True)
    env = harness.environment()
    print(harness.to_markdown(device, ceilings, rows, overhead, env))
    if write_results:
        path = harness.write_results(device, ceilings, rows, overhead, env, out_dir or harness.RESULTS_DIR)
        print(f"wrote {path}")
        if out_dir is not None:  # keep the tuning this run did beside its results
            from ..autotune import save

            print(f"wrote {save(out_dir / 'autotune')}")
    return 1 if failures else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv4_triton.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("families", nargs="*", help=f"subset of: {', '.join(FAMILIES)}")
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip eager and compiled torch (a re-run; --merge keeps earlier baselines)")
    p.add_argument("--ops", nargs="+", default=None, metavar="OP",
                   help="only the cases whose op (as the table names it) starts with one of these")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="no timing: combine result JSONs of partial runs (later wins) into --out")
    args = p.parse_args(argv)
    if args.merge:
        from . import harness

        device, ceilings, rows, overhead, env = harness.merge_results(args.merge)
        rows.sort(key=lambda r: FAMILIES.index(r.family))
        print(harness.write_results(device, ceilings, rows, overhead, env, args.out or harness.RESULTS_DIR))
        return 0
    if args.quick:
        os.environ["DSV4_BENCH_QUICK"] = "1"
    if not torch.cuda.is_available():
        print("dsv4_triton.bench: no CUDA GPU on this machine; the benchmarks time GPU kernels, "
              "so nothing was measured. Run it on a GPU machine (see README).")
        return 0
    return run_benchmarks(args.families, out_dir=args.out, compile_baselines=not args.no_compile,
                          baselines=not args.no_baselines, ops=args.ops)


if __name__ == "__main__":
    sys.exit(main())
