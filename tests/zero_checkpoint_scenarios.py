"""Multi-rank checkpoint scenarios (tests/test_zero_checkpoint.py runs them): save at 2 ranks, resume at 1, 2,
3 and 4 ranks and at another stage, compared with an uninterrupted run on the same global batches.

The checkpoint folder comes from ZEROCORE_CKPT_TEST_DIR (set by the test before the ranks are spawned), so the
groups of different world sizes share it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from zero_scenarios import mlp, ranks_hold_same_params, rel_err
from zerocore.zero import ZeroOptimizer

GLOBAL_BATCH = 12          # divisible by 1, 2, 3 and 4 ranks
SAVED_AT, STEPS = 3, 6
RESUME_TOL = 1e-6


def _dir() -> Path:
    return Path(os.environ["ZEROCORE_CKPT_TEST_DIR"])


def _data():
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(GLOBAL_BATCH, 16, generator=g), torch.randn(GLOBAL_BATCH, 5, generator=g))
            for _ in range(STEPS)]


def _local(t, rank, world):
    n = GLOBAL_BATCH // world
    return t[rank * n:(rank + 1) * n]


def _opt(model, stage):
    small = {"param_persistence_threshold": 16} if stage == 3 else {}      # partition the tiny model's weights
    return ZeroOptimizer(model, stage=stage, lr=1e-2, weight_decay=0.01, bucket_size=200, comm_timeout_s=60,
                         **small)


def _train(model, opt, rank, world, start, stop, sched=None):
    for x, y in _data()[start:stop]:
        opt.backward(F.mse_loss(model(_local(x, rank, world)), _local(y, rank, world)))
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
    opt.wait_for_params()


def _sched(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def save_at_2_and_resume_at_2(rank, world):
    """Save after SAVED_AT steps, keep training; a fresh model resumed from the checkpoint continues
    bit-identical to the uninterrupted run. Rank 0 also stores the uninterrupted result for the other sizes."""
    model = mlp()
    opt = _opt(model, 2)
    sched = _sched(opt)
    _train(model, opt, rank, world, 0, SAVED_AT, sched)
    folder = opt.save_checkpoint(_dir(), client_state={"epoch": 7, "note": "hello"}, lr_scheduler=sched)
    if rank == 0:                          # what consolidation must give back
        torch.save({n: p.detach().clone() for n, p in model.state_dict().items()}, _dir() / "at_save.pt")
    if folder.name != f"global_step{SAVED_AT}" or (_dir() / "latest").read_text() != folder.name:
        raise AssertionError(f"unexpected checkpoint folder {folder} or latest")
    _train(model, opt, rank, world, SAVED_AT, STEPS, sched)
    if rank == 0:
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, _dir() / "expected.pt")
    fresh = mlp(seed=9)
    opt2 = _opt(fresh, 2)
    sched2 = _sched(opt2)
    client = opt2.load_checkpoint(_dir(), lr_scheduler=sched2)
    if client != {"epoch": 7, "note": "hello"} or sched2.last_epoch != SAVED_AT:
        raise AssertionError(f"client_state {client!r} / scheduler epoch {sched2.last_epoch} not restored")
    _train(fresh, opt2, rank, world, SAVED_AT, STEPS, sched2)
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        if not torch.equal(a, b):
            raise AssertionError(f"resumed run differs at {n} by {(a - b).abs().max():.3g}")
    opt.close(), opt2.close()
    return {"bit_identical": True}


def save_stage3_at_2(rank, world):
    """The same run as save_at_2_and_resume_at_2's first half, under stage 3, saved under s3/."""
    model = mlp()
    opt = _opt(model, 3)
    sched = _sched(opt)
    _train(model, opt, rank, world, 0, SAVED_AT, sched)
    opt.save_checkpoint(_dir() / "s3", lr_scheduler=sched)
    opt.close()
    return {"saved": True}


def async_save_commits_at_next_call(rank, world):
    """async_save returns before the checkpoint is committed; wait_for_checkpoint() commits it, and it holds
    the state of the save even though training changed it meanwhile. A write that fails in the background
    raises at the next call on every rank, naming the checkpoint, and leaves 'latest' alone."""
    import zerocore.zero.checkpoint as ck
    model = mlp()
    opt = _opt(model, 2)
    _train(model, opt, rank, world, 0, 2)
    before = opt.state_dict()
    where = _dir() / "async"
    sync_folder = opt.save_checkpoint(where, tag="t2sync")            # the same state, written synchronously
    folder = opt.save_checkpoint(where, tag="t2", async_save=True)
    if (where / "latest").read_text() != "t2sync":
        raise AssertionError("an async save was committed before the next call")
    _train(model, opt, rank, world, 2, 3)                 # training goes on while the files are written
    opt.wait_for_checkpoint()
    if (where / "latest").read_text() != "t2" or not (folder / "manifest.json").exists():
        raise AssertionError("wait_for_checkpoint() did not commit the async save")
    mine = ck.rank_file(rank, world)
    if (folder / mine).read_bytes() != (sync_folder / mine).read_bytes():
        raise AssertionError(f"the async save's {mine} differs from the synchronous save's of the same state")
    if rank == 0:
        import json
        a_, s_ = (json.loads((f / "manifest.json").read_text()) for f in (folder, sync_folder))
        if {k: v for k, v in a_.items() if k != "tag"} != {k: v for k, v in s_.items() if k != "tag"}:
            raise AssertionError("the async save's manifest differs from the synchronous save's (beyond the tag)")
    fresh = mlp(seed=9)
    opt2 = _opt(fresh, 2)
    opt2.load_checkpoint(where)
    after = opt2.state_dict()
    for name, e in before["params"].items():
        for k in ("master", "exp_avg", "exp_avg_sq"):
            if not torch.equal(e[k], after["params"][name][k]):
                raise AssertionError(f"{name}/{k} in the async checkpoint is not the state at the save")
    original = ck._write_safetensors
    if rank == 1:
        def failing(path, tensors):
            raise OSError(28, "No space left on device (simulated)")
        ck._write_safetensors = failing
    try:
        opt.save_checkpoint(where, tag="t3", async_save=True)
        try:
            opt.wait_for_checkpoint()
        except ck.CheckpointError as e:
            msg = str(e)
        else:
            raise AssertionError("a failed background write raised nothing")
    finally:
        ck._write_safetensors = original
    if "'t3'" not in msg or "background" not in msg or "rank 1" not in msg:
        raise AssertionError(f"the error does not name the checkpoint, the background write and the rank: {msg}")
    if (where / "latest").read_text() != "t2" or any(p.name.startswith(".t3") for p in where.iterdir()):
        raise AssertionError("the failed async save changed 'latest' or left its staging folder")
    opt.close(), opt2.close()
    return {"committed": True, "message": msg}


def _resume(stage, saved_by=2):
    def scenario(rank, world):
        """Resume the 2-rank checkpoint (saved under stage 2, or 3) at this world size and stage; compare with
        the uninterrupted 2-rank stage-2 run (same global batches)."""
        model = mlp(seed=9)
        opt = _opt(model, stage)
        sched = _sched(opt)
        opt.load_checkpoint(_dir() / "s3" if saved_by == 3 else _dir(), lr_scheduler=sched)
        _train(model, opt, rank, world, SAVED_AT, STEPS, sched)
        expected = torch.load(_dir() / "expected.pt")
        ref = mlp()
        ref.load_state_dict(expected)
        with opt.gathered():              # stage 3: the full parameters, to compare
            err = rel_err(model, ref)
            same = ranks_hold_same_params(model, world)
        if err > RESUME_TOL:
            raise AssertionError(f"resumed at {world} ranks, stage {stage} (saved by stage {saved_by}): rel err "
                                 f"{err:.3g} > {RESUME_TOL}")
        if not same:
            raise AssertionError("ranks hold different parameters after resuming")
        opt.close()
        return {"rel_err": err}
    return scenario


resume_stage2 = _resume(2)
resume_stage1 = _resume(1)
resume_stage3 = _resume(3)
resume_stage1_from_stage3 = _resume(1, saved_by=3)
resume_stage3_from_stage3 = _resume(3, saved_by=3)

SAVE = ["save_at_2_and_resume_at_2", "save_stage3_at_2", "async_save_commits_at_next_call"]
RESUME = ["resume_stage2", "resume_stage1", "resume_stage3", "resume_stage1_from_stage3",
          "resume_stage3_from_stage3"]
