"""Sharded checkpoints on disk: crash-safe save, load at any world size, nothing in them can run code.

[Note: checkpoint layout]
    CKPT_DIR/latest                          the tag of the newest complete checkpoint (written last)
    CKPT_DIR/TAG/manifest.json               world size, stage, zerocore version, optimizer hyperparameters and
                                             counters, and per rank file: its size, and per parameter the full
                                             shape, the [start, end) of the flattened parameter it holds, the
                                             step count and a crc32 of each tensor
    CKPT_DIR/TAG/rank00000-of-00002.safetensors   that rank's fp32 master, exp_avg and exp_avg_sq per parameter
    CKPT_DIR/TAG/model_extra.safetensors     the model's frozen parameters and buffers (rank 0)
    CKPT_DIR/TAG/client_state.pt             client_state and the lr scheduler's state (torch.save; loaded with
                                             weights_only=True, so it holds tensors and plain Python data only)
Every rank writes into a staging folder `.TAG.partial-UID` (each file written, fsynced and closed), the ranks
agree that all writes succeeded, rank 0 writes the manifest, renames the folder to TAG and only then replaces
`latest`. A crash or a full disk at any point leaves the previous checkpoints and `latest` as they were; a staging
folder left by a crash is never read. Loading builds, for each rank, the ranges it owns from whichever files hold
them (so any world size and stage 1, 2 or 3 load without conversion), checks each tensor it reads against the
manifest's crc32, and hands them to load_state_dict(), whose cross-rank agreement makes the load all or nothing.
"""
from __future__ import annotations

import errno
import io
import json
import os
import re
import secrets
import shutil
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

MANIFEST = "manifest.json"
LATEST = "latest"
EXTRA = "model_extra.safetensors"
CLIENT = "client_state.pt"
FORMAT = "zerocore.checkpoint/1"
STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read: it names the file and what is wrong."""


def check_tag(tag: str) -> str:
    """A tag is one plain folder name: letters, digits, '.', '_', '-' (no '/', no '..', not absolute), and not
    one of the names the checkpoint folder uses itself."""
    if not isinstance(tag, str) or not _TAG.fullmatch(tag) or ".." in tag:
        raise ValueError(f"checkpoint tag {tag!r} is not a plain folder name: use letters, digits, '.', '_' and "
                         "'-' (at most 128, starting with a letter or digit; no '/', '..' or absolute paths)")
    if tag in (LATEST, MANIFEST):
        raise ValueError(f"checkpoint tag {tag!r} is reserved (the checkpoint folder's own file): pick another")
    return tag


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):   # file systems that cannot sync folders
            raise
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_safetensors(path: Path, tensors: Dict[str, torch.Tensor]) -> int:
    """Write, fsync and close; returns the file's size."""
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    _fsync_file(path)
    return path.stat().st_size


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def rank_file(rank: int, world: int) -> str:
    return f"rank{rank:05d}-of-{world:05d}.safetensors"


# --------------------------------------------------------------------------------------------------------- save
@dataclass
class PendingSave:
    """One save between its start (collective: the tag; this rank's shards copied to host memory) and its
    commit (collective: every rank wrote; rank 0's manifest, rename and `latest`). In between its files are
    written, in a background thread for async_save ([Note: async save])."""
    root: Path
    tag: str
    staging: Path
    final: Path
    sd: Optional[dict] = None
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    extra: Dict[str, torch.Tensor] = field(default_factory=dict)       # rank 0: frozen parameters, buffers
    client: Optional[bytes] = None                                     # rank 0: client_state.pt's bytes
    info: dict = field(default_factory=dict)
    error: Optional[str] = None
    thread: Optional[threading.Thread] = None


def save(opt, ckpt_dir, tag: Optional[str] = None, client_state=None, lr_scheduler=None,
         async_save: bool = False) -> Path:
    """ZeroOptimizer.save_checkpoint (see there). Every rank must call it; returns the checkpoint's folder.

    [Note: async save]
    With async_save the call returns once this rank's shards (and, on rank 0, the frozen parameters, buffers
    and the serialized client state) are copies in host memory; a thread writes and fsyncs the files while
    training goes on. The commit needs every rank (collectives), so it happens at the next save_checkpoint,
    load_checkpoint, wait_for_checkpoint() or close() (the exit hook too): until then the checkpoint is a
    staging folder and `latest` names the previous one, so a crash in between loses only this checkpoint. A
    failure in the background raises at that next call, on every rank, naming the checkpoint."""
    finish_pending(opt)
    pending = _start(opt, ckpt_dir, tag, client_state, lr_scheduler)
    # With shard groups the replicas hold the same shards: the first shard group writes them, one file per
    # shard ([Note: shard groups] in collectives.py).
    comm = opt.comm
    if async_save:
        # A save that cannot start on some rank (the tag exists, a copy failed) fails now, on every rank.
        if any(comm.all_gather_object(pending.error, "whether every rank could start the checkpoint")):
            return _commit(opt, pending)
        if _writes(opt):
            pending.thread = threading.Thread(target=_write, args=(comm.shard_rank, comm.shard_size, pending),
                                              name=f"zerocore-save-{pending.tag}", daemon=True)
            pending.thread.start()
        opt._pending_save = pending       # the commit is every rank's, at the next call ([Note: async save])
        return pending.final
    if pending.error is None and _writes(opt):
        _write(comm.shard_rank, comm.shard_size, pending)
    return _commit(opt, pending)


def _writes(opt) -> bool:
    """Whether this rank writes its shards (the first replica of each shard does)."""
    return opt.comm.replica_index == 0


def finish_pending(opt) -> None:
    """Wait for an async save's files and commit it (every rank calls it at the same point); raises a
    CheckpointError naming the checkpoint if it failed."""
    pending = getattr(opt, "_pending_save", None)
    if pending is None:
        return
    opt._pending_save = None
    if pending.thread is not None:
        pending.thread.join()
    _commit(opt, pending, background=True)


def _set_aside_orphan(root: Path, tag: str) -> None:
    """A job that died between renaming a checkpoint into place and updating `latest` leaves that checkpoint
    newer than `latest`; a restart resumes from `latest`, redoes those steps and saves the same tag again.
    Such a folder (its step beyond latest's) is renamed `.<tag>.orphaned-<time>`, with a warning, instead of
    failing every restart; any other existing tag still refuses to be overwritten."""
    folder = root / tag
    try:
        if not folder.is_dir() or not (root / LATEST).exists() or latest_tag(root) == tag:
            return
        mine = json.loads((folder / MANIFEST).read_text())["global_steps"]
        latest = json.loads((root / latest_tag(root) / MANIFEST).read_text())["global_steps"]
    except (OSError, ValueError, KeyError, CheckpointError):
        return                            # not clearly an orphan: the usual refusal follows
    if mine > latest:
        aside = root / f".{tag}.orphaned-{int(time.time())}"
        os.rename(folder, aside)
        import warnings
        warnings.warn(f"zerocore: checkpoint {folder} (step {mine}) is newer than the one `latest` names (step "
                      f"{latest}): the job that wrote it stopped before updating `latest`. It was moved to "
                      f"{aside} so this save can go on.", RuntimeWarning)


def _start(opt, ckpt_dir, tag, client_state, lr_scheduler) -> PendingSave:
    root = Path(ckpt_dir)
    tag = tag if tag is not None else f"global_step{opt.global_steps}"
    comm = opt.comm
    if opt.rank == 0:
        _set_aside_orphan(root, tag)      # before the exchange below: the others look for the folder after it
    # Every rank must save the same tag into the same staging folder (rank 0 names it). The tag is checked
    # after this exchange, on every rank alike, so a bad one raises everywhere instead of on one rank.
    plan = comm.all_gather_object({"tag": tag, "uid": secrets.token_hex(6)}, "the checkpoint tag of every rank")
    if any(p["tag"] != tag for p in plan):
        raise ValueError(f"save_checkpoint: the ranks passed different tags {[p['tag'] for p in plan]}")
    check_tag(tag)
    pending = PendingSave(root, tag, root / f".{tag}.partial-{plan[0]['uid']}", root / tag)
    try:
        if pending.final.exists():
            raise FileExistsError(f"checkpoint {pending.final} already exists: pass another tag or remove it first")
        if not _writes(opt):
            return pending
        pending.sd = sd = opt.state_dict()          # host copies: training may change the originals now
        for name, e in sd["params"].items():
            pending.params[name] = {"shape": list(e["shape"]), "start": e["start"], "end": e["end"],
                                    "step": e["step"], "crc32": {}}
            for k in STATE_KEYS:
                pending.tensors[f"{name}/{k}"] = e[k]
        if opt.rank == 0:
            # clone: tied tensors share memory, and training goes on changing the buffers
            pending.extra = {k: v.detach().cpu().clone() for k, v in extra_state(opt.model).items()}
            if client_state is not None or lr_scheduler is not None:
                pending.client = _client_bytes({"client_state": client_state, "lr_scheduler":
                                                lr_scheduler.state_dict() if lr_scheduler is not None else None})
    except Exception as e:  # noqa: BLE001 - reported to every rank at the commit, so all of them raise together
        pending.error = f"rank {opt.rank}: {type(e).__name__}: {e}"
    return pending


def _client_bytes(payload) -> bytes:
    """client_state.pt's bytes, refused now if a load (weights_only=True) would refuse them later."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"client_state holds something torch.load(weights_only=True) cannot load "
                              f"({str(e).splitlines()[0]}): keep it to tensors and plain Python data") from None
    return data


def _write(rank: int, world: int, pending: PendingSave) -> None:
    """Write and fsync this rank's files into the staging folder (no collectives: may run in a thread)."""
    try:
        pending.staging.mkdir(parents=True, exist_ok=True)
        for name, meta in pending.params.items():
            for k in STATE_KEYS:
                meta["crc32"][k] = _crc(pending.tensors[f"{name}/{k}"])
        fname = rank_file(rank, world)
        pending.info = {"file": fname, "size": _write_safetensors(pending.staging / fname, pending.tensors),
                        "params": pending.params}
        if rank == 0:
            extras = {}
            if pending.extra:
                extras[EXTRA] = {"size": _write_safetensors(pending.staging / EXTRA, pending.extra),
                                 "crc32": {k: _crc(v) for k, v in pending.extra.items()},
                                 "dtype": {k: str(v.dtype) for k, v in pending.extra.items()}}
            if pending.client is not None:
                path = pending.staging / CLIENT
                _write_atomically(path, pending.client)
                extras[CLIENT] = {"size": len(pending.client), "crc32": zlib.crc32(pending.client)}
            pending.info["extras"] = extras
    except Exception as e:  # noqa: BLE001 - reported at the commit
        pending.error = f"rank {rank}: {type(e).__name__}: {e}"
    finally:
        pending.tensors = {}           # the host copies are on disk (or lost): let them go
        pending.extra = {}


def _commit(opt, pending: PendingSave, background: bool = False) -> Path:
    import zerocore
    comm, staging, final, root, tag, sd = opt.comm, pending.staging, pending.final, pending.root, pending.tag, \
        pending.sd
    everyone = comm.all_gather_object({"info": pending.info, "error": pending.error},
                                      "the checkpoint files of every rank")
    errors = [x["error"] for x in everyone if x["error"]]
    if not errors and opt.rank == 0:
        renamed = False
        try:
            files = [x["info"] for x in everyone if x["info"]]      # the writers', in rank order
            for f in files:             # every rank wrote into this folder (a shared file system), completely
                got = (staging / f["file"]).stat().st_size if (staging / f["file"]).exists() else None
                if got != f["size"]:
                    raise CheckpointError(f"{staging / f['file']} is {got} bytes on rank 0, its rank wrote "
                                          f"{f['size']}: ckpt_dir must be one folder shared by every rank")
            manifest = {"format": FORMAT, "zerocore_version": zerocore.__version__, "tag": tag,
                        "world_size": opt.comm.shard_size, "stage": opt.config.stage,
                        "param_groups": sd["param_groups"], "loss_scaler": sd["loss_scaler"],
                        "global_steps": sd["global_steps"], "skipped_steps": sd["skipped_steps"],
                        **_state_dict_keys(opt.model), "extras": files[0].pop("extras"),
                        "files": files}
            _write_atomically(staging / MANIFEST, json.dumps(manifest, indent=1).encode())
            os.rename(staging, final)
            renamed = True
            _fsync_dir(root)
            _write_atomically(root / LATEST, tag.encode())
        except Exception as e:  # noqa: BLE001
            errors.append(f"rank 0: {type(e).__name__}: {e}")
            if renamed:                 # 'latest' still names the previous checkpoint: take this one back
                os.rename(final, staging)
    if errors and opt.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)       # never the previous checkpoints
    verdict = comm.all_gather_object(errors, "the outcome of the checkpoint save")[0]
    if verdict:
        how = "in the background (async_save), reported at this call" if background else ""
        raise CheckpointError(f"zerocore: saving checkpoint {tag!r} under {root} failed{' ' + how if how else ''}; "
                              "the previous checkpoints and 'latest' are unchanged:\n  " + "\n  ".join(verdict))
    return final


def _state_dict_keys(model) -> dict:
    """The model's state dict keys in order, and the keys that name a trainable parameter saved under another
    name (tied weights: named_parameters() lists a shared parameter once), for consolidation."""
    names = {id(p): n for n, p in model.named_parameters()}
    full = model.state_dict(keep_vars=True)
    return {"state_dict_keys": list(full),
            "aliases": {k: names[id(v)] for k, v in full.items() if id(v) in names and names[id(v)] != k}}


def extra_state(model) -> Dict[str, torch.Tensor]:
    """The model's state that is not a trainable parameter: frozen parameters and buffers (tensors only)."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict(keep_vars=True).items()
            if isinstance(v, torch.Tensor) and id(v) not in trainable}


# --------------------------------------------------------------------------------------------------------- load
def latest_tag(ckpt_dir) -> str:
    path = Path(ckpt_dir) / LATEST
    try:
        return check_tag(path.read_text().strip())
    except FileNotFoundError:
        raise CheckpointError(f"zerocore: {path} does not exist: no complete checkpoint was saved in {ckpt_dir} "
                              "(pass tag=... to load a specific one)") from None


def read_for_rank(opt, ckpt_dir, tag: Optional[str]):
    """(state-dict sources for this rank's ranges, model extras, client payload, problems) - never raises for
    a bad checkpoint: problems go to load_state_dict's cross-rank agreement so every rank raises together."""
    problems: List[str] = []
    sources, extra, client = [], {}, None
    try:
        tag = check_tag(tag) if tag is not None else latest_tag(ckpt_dir)
        folder = Path(ckpt_dir) / tag
        manifest = _read_manifest(folder)
        problems += _name_differences(opt, manifest)
        if not problems:
            sources = _read_ranges(opt, folder, manifest, problems)
        extras = manifest.get("extras", {})
        extra = _read_extra(opt, folder, extras.get(EXTRA), problems)
        if CLIENT in extras:
            path = folder / CLIENT
            if not path.exists() or path.stat().st_size != extras[CLIENT]["size"] or \
                    _file_crc(path) != extras[CLIENT]["crc32"]:
                problems.append(f"{path} is missing, truncated or corrupt (its size or crc32 differs from the "
                                "manifest's)")
            else:
                try:
                    client = torch.load(path, map_location="cpu", weights_only=True)
                except Exception as e:  # noqa: BLE001
                    problems.append(f"{path} cannot be loaded safely (weights_only=True: only tensors and plain "
                                    f"Python data are allowed; {type(e).__name__}: {str(e).splitlines()[0]})")
    except Exception as e:  # noqa: BLE001 - a missing or malformed checkpoint is a problem like any other
        problems.append(f"{type(e).__name__}: {e}")
    return sources, extra, client, problems


def load(opt, ckpt_dir, tag: Optional[str] = None, lr_scheduler=None):
    """ZeroOptimizer.load_checkpoint: read this rank's ranges, agree with every rank, load all or nothing;
    returns the saved client_state."""
    import copy
    finish_pending(opt)
    sources, extra, client, problems = read_for_rank(opt, ckpt_dir, tag)
    saved_sched = client.get("lr_scheduler") if isinstance(client, dict) else None
    if lr_scheduler is not None and not problems:
        if saved_sched is None:
            problems.append("an lr_scheduler was given but the checkpoint holds no scheduler state")
        else:
            try:                         # on a copy: the load below must stay all or nothing. Shallow:
                # a deep copy would copy the optimizer, its state and the model it references.
                copy.copy(lr_scheduler).load_state_dict(saved_sched)
            except Exception as e:  # noqa: BLE001
                problems.append(f"the checkpoint's lr_scheduler state does not fit the given scheduler "
                                f"({type(e).__name__}: {e})")
    opt._load(sources, problems)
    if extra:
        ours = extra_state(opt.model)
        with torch.no_grad():
            for k, v in extra.items():
                ours[k].copy_(v)
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(saved_sched)
    return client.get("client_state") if isinstance(client, dict) else None


def _read_extra(opt, folder: Path, entry: Optional[dict], problems: List[str]) -> Dict[str, torch.Tensor]:
    """The saved frozen parameters and buffers, checked against the manifest and against the model's."""
    ours = {k: v for k, v in extra_state(opt.model).items()}
    if entry is None:
        if ours:
            problems.append(f"the checkpoint holds none of the model's frozen parameters and buffers "
                            f"{sorted(ours)[:10]}")
        return {}
    path = folder / EXTRA
    if not path.exists() or path.stat().st_size != entry["size"]:
        problems.append(f"{path} is missing or truncated (the manifest says {entry['size']} bytes)")
        return {}
    from safetensors.torch import load_file
    extra = load_file(str(path))
    bad = [k for k, v in extra.items() if _crc(v) != entry["crc32"].get(k)]
    if bad:
        problems.append(f"{path}: {bad[:5]} fail their crc32 check: the file is corrupt")
    missing, unexpected = sorted(set(ours) - set(extra)), sorted(set(extra) - set(ours))
    if missing or unexpected:
        problems.append(f"frozen parameters and buffers differ: the checkpoint lacks {missing[:10]}, the model "
                        f"lacks {unexpected[:10]}")
    for k in sorted(set(ours) & set(extra)):
        if ours[k].shape != extra[k].shape or ours[k].dtype != extra[k].dtype:
            problems.append(f"{k!r}: checkpoint {tuple(extra[k].shape)} {extra[k].dtype} != model "
                            f"{tuple(ours[k].shape)} {ours[k].dtype}")
    return extra


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: {folder} is not a complete zerocore checkpoint")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the file is damaged") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def _name_differences(opt, manifest: dict) -> List[str]:
    saved = {}
    for f in manifest["files"]:
        for name, e in f["params"].items():
            saved[name] = tuple(e["shape"])
    ours = {s.name: tuple(s.shape) for u in opt.units for s in u.slots}
    missing = sorted(set(ours) - set(saved))
    unexpected = sorted(set(saved) - set(ours))
    shapes = sorted(n for n in set(ours) & set(saved) if ours[n] != saved[n])
    out = []
    if missing:
        out.append(f"the checkpoint has no parameter(s) {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        out.append(f"the model has no parameter(s) {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} "
                   "that the checkpoint holds")
    for n in shapes[:10]:
        out.append(f"parameter {n!r}: checkpoint shape {saved[n]} != model shape {ours[n]}")
    return out


def _read_ranges(opt, folder: Path, manifest: dict, problems: List[str]) -> List[dict]:
    """One state-dict source per rank file that holds part of what this rank owns (see [Note: checkpoint
    layout]); every tensor read is checked against the manifest's crc32."""
    from safetensors import safe_open
    owned = {s.name: (s.own_start, s.own_end) for u in opt.units for s in u.slots}
    header = {k: manifest[k] for k in ("param_groups", "loss_scaler", "global_steps", "skipped_steps")}
    sources = []
    for i, f in enumerate(manifest["files"]):
        if f.get("file") != rank_file(i, manifest["world_size"]):
            problems.append(f"{folder / MANIFEST} names file {f.get('file')!r} for rank {i}, expected "
                            f"{rank_file(i, manifest['world_size'])!r}: the manifest is damaged")
            continue
        path = folder / f["file"]
        needed = {n: e for n, e in f["params"].items()
                  if n in owned and max(owned[n][0], e["start"]) < min(owned[n][1], e["end"])}
        if not needed:
            continue
        if not path.exists() or path.stat().st_size != f["size"]:
            size = path.stat().st_size if path.exists() else None
            problems.append(f"{path} is {'missing' if size is None else f'{size} bytes'}, the manifest says "
                            f"{f['size']} bytes: the file is truncated or was replaced")
            continue
        params = {}
        try:
            with safe_open(str(path), framework="pt") as reader:
                for name, e in needed.items():
                    entry = {"shape": tuple(e["shape"]), "start": e["start"], "end": e["end"], "step": e["step"]}
                    for k in STATE_KEYS:
                        t = reader.get_tensor(f"{name}/{k}")
                        if _crc(t) != e["crc32"][k]:
                            problems.append(f"{path}: {name}/{k} fails its crc32 check: the file is corrupt")
                        entry[k] = t
                    params[name] = entry
        except Exception as e:  # noqa: BLE001
            problems.append(f"{path} cannot be read ({type(e).__name__}: {e}): the file is damaged")
            continue
        sources.append(dict(header, format="zerocore.zero/1", params=params))
    # Parameters this rank owns nothing of still need an entry (for their step count): take any file's.
    have = {n for src in sources for n in src["params"]}
    for f in manifest["files"]:
        extra = {n: e for n, e in f["params"].items() if n in owned and n not in have and
                 owned[n][0] == owned[n][1]}
        if extra:
            sources.append(dict(header, format="zerocore.zero/1", params={
                n: {"shape": tuple(e["shape"]), "start": 0, "end": 0, "step": e["step"],
                    **{k: torch.zeros(0, dtype=torch.float32) for k in STATE_KEYS}} for n, e in extra.items()}))
            have |= set(extra)
    return sources
