"""ZeroOptimizer and the host block cache (zerocore/zero/host_memory.py): installed while an optimizer of a host
model is open, shared by several, given back on close() or when a dropped optimizer is collected, and in steady
state a training step maps no new host block (every large tensor reuses one freed in the step before)."""
import gc

import pytest
import torch

from zerocore.ops import host_cache
from zerocore.zero import ZeroConfig, ZeroOptimizer, host_memory


def _model(seed=0):
    torch.manual_seed(seed)   # 2 MiB weights: their gradients are host-cache blocks
    return torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512))


def _train(model, opt, steps):
    torch.manual_seed(1)
    for _ in range(steps):
        opt.backward(model(torch.randn(16, 512)).square().mean())
        opt.step()
        opt.zero_grad()


@pytest.fixture(autouse=True)
def no_cache_left_behind():
    gc.collect()
    assert not host_memory.active()
    yield
    gc.collect()
    assert not host_memory.active() and not host_cache.installed()


def test_installed_while_open_and_steady_steps_map_nothing_new(single_rank_group):
    model = _model()
    opt = ZeroOptimizer(model, stage=2, lr=1e-3)
    assert host_cache.installed()
    _train(model, opt, 2)
    warm = opt.memory_report()["host_block_cache"]
    _train(model, opt, 3)
    steady = opt.memory_report()["host_block_cache"]
    assert steady["misses"] == warm["misses"], (warm, steady)       # no block mapped after warm-up ...
    assert steady["hits"] >= warm["hits"] + 3 * 2                   # ... every weight gradient reused one
    assert steady["live_bytes"] + steady["cached_bytes"] <= steady["peak_live_bytes"] + (4 << 20)
    opt.close()
    assert not host_cache.installed()
    assert opt.memory_report()["host_block_cache"] is None


def test_training_is_identical_with_and_without_the_cache(single_rank_group):
    params = []
    for use_cache in (True, False):
        model = _model()
        opt = ZeroOptimizer(model, stage=2, lr=1e-3, host_block_cache=use_cache)
        assert host_cache.installed() == use_cache
        _train(model, opt, 3)
        opt.close()
        params.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*params))


def test_shared_by_optimizers_until_the_last_one_closes(single_rank_group):
    m1, m2 = _model(1), _model(2)
    o1, o2 = ZeroOptimizer(m1, stage=1), ZeroOptimizer(m2, stage=2)
    o1.close()
    assert host_cache.installed()
    _train(m2, o2, 1)
    o2.close()
    o2.close()                      # idempotent: gives its share back once
    assert not host_cache.installed()


def test_a_dropped_optimizer_gives_its_share_back(single_rank_group):
    model = _model()
    opt = ZeroOptimizer(model, stage=2)
    _train(model, opt, 1)
    del opt, model                  # hooks make a cycle: the collector frees it
    gc.collect()
    assert not host_cache.installed()


def test_option_is_validated():
    with pytest.raises(ValueError, match="host_block_cache='yes' must be True or False"):
        ZeroConfig(host_block_cache="yes")
