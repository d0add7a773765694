"""Gradient reduction paths (overlap on/off, both collective strategies) and the bucket pool."""
import pytest
import torch

import zero_scenarios as Z
from zero_cases import cases, values
from zerocore.zero.grad_reducer import BucketPool

PATHS = ["mlp_no_overlap_s2", "mlp_scatter_gather_s1", "mlp_scatter_gather_s2", "mlp_offload_s1", "mlp_offload_s2"]


@pytest.mark.parametrize("world,name", cases(PATHS))
def test_reduction_paths_match_reference(scenario_results, world, name):
    for v in values(scenario_results, world, name):
        assert v["rel_err"] <= max(Z.FP32_TOL, v.get("ddp_rel_err", 0.0))


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
    flat = opt.reducer.grad_flats[0]
    assert all(p.grad.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in m.parameters())
    m.zero_grad(set_to_none=True)                      # user replaced .grad: the engine re-attaches its views
    opt.step()
    opt.backward(m(torch.randn(3, 8)).sum())
    assert all(p.grad.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in m.parameters())
