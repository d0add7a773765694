"""Parametrization helpers for the test_zero_*.py files: which (world size, scenario) pairs to run."""
import pytest

import zero_scenarios as Z
from dist_helpers import check_all_ranks


def cases(names):
    return [pytest.param(w, n, id=f"{n}-{w}ranks") for w, lst in sorted(Z.SCENARIOS_BY_WORLD.items())
            for n in lst if n in names]


def values(scenario_results, world, name):
    """Per-rank return values of a scenario (it asserted inside); raises with every rank's error."""
    return check_all_ranks(scenario_results("zero_scenarios", world, Z.SCENARIOS_BY_WORLD[world]), name)
