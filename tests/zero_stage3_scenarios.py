"""Multi-rank scenarios for ZeRO stage 3 (tests/test_zero_stage3.py runs them in one gloo group per world size).

Parity as in zero_scenarios.py: ZeroOptimizer(stage=3) on this rank's slice of each global batch against
single-process torch.optim.AdamW on the whole batch, per-tensor relative error <= 1e-5 (fp32) or no worse than
DDP's in the same run; gradient norms are compared too (Adam hides a wrong gradient scale). The tiny models'
parameters are below DeepSpeed's persistence threshold (1e5), so scenarios set a small one to partition them.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import zero_scenarios as Z
from zerocore.zero import RankMismatchError, ZeroOptimizer, gathered_parameters
from zerocore.zero.residency import ParamState

S3 = dict(stage=3, param_persistence_threshold=40)


# ----------------------------------------------------------------------------------------------------- models
class CheckpointedGPT(Z.TinyGPT):
    """TinyGPT whose blocks run under activation checkpointing (recomputed in backward)."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant

    def forward(self, idx):
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        for b in self.blocks:
            x = checkpoint(b, x, use_reentrant=self.reentrant)
        return self.head(self.norm(x))


class Twice(nn.Module):
    """One Linear applied twice per forward (a module called several times per step)."""

    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(8, 24), nn.Linear(24, 24), nn.Linear(24, 4)

    def forward(self, x):
        h = F.gelu(self.inp(x))
        h = F.gelu(self.shared(h))
        return self.out(F.gelu(self.shared(h)) + h)


def _seeded(build):
    def make(seed=1):
        torch.manual_seed(seed)
        return build()
    return make


Z.MODELS.update({"gpt_ckpt": _seeded(lambda: CheckpointedGPT(False)),
                 "gpt_ckpt_reentrant": _seeded(lambda: CheckpointedGPT(True)),
                 "twice": _seeded(Twice)})


def _with_gathered(opt, fn):
    with opt.gathered():
        return fn()


def assert_parity3(kind, rank, world, steps=6, micro=1, clip=0.0, groups=False, sched=False, **options):
    data = Z.batches(kind, world, steps, micro)
    model, opt = Z.train_zero(kind, data, rank, groups=groups, sched=sched, gradient_clipping=clip,
                              **dict(S3, **options))
    norms = []
    ref = Z.train_reference(kind, data, clip=clip, groups=groups, sched=sched, norms=norms)
    skip = Z.NOISE_ONLY.get(kind.split("_")[0], ())
    err = _with_gathered(opt, lambda: Z.rel_err(model, ref, skip))
    partitioned = [u for u in opt.units if not u.persistent]
    result = {"rel_err": err, "units": len(opt.units), "partitioned_units": len(partitioned),
              "steps": opt.global_steps, "grad_norm": opt.global_grad_norm,
              "ref_grad_norm": norms[-1]}
    if opt.global_steps != steps:
        raise AssertionError(f"{opt.global_steps} optimizer steps taken, expected {steps}")
    if len(partitioned) < 2:
        raise AssertionError(f"only {len(partitioned)} partitioned units: the scenario tests nothing of stage 3")
    if not math.isclose(result["grad_norm"], result["ref_grad_norm"], rel_tol=1e-4):
        raise AssertionError(f"gradient norm {result['grad_norm']} != reference {result['ref_grad_norm']}")
    left = {u.index for u in partitioned if opt.residency.state[u.index] is not ParamState.SHARDED}
    if not left <= set(opt.schedule.prefetched):
        raise AssertionError(f"units {left - set(opt.schedule.prefetched)} are still gathered after the step "
                             "(only the next forward's prefetched units may be)")
    if err > Z.FP32_TOL:
        ddp_err = Z.rel_err(Z.train_ddp(kind, data, rank, clip=clip, groups=groups, sched=sched), ref, skip)
        result["ddp_rel_err"] = ddp_err
        if err > ddp_err:
            raise AssertionError(f"stage 3 rel err {err:.3g} > {Z.FP32_TOL} and > DDP's {ddp_err:.3g} ({result})")
    opt.close()
    return result


def _parity(kind, **kw):
    def scenario(rank, world):
        return assert_parity3(kind, rank, world, **kw)
    return scenario


mlp_s3 = _parity("mlp", bucket_size=200, param_persistence_threshold=16)
mlp_user_backward_s3 = _parity("mlp", bucket_size=200, param_persistence_threshold=16, user_backward=True)
mlp_ga_s3 = _parity("mlp", micro=3, bucket_size=200, param_persistence_threshold=16, ds_style=True)
mlp_groups_sched_s3 = _parity("mlp", groups=True, sched=True, bucket_size=200, param_persistence_threshold=16)
mlp_offload_s3 = _parity("mlp", bucket_size=200, param_persistence_threshold=16, offload_optimizer="cpu",
                         offload_param="cpu")
mlp_scatter_gather_s3 = _parity("mlp", bucket_size=200, param_persistence_threshold=16,
                                collective_strategy="scatter_gather")
mlp_no_overlap_s3 = _parity("mlp", bucket_size=200, param_persistence_threshold=16, overlap_comm=False)
gpt_s3 = _parity("gpt", bucket_size=3000)
gpt_units_s3 = _parity("gpt", unit_modules={"Block"})
gpt_ga_clip_s3 = _parity("gpt", micro=2, clip=0.5, unit_modules={"Block"})
gpt_no_reshard_s3 = _parity("gpt", unit_modules={"Block"}, reshard_after_forward=False)
gpt_small_prefetch_s3 = _parity("gpt", unit_modules={"Block", "Linear"}, prefetch_bucket_size=1,
                                max_live_parameters=5000)
gpt_ckpt_s3 = _parity("gpt_ckpt", unit_modules={"Block"})
gpt_ckpt_reentrant_s3 = _parity("gpt_ckpt_reentrant", unit_modules={"Block"})
encoder_s3 = _parity("encoder", bucket_size=3000)
twice_s3 = _parity("twice", unit_modules={"Linear"}, param_persistence_threshold=24)
special_s3 = _parity("special", bucket_size=40, param_persistence_threshold=4)


def bf16_s3(rank, world):
    return Z._low_precision(3, torch.bfloat16, param_persistence_threshold=16)(rank, world)


# ------------------------------------------------------------------------------------- evaluation, gathered
def eval_and_gathered_s3(rank, world):
    """no_grad evaluation equals the unpartitioned model and frees every unit; gathered() gathers once for many
    forward calls; modifier_rank re-partitions rank 0's change; full_state_dict equals the reference."""
    data = Z.batches("gpt", world, 4)
    model, opt = Z.train_zero("gpt", data, rank, unit_modules={"Block"}, **S3)
    ref = Z.train_reference("gpt", data)
    x = torch.randint(0, 40, (3, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = model(x), ref(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    held = [opt.residency.state[u.index] for u in opt.units if not u.persistent]
    if any(s is not ParamState.SHARDED for s in held):
        raise AssertionError(f"units left gathered after a no_grad forward: {held}")
    before = len(opt.residency.log)
    with opt.gathered(), torch.no_grad():
        outs = [model(x) for _ in range(5)]
        during = len(opt.residency.log) - before
    if during != sum(not u.persistent for u in opt.units):
        raise AssertionError(f"gathered(): {during} gathers for 5 forward calls, expected one per unit")
    for o in outs:
        torch.testing.assert_close(o, want, rtol=1e-4, atol=1e-5)
    full = opt.full_state_dict()
    if rank == 0:
        if list(full) != list(ref.state_dict()):
            raise AssertionError(f"full_state_dict keys {list(full)[:4]}... differ from model.state_dict()'s")
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(full[k], v, rtol=1e-4, atol=1e-6)
    elif full:
        raise AssertionError("full_state_dict(rank0_only=True) returned values on another rank")
    head = model.blocks[1].fc2.weight
    with gathered_parameters([head], modifier_rank=0), torch.no_grad():
        if rank == 0:
            head.fill_(0.25)
    with opt.gathered([head]):
        if not bool((head == 0.25).all()):
            raise AssertionError("modifier_rank=0's change did not reach every rank")
    opt.close()
    return {"gathers_in_context": during}


# ------------------------------------------------------------------------------------------------ accounting
def _accounting3(dtype=None):
    def scenario(rank, world):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 61), nn.GELU(), nn.Linear(61, 64))
        opt = ZeroOptimizer(model, dtype=dtype, bucket_size=1000, comm_timeout_s=60, **S3)
        x = torch.randn(Z.LOCAL_BATCH, 64, dtype=dtype or torch.float32)
        opt.backward(model(x).float().square().mean())
        rep = opt.memory_report()
        opt.step()
        psi = sum(p.numel() for p in model.parameters())
        mixed = dtype is not None
        psz = 2 if mixed else 4
        persistent = [u for u in opt.units if u.persistent]
        partitioned = [u for u in opt.units if not u.persistent]
        if rep["gathered_params"] != 0:
            raise AssertionError(f"units still gathered after backward: {rep['gathered_params']} B")
        expect = {"params": psz * (sum(u.shard_numel for u in partitioned) + sum(u.padded_numel for u in persistent)),
                  "persistent_params": psz * sum(u.padded_numel for u in persistent),
                  "optimizer_state": 8 * sum(u.shard_numel for u in opt.units),
                  "master": 4 * sum(u.shard_numel for u in opt.units) if mixed else 0}
        for k, v in expect.items():
            if rep[k] != v:
                raise AssertionError(f"{k}: {rep[k]} B held, expected {v} B ({rep})")
        # The formula 16Ψ/N, plus the persistent parameters' other (N-1)/N, within padding.
        persistent_numel = sum(u.numel for u in persistent)
        formula = 16 * psi / world + psz * persistent_numel * (world - 1) / world
        slack = rep["padding_elements"] * 20 + 64
        if abs(rep["model_states"] - formula) > slack:
            raise AssertionError(f"holds {rep['model_states']} B, formula {formula:.0f} B (slack {slack}): {rep}")
        if rep["formula"] != 16 * psi / world:
            raise AssertionError(f"memory_report formula {rep['formula']} != 16 psi / N")
        opt.close()
        return {"held": rep["model_states"], "formula": formula}
    return scenario


accounting_fp32_s3 = _accounting3()
accounting_bf16_s3 = _accounting3(torch.bfloat16)


def autograd_grad_is_not_a_micro_step_s3(rank, world):
    """torch.autograd.grad(out, x) (a gradient penalty) gathers what it needs but is not a backward pass of
    the accumulation window: the loss's backward after it still steps, and equals the reference."""
    data = Z.batches("mlp", world, 3)
    model = Z.mlp()
    opt = ZeroOptimizer(model, lr=1e-3, weight_decay=0.01, bucket_size=200, comm_timeout_s=60,
                        **dict(S3, param_persistence_threshold=16))
    for row in data:
        x, y = Z.local(row[0][0], rank).requires_grad_(), Z.local(row[0][1], rank)
        (gx,) = torch.autograd.grad(model(x).sum(), x)
        if not torch.isfinite(gx).all() or gx.abs().sum() == 0:
            raise AssertionError("autograd.grad through stage-3 units gave no input gradient")
        opt.backward(Z.loss_of("mlp", model(x), y))
        opt.step()
        opt.zero_grad()
    ref = Z.train_reference("mlp", data)
    err = _with_gathered(opt, lambda: Z.rel_err(model, ref))
    if opt.global_steps != 3 or err > Z.FP32_TOL:
        raise AssertionError(f"{opt.global_steps} steps, rel err {err:.3g}")
    opt.close()
    return {"rel_err": err}


# ------------------------------------------------------------------------------------------ ranks that differ
def mismatched_forward_calls_s3(rank, world):
    """Rank 0 runs one forward more than the others: every rank raises naming the phases, nothing hangs."""
    model = Z.gpt()
    opt = ZeroOptimizer(model, unit_modules={"Block"}, comm_timeout_s=30, **S3)
    x = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(rank))
    try:
        if rank == 0:
            model(x)
        opt.backward(model(x).float().mean())
        opt.step()
    except RankMismatchError as e:
        msg = str(e)
        if "forward pass" not in msg or "rank 0" not in msg:
            raise AssertionError(f"the error does not say which rank ran which phase: {msg}")
        opt.zero_grad()
        opt.close()
        return {"message": msg}
    raise AssertionError("no error for ranks that ran different numbers of forward calls")


class Shuffled(Z.TinyGPT):
    """Rank 1 runs the (same-sized) blocks in the other order: every gather pairs with one of equal size."""

    def forward(self, idx):
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        blocks = list(self.blocks)
        for b in (blocks[::-1] if torch.distributed.get_rank() == 1 else blocks):
            x = b(x)
        return self.head(self.norm(x))


def divergent_units_s3(rank, world):
    """Ranks that run different modules: the step raises on every rank naming the first differing unit, and
    updates nothing. (overlap_comm=False keeps backward's reductions after its gathers, so every collective
    pairs with one of its size; with overlap a reduction can meet a gather and the collective times out,
    naming its unit.)"""
    torch.manual_seed(1)
    model = Shuffled()
    opt = ZeroOptimizer(model, unit_modules={"Block"}, comm_timeout_s=30, overlap_comm=False, **S3)
    before = opt.full_state_dict(rank0_only=False)
    x = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(rank))
    opt.backward(F.cross_entropy(model(x).reshape(-1, 40), x.reshape(-1)))
    try:
        opt.step()
    except RankMismatchError as e:
        msg = str(e)
        if "unit" not in msg or "blocks." not in msg or "nothing was updated" not in msg:
            raise AssertionError(f"the error does not name the unit: {msg}")
        after = opt.full_state_dict(rank0_only=False)
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        if changed:
            raise AssertionError(f"parameters changed although the step raised: {changed[:3]}")
        opt.zero_grad()
        opt.close()
        return {"message": msg}
    raise AssertionError("no error for ranks that gathered different units")


def _master_weights(stage):
    def scenario(rank, world):
        """full_state_dict(master_weights=True) of bf16 training is the fp32 masters, exactly what a consolidated
        checkpoint holds; without it, the bf16 parameters (the masters rounded), on rank 0 only."""
        import os
        import tempfile
        from zerocore import consolidate
        data = Z.batches("mlp", world, 4)
        options = dict(S3, bucket_size=200, param_persistence_threshold=16) if stage == 3 else \
            dict(stage=stage, bucket_size=200)
        model, opt = Z.train_zero("mlp", data, rank, dtype=torch.bfloat16, **options)
        masters = opt.full_state_dict(master_weights=True)
        low = opt.full_state_dict()
        holder = [tempfile.mkdtemp(prefix="zc-masters-") if rank == 0 else None]
        torch.distributed.broadcast_object_list(holder, 0)
        opt.save_checkpoint(holder[0], tag="t")
        opt.close()
        if rank != 0:
            return {"empty": masters == {} and low == {}}
        ref = consolidate(os.path.join(holder[0]))
        return {"keys_equal": list(masters) == list(ref) == list(low),
                "masters_exact": all(torch.equal(masters[k], ref[k]) for k in ref),
                "fp32": all(v.dtype == torch.float32 for v in masters.values()),
                "low_is_rounded": all(torch.equal(low[k], ref[k].to(torch.bfloat16)) for k in ref),
                "moved": max((ref[k] - Z.mlp().state_dict()[k]).abs().max().item() for k in ref)}
    return scenario


master_weights_s2 = _master_weights(2)
master_weights_s3 = _master_weights(3)


PARITY = ["mlp_s3", "mlp_user_backward_s3", "mlp_ga_s3", "mlp_groups_sched_s3", "mlp_offload_s3",
          "mlp_scatter_gather_s3", "mlp_no_overlap_s3", "gpt_s3", "gpt_units_s3", "gpt_ga_clip_s3",
          "gpt_no_reshard_s3", "gpt_small_prefetch_s3", "gpt_ckpt_s3", "gpt_ckpt_reentrant_s3", "encoder_s3",
          "twice_s3", "special_s3"]
LOW_PRECISION = ["bf16_s3"]
OTHER = ["eval_and_gathered_s3", "accounting_fp32_s3", "accounting_bf16_s3", "autograd_grad_is_not_a_micro_step_s3",
         "master_weights_s2", "master_weights_s3"]
MISMATCH = ["mismatched_forward_calls_s3", "divergent_units_s3"]

SCENARIOS_BY_WORLD = {
    2: PARITY + LOW_PRECISION + OTHER + MISMATCH,
    4: ["mlp_s3", "gpt_units_s3", "gpt_ga_clip_s3", "gpt_ckpt_reentrant_s3", "special_s3", "bf16_s3",
        "accounting_bf16_s3", "eval_and_gathered_s3", "mismatched_forward_calls_s3"],
}
