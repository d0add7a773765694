"""Units: backward-order grouping, padding, ownership maps and parameter views."""
import random

import pytest
import torch

from zerocore.zero.units import build_units, materialize, ownership


def _params(sizes):
    return [(f"p{i}", torch.nn.Parameter(torch.randn(s))) for i, s in enumerate(sizes)]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_every_element_owned_exactly_once(world):
    rng = random.Random(world)
    sizes = [rng.randint(1, 40) for _ in range(17)] + [1, 3]
    named = _params(sizes)
    covered = {n: torch.zeros(p.numel(), dtype=torch.int32) for n, p in named}
    for rank in range(world):
        units = build_units(named, [0] * len(named), bucket_size=50, world_size=world, rank=rank)
        for u in units:
            assert u.padded_numel % world == 0 and u.padded_numel - u.numel < world
            lo, hi = u.shard_range()
            for s in u.slots:
                assert (s.own_start, s.own_end) == ownership(s.offset, s.numel, u.padded_numel, world, rank)
                covered[s.name][s.own_start:s.own_end] += 1
                if s.owned_numel:
                    # the owned range sits at shard_pos of this rank's shard
                    assert lo + s.shard_pos == s.offset + s.own_start and lo + s.shard_pos + s.owned_numel <= hi
    assert all(bool((c == 1).all()) for c in covered.values())


def test_backward_order_bucketing_and_groups():
    named = _params([10, 10, 10, 10, 10])
    units = build_units(named, [0, 1, 0, 1, 0], bucket_size=20, world_size=2, rank=0)
    for u in units:
        assert len({named[s.index][0] for s in u.slots}) == len(u.slots)
        assert len({[0, 1, 0, 1, 0][s.index] for s in u.slots}) == 1          # never mixes groups
        assert u.numel <= 20
    order = [s.index for u in units for s in u.slots]
    assert sorted(order) == list(range(5))
    assert units[0].slots[0].index == 4                                      # last registered reduces first


def test_module_params_stay_together():
    lin1, lin2 = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)   # 20 elements each
    named = [("a.w", lin1.weight), ("a.b", lin1.bias), ("b.w", lin2.weight), ("b.b", lin2.bias)]
    units = build_units(named, [0] * 4, bucket_size=30, world_size=2, rank=0, module_of=[0, 0, 1, 1])
    assert [[s.name for s in u.slots] for u in units] == [["b.b", "b.w"], ["a.b", "a.w"]]


def test_materialize_makes_views_and_keeps_values():
    named = _params([5, 7])
    values = [p.detach().clone() for _, p in named]
    (u,) = build_units(named, [0, 0], bucket_size=100, world_size=4, rank=2)
    flat = materialize(u, torch.bfloat16, torch.device("cpu"))
    assert flat.numel() == 12 and flat.dtype == torch.bfloat16
    for (_, p), v in zip(named, values):
        assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        torch.testing.assert_close(p.float(), v.to(torch.bfloat16).float(), rtol=0, atol=0)
    flat.fill_(1.0)
    assert all(bool((p == 1).all()) for _, p in named)
