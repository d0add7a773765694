"""zerocore.io.backend_info and backend selection (run-time probe, env override, clear refusals); crc32c."""
import os
import subprocess
import sys

import pytest
import torch

from zerocore.io import AsyncIO, backend_info
from zerocore.io._native import lib


def _in_child(code, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_backend_info_names_backend_and_reason():
    name, reason = backend_info()
    usable, why = lib().uring_available()
    assert name == ("io_uring" if usable else "threads")
    assert reason and (why in reason)


def test_threads_can_always_be_forced():
    assert backend_info("threads") == ("threads", "forced by backend=threads")
    with AsyncIO(backend="threads") as aio:
        assert aio.backend == "threads"


def test_forcing_io_uring_works_or_raises_why():
    usable, why = lib().uring_available()
    if usable:
        assert backend_info("io_uring")[0] == "io_uring"
    else:
        with pytest.raises(RuntimeError, match="unavailable"):
            AsyncIO(backend="io_uring")


def test_unknown_backend_is_refused():
    with pytest.raises(RuntimeError, match="'io_uring', 'threads' or 'auto'"):
        AsyncIO(backend="libaio")


def test_env_var_forces_the_backend():
    code = "from zerocore.io import AsyncIO, backend_info; print(AsyncIO().backend, backend_info()[1])"
    proc = _in_child(code, ZEROCORE_AIO_BACKEND="threads")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "threads" and "ZEROCORE_AIO_BACKEND=threads" in proc.stdout
    proc = _in_child(code, ZEROCORE_AIO_BACKEND="bogus")
    assert proc.returncode != 0 and "unknown I/O backend 'bogus'" in proc.stderr


CRC_VECTORS = [  # RFC 3720 B.4 and the customary check value
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


@pytest.mark.parametrize("software", [False, True])
@pytest.mark.parametrize("data,expected", CRC_VECTORS)
def test_crc32c_vectors(data, expected, software):
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    assert lib().crc32c(t, 0, software) == expected


def test_crc32c_hardware_and_software_agree_on_random_data():
    data = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    whole = lib().crc32c(data, 0, True)
    assert lib().crc32c(data, 0, False) == whole
    assert lib().crc32c(data[1000:], lib().crc32c(data[:1000], 0, False), False) == whole


@pytest.mark.slow
def test_engine_built_without_liburing_refuses_io_uring_and_uses_threads(tmp_path):
    """The io_uring backend compiles to a clear failure path when ZEROCORE_HAVE_URING is not defined: build the
    engine that way (no torch, a few seconds) and check what it says and that the thread pool still works."""
    import shutil
    from zerocore.ops.builder import csrc_root
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler to build the engine without liburing")
    io_dir = csrc_root() / "io"
    main = tmp_path / "main.cpp"
    main.write_text("""
        #include <cstdio>
        #include <vector>
        #include "aio_engine.h"
        using namespace zerocore::io;
        int main(int argc, char** argv) {
          std::printf("auto=%s\\n", choose_backend("auto").name.c_str());
          try { choose_backend("io_uring"); std::printf("forced=accepted\\n"); }
          catch (const std::exception& e) { std::printf("forced=%s\\n", e.what()); }
          std::vector<char> data(100000, 'z'), back(100000);
          Engine engine(EngineOptions{});
          bool ok = engine.submit({{Op::kWrite, data.data(), data.size(), argv[1], 3, true}}).wait().ok() &&
                    engine.submit({{Op::kRead, back.data(), back.size(), argv[1], 3, true}}).wait().ok();
          std::printf("roundtrip=%d engine=%s\\n", ok && back == data, engine.backend_name().c_str());
        }
    """)
    sources = [str(io_dir / f) for f in ("aligned_buffer.cpp", "aio_engine.cpp", "thread_pool_backend.cpp",
                                          "uring_backend.cpp", "crc32c.cpp", "checksum_sidecar.cpp")]
    exe = tmp_path / "no_uring"
    build = subprocess.run([cxx, "-std=c++17", "-O1", f"-I{csrc_root() / 'common'}", f"-I{io_dir}", str(main),
                            *sources, "-o", str(exe), "-pthread"], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe), str(tmp_path / "f.bin")], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, ZEROCORE_AIO_BACKEND=""))
    assert run.returncode == 0, run.stderr
    assert "auto=threads" in run.stdout
    assert "forced=the io_uring I/O backend was forced" in run.stdout and "not built with liburing" in run.stdout
    assert "roundtrip=1 engine=threads" in run.stdout
