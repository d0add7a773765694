"""Hierarchical sharding (shard_group_size, [Note: shard groups] in collectives.py) on 4 gloo ranks in 2 shard
groups of 2: training equals single-process AdamW at every stage, replicas hold identical shards, memory
follows the ZeRO formula with k=2 in place of N (exact accounting), checkpoints are written once per shard
and load without shard groups. Run by tests/test_zero_hierarchy.py."""
from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.nn as nn

import zero_scenarios as Z
import zero_stage3_scenarios as S
from zerocore.zero import ZeroOptimizer
from zerocore.zero.memory import formula_bytes

K = 2


def _replicas_agree(opt) -> bool:
    """Every replica of this rank's shards holds the same fp32 values (the update ran on identical inputs)."""
    sd = opt.state_dict()["params"]
    mine = torch.cat([e[k].reshape(-1) for n in sorted(sd) for e in [sd[n]] for k in ("master", "exp_avg")])
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)           # (shards of different shard ranks differ in length)
    rank = dist.get_rank()
    return all(torch.equal(everyone[r], mine) for r in range(rank % K, len(everyone), K))


def _parity(kind, stage, **kw):
    def scenario(rank, world):
        captured = {}
        real = ZeroOptimizer.__init__

        def keep(self, *a, **k):          # the parity helpers build the optimizer: keep it to inspect
            real(self, *a, **k)
            captured["opt"] = self
        ZeroOptimizer.__init__ = keep
        try:
            if stage == 3:
                result = S.assert_parity3(kind, rank, world, shard_group_size=K, **kw)
            else:
                result = Z.assert_parity(kind, rank, world, stage=stage, shard_group_size=K, **kw)
        finally:
            ZeroOptimizer.__init__ = real
        opt = captured["opt"]
        result.update(shard_size=opt.comm.shard_size, replicas=opt.comm.replicas,
                      unit_shard=opt.units[0].shard_numel, unit_padded=opt.units[0].padded_numel)
        if stage != 3:                     # (stage 3's helper closed its optimizer to check placeholders)
            result["replicas_agree"] = _replicas_agree(opt)
            opt.close()
        return result
    return scenario


mlp_k2_s1 = _parity("mlp", 1, bucket_size=200)
mlp_k2_s2 = _parity("mlp", 2, bucket_size=200)
gpt_ga_clip_k2_s2 = _parity("gpt", 2, micro=2, clip=0.5, bucket_size=3000)
mlp_scatter_gather_k2_s2 = _parity("mlp", 2, bucket_size=200, collective_strategy="scatter_gather")
mlp_k2_s3 = _parity("mlp", 3, bucket_size=200, param_persistence_threshold=16)
gpt_k2_s3 = _parity("gpt", 3, unit_modules={"Block"})


def _accounting(stage):
    def scenario(rank, world):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 61), nn.GELU(), nn.Linear(61, 64))
        opt = ZeroOptimizer(model, stage=stage, bucket_size=1000, shard_group_size=K, comm_timeout_s=60,
                            param_persistence_threshold=40)
        opt.backward(model(torch.randn(Z.LOCAL_BATCH, 64)).square().mean())
        opt.step()
        rep = opt.memory_report()
        psi = sum(p.numel() for p in model.parameters())
        shards = sum(u.shard_numel for u in opt.units)
        persistent = sum(u.padded_numel for u in opt.units if u.persistent) if stage == 3 else 0
        gathered = rep["gathered_params"]                   # stage 3: the next forward's prefetched units
        expect = {"optimizer_state": 8 * shards, "master": 0, "shard_group_size": K, "world_size": world}
        for k, v in expect.items():
            if rep[k] != v:
                raise AssertionError(f"{k}: {rep[k]}, expected {v} ({rep})")
        formula = formula_bytes(stage, False, psi, K)
        if stage == 3:
            formula += 4 * sum(u.numel for u in opt.units if u.persistent) * (K - 1) / K
        held = rep["model_states"] - gathered
        slack = rep["padding_elements"] * 20 + 64
        opt.close()
        return {"held": held, "formula": formula, "slack": slack, "rep_formula": rep["formula"],
                "k_formula": formula_bytes(stage, False, psi, K), "n_formula": formula_bytes(stage, False, psi, world),
                "persistent": persistent}
    return scenario


accounting_k2_s2 = _accounting(2)
accounting_k2_s3 = _accounting(3)


def checkpoint_k2_loads_without_shard_groups(rank, world):
    """Save under shard groups (one file per shard: 2, not 4), load into an engine sharded over all 4 ranks,
    continue: equal to the uninterrupted run on the same data."""
    data = Z.batches("mlp", world, 8)
    root = os.path.join(tempfile.gettempdir(), f"zc-k2-ckpt-{os.environ.get('MASTER_PORT', 'x')}")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
    dist.barrier()
    folder = tempfile.mkdtemp(dir=root) if rank == 0 else None
    holder = [folder]
    dist.broadcast_object_list(holder, 0)
    folder = holder[0]
    model, opt = Z.train_zero("mlp", data[:4], rank, stage=2, bucket_size=200, shard_group_size=K)
    path = opt.save_checkpoint(folder)
    files = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))
    opt.close()
    model2 = Z.mlp()
    opt2 = ZeroOptimizer(model2, stage=2, bucket_size=200, lr=1e-3, weight_decay=0.01, comm_timeout_s=60)
    opt2.load_checkpoint(folder)
    Z.train_zero("mlp", data, rank, model=model2, opt=opt2, start=4)
    whole, _ = Z.train_zero("mlp", data, rank, stage=2, bucket_size=200, shard_group_size=K)
    ref = Z.train_reference("mlp", data)
    result = {"files": files, "rel_err_vs_uninterrupted": Z.rel_err(model2, whole), "rel_err_vs_ref":
              Z.rel_err(model2, ref), "steps": opt2.global_steps}
    opt2.close()
    return result


def bad_group_size_is_named(rank, world):
    model = Z.mlp()
    try:
        ZeroOptimizer(model, stage=2, shard_group_size=3, comm_timeout_s=60)
    except ValueError as e:
        return {"message": str(e)}
    raise AssertionError("shard_group_size=3 on 4 ranks was accepted")


def mismatched_group_size_is_named(rank, world):
    """Ranks asking for different shard_group_size values are refused on every rank (not a hang in new_group)."""
    try:
        ZeroOptimizer(Z.mlp(), stage=2, shard_group_size=K if rank < 2 else None, comm_timeout_s=60)
    except ValueError as e:
        return {"message": str(e)}
    raise AssertionError("different shard_group_size values were accepted")


def failed_construction_leaves_no_group(rank, world):
    """A construction that fails after the shard groups were made destroys them again."""
    from torch.distributed.distributed_c10d import _world
    before = len(_world.pg_map)
    model = Z.mlp()
    try:
        ZeroOptimizer(model, stage=2, shard_group_size=K, param_groups=[{"params": [], "momentum": 0.9}])
    except ValueError:
        pass
    else:
        raise AssertionError("a bad param group was accepted")
    return {"before": before, "after": len(_world.pg_map)}


SCENARIOS = ["mlp_k2_s1", "mlp_k2_s2", "gpt_ga_clip_k2_s2", "mlp_scatter_gather_k2_s2", "mlp_k2_s3", "gpt_k2_s3",
             "accounting_k2_s2", "accounting_k2_s3", "checkpoint_k2_loads_without_shard_groups",
             "bad_group_size_is_named", "mismatched_group_size_is_named", "failed_construction_leaves_no_group"]
