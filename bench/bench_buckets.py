"""Bandwidth of zerocore.ops.buckets pack / unpack against torch's ways of doing the same, side by side in one run.

Each case moves many tensors of odd sizes (the gradients of a model, in backward order) into one flat bucket, or
back out. For every case, in interleaved order (so drift hits everyone alike), medians of several runs of:
- zerocore: `pack(srcs, bucket, scale=...)` / `unpack(bucket, dsts)`, one call;
- torch.cat: `torch.cat(flat srcs, out=...)` plus whatever cast / scale the case needs, composed;
- foreach: `torch._foreach_copy_(bucket views, srcs)` (casts), preceded by `torch._foreach_mul` when scaled;
- copy: one `dst.copy_(src)` over a single flat tensor of the same element count and dtypes: the bandwidth
  ceiling the kernels are measured against (target, issue 5: pack within 10% of it).
GB/s counts bytes read + bytes written once (the minimum any implementation must move).

Environment: ZEROCORE_BENCH_BUCKET_MELEMS (elements in millions: default 32 as a script on CPU, 256 on CUDA, 4
under pytest), ZEROCORE_BENCH_BUCKET_TENSORS (default 200), ZEROCORE_BENCH_BUCKET_RUNS (default 9 / 3).
Run: `python bench/bench_buckets.py [--device cuda]` (markdown table) or
`python -m pytest bench/bench_buckets.py --benchmark-only`.
"""
import os
import statistics
import sys

import pytest
import torch

import zerocore.ops
from _bench_util import cuda_seconds, emit, interleaved_times, parser, wall_seconds
from zerocore.ops import buckets as B

# (name, op, source dtype, destination dtype, scale); for pack the destination is the bucket.
CASES = [
    ("pack fp32->fp32", "pack", torch.float32, torch.float32, 1.0),
    ("pack fp32->bf16 x0.5", "pack", torch.float32, torch.bfloat16, 0.5),
    ("pack bf16->bf16 x0.5", "pack", torch.bfloat16, torch.bfloat16, 0.5),
    ("pack bf16->fp32", "pack", torch.bfloat16, torch.float32, 1.0),
    ("unpack bf16->bf16", "unpack", torch.bfloat16, torch.bfloat16, 1.0),
    ("unpack fp32->bf16", "unpack", torch.float32, torch.bfloat16, 1.0),
]


def config(device: str, script: bool) -> dict:
    env = os.environ.get
    default_m = ("256" if device == "cuda" else "32") if script else "4"
    return {"numel": int(float(env("ZEROCORE_BENCH_BUCKET_MELEMS", default_m)) * 1_000_000),
            "tensors": int(env("ZEROCORE_BENCH_BUCKET_TENSORS", "200")),
            "runs": int(env("ZEROCORE_BENCH_BUCKET_RUNS", "9" if script else "3"))}


def tensor_sizes(total: int, count: int) -> list:
    """count odd sizes summing to total, spread over two orders of magnitude like a model's parameters."""
    g = torch.Generator().manual_seed(0)
    weights = torch.exp(torch.rand(count, generator=g) * 4.6)
    sizes = [max(1, int(w)) | 1 for w in (weights / weights.sum() * total).tolist()]
    sizes[-1] += total - sum(sizes)
    return sizes


class Case:
    """Tensors and the competing implementations of one case."""

    def __init__(self, name, op, src_dtype, dst_dtype, scale, numel, count, device):
        self.name, self.op, self.scale = name, op, scale
        self.sizes = tensor_sizes(numel, count)
        g = torch.Generator(device=device).manual_seed(1)
        list_dtype, flat_dtype = (src_dtype, dst_dtype) if op == "pack" else (dst_dtype, src_dtype)
        self.many = [torch.randn(n, generator=g, device=device).to(list_dtype) for n in self.sizes]
        self.flat = torch.randn(numel, generator=g, device=device).to(flat_dtype)
        self.views = list(torch.split(self.flat, self.sizes))
        # the copy ceiling: one flat tensor, same element count and dtypes as the case
        self.copy_pair = (torch.randn(numel, device=device).to(src_dtype), torch.empty(numel, device=device,
                                                                                     dtype=dst_dtype))
        self.bytes = numel * (src_dtype.itemsize + dst_dtype.itemsize)

    def impls(self) -> dict:
        out = {"zerocore": self.zerocore, "foreach": self.foreach, "copy": self.copy}
        if self.op == "pack":
            out["torch.cat"] = self.cat
        return out

    def zerocore(self):
        if self.op == "pack":
            B.pack(self.many, self.flat, scale=self.scale)
        else:
            B.unpack(self.flat, self.many, scale=self.scale)

    def cat(self):
        flat_srcs = [t.view(-1) for t in self.many]
        if self.flat.dtype == self.many[0].dtype and self.scale == 1.0:
            torch.cat(flat_srcs, out=self.flat)
        else:
            joined = torch.cat(flat_srcs)
            if self.scale != 1.0:
                joined.mul_(self.scale)
            self.flat.copy_(joined)

    def foreach(self):
        if self.op == "pack":
            srcs = torch._foreach_mul(self.many, self.scale) if self.scale != 1.0 else self.many
            torch._foreach_copy_(self.views, srcs)
        else:
            srcs = torch._foreach_mul(self.views, self.scale) if self.scale != 1.0 else self.views
            torch._foreach_copy_(self.many, srcs)

    def copy(self):
        self.copy_pair[1].copy_(self.copy_pair[0])


def measure(device: str, cfg: dict) -> list:
    """Rows (case, impl, median seconds, GB/s, bytes) for every case and implementation."""
    rows = []
    for spec in CASES:
        case = Case(*spec, cfg["numel"], cfg["tensors"], device)
        times = interleaved_times(case.impls(), cfg["runs"], cuda_seconds if device == "cuda" else wall_seconds)
        for name in times:
            median = statistics.median(times[name])
            rows.append((case.name, name, median, case.bytes / median / 1e9, case.bytes))
        del case
    return rows


def table(rows: list, device: str, cfg: dict) -> str:
    copy_gbs = {r[0]: r[3] for r in rows if r[1] == "copy"}
    torch_best = {}
    for case, impl, seconds, *_ in rows:
        if impl in ("torch.cat", "foreach"):
            torch_best[case] = min(torch_best.get(case, float("inf")), seconds)
    lines = [f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU, '}"
             f"{torch.get_num_threads()} threads), {cfg['numel'] / 1e6:.0f}M elements in {cfg['tensors']} tensors, "
             f"median of {cfg['runs']} runs",
             "",
             "| case | impl | ms | GB/s | of copy GB/s | speedup vs best torch |",
             "|---|---|---|---|---|---|"]
    for case, impl, seconds, gbs, _ in rows:
        lines.append(f"| {case} | {impl} | {seconds * 1e3:.2f} | {gbs:.1f} | {gbs / copy_gbs[case]:.0%} | "
                     f"{torch_best[case] / seconds:.2f}x |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- pytest-benchmark
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


@pytest.fixture(scope="module")
def cases():
    built = {}

    def get(spec, device):
        key = (spec[0], device)
        if key not in built:
            zerocore.ops.load("cuda_buckets" if device == "cuda" else "buckets")
            cfg = config(device, script=False)
            built[key] = Case(*spec, cfg["numel"], cfg["tensors"], device)
        return built[key]

    return get


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["zerocore", "foreach", "torch.cat", "copy"])
@pytest.mark.parametrize("spec", CASES, ids=[c[0] for c in CASES])
def test_bucket_bandwidth(benchmark, cases, spec, impl, device):
    case = cases(spec, device)
    fn = case.impls().get(impl)
    if fn is None:
        pytest.skip(f"{impl} does not apply to {spec[0]}")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        fn()
        sync()

    benchmark.extra_info["bytes"] = case.bytes
    benchmark.pedantic(run, rounds=config(device, False)["runs"], warmup_rounds=1)


def main() -> int:
    command_line = parser(__doc__)
    command_line.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = command_line.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: skipped")
        return 0
    zerocore.ops.load("cuda_buckets" if args.device == "cuda" else "buckets")
    cfg = config(args.device, script=True)
    emit(table(measure(args.device, cfg), args.device, cfg), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
