"""zerocore.io.aligned_empty: page alignment, exact sizes, dtypes/shapes, memory released when the storage dies,
page-locking when CUDA is there."""
import gc
import os

import pytest
import torch

from zerocore.io import aligned_empty
from zerocore.io._native import lib

PAGE = os.sysconf("SC_PAGESIZE")


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@pytest.mark.parametrize("nbytes", [0, 1, 4095, 4097, (1 << 20) + 3])
def test_byte_count_gives_aligned_uint8(nbytes):
    t = aligned_empty(nbytes, pin=False)
    assert t.dtype == torch.uint8 and t.shape == (nbytes,) and t.device.type == "cpu"
    assert nbytes == 0 or t.data_ptr() % PAGE == 0
    t.fill_(7)  # the whole range is writable
    assert nbytes == 0 or int(t.sum()) == 7 * nbytes


def test_large_buffers_start_on_a_huge_page_boundary():
    t = aligned_empty((3 << 20) + 8, pin=False)  # transparent huge pages need 2 MiB-aligned memory
    assert t.data_ptr() % (2 << 20) == 0
    t.fill_(5)
    assert int(t[-1]) == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int8])
def test_shape_and_dtype(dtype):
    t = aligned_empty((3, 5, 7), dtype=dtype, pin=True)  # pin is ignored without CUDA
    assert t.shape == (3, 5, 7) and t.dtype == dtype and t.is_contiguous()
    assert t.data_ptr() % PAGE == 0
    ref = torch.randn(3, 5, 7, dtype=torch.float64).to(dtype)
    t.copy_(ref)
    assert torch.equal(t, ref)


def test_bad_sizes_name_the_problem():
    with pytest.raises(ValueError, match="multiple"):
        aligned_empty(10, dtype=torch.float32)
    with pytest.raises(ValueError, match="negative"):
        aligned_empty((2, -1))
    with pytest.raises(TypeError, match="dtype"):
        aligned_empty(8, dtype="float32")


def test_memory_is_released_when_the_tensor_dies():
    size = 64 << 20
    gc.collect()
    before = _rss_bytes()
    for _ in range(8):
        t = aligned_empty(size, pin=False)
        t.fill_(1)  # touch every page so it counts in RSS
        view = t[1000:]
        del t  # the view keeps the storage alive ...
        assert int(view[-1]) == 1
        del view  # ... until it dies too
    grown = _rss_bytes() - before
    assert grown < size, f"RSS grew by {grown} bytes over 8 allocations of {size}: memory not freed"


def test_native_pin_without_cuda_runtime_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: pinning works here")
    try:
        t = lib().aligned_bytes(4096, True)
    except RuntimeError as e:
        assert "pin=False" in str(e)
    else:  # a CUDA build of torch loaded libcudart: cudaHostRegister without a GPU must then fail loudly
        pytest.fail(f"pinning without a GPU returned a tensor of {t.numel()} bytes")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_when_cuda_is_available_and_async_copies_round_trip():
    t = aligned_empty((1 << 20) + 5, dtype=torch.uint8, pin=True)
    assert t.is_pinned() and t.data_ptr() % PAGE == 0
    t.copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8))
    view = t[3:]
    del t
    assert view.is_pinned()  # still registered while any view lives
    gpu = view.to("cuda", non_blocking=True)
    back = aligned_empty(view.numel(), pin=True)
    back.copy_(gpu, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(back, view)
    for _ in range(20):  # register/unregister repeatedly: freed memory is unregistered, so this cannot run out
        aligned_empty(256 << 20, pin=True)
