"""ZeroOptimizer end to end: parity with single-process AdamW, low precision, checkpoints, API errors.

The multi-rank bodies live in tests/zero_scenarios.py (one spawned gloo group per world size runs them all).
"""
import pytest
import torch

import zero_scenarios as Z
from zero_cases import cases, values
from zerocore.zero import ZeroOptimizer


@pytest.mark.parametrize("world,name", cases(Z.PARITY))
def test_fp32_parity_with_single_process_adamw(scenario_results, world, name):
    for v in values(scenario_results, world, name):
        if name == "special_untouched":
            continue
        # <= 1e-5, or no worse than DDP measured in the same scenario
        assert v["rel_err"] <= max(Z.FP32_TOL, v.get("ddp_rel_err", 0.0)), v
        assert v["steps"] == 10
        if "direct" in name:
            assert v["direct_units"] > 0, v


@pytest.mark.parametrize("world,name", cases(Z.LOW_PRECISION))
def test_low_precision_against_fp32_reference(scenario_results, world, name):
    for v in values(scenario_results, world, name):
        assert v["rel_err"] <= Z.LOW_PRECISION_TOL, v
        if "direct" in name:
            assert v["direct_units"] > 0, v
        if name.startswith("fp16"):
            assert v["skipped"] == 1 and v["loss_scale"] == 2.0 ** 15, v


@pytest.mark.parametrize("world,name", cases(Z.CHECKPOINT))
def test_checkpoint_round_trip(scenario_results, world, name):
    for v in values(scenario_results, world, name):
        assert v["resumed_equal"] is True
        if "reshard_rel_err" in v:
            assert v["reshard_rel_err"] <= Z.FP32_TOL


def test_needs_initialized_process_group():
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ZeroOptimizer(torch.nn.Linear(2, 2))


def test_needs_the_module_not_its_parameters(single_rank_group):
    m = torch.nn.Linear(4, 3)
    with pytest.raises(TypeError, match=r"ZeroOptimizer\(model, \.\.\.\), not ZeroOptimizer\(model.parameters\(\)"):
        ZeroOptimizer(m.parameters())


def test_a_model_run_by_ddp_is_refused_before_gradients_go_wrong(single_rank_group):
    """transformers' Trainer given a ZeroOptimizer wraps the model in DDP: the first forward says so."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = torch.nn.Linear(4, 2)
    opt = ZeroOptimizer(model, stage=2)
    try:
        with pytest.raises(RuntimeError, match="runs inside DistributedDataParallel.*ZeroTrainer"):
            DDP(model)(torch.randn(3, 4))
        with pytest.raises(RuntimeError, match="runs inside DistributedDataParallel"):
            DDP(torch.nn.Sequential(model))(torch.randn(3, 4))        # wrapped once more, then given to DDP
        opt.backward(model(torch.randn(3, 4)).sum())         # the model itself still trains
        opt.step()
        assert opt.global_steps == 1
    finally:
        opt.close()


def test_single_process_hint_works_as_written(tmp_path):
    """The hint in the 'needs torch.distributed' error must run as written (no MASTER_ADDR/MASTER_PORT set)."""
    import subprocess
    import sys
    code = ("import os, re, torch, torch.distributed as dist\n"
            "from zerocore import ZeroOptimizer\n"
            "for k in ('MASTER_ADDR', 'MASTER_PORT', 'RANK', 'WORLD_SIZE'): os.environ.pop(k, None)\n"
            "try:\n    ZeroOptimizer(torch.nn.Linear(2, 2))\n"
            "except RuntimeError as e:\n    hint = re.search(r\"init_process_group\\('gloo'.*?\\)\\)\", str(e)).group(0)\n"
            "from dist_helpers import free_port\n"
            "hint = hint.replace('29500', str(free_port()))\n"
            "eval('dist.' + hint[:-1])\n"
            "opt = ZeroOptimizer(torch.nn.Linear(2, 2)); print('ok', opt.world_size)\n")
    import os
    from pathlib import Path
    repo = Path(__file__).resolve().parent.parent          # this checkout's zerocore, whatever pip installed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=str(repo / "tests"), env=env)
    assert done.returncode == 0 and "ok 1" in done.stdout, done.stderr[-2000:]


def test_option_errors_name_the_problem(single_rank_group):
    m = torch.nn.Linear(4, 3)
    with pytest.raises(TypeError, match="unknown ZeroOptimizer option"):
        ZeroOptimizer(m, stag=2)
    with pytest.raises(ValueError, match="stage=4"):
        ZeroOptimizer(m, stage=4)
    with pytest.raises(ValueError, match="no param group"):
        ZeroOptimizer(m, param_groups=[{"params": [m.weight]}])
    with pytest.raises(ValueError, match="appears in param_groups"):
        ZeroOptimizer(m, param_groups=[{"params": [m.weight, m.bias]}, {"params": [m.bias]}])
    with pytest.raises(ValueError, match="unsupported option"):
        ZeroOptimizer(m, param_groups=[{"params": [m.weight, m.bias], "momentum": 0.9}])


def test_lr_scheduler_drives_param_groups(single_rank_group):
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    opt = ZeroOptimizer(m, lr=0.1)
    assert isinstance(opt, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        opt.backward(m(torch.randn(2, 4)).sum())
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert opt.global_steps == 2


def test_accumulation_misuse_is_reported(single_rank_group):
    m = torch.nn.Linear(4, 3)
    opt = ZeroOptimizer(m, stage=2, gradient_accumulation_steps=2)
    x = torch.randn(2, 4)
    opt.backward(m(x).sum())
    opt.step()                       # deferred: first micro-step of two
    assert opt.global_steps == 0 and opt.micro_steps == 1
    opt.backward(m(x).sum())
    with pytest.raises(RuntimeError, match="gradient_accumulation_steps=2"):
        opt.backward(m(x).sum())     # a third backward without the step in between


def test_step_skips_non_finite_gradients_in_fp32(single_rank_group):
    m = torch.nn.Linear(4, 3)
    opt = ZeroOptimizer(m, stage=2)
    before = [p.detach().clone() for p in m.parameters()]
    opt.backward(m(torch.randn(2, 4)).sum() * float("nan"))
    opt.step()
    assert opt.skipped_steps == 1 and opt.global_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_load_state_dict_rejects_wrong_shapes(single_rank_group):
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 5)
    sd = ZeroOptimizer(a).state_dict()
    with pytest.raises(ValueError, match="shape"):
        ZeroOptimizer(b).load_state_dict(sd)
    with pytest.raises(ValueError, match="not a ZeroOptimizer state dict"):
        ZeroOptimizer(b).load_state_dict({"format": "torch"})


def test_state_dict_is_per_parameter(single_rank_group):
    m = torch.nn.Linear(4, 3)
    sd = ZeroOptimizer(m).state_dict()
    assert set(sd["params"]) == {"weight", "bias"}
    w = sd["params"]["weight"]
    assert w["shape"] == (3, 4) and (w["start"], w["end"]) == (0, 12)
    torch.testing.assert_close(w["master"], m.weight.detach().reshape(-1), rtol=0, atol=0)


@pytest.mark.parametrize("world,name", cases(["close_releases_group"]))
def test_close_releases_hooks_and_group(scenario_results, world, name):
    assert values(scenario_results, world, name) == [{"closed": True}] * world
