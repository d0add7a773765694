"""Gradient reduction paths (overlap on/off, both collective strategies) and the bucket pool."""
import pytest
import torch

import zero_scenarios as Z
from zero_cases import cases, values
from zerocore.zero import reductions
from zerocore.zero.buckets import BucketPool
from zerocore.zero import ZeroOptimizer

PATHS = ["mlp_no_overlap_s2", "mlp_scatter_gather_s1", "mlp_scatter_gather_s2", "mlp_offload_s1", "mlp_offload_s2"]


@pytest.mark.parametrize("world,name", cases(PATHS))
def test_reduction_paths_match_reference(scenario_results, world, name):
    for v in values(scenario_results, world, name):
        assert v["rel_err"] <= max(Z.FP32_TOL, v.get("ddp_rel_err", 0.0))


@pytest.mark.parametrize("world,name", cases(Z.REDUCED))
def test_reduced_shards_equal_the_mean_gradient(scenario_results, world, name):
    """Including a parameter whose gradient shares memory with another's (it reaches the loss through a view):
    the direct reduction must not write into it in place."""
    for v in values(scenario_results, world, name):
        assert v["rel_err"] <= (Z.LOW_PRECISION_TOL if "fp16" in name else Z.FP32_TOL), v
        if "direct" in name:
            assert v["direct_units"] > 0, v


def test_bucket_pool_reuses_and_bounds():
    pool = BucketPool(max_free_bytes=2 * 40)
    a = pool.get(10, torch.float32, torch.device("cpu"))
    b = pool.get(10, torch.float32, torch.device("cpu"))
    c = pool.get(10, torch.float32, torch.device("cpu"))
    for t in (a, b, c):
        pool.put(t)
    assert pool.free_bytes == 80                       # the third was dropped: bound respected
    assert pool.get(10, torch.float32, torch.device("cpu")).data_ptr() in (a.data_ptr(), b.data_ptr())
    assert pool.get(10, torch.bfloat16, torch.device("cpu")).dtype == torch.bfloat16


def test_bucket_pool_slabs_serve_every_unit_size():
    slab = 300_000                                     # 1.2 MB of fp32: a host slab on its own mmap
    pool = BucketPool(max_free_bytes=2 * slab * 4, slab_numel=slab)
    big = pool.get(slab, torch.float32, torch.device("cpu"))
    small = pool.get(1000, torch.float32, torch.device("cpu"))
    assert small.numel() == 1000 and big.numel() == slab
    assert small.data_ptr() % 4096 == 0 and big.data_ptr() % 4096 == 0    # page-aligned mmap slabs
    small.copy_(torch.arange(1000.0))
    assert torch.equal(small, torch.arange(1000.0))
    third = pool.get(5, torch.float32, torch.device("cpu"))
    for t in (big, small, third):
        pool.put(t)
    assert pool.free_bytes == 2 * slab * 4             # every size went back as a whole slab; bound respected
    again = pool.get(77, torch.float32, torch.device("cpu"))
    assert again.data_ptr() in (big.data_ptr(), small.data_ptr())       # a kept slab is reused for any size
    assert pool.get(slab + 1, torch.float32, torch.device("cpu")).numel() == slab + 1   # too big: exact buffer


def test_stage2_pool_is_bounded_and_reported(single_rank_group):
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 16), torch.nn.Linear(16, 8))
    opt = ZeroOptimizer(model, stage=2, bucket_size=100, max_inflight_reductions=1)
    biggest = max(u.padded_numel for u in opt.units)
    assert len(opt.units) > 2
    for _ in range(3):
        opt.backward(model(torch.randn(4, 32)).square().mean())
        opt.step()
        opt.zero_grad()
    rep = opt.memory_report()
    assert 0 < rep["pooled_buckets"] <= 2 * biggest * 4            # (max_inflight + 1) slabs at most
    assert rep["pooled_buckets"] % (biggest * 4) == 0               # whole slabs of the biggest unit


def test_stage2_frees_full_gradients(single_rank_group):
    from zerocore.zero import ZeroOptimizer
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    opt = ZeroOptimizer(m, stage=2, bucket_size=50)
    opt.backward(m(torch.randn(3, 8)).sum())
    assert all(p.grad is None for p in m.parameters())
    assert opt.grad_store.abs().sum() > 0


def test_stage1_grads_are_views_of_flat_buffers(single_rank_group):
    from zerocore.zero import ZeroOptimizer
    m = torch.nn.Linear(8, 2)
    opt = ZeroOptimizer(m, stage=1)
    opt.backward(m(torch.randn(3, 8)).sum())
    flat = opt.reducer.strategies[0].grad_flats[0]
    assert all(p.grad.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in m.parameters())
    m.zero_grad(set_to_none=True)                      # user replaced .grad: the engine re-attaches its views
    opt.step()
    opt.backward(m(torch.randn(3, 8)).sum())
    assert all(p.grad.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in m.parameters())


def test_direct_reduction_leaves_a_gradient_kept_by_a_user_hook_alone(single_rank_group, monkeypatch):
    """A hook registered before the engine's may keep the parameter's gradient tensor: the direct reduction must
    neither write into it nor free its memory (it copies it instead)."""
    monkeypatch.setattr(reductions, "DIRECT_MIN_BYTES", 0)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 128, bias=False)
    kept = []
    model.weight.register_post_accumulate_grad_hook(lambda p: kept.append((p.grad, p.grad.clone())))
    opt = ZeroOptimizer(model, stage=2, bucket_size=100)
    direct = opt.reducer.strategies[0]
    assert isinstance(direct, reductions.Direct)
    for _ in range(2):
        opt.backward(model(torch.randn(8, 64)).square().mean())
        opt.step()
        opt.zero_grad()
    assert direct.copies == 2          # the kept gradient was copied, once per step
    opt.close()
    assert len(kept) == 2
    for grad, copy in kept:
        assert grad.untyped_storage().nbytes() == grad.nbytes    # not freed under the hook's feet
        assert torch.equal(grad, copy)


def test_direct_reduction_copies_nothing_in_the_common_case(single_rank_group):
    """Autograd's own weight gradients are reduced where they are (the memory saving of the direct path)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512))
    opt = ZeroOptimizer(model, stage=2, bucket_size=100)
    direct = {s for s in opt.reducer.strategies if isinstance(s, reductions.Direct)}
    assert len(direct) == 1 and len(direct.pop().plans) == 2             # both 2 MiB weights
    for _ in range(2):
        opt.backward(model(torch.randn(8, 512)).square().mean())
        opt.step()
        opt.zero_grad()
    assert all(getattr(s, 'copies', 0) == 0 for s in opt.reducer.strategies)
    opt.close()
