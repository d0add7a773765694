"""Multi-rank scenarios for zerocore.integrations.transformers, run by tests/test_integrations_transformers.py
through dist_helpers.run_scenarios (spawned gloo ranks; accelerate sees them as a torchrun-style MULTI_CPU job).

Every run trains the same tiny GPT-2 (2 layers, 64 wide, vocab 100, no dropout) from the same initial weights on
the same 96 sequences (sequential sampler: with accelerate's batch sharding, optimizer step s sees sequences
[8s, 8s + 8) whether 1 rank takes micro-batches of 4 or 2 ranks take 2 each), fp32, gradient accumulation 2,
AdamW (torch's in the reference), clipping at MAX_GRAD_NORM (below the gradient norms, so it clips), a linear
schedule with warmup, 12 steps, one log per step. Scenarios return what the tests compare: Trainer's log
history, eval loss, logits, files; the trained models are written with save_model for the tests to read.
The work folder is $ZEROCORE_HF_TESTDIR.
"""
from __future__ import annotations

import json
import os
import warnings

import torch
import torch.distributed as dist

STEPS, SAVE_STEPS, GA, SEQ, NSEQ, VOCAB = 12, 6, 2, 16, 96, 100
PER_RANK_BATCH = 2                    # x 2 ranks = the reference's 4
MAX_GRAD_NORM = 0.5
LR, WARMUP = 1e-2, 3

STAGE3_CONFIG = {   # HF style: everything Trainer knows is "auto"; no scheduler section -> Trainer's linear one
    "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto", "overlap_comm": True},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
}

# transformers' documented stock ZeRO-3 config (docs: "ZeRO-3 example"), unchanged.
STOCK_ZERO3 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": True, "contiguous_gradients": True,
        "sub_group_size": 1e9, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False,
}


def workdir(*parts) -> str:
    return os.path.join(os.environ["ZEROCORE_HF_TESTDIR"], *parts)


def _accelerate_env(rank: int, world_size: int) -> None:
    """What torchrun would set: accelerate then finds a MULTI_CPU job and the gloo group already up."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29500"), TOKENIZERS_PARALLELISM="false")
    if world_size == 1:
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            os.environ.pop(k, None)


def gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


class Sequences(torch.utils.data.Dataset):
    """Arithmetic progressions mod VOCAB with random start and stride: learnable, fixed by the seed."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        stride = torch.randint(1, 7, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(SEQ)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(out: str, per_device: int, **kw):
    from transformers import TrainingArguments
    base = dict(output_dir=out, per_device_train_batch_size=per_device, per_device_eval_batch_size=8,
                gradient_accumulation_steps=GA, learning_rate=LR, weight_decay=0.1, max_grad_norm=MAX_GRAD_NORM,
                lr_scheduler_type="linear", warmup_steps=WARMUP, max_steps=STEPS, logging_steps=1,
                save_strategy="steps", save_steps=SAVE_STEPS, train_sampling_strategy="sequential",
                optim="adamw_torch", seed=0, report_to=[], disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _steps(trainer):
    """Per optimizer step: (step, loss, grad_norm, learning_rate) from Trainer's log history."""
    return [(h["step"], h["loss"], h["grad_norm"], h["learning_rate"]) for h in trainer.state.log_history
            if "loss" in h and "grad_norm" in h]


def _probe_logits(model):
    ids = Sequences(4, seed=123).ids
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# ---------------------------------------------------------------------------------------------- 2 ranks
def setup(rank, world_size):
    """The base weights every run starts from, as save_pretrained writes them (one file, and sharded)."""
    _accelerate_env(rank, world_size)
    import zerocore.integrations.transformers  # noqa: F401  (before any TrainingArguments, as a script would)
    if rank == 0:
        model = gpt2()
        model.save_pretrained(workdir("base"))
        model.save_pretrained(workdir("base_sharded"), max_shard_size="60KB")
    dist.barrier()
    with open(workdir("base_sharded", "model.safetensors.index.json")) as f:
        return {"shards": len(set(json.load(f)["weight_map"].values()))}


def from_pretrained_partitioned(rank, world_size):
    """The helper's partitioned load equals a plain from_pretrained; each rank holds ~1/N of the weights."""
    from transformers import AutoModelForCausalLM
    from zerocore import ZeroOptimizer
    from zerocore.integrations.transformers import from_pretrained
    from zerocore.zero import init as zero_init
    model = from_pretrained(AutoModelForCausalLM, workdir("base_sharded"))
    held = zero_init.held_bytes()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers_ok = all(not b.is_meta for b in model.buffers())
    opt = ZeroOptimizer(model, stage=3)
    full = opt.full_state_dict()
    out = {"held_fraction": held / total, "buffers_ok": buffers_ok, "training": model.training}
    if rank == 0:
        plain = AutoModelForCausalLM.from_pretrained(workdir("base_sharded")).state_dict()
        out["keys_equal"] = sorted(plain) == sorted(full)
        out["max_abs_diff"] = max(float((plain[k] - full[k]).abs().max()) for k in plain)
    opt.close()
    return out


def _zero_run(name, rank, world_size, model, **trainer_kw):
    """Train with ZeroTrainer, evaluate, compare the saved model's logits with the trained model's."""
    from transformers import AutoModelForCausalLM
    from zerocore.integrations.transformers import ZeroTrainer
    out = workdir(name)
    args = trainer_kw.pop("args", None) or training_args(out, PER_RANK_BATCH)
    trainer = ZeroTrainer(model=model, args=args, train_dataset=Sequences(NSEQ, 0), eval_dataset=Sequences(16, 1),
                          **trainer_kw)
    trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]
    opt = trainer.optimizer
    with opt.gathered():
        logits = _probe_logits(trainer.model)
    trainer.save_model(workdir(name, "final"))
    result = {"steps": _steps(trainer), "eval_loss": eval_loss, "world_size": trainer.args.world_size,
              "config": {k: getattr(opt.config, k) for k in ("stage", "lr", "betas", "eps", "weight_decay",
                                                              "gradient_clipping", "gradient_accumulation_steps",
                                                              "bucket_size", "prefetch_bucket_size",
                                                              "param_persistence_threshold", "offload_optimizer",
                                                              "offload_param")},
               "scheduler": type(trainer.lr_scheduler).__name__, "wrapped": type(trainer.model_wrapped).__name__}
    if rank == 0:
        reloaded = AutoModelForCausalLM.from_pretrained(workdir(name, "final"))
        result["logits_max_abs_diff"] = float((_probe_logits(reloaded) - logits).abs().max())
        result["logits_scale"] = float(logits.abs().max())
    opt.close()
    return result


def stage2_keyword_config(rank, world_size):
    """Stage 2 through zero_config= keyword options (no DeepSpeed JSON): TrainingArguments give the rest."""
    return _zero_run("s2", rank, world_size, gpt2(), zero_config={"stage": 2})


def stage3_deepspeed_argument(rank, world_size):
    """Stage 3 through TrainingArguments(deepspeed=<json path with "auto"s>), the model loaded partitioned."""
    from transformers import AutoModelForCausalLM
    from zerocore.integrations.transformers import from_pretrained
    path = workdir("stage3.json")
    if rank == 0:
        with open(path, "w") as f:
            json.dump(STAGE3_CONFIG, f)
    dist.barrier()
    model = from_pretrained(AutoModelForCausalLM, workdir("base"))
    model.train()
    return _zero_run("s3", rank, world_size, model, args=training_args(workdir("s3"), PER_RANK_BATCH, deepspeed=path))


def stock_auto_config(rank, world_size):
    """transformers' stock ZeRO-3 config (offload, WarmupLR, every value "auto") as TrainingArguments(deepspeed=)."""
    from zerocore.zero.lr_schedules import WarmupLR
    args = training_args(workdir("stock"), PER_RANK_BATCH, deepspeed=dict(STOCK_ZERO3), save_strategy="no")
    result = _zero_run("stock", rank, world_size, gpt2(), args=args)
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    sched = WarmupLR(probe, warmup_min_lr=0, warmup_max_lr=LR, warmup_num_steps=WARMUP)
    expected = []
    for _ in range(STEPS):          # the lr each update ran at, one scheduler step per update
        expected.append(sched.get_last_lr()[0])
        probe.step()
        sched.step()
    result["expected_lrs"] = expected
    result["ds_argument_kept"] = isinstance(args.deepspeed, dict) and args.deepspeed_plugin is None
    return result


# ---------------------------------------------------------------------------------------------- 1 rank
def reference(rank, world_size):
    """Plain transformers.Trainer (torch AdamW, its own clipping and scheduler, no zerocore) in one process,
    micro-batches of 2 x PER_RANK_BATCH."""
    _accelerate_env(rank, world_size)
    from transformers import Trainer
    trainer = Trainer(model=gpt2(), args=training_args(workdir("ref"), 2 * PER_RANK_BATCH),
                      train_dataset=Sequences(NSEQ, 0), eval_dataset=Sequences(16, 1))
    trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]
    trainer.save_model(workdir("ref", "final"))
    return {"steps": _steps(trainer), "eval_loss": eval_loss, "optimizer": type(trainer.optimizer.optimizer).__name__}


def resume_at_one_rank(rank, world_size):
    """The stage-3 run's checkpoint-6 (2 ranks) resumed on 1 rank with the global batch kept (micro-batch 4)."""
    from zerocore.integrations.transformers import ZeroTrainer
    args = training_args(workdir("resumed"), 2 * PER_RANK_BATCH, deepspeed=workdir("stage3.json"))
    model = gpt2(seed=7)               # other initial weights: everything must come from the checkpoint
    trainer = ZeroTrainer(model=model, args=args, train_dataset=Sequences(NSEQ, 0), eval_dataset=Sequences(16, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # Trainer warns that the batch size per device changed
        trainer.train(resume_from_checkpoint=workdir("s3", f"checkpoint-{SAVE_STEPS}"))
    eval_loss = trainer.evaluate()["eval_loss"]
    trainer.save_model(workdir("resumed", "final"))
    trainer.optimizer.close()
    return {"steps": _steps(trainer), "eval_loss": eval_loss, "world_size": trainer.args.world_size}


def short_window_refused(rank, world_size):
    """10 sequences in micro-batches of 4: 3 batches per epoch, not a multiple of GA=2."""
    from zerocore.integrations.transformers import ZeroTrainer
    args = training_args(workdir("short"), 4, max_steps=-1, num_train_epochs=2, save_strategy="no")
    trainer = ZeroTrainer(model=gpt2(), args=args, train_dataset=Sequences(10, 0), zero_config={"stage": 2})
    try:
        trainer.train()
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


def fp16_overflow_skips_scheduler(rank, world_size):
    """fp16 with a loss scale of 2**19: the first updates overflow and are skipped; Trainer must not step the
    scheduler for them (its steps then lag Trainer's global_step by exactly the skipped ones)."""
    from zerocore.integrations.transformers import ZeroTrainer
    args = training_args(workdir("fp16"), 2 * PER_RANK_BATCH, max_steps=8, save_strategy="no")
    trainer = ZeroTrainer(model=gpt2(), args=args, train_dataset=Sequences(NSEQ, 0),
                          zero_config={"stage": 2, "dtype": "fp16", "initial_scale_power": 19, "hysteresis": 1})
    trainer.train()
    opt = trainer.optimizer
    out = {"steps": _steps(trainer), "skipped": opt.skipped_steps, "updated": opt.global_steps,
           "scheduler_steps": trainer.lr_scheduler.last_epoch, "global_step": trainer.state.global_step,
           "loss_scale": opt.loss_scale}
    opt.close()
    return out
