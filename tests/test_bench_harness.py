"""The benchmark results' merge (CPU: it only reads and writes JSON)."""

import json

from dsv4_triton.bench import harness


def _run(path, rows, overhead, copy):
    data = {"device": "GPU X", "env": {"torch": "t", "triton": "tr", "cuda": "c", "quick": "1"},
            "ceilings": {"copy": copy, "bf16": 700.0, "fp8": 1300.0}, "dispatch_overhead": overhead,
            "rows": [dict(family="norm", op="rms_norm", shape=shape, ms=ms, launch_ms=ms, graphed=True, gbps=1.0,
                          tflops=0.0, ceiling="copy", frac=0.5, eager_ms=None, compiled_ms=None, err=0.0,
                          launches=1, launches_expected=1, notes="") for shape, ms in rows]}
    path.write_text(json.dumps(data))
    return path


def test_merge_keeps_the_last_measured_overhead_and_replaces_rows(tmp_path):
    measured = {"overhead_us": 7.5, "public_op_us": 12.0, "bare_launch_us": 4.5}
    first = _run(tmp_path / "a.json", [("T=1", 0.010), ("T=2", 0.020)], measured, 3000.0)
    second = _run(tmp_path / "b.json", [("T=2", 0.015)], {}, 2990.0)  # a run that did not measure it
    device, ceilings, rows, overhead, env = harness.merge_results([first, second])
    assert overhead == measured and ceilings["copy"] == 2990.0
    assert {(r.shape, r.ms) for r in rows} == {("T=1", 0.010), ("T=2", 0.015)}
    assert "overhead 7.5 us" in env["merged_runs"] and "overhead not measured" in env["merged_runs"]
    md = harness.to_markdown(device, ceilings, rows, overhead, env)
    assert "tiny input): 7.50 us (public 12.00 us, bare launch 4.50 us)." in md


def test_markdown_says_when_no_run_measured_the_overhead(tmp_path):
    only = _run(tmp_path / "a.json", [("T=1", 0.010)], {}, 3000.0)
    device, ceilings, rows, overhead, env = harness.merge_results([only])
    md = harness.to_markdown(device, ceilings, rows, overhead, env)
    assert "nan" not in md.split("| family |")[0]  # the header: environment, ceilings, overhead
    assert "tiny input): not in these results" in md
