"""Bandwidth of zerocore.io.AsyncIO against fio and torch.save/torch.load, side by side in one run.

Each round (several, medians reported) writes with every contender, then reads with every contender, in an
order rotated per round so drift hits everyone alike, with os.sync() before each timed step:
- zerocore AsyncIO, io_uring and thread-pool backends: write a page-aligned tensor to a fresh file, read it back,
  O_DIRECT, block 1 MiB, queue depth 32;
- fio with the same block size and depth, direct=1, ioengine io_uring and libaio, on the same file system, fresh
  file, no preallocation (zerocore does not preallocate either); bandwidth parsed from --output-format=json;
- torch.save of the same tensor followed by fsync (so it pays for reaching the disk, like O_DIRECT does), and
  torch.load after the file's pages were dropped from the page cache (posix_fadvise DONTNEED).
Targets (issue 4): >= 0.95x fio's bandwidth in each direction, >= 2x torch.save/load.

Environment: ZEROCORE_BENCH_AIO_MB (size, default 1024 when run as a script, 64 under pytest),
ZEROCORE_BENCH_AIO_RUNS (default 5 / 2), ZEROCORE_BENCH_AIO_DIR (where files go, default
/tmp/zerocore_bench_aio; needs 3x the size free), ZEROCORE_BENCH_AIO_DEPTH (32), ZEROCORE_BENCH_AIO_BS_KB (1024).
Run: `python bench/bench_aio.py` (markdown table) or `python -m pytest bench/bench_aio.py --benchmark-only`.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import pytest
import torch

from zerocore.io import AsyncIO, aligned_empty
from zerocore.io._native import lib


def config(script: bool) -> dict:
    env = os.environ.get
    return {
        "nbytes": int(env("ZEROCORE_BENCH_AIO_MB", "1024" if script else "64")) << 20,
        "runs": int(env("ZEROCORE_BENCH_AIO_RUNS", "5" if script else "2")),
        "dir": env("ZEROCORE_BENCH_AIO_DIR", "/tmp/zerocore_bench_aio"),
        "depth": int(env("ZEROCORE_BENCH_AIO_DEPTH", "32")),
        "block": int(env("ZEROCORE_BENCH_AIO_BS_KB", "1024")) << 10,
    }


def check_space(cfg: dict) -> str:
    """Empty when the bench directory can hold the files, else why not."""
    os.makedirs(cfg["dir"], exist_ok=True)
    free = shutil.disk_usage(cfg["dir"]).free
    need = 3 * cfg["nbytes"] + (256 << 20)
    return "" if free >= need else f"{cfg['dir']} has {free >> 20} MiB free, the bench needs {need >> 20} MiB"


def _remove(path):
    for p in (path, path + ".crc32c"):
        if os.path.exists(p):
            os.remove(p)


class ZerocoreContender:
    """AsyncIO with one backend; reads go into `out`, a buffer reused across rounds (as a swapper reuses its
    pool), so the timing does not include first-touch page faults of a fresh buffer."""

    def __init__(self, backend, out, cfg):
        self.aio = AsyncIO(block_size=cfg["block"], queue_depth=cfg["depth"], backend=backend)
        self.out, self.path = out, os.path.join(cfg["dir"], f"zc_{backend}.bin")

    def write(self, tensor):
        _remove(self.path)
        start = time.perf_counter()
        handle = self.aio.write(tensor, self.path)
        handle.wait()
        seconds = time.perf_counter() - start
        assert handle.used_direct, handle.notes
        return seconds

    def read(self, tensor):
        self.out[:4096].fill_(0)
        start = time.perf_counter()
        self.aio.read(self.out, self.path).wait()
        seconds = time.perf_counter() - start
        assert torch.equal(self.out[:4096], tensor[:4096]) and torch.equal(self.out[-4096:], tensor[-4096:])
        return seconds


class FioContender:
    def __init__(self, engine, cfg):
        self.engine, self.cfg = engine, cfg
        self.path = os.path.join(cfg["dir"], f"fio_{engine}.bin")

    def _bandwidth(self, rw):
        """Bytes per second fio reports for one sequential job."""
        cfg = self.cfg
        cmd = ["fio", "--name=bench", f"--filename={self.path}", f"--rw={rw}", f"--bs={cfg['block']}",
               f"--iodepth={cfg['depth']}", "--direct=1", f"--ioengine={self.engine}", f"--size={cfg['nbytes']}",
               "--numjobs=1", "--fallocate=none", "--output-format=json"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"fio failed ({' '.join(cmd)}): {proc.stderr.strip()}")
        report = json.loads(proc.stdout[proc.stdout.index("{"):])
        return float(report["jobs"][0][rw]["bw_bytes"])

    def write(self, tensor):
        _remove(self.path)
        return self.cfg["nbytes"] / self._bandwidth("write")

    def read(self, tensor):
        return self.cfg["nbytes"] / self._bandwidth("read")


class TorchContender:
    """torch.save + fsync (it pays for reaching the disk, as O_DIRECT does); torch.load with the file's pages
    dropped from the page cache first."""

    def __init__(self, cfg):
        self.path = os.path.join(cfg["dir"], "torch.pt")

    def write(self, tensor):
        _remove(self.path)
        start = time.perf_counter()
        torch.save(tensor, self.path)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return time.perf_counter() - start

    def read(self, tensor):
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the load must come from the disk
        finally:
            os.close(fd)
        start = time.perf_counter()
        loaded = torch.load(self.path)
        seconds = time.perf_counter() - start
        assert loaded.numel() == tensor.numel()
        return seconds


def contenders(cfg, out):
    table = {}
    backends = ["io_uring"] if lib().uring_available()[0] else []
    for backend in backends + ["threads"]:
        table[f"zerocore {backend}"] = ZerocoreContender(backend, out, cfg)
    if shutil.which("fio"):
        for engine in ("io_uring", "libaio"):
            table[f"fio {engine}"] = FioContender(engine, cfg)
    table["torch.save/load"] = TorchContender(cfg)
    return table


def run_suite(cfg) -> dict:
    """{contender: {"write": [GB/s per run], "read": [...]}}. Each round writes with every contender, then reads
    with every contender, in an order rotated per round; os.sync() before each timed step flushes what the
    previous contender left in the page cache or the (virtual) disk's write cache, so nobody pays for another."""
    tensor = aligned_empty(cfg["nbytes"], pin=True)
    tensor.copy_(torch.randint(0, 256, (cfg["nbytes"],), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0)))
    out = aligned_empty(cfg["nbytes"], pin=True).fill_(0)  # faulted in once, reused by every read
    table = contenders(cfg, out)
    results = {name: {"write": [], "read": []} for name in table}
    try:
        for r in range(cfg["runs"]):
            names = list(table)
            names = names[r % len(names):] + names[:r % len(names)]
            for direction in ("write", "read"):
                for name in names:
                    os.sync()
                    seconds = getattr(table[name], direction)(tensor)
                    results[name][direction].append(cfg["nbytes"] / seconds / 1e9)
    finally:
        for c in table.values():
            if isinstance(c, ZerocoreContender):
                c.aio.close()
        for name in os.listdir(cfg["dir"]):
            if name.startswith(("zc_", "fio_", "torch.pt")):
                os.remove(os.path.join(cfg["dir"], name))
    return results


def markdown(results, cfg) -> str:
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    fio_best = {k: max((m[k] for n, m in med.items() if n.startswith("fio")), default=float("nan"))
                for k in ("write", "read")}
    torch_ref = med.get("torch.save/load", {"write": float("nan"), "read": float("nan")})
    lines = [f"{cfg['nbytes'] >> 20} MiB, block {cfg['block'] >> 10} KiB, queue depth {cfg['depth']}, "
             f"{cfg['runs']} runs, directory {cfg['dir']}", "",
             "| contender | write GB/s (median) | read GB/s (median) | write / best fio | read / best fio | "
             "write / torch | read / torch | write runs | read runs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in med.items():
        runs = {k: ", ".join(f"{x:.2f}" for x in results[name][k]) for k in ("write", "read")}
        lines.append(f"| {name} | {m['write']:.2f} | {m['read']:.2f} | {m['write'] / fio_best['write']:.2f} | "
                     f"{m['read'] / fio_best['read']:.2f} | {m['write'] / torch_ref['write']:.2f} | "
                     f"{m['read'] / torch_ref['read']:.2f} | {runs['write']} | {runs['read']} |")
    return "\n".join(lines)


def test_aio_against_fio_and_torch(benchmark):
    cfg = config(script=False)
    problem = check_space(cfg)
    if problem:
        pytest.skip(problem)
    results = {}
    benchmark.pedantic(lambda: results.update(run_suite(cfg)), rounds=1, iterations=1)
    benchmark.extra_info["gb_per_s"] = results
    print("\n" + markdown(results, cfg))


if __name__ == "__main__":
    cfg = config(script=True)
    problem = check_space(cfg)
    if problem:
        sys.exit(problem)
    print(markdown(run_suite(cfg), cfg))
