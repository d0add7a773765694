"""Ranks that disagree about the model raise on every rank, naming the first difference."""
import pytest
import torch

import zero_scenarios as Z
from zero_cases import cases, values
from zerocore.zero.consistency import describe, first_difference


@pytest.mark.parametrize("world,name", cases(["mismatched_ranks"]))
def test_mismatch_raises_on_every_rank(scenario_results, world, name):
    msgs = [v["message"] for v in values(scenario_results, world, name)]
    assert len(msgs) == world and all("'1.weight'" in m and "shape" in m for m in msgs)


def _desc(shapes, opts=None, dtype=torch.float32):
    params = [(f"p{i}", torch.nn.Parameter(torch.zeros(s, dtype=dtype))) for i, s in enumerate(shapes)]
    return describe(params, [0] * len(params), opts or {"stage": 2})


def test_first_difference_names_field():
    assert first_difference(_desc([(2, 3)]), _desc([(2, 3)])) == ""
    assert "shape (2, 3) vs (2, 4)" in first_difference(_desc([(2, 3)]), _desc([(2, 4)]))
    assert "dtype" in first_difference(_desc([(2,)]), _desc([(2,)], dtype=torch.bfloat16))
    assert "number of parameters: 1 vs 2" in first_difference(_desc([(2,)]), _desc([(2,), (3,)]))
    assert "option 'stage': 1 vs 2" in first_difference(_desc([(2,)], {"stage": 1}), _desc([(2,)]))
