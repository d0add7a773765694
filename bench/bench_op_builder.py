"""How long a cached op library takes to load in a fresh process (target: under 1 s).

Each round starts a new Python process (as every torchrun rank is) and times `zerocore.ops.load(name)` inside
it, after `import torch`, from an already-built cache: the hash of the sources, the marker check and the
dlopen. Run: `python -m pytest bench/bench_op_builder.py --benchmark-only` (or `python bench/bench_op_builder.py`
for a markdown table).
"""
import json
import statistics
import subprocess
import sys

import pytest

import zerocore.ops as ops

CPU_OPS = [n for n in ops.available() if not ops.spec(n).needs_cuda]
_PROBE = ("import json, torch, zerocore.ops as o; o.load({name!r}); s, origin = o.load_info({name!r}); "
          "print(json.dumps([s, origin.split(':')[0]]))")


def load_in_fresh_process(name: str):
    out = subprocess.run([sys.executable, "-c", _PROBE.format(name=name)], capture_output=True, text=True,
                         check=True).stdout
    seconds, origin = json.loads(out.strip().splitlines()[-1])
    assert origin in ("cache", "prebuilt"), f"{name} was rebuilt instead of loaded: {origin}"
    return seconds


@pytest.mark.parametrize("name", CPU_OPS)
def test_cached_load(benchmark, name):
    ops.build(name)  # make sure the cache holds it; the timed rounds must only load
    samples = []
    benchmark.pedantic(lambda: samples.append(load_in_fresh_process(name)), rounds=5, iterations=1)
    benchmark.extra_info["load_seconds_median"] = statistics.median(samples)
    benchmark.extra_info["load_seconds_all"] = samples


if __name__ == "__main__":
    print("| op | median load (ms) | runs (ms) |\n|---|---|---|")
    for name in CPU_OPS:
        ops.build(name)
        runs = [load_in_fresh_process(name) * 1000 for _ in range(7)]
        print(f"| {name} | {statistics.median(runs):.1f} | {', '.join(f'{r:.1f}' for r in runs)} |")
