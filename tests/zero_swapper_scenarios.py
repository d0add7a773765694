"""Multi-rank scenarios for NVMe optimizer offload (tests/test_zero_swapper.py runs them, 2 gloo ranks).

Every run uses small sub-groups (several per rank) and few buffers, so the pipeline reads ahead, writes behind
and waits for buffers. Parity: against single-process AdamW (fp32 rel err <= 1e-5, gradient norm within 1e-4)
and bit for bit against the same run with offload_optimizer="cpu" (the same Adam kernel over the same values).
A disk that fails mid-run is a tmpfs remounted read-only under rank 1 (needs root; skipped with the reason).
"""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile

import torch
import torch.distributed as dist

import zero_scenarios as Z
import zero_stage3_scenarios  # noqa: F401  (registers the checkpointed GPT, "gpt_ckpt")
from zerocore.zero import ZeroOptimizer
from zerocore.zero.swapper import NVMeStateError

S3 = dict(stage=3, param_persistence_threshold=40)
SUB = 256                   # elements per sub-group: 1024 after rounding, 5 per rank on "wide", 14 on "gpt"


def wide(seed=1):
    """An MLP with ~9.7k parameters: several sub-groups per rank (Z.mlp fits in one)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 128), torch.nn.GELU(), torch.nn.Linear(128, 64),
                               torch.nn.GELU(), torch.nn.Linear(64, 4))


Z.MODELS["wide"] = wide


_ROOT = []


def _fresh_dir():
    """A new folder under this worker's temporary root (removed when the worker exits)."""
    if not _ROOT:
        _ROOT.append(tempfile.mkdtemp(prefix="zc-nvme-"))
        atexit.register(shutil.rmtree, _ROOT[0], True)
    return tempfile.mkdtemp(dir=_ROOT[0])


def _nvme(buffer_count=2, path=None):
    return dict(offload_optimizer="nvme", nvme_path=path or _fresh_dir(), buffer_count=buffer_count,
                sub_group_size=SUB)


def _params(model, opt):
    with opt.gathered():
        return [p.detach().clone() for p in model.parameters()]


def _parity(kind, stage, buffer_count, nvme_params=False, **extra):
    def scenario(rank, world):
        data = Z.batches(kind, world, 5)
        stage_opts = dict(S3) if stage == 3 else dict(stage=stage)
        stage_opts.update(extra)
        params = dict(offload_param="nvme", param_buffer_count=2) if nvme_params else {}
        model, opt = Z.train_zero(kind, data, rank, **stage_opts, **_nvme(buffer_count), **params)
        rep = opt.memory_report()
        on_nvme = len(opt.store.param_units)
        in_memory_shards = sum(1 for u in opt.units if u.shard is not None)
        got = _params(model, opt)
        norm = opt.global_grad_norm
        folder = rep["nvme_path"]
        opt.close()
        cpu_model, cpu_opt = Z.train_zero(kind, data, rank, **stage_opts, offload_optimizer="cpu")
        same_as_cpu = all(torch.equal(a, b) for a, b in zip(got, _params(cpu_model, cpu_opt)))
        cpu_opt.close()
        norms = []
        ref = Z.train_reference(kind, data, norms=norms)
        err = max(((a.float() - q.detach()).norm() / q.detach().norm()).item()
                  for a, q in zip(got, ref.parameters()))
        return {"rel_err": err, "grad_norm": norm, "ref_grad_norm": norms[-1], "same_as_cpu": same_as_cpu,
                "sub_groups": rep["nvme_bytes"] // (2 * 12 * rep["sub_group_elements"]),
                "buffers": rep["nvme_buffers"], "removed_at_close": not os.path.exists(folder),
                "param_units_on_nvme": on_nvme, "shards_in_memory": in_memory_shards,
                "param_buffer_bytes": rep["nvme_param_buffer_bytes"], "param_reads": rep["nvme_param_reads"]}
    return scenario


nvme_wide_s1 = _parity("wide", 1, 2, bucket_size=20000)
nvme_wide_s2 = _parity("wide", 2, 3, bucket_size=20000)
nvme_gpt_s2 = _parity("gpt", 2, 4, bucket_size=3000)
nvme_gpt_s3 = _parity("gpt", 3, 2, bucket_size=3000)
nvme_wide_s3 = _parity("wide", 3, 1, bucket_size=2000)
nvme_params_gpt_s3 = _parity("gpt", 3, 3, nvme_params=True, bucket_size=3000)
# One unit gathered ahead: the shards of the next ones are read ahead from NVMe instead (hooks._prefetch).
nvme_params_wide_s3 = _parity("wide", 3, 2, nvme_params=True, bucket_size=2000, prefetch_bucket_size=1)
nvme_params_ckpt_s3 = _parity("gpt_ckpt", 3, 2, nvme_params=True, bucket_size=3000)


def nvme_bf16_s2(rank, world):
    """bf16 compute, fp32 masters on NVMe: bit for bit the CPU-offload run."""
    data = Z.batches("wide", world, 4)
    model, opt = Z.train_zero("wide", data, rank, stage=2, bucket_size=2000, dtype=torch.bfloat16, **_nvme(2))
    got = _params(model, opt)
    opt.close()
    cpu_model, cpu_opt = Z.train_zero("wide", data, rank, stage=2, bucket_size=2000, dtype=torch.bfloat16,
                                      offload_optimizer="cpu")
    same = all(torch.equal(a, b) for a, b in zip(got, _params(cpu_model, cpu_opt)))
    moved = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, wide().parameters()))
    cpu_opt.close()
    return {"same_as_cpu": same, "moved": moved}


def nvme_params_bf16_s3(rank, world):
    """bf16 stage 3 with parameters on NVMe (read from the fp32 masters, cast): bit for bit the run with
    parameter shards and optimizer state in host memory."""
    data = Z.batches("gpt", world, 4)
    opts = dict(S3, bucket_size=3000, dtype=torch.bfloat16)
    model, opt = Z.train_zero("gpt", data, rank, **opts, **_nvme(2), offload_param="nvme")
    got = _params(model, opt)
    opt.close()
    cpu_model, cpu_opt = Z.train_zero("gpt", data, rank, **opts, offload_optimizer="cpu", offload_param="cpu")
    same = all(torch.equal(a, b) for a, b in zip(got, _params(cpu_model, cpu_opt)))
    cpu_opt.close()
    return {"same_as_cpu": same}


def nvme_accounting(rank, world):
    """The host buffers are exactly buffer_count x 12 bytes x sub-group (and no master or Adam state is held
    in memory); the file holds two copies of the state."""
    out = {}
    for stage, bc in ((1, 2), (2, 3), (3, 4)):
        model = wide()
        opts = dict(S3) if stage == 3 else dict(stage=stage)
        opt = ZeroOptimizer(model, lr=1e-3, bucket_size=2000, **opts, **_nvme(bc))
        rep = opt.memory_report()
        sub = rep["sub_group_elements"]
        total = sum(u.shard_numel for u in opt.units)
        ranges = opt.store.window_ranges()
        windows = len(ranges)
        # the sub-groups tile the state in order, none larger than a buffer
        tiled = [r[0] for r in ranges] == [0] + [r[1] for r in ranges[:-1]] and ranges[-1][1] == total
        if not tiled or max(b - a for a, b in ranges) > sub:
            raise AssertionError(f"sub-groups {ranges} do not tile [0, {total}) in pieces of <= {sub}")
        out[stage] = {"buffer_bytes": rep["nvme_buffer_bytes"], "expected_buffer_bytes": min(bc, windows) * 12 * sub,
                      "nvme_bytes": rep["nvme_bytes"], "expected_nvme_bytes": windows * 2 * 12 * sub,
                      "host_state": rep["master"] + rep["optimizer_state"], "windows": windows,
                      "by_location": rep["by_location"],
                      "expected_host": rep["model_states"] + rep["nvme_buffer_bytes"],
                      "file_size": os.path.getsize(os.path.join(rep["nvme_path"], "state.bin")),
                      "file_mode": oct(os.stat(os.path.join(rep["nvme_path"], "state.bin")).st_mode & 0o777),
                      "dir_mode": oct(os.stat(rep["nvme_path"]).st_mode & 0o777)}
        opt.close()
    return out


def _shared_dir(rank):
    """One temporary folder for every rank (rank 0 makes it)."""
    made = [_fresh_dir() if rank == 0 else None]
    dist.broadcast_object_list(made, src=0)
    return made[0]


def nvme_checkpoint_resume(rank, world):
    """Save under NVMe offload, resume under NVMe offload and in memory: both equal the uninterrupted run."""
    data = Z.batches("wide", world, 6)
    straight, sopt = Z.train_zero("wide", data, rank, stage=2, bucket_size=2000, **_nvme(2))
    want = _params(straight, sopt)
    sopt.close()
    first, fopt = Z.train_zero("wide", data[:3], rank, stage=2, bucket_size=2000, **_nvme(2))
    ckpt = _shared_dir(rank)
    fopt.save_checkpoint(ckpt)
    fopt.close()
    out = {}
    for name, opts in (("nvme", _nvme(3)), ("memory", {})):
        model = wide()
        opt = ZeroOptimizer(model, lr=1e-3, weight_decay=0.01, stage=2, bucket_size=2000, comm_timeout_s=60, **opts)
        opt.load_checkpoint(ckpt)
        model, opt = Z.train_zero("wide", data, rank, model=model, opt=opt, start=3)
        out[name] = all(torch.equal(a, b) for a, b in zip(_params(model, opt), want))
        opt.close()
    return out


def _sh(*cmd):
    return subprocess.run(list(cmd), capture_output=True, text=True)


def nvme_disk_fails_mid_run(rank, world):
    """Rank 1's nvme_path is a small tmpfs. Filled up by others after construction, it still trains (the
    file was reserved). Remounted read-only, the step raises NVMeStateError on both ranks naming rank 1 and
    changes nothing; remounted read-write, step() again redoes the step, and the run ends equal to an
    uninterrupted one."""
    mnt = tempfile.mkdtemp(prefix="zc-tmpfs-") if rank == 1 else None
    reason = None
    if rank == 1:
        if os.geteuid() != 0:
            reason = "needs root to mount a tmpfs"
        else:
            done = _sh("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mnt)
            reason = None if done.returncode == 0 else f"cannot mount a tmpfs here ({done.stderr.strip()})"
    reasons = [None, None]
    dist.all_gather_object(reasons, reason)
    if any(reasons):
        if rank == 1:
            os.rmdir(mnt)
        return {"skipped": next(r for r in reasons if r)}
    try:
        data = Z.batches("wide", world, 6)
        model = wide()
        opt = ZeroOptimizer(model, lr=1e-3, weight_decay=0.01, stage=2, bucket_size=2000, comm_timeout_s=60,
                            **_nvme(2, path=mnt))
        events = {}

        def train(t):
            x, y = data[t][0]
            opt.backward(Z.loss_of("wide", model(Z.local(x, rank)), Z.local(y, rank)))
            opt.step()

        if rank == 1:                         # somebody else fills the disk: the reserved file is untouched
            _sh("dd", "if=/dev/zero", f"of={mnt}/filler", "bs=4k")
            st = os.statvfs(mnt)
            events["free_after_fill"] = st.f_bavail * st.f_frsize
        dist.barrier()
        for t in range(3):
            train(t)
            opt.zero_grad()
        opt.zero_grad()
        before = _params(model, opt)
        state_before = opt.state_dict()["params"]
        if rank == 1:
            done = _sh("mount", "-o", "remount,ro", mnt)
            if done.returncode != 0:
                raise AssertionError(f"remount read-only failed: {done.stderr}")
        dist.barrier()
        try:
            train(3)
            events["raised"] = None
        except NVMeStateError as e:
            events["raised"], events["ranks"] = str(e), e.ranks
        after = _params(model, opt)
        state_after = opt.state_dict()["params"]
        events["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, after)) and all(
            torch.equal(state_before[n][k], state_after[n][k]) for n in state_before
            for k in ("master", "exp_avg", "exp_avg_sq"))
        events["finite"] = all(bool(torch.isfinite(a).all()) for a in after)
        events["steps_after_failure"] = opt.global_steps
        if rank == 1:
            _sh("mount", "-o", "remount,rw", mnt)
        dist.barrier()
        opt.step()                            # the same gradients, now written
        opt.zero_grad()
        for t in range(4, 6):
            train(t)
            opt.zero_grad()
        events["steps"] = opt.global_steps
        got = _params(model, opt)
        opt.close()
        ref_model, ref_opt = Z.train_zero("wide", data, rank, stage=2, bucket_size=2000, **_nvme(2))
        events["same_as_uninterrupted"] = all(torch.equal(a, b) for a, b in zip(got, _params(ref_model, ref_opt)))
        ref_opt.close()
        return events
    finally:
        if rank == 1:
            _sh("umount", "-l", mnt)
            os.rmdir(mnt)


def nvme_path_checked_on_every_rank(rank, world):
    """A missing nvme_path on rank 1 only: both ranks raise the same error naming rank 1 and the path."""
    path = _fresh_dir() if rank == 0 else "/nonexistent/zerocore-nvme"
    try:
        ZeroOptimizer(wide(), lr=1e-3, stage=2, offload_optimizer="nvme", nvme_path=path, comm_timeout_s=60)
    except OSError as e:
        return {"message": str(e)}
    return {"message": None}


PARITY = ["nvme_wide_s1", "nvme_wide_s2", "nvme_gpt_s2", "nvme_wide_s3", "nvme_gpt_s3"]
PARAMS = ["nvme_params_gpt_s3", "nvme_params_wide_s3", "nvme_params_ckpt_s3"]
SCENARIOS_BY_WORLD = {2: PARITY + PARAMS + ["nvme_bf16_s2", "nvme_params_bf16_s3", "nvme_accounting", "nvme_checkpoint_resume",
                                   "nvme_disk_fails_mid_run", "nvme_path_checked_on_every_rank"]}
