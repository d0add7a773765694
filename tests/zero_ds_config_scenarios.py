"""Multi-rank scenarios for DeepSpeed configs driving ZeroOptimizer (tests/test_zero_ds_config.py).

A config and the keyword options it stands for must train identically (bit for bit: the same engine options),
and against torch.optim.AdamW on the whole batch as the stage's own parity tests require."""
from __future__ import annotations

import warnings

import torch

import zero_scenarios as Z
from zerocore.zero import ZeroOptimizer
from zerocore.zero.lr_schedules import build_lr_scheduler

# The config people use to fine-tune large models with DeepSpeed (issue #14), unchanged.
REFERENCE_CONFIG = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}},
                    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                          "overlap_comm": True, "contiguous_gradients": True},
                    "gradient_clipping": 1.0, "bf16": {"enabled": True}}


def _train(kind, data, rank, opt_factory):
    model = Z.MODELS[kind]()
    opt = opt_factory(model)
    for row in data:
        for x, y in row:
            opt.backward(Z.loss_of(kind, model(Z.local(x, rank)), Z.local(y, rank)))
        opt.step()
        opt.zero_grad()
    return model, opt, opt.state_dict()


def reference_config_trains(rank, world):
    """The issue's config, unchanged, on the tied-embedding GPT: equal to the same options given as keywords,
    and its fp32 masters' update close to fp32 AdamW's (lr 1e-5, clipping at 1.0; bf16 compute)."""
    data = Z.batches("gpt", world, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # nothing in it is unknown or unimplemented
        _, opt, by_config = _train("gpt", data, rank, lambda m: ZeroOptimizer(m, config=REFERENCE_CONFIG,
                                                                                 unit_modules={"Block"}))
    c = opt.config
    facts = {"stage": c.stage, "offload": c.offload_optimizer, "dtype": str(c.dtype), "clip": c.gradient_clipping,
             "lr": c.lr, "adamw": c.adamw, "micro": opt.train_micro_batch_size_per_gpu,
             "global_batch": opt.train_batch_size, "steps": opt.global_steps}
    opt.close()
    _, opt2, by_kwargs = _train("gpt", data, rank, lambda m: ZeroOptimizer(
        m, stage=3, offload_optimizer="cpu", dtype=torch.bfloat16, gradient_clipping=1.0, lr=1e-5,
        weight_decay=0.0, unit_modules={"Block"}))
    opt2.close()
    mine, theirs = by_config["params"], by_kwargs["params"]
    same = all(torch.equal(mine[n][k], theirs[n][k]) for n in mine for k in ("master", "exp_avg", "exp_avg_sq"))
    # lr 1e-5 moves a bf16 parameter by less than its rounding, so compare the fp32 masters' update (the ranges
    # this rank owns) with fp32 AdamW's, over all of them at once.
    ref = dict(Z.train_reference("gpt", data, lr=1e-5, wd=0.0, clip=1.0).named_parameters())
    init = dict(Z.MODELS["gpt"]().named_parameters())
    ours, want = [], []
    for name, e in mine.items():
        lo, hi = e["start"], e["end"]
        start = init[name].detach().reshape(-1)[lo:hi]
        ours.append(e["master"] - start)
        want.append(ref[name].detach().reshape(-1)[lo:hi] - start)
    ours, want = torch.cat(ours), torch.cat(want)
    return dict(facts, same_as_kwargs=same, update_rel_err=((ours - want).norm() / want.norm()).item())


def scheduler_and_accumulation_from_config(rank, world):
    """WarmupDecayLR, gradient accumulation (batch sizes derived by DeepSpeed's rule) and clipping from a config,
    fp32 stage 2, against AdamW on the whole batch with the same schedule; the lr of every step is DeepSpeed's."""
    micro = 2
    config = {"train_batch_size": Z.LOCAL_BATCH * micro * world, "train_micro_batch_size_per_gpu": Z.LOCAL_BATCH,
              "gradient_clipping": 0.05, "zero_optimization": {"stage": 2, "reduce_bucket_size": 200},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
              "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2,
                                                                "warmup_num_steps": 3, "total_num_steps": 8,
                                                                "warmup_type": "linear"}}}
    data = Z.batches("mlp", world, 8, micro)
    model = Z.mlp()
    opt = ZeroOptimizer(model, config=config)
    lrs, norms = [], []
    for row in data:
        lrs.append(opt.param_groups[0]["lr"])
        for x, y in row:
            opt.backward(Z.loss_of("mlp", model(Z.local(x, rank)), Z.local(y, rank)))
            opt.step()                           # DeepSpeed style: every micro-step; it updates on the 2nd
        opt.zero_grad()
        norms.append(opt.global_grad_norm)
    ref = Z.mlp()
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.01, foreach=False)
    rsched = build_lr_scheduler(ropt, config["scheduler"])
    ref_lrs, ref_norms = [], []
    for row in data:
        ref_lrs.append(ropt.param_groups[0]["lr"])
        ropt.zero_grad()
        for x, y in row:
            (Z.loss_of("mlp", ref(x), y) / len(row)).backward()
        ref_norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05).item())
        ropt.step()
        rsched.step()
    result = {"rel_err": Z.rel_err(model, ref), "lrs": lrs, "ref_lrs": ref_lrs, "norms": norms,
              "ref_norms": ref_norms, "accum": opt.config.gradient_accumulation_steps,
              "sched_epoch": opt.lr_scheduler.last_epoch}
    opt.close()
    return result


SCENARIOS = ["reference_config_trains", "scheduler_and_accumulation_from_config"]
