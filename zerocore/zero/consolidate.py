"""Consolidate a sharded checkpoint into the model's full state dict, one parameter at a time.

[Note: streaming consolidation]
`zero_to_fp32`-style tools that load every rank's shards first need more host memory than the model (DeepSpeed
users report over 1 TB for an 80B model). Here each parameter is assembled from the ranges the rank files hold
(read with pread into a buffer of that size: safetensors' own reader memory-maps the file, and every page
it touches would stay in this process's resident set until the file is closed), cast, and either kept
(out=None) or written straight
to its place in the output file: a safetensors header only needs every tensor's dtype, shape and offset, which
the manifest gives before any data is read, so the writer emits the header first and then the tensors in order.
Host memory stays about one parameter plus the reader's and the file's buffers, whatever the model's size.
Output files follow Hugging Face's layout: `model.safetensors`, or `model-0000k-of-0000n.safetensors` files of at
most `max_shard_bytes` each plus `model.safetensors.index.json` (metadata.total_size and weight_map).

>>> # state = zerocore.consolidate("ckpt")                         # {name: tensor}, keys of model.state_dict()
>>> # zerocore.consolidate("ckpt", out="hf_model", dtype=torch.bfloat16)
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch

from .checkpoint import EXTRA, CheckpointError, _crc, _read_manifest, check_tag, latest_tag

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}
DEFAULT_MAX_SHARD_BYTES = 5 * 10 ** 9


class _TensorFile:
    """Reads single tensors of a safetensors file with pread (see the note for why not mmap)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            head = os.pread(self.fd, 8, 0)
            if len(head) != 8:
                raise CheckpointError(f"{path} is too short to be a safetensors file")
            n = struct.unpack("<Q", head)[0]
            raw = os.pread(self.fd, n, 8)
            self.header = json.loads(raw)
            self.base = 8 + n
        except (ValueError, OSError, struct.error) as e:
            os.close(self.fd)
            raise CheckpointError(f"{path} has no readable safetensors header ({e}): the file is damaged") from None
        self.header.pop("__metadata__", None)

    def keys(self):
        return list(self.header)

    def meta(self, key: str) -> Tuple[tuple, torch.dtype]:
        e = self.header[key]
        return tuple(e["shape"]), _FROM_ST[e["dtype"]]

    def get(self, key: str) -> torch.Tensor:
        e = self.header[key]
        lo, hi = e["data_offsets"]
        shape, dtype = self.meta(key)
        buf = bytearray(hi - lo)
        got = os.preadv(self.fd, [buf], self.base + lo) if hi > lo else 0
        if got != hi - lo:
            raise CheckpointError(f"{self.path}: {key} is cut short ({got} of {hi - lo} bytes): the file is truncated")
        return torch.frombuffer(buf, dtype=dtype).view(shape) if hi > lo else torch.empty(shape, dtype=dtype)

    def close(self) -> None:
        os.close(self.fd)


def _plan(folder: Path, manifest: dict, dtype: torch.dtype) -> List[Tuple[str, tuple, torch.dtype, object]]:
    """(key, shape, output dtype, source) for every entry of the model's state dict, in its order. source is
    the trainable parameter's name, or ("extra", key) for frozen parameters and buffers."""
    shapes = {}
    for f in manifest["files"]:
        for name, e in f["params"].items():
            shapes[name] = tuple(e["shape"])
    extra_meta = {}
    if (folder / EXTRA).exists():
        r = _TensorFile(folder / EXTRA)
        extra_meta = {k: r.meta(k) for k in r.keys()}
        r.close()
    aliases = manifest.get("aliases", {})
    plan = []
    for key in manifest.get("state_dict_keys") or list(shapes) + list(extra_meta):
        name = aliases.get(key, key)
        if name in shapes:
            plan.append((key, shapes[name], dtype, name))
        elif key in extra_meta:
            shape, kdtype = extra_meta[key]
            plan.append((key, shape, dtype if kdtype.is_floating_point else kdtype, ("extra", key)))
        else:
            raise CheckpointError(f"{folder / 'manifest.json'} lists state dict key {key!r}, which no file holds")
    return plan


def _tensors(folder: Path, manifest: dict, plan) -> Iterator[torch.Tensor]:
    """Each planned tensor in order, assembled from the rank files' ranges and checked against the manifest."""
    readers = {f["file"]: _TensorFile(folder / f["file"]) for f in manifest["files"]}
    extra = _TensorFile(folder / EXTRA) if (folder / EXTRA).exists() else None
    holders: Dict[str, list] = {}
    for f in manifest["files"]:
        for name, e in f["params"].items():
            if e["end"] > e["start"]:
                holders.setdefault(name, []).append((f["file"], e))
    try:
        yield from _assemble(folder, plan, readers, extra, holders)
    finally:
        for r in list(readers.values()) + ([extra] if extra is not None else []):
            r.close()


def _assemble(folder: Path, plan, readers, extra, holders) -> Iterator[torch.Tensor]:
    for key, shape, dtype, source in plan:
        if isinstance(source, tuple):
            yield extra.get(source[1]).to(dtype)
            continue
        numel = 1
        for d in shape:
            numel *= d
        full = torch.empty(numel, dtype=torch.float32)
        covered = 0
        for fname, e in holders.get(source, []):
            part = readers[fname].get(f"{source}/master")
            if _crc(part) != e["crc32"]["master"]:
                raise CheckpointError(f"{folder / fname}: {source}/master fails its crc32 check: the file is corrupt")
            full[e["start"]:e["end"]] = part
            del part                           # one part buffer at a time
            covered += e["end"] - e["start"]
        if covered != numel:
            raise CheckpointError(f"the rank files of {folder} hold {covered} of the {numel} elements of {source!r}")
        out = full.view(shape).to(dtype)
        del full
        yield out
        del out


def consolidate(ckpt_dir, out: Union[None, str, os.PathLike] = None, dtype: torch.dtype = torch.float32,
                tag: Optional[str] = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
    """The full model state dict of a checkpoint written by ZeroOptimizer.save_checkpoint (any world size).

    out=None returns {key: tensor} with the keys of the original model.state_dict(); with `out`, writes
    safetensors files into that folder instead (sharded by max_shard_bytes, with Hugging Face's index file) and
    returns the list of files. Floating-point tensors are cast to `dtype` (the fp32 masters by default).
    """
    tag = check_tag(tag) if tag is not None else latest_tag(ckpt_dir)
    folder = Path(ckpt_dir) / tag
    manifest = _read_manifest(folder)
    plan = _plan(folder, manifest, dtype)
    if out is None:
        return {key: t for (key, *_), t in zip(plan, _tensors(folder, manifest, plan))}
    return _write_shards(Path(out), plan, _tensors(folder, manifest, plan), max_shard_bytes)


def _nbytes(shape, dtype) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n


def _write_shards(out: Path, plan, tensors: Iterator[torch.Tensor], max_shard_bytes: int) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], [], 0
    for entry in plan:
        nbytes = _nbytes(entry[1], entry[2])
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    if current or not shards:
        shards.append(current)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, entries in zip(names, shards):
        _write_one(out / name, entries, tensors)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(e[1], e[2]) for e in plan)},
                 "weight_map": {e[0]: n for n, entries in zip(names, shards) for e in entries}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return [out / n for n in names]


def _write_one(path: Path, entries, tensors: Iterator[torch.Tensor]) -> None:
    """A safetensors file written header first, then each tensor as it is assembled (see the note)."""
    header, at = {"__metadata__": {"format": "pt"}}, 0
    for key, shape, dtype, _ in entries:
        n = _nbytes(shape, dtype)
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                       # the data starts 8-byte aligned
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _ in entries:
            t = next(tensors).contiguous()
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            del t                              # before the next one is assembled
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

