"""CPU Adam step (zerocore.ops.adam.adam_step) against torch, side by side in one run, at 1 and 2 threads.

Cases, each over one flat shard of 50M params (what the ZeRO engine hands the kernel):
- fp32: zerocore's fp32 step vs torch.optim.AdamW(fused=True).step() (target: <= 0.95x torch's time);
- mixed: the fused offload step (bf16 grad in, grad multiplier, AdamW on fp32 master + m + v, bf16 param out)
  vs the composed torch path: grad.float(), mul_(multiplier), fused AdamW, param_bf16.copy_(param) (target:
  >= 1.6x faster). The baseline converts into a preallocated fp32 gradient (grad32.copy_(grad16)), the fastest
  form of that path; the literal `grad.float()`, which allocates and page-faults 200 MB every step, is listed
  too. zerocore runs it with the inf/nan pre-scan (what the engine uses; the torch path has no such check) and
  without;
- copy: `dst.copy_(src)` of a 50M fp32 tensor, the machine's copy bandwidth to read the others against, and
  `x.mul_(-1.0)`, the in-place read-modify-write pattern of Adam's param / m / v streams.
GB/s counts the bytes each step must move at least (read + write once): fp32 step 28 B/param (20 with the
opt-in bf16 optimizer state, listed as an extra row), fused mixed step 28 (+2 for the pre-scan), composed
torch path 52, copy 8.

Implementations of one case run interleaved (ABBA order), round after round, so the noise of this shared
machine hits all alike; the table gives medians (and minimums). torch.set_num_threads sets the threads of both torch and zerocore.
Environment: ZEROCORE_BENCH_ADAM_MPARAMS (default 50), ZEROCORE_BENCH_ADAM_ROUNDS (default 21 as a script,
5 under pytest).
Run: `python bench/bench_cpu_adam.py [--out FILE]` (markdown table) or
`python -m pytest bench/bench_cpu_adam.py --benchmark-only --benchmark-group-by=group`.
"""
import os
import statistics
import sys

import pytest
import torch

import zerocore.ops
from _bench_util import emit, interleaved_times, parser, wall_seconds
from zerocore.ops import adam as A

LR, BETAS, EPS, WD, STEP = 1e-3, (0.9, 0.999), 1e-8, 0.01, 10
GRAD_MULTIPLIER = 1.0 / (1024.0 * 1.3)  # 1 / (loss_scale * clip_coef)
THREADS = (1, 2)


def config(script: bool) -> dict:
    env = os.environ.get
    return {"numel": int(float(env("ZEROCORE_BENCH_ADAM_MPARAMS", "50")) * 1_000_000),
            "rounds": int(env("ZEROCORE_BENCH_ADAM_ROUNDS", "21" if script else "5"))}


class Shard:
    """One 50M-param shard with both zerocore's and torch's copies of the optimizer state."""

    def __init__(self, numel: int):
        g = torch.Generator().manual_seed(0)
        self.numel = numel
        # zerocore: fp32 master, fp32 m / v, gradients in fp32 and bf16, bf16 param out
        self.param = torch.randn(numel, generator=g)
        self.exp_avg = torch.randn(numel, generator=g) * 1e-3
        self.exp_avg_sq = torch.rand(numel, generator=g) * 1e-6
        self.grad32 = torch.randn(numel, generator=g)
        self.grad16 = (self.grad32 * 1024.0).bfloat16()
        self.exp_avg16 = self.exp_avg.bfloat16()  # the opt-in bf16 optimizer state
        self.exp_avg_sq16 = self.exp_avg_sq.bfloat16()
        self.param16 = torch.empty(numel, dtype=torch.bfloat16)
        self.found_inf = torch.zeros(1)
        self.multiplier = torch.tensor([GRAD_MULTIPLIER])
        # torch: its own param (with .grad) and fused AdamW, state created by one warm-up step
        self.torch_param = torch.nn.Parameter(self.param.clone())
        self.torch_param.grad = self.grad32.clone()
        self.torch_opt = torch.optim.AdamW([self.torch_param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                                           fused=True)
        self.torch_opt.step()
        self.torch_param16 = torch.empty(numel, dtype=torch.bfloat16)
        self.torch_grad32 = torch.empty(numel)
        self.copy_src, self.copy_dst = torch.randn(numel, generator=g), torch.empty(numel)

    # ---- fp32 case
    def zerocore_fp32(self):
        A.adam_step([self.param], [self.exp_avg], [self.exp_avg_sq], [self.grad32], lr=LR, beta1=BETAS[0],
                    beta2=BETAS[1], eps=EPS, weight_decay=WD, step=STEP, check_finite=False)

    def zerocore_fp32_bf16_state(self):
        A.adam_step([self.param], [self.exp_avg16], [self.exp_avg_sq16], [self.grad32], lr=LR, beta1=BETAS[0],
                    beta2=BETAS[1], eps=EPS, weight_decay=WD, step=STEP, check_finite=False)

    def torch_fused_fp32(self):
        self.torch_opt.step()

    # ---- mixed case
    def _zerocore_mixed(self, check_finite: bool):
        self.found_inf.zero_()
        A.adam_step([self.param], [self.exp_avg], [self.exp_avg_sq], [self.grad16], lr=LR, beta1=BETAS[0],
                    beta2=BETAS[1], eps=EPS, weight_decay=WD, step=STEP, params_out=[self.param16],
                    grad_scale=self.multiplier, found_inf=self.found_inf, check_finite=check_finite)

    def zerocore_mixed(self):
        self._zerocore_mixed(True)

    def zerocore_mixed_no_scan(self):
        self._zerocore_mixed(False)

    def torch_composed_mixed(self):
        self.torch_grad32.copy_(self.grad16)
        self.torch_grad32.mul_(GRAD_MULTIPLIER)
        self.torch_param.grad = self.torch_grad32
        self.torch_opt.step()
        self.torch_param16.copy_(self.torch_param.detach())

    def torch_composed_mixed_allocating(self):
        grad = self.grad16.float()
        grad.mul_(GRAD_MULTIPLIER)
        self.torch_param.grad = grad
        self.torch_opt.step()
        self.torch_param16.copy_(self.torch_param.detach())

    def copy(self):
        self.copy_dst.copy_(self.copy_src)

    def scale_in_place(self):
        self.copy_dst.mul_(-1.0)  # exact, no drift over rounds


# case -> (baseline name, {impl name: (method name, bytes per param)})
CASES = {
    "fp32 step": ("torch fused AdamW", {"zerocore": ("zerocore_fp32", 28),
                                        "torch fused AdamW": ("torch_fused_fp32", 28),
                                        "zerocore, bf16 state (opt-in)": ("zerocore_fp32_bf16_state", 20)}),
    "mixed step (bf16 grad -> bf16 param)": ("torch composed", {
        "zerocore fused": ("zerocore_mixed", 30),
        "zerocore fused, no inf scan": ("zerocore_mixed_no_scan", 28),
        "torch composed": ("torch_composed_mixed", 52),
        "torch composed, grad.float() allocating": ("torch_composed_mixed_allocating", 52)}),
    "copy (50M fp32)": ("copy", {"copy": ("copy", 8), "in-place x.mul_(-1.0)": ("scale_in_place", 8)}),
}


def measure(shard: Shard, rounds: int) -> list:
    """Rows (threads, case, impl, median s, min s, GB/s at the median, median ratio vs baseline)."""
    rows = []
    saved = torch.get_num_threads()
    try:
        for threads in THREADS:
            torch.set_num_threads(threads)
            for case, (baseline, impls) in CASES.items():
                fns = {name: getattr(shard, method) for name, (method, _) in impls.items()}
                times = interleaved_times(fns, rounds, wall_seconds, abba=True)  # ABBA: no position bias
                medians = {name: statistics.median(t) for name, t in times.items()}
                for name, (_, bytes_per_param) in impls.items():
                    gbs = bytes_per_param * shard.numel / medians[name] / 1e9
                    rows.append((threads, case, name, medians[name], min(times[name]), gbs,
                                 medians[name] / medians[baseline]))
    finally:
        torch.set_num_threads(saved)
    return rows


def table(rows: list, cfg: dict) -> str:
    lines = [f"CPU, {cfg['numel'] / 1e6:.0f}M params, median of {cfg['rounds']} interleaved rounds, "
             f"SIMD path {A.simd_level()}",
             "",
             "| threads | case | impl | median ms | min ms | GB/s (min bytes, median) | time vs baseline | "
             "speedup vs baseline |",
             "|---|---|---|---|---|---|---|---|"]
    for threads, case, impl, seconds, fastest, gbs, ratio in rows:
        lines.append(f"| {threads} | {case} | {impl} | {seconds * 1e3:.1f} | {fastest * 1e3:.1f} | {gbs:.1f} | "
                     f"{ratio:.2f}x | {1 / ratio:.2f}x |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- pytest-benchmark
@pytest.fixture(scope="module")
def shard():
    zerocore.ops.load("cpu_adam")
    return Shard(config(script=False)["numel"])


IMPLS = [(case, name) for case, (_, impls) in CASES.items() for name in impls]


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("case, impl", IMPLS, ids=[f"{c.split()[0]}-{i.replace(' ', '_')}" for c, i in IMPLS])
def test_cpu_adam_step(benchmark, shard, case, impl, threads):
    method, bytes_per_param = CASES[case][1][impl]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        benchmark.group = f"{case}, {threads} thread(s)"
        benchmark.extra_info["bytes"] = bytes_per_param * shard.numel
        benchmark.pedantic(getattr(shard, method), rounds=config(script=False)["rounds"], warmup_rounds=1)
    finally:
        torch.set_num_threads(saved)


def main() -> int:
    args = parser(__doc__).parse_args()
    zerocore.ops.load("cpu_adam")
    cfg = config(script=True)
    emit(table(measure(Shard(cfg["numel"]), cfg["rounds"]), cfg), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
