"""Multi-rank precision scenarios for ZeroOptimizer, run by tests/test_zero_precision.py (dist_helpers.run_scenarios).

These close gaps that tests/zero_scenarios.py leaves open:
  * unused parameters that differ between ranks at the same step (one rank has a gradient, another none), a
    parameter only one rank ever uses, and an odd world size (3);
  * bf16 checked against a single-process reference that rounds like the engine (fp32 masters, a bf16 model
    copy, each rank's bf16 gradient computed separately and averaged in the reduce dtype exactly the way
    reductions.py does), with a tolerance that is shown, in the same scenario, to reject a 10% lr error
    and a dropped step;
  * fp16 dynamic loss scaling beyond one overflow: the default hysteresis 2, the scale growing back after
    loss_scale_window clean steps, an overflow inside an accumulation window, with CPU offload;
  * stage 1/2 + offload_optimizer="cpu" + gradient_accumulation_steps=3 in fp32;
  * the gradient norm the engine reports (opt.global_grad_norm) against the reference's, step by step: Adam
    is nearly invariant to the gradient's scale, so parameters alone would hide a wrong averaging factor.

A scenario is `fn(rank, world) -> dict`: it raises AssertionError on a mismatch and returns the measured
numbers, which the test file asserts on again. Rel err: per parameter tensor ||a - b|| / ||b||, max over tensors.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from zerocore.zero import ZeroOptimizer
from zero_scenarios import (FP32_TOL, LOW_PRECISION_TOL, Special, batches, local, loss_of, mlp,
                            train_reference)

LR, WD = 1e-3, 0.01
NORM_TOL_FP32 = 1e-5          # rel err of the per-step global gradient norm, fp32
# bf16 / fp16 against the reference that rounds like the engine. Measured (2 ranks, 8-10 steps, CPU): the bf16 /
# fp16 parameters are bit-identical (rel err 0) in every stage / reduce dtype / accumulation / offload variant,
# the fp32 masters differ by <= 4e-8 (torch AdamW vs the fused kernel in the last fp32 ulp) and the gradient
# norms by <= 2e-7. Such an ulp can flip one bf16 rounding (2**-8 of that element) somewhere; the tolerances leave
# room for a few flips, while in every bf16 scenario a 10% lr error and one dropped step are asserted to exceed
# them (measured: 8.3e-3 and 6.9e-3 on the bf16 parameters, about as much on the masters).
ROUNDED_TOL = 1e-3            # bf16 / fp16 parameters (the model), rel err
ROUNDED_MASTER_TOL = 1e-4     # fp32 master shards (from opt.state_dict()), rel err
ROUNDED_NORM_TOL = 1e-5       # per-step global_grad_norm, rel err
POISON = 1e8                  # loss factor that overflows fp16 gradients at any loss scale used here
INIT_SCALE = 2.0 ** 16


# ------------------------------------------------------------------------------------------------- models
class RankSpecial(Special):
    """zero_scenarios.Special plus `lonely`, which only the last rank ever uses (on steps t % 3 == 0, so on the
    other steps no rank produces its gradient and it must be skipped, keeping its own Adam step count).
    `sometimes` is used by rank r on steps where (t + r) % 2 == 0: at every step some ranks have its gradient
    and others do not."""

    def __init__(self):
        super().__init__()
        self.lonely = nn.Linear(16, 4)
        self.use_lonely = False

    def forward(self, x):
        h = self.hidden(x)
        out = self.head(h)
        if self.use_lonely:
            out = out + self.lonely(h)
        return out


def rank_special(seed=1):
    torch.manual_seed(seed)
    return RankSpecial()


def rank_flags(model, t, rank, world):
    model.use_sometimes = (t + rank) % 2 == 0
    model.use_lonely = rank == world - 1 and t % 3 == 0


def warm_flags(model, t, rank, world):
    """rank_flags, except that at step 0 every rank runs every branch (see rank_unused_warm_*)."""
    if t == 0:
        model.use_sometimes = model.use_lonely = True
    else:
        rank_flags(model, t, rank, world)


def lonely_steps(steps):
    return sum(t % 3 == 0 for t in range(steps))


# -------------------------------------------------------------------------------------------------- metrics
def rel(a: nn.Module, b: nn.Module) -> float:
    """Max over parameter tensors of ||a - b|| / ||b||, both taken in fp32."""
    errs = []
    for (n, p), (m, q) in zip(a.named_parameters(), b.named_parameters()):
        assert n == m, (n, m)
        p, q = p.detach().float(), q.detach().float()
        errs.append(((p - q).norm() / q.norm().clamp_min(1e-30)).item())
    return max(errs)


def norm_err(got, want, skipped):
    """Max rel err of the per-step gradient norms over the steps that were not skipped."""
    worst = 0.0
    for g, w, s in zip(got, want, skipped):
        if s:
            continue
        e = abs(g - w) / max(abs(w), 1e-30) if math.isfinite(g) else math.inf
        worst = max(worst, e)
    return worst


def master_err(opt, ref_master: nn.Module) -> float:
    """This rank's fp32 master shards (from the state dict) against the reference masters."""
    ref = dict(ref_master.named_parameters())
    worst = 0.0
    for name, e in opt.state_dict()["params"].items():
        if e["end"] <= e["start"]:
            continue
        want = ref[name].detach().reshape(-1)[e["start"]:e["end"]]
        got = e["master"].reshape(-1)
        worst = max(worst, ((got - want).norm() / want.norm().clamp_min(1e-30)).item())
    return worst


def ranks_agree(model) -> bool:
    """Whether every rank holds bit-identical parameters (one all_gather)."""
    import torch.distributed as dist
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, flat)
    return all(torch.equal(e, flat) for e in everyone)


# --------------------------------------------------------------------------------------------------- engine
def train_engine(kind, make_model, data, rank, world, *, lr=LR, wd=WD, flags=None, poison=None, ds_style=False,
                 **options):
    """ZeroOptimizer on this rank's slice; logs per step: global_grad_norm, loss_scale, skipped, and whether the
    weights changed on a skipped step."""
    model = make_model()
    opt = ZeroOptimizer(model, lr=lr, weight_decay=wd, gradient_accumulation_steps=len(data[0]), comm_timeout_s=60,
                        **options)
    low = options.get("dtype")
    log = {"norms": [], "scales": [], "skipped": [], "changed_on_skip": []}
    for t, row in enumerate(data):
        opt.wait_for_params()
        before = [p.detach().clone() for p in model.parameters()]
        skipped_before = opt.skipped_steps
        for i, (x, y) in enumerate(row):
            if flags is not None:
                flags(model, t, rank, world)
            x = local(x, rank)
            loss = loss_of(kind, model(x if low is None else x.to(low)), local(y, rank))
            if poison is not None and poison(t, i, rank):
                loss = loss * POISON
            opt.backward(loss)
            if ds_style:
                opt.step()
                opt.zero_grad()
        if not ds_style:
            opt.step()
            opt.zero_grad()
        opt.wait_for_params()
        skipped = opt.skipped_steps > skipped_before
        log["skipped"].append(skipped)
        log["norms"].append(float(opt.global_grad_norm))
        log["scales"].append(opt.loss_scale)
        if skipped and not all(torch.equal(a, b) for a, b in zip(before, model.parameters())):
            log["changed_on_skip"].append(t)
    return model, opt, log


# ------------------------------------------------------------------------------------------------ reference
def emulated_reference(kind, make_model, data, world, *, stage, lr=LR, wd=WD, dtype=None, reduce_dtype=None,
                       flags=None, poison=None, scales=None, drop=()):
    """Single process, rank by rank, rounding like the engine (reductions.py / step.py):

    fp32 masters trained by torch.optim.AdamW; a copy of the model in the compute dtype (the masters rounded to
    nearest) computes each rank's local gradient of its local loss times the loss scale `scales[t]`.
      stage 1, reduce dtype == gradient dtype (in place): local gradients accumulate over micro-steps in the
          gradient dtype (autograd), are summed over ranks in that dtype, and the step multiplies by
          1 / (micro * world * scale) in fp32;
      otherwise (pack_scale = 1/world): every gradient is cast to the reduce dtype after multiplying by
          1/world in fp32, summed over ranks in the reduce dtype (each addition rounded), then (stage 2: per
          micro-step, accumulated over micro-steps in fp32 when micro > 1; stage 1: once, of the accumulated
          local gradients) multiplied by 1 / (micro * scale) in fp32.
    A parameter no rank produced a gradient for gets grad None (AdamW skips it, keeping its step count); a
    missing gradient on some ranks counts as zero. A non-finite gradient skips the step. Steps in `drop` are
    skipped as well (for the sensitivity checks). Returns (fp32 masters, compute-dtype model, log).
    """
    master = make_model()
    work = copy.deepcopy(master)
    if dtype is not None:
        work = work.to(dtype)
    named = [(n, p) for n, p in master.named_parameters() if p.requires_grad]
    wparams = dict(work.named_parameters())
    opt = torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=wd, foreach=False)
    gdt = dtype or torch.float32
    rdt = reduce_dtype or gdt
    in_place = stage == 1 and rdt == gdt
    pre = 1.0 if in_place else 1.0 / world
    log = {"norms": [], "skipped": []}

    def pack(g):
        return g.to(rdt) if pre == 1.0 else (g.float() * pre).to(rdt)

    for t, row in enumerate(data):
        scale = 1.0 if scales is None else scales[t]
        micro = len(row)
        got = set()

        def local_grads(r, micros):
            work.zero_grad(set_to_none=True)
            for i in micros:
                x, y = row[i]
                if flags is not None:
                    flags(work, t, r, world)
                loss = loss_of(kind, work(local(x, r).to(gdt)), local(y, r))
                if poison is not None and poison(t, i, r):
                    loss = loss * POISON
                (loss * scale if scale != 1.0 else loss).backward()
            out = {}
            for n, _ in named:
                g = wparams[n].grad
                if g is not None:
                    got.add(n)
                    out[n] = g.detach().clone()
            return out

        def rank_sum(parts, n):
            acc = None
            for part in parts:
                g = part.get(n)
                b = torch.zeros_like(wparams[n], dtype=rdt) if g is None else pack(g)
                acc = b if acc is None else (acc.float() + b.float()).to(rdt)
            return acc

        store = {}
        if stage == 1:
            parts = [local_grads(r, range(micro)) for r in range(world)]
            for n, _ in named:
                store[n] = rank_sum(parts, n)
            divisor = micro * world if in_place else micro
        else:
            for i in range(micro):
                parts = [local_grads(r, [i]) for r in range(world)]
                for n, _ in named:
                    s = rank_sum(parts, n)
                    if micro == 1:
                        store[n] = s
                    else:
                        store[n] = s.float() if i == 0 else store[n] + s.float()
            divisor = micro
        divisor *= scale
        sq = sum(float(torch.linalg.vector_norm(s, dtype=torch.float32)) ** 2 for s in store.values())
        norm = math.sqrt(sq) / divisor
        if not math.isfinite(norm) or t in drop:
            log["norms"].append(float("inf") if not math.isfinite(norm) else norm)
            log["skipped"].append(True)
            continue
        inv = torch.tensor(1.0 / divisor, dtype=torch.float32)
        for n, p in named:
            p.grad = store[n].float() * inv if n in got else None
        opt.step()
        with torch.no_grad():
            for n, p in master.named_parameters():
                wparams[n].copy_(p)
        log["norms"].append(norm)
        log["skipped"].append(False)
    return master, work, log


def full_batch_reference(kind, make_model, data, *, lr=LR, wd=WD):
    """Plain single-process torch AdamW on the whole global batch, loss averaged over micro-steps; logs the
    global gradient norm of every step."""
    model = make_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=wd,
                            foreach=False)
    norms = []
    for row in data:
        opt.zero_grad()
        for x, y in row:
            (loss_of(kind, model(x), y) / len(row)).backward()
        norms.append(math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()
                                   if p.grad is not None)))
        opt.step()
    return model, norms


def _check(cond, msg, result):
    if not cond:
        raise AssertionError(f"{msg} ({result})")


# ------------------------------------------------- 1. rank-dependent unused parameters (fp32, any world size)
def _rank_unused(stage, flags=rank_flags, **options):
    def scenario(rank, world):
        steps = 10
        data = batches("special", world, steps)
        model, opt, log = train_engine("special", rank_special, data, rank, world, flags=flags, stage=stage,
                                       bucket_size=40, **options)
        ref, _, rlog = emulated_reference("special", rank_special, data, world, stage=stage, flags=flags)
        init = rank_special()
        names = opt.param_names
        steps_of = dict(zip(names, opt.param_steps))
        result = {"ranks_agree": ranks_agree(model),
                  "rel_err": rel(model, ref), "norm_err": norm_err(log["norms"], rlog["norms"], rlog["skipped"]),
                  "moved": rel(init, ref), "global_steps": opt.global_steps,
                  "lonely_steps": steps_of["lonely.weight"], "sometimes_steps": steps_of["sometimes.weight"],
                  "never_steps": steps_of["never"],
                  "never_unchanged": torch.equal(model.never, init.never),
                  "lonely_trained": not torch.equal(model.lonely.weight, init.lonely.weight)}
        _check(result["ranks_agree"], "ranks hold different parameters after training", result)
        _check(result["rel_err"] <= FP32_TOL, f"rel err vs rank-by-rank reference > {FP32_TOL}", result)
        _check(result["norm_err"] <= NORM_TOL_FP32, f"global_grad_norm rel err > {NORM_TOL_FP32}", result)
        _check(opt.global_steps == steps, "steps taken", result)
        _check(result["sometimes_steps"] == steps, "`sometimes` has a gradient on some rank at every step", result)
        _check(result["lonely_steps"] == lonely_steps(steps), "`lonely` stepped only when its rank used it", result)
        _check(result["never_steps"] == 0 and result["never_unchanged"], "`never` was touched", result)
        _check(result["lonely_trained"], "`lonely` was not trained", result)
        return result
    return scenario


rank_unused_s1 = _rank_unused(1)
rank_unused_s2 = _rank_unused(2)
rank_unused_offload_s2 = _rank_unused(2, offload_optimizer="cpu")
# The same, except that before the first step (step 0) every rank runs every branch, so all ranks see the same
# modules run in the same order while the engine records its gather order (schedule.GatherSchedule.finish_recording). These
# isolate the gradient side (any-rank has-gradient flags, missing = zero, per-parameter step counts) from that.
rank_unused_warm_s1 = _rank_unused(1, flags=warm_flags)
rank_unused_warm_s2 = _rank_unused(2, flags=warm_flags)
rank_unused_warm_offload_s2 = _rank_unused(2, flags=warm_flags, offload_optimizer="cpu")


# ---------------------------------------------------------------- 2. bf16 against a reference that rounds alike
def _bf16(stage, reduce_dtype=None, micro=1):
    def scenario(rank, world):
        steps = 10
        data = batches("mlp", world, steps, micro=micro)
        model, opt, log = train_engine("mlp", mlp, data, rank, world, stage=stage, bucket_size=200,
                                       dtype=torch.bfloat16, reduce_dtype=reduce_dtype)
        kw = dict(stage=stage, dtype=torch.bfloat16, reduce_dtype=reduce_dtype)
        master, ref, rlog = emulated_reference("mlp", mlp, data, world, **kw)
        master_lr, ref_lr, _ = emulated_reference("mlp", mlp, data, world, lr=LR * 1.1, **kw)
        master_drop, ref_drop, _ = emulated_reference("mlp", mlp, data, world, drop=(steps - 1,), **kw)
        fp32_ref = train_reference("mlp", data)
        result = {"rel_err": rel(model, ref), "master_rel_err": master_err(opt, master),
                  "norm_err": norm_err(log["norms"], rlog["norms"], rlog["skipped"]),
                  "lr_x1.1_rel_err": rel(ref_lr, ref), "dropped_step_rel_err": rel(ref_drop, ref),
                  "lr_x1.1_master_rel_err": rel(master_lr, master),
                  "dropped_step_master_rel_err": rel(master_drop, master),
                  "engine_vs_lr_x1.1": rel(model, ref_lr), "engine_vs_dropped_step": rel(model, ref_drop),
                  "fp32_rel_err": rel(model, fp32_ref), "moved": rel(mlp(), ref),
                  "global_steps": opt.global_steps}
        _check(all(p.dtype == torch.bfloat16 for p in model.parameters()), "parameters are not bf16", result)
        _check(opt.global_steps == steps, "steps taken", result)
        _check(result["lr_x1.1_rel_err"] > ROUNDED_TOL and result["dropped_step_rel_err"] > ROUNDED_TOL,
               f"tolerance {ROUNDED_TOL} would not catch a 10% lr error or a dropped step", result)
        _check(result["lr_x1.1_master_rel_err"] > ROUNDED_MASTER_TOL
               and result["dropped_step_master_rel_err"] > ROUNDED_MASTER_TOL,
               f"master tolerance {ROUNDED_MASTER_TOL} would not catch a 10% lr error or a dropped step", result)
        _check(result["rel_err"] <= ROUNDED_TOL, f"bf16 rel err vs rounding reference > {ROUNDED_TOL}", result)
        _check(result["master_rel_err"] <= ROUNDED_MASTER_TOL, f"fp32 master rel err > {ROUNDED_MASTER_TOL}", result)
        _check(result["norm_err"] <= ROUNDED_NORM_TOL, f"global_grad_norm rel err > {ROUNDED_NORM_TOL}", result)
        _check(result["fp32_rel_err"] <= LOW_PRECISION_TOL, "bf16 vs fp32 reference", result)
        return result
    return scenario


bf16_rounded_s1 = _bf16(1)
bf16_rounded_s2 = _bf16(2)
bf16_rounded_fp32_reduce_s1 = _bf16(1, torch.float32)
bf16_rounded_fp32_reduce_s2 = _bf16(2, torch.float32)
bf16_rounded_ga_s2 = _bf16(2, micro=2)


# ------------------------------------------------------------------------------ 3. fp16 dynamic loss scaling
def _fp16(stage, *, steps, overflows, expected_scales, micro=1, ds_style=False, **options):
    """`overflows`: {(t, micro_index): rank} — that rank alone multiplies that micro-step's loss by POISON.
    `expected_scales`: opt.loss_scale after each step."""
    skip = sorted({t for t, _ in overflows})

    def poison(t, i, r):
        return overflows.get((t, i)) == r

    init_scale = 2.0 ** options.get("initial_scale_power", 16)

    def scenario(rank, world):
        data = batches("mlp", world, steps, micro=micro)
        model, opt, log = train_engine("mlp", mlp, data, rank, world, poison=poison, ds_style=ds_style,
                                       stage=stage, bucket_size=200, dtype=torch.float16, **options)
        before = [init_scale] + list(expected_scales[:-1])      # the scale each step's backward used
        master, ref, rlog = emulated_reference("mlp", mlp, data, world, stage=stage, dtype=torch.float16,
                                               poison=poison, scales=before)
        fp32_ref = train_reference("mlp", data, skip=tuple(skip))
        skipped = [t for t, s in enumerate(log["skipped"]) if s]
        result = {"rel_err": rel(model, ref), "master_rel_err": master_err(opt, master),
                  "norm_err": norm_err(log["norms"], rlog["norms"], rlog["skipped"]),
                  "fp32_rel_err": rel(model, fp32_ref), "moved": rel(mlp(), fp32_ref),
                  "scales": log["scales"], "expected_scales": list(expected_scales), "skipped": skipped,
                  "expected_skipped": skip, "ref_skipped": [t for t, s in enumerate(rlog["skipped"]) if s],
                  "changed_on_skip": log["changed_on_skip"], "global_steps": opt.global_steps,
                  "skipped_steps": opt.skipped_steps}
        _check(result["ref_skipped"] == skip, "the reference did not overflow exactly where poisoned", result)
        _check(skipped == skip and opt.skipped_steps == len(skip), "skipped steps", result)
        _check(opt.global_steps == steps - len(skip), "steps taken", result)
        _check(log["scales"] == list(expected_scales), "loss scale sequence", result)
        _check(not log["changed_on_skip"], "weights changed on a skipped step", result)
        _check(result["norm_err"] <= ROUNDED_NORM_TOL, f"global_grad_norm rel err > {ROUNDED_NORM_TOL}", result)
        _check(result["rel_err"] <= ROUNDED_TOL, f"fp16 rel err vs rounding reference > {ROUNDED_TOL}", result)
        _check(result["master_rel_err"] <= ROUNDED_MASTER_TOL, f"fp32 master rel err > {ROUNDED_MASTER_TOL}", result)
        _check(result["fp32_rel_err"] <= LOW_PRECISION_TOL and result["fp32_rel_err"] <= 0.25 * result["moved"],
               "fp16 vs fp32 reference that skips the same steps", result)
        return result
    return scenario


S = INIT_SCALE
# (a) default hysteresis 2: rank 0 overflows at step 2, rank 1 at step 3; the scale halves only after the second.
_HYST = dict(steps=8, overflows={(2, 0): 0, (3, 0): 1}, expected_scales=[S, S, S, S / 2, S / 2, S / 2, S / 2, S / 2])
fp16_hysteresis_s1 = _fp16(1, **_HYST)
fp16_hysteresis_s2 = _fp16(2, **_HYST)
# (b) loss_scale_window=3: clean step 0; overflows at 1 (rank 1) and 2 (rank 0) halve once; clean 3, 4, 5 double
# it back; clean 6, 7, 8 double it again (and restore the hysteresis budget), so the overflow at 9 does not halve.
_GROW = dict(steps=10, overflows={(1, 0): 1, (2, 0): 0, (9, 0): 1}, loss_scale_window=3,
             expected_scales=[S, S, S / 2, S / 2, S / 2, S, S, S, 2 * S, 2 * S])
fp16_scale_growth_s1 = _fp16(1, **_GROW)
fp16_scale_growth_s2 = _fp16(2, **_GROW)
# (c) accumulation over 2 micro-steps: rank 0 overflows in the first micro-step of step 2, rank 1 in the second
# micro-step of step 5: each skips the whole step on every rank; the second halves the scale. Initial scale 2**12:
# at 2**16 stage 1's fp16 accumulation (two micro-steps, then the sum over ranks, no pre-division) overflows by
# itself at step 1 (engine and reference alike), which would make the sequence depend on the data.
S12 = 2.0 ** 12
_GA = dict(steps=8, micro=2, overflows={(2, 0): 0, (5, 1): 1}, initial_scale_power=12,
           expected_scales=[S12, S12, S12, S12, S12, S12 / 2, S12 / 2, S12 / 2])
fp16_overflow_ga_s1 = _fp16(1, ds_style=True, **_GA)
fp16_overflow_ga_s2 = _fp16(2, **_GA)
# (d) CPU offload (fp32 masters and Adam state on the host): overflows at 3 (rank 1) and 4 (rank 0).
_OFF = dict(steps=8, overflows={(3, 0): 1, (4, 0): 0}, offload_optimizer="cpu",
            expected_scales=[S, S, S, S, S / 2, S / 2, S / 2, S / 2])
fp16_overflow_offload_s1 = _fp16(1, **_OFF)
fp16_overflow_offload_s2 = _fp16(2, **_OFF)


# ------------------------------------------------------------ 4. fp32 offload + accumulation (any world size)
def _offload_ga(stage, micro=3, ds_style=False):
    def scenario(rank, world):
        steps = 8
        data = batches("mlp", world, steps, micro=micro)
        model, opt, log = train_engine("mlp", mlp, data, rank, world, ds_style=ds_style, stage=stage,
                                       bucket_size=200, offload_optimizer="cpu")
        ref, norms = full_batch_reference("mlp", mlp, data)
        result = {"rel_err": rel(model, ref), "norm_err": norm_err(log["norms"], norms, [False] * steps),
                  "moved": rel(mlp(), ref), "global_steps": opt.global_steps}
        _check(opt.global_steps == steps, "steps taken", result)
        _check(result["rel_err"] <= FP32_TOL, f"rel err vs single-process AdamW > {FP32_TOL}", result)
        _check(result["norm_err"] <= NORM_TOL_FP32, f"global_grad_norm rel err > {NORM_TOL_FP32}", result)
        return result
    return scenario


offload_ga_s1 = _offload_ga(1, ds_style=True)
offload_ga_s2 = _offload_ga(2)


RANK_UNUSED_WARM = ["rank_unused_warm_s1", "rank_unused_warm_s2", "rank_unused_warm_offload_s2"]
RANK_UNUSED = ["rank_unused_s1", "rank_unused_s2", "rank_unused_offload_s2"]
OFFLOAD_GA = ["offload_ga_s1", "offload_ga_s2"]
BF16 = ["bf16_rounded_s1", "bf16_rounded_s2", "bf16_rounded_fp32_reduce_s1", "bf16_rounded_fp32_reduce_s2",
        "bf16_rounded_ga_s2"]
FP16 = ["fp16_hysteresis_s1", "fp16_hysteresis_s2", "fp16_scale_growth_s1", "fp16_scale_growth_s2",
        "fp16_overflow_ga_s1", "fp16_overflow_ga_s2", "fp16_overflow_offload_s1", "fp16_overflow_offload_s2"]
# Scenarios that run in one spawned group per world size (dist_helpers.run_scenarios), in this order.
NAMES_BY_WORLD = {
    2: OFFLOAD_GA + BF16 + FP16 + RANK_UNUSED_WARM + RANK_UNUSED,
    3: OFFLOAD_GA + RANK_UNUSED_WARM + RANK_UNUSED,
}
