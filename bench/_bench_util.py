"""Measurement and output helpers shared by the op benchmarks (bench_buckets.py, bench_cpu_adam.py,
bench_fused_adam.py): one timing of a call, implementations timed interleaved round after round, and the
`--out FILE` command line that prints a markdown table and optionally saves it.

>>> times = interleaved_times({"a": lambda: None, "b": lambda: None}, rounds=3, timer=wall_seconds, abba=True)
>>> sorted(times), [len(t) for t in times.values()]
(['a', 'b'], [3, 3])
"""
import argparse
import time
from typing import Callable, Dict, List, Optional

import torch


def wall_seconds(fn: Callable[[], object]) -> float:
    """Seconds for one call, by the host clock."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def cuda_seconds(fn: Callable[[], object]) -> float:
    """Seconds for one call's GPU work: CUDA events on the current stream around it."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def interleaved_times(fns: Dict[str, Callable[[], object]], rounds: int, timer: Callable[[Callable], float],
                      abba: bool = False) -> Dict[str, List[float]]:
    """Calls every implementation once to warm up (builds, allocator, page faults), then `rounds` rounds of
    one timed call each, so drift on a shared machine hits all alike. abba: every other round runs in reverse
    order, so no implementation always runs right after the same other one. Returns name -> seconds per round."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    order = list(fns.items())
    for r in range(rounds):
        for name, fn in (order[::-1] if abba and r % 2 == 1 else order):
            times[name].append(timer(fn))
    return times


def parser(doc: str) -> argparse.ArgumentParser:
    """The benchmarks' command line: the module docstring's first line as description, `--out FILE`."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", help="also write the table to this file")
    return p


def emit(text: str, out: Optional[str]) -> None:
    """Prints the table and, with --out, writes it to that file too."""
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
