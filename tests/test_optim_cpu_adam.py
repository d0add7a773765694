"""Tests of zerocore.optim.CPUAdam as a drop-in for torch.optim.AdamW / Adam."""
import copy

import pytest
import torch

import zerocore.ops.adam as adam_ops
from zerocore.optim import CPUAdam


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.GELU(), torch.nn.Linear(17, 3))


def _train(model, opt, steps, seed=1, scheduler=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 13, generator=gen)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _max_rel_err(a, b):
    return max(((p - q).norm() / q.norm()).item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("adamw_mode", [True, False], ids=["adamw", "adam"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_matches_torch_over_10_steps(adamw_mode, weight_decay):
    ours, theirs = _model(), _model()
    opt = CPUAdam(ours.parameters(), lr=1e-2, weight_decay=weight_decay, adamw_mode=adamw_mode)
    torch_cls = torch.optim.AdamW if adamw_mode else torch.optim.Adam
    ref = torch_cls(theirs.parameters(), lr=1e-2, weight_decay=weight_decay)
    _train(ours, opt, 10)
    _train(theirs, ref, 10)
    assert _max_rel_err(ours, theirs) <= 1e-6
    for p, q in zip(ours.parameters(), theirs.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = opt.state[p][key], ref.state[q][key]
            assert ((a - b).norm() / b.norm()).item() <= 1e-6
        assert opt.state[p]["step"].item() == ref.state[q]["step"].item() == 10


def test_state_dict_round_trip_with_torch_adamw_both_ways():
    # CPUAdam -> torch.optim.AdamW: train 5 steps with ours, continue 5 with torch; compare with 10 of ours.
    a, b, c = _model(), _model(), _model()
    opt_a = CPUAdam(a.parameters(), lr=1e-2)
    opt_c = CPUAdam(c.parameters(), lr=1e-2)
    _train(a, opt_a, 5)
    b.load_state_dict(a.state_dict())
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.param_groups[0]["decoupled_weight_decay"] is True
    _train(b, opt_b, 5, seed=2)
    _train(c, opt_c, 5)
    _train(c, opt_c, 5, seed=2)
    assert _max_rel_err(b, c) <= 1e-6

    # torch.optim.AdamW -> CPUAdam.
    d, e = _model(), _model()
    opt_d = torch.optim.AdamW(d.parameters(), lr=1e-2)
    _train(d, opt_d, 5)
    e.load_state_dict(d.state_dict())
    opt_e = CPUAdam(e.parameters(), lr=1e-2)
    opt_e.load_state_dict(copy.deepcopy(opt_d.state_dict()))
    _train(d, opt_d, 5, seed=2)
    _train(e, opt_e, 5, seed=2)
    assert _max_rel_err(e, d) <= 1e-6
    assert sorted(opt_e.state_dict()["state"][0]) == ["exp_avg", "exp_avg_sq", "step"]


def test_lr_scheduler_drives_the_kernel():
    ours, theirs = _model(), _model()
    opt = CPUAdam(ours.parameters(), lr=1e-2)
    ref = torch.optim.AdamW(theirs.parameters(), lr=1e-2)
    _train(ours, opt, 10, scheduler=torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1))
    _train(theirs, ref, 10, scheduler=torch.optim.lr_scheduler.StepLR(ref, step_size=3, gamma=0.1))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)
    assert _max_rel_err(ours, theirs) <= 1e-6


def test_one_kernel_call_per_param_group(monkeypatch):
    calls = []
    real = adam_ops.adam_step

    def counting(params, *args, **kwargs):
        calls.append(len(params))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(adam_ops, "adam_step", counting)
    model = _model()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = CPUAdam([{"params": first}, {"params": second, "lr": 1e-3}], lr=1e-2)
    _train(model, opt, 3)
    assert calls == [len(first), len(second)] * 3


def test_params_without_grad_are_skipped_and_keep_their_own_step():
    ours, theirs = _model(), _model()
    opt = CPUAdam(ours.parameters(), lr=1e-2)
    ref = torch.optim.AdamW(theirs.parameters(), lr=1e-2)
    for model, o in ((ours, opt), (theirs, ref)):
        _train(model, o, 2)
        model[2].weight.requires_grad_(False)  # frozen for two steps: its step count falls behind
        _train(model, o, 2, seed=3)
        model[2].weight.requires_grad_(True)
        _train(model, o, 2, seed=4)
    assert opt.state[ours[2].weight]["step"].item() == 4
    assert opt.state[ours[0].weight]["step"].item() == 6
    assert _max_rel_err(ours, theirs) <= 1e-6


def test_bf16_state_option_trains_close_to_fp32_state_and_loads_into_torch():
    ours, ref_model = _model(), _model()
    opt = CPUAdam(ours.parameters(), lr=1e-2, state_dtype=torch.bfloat16)
    ref = CPUAdam(ref_model.parameters(), lr=1e-2)
    _train(ours, opt, 10)
    _train(ref_model, ref, 10)
    assert opt.state[ours[0].weight]["exp_avg"].dtype == torch.bfloat16
    start = _model()
    drift = max(((p - q).norm() / (q - s).norm()).item()
                for p, q, s in zip(ours.parameters(), ref_model.parameters(), start.parameters()))
    assert drift < 0.02
    loaded = torch.optim.AdamW(_model().parameters(), lr=1e-2)
    loaded.load_state_dict(opt.state_dict())  # torch casts the bf16 state to the params' fp32
    assert loaded.state[loaded.param_groups[0]["params"][0]]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("kwargs, message", [
    (dict(amsgrad=True), "amsgrad"),
    (dict(maximize=True), "maximize"),
    (dict(betas=(1.0, 0.999)), "Invalid betas"),
    (dict(lr=-1.0), "Invalid learning rate"),
    (dict(state_dtype=torch.float16), "state_dtype"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CPUAdam(_model().parameters(), **kwargs)


def test_non_fp32_or_sparse_params_raise_clear_errors():
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))
    p.grad = torch.randn(4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="float32 parameters"):
        CPUAdam([p]).step()
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        CPUAdam(emb.parameters()).step()


def test_closure_is_called_and_its_loss_returned():
    model = _model()
    opt = CPUAdam(model.parameters())

    def closure():
        opt.zero_grad()
        loss = model(torch.randn(2, 13)).sum()
        loss.backward()
        return loss

    assert torch.is_tensor(opt.step(closure))
