"""The op libraries zerocore can build: one OpSpec each.

Each library is a separate shared object so a CPU-only user never needs nvcc and a missing liburing never
breaks Adam. Stateless kernels register with TORCH_LIBRARY_FRAGMENT(zerocore, ...) so the CPU and CUDA kernels
of one op share its name and dispatch by device; the CUDA library of an op only adds a CUDA implementation
(TORCH_LIBRARY_IMPL) to the schema its CPU library defines, hence `requires`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple

# Warnings are errors in our own sources; -O3 and no -march: the SIMD paths are chosen at run time.
_CXX_FLAGS = ("-O3", "-std=c++20", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fopenmp")
_CUDA_FLAGS = ("-O3", "-std=c++20", "--use_fast_math", "-lineinfo")
# Kernels whose results must match torch's (and the CPU kernels') bit for bit: --use_fast_math would flush fp32
# subnormals to zero (-ftz=true), which torch's own CUDA kernels do not.
_CUDA_EXACT_FLAGS = ("-O3", "-std=c++20", "-lineinfo")


@dataclass(frozen=True)
class OpSpec:
    """How to build one op library.

    name: what `zerocore.ops.load(name)` takes.
    sources: paths relative to the csrc root.
    needs_cuda: compiled with nvcc and loadable only with a CUDA build of torch.
    python_module: a pybind11 module (stateful objects) rather than a TORCH_LIBRARY registration.
    optional_libs: system libraries used when a link test finds them, e.g. ("uring",); each adds
        -DZEROCORE_HAVE_<LIB> when found.
    requires: op libraries that must be loaded first (the CPU library that defines the schema).
    """
    name: str
    sources: Tuple[str, ...]
    needs_cuda: bool = False
    python_module: bool = False
    optional_libs: Tuple[str, ...] = ()
    requires: Tuple[str, ...] = ()
    cflags: Tuple[str, ...] = _CXX_FLAGS
    cuda_cflags: Tuple[str, ...] = _CUDA_FLAGS
    ldflags: Tuple[str, ...] = ("-fopenmp",)
    description: str = ""
    include_dirs: Tuple[str, ...] = field(default=("common",))


SPECS = {
    s.name: s
    for s in [
        OpSpec(
            name="cpu_adam",
            sources=("adam/cpu_adam_kernels.cpp", "adam/cpu_adam_op.cpp"),
            description="SIMD (AVX-512 / AVX2 / scalar) fused Adam/AdamW with mixed-precision I/O",
        ),
        OpSpec(
            name="cuda_adam",
            sources=("adam/cuda_adam.cu",),
            needs_cuda=True,
            cuda_cflags=_CUDA_EXACT_FLAGS,
            requires=("cpu_adam",),
            description="multi-tensor fused Adam/AdamW on CUDA",
        ),
        OpSpec(
            name="buckets",
            sources=("buckets/pack_kernels.cpp", "buckets/pack_op.cpp", "buckets/storage_op.cpp"),
            description="multi-tensor pack/unpack of gradient buckets with cast and scale (CPU)",
        ),
        OpSpec(
            name="cuda_buckets",
            sources=("buckets/cuda_pack.cu",),
            needs_cuda=True,
            cuda_cflags=_CUDA_EXACT_FLAGS,
            requires=("buckets",),
            description="multi-tensor pack/unpack of gradient buckets (CUDA)",
        ),
        OpSpec(
            name="host_cache",
            sources=("memory/block_cache.cpp", "memory/host_allocator_bindings.cpp"),
            python_module=True,
            description="torch's CPU allocator with large blocks cached by size (steady-state host training)",
        ),
        OpSpec(
            name="aio",
            sources=("io/aligned_buffer.cpp", "io/aio_engine.cpp", "io/thread_pool_backend.cpp",
                     "io/uring_backend.cpp", "io/crc32c.cpp", "io/checksum_sidecar.cpp", "io/aio_bindings.cpp"),
            python_module=True,
            optional_libs=("uring",),
            description="async file I/O engine (io_uring or thread pool), aligned pinned buffers",
        ),
    ]
}
