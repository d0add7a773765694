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
    # The first collective of a backward is the phase agreement (phases.py); it times out after comm_timeout_s
    assert "agreement on a backward pass #0" in vals[0]["message"]
    assert 1.9 <= vals[0]["seconds"] < 30


def test_default_strategy_per_backend():
    assert default_strategy("gloo") == "all_reduce"
    assert default_strategy("nccl") == "scatter_gather"


def test_a_dead_rank_is_reported_not_hung():
    """The harness (and so every multi-process test) fails fast, naming the rank and its signal."""
    import time
    from dist_helpers import run_scenarios
    t0 = time.monotonic()
    res = run_scenarios(2, "zero_scenarios", ["rank_dies"], timeout_s=120, clean_exit=False, grace_s=30)
    elapsed = time.monotonic() - t0
    errors = [r.get("error", "") for r in res["rank_dies"]]
    assert not any(r.get("ok") for r in res["rank_dies"]), res
    assert "rank 1 died (exit code -6, SIGABRT)" in errors[1], errors
    # The survivor's engine names the dead peer (store check-in, collectives.py) instead of a timeout.
    assert "PeerFailure" in errors[0] and "rank 1 of 2 did not answer" in errors[0], errors[0]
    assert "did not finish within" not in errors[0], errors[0]
    assert elapsed < 60, f"took {elapsed:.0f} s to notice a dead rank"
