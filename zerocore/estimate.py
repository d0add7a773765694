"""How much memory a ZeRO run needs per rank, before it starts: `zerocore.estimate_memory` and
`python -m zerocore estimate`.

Two modes:

- A `torch.nn.Module` (on the meta device too, so a 7B model costs nothing to describe): EXACT. The units are
  laid out by the engine's own functions (zerocore/zero/units.py: `build_units` for stages 1 and 2,
  `build_module_units` for stage 3), which read only shapes, so padding to a multiple of the world size and
  stage 3's persistent parameters come out as a real run has them, and every model-state figure equals what
  `ZeroOptimizer.memory_report()` measures for the same options (tests/test_estimate.py checks it on real
  runs). Two figures are upper bounds, not measurements: `pooled_buckets` and stage 3's `peak_gathered_params`
  (see `estimate_memory`).
- A number of parameters (7e9): the ZeRO formula (design.md's table: 16Ψ/N for stage 3 and so on) with no
  padding and no persistent parameters; stage 3's working set from `largest_layer` (default:
  prefetch_bucket_size elements).

>>> import torch
>>> est = estimate_memory(7.5e9, world_size=64, dtype=torch.bfloat16)   # the ZeRO paper's example
>>> [round(r["model_states"] / 1e9, 1) for r in est.rows if r["offload_optimizer"] is None]
[120.0, 31.4, 16.6, 1.9]
>>> with torch.device("meta"):      # nothing is allocated
...     model = torch.nn.Sequential(torch.nn.Linear(1000, 999), torch.nn.Linear(999, 10))
>>> row = estimate_memory(model, world_size=4, stage=2, dtype=torch.bfloat16).rows[0]
>>> row["psi"], row["padding_elements"], row["model_states"]      # 2 x 1_010_000 + 14 x 252_500 bytes
(1009999, 1, 5555000)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import torch

GiB = 1 << 30

# The full table: stage 0 (plain data parallelism, for comparison), then every stage with every offload choice.
_ALL_ROWS = [(0, None, None)] + [(s, o, None) for s in (1, 2) for o in (None, "cpu", "nvme")] + \
    [(3, None, None), (3, "cpu", None), (3, "cpu", "cpu"), (3, "nvme", None), (3, "nvme", "nvme")]


@dataclass
class MemoryEstimate:
    """Per-rank bytes of each (stage, offload) choice. `rows`: one dict per choice (the keys are listed in
    `estimate_memory`); `str(estimate)`: a plain-text table in GiB; `notes`: what the figures assume."""
    rows: List[dict]
    num_params: int
    world_size: int
    dtype: torch.dtype
    device: str
    exact: bool
    notes: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        how = "laid out as ZeroOptimizer would (exact model states)" if self.exact else \
            "the ZeRO formula (no padding)"
        lines = [f"zerocore memory estimate: {self.num_params:,} trainable parameters, {how}; "
                 f"{self.world_size} ranks, {str(self.dtype).replace('torch.', '')} compute on {self.device}",
                 f"{'GiB per rank':<44}{'device':>9}{'host':>9}{'nvme':>9}{'model states':>14}"
                 f"{'gathered':>10}{'buckets':>9}"]
        for r in self.rows:
            label = f"stage {r['stage']}" + (" (no ZeRO)" if r["stage"] == 0 else "")
            if r["offload_optimizer"]:
                label += f", optimizer on {r['offload_optimizer']}"
            if r["offload_param"]:
                label += f", params on {r['offload_param']}"
            lines.append(f"{label:<44}" + "".join(f"{r[k] / GiB:>{w}.2f}" for k, w in (
                ("device", 9), ("host", 9), ("nvme", 9), ("model_states", 14), ("peak_gathered_params", 10),
                ("pooled_buckets", 9))))
        return "\n".join(lines + ["  " + n for n in self.notes])

    def __repr__(self) -> str:
        return str(self)


class _Layout:
    """What the byte counts depend on: element counts of the units one stage family lays out (a real layout
    in exact mode, Ψ without padding in formula mode)."""

    def __init__(self, *, psi, full, shards, persistent_full, partitioned_shards, biggest, working_set,
                 nvme_shards, largest_partitioned_shard, padding):
        self.psi = psi                              # trainable elements
        self.full = full                            # padded elements of every unit (stage 1/2 params, grads)
        self.shards = shards                        # elements of this rank's shards of every unit (state)
        self.persistent_full = persistent_full      # stage 3: padded elements of persistent units (kept whole)
        self.partitioned_shards = partitioned_shards  # stage 3: this rank's shards of partitioned units
        self.biggest = biggest                      # padded elements of the biggest unit (a reduction bucket)
        self.working_set = working_set              # stage 3: bound on gathered elements (padded) at once
        self.nvme_shards = nvme_shards              # [(shard elements, partitioned)] in unit order; None: formula
        self.largest_partitioned_shard = largest_partitioned_shard
        self.padding = padding                      # padding elements over all units


def _stage3_working_set(units, cfg, world_size: int) -> int:
    """Bound on the padded elements of partitioned units gathered at once (what memory_report's
    peak_gathered_params measures), from the rules in zerocore/zero/hooks.py:
      - the model's own units (owner "") stay gathered from its forward until the end of backward;
      - the units of the module running now, and of the modules it runs inside that own units too (their
        hooks gather before and free after the inner module runs): the largest such chain is taken;
      - prefetched units not yet used: fewer than prefetch_bucket_size elements, or one unit alone, and never
        past max_live_parameters; each may carry up to N-1 padding elements.
    A module's units are freed after its forward and once its gradients are all reduced in backward, so nothing
    else stays gathered (a module whose outputs reach no backward hook keeps its units until backward ends:
    not counted)."""
    part = [u for u in units if not u.persistent]
    if not part:
        return 0
    by_owner: Dict[str, int] = {}
    for u in part:
        by_owner[u.owner] = by_owner.get(u.owner, 0) + u.padded_numel
    root = by_owner.pop("", 0)

    def chain(name: str) -> int:
        parts = name.split(".")
        return sum(by_owner.get(".".join(parts[:k]), 0) for k in range(1, len(parts) + 1))
    in_use = max((chain(n) for n in by_owner), default=0)
    rest = sum(by_owner.values()) - in_use
    others = [u for u in part if u.owner != ""]
    allowance = min(max([cfg.prefetch_bucket_size] + [u.numel for u in others]), cfg.max_live_parameters)
    prefetched = min(rest, allowance + (world_size - 1) * len(others))
    return root + in_use + prefetched


def _exact_layouts(model: torch.nn.Module, world_size: int, cfg3) -> Dict[str, _Layout]:
    """Layouts of stages 1/2 and of stage 3 for `model`, by the engine's layout functions (shapes only)."""
    from .zero.param_groups import registering_module
    from .zero.units import build_module_units, build_units
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("estimate_memory: the model has no parameter with requires_grad=True")
    groups = [0] * len(trainable)
    psi = sum(p.numel() for _, p in trainable)
    out = {}
    for family in ("12", "3"):
        if family == "12":
            units = build_units(trainable, groups, bucket_size=cfg3.bucket_size, world_size=world_size, rank=0,
                                module_of=registering_module(model, trainable))
        else:
            units = build_module_units(model, trainable, groups, bucket_size=cfg3.bucket_size,
                                       unit_modules=cfg3.unit_modules,
                                       persistence_threshold=cfg3.param_persistence_threshold,
                                       world_size=world_size, rank=0)
        part = [u for u in units if not u.persistent] if family == "3" else []
        out[family] = _Layout(
            psi=psi, full=sum(u.padded_numel for u in units), shards=sum(u.shard_numel for u in units),
            persistent_full=sum(u.padded_numel for u in units if u.persistent) if family == "3" else 0,
            partitioned_shards=sum(u.shard_numel for u in part),
            biggest=max(u.padded_numel for u in units),
            working_set=_stage3_working_set(units, cfg3, world_size) if family == "3" else 0,
            nvme_shards=[(u.shard_numel, not u.persistent) for u in units],
            largest_partitioned_shard=max((u.shard_numel for u in part), default=None),
            padding=sum(u.padded_numel - u.numel for u in units))
    return out


def _formula_layouts(psi: float, world_size: int, cfg3, largest_layer: Optional[float]) -> Dict[str, _Layout]:
    """Ψ without padding; the biggest unit (a bucket) is the largest layer or bucket_size elements, and stage
    3's working set the largest layer in use plus what prefetch may add (largest layer unknown: assumed to be
    prefetch_bucket_size elements)."""
    shard = psi / world_size
    big = largest_layer if largest_layer else None
    unit3 = big or cfg3.prefetch_bucket_size
    ws = min(psi, unit3 + min(max(cfg3.prefetch_bucket_size, unit3), cfg3.max_live_parameters))
    common = dict(psi=psi, full=psi, shards=shard, padding=0, nvme_shards=None,
                  largest_partitioned_shard=math.ceil(min(psi, unit3) / world_size))
    return {"12": _Layout(persistent_full=0, partitioned_shards=0, biggest=min(psi, max(big or 0, cfg3.bucket_size)),
                          working_set=0, **common),
            "3": _Layout(persistent_full=0, partitioned_shards=shard, biggest=min(psi, unit3), working_set=ws,
                         **common)}


def _nvme(lay: _Layout, cfg, offload_param: Optional[str]) -> dict:
    """NVMe file and host buffer bytes, by the rules of zerocore/zero/swapper.py and param_swap.py."""
    from .zero.swapper import STATE_TENSORS, pack_windows, sub_group_elements
    total = math.ceil(lay.shards)
    sub_group = cfg.sub_group_size
    if offload_param == "nvme":       # unit-sized sub-groups: reading one unit's parameters reads little else
        sub_group = min(sub_group, lay.largest_partitioned_shard or total)
    sub = sub_group_elements(total, sub_group, cfg.buffer_count)
    if lay.nvme_shards is not None:
        ranges = pack_windows([n for n, _ in lay.nvme_shards], sub)
        windows, need, at = len(ranges), 0, 0
        for n, partitioned in lay.nvme_shards:     # the most sub-groups one unit's shard spans
            if partitioned:
                need = max(need, sum(1 for a, b in ranges if a < at + n and at < b))
            at += n
    else:                             # formula: units of the largest layer's size
        windows, s = math.ceil(total / sub), lay.largest_partitioned_shard
        need = 1 if s <= sub else math.ceil(s / sub) + 1
    out = {"nvme_bytes": windows * 2 * STATE_TENSORS * sub * 4,
           "nvme_buffer_bytes": max(1, min(cfg.buffer_count, windows)) * STATE_TENSORS * sub * 4,
           "nvme_param_buffer_bytes": 0}
    if offload_param == "nvme":
        out["nvme_param_buffer_bytes"] = (max(cfg.param_buffer_count, need) if need else 0) * sub * 4
    return out


def _row(lay: _Layout, cfg, stage: int, device: str, frozen_bytes: int) -> dict:
    """Per-rank bytes of one (stage, offload) choice: the same buffers StateStore, GradReducer and Residency
    allocate (zerocore/zero/state_store.py, the reducer and its bucket pool, residency.py), by where they live."""
    compute = cfg.dtype
    reduce_ = cfg.reduce_dtype or compute
    it = torch.finfo(compute).bits // 8
    rit = torch.finfo(reduce_).bits // 8
    mixed = compute != torch.float32
    here = "host" if device == "cpu" else "device"         # where the model computes
    off_opt, off_param = cfg.offload_optimizer, cfg.offload_param
    state_home = "host" if off_opt else here
    host_model_offload = off_opt is not None and device != "cpu"
    loc = {"device": 0, "host": 0, "nvme": 0}
    row = {"stage": stage, "offload_optimizer": off_opt, "offload_param": off_param, "psi": lay.psi,
           "padding_elements": lay.padding}

    def put(key: str, nbytes, where: str) -> None:
        row[key] = row.get(key, 0) + nbytes
        loc[where] += nbytes

    for key in ("params", "persistent_params", "gradients", "master", "optimizer_state", "staging",
                "nvme_buffer_bytes", "nvme_param_buffer_bytes"):
        row[key] = 0
    if stage == 0:                     # plain data parallelism with Adam: 16Ψ mixed / 16Ψ fp32
        put("params", lay.psi * it, here)
        put("gradients", lay.psi * it, here)
        put("master", 4 * lay.psi if mixed else 0, here)
        put("optimizer_state", 8 * lay.psi, here)
        nvme = {"nvme_bytes": 0}
        buckets = gathered = 0
    else:
        if stage < 3:
            put("params", lay.full * it, here)
        else:
            put("params", lay.persistent_full * it, here)
            row["persistent_params"] = lay.persistent_full * it
            if off_param != "nvme":    # with "nvme" the shards are read from the NVMe masters when gathered
                put("params", lay.partitioned_shards * it, "host" if off_param == "cpu" else here)
        # Stage 1 accumulates in full gradient buffers and reduces them in place, unless the reduced shard must
        # go elsewhere (another dtype, the host of a GPU model): then a shard store is kept as in stage 2.
        in_place = stage == 1 and reduce_ == compute and not host_model_offload
        if in_place:
            put("gradients", lay.full * it, here)
        else:
            put("gradients", lay.shards * (4 if cfg.gradient_accumulation_steps > 1 else rit), state_home)
            if stage == 1:             # autograd's full gradients, until the window's last backward reduces them
                put("gradients", lay.psi * it, here)
        if off_opt != "nvme":
            put("master", lay.shards * 4 if (mixed or host_model_offload) else 0, state_home)
            put("optimizer_state", 8 * lay.shards, state_home)
        put("staging", lay.shards * it if (host_model_offload and mixed) else 0, "host")
        nvme = {"nvme_bytes": 0}
        if off_opt == "nvme":
            nvme = _nvme(lay, cfg, off_param)
            put("nvme_buffer_bytes", nvme["nvme_buffer_bytes"], "host")
            put("nvme_param_buffer_bytes", nvme["nvme_param_buffer_bytes"], "host")
            loc["nvme"] += nvme["nvme_bytes"]
        buckets = 0 if in_place else (cfg.inflight_reductions + 1) * lay.biggest * rit
        gathered = lay.working_set * it if stage == 3 else 0
    row["nvme_bytes"] = nvme["nvme_bytes"]
    row["model_states"] = sum(row[k] for k in ("params", "gradients", "master", "optimizer_state", "staging"))
    row["by_location"] = dict(loc)     # as memory_report()'s: model states and NVMe buffers
    row["pooled_buckets"] = buckets
    row["peak_gathered_params"] = gathered
    row["frozen_params"] = frozen_bytes
    row["device"], row["host"], row["nvme"] = loc["device"], loc["host"], loc["nvme"]
    row[here] += buckets + gathered + frozen_bytes
    return row


def estimate_memory(model_or_num_params: Union[torch.nn.Module, int, float], world_size: int,
                    stage: Optional[int] = None, offload_optimizer: Optional[str] = None,
                    offload_param: Optional[str] = None, dtype=None, device: str = "cuda",
                    largest_layer: Optional[float] = None, **zero_options) -> MemoryEstimate:
    """Per-rank bytes on the device, in host memory and on NVMe of a ZeroOptimizer run (Adam/AdamW).

    model_or_num_params: a torch.nn.Module (meta device is fine: only shapes are read) for exact figures, or a
        number of trainable parameters for the ZeRO formula.
    stage: 1, 2 or 3 (0: plain data parallelism, for comparison) gives one row with the given offload; None
        gives every stage, with the given offload, or (no offload given) with every offload choice and a
        stage-0 row: a table.
    offload_optimizer / offload_param: None, "cpu" or "nvme", as ZeroOptimizer's options.
    dtype: the compute dtype (ZeroOptimizer's dtype=; torch.bfloat16 or "bf16" ...); None: the model's (a
        number of parameters: fp32).
    device: "cuda" (a GPU model: offloaded state in host memory) or "cpu" (a model on the host: every byte is
        host memory, and fp32 parameters are their own masters as in a real CPU run).
    largest_layer: number mode only: elements of the largest module, for the reduction bucket and stage 3's
        working set (default: bucket_size for buckets, prefetch_bucket_size for the working set).
    zero_options: ZeroOptimizer's other options (bucket_size, unit_modules, param_persistence_threshold,
        gradient_accumulation_steps, reduce_dtype, prefetch_bucket_size, max_live_parameters,
        max_inflight_reductions, buffer_count, sub_group_size, param_buffer_count, ...), validated as there.

    Each row's keys (bytes): params, persistent_params, gradients, master, optimizer_state, staging and their
    sum model_states, the keys of memory_report() with the same meaning; by_location (device / host / nvme:
    the model states and NVMe host buffers, as memory_report()'s by_location); nvme_bytes (the state file),
    nvme_buffer_bytes, nvme_param_buffer_bytes; pooled_buckets and peak_gathered_params (upper bounds, see
    below); frozen_params (parameters without gradients, kept whole on every rank); and device, host, nvme:
    everything above by where it lives. Plus stage, offload_optimizer, offload_param, psi, padding_elements.
    Not counted: activations, buffers (e.g. BatchNorm statistics), the CUDA context and allocator caches.
    All trainable parameters are taken as one parameter group (ZeroOptimizer's param_groups may split units).

    Exact for a module: every model-state key, by_location and the NVMe figures. Upper bounds:
      - pooled_buckets: (max_inflight_reductions (default 2; stage 3: 1) + 1) x the biggest unit in the reduce dtype, the most the
        bucket pool keeps (0 for stage 1, which reduces in place); a run keeps as many as its backward had live,
        and on gloo a unit whose gradient is reduced directly needs a smaller one.
      - peak_gathered_params (stage 3): the model's own units, the largest chain of nested unit-owning modules,
        and prefetch (max(prefetch_bucket_size, largest unit) elements, at most max_live_parameters). A run's
        memory_report()["peak_gathered_params"] never exceeds it when every unit-owning module's output reaches
        the loss.
      - stage 1 with a shard store (reduce_dtype differs, or optimizer offload of a GPU model): gradients also
        counts autograd's full gradients (Ψ x compute bytes), live from backward until the window's last
        backward reduces them; memory_report() after that backward no longer shows them.

    >>> estimate_memory(1000, world_size=2, stage=3).rows[0]["model_states"]    # 16 bytes x 1000 / 2
    8000.0
    """
    from .zero.config import ZeroConfig, parse_dtype
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be a positive integer")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: use 'cuda' (a GPU model) or 'cpu' (a model on the host)")
    exact = isinstance(model_or_num_params, torch.nn.Module)
    dtype = parse_dtype(dtype, "dtype")
    frozen_bytes = 0
    if exact:
        model = model_or_num_params
        trainable_dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
        if dtype is None and len(trainable_dtypes) > 1:
            raise ValueError(f"estimate_memory: trainable parameters have several dtypes "
                             f"{sorted(map(str, trainable_dtypes))}; pass dtype=... (the compute dtype)")
        # Frozen parameters stay whole on every rank, cast to the compute dtype only when one is given.
        frozen_bytes = sum(p.numel() * (torch.finfo(dtype).bits // 8 if dtype and p.is_floating_point()
                                        else p.element_size())
                           for p in model.parameters() if not p.requires_grad)
        dtype = dtype or (trainable_dtypes.pop() if trainable_dtypes else torch.float32)
    else:
        psi = model_or_num_params
        if isinstance(psi, bool) or not isinstance(psi, (int, float)) or psi < 1 or psi != int(psi):
            raise ValueError(f"estimate_memory: {psi!r} is neither a torch.nn.Module nor a number of parameters")
        dtype = dtype or torch.float32
    if largest_layer is not None and exact:
        raise ValueError("largest_layer is for a number of parameters: a module's units are known")

    if stage is None and offload_optimizer is None and offload_param is None:
        choices = _ALL_ROWS
    else:
        stages = [stage] if stage is not None else ([3] if offload_param else [1, 2, 3])
        choices = [(s, offload_optimizer, offload_param) for s in stages]
    zero_options.setdefault("nvme_path", "<nvme_path>")    # required with "nvme"; never touched here
    configs = []
    for s, off_opt, off_param in choices:
        if s not in (0, 1, 2, 3):
            raise ValueError(f"stage={s!r}: use 0 (no ZeRO, for comparison), 1, 2 or 3")
        if s == 0 and (off_opt or off_param):
            raise ValueError("stage 0 (plain data parallelism) has no offload")
        cfg = ZeroConfig.from_kwargs(stage=max(s, 1), offload_optimizer=off_opt, offload_param=off_param,
                                     dtype=dtype, **zero_options)
        if off_param == "cpu" and device != "cpu" and off_opt is None:
            raise ValueError("offload_param='cpu' on a GPU model needs offload_optimizer='cpu' too (as "
                             "ZeroOptimizer requires)")
        configs.append((s, cfg))
    base = configs[0][1]
    # With shard groups a unit is cut in shard_group_size pieces, not world_size ([Note: shard groups]).
    k = base.shard_group_size or world_size
    if world_size % k:
        raise ValueError(f"shard_group_size={k} must divide world_size={world_size}")
    layouts = _exact_layouts(model, k, base) if exact else _formula_layouts(float(psi), k, base, largest_layer)
    rows = [_row(layouts["3" if s == 3 else "12"], cfg, s, device, frozen_bytes) for s, cfg in configs]
    notes = []
    if any(r["stage"] == 3 for r in rows):
        layer = ")" if exact else "; largest layer: " + (
            f"{largest_layer:.3g} elements)" if largest_layer else "unknown, taken as prefetch_bucket_size)")
        notes.append("gathered: stage 3's parameters gathered at once, a bound (the model's own units, the largest "
                     "unit in use, prefetch_bucket_size elements prefetched" + layer)
    notes.append("buckets: the reduction buckets kept between steps, a bound ((max_inflight_reductions + 1) x "
                 "the biggest unit)")
    notes.append("not counted: activations, module buffers, the CUDA context and allocator caches")
    return MemoryEstimate(rows=rows, num_params=int(layouts["12"].psi), world_size=world_size, dtype=dtype,
                          device=device, exact=exact, notes=notes)


def meta_model(name_or_path: str) -> torch.nn.Module:
    """A Hugging Face transformers model built on the meta device from its config alone (no weights are
    downloaded or allocated): a config.json path (or a folder holding one), or a hub name (needs network, or the
    config in the local cache)."""
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    except ImportError as e:
        raise ImportError(f"--model needs Hugging Face transformers, which is not installed ({e}): "
                          "pip install transformers") from e
    local = os.path.exists(name_or_path)
    if not local and (name_or_path.endswith(".json") or name_or_path.startswith(("/", ".", "~"))):
        raise FileNotFoundError(f"zerocore: no such config file or folder: {name_or_path!r}")
    try:
        try:                          # a hub name whose config is in the local cache needs no network
            cfg = AutoConfig.from_pretrained(name_or_path, local_files_only=not local)
        except OSError:
            if local:
                raise
            cfg = AutoConfig.from_pretrained(name_or_path)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; all mean "no config here"
        where = ("the local file or folder" if local else
                 "the Hugging Face hub (no network? give the path of a local config.json instead)")
        raise RuntimeError(f"zerocore: could not read the model config {name_or_path!r} from {where}: "
                           f"{type(e).__name__}: {e}") from e
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(cfg)
        except ValueError:            # not a causal LM (an encoder, say): the bare model
            return AutoModel.from_config(cfg)


def main(args) -> int:
    """`python -m zerocore estimate` (zerocore/__main__.py parses the arguments)."""
    import sys
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        what = meta_model(args.model) if args.model else args.params
        if not args.model and args.params == int(args.params):
            what = int(args.params)
        est = estimate_memory(what, args.world_size, stage=args.stage, offload_optimizer=args.offload_optimizer,
                              offload_param=args.offload_param, dtype=dtype, device=args.device,
                              largest_layer=args.largest_layer if not args.model else None,
                              **({"shard_group_size": args.shard_group_size} if args.shard_group_size else {}))
    except (ValueError, TypeError, RuntimeError, OSError, ImportError) as e:
        print(f"python -m zerocore estimate: error: {e}", file=sys.stderr)
        return 2
    print(est)
    return 0
