"""Speed of zerocore's CUDA fused Adam against torch, beside the GPU's measured copy bandwidth (needs a GPU).

For each size (parameters in millions, split into 16 flat tensors like a ZeRO rank's shards), in interleaved
order, medians of several steps (CUDA events) of:
- zerocore mixed: adam_step with bf16 grads x grad_scale (a device tensor), fp32 master + m + v, bf16 params
  written through params_out: 28 bytes per param (+2 for the inf/nan scan with check_finite);
- zerocore mixed, check_finite=False: the same without the scan (when the caller checked already);
- zerocore fp32: fp32 params and grads, no params_out (torch fused AdamW's job): 28 bytes per param;
- torch fused AdamW: torch.optim.AdamW(fused=True)'s kernel on fp32 params and grads (28 bytes per param);
- torch composed mixed: what the mixed step costs with torch ops: bf16 grad -> fp32 (cast), unscale (mul),
  torch._fused_adamw_ on the fp32 master, master -> bf16 param (copy_): about 52 bytes per param;
- copy: `dst.copy_(src)` of a 1 GiB fp32 buffer (bytes read + written): the bandwidth ceiling.
Targets (issue 5): zerocore mixed >= 85% of copy bandwidth counting 28 bytes/param, and >= 1.5x torch composed.

Environment: ZEROCORE_BENCH_ADAM_MPARAMS (comma-separated sizes in millions, default "100,1000"; 4 under pytest),
ZEROCORE_BENCH_ADAM_RUNS (default 10 / 3).
Run: `python bench/bench_fused_adam.py [--out FILE]` or `python -m pytest bench/bench_fused_adam.py --benchmark-only`.
"""
import functools
import os
import statistics
import sys

import pytest
import torch

import zerocore.ops
from _bench_util import cuda_seconds, emit, interleaved_times, parser
from zerocore.ops import adam as A

LR, BETAS, EPS, WD = 1e-4, (0.9, 0.999), 1e-8, 0.01
TENSORS = 16
BYTES_PER_PARAM = 28


def config(script: bool) -> dict:
    env = os.environ.get
    sizes = env("ZEROCORE_BENCH_ADAM_MPARAMS", "100,1000" if script else "4")
    return {"sizes": [int(float(s) * 1_000_000) for s in sizes.split(",")],
            "runs": int(env("ZEROCORE_BENCH_ADAM_RUNS", "10" if script else "3"))}


def split(n: int) -> list:
    base = n // TENSORS
    return [base] * (TENSORS - 1) + [n - base * (TENSORS - 1)]


class MixedState:
    """bf16 params and grads, fp32 master and moments, as a ZeRO rank holds them."""

    def __init__(self, n: int):
        sizes = split(n)
        self.master = [torch.randn(s, device="cuda") for s in sizes]
        self.exp_avg = [torch.zeros(s, device="cuda") for s in sizes]
        self.exp_avg_sq = [torch.zeros(s, device="cuda") for s in sizes]
        self.grads = [torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in sizes]
        self.params = [m.to(torch.bfloat16) for m in self.master]
        self.grad_scale = torch.full((1,), 1 / 1024, device="cuda")
        self.found_inf = torch.zeros(1, device="cuda")
        self.steps = [torch.zeros((), device="cuda") for _ in sizes]
        self.step = 0

    def zerocore(self, check_finite: bool = True):
        self.step += 1
        A.adam_step(self.master, self.exp_avg, self.exp_avg_sq, self.grads, lr=LR, beta1=BETAS[0],
                    beta2=BETAS[1], eps=EPS, weight_decay=WD, step=self.step, params_out=self.params,
                    grad_scale=self.grad_scale, found_inf=self.found_inf, check_finite=check_finite)

    def torch_composed(self):
        grads32 = [g.float() for g in self.grads]
        torch._foreach_mul_(grads32, self.grad_scale.reshape(()))
        torch._foreach_add_(self.steps, 1)
        torch._fused_adamw_(self.master, grads32, self.exp_avg, self.exp_avg_sq, [], self.steps, lr=LR,
                            beta1=BETAS[0], beta2=BETAS[1], weight_decay=WD, eps=EPS, amsgrad=False,
                            maximize=False)
        torch._foreach_copy_(self.params, self.master)


class Fp32State:
    def __init__(self, n: int):
        sizes = split(n)
        self.params = [torch.randn(s, device="cuda") for s in sizes]
        self.grads = [torch.randn(s, device="cuda") for s in sizes]
        self.exp_avg = [torch.zeros(s, device="cuda") for s in sizes]
        self.exp_avg_sq = [torch.zeros(s, device="cuda") for s in sizes]
        self.steps = [torch.zeros((), device="cuda") for _ in sizes]
        self.found_inf = torch.zeros(1, device="cuda")
        self.step = 0

    def zerocore(self):
        self.step += 1
        A.adam_step(self.params, self.exp_avg, self.exp_avg_sq, self.grads, lr=LR, beta1=BETAS[0],
                    beta2=BETAS[1], eps=EPS, weight_decay=WD, step=self.step, found_inf=self.found_inf,
                    check_finite=False)

    def torch_fused(self):
        torch._foreach_add_(self.steps, 1)
        torch._fused_adamw_(self.params, self.grads, self.exp_avg, self.exp_avg_sq, [], self.steps, lr=LR,
                            beta1=BETAS[0], beta2=BETAS[1], weight_decay=WD, eps=EPS, amsgrad=False,
                            maximize=False)


def copy_bandwidth(runs: int) -> float:
    """Bytes per second of a device-to-device copy (read + write counted), 1 GiB fp32."""
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = statistics.median(cuda_seconds(lambda: dst.copy_(src)) for _ in range(runs))
    return 2 * src.numel() * 4 / seconds


def measure(cfg: dict) -> list:
    """Rows (size, impl, median seconds) for every size; fp32 and mixed states live one at a time."""
    rows = []
    for n in cfg["sizes"]:
        for make, impls in ((MixedState, {"zerocore mixed": lambda s: s.zerocore(True),
                                          "zerocore mixed, no scan": lambda s: s.zerocore(False),
                                          "torch composed mixed": lambda s: s.torch_composed()}),
                            (Fp32State, {"zerocore fp32": lambda s: s.zerocore(),
                                         "torch fused AdamW fp32": lambda s: s.torch_fused()})):
            state = make(n)
            bound = {name: functools.partial(fn, state) for name, fn in impls.items()}
            times = interleaved_times(bound, cfg["runs"], cuda_seconds)
            rows += [(n, name, statistics.median(t)) for name, t in times.items()]
            del state, bound
            torch.cuda.empty_cache()
    return rows


def table(rows: list, copy_bps: float, cfg: dict) -> str:
    composed = {n: s for n, name, s in rows if name == "torch composed mixed"}
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, median of {cfg['runs']} steps; "
             f"device-to-device copy: {copy_bps / 1e9:.0f} GB/s",
             "",
             "| params | impl | ms | GB/s at 28 B/param | of copy bandwidth | vs torch composed mixed |",
             "|---|---|---|---|---|---|"]
    for n, name, seconds in rows:
        gbs = BYTES_PER_PARAM * n / seconds
        versus = f"{composed[n] / seconds:.2f}x" if "mixed" in name else ""
        lines.append(f"| {n / 1e6:.0f}M | {name} | {seconds * 1e3:.2f} | {gbs / 1e9:.0f} | {gbs / copy_bps:.0%} | "
                     f"{versus} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- pytest-benchmark
needs_gpu = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("impl", ["zerocore mixed", "zerocore mixed, no scan", "torch composed mixed",
                                  "zerocore fp32", "torch fused AdamW fp32"])
def test_fused_adam_step(benchmark, impl):
    zerocore.ops.load("cuda_adam")
    n = config(script=False)["sizes"][0]
    if "fp32" in impl:
        state = Fp32State(n)
        fn = state.zerocore if impl.startswith("zerocore") else state.torch_fused
    else:
        state = MixedState(n)
        fn = {"zerocore mixed": lambda: state.zerocore(True), "zerocore mixed, no scan": lambda: state.zerocore(False),
              "torch composed mixed": state.torch_composed}[impl]

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.extra_info["bytes_per_param"] = BYTES_PER_PARAM
    benchmark.pedantic(run, rounds=config(script=False)["runs"], warmup_rounds=1)


for _mark in needs_gpu:
    test_fused_adam_step = _mark(test_fused_adam_step)


def main() -> int:
    args = parser(__doc__).parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: skipped")
        return 0
    zerocore.ops.load("cuda_adam")
    cfg = config(script=True)
    copy_bps = copy_bandwidth(cfg["runs"])
    emit(table(measure(cfg), copy_bps, cfg), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
