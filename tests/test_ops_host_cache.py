"""zerocore.ops.host_cache: torch's CPU allocator with large blocks reused by size (csrc/memory/).

The block cache's own rules (footprint bound, windows, threads) are tested in tests/cpp/test_block_cache.cpp;
these tests check the torch side: which requests it serves, that tensors computed through it equal those of
torch's allocator, that tensors outlive an uninstall, and that storages resize through it.
"""
import gc
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from zerocore.ops import host_cache
from zerocore.zero import host_memory

MiB = 1 << 20


@pytest.fixture
def cache():
    gc.collect()                      # optimizers dropped without close() give their share back when collected
    assert not host_memory.active(), "an earlier test left a ZeroOptimizer (and its host block cache) open"
    assert host_cache.install(min_block_bytes=MiB)
    host_cache.empty_cache()
    try:
        yield host_cache
    finally:
        host_cache.uninstall()


def test_large_tensors_reuse_blocks_and_small_ones_stay_with_torch(cache):
    before = cache.stats()
    a = torch.empty(4 * MiB // 4)
    ptr = a.data_ptr()
    del a
    b = torch.empty(4 * MiB // 4)
    assert b.data_ptr() == ptr
    s = cache.stats()
    assert s["hits"] == before["hits"] + 1 and s["misses"] == before["misses"] + 1
    assert s["live_bytes"] == before["live_bytes"] + 4 * MiB
    small = torch.empty(1000)                       # 4 KB: torch's allocator, not counted
    assert cache.stats()["misses"] == s["misses"] and cache.stats()["live_bytes"] == s["live_bytes"]
    del b, small
    assert cache.stats()["live_bytes"] == before["live_bytes"]


def test_results_equal_torch_allocator_results(cache):
    torch.manual_seed(0)
    x, w1, w2 = torch.randn(64, 1024), torch.randn(1024, 2048), torch.randn(2048, 512)   # w1: 8 MiB, cached

    def compute():
        h = torch.nn.functional.gelu(x @ w1)
        return (h @ w2).softmax(-1), torch.cat([w1, w1]).sum(0)

    with_cache = compute()
    hits_before = cache.stats()["hits"]
    again = compute()                                   # the same sizes again: served from cached blocks
    assert cache.stats()["hits"] > hits_before
    cache.uninstall()
    assert not cache.installed()
    plain = compute()
    for a, b, c in zip(with_cache, again, plain):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_tensors_outlive_uninstall(cache):
    t = torch.randn(2 * MiB)                            # 8 MiB from the cache
    expected = t.clone()
    cache.uninstall()
    t.mul_(2)                                           # still mapped and writable
    assert torch.equal(t, expected * 2)
    unmaps = cache.stats()["unmaps"]
    del t                                               # caching is off now: its block is unmapped at once
    assert cache.stats()["unmaps"] == unmaps + 1


def test_storage_resize_goes_through_the_cache(cache):
    t = torch.full((2 * MiB,), 7, dtype=torch.uint8)  # a tensor's storage remembers the allocator it came from
    s = t.untyped_storage()
    s.resize_(6 * MiB)                                  # a new 6 MiB block from the cache, old contents copied
    grown = torch.tensor([], dtype=torch.uint8).set_(s)
    assert grown.numel() == 6 * MiB and bool((grown[:2 * MiB] == 7).all())
    assert cache.stats()["live_bytes"] >= 6 * MiB


def test_a_window_returns_blocks_nobody_asked_for(cache):
    t = torch.empty(3 * MiB)
    del t
    assert cache.stats()["cached_bytes"] == 12 * MiB
    cache.start_window()                                # used in the window that just ended: kept
    assert cache.stats()["cached_bytes"] == 12 * MiB
    cache.start_window()                                # unused for a whole window: unmapped
    assert cache.stats()["cached_bytes"] == 0


def test_threads_allocate_concurrently(cache):
    torch.manual_seed(1)
    inputs = [torch.randn(512, 1024) for _ in range(4)]
    expected = [(i @ i.T).sum(0) for i in inputs]
    results = [None] * 4

    def work(k):
        for _ in range(20):
            results[k] = (inputs[k] @ inputs[k].T).sum(0)     # 1 MiB products, allocated and freed concurrently

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(torch.equal(r, e) for r, e in zip(results, expected))
    assert cache.stats()["unmap_failures"] == 0


def test_onednn_raw_allocations_survive_uninstall():
    """oneDNN (ideep) allocates through the current CPU allocator's raw_allocate and frees through whichever one
    is current later: a block from the cache freed after uninstall() must come back to the cache, not to free()
    (which would crash). In a child process, so a crash fails this test only."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    script = textwrap.dedent("""
        import torch
        from zerocore.ops import host_cache
        assert host_cache.install(1 << 20)
        src = torch.randn(1 << 20)
        before = host_cache.stats()["live_bytes"]
        m = src.to_mkldnn()                       # 4 MiB through raw_allocate: a cache block
        assert host_cache.stats()["live_bytes"] == before + (4 << 20), host_cache.stats()
        host_cache.uninstall()
        assert torch.equal(m.to_dense(), src)
        unmaps = host_cache.stats()["unmaps"]
        del m                                     # raw_deallocate after uninstall
        assert host_cache.stats()["unmaps"] == unmaps + 1, host_cache.stats()
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_bad_min_block_bytes_is_refused():
    with pytest.raises(ValueError, match="min_block_bytes=100"):
        host_cache.install(min_block_bytes=100)
