"""Train a small character-level GPT with ZeRO stage 3: `torchrun --nproc_per_node 2 examples/train_gpt.py`.

A decoder-only transformer written in plain PyTorch (token + position embeddings, pre-LayerNorm blocks of causal
self-attention and an MLP, a final LayerNorm, an LM head tied to the token embedding) learns to write like
Shakespeare's sonnets (`examples/data/sonnets.txt`: 139 of the 154 sonnets of 1609, in modernized spelling,
public domain; typed into the repository for this example, so small slips from the printed editions may
remain). It uses zerocore's public API only: `ZeroOptimizer` (stage 3 by default, one unit per transformer
block), `zerocore.ZeroInit` (`--zero-init`), `opt.save_checkpoint` / `opt.load_checkpoint` (`--save` /
`--resume` / `--auto-resume`) and `opt.gathered()` (`--generate`: the sampling loop gathers the model once, not once per token).

    torchrun --nproc_per_node 2 examples/train_gpt.py                       # stage 3 on 2 CPU ranks (gloo)
    python examples/train_gpt.py                                            # one process, no torchrun needed
    torchrun --nproc_per_node 2 examples/train_gpt.py --offload-optimizer cpu --offload-param cpu --dtype bf16
    torchrun --nproc_per_node 2 examples/train_gpt.py --offload-optimizer nvme --offload-param nvme \\
        --nvme-path /local_nvme                                             # state and parameter shards on disk
    torchrun --nproc_per_node 2 examples/train_gpt.py --save ckpt --save-every 100    # stopped (Ctrl-C) at 250,
    torchrun --nproc_per_node 2 examples/train_gpt.py --resume ckpt --save ckpt --generate 300  # goes on from 200
    torchrun --nproc_per_node 2 examples/train_gpt.py --stage 2 --zero-init --activation-checkpointing
    torchrun --nproc_per_node 2 --max-restarts 3 examples/train_gpt.py --save ckpt --save-every 50 --auto-resume
                                          # a rank that fails: torchrun restarts them all, from the last checkpoint

On CUDA machines each rank uses the GPU of its LOCAL_RANK and NCCL; otherwise gloo on the CPU. Rank 0 shows a
tqdm progress bar (on stderr; TQDM_DISABLE=1 hides it) and prints, every --log-every steps, a line

    step N loss X val Y ms/step Z

(X: training loss averaged over the steps since the previous line and over the ranks; Y: validation loss on
held-out text, the last 10% of the file; Z: mean wall time of those steps), and at the end the peak RSS of every
rank and the bytes `opt.memory_report()` counts on rank 0. `--steps` is the total: a run resumed at step 200
with `--steps 400` trains 200 more.

Why stage 3 by default: it is what zerocore is about (each rank keeps 1/N of parameters, gradients and Adam
state; every Block is one unit, gathered for its forward and backward), and on this model it costs nothing
measurable: the default command took 65-82 s with stage 3 and 71-87 s with `--stage 2` (back-to-back runs on a
shared 2-core machine, so the spread is load, not the stage), with identical losses. Stage 3 keeps parameters
of at most `--persistence-threshold` elements (default 1000: LayerNorms, biases) gathered on every rank;
zerocore's default (1e5, as DeepSpeed's) would keep every parameter of a model this small whole.

Measured (2 CPU ranks on gloo, 2-core machine shared with other jobs, torch 2.14, defaults: 4 layers, 128 wide,
4 heads, context 64, micro-batch 16 per rank, 0.81M parameters, lr 3e-3, 400 steps): 65 s wall (about 58 s of
training at 115-200 ms/step), the loss falling from 4.11 (val 3.88) at step 1 to 2.46 (val 2.42) at step 50,
2.33 (2.33) at 100, 2.09 (2.14) at 200 and 1.81 (val 1.92) at step 400; peak RSS about 605 MB per rank (an
idle rank with torch and gloo holds ~520 MB). After 400 steps `--generate` prints sonnet-shaped lines of
mostly invented words. `--dtype fp16` is meant for GPUs: torch's fp16 CPU kernels are about 10x slower than
bf16's.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import socket
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.checkpoint import checkpoint

import zerocore
from zerocore import ZeroOptimizer

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "data", "sonnets.txt")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------------ model
# Each module initializes its own parameters in its own __init__, before its parent takes it: under
# zerocore.ZeroInit a module's parameters are partitioned as soon as it is attached to its parent, so a parent
# that initialized its children afterwards (GPT-2's `self.apply(_init_weights)`) would write into placeholders.

def _linear(d_in: int, d_out: int, std: float = 0.02, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=bias)
    nn.init.normal_(layer.weight, std=std)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def _embedding(n: int, d: int) -> nn.Embedding:
    emb = nn.Embedding(n, d)
    nn.init.normal_(emb.weight, std=0.02)
    return emb


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, out_std: float):
        super().__init__()
        self.heads = heads
        # Separate q, k, v and output projections, each its own module, so the block that owns them calls them.
        self.q, self.k, self.v = _linear(width, width), _linear(width, width), _linear(width, width)
        self.proj = _linear(width, width, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, width: int, out_std: float):
        super().__init__()
        self.fc = _linear(width, 4 * width)
        self.proj = _linear(4 * width, width, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block; under stage 3 each Block is one unit (`unit_modules={"Block"}`)."""

    def __init__(self, width: int, heads: int, layers: int):
        super().__init__()
        out_std = 0.02 / math.sqrt(2 * layers)          # GPT-2's scaled init of the residual projections
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, out_std)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = MLP(width, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, block_size: int, width: int, layers: int, heads: int,
                 activation_checkpointing: bool = False):
        super().__init__()
        self.block_size = block_size
        self.activation_checkpointing = activation_checkpointing
        self.tok_emb = _embedding(vocab, width)
        self.pos_emb = _embedding(block_size, width)
        self.blocks = nn.ModuleList()
        for _ in range(layers):               # appended one by one: under ZeroInit each is partitioned at once
            self.blocks.append(Block(width, heads, layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok_emb.weight   # tied: the parameter belongs to both, so zerocore gives it to GPT

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(self.ln_f(x))


# ------------------------------------------------------------------------------------------------------- data
class CharData:
    """The text file as character ids; the first 90% trains, the rest validates."""

    def __init__(self, path: str, block_size: int):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        cut = int(0.9 * len(ids))
        self.train, self.val = ids[:cut], ids[cut:]
        self.block_size = block_size
        if len(self.val) <= block_size + 1:
            raise SystemExit(f"{path}: {len(text)} characters are too few for --block {block_size}")

    def batch(self, split: str, batch: int, gen: torch.Generator):
        data = self.train if split == "train" else self.val
        starts = torch.randint(len(data) - self.block_size - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + self.block_size] for s in starts.tolist()])
        y = torch.stack([data[s + 1:s + 1 + self.block_size] for s in starts.tolist()])
        return x, y

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


def batch_generator(seed: int, rank: int, step: int, purpose: int) -> torch.Generator:
    """Each rank samples its own batches; seeded by (seed, rank, step) so a resumed run sees what an
    uninterrupted one would have seen."""
    return torch.Generator().manual_seed((((seed * 1_000_003 + rank) * 10_000_019 + step) * 4 + purpose) % 2 ** 63)


# ---------------------------------------------------------------------------------------------------- helpers
def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed():
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:            # plain `python train_gpt.py`: a one-rank group of our own
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # Ranks share the machine's cores; oversubscribing them makes every rank slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, store=attempt_store(world))
    return rank, world, device


def attempt_store(world: int):
    """Under torchrun, the agent's store seen through a prefix of its own per attempt; else None (env://).

    torchrun (torch 2.14) hands the workers of every attempt the same store: after a restart
    (--max-restarts), a worker can read the previous attempt's addresses and fail in init_process_group
    ("Gloo connectFullMesh failed ... Connection refused") or hang there, in about half the restarts measured
    here. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 with --standalone avoids it as well."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world,
                          is_master=False, timeout=datetime.timedelta(minutes=30))
    return dist.PrefixStore(f"train_gpt/attempt{attempt}/", store)


def mean_over_ranks(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


@torch.no_grad()
def evaluate(model, data: CharData, args, rank: int, device) -> float:
    model.eval()
    total = 0.0
    for i in range(args.eval_batches):        # the same held-out batches at every evaluation
        x, y = data.batch("val", args.batch, batch_generator(args.seed, rank, i, purpose=1))
        logits = model(x.to(device))
        total += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten()).item()
    model.train()
    return mean_over_ranks(total / args.eval_batches, device)


@torch.no_grad()
def generate(model, opt, data: CharData, n: int, temperature: float, seed: int, device) -> str:
    """Sample n characters. Inside opt.gathered() every unit stays gathered, so the n forward passes gather the
    model once (without it, stage 3 would gather every block again for every character). Every rank runs the same
    forwards with the same random stream (stage 3 checks that ranks run the same modules)."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([[data.stoi.get("\n", 0)]], device=device)
    with opt.gathered():
        for _ in range(n):
            logits = model(idx[:, -model.block_size:])[:, -1, :].float() / max(temperature, 1e-5)
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=gen)
            idx = torch.cat([idx, nxt], dim=1)
    model.train()
    return data.decode(idx[0, 1:].tolist())


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, default=3, choices=(1, 2, 3), help="ZeRO stage (default 3)")
    ap.add_argument("--offload-optimizer", default="none", choices=("none", "cpu", "nvme"),
                    help="where the fp32 masters and Adam state live (nvme needs --nvme-path)")
    ap.add_argument("--offload-param", default="none", choices=("none", "cpu", "nvme"),
                    help="stage 3: where the parameter shards live (nvme needs --offload-optimizer nvme)")
    ap.add_argument("--nvme-path", default=None, help="folder on a fast local disk for NVMe offload")
    ap.add_argument("--dtype", default="fp32", choices=tuple(DTYPES),
                    help="compute dtype; fp32 masters are kept (fp16 is for GPUs: torch's CPU fp16 kernels are "
                         "about 10x slower than bf16)")
    ap.add_argument("--steps", type=int, default=400, help="total optimizer steps (a resumed run counts on)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (warmup, then cosine to 10%%)")
    ap.add_argument("--warmup", type=int, default=20, help="linear warmup steps")
    ap.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay of the 2-D weights")
    ap.add_argument("--batch", type=int, default=16, help="micro-batch per rank (sequences)")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clipping (0: off)")
    ap.add_argument("--block", type=int, default=64, help="context length (characters)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--persistence-threshold", type=int, default=1000,
                    help="stage 3: parameters of at most this many elements stay gathered on every rank (zerocore "
                         "and DeepSpeed default to 1e5, which would keep every parameter of this small model whole)")
    ap.add_argument("--activation-checkpointing", action="store_true",
                    help="recompute each block in backward (torch.utils.checkpoint, use_reentrant=False)")
    ap.add_argument("--zero-init", action="store_true",
                    help="build the model under zerocore.ZeroInit(): no rank ever holds all of it")
    ap.add_argument("--save", default=None, metavar="DIR", help="write zerocore checkpoints to DIR")
    ap.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    ap.add_argument("--resume", default=None, metavar="DIR", help="continue from DIR's latest checkpoint")
    ap.add_argument("--auto-resume", action="store_true",
                    help="with --save DIR: continue from DIR's latest checkpoint when it holds one, else start "
                         "from scratch, so one command line serves the first start and every restart (torchrun "
                         "--max-restarts)")
    ap.add_argument("--generate", type=int, default=0, metavar="N", help="after training, sample N characters")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-batches", type=int, default=4, help="validation micro-batches per log line")
    ap.add_argument("--data", default=DEFAULT_DATA, help="a UTF-8 text file (default: the sonnets)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.width % args.heads:
        ap.error(f"--width {args.width} must be a multiple of --heads {args.heads}")
    if "nvme" in (args.offload_optimizer, args.offload_param) and not args.nvme_path:
        ap.error("NVMe offload needs --nvme-path DIR (an existing folder on a fast local disk)")
    if args.offload_param != "none" and args.stage != 3:
        ap.error("--offload-param needs --stage 3 (only stage 3 partitions the parameters)")
    if args.offload_param == "nvme" and args.offload_optimizer != "nvme":
        ap.error("--offload-param nvme needs --offload-optimizer nvme (the shards are read from the NVMe masters)")
    if args.auto_resume and not args.save:
        ap.error("--auto-resume needs --save DIR: it continues from DIR's latest checkpoint")
    if args.auto_resume and args.resume:
        ap.error("--auto-resume continues from --save DIR's latest checkpoint: drop --resume")
    if args.save and os.path.exists(os.path.join(args.save, "latest")) and not args.auto_resume and not (
            args.resume and os.path.realpath(args.resume) == os.path.realpath(args.save)):
        # zerocore never overwrites a checkpoint: a fresh run into this folder would fail at its first save.
        ap.error(f"--save {args.save} already holds checkpoints: add --resume {args.save} (or --auto-resume) to "
                 "continue from its latest, or save to another folder")
    return args


# ------------------------------------------------------------------------------------------------------- main
def build_model(args, vocab: int, device) -> GPT:
    torch.manual_seed(args.seed)            # the same initial weights on every rank (rank 0's are used anyway)
    # Built on its device; under ZeroInit each module is partitioned as its parent takes it, so no rank ever
    # holds the whole model.
    with torch.device(device), (zerocore.ZeroInit() if args.zero_init else nullcontext()):
        return GPT(vocab, args.block, args.width, args.layers, args.heads, args.activation_checkpointing)


def make_optimizer(model: GPT, args) -> ZeroOptimizer:
    # AdamW decay on the 2-D weights (linear layers, embeddings), none on biases and LayerNorms; groups by name.
    named = list(model.named_parameters())
    groups = [{"params": [n for n, p in named if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [n for n, p in named if p.dim() < 2], "weight_decay": 0.0}]
    none = lambda s: None if s == "none" else s  # noqa: E731
    return ZeroOptimizer(model, param_groups=groups, stage=args.stage, lr=args.lr, betas=(0.9, 0.95),
                         dtype=DTYPES[args.dtype], gradient_accumulation_steps=args.grad_accum,
                         gradient_clipping=args.clip, offload_optimizer=none(args.offload_optimizer),
                         offload_param=none(args.offload_param), nvme_path=args.nvme_path,
                         unit_modules={"Block"} if args.stage == 3 else None,     # a unit per transformer block
                         param_persistence_threshold=args.persistence_threshold)


def checkpoint_to_resume(args):
    """(folder, tag) to resume from, or None: --resume DIR's latest checkpoint (which must exist), or with
    --auto-resume the latest under --save DIR if it holds one. Rank 0 reads `latest` and tells the others, so every
    rank resumes from the same checkpoint (or none)."""
    if args.resume:
        return args.resume, None
    if not args.auto_resume:
        return None
    tag = [None]
    if dist.get_rank() == 0:
        try:
            with open(os.path.join(args.save, "latest")) as f:
                tag[0] = f.read().strip() or None
        except FileNotFoundError:                 # the first start: nothing saved yet
            pass
    dist.broadcast_object_list(tag, src=0)
    return (args.save, tag[0]) if tag[0] else None


@record          # under torchrun, an exception's traceback goes into the failure summary ("Root Cause")
def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = init_distributed()
    opt = None
    status = 1                                   # stays 1 if anything below raises
    try:
        data = CharData(args.data, args.block)
        model = build_model(args, len(data.chars), device)
        opt = make_optimizer(model, args)
        train(args, model, opt, data, rank, world, device)
        report(opt, rank, world, device)
        status = 0
    except KeyboardInterrupt:
        # Ctrl-C reaches every rank at a different point, so no further collectives (checkpoint, report) are
        # started; close() below finishes what is in flight.
        if rank == 0:
            print("\ninterrupted", flush=True)
        status = 130
    finally:
        if opt is not None:
            try:
                opt.close()
            except Exception as e:  # noqa: BLE001 - after a failure or an interrupt, peers may be gone
                if status == 0:
                    raise
                detail = "" if status == 130 else f": {e}"    # after Ctrl-C the peer has simply stopped
                print(f"rank {rank}: opt.close() after a failure: {type(e).__name__}{detail}", file=sys.stderr)
        if dist.is_initialized():
            if status == 0:
                dist.barrier()        # every rank is done before the group goes ([Note: teardown] in zerocore)
            dist.destroy_process_group()
    return status


def train(args, model: GPT, opt: ZeroOptimizer, data: CharData, rank: int, world: int, device) -> None:
    from tqdm import tqdm

    def lr_at(step):                          # warmup, then cosine down to 10% of --lr at --steps
        if step < args.warmup:
            return (step + 1) / args.warmup
        frac = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)   # ZeroOptimizer is a torch.optim.Optimizer

    start = 0
    resume = checkpoint_to_resume(args)
    if resume:                                # masters, Adam state, scheduler, step: at any world size and stage
        folder, tag = resume
        client = opt.load_checkpoint(folder, tag=tag, lr_scheduler=sched) or {}
        if client.get("chars") not in (None, data.chars):
            raise SystemExit(f"{folder}: the checkpoint was trained on another character set")
        start = int(client.get("step", 0))
    n_params = sum(p.numel() for p in model.parameters())
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))     # how often torchrun restarted the job
    if rank == 0:
        print(f"train_gpt: {world} rank(s) on {device.type} ({dist.get_backend()}), stage {args.stage}, "
              f"{args.dtype}, {n_params / 1e6:.2f}M params, vocab {len(data.chars)}, "
              f"{len(data.train)} train / {len(data.val)} val chars, offload optimizer={args.offload_optimizer} "
              f"param={args.offload_param}" + (f", resumed at step {start}" if resume else "")
              + (f" (torchrun restart {restarts})" if restarts else ""), flush=True)

    quiet = os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")   # (an explicit disable= wins)
    bar = tqdm(total=args.steps, initial=start, disable=rank != 0 or quiet, dynamic_ncols=True, desc="train",
               file=sys.stderr)
    losses, elapsed, since = [], 0.0, 0
    try:
        for step in range(start + 1, args.steps + 1):
            t0 = time.perf_counter()
            for micro in range(args.grad_accum):
                gen = batch_generator(args.seed, rank, step * args.grad_accum + micro, purpose=0)
                x, y = data.batch("train", args.batch, gen)
                logits = model(x.to(device))      # in --dtype: zerocore cast the parameters to it
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten())
                opt.backward(loss)                # scaled (fp16), reduce-scattered unit by unit as backward runs
                losses.append(loss.item())
            opt.step()
            opt.zero_grad()
            sched.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed += time.perf_counter() - t0
            since += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            if step % args.log_every == 0 or step == start + 1 or step == args.steps:
                train_loss = mean_over_ranks(sum(losses) / len(losses), device)
                val = evaluate(model, data, args, rank, device)
                if rank == 0:
                    tqdm.write(f"step {step} loss {train_loss:.4f} val {val:.4f} "
                               f"ms/step {elapsed / since * 1e3:.1f}", file=sys.stdout)
                    sys.stdout.flush()
                losses, elapsed, since = [], 0.0, 0
            if args.save and (step % args.save_every == 0 or step == args.steps):
                path = opt.save_checkpoint(args.save, client_state={"step": step, "chars": data.chars},
                                           lr_scheduler=sched)
                if rank == 0:
                    tqdm.write(f"saved {path}", file=sys.stdout)
    finally:
        bar.close()

    if args.generate:
        text = generate(model, opt, data, args.generate, args.temperature, args.seed, device)
        if rank == 0:
            print(f"--- {args.generate} characters sampled at temperature {args.temperature} ---\n{text}\n---",
                  flush=True)


def report(opt: ZeroOptimizer, rank: int, world: int, device) -> None:
    """Peak RSS of every rank (and GPU peak) and rank 0's model-state bytes as zerocore counts them."""
    rep = opt.memory_report()
    mine = {"rank": rank, "rss": peak_rss_mb(),
            "gpu": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        mb = lambda b: f"{b / 2 ** 20:.2f}"  # noqa: E731
        print("peak RSS MB per rank: " + ", ".join(
            f"{m['rank']}: {m['rss']:.0f}" + (f" (GPU peak {m['gpu']:.0f})" if m["gpu"] is not None else "")
            for m in everyone))
        print(f"memory_report rank 0 (MB): model_states {mb(rep['model_states'])} (ZeRO formula "
              f"{mb(rep['formula'])}), params {mb(rep['params'])}, gradients {mb(rep['gradients'])}, "
              f"master {mb(rep['master'])}, optimizer_state {mb(rep['optimizer_state'])}, peak gathered "
              f"{mb(rep['peak_gathered_params'])}, by location "
              + ", ".join(f"{k} {mb(v)}" for k, v in rep["by_location"].items()), flush=True)


if __name__ == "__main__":
    sys.exit(main())
