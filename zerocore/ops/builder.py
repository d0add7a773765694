"""Compiles op libraries on first use and loads them from a cache afterwards.

[Note: cache key]
A built library is reused only when everything that went into it is the same: torch's version and CUDA version,
the Python ABI, the spec's flags, the CUDA arch list and the bytes of every source and header in the op's
folders. The key names the build directory, so a change of any of them builds anew beside the old build
instead of loading a stale binary. Tool versions (gcc, nvcc) and optional libraries (liburing) are recorded in
the build's marker but are not part of the key, so a prebuilt library loads on a machine with no compiler.

[Note: concurrent first use]
torchrun starts N ranks that all load the same op at once on a cold cache. The first to take an flock on
`<build dir>.lock` compiles; the others block on the lock, then see the finished marker and load. flock is
released by the kernel when a process dies, so a killed build never leaves a stale lock behind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from . import toolchain
from .specs import SPECS, OpSpec
from .toolchain import OpBuildError

_MARKER = "zerocore_build.json"
_KEY_VERSION = 1  # bump when the meaning of the key changes
_KEEP_BUILDS = 3  # finished builds kept per op in the cache
_loaded: Dict[str, object] = {}
_load_seconds: Dict[str, float] = {}
_load_origin: Dict[str, str] = {}


def package_dir() -> Path:
    return Path(__file__).resolve().parent.parent


def csrc_root() -> Path:
    """Sources ship inside the wheel as zerocore/_csrc; an editable checkout reads the repo's csrc/;
    $ZEROCORE_CSRC_DIR overrides both."""
    if os.environ.get("ZEROCORE_CSRC_DIR"):  # an alternative source tree (development, tests)
        return Path(os.environ["ZEROCORE_CSRC_DIR"])
    shipped = package_dir() / "_csrc"
    return shipped if shipped.is_dir() else package_dir().parent / "csrc"


def cache_root() -> Path:
    for var in ("ZEROCORE_EXTENSIONS_DIR", "TORCH_EXTENSIONS_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var]) / "zerocore"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zerocore" / "extensions"


def prebuilt_root() -> Path:
    return Path(os.environ.get("ZEROCORE_PREBUILT_DIR") or package_dir() / "_prebuilt")


def spec(name: str) -> OpSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(f"unknown op library {name!r}; known: {', '.join(sorted(SPECS))}") from None


def module_name(s: OpSpec) -> str:
    return f"zerocore_{s.name}"


def _source_files(s: OpSpec) -> list:
    """Every file whose bytes can change the binary: the op's folders and the shared include dirs."""
    root = csrc_root()
    folders = {(root / src).parent for src in s.sources} | {root / d for d in s.include_dirs}
    files = sorted(p for d in folders if d.is_dir() for p in d.iterdir()
                   if p.suffix in (".h", ".hpp", ".cuh", ".cpp", ".cc", ".cu"))
    missing = [src for src in s.sources if not (root / src).is_file()]
    if missing:
        raise OpBuildError(f"op {s.name!r}: source files missing under {root}: {', '.join(missing)}; "
                           "reinstall zerocore (pip install .) so its csrc/ ships with it")
    return files


def key_inputs(s: OpSpec) -> dict:
    root = csrc_root()
    digest = hashlib.sha256()
    for path in _source_files(s):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return {
        "key_version": _KEY_VERSION,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda if s.needs_cuda else None,
        "python": sysconfig.get_config_var("EXT_SUFFIX") or sys.version,
        "spec": [s.sources, s.cflags, s.ldflags, s.optional_libs] + ([s.cuda_cflags] if s.needs_cuda else []),
        "cuda_arch": toolchain.cuda_arch_list()[0] if s.needs_cuda else None,
        "sources_sha256": digest.hexdigest(),
    }


def _key_of(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def cache_key(s: OpSpec) -> str:
    return _key_of(key_inputs(s))


def compatibility(s: OpSpec) -> Tuple[bool, str]:
    """(can this op be compiled here, why not). A prebuilt library may still load where this is False."""
    for probe in (toolchain.cxx_compiler, toolchain.ninja):
        found, reason = probe()
        if found is None:
            return False, reason
    if s.needs_cuda:
        problem = toolchain.cuda_toolchain_problem()
        if problem:
            return False, problem
    return True, ""


def _read_marker(build_dir: Path) -> Optional[dict]:
    try:
        marker = json.loads((build_dir / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if (build_dir / marker.get("file", "\0")).is_file() else None


def _write_marker(build_dir: Path, marker: dict) -> None:
    tmp = build_dir / (_MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1, sort_keys=True))
    os.replace(tmp, build_dir / _MARKER)  # atomic: a reader sees no marker or a whole one


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _cuda_build_env():
    """torch reads CUDA_HOME once at import and the arch list from the environment at build time."""
    import torch.utils.cpp_extension as cpp_ext
    root, _ = toolchain.cuda_home()
    arch, _ = toolchain.cuda_arch_list()
    saved = (cpp_ext.CUDA_HOME, os.environ.get("TORCH_CUDA_ARCH_LIST"))
    cpp_ext.CUDA_HOME = root
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    try:
        yield
    finally:
        cpp_ext.CUDA_HOME = saved[0]
        if saved[1] is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved[1]


def _compile(s: OpSpec, build_dir: Path, verbose: bool) -> dict:
    """Builds in a child process (see compile_worker.py) and returns the marker describing the result.

    torch's cpp_extension.load also loads what it built, and a process that loads two builds of one op library
    (the same schema registered twice) aborts; a child keeps the caller's process clean and survives a
    crashing compiler."""
    ok, reason = compatibility(s)
    if not ok:
        raise OpBuildError(f"cannot build op {s.name!r}: {reason}")
    build_dir.mkdir(parents=True, exist_ok=True)
    result = build_dir / "compile_result.json"
    result.unlink(missing_ok=True)
    request = json.dumps({"spec": dataclasses.asdict(s), "build_dir": str(build_dir), "verbose": verbose,
                          "result": str(result)})
    proc = subprocess.run([sys.executable, "-m", "zerocore.ops.compile_worker"], input=request, text=True,
                          stdout=None if verbose else subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not result.is_file():
        output = (proc.stdout or "(compiler output shown above)").strip().splitlines()
        tail = "\n".join(output[-60:])
        raise OpBuildError(f"building op {s.name!r} in {build_dir} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(result.read_text())


def compile_in_process(s: OpSpec, build_dir: Path, verbose: bool) -> dict:
    """Runs torch's ninja build into build_dir (loading the result into this process, as torch does) and
    returns the marker describing it. Called by compile_worker in a child process."""
    import torch.utils.cpp_extension as cpp_ext

    root = csrc_root()
    cflags, ldflags, features = list(s.cflags), list(s.ldflags), {}
    for lib in s.optional_libs:
        found, why_not = toolchain.liburing() if lib == "uring" else (False, f"no probe for lib{lib}")
        features[lib] = found or why_not
        if found:
            cflags.append(f"-DZEROCORE_HAVE_{lib.upper()}=1")
            ldflags.append(f"-l{lib}")
    include_dirs = [str(root / d) for d in s.include_dirs]
    cuda_cflags = list(s.cuda_cflags) + [f"-I{d}" for d in include_dirs]
    if s.needs_cuda:
        include_dirs += toolchain.wheel_cuda_include_dirs()
    started = time.perf_counter()
    env = _cuda_build_env() if s.needs_cuda else contextlib.nullcontext()
    try:
        with env:
            cpp_ext.load(name=module_name(s), sources=[str(root / src) for src in s.sources],
                         extra_cflags=cflags, extra_cuda_cflags=cuda_cflags, extra_ldflags=ldflags,
                         extra_include_paths=include_dirs, build_directory=str(build_dir),
                         with_cuda=s.needs_cuda, is_python_module=s.python_module, verbose=verbose)
    except (RuntimeError, OSError, ImportError) as e:
        raise OpBuildError(f"building op {s.name!r} in {build_dir} failed: {e}") from e
    # The key is taken after the build from the same files: a source edited during a long build yields a
    # marker that no longer matches, so the next load builds again rather than trusting a mixed binary.
    inputs = key_inputs(s)
    return {
        "name": s.name, "key": _key_of(inputs), "inputs": inputs, "file": module_name(s) + ".so",
        "built_seconds": round(time.perf_counter() - started, 1), "features": features,
        "cxx": toolchain.cxx_version(), "nvcc": toolchain.nvcc_version()[0] if s.needs_cuda else None,
    }


def _load_file(s: OpSpec, path: Path):
    if s.python_module:
        mod_spec = importlib.util.spec_from_file_location(module_name(s), str(path))
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        return module
    torch.ops.load_library(str(path))
    return torch.ops.zerocore


def build_dir_for(s: OpSpec, key: Optional[str] = None) -> Path:
    """The cache folder of this op's build for `key` (default: the current sources' key)."""
    return cache_root() / f"{s.name}-{key or cache_key(s)}"


def prebuilt_status(s: OpSpec, key: Optional[str] = None) -> Tuple[Optional[Path], str]:
    """(path to a prebuilt library that matches this source and torch, or None; why it is not used)."""
    directory = prebuilt_root() / s.name
    marker = _read_marker(directory)
    if marker is None:
        return None, "no prebuilt library"
    if marker.get("key") != (key or cache_key(s)):
        theirs, ours = marker.get("inputs", {}), key_inputs(s)
        differ = sorted(k for k in ours if theirs.get(k) != ours[k])
        return None, f"prebuilt library is stale ({', '.join(differ) or 'key'} changed): rebuilt by JIT"
    return directory / marker["file"], ""


def _build_locked(s: OpSpec, verbose: bool, force: bool) -> Tuple[Path, bool]:
    """(build dir, whether this process compiled it): compiles under the lock unless a finished build is there,
    which is what a rank sees after waiting for another rank's build."""
    build_dir = build_dir_for(s)
    with _exclusive(build_dir.with_name(build_dir.name + ".lock")):
        if not force and _read_marker(build_dir) is not None:
            return build_dir, False
        _write_marker(build_dir, _compile(s, build_dir, verbose))
    _prune_old_builds(s, keep=_KEEP_BUILDS)
    return build_dir, True


def _prune_old_builds(s: OpSpec, keep: int) -> None:
    """Each source edit or torch upgrade leaves a build behind; keep the `keep` newest finished builds of this
    op. A library already loaded by a running process stays mapped after its files go, and a build still in
    progress has no marker yet, so it is never a candidate."""
    finished = [d for d in cache_root().glob(f"{s.name}-*") if d.is_dir() and (d / _MARKER).is_file()]
    finished.sort(key=lambda d: (d / _MARKER).stat().st_mtime, reverse=True)
    for old in finished[keep:]:
        shutil.rmtree(old, ignore_errors=True)  # its lock file stays: unlinking a lock someone holds breaks it


def build(name: str, verbose: bool = False, force: bool = False) -> Path:
    """Compile op library `name` into the cache now (unless a current build is there, or force) and return its
    build directory. Raises OpBuildError naming what is missing (compiler, ninja, nvcc) and how to get it.

    >>> import zerocore.ops
    >>> d = zerocore.ops.build("buckets")
    >>> (d / "zerocore_build.json").exists()
    True
    """
    return _build_locked(spec(name), verbose, force)[0]


def load(name: str, verbose: bool = False):
    """Load op library `name`: a prebuilt library if its key matches, else the cache, else compile it now.

    Returns the pybind11 module for python-module libraries, else `torch.ops.zerocore` (the ops registered).

    >>> import torch, zerocore.ops
    >>> ops = zerocore.ops.load("buckets")
    >>> hasattr(ops, "pack")
    True
    """
    if name in _loaded:
        return _loaded[name]
    s = spec(name)
    for dep in s.requires:
        load(dep, verbose)
    started = time.perf_counter()
    key = cache_key(s)  # hashes the sources: once per load
    path, _ = prebuilt_status(s, key)
    origin = "prebuilt"
    if path is None:
        build_dir = build_dir_for(s, key)
        origin = "cache"
        if _read_marker(build_dir) is None:  # cold cache: see [Note: concurrent first use]
            build_dir, compiled = _build_locked(s, verbose, force=False)
            origin = "built" if compiled else "cache"
        path = build_dir / _read_marker(build_dir)["file"]
    try:
        module = _load_file(s, path)
    except (OSError, ImportError, RuntimeError) as e:
        raise OpBuildError(f"op {name!r} was built at {path} but failed to load: {e}; delete that folder to "
                           "rebuild it") from e
    from . import fakes
    try:
        fakes.register(name)              # meta / FakeTensor kernels of the ops it defines
    except (RuntimeError, ValueError) as e:   # e.g. another package registered one first: the ops still work
        import warnings
        warnings.warn(f"zerocore: fake (meta) kernels of {name!r} not registered: {e}", RuntimeWarning)
    _loaded[name] = module
    _load_seconds[name] = time.perf_counter() - started
    _load_origin[name] = f"{origin}: {path.parent}"
    return module


def load_info(name: str) -> Tuple[Optional[float], Optional[str]]:
    """(seconds the load took, where it came from) for a library loaded in this process."""
    return _load_seconds.get(name), _load_origin.get(name)


def cached_build(name: str) -> Optional[Path]:
    """The build directory holding a current build of `name` (prebuilt or cached), or None."""
    s = spec(name)
    path, _ = prebuilt_status(s)
    if path is not None:
        return path.parent
    d = build_dir_for(s)
    return d if _read_marker(d) else None


def prebuild(name: str, dest: Path, verbose: bool = True) -> Path:
    """Build op library `name` into dest/<name> with a marker, as a prebuilt library that `load` will use
    while its key matches; returns that directory."""
    s = spec(name)
    directory = Path(dest) / name
    _write_marker(directory, _compile(s, directory, verbose))
    return directory


def prebuild_all(dest: Path, verbose: bool = True) -> dict:
    """Build every op library that is compatible here into dest/<name> (what ZEROCORE_BUILD_OPS=1 does at
    install); returns {name: "built" | reason skipped}."""
    results = {}
    for name, s in SPECS.items():
        ok, reason = compatibility(s)
        if ok:
            prebuild(name, dest, verbose)
        results[name] = "built" if ok else f"skipped: {reason}"
    return results
