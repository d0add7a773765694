"""ZeroInit and load_partitioned: partitioned construction equals a plain build and holds 1/N of the model plus
one module; a meta-device model reads its pieces of a safetensors file; both train under stage 3 like
single-process AdamW (bodies in tests/zero_init_scenarios.py)."""
import pytest

import zero_init_scenarios as I
from dist_helpers import check_all_ranks


@pytest.mark.parametrize("world", [2, 4])
def test_zero_init_builds_the_plain_model_in_pieces(scenario_results, world):
    res = scenario_results("zero_init_scenarios", world, I.SCENARIOS_BY_WORLD[world])
    for v in check_all_ranks(res, "zero_init_equals_plain_build"):
        assert v["held"] == v["pieces"] and v["rel_err"] <= 1e-5, v


@pytest.mark.parametrize("world", [2, 4])
def test_a_meta_model_loads_only_its_pieces_of_safetensors(scenario_results, world):
    res = scenario_results("zero_init_scenarios", world, I.SCENARIOS_BY_WORLD[world])
    for v in check_all_ranks(res, "meta_model_from_safetensors"):
        assert v["rel_err"] <= 1e-5, v
