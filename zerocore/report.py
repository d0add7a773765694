"""`python -m zerocore report`: what this machine can build and run, and why not where it cannot.

Read-only apart from loading already-built op libraries to time them; never compiles anything.
"""
from __future__ import annotations

import os
import platform
import sys
import time

import torch

from . import __version__
from .ops import builder, toolchain
from .ops.specs import SPECS


def _tool_lines() -> list:
    cxx, cxx_reason = toolchain.cxx_compiler()
    ninja, ninja_reason = toolchain.ninja()
    nvcc, nvcc_reason = toolchain.nvcc_version()
    cuda_root, _ = toolchain.cuda_home()
    arch, arch_source = toolchain.cuda_arch_list()
    uring_lib, uring_lib_reason = toolchain.liburing()
    uring_kernel, uring_kernel_reason = toolchain.io_uring_probe()
    forced = os.environ.get("ZEROCORE_SIMD")
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return [
        ("zerocore", __version__),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("torch", f"{torch.__version__}, CUDA {torch.version.cuda or 'none (CPU build)'}"),
        ("GPUs", ", ".join(gpus) or "none visible"),
        ("C++ compiler", f"{toolchain.cxx_version()} ({cxx})" if cxx else f"MISSING: {cxx_reason}"),
        ("ninja", ninja or f"MISSING: {ninja_reason}"),
        ("nvcc", f"{nvcc} at {cuda_root}" if nvcc else f"missing: {nvcc_reason}"),
        ("CUDA ops", toolchain.cuda_toolchain_problem() or f"buildable, arch {arch} ({arch_source})"),
        ("CPU SIMD", toolchain.cpu_simd_level() + (f" (ZEROCORE_SIMD={forced} forces a level)" if forced else "")),
        ("io_uring (kernel)", "works" if uring_kernel else f"unavailable: {uring_kernel_reason}"),
        ("liburing", "found" if uring_lib else uring_lib_reason),
        ("I/O backend", _io_backend_line()),
        ("op cache", str(builder.cache_root())),
        ("prebuilt ops", str(builder.prebuilt_root())),
    ]


def _io_backend_line() -> str:
    try:
        if builder.cached_build("aio") is None:
            return "decided when the aio op is built (it is not yet)"
        from .io import backend_info
        name, reason = backend_info()
    except Exception as e:  # the report must finish whatever one op does
        return f"unknown: {type(e).__name__}: {e}"
    return f"{name}" + (f" ({reason})" if reason else "")


def _op_rows() -> list:
    rows = []
    for name, spec in SPECS.items():
        ok, reason = builder.compatibility(spec)
        try:
            directory = builder.cached_build(name)
            _, prebuilt_reason = builder.prebuilt_status(spec)
        except toolchain.OpBuildError as e:  # e.g. sources missing from a broken install
            rows.append((name, "CUDA" if spec.needs_cuda else "CPU", f"no: {e}", "no", "-", "-"))
            continue
        load = "-"
        if directory is not None:
            try:
                started = time.perf_counter()
                builder.load(name)
                load = f"{(time.perf_counter() - started) * 1000:.0f} ms"
            except Exception as e:
                load = f"FAILED: {e}"
        rows.append((
            name,
            "CUDA" if spec.needs_cuda else "CPU",
            "yes" if ok else f"no: {reason}",
            "yes" if directory is not None else "no",
            str(directory) if directory is not None else f"({prebuilt_reason}; JIT on first use)",
            load,
        ))
    return rows


def _table(header: tuple, rows: list) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def report() -> str:
    tools = _tool_lines()
    width = max(len(k) for k, _ in tools)
    head = "\n".join(f"{k.ljust(width)}  {v}" for k, v in tools)
    ops = _table(("op", "device", "compatible", "built", "cached where", "load time"), _op_rows())
    return f"{head}\n\n{ops}\n"


def main() -> int:
    print(report(), end="")
    return 0
