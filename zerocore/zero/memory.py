"""Byte accounting of what a rank holds, the ZeRO formulas it is checked against, and host buffers.

Formulas (Ψ trainable parameters, N ranks; with shard_group_size=k, k in place of N), model-state bytes per rank:
    fp32:   stage 1  8Ψ + 8Ψ/N      (params 4Ψ, grads 4Ψ, Adam m+v 8Ψ/N; the fp32 params are the masters)
            stage 2  4Ψ + 12Ψ/N     (params 4Ψ, reduced grad shard 4Ψ/N, m+v 8Ψ/N)
            stage 3  16Ψ/N          (param shard 4Ψ/N, reduced grad shard 4Ψ/N, m+v 8Ψ/N)
    mixed:  stage 1  4Ψ + 12Ψ/N     (params 2Ψ, grads 2Ψ, fp32 master 4Ψ/N, m+v 8Ψ/N)
            stage 2  2Ψ + 14Ψ/N     (params 2Ψ, reduced grad shard 2Ψ/N, master 4Ψ/N, m+v 8Ψ/N)
            stage 3  16Ψ/N          (param shard 2Ψ/N, reduced grad shard 2Ψ/N, master 4Ψ/N, m+v 8Ψ/N)
Stage 3 adds what is gathered at the time (the working set: at most max_live_parameters elements beyond the
persistent units) and its persistent parameters in full (those of at most param_persistence_threshold
elements): memory_report() lists both.
Stage 2 keeps the reduced grad shard in the reduce dtype when one micro-step makes a step; with
gradient_accumulation_steps > 1 it accumulates in fp32 (so mixed stage 2 then holds 2Ψ + 16Ψ/N).
CPU offload of a GPU model with fp32 params keeps a separate fp32 master copy in host memory (+4Ψ/N); on a
CPU-only model the fp32 params are already host memory and serve as the masters (no extra copy).
"""
from __future__ import annotations

from typing import Iterable, Optional

import warnings

import torch


def host_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A page-aligned host buffer (pinned when CUDA is available) for offloaded state.

    Uses zerocore.io.aligned_empty; if that cannot be used here (its native library failed to build or load),
    falls back to a plain torch.empty (pinned when CUDA is available) and warns once, so offload still works.
    """
    global _warned_fallback
    try:
        from zerocore.io import aligned_empty
        return aligned_empty((numel,), dtype=dtype, pin=True)
    except Exception as e:  # noqa: BLE001 - any failure of the optional native path means: fall back
        if not _warned_fallback:
            warnings.warn(f"zerocore: aligned host buffers unavailable ({e}); offloaded optimizer state uses "
                          "torch.empty instead", RuntimeWarning)
            _warned_fallback = True
        return torch.empty(numel, dtype=dtype, pin_memory=torch.cuda.is_available())


_warned_fallback = False


def _distinct_storages(tensors: Iterable[Optional[torch.Tensor]]):
    """(a tensor, its storage's bytes) once per distinct non-empty storage behind `tensors`."""
    seen = set()
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if key not in seen and st.nbytes() > 0:
            seen.add(key)
            yield t, st.nbytes()


def storage_bytes(tensors: Iterable[Optional[torch.Tensor]]) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    return sum(n for _, n in _distinct_storages(tensors))


def by_location(tensors: Iterable[Optional[torch.Tensor]]) -> dict:
    """Bytes of the distinct storages behind `tensors` by where they live: device (a GPU), host (pinned
    included) and pinned (host memory locked for fast GPU copies)."""
    out = {"device": 0, "host": 0, "pinned": 0}
    for t, n in _distinct_storages(tensors):
        if t.device.type == "cpu":
            out["host"] += n
            if torch.cuda.is_available() and t.is_pinned():
                out["pinned"] += n
        else:
            out["device"] += n
    return out


def formula_bytes(stage: int, mixed: bool, psi: int, world_size: int) -> float:
    """The ZeRO paper's model-state bytes per rank for Adam (see the module docstring)."""
    n = world_size
    if stage == 3:
        return 16 * psi / n
    if mixed:
        return 4 * psi + 12 * psi / n if stage == 1 else 2 * psi + 14 * psi / n
    return 8 * psi + 8 * psi / n if stage == 1 else 4 * psi + 12 * psi / n


def memory_report(units, store, reducer, *, stage: int, mixed: bool, offload: bool, psi: int, world_size: int,
                  host_cache, peak_gathered: int = 0, shard_group_size: Optional[int] = None) -> dict:
    """Bytes a rank holds in parameters, gradients, fp32 masters, Adam state and pooled buckets, measured from
    the live tensors, beside the ZeRO formula for this stage and precision (ZeroOptimizer.memory_report)."""
    report = {
        "params": storage_bytes([u.flat for u in units] + [u.shard for u in units]),
        "gathered_params": storage_bytes(u.flat for u in units if not u.persistent),
        "persistent_params": storage_bytes(u.flat for u in units if u.persistent) if stage == 3 else 0,
        "peak_gathered_params": peak_gathered,
        "gradients": storage_bytes(reducer.held_gradient_tensors()),
        "master": storage_bytes([store.master]),
        "optimizer_state": storage_bytes(store.host_state_tensors()),
        "staging": storage_bytes([store.staging]),
        "pooled_buckets": reducer.pool.free_bytes,
        "host_block_cache": host_cache,
        "psi": psi, "world_size": world_size, "shard_group_size": shard_group_size or world_size,
        "padding_elements": sum(u.padded_numel - u.numel for u in units),
        "stage": stage, "mixed_precision": mixed, "offload": offload,
        "grad_shard_dtype": str(store.grad_store.dtype) if store.grad_store is not None else None,
        "state_home": store.home,
    }
    report.update(store.swap_report())
    report["model_states"] = report["params"] + report["gradients"] + report["master"] + \
        report["optimizer_state"] + report["staging"]
    report["by_location"] = dict(by_location(
        [u.flat for u in units] + [u.shard for u in units] + list(reducer.held_gradient_tensors()) +
        [store.master, store.staging] + store.host_state_tensors() + store.swap_buffers()),
        nvme=report.get("nvme_bytes", 0))
    report["formula"] = formula_bytes(stage, mixed, psi, shard_group_size or world_size)
    report["note"] = ("stage 2 keeps the reduced gradient shard in the reduce dtype when "
                      "gradient_accumulation_steps == 1 and in fp32 when it is > 1; CPU offload of a GPU model "
                      "keeps a separate fp32 master on the host (+4Ψ/N with fp32 params; on a CPU model the fp32 "
                      "params are the masters) and, in stage 1, the reduced gradient shards there too; "
                      "pooled_buckets (not part of the formula or model_states) are "
                      "the reduction slabs kept between steps: at most (max_inflight_reductions + 1) x the "
                      "biggest bucket in the reduce dtype (a unit, or on gloo the part of a unit that is not "
                      "reduced directly), the most that backward has live at once; stage 3: params counts "
                      "the shards, the units gathered at the time (gathered_params) and the persistent units in "
                      "full (persistent_params); peak_gathered_params: the most bytes of partitioned units gathered at "
                      "once so far (the working set); "
                      "host_block_cache: counters of the process's host block cache while this optimizer "
                      "uses it (None: torch's allocator), live_bytes including the buffers above; "
                      "offload_optimizer='nvme': master and optimizer_state are 0 (they live in nvme_path), "
                      "nvme_buffer_bytes the host buffers they pass through (not in model_states), nvme_bytes "
                      "the file (two copies of the state, see [Note: NVMe optimizer state]); by_location: "
                      "the model states and NVMe buffers by where they live (device, host of which pinned, "
                      "nvme)")
    return report
