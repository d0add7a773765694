"""DeepSpeed's LR schedules (zerocore/zero/lr_schedules.py) against DeepSpeed's formulas, by hand and at random.

DeepSpeed's iteration i is the schedule's value after i + 1 calls of step() (i = -1: just built): see
[Note: step counting] in lr_schedules.py. `lr_after(n)` below steps n times and reads the optimizer's lr.
"""
import math
import random

import pytest
import torch

from zerocore.zero.lr_schedules import (WarmupCosineLR, WarmupDecayLR, WarmupLR, build_lr_scheduler,
                                        schedule_params)


def make_opt(lrs=(0.5,)):
    torch.manual_seed(0)
    groups = [{"params": [torch.nn.Parameter(torch.randn(3))], "lr": lr} for lr in lrs]
    return torch.optim.AdamW(groups)


def run(opt, sched, steps):
    """The lr of every group before each of `steps` optimizer steps (what each step trains at)."""
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in opt.param_groups])
        for g in opt.param_groups:          # random gradients: the scheduler must not care
            for p in g["params"]:
                p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
    return seen


def at_iteration(seen, i):
    """DeepSpeed's lr at iteration i (the optimizer's step i + 1)."""
    return seen[i + 1][0]


def test_warmup_lr_log_by_hand():
    opt = make_opt([0.5])          # WarmupLR sets absolute lrs: warmup_max_lr replaces the optimizer's 0.5
    sched = build_lr_scheduler(opt, {"type": "WarmupLR", "params": {
        "warmup_min_lr": 0.01, "warmup_max_lr": 0.1, "warmup_num_steps": 10}})
    seen = run(opt, sched, 40)
    assert seen[0][0] == 0.01                                                    # before any step: min
    assert at_iteration(seen, 0) == pytest.approx(0.01)                          # log(1) = 0
    assert at_iteration(seen, 4) == pytest.approx(0.01 + 0.09 * math.log(5) / math.log(10))   # mid-warmup
    assert at_iteration(seen, 9) == pytest.approx(0.1)                           # log(10) / log(10)
    assert at_iteration(seen, 10) == pytest.approx(0.1)
    assert at_iteration(seen, 38) == pytest.approx(0.1)                          # stays at max


def test_warmup_lr_linear_and_default_max_is_the_optimizers_lr():
    opt = make_opt([0.3])
    sched = WarmupLR(opt, warmup_num_steps=8, warmup_type="linear")     # warmup_max_lr None: the group's 0.3
    seen = run(opt, sched, 12)
    assert seen[0][0] == 0.0
    assert at_iteration(seen, 0) == 0.0
    assert at_iteration(seen, 3) == pytest.approx(0.3 * 3 / 8)
    assert at_iteration(seen, 7) == pytest.approx(0.3 * 7 / 8)
    assert at_iteration(seen, 8) == pytest.approx(0.3)


def test_warmup_decay_lr_by_hand():
    opt = make_opt([0.5])
    sched = build_lr_scheduler(opt, {"type": "WarmupDecayLR", "params": {
        "total_num_steps": 30, "warmup_max_lr": 0.1, "warmup_num_steps": 10, "warmup_type": "linear"}})
    seen = run(opt, sched, 45)
    assert seen[0][0] == 0.0
    assert at_iteration(seen, 5) == pytest.approx(0.1 * 5 / 10)                 # mid-warmup
    assert at_iteration(seen, 10) == pytest.approx(0.1)                         # end of warmup: (30-10)/(30-10)
    assert at_iteration(seen, 15) == pytest.approx(0.1 * (30 - 15) / (30 - 10))  # mid-decay: 0.075
    assert at_iteration(seen, 30) == pytest.approx(0.0)                         # end
    assert at_iteration(seen, 43) == 0.0                                        # never negative


def test_warmup_decay_lr_default_max_is_deepspeeds_0_001():
    opt = make_opt([0.5])
    sched = WarmupDecayLR(opt, total_num_steps=100, warmup_num_steps=2, warmup_type="linear")
    seen = run(opt, sched, 4)
    assert at_iteration(seen, 2) == pytest.approx(0.001 * (100 - 2) / (100 - 2))


def test_warmup_cosine_lr_by_hand_scales_each_groups_lr():
    opt = make_opt([0.2, 0.02])
    sched = build_lr_scheduler(opt, {"type": "WarmupCosineLR", "params": {
        "total_num_steps": 25, "warmup_num_steps": 5, "warmup_min_ratio": 0.1, "cos_min_ratio": 0.01,
        "warmup_type": "linear"}})
    seen = run(opt, sched, 35)
    assert seen[0] == [0.0, 0.0]                                    # DeepSpeed gives 0 before the first step
    assert at_iteration(seen, 0) == pytest.approx(0.2 * 0.1)
    assert at_iteration(seen, 2) == pytest.approx(0.2 * (0.1 + 2 / 5 * 0.9))

    def cos(p):
        return 0.01 + 0.99 * (1 + math.cos(math.pi * p)) / 2
    assert at_iteration(seen, 5) == pytest.approx(0.2 * cos((5 - 5 + 1) / 20))   # first step after warmup
    assert at_iteration(seen, 15) == pytest.approx(0.2 * cos(11 / 20))            # mid-decay
    assert at_iteration(seen, 24) == pytest.approx(0.2 * 0.01)                    # end: cos_min_ratio
    assert at_iteration(seen, 33) == pytest.approx(0.2 * 0.01)                    # clamped past the end
    assert seen[16][1] == pytest.approx(0.02 * cos(11 / 20))                       # the second group: its own lr


def test_warmup_cosine_log_warmup_by_hand():
    opt = make_opt([1.0])
    sched = WarmupCosineLR(opt, total_num_steps=100, warmup_num_steps=20)     # log warmup, warmup_min_ratio 0
    seen = run(opt, sched, 22)
    assert at_iteration(seen, 9) == pytest.approx(math.log(10) / math.log(20))
    assert at_iteration(seen, 19) == pytest.approx(1.0)


def reference(kind, p, i, base_lr):
    """DeepSpeed's formula for iteration i, written out independently of lr_schedules.py."""
    w = max(2, p["warmup_num_steps"])
    if i < 0:
        return 0.0 if kind == "WarmupCosineLR" else p["warmup_min_lr"]
    frac = math.log(i + 1) / math.log(w) if p["warmup_type"] == "log" else i / w
    if kind == "WarmupCosineLR":
        if i < w:
            ratio = p["warmup_min_ratio"] + frac * (1 - p["warmup_min_ratio"])
        else:
            prog = min(1.0, (i - w + 1) / max(1, p["total_num_steps"] - w))
            ratio = max(0.0, p["cos_min_ratio"] + (1 - p["cos_min_ratio"]) * (1 + math.cos(math.pi * prog)) / 2)
        return base_lr * ratio
    if i < w:
        gamma = frac
    elif kind == "WarmupLR":
        gamma = 1.0
    else:
        gamma = max(0.0, (p["total_num_steps"] - i) / max(1.0, p["total_num_steps"] - w))
    return p["warmup_min_lr"] + (p["warmup_max_lr"] - p["warmup_min_lr"]) * gamma


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", ["WarmupLR", "WarmupDecayLR", "WarmupCosineLR"])
def test_random_schedules_follow_deepspeeds_formula(kind, seed):
    rng = random.Random(seed)
    base_lr = rng.uniform(1e-4, 1e-2)
    w = rng.randint(1, 30)
    p = {"warmup_num_steps": w, "warmup_type": rng.choice(["log", "linear"]),
         "total_num_steps": w + rng.randint(0, 50), "warmup_min_lr": rng.uniform(0, 1e-4),
         "warmup_max_lr": rng.uniform(1e-4, 1e-2), "warmup_min_ratio": rng.uniform(0, 0.5),
         "cos_min_ratio": rng.uniform(0, 0.5)}
    params = {k: v for k, v in p.items() if k in schedule_params(kind)}
    opt = make_opt([base_lr])
    sched = build_lr_scheduler(opt, {"type": kind, "params": params})
    seen = run(opt, sched, 90)
    for n, lrs in enumerate(seen):
        assert lrs[0] == pytest.approx(reference(kind, p, n - 1, base_lr), rel=1e-12, abs=1e-15), (n, p)


@pytest.mark.parametrize("spec", [
    {"type": "WarmupLR", "params": {"warmup_min_lr": 0.001, "warmup_max_lr": 0.01, "warmup_num_steps": 7}},
    {"type": "WarmupDecayLR", "params": {"total_num_steps": 20, "warmup_num_steps": 5, "warmup_type": "linear"}},
    {"type": "WarmupCosineLR", "params": {"total_num_steps": 20, "warmup_num_steps": 5, "cos_min_ratio": 0.1}},
])
def test_state_dict_round_trip(spec):
    opt = make_opt([0.05, 0.01])
    sched = build_lr_scheduler(opt, spec)
    run(opt, sched, 9)
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    expected = run(opt, sched, 15)

    opt2 = make_opt([0.05, 0.01])
    sched2 = build_lr_scheduler(opt2, spec)      # built first, then loaded (torch's order for resuming)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert sched2.last_epoch == 9
    assert run(opt2, sched2, 15) == expected          # the same floats: the same closed-form computation


def test_per_group_lists():
    opt = make_opt([0.5, 0.5])
    sched = WarmupLR(opt, warmup_min_lr=[0.0, 0.1], warmup_max_lr=[1.0, 0.2], warmup_num_steps=4,
                     warmup_type="linear")
    seen = run(opt, sched, 4)
    assert seen[3] == pytest.approx([0.5, 0.15])
    with pytest.raises(ValueError, match="warmup_max_lr has 3 values for 2 param groups"):
        WarmupLR(make_opt([0.5, 0.5]), warmup_max_lr=[1.0, 1.0, 1.0])


@pytest.mark.parametrize("spec,match", [
    ({"type": "OneCycle", "params": {}}, "scheduler type 'OneCycle' is not supported"),
    ({"type": "WarmupLR", "params": {"warmup_type": "cosine"}}, "warmup_type='cosine': use 'log' or 'linear'"),
    ({"type": "WarmupLR", "params": {"warmup_num_steps": 0}}, "warmup_num_steps=0 must be a positive integer"),
    ({"type": "WarmupLR", "params": {"warmup_num_steps": 2.5}}, "warmup_num_steps=2.5"),
    ({"type": "WarmupDecayLR", "params": {}}, r"WarmupDecayLR needs \['total_num_steps'\]"),
    ({"type": "WarmupLR", "params": {"warmup_steps": 3}}, r"WarmupLR does not take \['warmup_steps'\]"),
    ({"type": "WarmupLR", "params": {"last_batch_iteration": 5}}, "last_batch_iteration=5"),
    ({"type": "WarmupCosineLR", "params": {"total_num_steps": 9, "cos_min_ratio": -1}}, "cos_min_ratio=-1"),
])
def test_bad_specs_name_the_problem(spec, match):
    with pytest.raises(ValueError, match=match):
        build_lr_scheduler(make_opt(), spec)


def test_type_is_matched_without_case_and_last_batch_iteration_minus_one_is_taken():
    sched = build_lr_scheduler(make_opt(), {"type": "warmupdecaylr",
                                            "params": {"total_num_steps": 5, "last_batch_iteration": -1}})
    assert isinstance(sched, WarmupDecayLR) and isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
