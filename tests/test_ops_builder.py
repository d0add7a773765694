"""The op builder: cache reuse, concurrent first use, stale prebuilt libraries, CPU libraries free of CUDA.

A tiny op library written into a temporary source tree (ZEROCORE_CSRC_DIR) stands in for the real ones, so
these tests compile a few lines instead of the SIMD kernels; each process registers its spec before loading.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import zerocore.ops as ops
from zerocore.ops import builder
from zerocore.ops.specs import SPECS, OpSpec

TINY_SOURCE = """
#include <ATen/ATen.h>
#include <torch/library.h>
// Adds a per-build constant so a test can tell a rebuilt library from the old one.
at::Tensor add_k(const at::Tensor& x) { return x + TINY_K; }
TORCH_LIBRARY_FRAGMENT(zerocore_selftest, m) { m.def("add_k(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(zerocore_selftest, CPU, m) { m.impl("add_k", &add_k); }
"""
TINY_SPEC = dict(name="selftest", sources=("selftest/selftest_op.cpp",), cflags=("-O0", "-DTINY_K=1"),
                 ldflags=(), include_dirs=())

# Registers the tiny spec, loads it, checks it computes, prints where it came from.
LOADER = textwrap.dedent(f"""
    import json, torch
    from zerocore.ops.specs import SPECS, OpSpec
    SPECS["selftest"] = OpSpec(**{TINY_SPEC!r})
    import zerocore.ops as ops
    ops.load("selftest")
    x = torch.randn(5)
    assert torch.equal(torch.ops.zerocore_selftest.add_k(x), x + 1), "selftest op computed the wrong thing"
    seconds, origin = ops.load_info("selftest")
    print(json.dumps({{"origin": origin.split(":")[0], "seconds": seconds}}))
""")


def make_tree(root):
    (root / "csrc" / "selftest").mkdir(parents=True, exist_ok=True)
    (root / "csrc" / "selftest" / "selftest_op.cpp").write_text(TINY_SOURCE)
    return root


def use_tree(root, monkeypatch):
    """Point this process and its children at root's sources, cache and prebuilt dir."""
    monkeypatch.setenv("ZEROCORE_CSRC_DIR", str(root / "csrc"))
    monkeypatch.setenv("ZEROCORE_EXTENSIONS_DIR", str(root / "cache"))
    monkeypatch.setenv("ZEROCORE_PREBUILT_DIR", str(root / "prebuilt"))
    monkeypatch.setitem(SPECS, "selftest", OpSpec(**TINY_SPEC))


def run_loader(n=1):
    """Start n processes loading the tiny op at once; returns their parsed reports."""
    procs = [subprocess.Popen([sys.executable, "-c", LOADER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(n)]
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"loader failed:\n{err[-3000:]}"
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


@pytest.fixture(scope="module")
def cold_start(tmp_path_factory):
    """Four processes load the tiny op at once on an empty cache (the one compile most tests here reuse)."""
    root = make_tree(tmp_path_factory.mktemp("ops"))
    with pytest.MonkeyPatch.context() as mp:
        use_tree(root, mp)
        reports = run_loader(4)
    return root, reports


@pytest.fixture
def tiny_tree(cold_start, tmp_path, monkeypatch):
    """A private copy of the built tree (sources and cache): the cache key ignores where the cache lives."""
    root = tmp_path / "tree"
    shutil.copytree(cold_start[0], root, ignore=shutil.ignore_patterns("*.lock"))
    use_tree(root, monkeypatch)
    return root


def cache_dirs(root):
    return sorted(d for d in (root / "cache" / "zerocore").iterdir() if d.is_dir())


def test_four_processes_on_a_cold_cache_compile_once(cold_start):
    root, reports = cold_start
    origins = sorted(r["origin"] for r in reports)
    assert origins == ["built", "cache", "cache", "cache"], origins
    assert len(cache_dirs(root)) == 1


def test_next_process_loads_from_cache(tiny_tree):
    assert run_loader(1)[0]["origin"] == "cache"


def test_source_change_builds_anew_and_makes_prebuilt_stale(tiny_tree):
    # A prebuilt library is a build dir with its marker: the cached build stands in for one here.
    shutil.copytree(cache_dirs(tiny_tree)[0], tiny_tree / "prebuilt" / "selftest")
    assert builder.prebuilt_status(SPECS["selftest"])[0] is not None
    src = tiny_tree / "csrc" / "selftest" / "selftest_op.cpp"
    src.write_text(src.read_text().replace("x + TINY_K", "x + TINY_K + 0"))
    path, reason = builder.prebuilt_status(SPECS["selftest"])
    assert path is None and "sources_sha256" in reason, reason
    assert run_loader(1)[0]["origin"] == "built"
    assert len(cache_dirs(tiny_tree)) == 2  # the old build stays for processes still on the old sources


def test_matching_prebuilt_is_loaded_and_stale_one_is_not(tiny_tree):
    prebuilt = builder.prebuild("selftest", tiny_tree / "prebuilt", verbose=False)
    assert run_loader(1)[0]["origin"] == "prebuilt"

    # The same library as if built against another torch: its key no longer matches.
    marker_path = prebuilt / "zerocore_build.json"
    marker = json.loads(marker_path.read_text())
    marker["inputs"]["torch"] = "1.0.0"
    marker["key"] = "0" * 16
    marker_path.write_text(json.dumps(marker))
    path, reason = builder.prebuilt_status(SPECS["selftest"])
    assert path is None and "stale" in reason and "torch" in reason, reason
    assert run_loader(1)[0]["origin"] == "cache"


def test_old_builds_are_pruned_newest_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROCORE_EXTENSIONS_DIR", str(tmp_path))
    root = tmp_path / "zerocore"
    for i in range(5):  # finished builds, oldest first
        d = root / f"buckets-{i:016x}"
        d.mkdir(parents=True)
        (d / "zerocore_build.json").write_text("{}")
        os.utime(d / "zerocore_build.json", (1000 + i, 1000 + i))
    (root / "buckets-unfinished").mkdir()  # a build in progress has no marker
    (root / "cpu_adam-0000000000000000").mkdir()  # another op's build
    builder._prune_old_builds(SPECS["buckets"], keep=3)
    left = sorted(d.name for d in root.iterdir())
    assert left == ["buckets-0000000000000002", "buckets-0000000000000003", "buckets-0000000000000004",
                    "buckets-unfinished", "cpu_adam-0000000000000000"], left


def test_missing_compiler_is_named(tiny_tree, monkeypatch):
    monkeypatch.setenv("CXX", str(tiny_tree / "no-such-compiler"))
    with pytest.raises(ops.OpBuildError, match=r"no C\+\+ compiler found.*apt-get install g\+\+"):
        ops.build("selftest", force=True)
    ok, reason = ops.compatibility("selftest")
    assert not ok and "CXX" in reason


def test_missing_nvcc_is_named(monkeypatch):
    monkeypatch.setenv("CUDA_HOME", "/nonexistent/cuda")
    from zerocore.ops import toolchain
    problem = toolchain.cuda_toolchain_problem()
    if torch.version.cuda is None:
        assert "CPU build" in problem
        return
    assert "CUDA_HOME=/nonexistent/cuda has no bin/nvcc" in problem
    ok, reason = ops.compatibility("cuda_adam")
    assert not ok and "nvcc" in reason
    with pytest.raises(ops.OpBuildError, match="nvcc"):
        ops.build("cuda_adam", force=True)


def test_missing_liburing_is_named_and_not_fatal(tmp_path, monkeypatch):
    """A compiler that cannot link -luring stands for a machine without liburing-dev."""
    fake = tmp_path / "c++"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = "-luring" ] && '
                    '{ echo "/usr/bin/ld: cannot find -luring: No such file or directory" >&2; exit 1; }; done\n'
                    'exec g++ "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    from zerocore.ops import toolchain
    found, reason = toolchain.liburing()
    assert not found
    assert "apt-get install liburing-dev" in reason and "cannot find -luring" in reason
    assert ops.compatibility("aio") == (True, "")  # the thread-pool backend needs no liburing


def test_cpu_library_links_no_cuda_library(tiny_tree):
    build_dir = cache_dirs(tiny_tree)[0]
    so = build_dir / json.loads((build_dir / "zerocore_build.json").read_text())["file"]
    needed = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout
    libs = [line.split("[")[1].rstrip("]") for line in needed.splitlines() if "(NEEDED)" in line]
    assert libs and not [lib for lib in libs if "cuda" in lib or "cudart" in lib], libs


@pytest.mark.parametrize("name", [n for n, s in SPECS.items() if not s.needs_cuda and n != "selftest"])
def test_real_cpu_ops_load_without_cuda_libraries(name):
    """Every CPU op library builds (or comes from the cache) here, on a machine without a GPU, and links no
    CUDA library."""
    build_dir = ops.build(name)
    so = build_dir / json.loads((build_dir / "zerocore_build.json").read_text())["file"]
    needed = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout
    assert "cuda" not in needed.lower(), needed
    code = (f"import torch, zerocore.ops as o; o.load({name!r}); "
            "assert not torch.cuda.is_available(); print('ok')")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_unknown_op_lists_known_ones():
    with pytest.raises(KeyError, match="known: .*cpu_adam"):
        ops.spec("no_such_op")
    assert {"cpu_adam", "cuda_adam", "buckets", "cuda_buckets", "aio"} <= set(ops.available())
    assert ops.spec("cuda_adam").needs_cuda and not ops.spec("cpu_adam").needs_cuda
