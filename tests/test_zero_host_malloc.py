"""ZeroOptimizer's host_mmap_threshold option (zerocore/zero/host_malloc.py): glibc's mmap threshold pinned just
below the biggest gradient, so gradient-sized blocks are mmapped (returned to the OS on free) and smaller ones
stay on the heap. The setting is process-wide, so the test that applies it runs in a child process."""
import ctypes
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from zerocore.zero.config import ZeroConfig
from zerocore.zero.host_malloc import choose_threshold, set_mmap_threshold

_IS_GLIBC = hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


def test_auto_threshold_is_half_the_biggest_gradient_and_skips_small_models():
    assert choose_threshold(16 << 20) == 8 << 20
    assert choose_threshold(200 << 20) == 32 << 20            # glibc's upper limit
    assert choose_threshold((2 << 20) - 4) is None            # half is under 1 MiB: leave malloc alone


def test_bad_thresholds_are_rejected_with_the_valid_range():
    with pytest.raises(ValueError, match="host_mmap_threshold"):
        ZeroConfig(host_mmap_threshold=0)
    with pytest.raises(ValueError, match="host_mmap_threshold"):
        ZeroConfig(host_mmap_threshold="big")
    with pytest.raises(ValueError, match="host_mmap_threshold"):
        ZeroConfig(host_mmap_threshold=True)
    with pytest.raises(ValueError, match="host_mmap_threshold"):
        set_mmap_threshold(64 << 20)


def test_small_model_or_none_leaves_malloc_alone(single_rank_group):
    from zerocore.zero import ZeroOptimizer
    for option in ("auto", None):
        model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 6))
        opt = ZeroOptimizer(model, stage=2, lr=1e-2, host_mmap_threshold=option)
        assert opt.memory_report()["host_mmap_threshold"] is None
        opt.close()


_CHILD = textwrap.dedent("""
    import ctypes, torch, torch.distributed as dist
    from zerocore.zero import ZeroOptimizer

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    mmapped = lambda: libc.mallinfo2().hblkhd

    def mmapped_growth(nbytes):
        before = mmapped()
        t = torch.empty(nbytes // 4)
        grown = mmapped() - before
        del t
        return grown

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d", rank=0, world_size=1)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024))
    opt = ZeroOptimizer(model, stage=2, lr=1e-3, host_mmap_threshold=%s)
    opt.backward(model(torch.randn(4, 1024)).square().mean())
    opt.step()
    print("threshold", opt.memory_report()["host_mmap_threshold"])
    print("growth_16MiB", mmapped_growth(16 << 20))
    print("growth_4MiB", mmapped_growth(4 << 20))
    opt.close()
    dist.destroy_process_group()
""")


def _run_child(option: str) -> dict:
    from dist_helpers import free_port
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = subprocess.run([sys.executable, "-c", _CHILD % (free_port(), option)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(line.split() for line in out.stdout.splitlines() if line.split()[0] in
                ("threshold", "growth_16MiB", "growth_4MiB"))


@pytest.mark.skipif(not _IS_GLIBC, reason="mallopt(M_MMAP_THRESHOLD) is glibc's")
def test_auto_pins_threshold_so_only_gradient_sized_blocks_are_mmapped():
    got = _run_child('"auto"')          # 16 MiB weight gradients -> 8 MiB threshold
    assert int(got["threshold"]) == 8 << 20
    assert int(got["growth_16MiB"]) >= 16 << 20        # above the threshold: its own mapping, unmapped on free
    assert int(got["growth_4MiB"]) == 0                # below it: from the heap as before


@pytest.mark.skipif(not _IS_GLIBC, reason="mallopt(M_MMAP_THRESHOLD) is glibc's")
def test_without_the_option_freed_gradients_raise_glibcs_threshold_into_the_heap():
    """The problem the option fixes: glibc's dynamic threshold rises to the size of the first freed mmapped
    gradient, after which gradient-sized blocks come from (and fragment) the heap."""
    got = _run_child("None")            # the default
    assert got["threshold"] == "None"
    assert int(got["growth_16MiB"]) == 0
