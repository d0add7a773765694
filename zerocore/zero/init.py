"""ZeroInit: build a model already partitioned, so no rank ever holds all of it.

[Note: partitioned construction]
Inside `with ZeroInit():`, a module's parameters are partitioned as soon as the module is attached to its
parent (torch's global module-registration hook fires after the child's __init__, so its own initialization
has run on full tensors, consuming the random stream exactly as a plain build does): each rank keeps
1/N of each flattened parameter (rank r holds [r*c, (r+1)*c) with c = ceil(numel/N)), and the parameter's data
becomes the placeholder stage 3 uses (full shape and dtype, one NaN cell of its own; see residency.py).
Parameters no parent took (the root model's own) are partitioned when the context exits, in the order their
modules first registered something (the same on every rank: the broadcasts must pair). A parent that
initializes its children's parameters after taking them (`self.apply(_init_weights)`) would write into
placeholders: initialize inside each module's own __init__ instead; ZeroOptimizer raises, naming the
parameter, if a placeholder was written. With sync_module_states (the
default) every parameter is first broadcast from rank 0, so ranks need not share a seed. So a rank holds
about 1/N of the model plus the module being built (the parameters of modules created before their parent,
e.g. in a list comprehension, stay whole until the parent takes them).

ZeroOptimizer then assembles its units from these pieces one unit at a time (gather_full), so the peak stays
1/N of the model plus one unit. The pieces live in a registry keyed weakly by the Parameter, never as
attributes on user tensors, and nothing global is patched beyond the hooks the context registers.

>>> # with zerocore.ZeroInit():
>>> #     model = MyModel()
>>> # opt = ZeroOptimizer(model, stage=3)
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.distributed as dist

from torch.utils.weak import WeakIdKeyDictionary

from .collectives import Collectives
from .residency import is_untouched, placeholder


@dataclass
class Piece:
    """This rank's part of one parameter partitioned by ZeroInit."""
    shard: torch.Tensor        # `chunk` elements (zero padded past the end of the parameter)
    chunk: int
    numel: int
    world_size: int
    placeholder: Optional[torch.Tensor] = None     # what the parameter's data was set to


# Parameter -> Piece for every parameter partitioned by a ZeroInit context and not yet taken by an optimizer
# (keyed by identity: a tensor's == compares elements).
_PIECES = WeakIdKeyDictionary()


def is_partitioned(p: torch.Tensor) -> bool:
    return p in _PIECES


def held_bytes() -> int:
    """Bytes of the pieces ZeroInit holds on this rank (for accounting)."""
    return sum(piece.shard.numel() * piece.shard.element_size() for piece in _PIECES.values())


class ZeroInit:
    """Context manager: build a model partitioned over the ranks (see [Note: partitioned construction]).

    Every rank must build the same model inside it. process_group: the group the optimizer will use (default:
    the default group); sync_module_states: broadcast each parameter from rank 0 before partitioning it;
    host_block_cache: serve large host tensors from zerocore's block cache while building (host_memory.py), as
    ZeroOptimizer does while training: each module's full parameters are freed right after its pieces were
    kept, and glibc's heap would keep those holes (~0.6 GB per rank for a 380M-parameter bf16 model).
    """

    def __init__(self, process_group=None, *, sync_module_states: bool = True, comm_timeout_s: float = 1800.0,
                 host_block_cache: bool = True):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ZeroInit needs torch.distributed: call torch.distributed.init_process_group first")
        self.comm = Collectives(process_group, comm_timeout_s, "scatter_gather")
        self.sync = sync_module_states
        self.host_block_cache = host_block_cache
        self._uses_host_cache = False
        # Modules that registered a parameter or a child, in first-registration order (weakly).
        self._seen: Dict[int, "weakref.ref[torch.nn.Module]"] = {}
        self._handles = []

    def __enter__(self) -> "ZeroInit":
        from torch.nn.modules import module as nn_module
        if self._handles:
            raise RuntimeError("zerocore: this ZeroInit is already active; nest a new ZeroInit() instead")
        self._handles = [nn_module.register_module_module_registration_hook(self._on_child),
                         nn_module.register_module_parameter_registration_hook(self._on_param)]
        if self.host_block_cache:
            from . import host_memory
            self._uses_host_cache = host_memory.acquire()
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        try:
            self._finish(exc)
        finally:
            if self._uses_host_cache:
                from . import host_memory
                host_memory.release()
                self._uses_host_cache = False

    def _finish(self, exc) -> None:
        if exc[0] is None:
            for ref in list(self._seen.values()):    # the root's own parameters, and modules no parent took
                m = ref()
                if m is not None:
                    self._partition_module(m)
        self._seen = {}
        self.comm.settle()

    # ------------------------------------------------------------------------------------------- hooks
    def _remember(self, module) -> None:
        self._seen.setdefault(id(module), weakref.ref(module))

    def _on_param(self, module, name, param):
        if param is not None:
            self._remember(module)

    def _on_child(self, parent, name, child):
        if child is not None:
            self._remember(parent)
            for m in child.modules():
                self._partition_module(m)

    @torch.no_grad()
    def _partition_module(self, module: torch.nn.Module) -> None:
        for name, p in module.named_parameters(recurse=False):
            if p is None or p in _PIECES or p.numel() == 0:
                continue
            data = p.detach()
            if self.sync:
                data = data.contiguous().clone()
                self.comm.broadcast(data, 0, f"ZeroInit of {type(module).__name__}.{name}").wait()
            n, w = data.numel(), self.comm.world_size
            chunk = -(-n // w)
            flat = data.reshape(-1)
            shard = torch.zeros(chunk, dtype=data.dtype, device=data.device)
            lo = min(self.comm.rank * chunk, n)
            hi = min(lo + chunk, n)
            shard[:hi - lo].copy_(flat[lo:hi])
            ph = placeholder(p.shape, p.dtype, p.device)
            _PIECES[p] = Piece(shard, chunk, n, w, ph)
            p.data = ph


@torch.no_grad()
def gather_full(p: torch.nn.Parameter, comm: Collectives) -> Optional[torch.Tensor]:
    """Rebuild a ZeroInit-partitioned parameter's full values (every rank calls it, in the same order) and
    forget its piece; None if `p` was not partitioned by ZeroInit."""
    piece = _PIECES.get(p)
    if piece is None:
        return None
    if piece.world_size != comm.world_size:
        raise ValueError(f"zerocore: a parameter was partitioned by ZeroInit over {piece.world_size} ranks but "
                         f"the optimizer's group has {comm.world_size}: use the same process group for both")
    if p.data_ptr() != piece.placeholder.data_ptr() or not is_untouched(piece.placeholder):
        raise RuntimeError(f"zerocore: a {tuple(p.shape)} parameter built under ZeroInit was written, cast or "
                           "moved after its parent module took it (e.g. self.apply(init_weights) or "
                           "model.half() after construction); its values live in the pieces, so that change "
                           "would be lost. Initialize each module's parameters in its own __init__, and pass "
                           "dtype=... to ZeroOptimizer instead of casting.")
    full = torch.empty(piece.chunk * piece.world_size, dtype=piece.shard.dtype, device=piece.shard.device)
    full[comm.rank * piece.chunk:(comm.rank + 1) * piece.chunk].copy_(piece.shard)
    comm.gather_all(full, piece.chunk, f"a ZeroInit parameter {tuple(p.shape)}", src=piece.shard).wait()
    del _PIECES[p]                      # only now: a failed gather leaves the piece to retry with
    return full[:piece.numel].view(p.shape)


# ------------------------------------------------------------------------------- meta model + saved weights
def _source_reader(source):
    """name -> function(lo, hi) giving the flattened elements [lo, hi) of that tensor, for a state dict, a
    safetensors file, a list of them, or a folder of them (Hugging Face's layout, with or without an index)."""
    import os
    if isinstance(source, dict):
        return ({k: (lambda lo, hi, t=t: t.reshape(-1)[lo:hi]) for k, t in source.items()},
                {k: list(t.shape) for k, t in source.items()})
    from safetensors import safe_open
    paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    files = []
    for path in map(str, paths):
        if os.path.isdir(path):
            files += sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        else:
            files.append(path)
    if not files:
        raise FileNotFoundError(f"zerocore.load_partitioned: no .safetensors file in {source!r}")
    readers, shapes = {}, {}
    for path in files:
        handle = safe_open(path, framework="pt")
        for key in handle.keys():
            sl = handle.get_slice(key)
            shape = list(sl.get_shape())
            shapes[key] = shape

            def read(lo, hi, sl=sl, shape=shape):
                row = 1
                for d in shape[1:]:
                    row *= d
                if not shape or row == 0:
                    return sl[...].reshape(-1)[lo:hi]
                first, last = lo // row, max(lo, hi - 1) // row       # only the rows that hold [lo, hi)
                part = sl[first:last + 1].reshape(-1)
                return part[lo - first * row:hi - first * row]
            readers[key] = read
    return readers, shapes


@torch.no_grad()
def load_partitioned(model: torch.nn.Module, source, device=None, process_group=None) -> torch.nn.Module:
    """Give a model built on the meta device (`with torch.device("meta"): model = MyModel()`) its weights from
    `source`, each rank reading only its 1/N of every parameter (as ZeroInit leaves them): a state dict, a
    safetensors file, a list of them or a folder of them. ZeroOptimizer(model, stage=3) then assembles its
    units from the pieces. Buffers are loaded whole. Every key the model needs must be in `source` (raises
    listing what is missing); `device`: where the parameters will live (default: CPU).

    >>> # with torch.device("meta"): model = MyModel()
    >>> # zerocore.load_partitioned(model, "weights/")          # model.safetensors or sharded files
    >>> # opt = ZeroOptimizer(model, stage=3)
    """
    device = torch.device(device or "cpu")
    group = process_group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    readers, shapes = _source_reader(source)
    # A tensor saved once under one of its names (tied weights, as save_pretrained stores them) serves all.
    names_of: Dict[int, list] = {}
    for n, t in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        names_of.setdefault(id(t), []).append(n)
    key_of = {}
    for names in names_of.values():
        present = [n for n in names if n in readers]
        for n in names:
            key_of[n] = present[0] if present else None
    non_persistent = {f"{m}.{b}" if m else b for m, mod in model.named_modules(remove_duplicate=False)
                      for b in mod._non_persistent_buffers_set}
    missing = [n for n, k in key_of.items() if k is None and n not in non_persistent]
    if missing:
        raise KeyError(f"zerocore.load_partitioned: {len(missing)} tensor(s) of the model are not in the source, "
                       f"e.g. {missing[:5]}")
    replaced = {}                       # id(meta parameter) -> its partitioned replacement (tied names share)
    for mname, module in model.named_modules(remove_duplicate=False):
        prefix = mname + "." if mname else ""
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            key = key_of[prefix + name]
            if key in shapes and tuple(shapes[key]) != tuple(p.shape):
                raise ValueError(f"zerocore.load_partitioned: {key} has shape {tuple(shapes[key])} in the source, "
                                 f"{tuple(p.shape)} in the model")
            new = replaced.get(id(p))
            if new is None:
                n = p.numel()
                chunk = max(-(-n // world), 1)
                lo, hi = min(rank * chunk, n), min((rank + 1) * chunk, n)
                shard = torch.zeros(chunk, dtype=p.dtype, device=device)
                if hi > lo:
                    shard[:hi - lo].copy_(readers[key](lo, hi))
                ph = placeholder(p.shape, p.dtype, device)
                new = torch.nn.Parameter(ph, requires_grad=p.requires_grad)
                _PIECES[new] = Piece(shard, chunk, n, world, ph)
                replaced[id(p)] = new
            module._parameters[name] = new
        for name, b in list(module._buffers.items()):
            key = key_of.get(prefix + name) if b is not None else None
            if key is not None:
                module._buffers[name] = readers[key](0, b.numel()).reshape(b.shape).to(device, b.dtype).clone()
            elif b is not None and b.is_meta:
                raise ValueError(f"zerocore.load_partitioned: buffer {prefix + name} is not saved in checkpoints "
                                 "(non-persistent) and is on the meta device: create it on a real device in the "
                                 "module (e.g. recompute it after loading) before constructing ZeroOptimizer")
    return model
