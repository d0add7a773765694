"""Multi-rank scenarios for the reliability of ZeroOptimizer (tests/test_zero_reliability.py runs them).

Each one provokes what users run into (per-rank seeds, a model moved after construction, a backward that raised,
a bad checkpoint, a rank that skips step() or dies) and checks that the engine either does the right thing,
compared against a clean reference run, or raises a named error on every rank within seconds.
"""
from __future__ import annotations

import copy
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from zero_scenarios import (LOCAL_BATCH, batches, local, loss_of, mlp, ranks_hold_same_params, rel_err,
                            train_reference)
from zerocore.zero import ZeroOptimizer
from zerocore.zero.bindings import ParameterReplacedError
from zerocore.zero.collectives import CollectiveTimeout
from zerocore.zero.consistency import RankMismatchError

FP32_TOL = 1e-5
NAMED_ERROR_S = 30.0     # a named error must reach every rank within this


def _train(model, opt, data, rank, start=0):
    for row in data[start:]:
        (x, y), = row
        opt.backward(loss_of("mlp", model(local(x, rank)), local(y, rank)))
        opt.step()
        opt.zero_grad()
    opt.wait_for_params()
    return model


def _make(rank=None, seed=1, **options):
    model = mlp(seed=seed)
    opts = dict(stage=2, lr=1e-3, weight_decay=0.01, bucket_size=200, comm_timeout_s=60)
    opts.update(options)
    return model, ZeroOptimizer(model, **opts)


def _expect(error_type, fn, *needles):
    """Run fn, which must raise error_type whose message holds every needle; returns (message, seconds)."""
    t0 = time.monotonic()
    try:
        fn()
    except error_type as e:
        msg = str(e)
        missing = [n for n in needles if n not in msg]
        if missing:
            raise AssertionError(f"{error_type.__name__} does not mention {missing}: {msg}")
        return msg, time.monotonic() - t0
    raise AssertionError(f"no {error_type.__name__} raised")


# ------------------------------------------------------------------------------------- per-rank initial weights
class WithBuffer(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(8, 6)
        self.norm = nn.BatchNorm1d(6)
        self.norm.running_mean.normal_()          # a buffer that differs per seed too

    def forward(self, x):
        return self.norm(self.lin(x))


def _per_rank_seeds(stage):
    def scenario(rank, world):
        """Ranks seeded differently end up with rank 0's parameters and buffers (sync_module_states=True)."""
        model = WithBuffer(seed=100 + rank)
        opt = ZeroOptimizer(model, stage=stage, lr=0.0, comm_timeout_s=60)
        want = WithBuffer(seed=100)
        for (n, a), (_, b) in zip(model.state_dict().items(), want.state_dict().items()):
            if not torch.equal(a, b):
                raise AssertionError(f"{n} differs from rank 0's after construction")
        x = torch.randn(LOCAL_BATCH, 8, generator=torch.Generator().manual_seed(rank))
        opt.backward(model(x).square().mean())
        opt.step()                                 # lr=0: parameters stay rank 0's on every rank
        opt.wait_for_params()
        if not ranks_hold_same_params(model, world):
            raise AssertionError("ranks hold different parameters after a step at lr=0")
        if not torch.equal(model.lin.weight, want.lin.weight):
            raise AssertionError("parameters are not rank 0's after a step at lr=0")
        opt.close()
        return {"synced": True}
    return scenario


per_rank_seeds_s1 = _per_rank_seeds(1)
per_rank_seeds_s2 = _per_rank_seeds(2)


def per_rank_seeds_unsynced_raise(rank, world):
    """sync_module_states=False: differing initial values raise on every rank, naming the first parameter."""
    msg, _ = _expect(RankMismatchError, lambda: _make(seed=1 + rank, sync_module_states=False),
                     "'0.weight'", "sync_module_states")
    _make(sync_module_states=False)[1].close()       # equal seeds pass the check
    return {"message": msg}


def _hyper_differs(option, mine, theirs, needle):
    def scenario(rank, world):
        value = mine if rank == 0 else theirs
        msg, seconds = _expect(RankMismatchError, lambda: _make(**{option: value}), needle)
        return {"message": msg, "seconds": seconds}
    return scenario


hyper_lr_differs = _hyper_differs("lr", 1e-3, 2e-3, "option 'lr'")
hyper_betas_differ = _hyper_differs("betas", (0.9, 0.999), (0.9, 0.99), "option 'betas'")
hyper_clipping_differs = _hyper_differs("gradient_clipping", 0.0, 1.0, "option 'gradient_clipping'")


def hyper_group_lr_differs(rank, world):
    model = mlp()
    groups = [{"params": [p for n, p in model.named_parameters() if n.endswith("weight")], "lr": 0.1 * (1 + rank)},
              {"params": [p for n, p in model.named_parameters() if n.endswith("bias")]}]
    msg, _ = _expect(RankMismatchError, lambda: ZeroOptimizer(model, param_groups=groups, comm_timeout_s=60),
                     "option 'param_groups'")
    return {"message": msg}


# ----------------------------------------------------------------------------------- parameters replaced later
def _moved_after_construction(stage):
    def scenario(rank, world):
        """model.to(torch.device("cpu", 0)) after construction (transformers' Trainer does it) still trains,
        equal to the single-process reference."""
        data = batches("mlp", world, 6)
        model, opt = _make(stage=stage)
        model.to(torch.device("cpu", 0))           # copies every parameter (and stage 1's gradient views)
        moved = sum(p.data_ptr() != b for p, b in zip(model.parameters(), _expected_ptrs(opt)))
        if moved == 0:
            raise AssertionError("model.to(cpu:0) did not copy the parameters: the scenario tests nothing")
        _train(model, opt, data, rank)
        ref = train_reference("mlp", data)
        err = rel_err(model, ref)
        if err > FP32_TOL:
            raise AssertionError(f"after model.to(cpu:0): rel err {err:.3g} vs the reference")
        opt.close()
        return {"rel_err": err, "moved": moved}
    return scenario


def _expected_ptrs(opt):
    """Where each trainable parameter (in model.parameters() order) should live: its unit's buffer."""
    return [ptr for _, ptr in sorted((s.index, opt._bindings.expected_ptr(u, s)) for u in opt.units for s in u.slots)]


moved_after_construction_s1 = _moved_after_construction(1)
moved_after_construction_s2 = _moved_after_construction(2)


def data_assigned_is_adopted(rank, world):
    """p.data = new values after construction: the engine trains from the new values (fp32 masters too)."""
    data = batches("mlp", world, 4)
    model, opt = _make(dtype=torch.bfloat16)
    other = mlp(seed=5)
    for p, q in zip(model.parameters(), other.parameters()):
        p.data = q.detach().to(torch.bfloat16).clone()
    _train_low(model, opt, data, rank)
    ref_model = mlp(seed=5)                    # started from the same bf16-rounded values
    for q in ref_model.parameters():
        q.data = q.data.to(torch.bfloat16).float()
    ref_opt = ZeroOptimizer(ref_model, stage=2, lr=1e-3, weight_decay=0.01, bucket_size=200, comm_timeout_s=60,
                            dtype=torch.bfloat16)
    _train_low(ref_model, ref_opt, data, rank)
    err = rel_err(model, ref_model.float())
    if err > 0:
        raise AssertionError(f"adopted p.data differs from a run started from those values: {err:.3g}")
    opt.close(), ref_opt.close()
    return {"rel_err": err}


def _train_low(model, opt, data, rank):
    for row in data:
        (x, y), = row
        opt.backward(loss_of("mlp", model(local(x, rank).to(torch.bfloat16)), local(y, rank)))
        opt.step()
        opt.zero_grad()
    opt.wait_for_params()


def ema_swap_for_evaluation(rank, world):
    """Swapping p.data to other weights for an evaluation forward and back (as EMA helpers do) changes nothing:
    training goes on equal to a run without the evaluation."""
    data = batches("mlp", world, 5)
    clean_model, clean_opt = _make()
    _train(clean_model, clean_opt, data, rank)
    model, opt = _make()
    _train(model, opt, data[:2], rank)
    ema = [p.detach().clone() * 0.5 for p in model.parameters()]
    backup = [p.data for p in model.parameters()]
    for p, e in zip(model.parameters(), ema):
        p.data = e
    with torch.no_grad():
        model(torch.randn(LOCAL_BATCH, 16))
    for p, b in zip(model.parameters(), backup):
        p.data = b
    _train(model, opt, data, rank, start=2)
    for (n, a), (_, b) in zip(model.named_parameters(), clean_model.named_parameters()):
        if not torch.equal(a, b):
            raise AssertionError(f"{n}: the evaluation swap changed training ({(a - b).abs().max():.3g})")
    opt.close(), clean_opt.close()
    return {"equal": True}


def moved_bf16_keeps_fp32_masters(rank, world):
    """model.to(cpu:0) of a bf16 model rebinds the parameters without touching the fp32 masters."""
    model, opt = _make(dtype=torch.bfloat16)
    _train_low(model, opt, batches("mlp", world, 2), rank)
    masters = opt.master.clone()
    model.to(torch.device("cpu", 0))
    model(torch.randn(LOCAL_BATCH, 16, dtype=torch.bfloat16))
    if not torch.equal(masters, opt.master):
        raise AssertionError("rebinding a copied bf16 parameter changed the fp32 master")
    if any(p.data_ptr() != e for p, e in zip(model.parameters(), _expected_ptrs(opt))):
        raise AssertionError("the copied parameters were not rebound to the engine's buffers")
    opt.close()
    return {"equal": True}


def functional_call_is_allowed(rank, world):
    """torch.func.functional_call swaps parameters for one call: no error, and the model is unchanged."""
    model, opt = _make()
    x = torch.randn(LOCAL_BATCH, 16)
    params = {n: p.detach() * 2 for n, p in model.named_parameters()}
    out = torch.func.functional_call(model, params, (x,))
    want = mlp()
    want.load_state_dict(params)
    torch.testing.assert_close(out, want(x), rtol=0, atol=0)
    _train(model, opt, batches("mlp", world, 1), rank)
    opt.close()
    return {"ok": True}


def replaced_parameters_raise(rank, world):
    """load_state_dict(assign=True) and a cast after construction raise naming the parameter and the fix."""
    model, opt = _make()
    x = torch.randn(LOCAL_BATCH, 16)
    model.load_state_dict(copy.deepcopy(mlp(seed=3).state_dict()), assign=True)
    opt.backward(model(x).sum())
    m1, _ = _expect(ParameterReplacedError, opt.step, "'0.weight'", "assign=True")
    opt.close()
    model, opt = _make()
    model.half()
    m2, _ = _expect(ParameterReplacedError, lambda: model(x.half()), "'0.weight'", "dtype=")
    opt.close()
    return {"assign": m1, "cast": m2}


# ----------------------------------------------------------------------------------- a backward that raised
class FailOnce(torch.autograd.Function):
    armed = False

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        if FailOnce.armed:
            FailOnce.armed = False
            raise RuntimeError("injected failure in backward")
        return g


def _stale_gradients(stage, user_backward=False):
    def scenario(rank, world):
        """A backward that raises part-way leaves nothing behind once zero_grad() ran: the next steps equal a
        clean run. Two failures: one inside the model's backward, one from the engine's own window check."""
        data = batches("mlp", world, 5)
        clean_model, clean_opt = _make(stage=stage)
        _train(clean_model, clean_opt, data, rank)

        model, opt = _make(stage=stage)
        (x, y), = data[0][0:1]
        bwd = (lambda loss: loss.backward()) if user_backward else opt.backward

        def failing_backward():
            # Fails in the middle of the model (after the last layers' gradients reached the engine).
            FailOnce.armed = True
            out = model[4](FailOnce.apply(model[3](model[2](model[1](model[0](local(x, rank)))))))
            bwd(loss_of("mlp", out, local(y, rank)))
        _expect(RuntimeError, failing_backward, "injected failure")
        if not user_backward:
            _expect(RuntimeError, lambda: opt.backward(model(local(x, rank)).sum()), "zero_grad")
        opt.zero_grad()
        # The engine's "backward ran 2 times" check: a backward without the step in between.
        bwd(loss_of("mlp", model(local(x, rank)), local(y, rank)))
        _expect(RuntimeError, lambda: bwd(loss_of("mlp", model(local(x, rank)), local(y, rank))),
                "gradient_accumulation_steps=1")
        opt.zero_grad()
        _train(model, opt, data, rank)
        for (n, a), (_, b) in zip(model.named_parameters(), clean_model.named_parameters()):
            if not torch.equal(a, b):
                raise AssertionError(f"{n} differs from the clean run by {(a - b).abs().max():.3g}")
        if opt.global_grad_norm != clean_opt.global_grad_norm:
            raise AssertionError(f"gradient norm {opt.global_grad_norm} != clean {clean_opt.global_grad_norm}")
        opt.close(), clean_opt.close()
        return {"equal": True}
    return scenario


def backward_fails_on_one_rank(rank, world):
    """Only the last rank's backward raises, and it retries after zero_grad() (the skip-the-bad-batch pattern):
    every rank gets a named error within seconds, not a reduction waiting for its peer until the timeout."""
    data = batches("mlp", world, 3)
    model, opt = _make()
    (x, y), = data[0]

    def loop():
        for t in range(2):
            if rank == world - 1 and t == 0:
                FailOnce.armed = True
                out = model[4](FailOnce.apply(model[3](model[2](model[1](model[0](local(x, rank)))))))
                try:
                    opt.backward(loss_of("mlp", out, local(y, rank)))
                except RuntimeError:
                    opt.zero_grad()
                    continue
            opt.backward(loss_of("mlp", model(local(x, rank)), local(y, rank)))
            opt.step()
            opt.zero_grad()
    msg, seconds = _expect(RankMismatchError, loop, "different points of the training loop")
    if seconds > NAMED_ERROR_S:
        raise AssertionError(f"took {seconds:.1f} s")
    return {"seconds": seconds, "message": msg}


class FrozenHead(nn.Module):
    """Checkpointed (reentrant) trainable blocks under a frozen head: the first trainable gradient arrives
    inside a nested backward (the checkpoint's recomputation)."""

    def __init__(self):
        super().__init__()
        self.body = mlp()
        self.head = nn.Linear(5, 5)
        self.head.requires_grad_(False)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        h = checkpoint(self.body[:2], x.requires_grad_(True), use_reentrant=True)
        h = checkpoint(self.body[2:], h, use_reentrant=True)
        return self.head(h)


def _reentrant_frozen_head(micro):
    def scenario(rank, world):
        data = batches("mlp", world, 4, micro=micro)
        torch.manual_seed(11)
        model = FrozenHead()
        ref = copy.deepcopy(model)
        opt = ZeroOptimizer(model, stage=2, lr=1e-3, weight_decay=0.01, bucket_size=200, comm_timeout_s=60,
                            gradient_accumulation_steps=micro)
        ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01,
                                    foreach=False)
        for row in data:
            for x, y in row:
                opt.backward(loss_of("mlp", model(local(x, rank)), local(y, rank)))
                (loss_of("mlp", ref(x.clone()), y) / micro).backward()
            opt.step()
            opt.zero_grad()
            ref_opt.step()
            ref_opt.zero_grad()
        opt.wait_for_params()
        err = rel_err(model, ref)
        if err > FP32_TOL or opt.global_steps != len(data):
            raise AssertionError(f"rel err {err:.3g}, {opt.global_steps} steps of {len(data)}")
        opt.close()
        return {"rel_err": err}
    return scenario


reentrant_frozen_head = _reentrant_frozen_head(1)
reentrant_frozen_head_ga = _reentrant_frozen_head(2)


stale_gradients_s1 = _stale_gradients(1)
stale_gradients_s2 = _stale_gradients(2)
stale_gradients_user_backward_s2 = _stale_gradients(2, user_backward=True)


# ------------------------------------------------------------------------------------------ state dict loads
def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()], opt.exp_avg.clone(), opt.exp_avg_sq.clone(),
            list(opt.param_steps), opt.global_steps, [dict(g) for g in opt.param_groups])


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and torch.equal(a[1], b[1]) and \
        torch.equal(a[2], b[2]) and a[3:5] == b[3:5] and \
        [{k: v for k, v in g.items() if k != "params"} for g in a[5]] == \
        [{k: v for k, v in g.items() if k != "params"} for g in b[5]]


BAD_ENTRIES = {
    "one_element": lambda t: t[:1].clone(),
    "longer": lambda t: torch.cat([t, t[:3]]),
    "shorter": lambda t: t[: t.numel() // 2].clone(),
    "int64": lambda t: t.to(torch.int64),
}


def bad_state_dicts_change_nothing(rank, world):
    """Each malformed entry raises on every rank, names the parameter, and leaves everything unchanged."""
    data = batches("mlp", world, 3)
    model, opt = _make()
    _train(model, opt, data, rank)
    good = copy.deepcopy(opt.state_dict())
    _train(model, opt, batches("mlp", world, 2, seed=9), rank)     # move on, so a load would change things
    before = _snapshot(model, opt)
    out = {}
    for kind, corrupt in BAD_ENTRIES.items():
        for key in ("master", "exp_avg"):
            sd = copy.deepcopy(good)
            # The last parameter's entry is corrupted; the others would load fine (all or nothing).
            name = list(sd["params"])[-1]
            sd["params"][name][key] = corrupt(sd["params"][name][key])
            msg, seconds = _expect(ValueError, lambda: opt.load_state_dict(sd), repr(name), key, "changed nothing")
            if not _same(before, _snapshot(model, opt)):
                raise AssertionError(f"a refused load ({kind} {key}) changed the optimizer or the model")
            out[f"{kind}-{key}"] = seconds
    opt.load_state_dict(good)                  # the good one still loads
    if _same(before, _snapshot(model, opt)):
        raise AssertionError("loading the good state dict changed nothing: the scenario tests nothing")
    opt.close()
    return out


def load_fails_on_one_rank(rank, world):
    """Only the last rank's checkpoint is bad: every rank raises within seconds naming that rank."""
    data = batches("mlp", world, 2)
    model, opt = _make()
    _train(model, opt, data, rank)
    sd = copy.deepcopy(opt.state_dict())
    before = _snapshot(model, opt)
    if rank == world - 1:
        name = list(sd["params"])[0]
        sd["params"][name]["exp_avg_sq"] = sd["params"][name]["exp_avg_sq"].double()
    msg, seconds = _expect(ValueError, lambda: opt.load_state_dict(sd), f"rank {world - 1}:", "float64")
    if seconds > NAMED_ERROR_S or not _same(before, _snapshot(model, opt)):
        raise AssertionError(f"took {seconds:.1f} s, or the refused load changed something")
    opt.close()
    return {"seconds": seconds, "message": msg}


# -------------------------------------------------------------------------------- ranks that diverge or die
def skipped_step(rank, world):
    """The last rank skips one step(): every rank raises RankMismatchError within seconds (no SIGABRT)."""
    data = batches("mlp", world, 4)
    model, opt = _make()
    (x, y), = data[0]

    def loop():
        for t in range(3):
            opt.backward(loss_of("mlp", model(local(x, rank)), local(y, rank)))
            if not (t == 1 and rank == world - 1):
                opt.step()
            opt.zero_grad()
    msg, seconds = _expect(RankMismatchError, loop, "different points of the training loop", "step()")
    if seconds > NAMED_ERROR_S:
        raise AssertionError(f"the mismatch took {seconds:.1f} s to surface")
    return {"seconds": seconds, "message": msg}


skipped_step.expect_rank_errors = True


def construction_honours_timeout(rank, world):
    """A rank that never constructs: the others' construction check fails after comm_timeout_s, not 30 min.
    Runs on its own group (a timed-out gloo group is unusable) and last."""
    sub = dist.new_group(backend="gloo")
    if rank != 0:
        return {"role": "idle"}
    msg, seconds = _expect(CollectiveTimeout, lambda: ZeroOptimizer(mlp(), process_group=sub, comm_timeout_s=2),
                           "cross-rank check")
    if not 1.5 <= seconds <= NAMED_ERROR_S:
        raise AssertionError(f"the construction check gave up after {seconds:.1f} s (comm_timeout_s=2)")
    return {"seconds": seconds}


def a_rank_dies_mid_step(rank, world):
    """The last rank dies in the middle of training: the others raise PeerFailure naming it within seconds."""
    from zerocore.zero.collectives import PeerFailure
    data = batches("mlp", world, 3)
    model, opt = _make()
    _train(model, opt, data[:1], rank)
    if rank == world - 1:
        os._exit(3)
    msg, seconds = _expect(PeerFailure, lambda: _train(model, opt, data, rank), f"rank {world - 1} of {world}")
    if seconds > NAMED_ERROR_S:
        raise AssertionError(f"the dead peer was noticed after {seconds:.1f} s")
    return {"seconds": seconds, "message": msg}


# Run in one spawned group per world size, in this order (the timeout breaks its own subgroup only: keep it last).
SCENARIOS = ["per_rank_seeds_s1", "per_rank_seeds_s2", "per_rank_seeds_unsynced_raise", "hyper_lr_differs",
             "hyper_betas_differ", "hyper_clipping_differs", "hyper_group_lr_differs", "moved_after_construction_s1",
             "moved_after_construction_s2", "data_assigned_is_adopted", "ema_swap_for_evaluation",
             "moved_bf16_keeps_fp32_masters", "functional_call_is_allowed", "replaced_parameters_raise",
             "backward_fails_on_one_rank", "reentrant_frozen_head", "reentrant_frozen_head_ga",
             "stale_gradients_s1", "stale_gradients_s2", "stale_gradients_user_backward_s2",
             "bad_state_dicts_change_nothing", "load_fails_on_one_rank", "construction_honours_timeout"]
SCENARIOS_BY_WORLD = {2: SCENARIOS, 3: ["per_rank_seeds_s2", "moved_after_construction_s1", "load_fails_on_one_rank"]}
# Each leaves its group unusable: run on a group of its own.
ALONE = ["skipped_step", "a_rank_dies_mid_step"]
