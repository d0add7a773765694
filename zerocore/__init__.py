"""zerocore: ZeRO (Zero Redundancy Optimizer) stages 1, 2 and 3 for PyTorch, with offload to CPU memory.

Importing zerocore compiles nothing: op libraries are built on first use (see `zerocore.ops`).
"""
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so `import zerocore` stays cheap and works before the engine's dependencies are needed.
    if name == "ZeroOptimizer":
        from .zero import ZeroOptimizer
        return ZeroOptimizer
    if name in ("gathered_parameters", "ZeroInit", "load_partitioned"):
        from . import zero
        return getattr(zero, name)
    if name == "consolidate":
        from .zero.consolidate import consolidate
        return consolidate
    if name in ("estimate_memory", "MemoryEstimate"):
        from . import estimate
        return getattr(estimate, name)
    raise AttributeError(f"module 'zerocore' has no attribute {name!r}")


__all__ = ["ZeroOptimizer", "ZeroInit", "consolidate", "estimate_memory", "MemoryEstimate", "gathered_parameters",
           "load_partitioned", "__version__"]
