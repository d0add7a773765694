"""Reliability of ZeroOptimizer with real gloo processes: synced initial weights, hyperparameters checked across
ranks, parameters replaced after construction, backward passes that raised, all-or-nothing state dict loads,
ranks that skip a step, stall or die. Bodies in tests/zero_reliability_scenarios.py."""
import pytest

import zero_reliability_scenarios as R
from dist_helpers import check_all_ranks, run_scenarios


def _cases(names):
    return [pytest.param(w, n, id=f"{n}-{w}ranks") for w, lst in sorted(R.SCENARIOS_BY_WORLD.items())
            for n in lst if n in names]


def _values(scenario_results, world, name):
    return check_all_ranks(scenario_results("zero_reliability_scenarios", world, R.SCENARIOS_BY_WORLD[world]), name)


@pytest.mark.parametrize("world,name", _cases([n for n in R.SCENARIOS if n != "construction_honours_timeout"]))
def test_scenario_holds_on_every_rank(scenario_results, world, name):
    values = _values(scenario_results, world, name)
    assert len(values) == world
    if name == "load_fails_on_one_rank":
        assert all(v["seconds"] < R.NAMED_ERROR_S for v in values)
    if name.startswith("moved_after_construction"):
        assert all(v["moved"] > 0 and v["rel_err"] <= R.FP32_TOL for v in values), values
    if name.startswith("hyper_"):
        assert all("rank 1 differs from rank 0" in v["message"] for v in values), values


@pytest.mark.parametrize("world,name", _cases(["construction_honours_timeout"]))
def test_construction_check_honours_comm_timeout(scenario_results, world, name):
    values = _values(scenario_results, world, name)
    assert 1.5 <= values[0]["seconds"] <= R.NAMED_ERROR_S, values


def test_a_skipped_step_is_a_named_error_on_every_rank():
    res = run_scenarios(2, "zero_reliability_scenarios", ["skipped_step"], timeout_s=120)
    values = check_all_ranks(res, "skipped_step")
    assert all(v["seconds"] < R.NAMED_ERROR_S for v in values)
    assert "rank 0 is in step() #3 (micro-step 1); rank 1 is in a backward pass #3 (micro-step 0)" in \
        values[0]["message"], values


def test_a_dead_rank_is_named_by_the_survivors():
    res = run_scenarios(2, "zero_reliability_scenarios", ["a_rank_dies_mid_step"], timeout_s=120,
                        clean_exit=False, grace_s=R.NAMED_ERROR_S + 10)
    survivor, dead = res["a_rank_dies_mid_step"]
    assert "exit code 3" in dead["error"], dead
    assert survivor.get("ok"), survivor
    assert survivor["value"]["seconds"] < R.NAMED_ERROR_S and "rank 1 of 2 did not answer" in survivor["value"]["message"]
