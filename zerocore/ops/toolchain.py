"""Finds the tools an op library needs and says exactly what is missing.

Every probe here is cheap, cached per process and side-effect free, so `python -m zerocore report` can run all
of them on any machine. Failures are returned as reasons (strings), not raised: the builder decides whether a
missing tool is fatal (a C++ compiler for any op, nvcc for a CUDA op) or only turns a feature off (liburing).
"""
from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import torch


class OpBuildError(RuntimeError):
    """An op library cannot be built or loaded; the message names what is missing and how to get it."""


def cxx_compiler() -> Tuple[Optional[str], str]:
    """(path, reason): the C++ compiler torch's cpp_extension will call ($CXX, else `c++`)."""
    name = os.environ.get("CXX", "c++")
    path = shutil.which(name)
    if path is None:
        where = "$CXX" if "CXX" in os.environ else "`c++` on PATH"
        return None, (f"no C++ compiler found (looked for {name!r}, {where}): install one with "
                      f"`apt-get install g++` (Debian/Ubuntu) or point CXX at a compiler")
    return path, ""


@functools.lru_cache(maxsize=None)
def _compiler_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"
    return out.splitlines()[0].strip() if out else "unknown"


def cxx_version() -> str:
    path, reason = cxx_compiler()
    return _compiler_version(path) if path else f"missing: {reason}"


def ninja() -> Tuple[Optional[str], str]:
    path = shutil.which("ninja")
    if path is None:
        # `pip install ninja` puts the binary next to the interpreter, which may not be on PATH.
        candidate = Path(sys.executable).parent / "ninja"
        path = str(candidate) if candidate.exists() else None
    if path is None:
        return None, "ninja not found: `pip install ninja` (or `apt-get install ninja-build`)"
    return path, ""


def cuda_home() -> Tuple[Optional[str], str]:
    """(CUDA root, reason): $CUDA_HOME if set, else the first of $CUDA_PATH, /usr/local/cuda and
    dirname(dirname(realpath(which nvcc))) that holds an executable bin/nvcc."""
    explicit = os.environ.get("CUDA_HOME")
    if explicit:  # an explicit CUDA_HOME is authoritative: a wrong one must not be papered over by a guess
        if os.access(os.path.join(explicit, "bin", "nvcc"), os.X_OK):
            return explicit, ""
        return None, (f"CUDA_HOME={explicit} has no bin/nvcc: point CUDA_HOME at the CUDA toolkit "
                      f"(major version {torch.version.cuda.split('.')[0] if torch.version.cuda else '?'}, "
                      "matching torch), or unset it to search /usr/local/cuda and PATH")
    tried = []
    candidates = [os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(str(Path(os.path.realpath(on_path)).parent.parent))
    for root in candidates:
        if not root:
            continue
        tried.append(root)
        if os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return root, ""
    return None, ("nvcc not found (looked in " + (", ".join(tried) or "nothing") + " and on PATH): install the "
                  "CUDA toolkit whose major version matches torch's CUDA "
                  f"({torch.version.cuda or 'none: this torch is a CPU build'}) and set CUDA_HOME to it")


@functools.lru_cache(maxsize=None)
def _nvcc_release(nvcc: str) -> Optional[str]:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def nvcc_version() -> Tuple[Optional[str], str]:
    root, reason = cuda_home()
    if root is None:
        return None, reason
    release = _nvcc_release(os.path.join(root, "bin", "nvcc"))
    if release is None:
        return None, f"{root}/bin/nvcc did not report a version: check the CUDA installation"
    return release, ""


def cuda_toolchain_problem() -> str:
    """Empty when CUDA op libraries can be compiled here, else why not and how to fix it."""
    if torch.version.cuda is None:
        return "this torch is a CPU build: install a CUDA build of torch to use CUDA ops"
    release, reason = nvcc_version()
    if release is None:
        return reason
    if release.split(".")[0] != torch.version.cuda.split(".")[0]:
        return (f"nvcc {release} and torch's CUDA {torch.version.cuda} differ in major version: install CUDA "
                f"{torch.version.cuda.split('.')[0]}.x and point CUDA_HOME at it, or a torch built for CUDA {release}")
    return ""


def wheel_cuda_include_dirs() -> list:
    """Headers that torch's pip wheels bring (site-packages/nvidia/*/include): a pip-only CUDA install has no
    system cuda_runtime_api.h for some libraries, and these must match the runtime torch loads."""
    dirs = []
    for base in {os.path.dirname(os.path.dirname(torch.__file__))}:
        dirs += sorted(glob.glob(os.path.join(base, "nvidia", "*", "include")))
    return dirs


def cuda_arch_list() -> Tuple[str, str]:
    """(TORCH_CUDA_ARCH_LIST value, where it came from). Compiling for every arch torch knows takes many minutes,
    so without the env var and without a visible GPU we target Hopper (sm_90) only."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env, "TORCH_CUDA_ARCH_LIST"
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" for a, b in caps), "visible GPUs"
    return "9.0", "default (no GPU visible, TORCH_CUDA_ARCH_LIST unset)"


def _link_test(code: str, libs: list) -> str:
    """Compile and link a tiny program; empty string on success, else the compiler's complaint."""
    cxx, reason = cxx_compiler()
    if cxx is None:
        return reason
    with tempfile.TemporaryDirectory(prefix="zerocore-probe-") as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write(code)
        cmd = [cxx, src, "-o", os.path.join(tmp, "probe")] + [f"-l{lib}" for lib in libs]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            return str(e)
        if proc.returncode == 0:
            return ""
        lines = proc.stderr.strip().splitlines() or ["link failed"]
        return next((line.strip() for line in lines if "error" in line), lines[-1].strip())


_LIBURING_PROBE = """
#include <liburing.h>
int main(int argc, char**) {
  struct io_uring ring;
  if (argc > 1) io_uring_queue_exit(&ring);  // referenced, never run: links only against a real liburing
  return 0;
}
"""


def liburing() -> Tuple[bool, str]:
    """(found, reason): whether liburing's headers and library link with the C++ compiler. Not cached: tests
    change PATH/CXX to simulate a machine without it."""
    problem = _link_test(_LIBURING_PROBE, ["uring"])
    if problem:
        return False, ("liburing not found (" + problem + "): `apt-get install liburing-dev`; "
                       "until then the thread-pool I/O backend is used")
    return True, ""


@functools.lru_cache(maxsize=None)
def cpu_simd_level() -> str:
    """The widest SIMD level this CPU runs: avx512, avx2 or scalar (what the CPU kernels pick at run time)."""
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return "scalar"
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        return "avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "scalar"


def io_uring_probe() -> Tuple[bool, str]:
    """(works, reason): calls io_uring_setup directly, so the answer needs no compiled op. Container seccomp
    profiles (Docker's default) and kernel.io_uring_disabled block it with EPERM; old kernels give ENOSYS."""
    import ctypes
    import errno as errno_mod
    try:
        disabled = open("/proc/sys/kernel/io_uring_disabled").read().strip()
    except OSError:
        disabled = "0"
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
    io_uring_setup = 425  # the same number on every architecture (unified syscall table, Linux >= 5.1)
    fd = libc.syscall(io_uring_setup, 4, params)
    if fd >= 0:
        os.close(fd)
        return True, ""
    err = ctypes.get_errno()
    if err == errno_mod.ENOSYS:
        return False, "this kernel has no io_uring (ENOSYS; Linux >= 5.1 needed)"
    if err == errno_mod.EPERM:
        why = (f"kernel.io_uring_disabled={disabled}" if disabled != "0"
               else "blocked by the container's seccomp profile")
        return False, f"io_uring_setup denied (EPERM): {why}"
    return False, f"io_uring_setup failed: {os.strerror(err)} (errno {err})"
