"""The optimizer's per-parameter state dict: build it, validate a loaded one, write it - all or nothing.

[Note: atomic load]
load_state_dict() first validates every entry this rank needs (format, shapes, the dtype and length of every
tensor, ranges inside the parameter, full coverage of what this rank owns, step counts, groups, loss scaler)
without writing anything, then every rank tells the others whether it passed (through the phase agreement, see
phases.py), and only if every rank passed does any rank write. So a bad checkpoint raises the same error on
every rank, naming the rank, the parameter and the problem, and changes nothing anywhere.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch

FORMAT = "zerocore.zero/1"
STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")
TOP_KEYS = ("params", "param_groups", "loss_scaler", "global_steps", "skipped_steps")
GROUP_KEYS = {"lr", "betas", "eps", "weight_decay"}


def agree_to_load(sources: Sequence[dict], problems: List[str], units, num_groups: int, phases, comm) -> None:
    """Validate `sources` (unless this rank already found `problems`, e.g. reading a checkpoint), then agree
    with every rank ([Note: atomic load]): raises the same ValueError on every rank unless all can load the
    same checkpoint step."""
    from .phases import Phase
    if not problems:
        try:
            problems = validate(sources, units, num_groups) if sources else ["no state dict was given"]
        except Exception as e:  # noqa: BLE001 - a malformed dict must still reach the agreement below
            problems = [f"the state dict is malformed ({type(e).__name__}: {e})"]
    where = [float(len(problems)), 0.0, 0.0]
    if not problems:                     # which checkpoint: the same on every rank, or a mix of runs
        where[1:] = [float(sources[0]["global_steps"]), float(sources[0]["loss_scaler"]["scale"])]
    rows = phases.exchange(Phase.LOAD, torch.tensor(where)).cpu()
    if not rows[:, 0].any() and not (rows[:, 1:3] == rows[0, 1:3]).all():
        problems = ["the ranks were given checkpoints of different steps: (global_steps, loss scale) per "
                    f"rank {[tuple(r) for r in rows[:, 1:3].tolist()]}"]
        rows[:, 0] = 1.0
    if rows[:, 0].any():
        everyone = comm.all_gather_object(problems[:3], "the load_state_dict problems of every rank")
        lines = [f"rank {r}: {p}" for r, ps in enumerate(everyone) for p in ps]
        raise ValueError("zerocore: the checkpoint was refused on every rank and nothing was loaded "
                         "(load_state_dict changed nothing):\n  " + "\n  ".join(lines))


def load_groups(param_groups: List[dict], source: dict) -> None:
    """The saved hyperparameters of every group (after agree_to_load)."""
    for g, sg in zip(param_groups, source["param_groups"]):
        g.update({k: (tuple(v) if k == "betas" else v) for k, v in sg.items() if k not in ("param_names", "params")})


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate(sources: Sequence[dict], units, num_groups: int) -> List[str]:
    """Everything wrong with loading `sources` into these units (empty when it can be loaded)."""
    problems: List[str] = []
    for i, sd in enumerate(sources):
        if not isinstance(sd, dict) or sd.get("format") != FORMAT:
            got = sd.get("format") if isinstance(sd, dict) else type(sd).__name__
            return [f"state dict #{i} is not a ZeroOptimizer state dict (format {got!r}, want {FORMAT!r})"]
        missing = [k for k in TOP_KEYS if k not in sd]
        if missing:
            return [f"state dict #{i} lacks {missing}: it is truncated or not from ZeroOptimizer.state_dict()"]
    for u in units:
        for s in u.slots:
            entries = [(i, sd["params"].get(s.name)) for i, sd in enumerate(sources)]
            entries = [(i, e) for i, e in entries if e is not None]
            if not entries:
                problems.append(f"parameter {s.name!r}: the checkpoint has no entry for it")
                continue
            spans = []
            for i, e in entries:
                where = f"parameter {s.name!r} (state dict #{i})"
                bad = _entry_problem(e, s)
                if bad:
                    problems.append(f"{where}: {bad}")
                else:
                    spans.append((e["start"], e["end"]))
            if len(spans) == len(entries):
                covered = _covered(spans, s.own_start, s.own_end)
                if covered < s.owned_numel:
                    problems.append(f"parameter {s.name!r}: the given state dict(s) cover {covered} of the "
                                    f"{s.owned_numel} elements this rank owns; pass every rank's state dict")
    groups = sources[0]["param_groups"]
    if not isinstance(groups, (list, tuple)) or len(groups) != num_groups:
        n = len(groups) if isinstance(groups, (list, tuple)) else type(groups).__name__
        problems.append(f"the checkpoint has {n} param groups, the optimizer has {num_groups}")
    else:
        for gi, g in enumerate(groups):
            for k in GROUP_KEYS & set(g):
                v = g[k]
                ok = all(isinstance(x, (int, float)) and math.isfinite(x) for x in (v if k == "betas" else [v]))
                if not ok:
                    problems.append(f"param group {gi}: {k}={v!r} is not a finite number")
    scaler = sources[0]["loss_scaler"]
    if not isinstance(scaler, dict) or not isinstance(scaler.get("scale"), (int, float)) or \
            not (math.isfinite(scaler["scale"]) and scaler["scale"] > 0):
        problems.append(f"loss_scaler {scaler!r} has no positive finite 'scale'")
    for k in ("global_steps", "skipped_steps"):
        if not _is_int(sources[0][k]) or sources[0][k] < 0:
            problems.append(f"{k}={sources[0][k]!r} is not a non-negative integer")
    return problems


def _entry_problem(e, s) -> str:
    if not isinstance(e, dict):
        return f"entry is a {type(e).__name__}, not a dict"
    if tuple(e.get("shape", ())) != tuple(s.shape):
        return f"checkpoint shape {tuple(e.get('shape', ()))} != model shape {tuple(s.shape)}"
    lo, hi = e.get("start"), e.get("end")
    if not (_is_int(lo) and _is_int(hi) and 0 <= lo <= hi <= s.numel):
        return f"range [{lo!r}, {hi!r}) is not inside the parameter's {s.numel} elements"
    if not _is_int(e.get("step")) or e["step"] < 0:
        return f"step {e.get('step')!r} is not a non-negative integer"
    for k in STATE_KEYS:
        t = e.get(k)
        if not isinstance(t, torch.Tensor):
            return f"{k} is missing (got {type(t).__name__})"
        if t.dtype != torch.float32:
            return f"{k} has dtype {t.dtype}, expected torch.float32"
        if t.dim() != 1 or t.numel() != hi - lo:
            return f"{k} has shape {tuple(t.shape)}, expected ({hi - lo},) for the range [{lo}, {hi})"
    return ""


def _covered(spans, lo: int, hi: int) -> int:
    """How many elements of [lo, hi) the union of `spans` covers."""
    covered, at = 0, lo
    for a, b in sorted(spans):
        a, b = max(a, at), min(b, hi)
        if a < b:
            covered += b - a
            at = b
    return covered


def build(units, store, param_steps: List[int], param_groups: List[dict], header: dict) -> dict:
    """This rank's state dict: per parameter its full shape, the [start, end) of the flattened parameter this
    rank owns, and for that range its fp32 master, exp_avg, exp_avg_sq and step count (host tensors)."""
    params = {}
    for u in units:
        for s in u.slots:
            params[s.name] = {"shape": tuple(s.shape), "start": s.own_start, "end": s.own_end,
                              "step": param_steps[s.index]}
            for key in STATE_KEYS:
                params[s.name][key] = torch.empty(s.owned_numel, dtype=torch.float32)
    with store.read() as windows:
        for w in windows:
            for s, u, a, b, ulo, wlo in _owned_parts(units, store, w):
                e, n = params[s.name], b - a
                e["master"][a:b].copy_(store.master_values(w, u, ulo, ulo + n))
                e["exp_avg"][a:b].copy_(w.exp_avg[wlo:wlo + n])
                e["exp_avg_sq"][a:b].copy_(w.exp_avg_sq[wlo:wlo + n])
    groups = [{k: v for k, v in g.items() if k != "params"} for g in param_groups]
    out = {"format": FORMAT, "world_size": header["world_size"], "rank": header["rank"], "stage": header["stage"],
           "params": params, "param_groups": groups}
    out.update((k, header[k]) for k in ("loss_scaler", "global_steps", "skipped_steps"))
    return out


def _owned_parts(units, store, w):
    """Every owned slot's part inside window w: (slot, unit, [a, b) of the slot's owned range, the part's
    position in the unit's shard, and in the window)."""
    for u in units:
        off = store.offsets[u.index]
        for s in u.owned_slots():
            lo = off + s.shard_pos
            cut = w.clip(lo, lo + s.owned_numel)
            if cut is not None:
                yield s, u, cut[0] - lo, cut[1] - lo, cut[0] - off, cut[0] - w.start


@torch.no_grad()
def write(sources: Sequence[dict], units, store) -> List[int]:
    """Copy validated sources (validate() found nothing) into this rank's ranges: masters, Adam state and the
    parameters' own shards (gathered by the caller afterwards); returns every parameter's step count."""
    steps = {}
    for u in units:
        for s in u.slots:
            steps[s.index] = int(next(e for e in (sd["params"].get(s.name) for sd in sources)
                                      if e is not None)["step"])
    with store.update() as windows:
        for w in windows:
            for s, u, a, b, ulo, wlo in _owned_parts(units, store, w):
                for e in (sd["params"].get(s.name) for sd in sources):
                    if e is None:
                        continue
                    ea, eb = max(s.own_start + a, e["start"]), min(s.own_start + b, e["end"])
                    if ea >= eb:
                        continue
                    skip = ea - s.own_start - a                  # where ea lies in this part
                    src, dst = slice(ea - e["start"], eb - e["start"]), slice(wlo + skip, wlo + skip + eb - ea)
                    if w.master is not None:
                        w.master[dst].copy_(e["master"][src])
                    w.exp_avg[dst].copy_(e["exp_avg"][src])
                    w.exp_avg_sq[dst].copy_(e["exp_avg_sq"][src])
                    shard = store.param_shard(u)          # (None: the master just written is the shard)
                    if shard is not None:
                        shard[ulo + skip:ulo + skip + eb - ea].copy_(e["master"][src])
    return [steps[i] for i in range(len(steps))]


