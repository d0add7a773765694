"""Multi-rank scenarios for ZeroOptimizer, run by tests/test_zero_*.py through dist_helpers.run_scenarios.

Each scenario runs on every rank of one gloo group, trains with ZeroOptimizer on this rank's slice of a global
batch, trains the single-process reference (torch.optim.AdamW on the concatenated batch) locally, and raises
AssertionError on a mismatch. Parity metric: per parameter tensor ||p - p_ref||_2 / ||p_ref||_2, the max over
tensors ("rel err"). fp32 must reach <= 1e-5; where it does not, the same training under torch DDP is measured
in the same scenario and ZeRO may not deviate more than DDP does.
"""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from zerocore.zero import CollectiveTimeout, RankMismatchError, ZeroOptimizer
from zerocore.zero.memory import formula_bytes

FP32_TOL = 1e-5
LOW_PRECISION_TOL = 1e-2   # bf16 / fp16 compute against the fp32 reference (bf16 rounding alone is ~2e-3)
LOCAL_BATCH = 4


# ----------------------------------------------------------------------------------------------------- models
def mlp(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 33), nn.GELU(), nn.Linear(33, 7), nn.GELU(), nn.Linear(7, 5))


class Block(nn.Module):
    """Pre-norm causal self-attention + MLP. No key bias: its gradient is analytically zero (softmax is
    shift-invariant), so Adam would turn float noise into updates and no two summation orders would agree."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """Token + position embedding, 2 blocks, final LayerNorm, head tied to the token embedding."""

    def __init__(self, vocab=40, d=32, layers=2, seq=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.ModuleList([Block(d, 4) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


class Encoder(nn.Module):
    """nn.TransformerEncoderLayer stack: MultiheadAttention reads out_proj.weight without calling out_proj, so
    the engine must wait for that parameter's unit in an ancestor's forward pre-hook."""

    def __init__(self, vocab=40, d=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
                                     for _ in range(2)])
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def encoder(seed=1):
    torch.manual_seed(seed)
    return Encoder()


def gpt(seed=1):
    torch.manual_seed(seed)
    return TinyGPT()


class Special(nn.Module):
    """Frozen, sometimes-unused, never-used, tiny (1 element) and odd-sized (7) parameters."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.tiny = nn.Parameter(torch.randn(1))
        self.odd = nn.Parameter(torch.randn(7) * 0.1)
        self.sometimes = nn.Linear(16, 4)
        self.never = nn.Parameter(torch.randn(5))
        self.b = nn.Linear(16, 4)
        self.use_sometimes = True

    def hidden(self, x):
        h = F.gelu(self.a(x))
        return self.frozen(h) * self.tiny + F.pad(self.odd, (0, 9))

    def head(self, h):
        out = self.b(h)
        if self.use_sometimes:
            out = out + self.sometimes(h)
        return out

    def forward(self, x):
        return self.head(self.hidden(x))


def special(seed=1):
    torch.manual_seed(seed)
    return Special()


# ------------------------------------------------------------------------------------------------------- data
def batches(kind, world, steps, micro=1, seed=0):
    """Global batches [step][micro] = (x, y) with LOCAL_BATCH rows per rank."""
    g = torch.Generator().manual_seed(seed)
    n = LOCAL_BATCH * world
    out = []
    for _ in range(steps):
        row = []
        for _ in range(micro):
            if kind.startswith(("gpt", "encoder")):
                x = torch.randint(0, 40, (n, 8), generator=g)
                y = torch.randint(0, 40, (n, 8), generator=g)
            else:
                d_in, d_out = (16, 5) if kind == "mlp" else (8, 4)
                x, y = torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)
            row.append((x, y))
        out.append(row)
    return out


def loss_of(kind, out, y):
    if kind.startswith(("gpt", "encoder")):
        return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1))
    return F.mse_loss(out.float(), y)


MODELS = {"mlp": mlp, "gpt": gpt, "special": special, "encoder": encoder}
# The key third of MultiheadAttention's in_proj_bias has an analytically zero gradient (softmax is
# shift-invariant): Adam turns its float noise into full-size steps in any implementation, so it is excluded.
NOISE_ONLY = {"encoder": ("in_proj_bias",)}


def local(t, rank):
    return t[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]


def set_step_flags(model, t):
    if isinstance(model, Special):
        model.use_sometimes = t % 2 == 0


# -------------------------------------------------------------------------------------------------- training
def groups_for(model, lr):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("weight")]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0, "lr": lr * 2}]


def make_sched(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + 0.5 * t))


def _train_adamw(kind, model, forward, data, rank=None, *, lr, wd, clip, groups, sched, skip=(), norms=None):
    """torch.optim.AdamW over `data` with `forward` (the model, or DDP around it); rank=None: the whole batch.
    `norms`, if given, receives each step's global gradient norm (before clipping)."""
    pick = (lambda t: t) if rank is None else (lambda t: local(t, rank))
    params = groups_for(model, lr) if groups else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=False)
    sch = make_sched(opt) if sched else None
    for t, row in enumerate(data):
        if t in skip:
            continue
        set_step_flags(model, t)
        opt.zero_grad()
        for x, y in row:
            (loss_of(kind, forward(pick(x)), pick(y)) / len(row)).backward()
        if norms is not None:
            norms.append(torch.linalg.vector_norm(torch.stack(
                [p.grad.norm() for p in model.parameters() if p.grad is not None])).item())
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sch:
            sch.step()
    return model


def train_reference(kind, data, *, lr=1e-3, wd=0.01, clip=0.0, groups=False, sched=False, skip=(), norms=None):
    model = MODELS[kind]()
    return _train_adamw(kind, model, model, data, lr=lr, wd=wd, clip=clip, groups=groups, sched=sched, skip=skip,
                        norms=norms)


def train_ddp(kind, data, rank, *, lr=1e-3, wd=0.01, clip=0.0, groups=False, sched=False):
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = MODELS[kind]()
    ddp = DDP(model, find_unused_parameters=kind == "special")
    return _train_adamw(kind, model, ddp, data, rank, lr=lr, wd=wd, clip=clip, groups=groups, sched=sched)


def train_zero(kind, data, rank, *, lr=1e-3, wd=0.01, groups=False, sched=False, ds_style=False,
               user_backward=False, model=None, opt=None, start=0, on_step=None, **options):
    model = model if model is not None else MODELS[kind]()
    if opt is None:
        pg = groups_for(model, lr) if groups else None
        opt = ZeroOptimizer(model, lr=lr, weight_decay=wd, param_groups=pg,
                            gradient_accumulation_steps=len(data[0]), comm_timeout_s=60, **options)
    sch = make_sched(opt) if sched else None
    low = options.get("dtype")
    for t, row in enumerate(data[start:], start=start):
        set_step_flags(model, t)
        for x, y in row:
            x = local(x, rank)
            if low is not None and not kind.startswith(("gpt", "encoder")):
                x = x.to(low)
            loss = loss_of(kind, model(x), local(y, rank))
            if on_step is not None:
                loss = on_step(t, loss)
            if user_backward:
                loss.backward()
            else:
                opt.backward(loss)
            if ds_style:
                opt.step()
                opt.zero_grad()
        if not ds_style:
            opt.step()
            opt.zero_grad()
        if sch:
            sch.step()
    opt.wait_for_params()
    return model, opt


def ranks_hold_same_params(model, world) -> bool:
    """Whether every rank holds bit-identical parameters (one all_gather)."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    return all(torch.equal(e, flat) for e in everyone)


def rel_err(model, ref, skip=()) -> float:
    errs = []
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if any(n.endswith(s) for s in skip):
            continue
        errs.append(((p.detach().float() - q.detach()).norm() / q.detach().norm().clamp_min(1e-30)).item())
    return max(errs)


def assert_parity(kind, rank, world, steps=10, micro=1, clip=0.0, groups=False, sched=False, **zero_options):
    data = batches(kind, world, steps, micro)
    model, opt = train_zero(kind, data, rank, groups=groups, sched=sched, gradient_clipping=clip,
                            **zero_options)
    ref = train_reference(kind, data, clip=clip, groups=groups, sched=sched)
    skip = NOISE_ONLY.get(kind, ())
    err = rel_err(model, ref, skip)
    result = {"rel_err": err, "units": len(opt.units), "steps": opt.global_steps}
    if opt.global_steps != steps:
        raise AssertionError(f"{opt.global_steps} optimizer steps taken, expected {steps}")
    if err > FP32_TOL:
        ddp_err = rel_err(train_ddp(kind, data, rank, clip=clip, groups=groups, sched=sched), ref, skip) if world > 1 \
            else 0.0
        result["ddp_rel_err"] = ddp_err
        if err > ddp_err:
            raise AssertionError(f"ZeRO rel err {err:.3g} > {FP32_TOL} and > DDP's {ddp_err:.3g} ({result})")
    return result


# --------------------------------------------------------------------------------------------- fp32 parity
def _parity(kind, stage, **kw):
    def scenario(rank, world):
        return assert_parity(kind, rank, world, stage=stage, **kw)
    return scenario


mlp_s1 = _parity("mlp", 1, bucket_size=200, user_backward=True)
mlp_s2 = _parity("mlp", 2, bucket_size=200)
gpt_s1 = _parity("gpt", 1, bucket_size=3000)
gpt_s2 = _parity("gpt", 2, bucket_size=3000)
mlp_ga_s1 = _parity("mlp", 1, micro=3, bucket_size=200, ds_style=True)
mlp_ga_s2 = _parity("mlp", 2, micro=3, bucket_size=200)
mlp_clip_s1 = _parity("mlp", 1, clip=0.05, bucket_size=200)
mlp_clip_s2 = _parity("mlp", 2, clip=0.05, bucket_size=200)
mlp_groups_sched_s1 = _parity("mlp", 1, groups=True, sched=True, bucket_size=200)
mlp_groups_sched_s2 = _parity("mlp", 2, groups=True, sched=True, bucket_size=200)
gpt_ga_clip_s2 = _parity("gpt", 2, micro=2, clip=0.5, bucket_size=3000)
encoder_s1 = _parity("encoder", 1, bucket_size=3000)
encoder_s2 = _parity("encoder", 2, bucket_size=3000)
special_s1 = _parity("special", 1, bucket_size=40)
special_s2 = _parity("special", 2, bucket_size=40)
mlp_offload_s2 = _parity("mlp", 2, bucket_size=200, offload_optimizer="cpu")
mlp_offload_s1 = _parity("mlp", 1, bucket_size=200, offload_optimizer="cpu")
mlp_no_overlap_s2 = _parity("mlp", 2, bucket_size=200, overlap_comm=False)
mlp_scatter_gather_s2 = _parity("mlp", 2, bucket_size=200, collective_strategy="scatter_gather")
mlp_scatter_gather_s1 = _parity("mlp", 1, bucket_size=200, collective_strategy="scatter_gather")


def _direct(scenario):
    """The scenario with stage 2's direct reduction (reductions.py) for every parameter that is half of its
    unit: its 1 MiB floor would leave these small test models on the bucket path. Reports how many units used it."""
    def wrapped(rank, world):
        from zerocore.zero import reductions
        plans, saved = [], (reductions.DIRECT_MIN_BYTES, reductions.plan_direct)
        reductions.DIRECT_MIN_BYTES = 0
        reductions.plan_direct = lambda unit, itemsize: plans.append(saved[1](unit, itemsize)) or plans[-1]
        try:
            result = dict(scenario(rank, world) or {})
        finally:
            reductions.DIRECT_MIN_BYTES, reductions.plan_direct = saved
        result["direct_units"] = sum(p is not None for p in plans)
        return result
    return wrapped


mlp_direct_s2 = _direct(mlp_s2)
gpt_direct_s2 = _direct(gpt_s2)
encoder_direct_s2 = _direct(encoder_s2)
mlp_ga_direct_s2 = _direct(mlp_ga_s2)
gpt_ga_clip_direct_s2 = _direct(gpt_ga_clip_s2)
special_direct_s2 = _direct(special_s2)
mlp_no_overlap_direct_s2 = _direct(mlp_no_overlap_s2)


class ThroughAView(nn.Module):
    """`pos` reaches the loss through a view, so autograd gives it a gradient that shares memory with the
    gradient `proj` still has to read: a reduction that wrote into it in place would corrupt proj's."""
    def __init__(self, seed=3):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(16, 64, bias=False)
        self.pos = nn.Parameter(0.1 * torch.randn(LOCAL_BATCH * 64))

    def forward(self, x):
        return self.proj(x) + self.pos.view(LOCAL_BATCH, 64)


def _reduced_gradients(dtype):
    def scenario(rank, world):
        """One backward: this rank's reduced gradient shards equal the mean of every rank's gradient."""
        torch.manual_seed(7)
        xs = [torch.randn(LOCAL_BATCH, 16) for _ in range(world)]
        ref = ThroughAView()
        if dtype is not None:                 # the reference starts from the same (rounded) weights
            ref = ref.to(dtype).float()
        grads = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
        for x in xs:
            ref.zero_grad()
            ref(x).square().mean().backward()
            for n, p in ref.named_parameters():
                grads[n] += p.grad / world
        model = ThroughAView()
        opt = ZeroOptimizer(model, stage=2, bucket_size=100, dtype=dtype, comm_timeout_s=60,
                            loss_scale=None if dtype is None else 8.0)   # fp16: a static scale that cannot overflow
        x = xs[rank] if dtype is None else xs[rank].to(dtype)
        opt.backward(model(x).square().mean())
        worst = 0.0
        for unit, shard in zip(opt.units, opt.reducer.reduced_shards()):
            for s in unit.owned_slots():
                got = shard[s.shard_pos:s.shard_pos + s.owned_numel].float() / opt.loss_scale
                want = grads[s.name].reshape(-1)[s.own_start:s.own_end]
                err = ((got - want).norm() / want.norm()).item()
                worst = max(worst, err if math.isfinite(err) else math.inf)
        tol = FP32_TOL if dtype is None else LOW_PRECISION_TOL
        if worst > tol:
            raise AssertionError(f"reduced gradient rel err {worst:.3g} > {tol}")
        opt.close()
        return {"rel_err": worst}
    return scenario


reduced_gradients_through_a_view = _reduced_gradients(None)
reduced_gradients_through_a_view_fp16 = _reduced_gradients(torch.float16)
reduced_gradients_through_a_view_direct = _direct(reduced_gradients_through_a_view)
reduced_gradients_through_a_view_fp16_direct = _direct(reduced_gradients_through_a_view_fp16)


def special_untouched(rank, world):
    """Frozen and never-used parameters stay bit-identical; the odd/tiny ones are sharded and trained."""
    data = batches("special", world, 6)
    init = special()
    model, opt = train_zero("special", data, rank, stage=2, bucket_size=40)
    if not torch.equal(model.frozen.weight, init.frozen.weight) or not torch.equal(model.never, init.never):
        raise AssertionError("a frozen or never-used parameter changed")
    if torch.equal(model.odd, init.odd) or torch.equal(model.tiny, init.tiny):
        raise AssertionError("odd-sized / tiny parameters were not trained")
    owners = [s for u in opt.units for s in u.slots if s.name in ("tiny", "odd") and s.owned_numel]
    return {"owned_small_slots": len(owners)}


# ------------------------------------------------------------------------------------- low precision (bf16/fp16)
def _low_precision(stage, dtype, offload=None, **extra):
    def scenario(rank, world):
        data = batches("mlp", world, 10, micro=extra.get("micro", 1))
        model, opt = train_zero("mlp", data, rank, stage=stage, bucket_size=200, dtype=dtype,
                                offload_optimizer=offload, **{k: v for k, v in extra.items() if k != "micro"})
        ref = train_reference("mlp", data)
        init = mlp()
        err = rel_err(model, ref)
        moved = rel_err(init, ref)
        if any(p.dtype != (dtype or torch.float32) for p in model.parameters()):
            raise AssertionError("parameters were not cast to the compute dtype")
        if not (err <= LOW_PRECISION_TOL and err <= 0.25 * moved):
            raise AssertionError(f"{dtype} (reduce {extra.get('reduce_dtype')}) rel err {err:.3g} (tolerance {LOW_PRECISION_TOL}, training moved "
                                 f"params by {moved:.3g})")
        return {"rel_err": err, "moved": moved}
    return scenario


bf16_s1 = _low_precision(1, torch.bfloat16)
bf16_s2 = _low_precision(2, torch.bfloat16)
bf16_offload_s2 = _low_precision(2, torch.bfloat16, offload="cpu")
# fp32 reductions of bf16 gradients (stage 1 then packs its kept gradients into fp32 buckets), with accumulation
bf16_fp32_reduce_ga_s1 = _low_precision(1, torch.bfloat16, reduce_dtype=torch.float32, micro=2)
bf16_fp32_reduce_ga_s2 = _low_precision(2, torch.bfloat16, reduce_dtype=torch.float32, micro=2)
bf16_offload_ga_s1 = _low_precision(1, torch.bfloat16, offload="cpu", micro=2)
fp32_bf16_reduce_s2 = _low_precision(2, None, reduce_dtype=torch.bfloat16)


def _fp16_overflow(stage):
    def scenario(rank, world):
        data = batches("mlp", world, 8)
        seen = {}
        bad_step = 3

        def poison(t, loss):
            # Rank 0 alone overflows at step 3: every rank must skip that step.
            return loss * 1e8 if (t == bad_step and rank == 0) else loss

        model = mlp()
        opt = ZeroOptimizer(model, stage=stage, lr=1e-3, weight_decay=0.01, bucket_size=200, dtype=torch.float16,
                            hysteresis=1, comm_timeout_s=60)
        for t, row in enumerate(data):
            if t == bad_step:
                opt.wait_for_params()
                seen["before"] = [p.detach().clone() for p in model.parameters()]
                seen["scale_before"] = opt.loss_scale
            (x, y), = row
            loss = poison(t, loss_of("mlp", model(local(x, rank).half()), local(y, rank)))
            opt.backward(loss)
            opt.step()
            opt.zero_grad()
            if t == bad_step:
                opt.wait_for_params()
                after = [p.detach() for p in model.parameters()]
                if opt.skipped_steps != 1:
                    raise AssertionError(f"skipped_steps={opt.skipped_steps} after the overflow, expected 1")
                if opt.loss_scale != seen["scale_before"] / 2:
                    raise AssertionError(f"loss scale {opt.loss_scale} after overflow, expected "
                                         f"{seen['scale_before'] / 2}")
                if not all(torch.equal(a, b) for a, b in zip(after, seen["before"])):
                    raise AssertionError("weights changed on the skipped step")
        opt.wait_for_params()
        if any(not torch.isfinite(p).all() for p in model.parameters()):
            raise AssertionError("non-finite weights after training")
        ref = train_reference("mlp", data, skip=(bad_step,))
        err, moved = rel_err(model, ref), rel_err(mlp(), ref)
        if not (err <= LOW_PRECISION_TOL and err <= 0.25 * moved):
            raise AssertionError(f"fp16 rel err {err:.3g} vs reference that skips the same step (moved {moved:.3g})")
        return {"rel_err": err, "loss_scale": opt.loss_scale, "skipped": opt.skipped_steps}
    return scenario


fp16_overflow_s1 = _fp16_overflow(1)
fp16_overflow_s2 = _fp16_overflow(2)
fp16_overflow_direct_s2 = _direct(fp16_overflow_s2)
bf16_direct_s2 = _direct(bf16_s2)
bf16_ga_direct_s2 = _direct(_low_precision(2, torch.bfloat16, micro=2))


# ---------------------------------------------------------------------------------------------- checkpoints
def _checkpoint(stage, dtype=None):
    def scenario(rank, world):
        data = batches("gpt", world, 8)
        opts = dict(stage=stage, bucket_size=3000, dtype=dtype)
        model, opt = train_zero("gpt", data[:4], rank, **opts)
        sd = copy.deepcopy(opt.state_dict())
        model, opt = train_zero("gpt", data, rank, model=model, opt=opt, start=4)        # uninterrupted
        fresh = gpt(seed=99)                                                               # different init
        opt2 = ZeroOptimizer(fresh, lr=1e-3, weight_decay=0.01, comm_timeout_s=60, **opts)
        opt2.load_state_dict(sd)
        fresh, opt2 = train_zero("gpt", data, rank, model=fresh, opt=opt2, start=4)
        for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
            if not torch.equal(a, b):
                raise AssertionError(f"resumed run differs from the uninterrupted one at {n}: "
                                     f"max diff {(a.float() - b.float()).abs().max():.3g}")
        result = {"resumed_equal": True}
        if world > 1 and dtype is None:
            # Reshard: every rank loads all ranks' shards into a single-rank optimizer and continues alone on
            # the whole batch; it must match the uninterrupted multi-rank run.
            everyone = [None] * world
            dist.all_gather_object(everyone, sd)
            solo_groups = [dist.new_group([r]) for r in range(world)]
            solo = gpt(seed=7)
            opt3 = ZeroOptimizer(solo, lr=1e-3, weight_decay=0.01, process_group=solo_groups[rank],
                                 comm_timeout_s=60, **opts)
            opt3.load_state_dict(everyone)
            whole = [[(x, y) for x, y in row] for row in data]
            for t in range(4, len(whole)):
                (x, y), = whole[t]
                opt3.backward(loss_of("gpt", solo(x), y))
                opt3.step()
            opt3.wait_for_params()
            err = rel_err(solo, model)
            result["reshard_rel_err"] = err
            if err > FP32_TOL:
                raise AssertionError(f"resharded (world {world} -> 1) run deviates by {err:.3g}")
        return result
    return scenario


checkpoint_s1 = _checkpoint(1)
checkpoint_s2 = _checkpoint(2)
checkpoint_bf16_s2 = _checkpoint(2, torch.bfloat16)


# ---------------------------------------------------------------------------------------------- accounting
def _accounting(stage, dtype=None, micro=1):
    def scenario(rank, world):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 61), nn.GELU(), nn.Linear(61, 64))
        opt = ZeroOptimizer(model, stage=stage, dtype=dtype, bucket_size=5000, gradient_accumulation_steps=micro,
                            comm_timeout_s=60)
        x = torch.randn(LOCAL_BATCH, 64, dtype=dtype or torch.float32)
        for _ in range(micro):                          # after the window's backward: gradients are held
            opt.backward(model(x).float().square().mean())
        rep = opt.memory_report()
        opt.step()
        rep_after = opt.memory_report()
        psi = sum(p.numel() for p in model.parameters())
        n = world
        mixed = dtype is not None
        formula = formula_bytes(stage, mixed, psi, n)
        if stage == 2 and micro > 1:
            grad_bytes = 4 if not mixed else 2
            formula += (4 - grad_bytes) * psi / n     # fp32 accumulation shard (stated in memory_report)
        bytes_per_elem = 16 + 4                          # every per-element buffer kind, generously
        slack = rep["padding_elements"] * bytes_per_elem + 64
        if rep["psi"] != psi:
            raise AssertionError(f"report psi {rep['psi']} != {psi}")
        if abs(rep["model_states"] - formula) > slack:
            raise AssertionError(f"stage {stage} {dtype}: holds {rep['model_states']} B, formula {formula:.0f} B "
                                 f"(allowed padding slack {slack} B): {rep}")
        # The buffers behind the report are the real ones: check each kind against its expected size.
        shard = sum(u.shard_numel for u in opt.units)
        psz = 2 if mixed else 4
        expect = {"optimizer_state": 8 * shard, "master": 4 * shard if mixed else 0,
                  "params": psz * sum(u.padded_numel for u in opt.units)}
        for k, v in expect.items():
            if rep[k] != v:
                raise AssertionError(f"{k}: {rep[k]} B held, expected {v} B")
        if stage == 2 and any(p.grad is not None for p in model.parameters()):
            raise AssertionError("stage 2 kept a full gradient after backward")
        return {"held": rep["model_states"], "formula": formula, "after_step": rep_after["model_states"]}
    return scenario


accounting_fp32_s1 = _accounting(1)
accounting_fp32_s2 = _accounting(2)
accounting_bf16_s1 = _accounting(1, torch.bfloat16)
accounting_bf16_s2 = _accounting(2, torch.bfloat16)
accounting_bf16_s2_ga = _accounting(2, torch.bfloat16, micro=2)


# ------------------------------------------------------------------------------------------ failure behaviour
def mismatched_ranks(rank, world):
    torch.manual_seed(0)
    width = 8 if rank == 0 else 9
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, width))
    t0 = time.time()
    try:
        ZeroOptimizer(model, stage=2, comm_timeout_s=30)
    except RankMismatchError as e:
        msg = str(e)
        if "1.weight" not in msg or "shape" not in msg:
            raise AssertionError(f"mismatch error does not name the parameter and field: {msg}")
        return {"message": msg, "seconds": time.time() - t0}
    raise AssertionError("no error raised for ranks with different models")


def collective_timeout(rank, world):
    """Rank 0 trains while the others do not: rank 0's reduction must time out with an error naming it."""
    sub = dist.new_group(backend="gloo")
    model = mlp()
    opt = ZeroOptimizer(model, stage=2, bucket_size=200, process_group=sub, comm_timeout_s=2)
    if rank != 0:
        return {"role": "idle"}
    x = torch.randn(LOCAL_BATCH, 16)
    t0 = time.time()
    try:
        opt.backward(model(x).square().mean())
    except CollectiveTimeout as e:
        msg = str(e)
        if "agreement on a backward pass" not in msg or "did not finish within" not in msg:
            raise AssertionError(f"timeout error does not name the operation: {msg}")
        if "rank 0 waits in all_gather of the agreement on a backward pass" not in msg or \
                "rank 1 did not time out" not in msg:
            raise AssertionError(f"timeout error does not say what each rank was doing: {msg}")
        return {"message": msg.splitlines()[0][:200], "seconds": time.time() - t0}
    raise AssertionError("no timeout raised although the other ranks never joined")


def close_releases_group(rank, world):
    """close() waits for the step's gathers, removes the engine's hooks and drops the group, so that
    destroy_process_group really destroys it (joining gloo's threads) instead of leaving it to interpreter exit."""
    import gc
    import weakref
    sub = dist.new_group(backend="gloo")
    model = mlp()
    n_hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    opt = ZeroOptimizer(model, stage=2, bucket_size=200, process_group=sub)
    x = torch.randn(LOCAL_BATCH, 16, generator=torch.Generator().manual_seed(rank))
    opt.backward(model(x).square().mean())
    opt.step()                                   # leaves the parameter gathers in flight
    opt.close()
    opt.close()                                  # idempotent
    if opt._pending or opt.comm.group is not None:
        raise AssertionError("close() left gathers in flight or kept the process group")
    if sum(len(m._forward_pre_hooks) for m in model.modules()) != n_hooks:
        raise AssertionError("close() left forward hooks on the model")
    try:
        opt.step()
        raise AssertionError("step() after close() did not raise")
    except RuntimeError as e:
        if "closed" not in str(e):
            raise AssertionError(f"unclear error after close(): {e}")
    # Parameters are complete (every rank's shard gathered) and identical on all ranks.
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    for other in everyone:
        torch.testing.assert_close(other, flat, rtol=0, atol=0)
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    if ref() is not None:
        raise AssertionError("the closed optimizer is still referenced (hooks not removed?)")
    dist.destroy_process_group(sub)
    return {"closed": True}


def rank_dies(rank, world):
    """Not a parity check: rank 1 aborts mid-training, so the harness must report it instead of hanging."""
    import os
    model = mlp()
    opt = ZeroOptimizer(model, stage=2, bucket_size=200)
    if rank == 1:
        os.abort()
    opt.backward(model(torch.randn(LOCAL_BATCH, 16)).square().mean())
    opt.step()
    return {"unexpected": "rank 0 finished a step without its peer"}


# Which scenarios run at which world size (1 rank: engine parity without communication).
PARITY = ["mlp_s1", "mlp_s2", "gpt_s1", "gpt_s2", "mlp_ga_s1", "mlp_ga_s2", "mlp_clip_s1", "mlp_clip_s2",
          "mlp_groups_sched_s1", "mlp_groups_sched_s2", "gpt_ga_clip_s2", "encoder_s1", "encoder_s2", "special_s1", "special_s2",
          "mlp_offload_s1", "mlp_offload_s2", "mlp_no_overlap_s2", "mlp_scatter_gather_s1",
          "mlp_scatter_gather_s2", "special_untouched", "mlp_direct_s2", "gpt_direct_s2", "encoder_direct_s2",
          "mlp_ga_direct_s2", "gpt_ga_clip_direct_s2", "special_direct_s2", "mlp_no_overlap_direct_s2"]
LOW_PRECISION = ["bf16_s1", "bf16_s2", "bf16_offload_s2", "bf16_fp32_reduce_ga_s1", "bf16_fp32_reduce_ga_s2",
                 "bf16_offload_ga_s1", "fp32_bf16_reduce_s2", "fp16_overflow_s1", "fp16_overflow_s2",
                 "fp16_overflow_direct_s2", "bf16_direct_s2", "bf16_ga_direct_s2"]
CHECKPOINT = ["checkpoint_s1", "checkpoint_s2", "checkpoint_bf16_s2"]
ACCOUNTING = ["accounting_fp32_s1", "accounting_fp32_s2", "accounting_bf16_s1", "accounting_bf16_s2",
              "accounting_bf16_s2_ga"]
REDUCED = ["reduced_gradients_through_a_view", "reduced_gradients_through_a_view_fp16",
           "reduced_gradients_through_a_view_direct", "reduced_gradients_through_a_view_fp16_direct"]
FAILURES = ["close_releases_group", "mismatched_ranks", "collective_timeout"]           # the timeout breaks its group: keep it last

SCENARIOS_BY_WORLD = {
    1: ["mlp_s1", "mlp_s2", "gpt_s2", "mlp_ga_s2", "special_s2", "bf16_s2", "checkpoint_s2",
        "accounting_fp32_s2", "mlp_ga_direct_s2"],
    2: PARITY + LOW_PRECISION + CHECKPOINT + ACCOUNTING + REDUCED + FAILURES,
    4: ["mlp_s1", "mlp_s2", "gpt_s1", "gpt_s2", "mlp_ga_s2", "mlp_clip_s2", "mlp_groups_sched_s2", "special_s1",
        "special_s2", "bf16_s2", "checkpoint_s2", "accounting_fp32_s1", "accounting_bf16_s2", "mlp_direct_s2",
        "gpt_ga_clip_direct_s2", "special_direct_s2", "fp16_overflow_direct_s2", "reduced_gradients_through_a_view_direct",
        "reduced_gradients_through_a_view_fp16_direct", "mismatched_ranks"],
}


def collectives_exact(rank, world):
    """Both strategies: a reduction gives this rank's shard of the sum, a gather gives every rank's shard."""
    from zerocore.zero.collectives import Collectives
    out = {}
    for strategy in ("all_reduce", "scatter_gather"):
        comm = Collectives(None, timeout_s=60, strategy=strategy)
        shard = 5
        g = torch.Generator().manual_seed(1000 + rank)
        mine = torch.randn(shard * world, generator=g)
        everyone = [torch.randn(shard * world, generator=torch.Generator().manual_seed(1000 + r)) for r in range(world)]
        got = comm.reduce(mine.clone(), shard, "test").wait()
        want = torch.stack(everyone).sum(0)[rank * shard:(rank + 1) * shard]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        flat = torch.full((shard * world,), float("nan"))
        flat[rank * shard:(rank + 1) * shard] = everyone[rank][:shard]
        comm.gather(flat, shard, "test").wait()
        torch.testing.assert_close(flat, torch.cat([e[:shard] for e in everyone]), rtol=0, atol=0)
        out[strategy] = True
    return out


SCENARIOS_BY_WORLD[2].insert(0, "collectives_exact")
SCENARIOS_BY_WORLD[4].insert(0, "collectives_exact")
