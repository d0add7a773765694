"""Collectives: both strategies are exact, the backend default, and timeouts that name the operation."""
import pytest

import zero_scenarios as Z
from zero_cases import cases, values
from zerocore.zero.collectives import default_strategy


@pytest.mark.parametrize("world,name", cases(["collectives_exact"]))
def test_reduce_and_gather_are_exact(scenario_results, world, name):
    for v in values(scenario_results, world, name):
        assert v == {"all_reduce": True, "scatter_gather": True}


@pytest.mark.parametrize("world,name", cases(["collective_timeout"]))
def test_timeout_names_the_operation(scenario_results, world, name):
    vals = values(scenario_results, world, name)
    assert "all_reduce (reduction) of unit" in vals[0]["message"] or "reduce_scatter of unit" in vals[0]["message"]
    assert vals[0]["seconds"] < 30


def test_default_strategy_per_backend():
    assert default_strategy("gloo") == "all_reduce"
    assert default_strategy("nccl") == "scatter_gather"
