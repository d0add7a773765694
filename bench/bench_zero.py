"""ZeroOptimizer (stages 1-3) vs torch DDP + fused AdamW on 2 gloo ranks (CPU): step time and peak RSS per rank.

Model: 8 blocks of Linear(1024, 4096) - GELU - Linear(4096, 1024) (67.2M fp32 params), micro-batch 8 per rank,
one torch thread per rank. Every configuration runs in a fresh pair of processes (so peak RSS is its own), and
the configurations are interleaved over several rounds so machine noise hits all of them alike; medians are
reported. Each rank also records its RSS right after init_process_group (the "idle" rank) so peak minus idle
can be compared with the ZeRO formula.

    python bench/bench_zero.py                       # all configs, 3 rounds
    python bench/bench_zero.py --rounds 1 --configs ddp,zero2 --steps 6
    python bench/bench_zero.py --configs ddp,zero2,zero3,zero3_offload   # the stage 3 rows
    python bench/bench_zero.py --configs ddp,zero2_offload,zero2_nvme,zero3_offload,zero3_nvme   # NVMe rows
    python bench/bench_zero.py --collectives         # per-unit gloo collectives: which strategy is faster
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time

# Measure the zerocore of this checkout, not whichever copy is pip-installed (spawned ranks inherit sys.path).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS = {
    "ddp": {},
    "zero1": {"stage": 1},
    "zero2": {"stage": 2},
    "zero2_offload": {"stage": 2, "offload_optimizer": "cpu"},
    "zero2_scatter_gather": {"stage": 2, "collective_strategy": "scatter_gather"},
    "zero2_no_overlap": {"stage": 2, "overlap_comm": False},
    # Stage 3 with default units (bucket_size 5M: each 8.4M-param block is a unit, the biases persistent).
    "zero3": {"stage": 3},
    "zero3_offload": {"stage": 3, "offload_optimizer": "cpu", "offload_param": "cpu"},
    "zero3_no_reshard": {"stage": 3, "reshard_after_forward": False},
    "zero3_prefetch1": {"stage": 3, "prefetch_bucket_size": 1},     # one unit ahead instead of 5e7 elements
    "zero3_inflight1": {"stage": 3, "max_inflight_reductions": 1},
    # NVMe optimizer state (DeepSpeed's defaults: buffer_count 4, sub_group_size 1e9 -> 1/16 of the state each)
    # under ZEROCORE_BENCH_NVME_PATH (default: the temp folder).
    "zero2_nvme": {"stage": 2, "offload_optimizer": "nvme"},
    "zero3_nvme": {"stage": 3, "offload_optimizer": "nvme", "offload_param": "nvme"},
}
NVME_PATH = os.environ.get("ZEROCORE_BENCH_NVME_PATH") or tempfile.gettempdir()
# Without the host block cache (host_block_cache=False: torch's allocator, i.e. glibc, serves every tensor), and
# with one reduction in flight instead of two.
for _n in ("zero1", "zero2", "zero2_offload"):
    CONFIGS[_n + "_no_cache"] = dict(CONFIGS[_n], host_block_cache=False)
    CONFIGS[_n + "_inflight1"] = dict(CONFIGS[_n], max_inflight_reductions=1)
DEFAULT = ["ddp", "zero1", "zero2", "zero2_offload"]


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _model(torch):
    nn = torch.nn
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024)) for _ in range(8)])


def _worker(rank, world, port, name, steps, warmup, out):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    dist.barrier()
    idle = _rss_mb("VmRSS")
    model = _model(torch)
    x = torch.randn(8, 1024)
    if name.startswith("ddp"):
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            opt.zero_grad(set_to_none=True)
            net(x).square().mean().backward()
            opt.step()
    else:
        from zerocore.zero import ZeroOptimizer
        nvme = {"nvme_path": NVME_PATH} if CONFIGS[name].get("offload_optimizer") == "nvme" else {}
        opt = ZeroOptimizer(model, lr=1e-4, **CONFIGS[name], **nvme)

        def step():
            opt.backward(model(x).square().mean())
            opt.step()
            opt.zero_grad()
    times = []
    for i in range(warmup + steps):
        if i == warmup:
            if not name.startswith("ddp"):
                opt.wait_for_params()
            dist.barrier()
            stats = getattr(getattr(opt, "store", None), "io_stats", None)      # NVMe configs only
            io_before = dict(stats) if stats is not None else None
            start = time.perf_counter()
        # No barrier per step: a ZeRO step's parameter gathers run on into the next forward (which waits for
        # each unit as it needs it). The reported number is the wall time of all timed steps (ending after the
        # last gathers and a barrier) divided by their count; per-step times are kept for inspection.
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if not name.startswith("ddp"):
        opt.wait_for_params()
    dist.barrier()
    total = time.perf_counter() - start
    peak = _rss_mb("VmHWM")
    report = opt.memory_report() if not name.startswith("ddp") else None
    swap = _swap_numbers(opt, io_before, steps, dist) if io_before is not None else None
    if not name.startswith("ddp"):
        opt.close()            # (removes NVMe files; the process ends with os._exit, without exit hooks)
    out.put({"rank": rank, "name": name, "idle_mb": idle, "peak_mb": peak, "step_ms": [t * 1e3 for t in times[warmup:]],
             "formula_mb": report["formula"] / 2 ** 20 if report else None,
             "held_mb": report["model_states"] / 2 ** 20 if report else None, "total_s": total,
             "gathered_peak_mb": report["peak_gathered_params"] / 2 ** 20 if report else 0.0, "swap": swap})
    out.close()
    out.join_thread()          # flush the result before leaving without interpreter teardown
    dist.barrier()
    os._exit(0)


def _swap_numbers(opt, before, steps, dist):
    """Bytes the NVMe store moved per timed step (state walks and, stage 3, parameter reads), the bandwidth
    its walks achieved (their bytes over their wall time, compute inside included), beside the AsyncIO
    engine's own bandwidth for the same bytes measured right after on both ranks at once (same folder, block
    size and queue depth; write a fresh file, then read it back)."""
    import torch
    from zerocore.io import AsyncIO, aligned_empty
    now = opt.store.io_stats
    moved = (now["read_bytes"] - before["read_bytes"]) + (now["written_bytes"] - before["written_bytes"])
    walk_s = now["walk_s"] - before["walk_s"]
    walked = now["walk_bytes"] - before["walk_bytes"]
    per_step = (now["written_bytes"] - before["written_bytes"]) // steps
    buf = aligned_empty(per_step, torch.uint8).fill_(7)
    path = os.path.join(opt.store.folder.dir, "engine_probe.bin")
    aio = AsyncIO(block_size=1 << 20, queue_depth=16)
    dist.barrier()
    t0 = time.perf_counter()
    aio.write(buf, path).wait()
    dist.barrier()
    t1 = time.perf_counter()
    aio.read(buf, path).wait()
    dist.barrier()
    t2 = time.perf_counter()
    aio.close()
    os.remove(path)
    return {"moved_mb_per_step": moved / steps / 2 ** 20, "swap_gbps": walked / walk_s / 1e9 if walk_s else None,
            "walk_ms_per_step": walk_s / steps * 1e3,
            "engine_write_gbps": per_step / (t1 - t0) / 1e9, "engine_read_gbps": per_step / (t2 - t1) / 1e9,
            "engine_gbps": 2 * per_step / (t2 - t0) / 1e9}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(name, steps, warmup, world=2):
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, name, steps, warmup, q)) for r in range(world)]
    for p in procs:
        p.start()
    res = []
    deadline = time.monotonic() + 1200
    while len(res) < len(procs):
        try:
            res.append(q.get(timeout=1.0))
        except Exception:   # queue.Empty: a rank that died without reporting ends the run with its exit code
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"config {name}: a rank failed (exit codes {[p.exitcode for p in procs]})")
    for p in procs:
        p.join(timeout=30)
    return sorted(res, key=lambda r: r["rank"])


def _coll_worker(rank, world, port, reps, out):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    n_units, numel = 8, 8_392_704
    flats = [torch.randn(numel) for _ in range(n_units)]
    shard = numel // world
    rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    outs = [torch.empty(shard) for _ in range(n_units)]

    def all_reduce():
        return [dist.all_reduce(f, async_op=True) for f in flats]

    def reduce_scatter():
        return [rs(o, f, async_op=True) for o, f in zip(outs, flats)]

    def all_gather():
        return [ag(f, f[rank * shard:(rank + 1) * shard].clone(), async_op=True) for f in flats]

    def gather_by_all_reduce():
        ws = []
        for f in flats:
            f[:rank * shard].zero_()
            f[(rank + 1) * shard:].zero_()
            ws.append(dist.all_reduce(f, async_op=True))
        return ws

    def all_gather_list():
        return [dist.all_gather(list(f.chunk(world)), f[rank * shard:(rank + 1) * shard].clone(), async_op=True)
                for f in flats]

    def gather_by_broadcast():
        return [dist.broadcast(f[r * shard:(r + 1) * shard], src=r, async_op=True) for f in flats
                for r in range(world)]

    def reduce_by_reduce():
        return [dist.reduce(f[r * shard:(r + 1) * shard], dst=r, async_op=True) for f in flats
                for r in range(world)]

    res = {}
    for name, fn in [("reduce_by_reduce", reduce_by_reduce), ("all_reduce", all_reduce), ("reduce_scatter", reduce_scatter), ("all_gather", all_gather),
                     ("gather_by_all_reduce", gather_by_all_reduce), ("all_gather_list", all_gather_list),
                     ("gather_by_broadcast", gather_by_broadcast)]:
        ts = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            for w in fn():
                w.wait()
            ts.append((time.perf_counter() - t0) * 1e3)
        res[name] = statistics.median(ts)
    out.put(res)
    out.close()
    out.join_thread()
    dist.barrier()
    os._exit(0)


def run_collectives(reps):
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_coll_worker, args=(r, 2, port, reps, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = [q.get(timeout=1200) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    print("| collective (8 units x 8.39M fp32, all in flight) | median ms (rank 0) |")
    print("|---|---|")
    for k, v in res[0].items():
        print(f"| {k} | {v:.0f} |")


def _print_swap_table(names, raw, per_round):
    """NVMe rows: bytes swapped per step, the bandwidth the swapper reached against the engine's own (both
    ranks at once, same run), and the step time against 1.3 x (swapped / engine bandwidth + the step time of
    the same configuration with the state in memory, i.e. its *_offload row)."""
    rows = [n for n in names if raw[n][0][0].get("swap")]
    if not rows:
        return
    print()
    print("| config | step ms | swapped MB/step/rank | walk ms/step | swap GB/s/rank | engine GB/s/rank | swap / engine "
          "| in-memory row, ms | target ms (1.3 x (swapped/engine + in-memory)) | step / target |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in rows:
        swaps = [r["swap"] for rr in raw[n] for r in rr]
        med = lambda k: statistics.median(x[k] for x in swaps)  # noqa: E731
        ms = statistics.median(per_round[n])
        base = n.replace("_nvme", "_offload")
        base_ms = statistics.median(per_round[base]) if base in per_round else None
        moved_s = med("moved_mb_per_step") * 2 ** 20 / (med("engine_gbps") * 1e9)
        target = 1.3 * (moved_s * 1e3 + base_ms) if base_ms else None
        against = f"{base_ms:.0f} | {target:.0f} | {ms / target:.2f}" if target else "- | - | -"
        print(f"| {n} | {ms:.0f} | {med('moved_mb_per_step'):.0f} | {med('walk_ms_per_step'):.0f} | "
              f"{med('swap_gbps'):.2f} | {med('engine_gbps'):.2f} | {med('swap_gbps') / med('engine_gbps'):.2f} | "
              f"{against} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(DEFAULT), help=f"comma list of {list(CONFIGS)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--collectives", action="store_true", help="time the per-unit gloo collectives instead")
    ap.add_argument("--json", help="also write raw results here")
    args = ap.parse_args()
    if args.collectives:
        run_collectives(reps=5)
        return
    names = args.configs.split(",")
    raw = {n: [] for n in names}
    for rnd in range(args.rounds):
        for n in names:
            res = run_config(n, args.steps, args.warmup)
            raw[n].append(res)
            print(f"round {rnd} {n}: mean step {res[0]['total_s'] / args.steps * 1e3:.0f} ms, "
                  f"peak {max(r['peak_mb'] for r in res):.0f} MB, idle {res[0]['idle_mb']:.0f} MB", file=sys.stderr)
    per_round = {n: [rr[0]["total_s"] / args.steps * 1e3 for rr in raw[n]] for n in names}
    ddp_ms = statistics.median(per_round["ddp"]) if "ddp" in raw else None
    # Stage 3's budget is its formula (16Ψ/N) plus the working set: the most bytes it had gathered at once.
    print("| config | step ms (median of rounds) | x DDP | peak RSS MB/rank | idle MB | peak-idle MB | formula MB "
          "(stage 3: + peak gathered) | (peak-idle)/formula | held model states MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in names:
        ms = statistics.median(per_round[n])
        peak = statistics.median(max(r["peak_mb"] for r in rr) for rr in raw[n])
        idle = statistics.median(r["idle_mb"] for rr in raw[n] for r in rr)
        f = raw[n][0][0]["formula_mb"]
        if f:
            f += max(r.get("gathered_peak_mb", 0.0) for rr in raw[n] for r in rr)
        held = raw[n][0][0]["held_mb"]
        ratio = f"{ms / ddp_ms:.2f}" if ddp_ms else "-"
        fr = f"{(peak - idle) / f:.2f}" if f else "-"
        print(f"| {n} | {ms:.0f} | {ratio} | {peak:.0f} | {idle:.0f} | {peak - idle:.0f} | "
              f"{f:.0f} | {fr} | {held:.0f} |" if f else
              f"| {n} | {ms:.0f} | {ratio} | {peak:.0f} | {idle:.0f} | {peak - idle:.0f} | - | - | - |")
    _print_swap_table(names, raw, per_round)
    if args.json:
        with open(args.json, "w") as fjson:
            json.dump(raw, fjson)


if __name__ == "__main__":
    main()
