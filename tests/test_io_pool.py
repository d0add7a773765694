"""zerocore.io.BufferPool: reuse by exact size, bounded memory, clear errors."""
import threading

import pytest
import torch

from zerocore.io import BufferPool


def test_reuses_buffers_of_the_same_size():
    pool = BufferPool(pin=False)
    a = pool.get((1000,), torch.float32)
    ptr = a.data_ptr()
    pool.put(a)
    b = pool.get(4000)  # same byte count, other dtype/shape
    assert b.data_ptr() == ptr and b.dtype == torch.uint8
    c = pool.get(4000)  # the idle one is taken: a new buffer
    assert c.data_ptr() != ptr
    assert pool.used_bytes == 8000 and pool.idle_bytes == 0
    pool.put(b)
    pool.put(c)
    assert pool.idle_bytes == 8000
    pool.clear()
    assert pool.idle_bytes == 0


def test_max_bytes_bounds_memory_and_says_how_to_fix():
    pool = BufferPool(pin=False, max_bytes=10000)
    a = pool.get(6000)
    with pytest.raises(MemoryError, match="max_bytes=10000"):
        pool.get(6000)
    pool.put(a)
    b = pool.get(8000)  # the idle 6000-byte buffer is dropped to make room
    assert pool.idle_bytes == 0 and pool.used_bytes == 8000
    pool.put(b)


def test_put_rejects_foreign_and_double_returns():
    pool = BufferPool(pin=False)
    with pytest.raises(ValueError, match="not handed out"):
        pool.put(torch.empty(10))
    t = pool.get(64)
    pool.put(t)
    with pytest.raises(ValueError, match="returned already"):
        pool.put(t)


def test_borrow_returns_on_exception():
    pool = BufferPool(pin=False)
    with pytest.raises(KeyError):
        with pool.borrow((4, 4), torch.float64) as t:
            assert t.shape == (4, 4) and t.data_ptr() % 4096 == 0
            raise KeyError("boom")
    assert pool.used_bytes == 0 and pool.idle_bytes == 128


def test_threads_share_a_pool():
    pool = BufferPool(pin=False)
    seen, errors = [], []

    def worker():
        try:
            for _ in range(200):
                with pool.borrow(4096) as t:
                    t.fill_(1)
                    seen.append(t.data_ptr())
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert pool.used_bytes == 0 and len(set(seen)) <= 4  # at most one buffer per thread was ever needed
