"""zerocore's op builder: compiles the C++/CUDA op libraries on first use (ninja, cached) and loads them.

>>> import zerocore.ops
>>> sorted(zerocore.ops.available())
['aio', 'buckets', 'cpu_adam', 'cuda_adam', 'cuda_buckets', 'host_cache']
>>> zerocore.ops.spec("cuda_adam").needs_cuda
True
"""
from .builder import build, cache_root, cached_build, load, load_info, prebuild_all, spec
from .specs import SPECS, OpSpec
from .toolchain import OpBuildError


def available():
    """Names of every op library zerocore knows how to build (see `compatibility` for whether it can here)."""
    return list(SPECS)


def compatibility(name: str):
    """(True, "") when op library `name` can be compiled on this machine, else (False, what is missing)."""
    from .builder import compatibility as _compat
    return _compat(spec(name))


__all__ = ["available", "spec", "build", "load", "compatibility", "cached_build", "cache_root", "load_info",
           "prebuild_all", "OpSpec", "OpBuildError"]
