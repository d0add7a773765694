"""ZeroOptimizer precision: rank-dependent unused parameters (2 and 3 ranks), bf16 against a reference that rounds
like the engine, fp16 dynamic loss scaling (hysteresis, growth, accumulation, offload), fp32 offload +
accumulation, and the reported global gradient norm.

The multi-rank bodies live in tests/zero_precision_scenarios.py; every scenario already asserts inside, and
these tests check the numbers it returns on every rank.

rank_unused_* guard a bug these scenarios found: the order of the per-unit parameter gathers was taken from the
modules *this rank* saw run before its first step, so ranks that ran different branches issued the gathers in
different orders (on gloo: units silently swapped data at 2 ranks, SIGABRT at 3). The first step now adopts rank
0's order (optimizer.py, step()). The rank_unused_warm_* variants run every branch on every rank at step 0.
"""
import pytest

import zero_precision_scenarios as P
import zero_scenarios as Z
from dist_helpers import check_all_ranks

MODULE = "zero_precision_scenarios"


def cases(names):
    return [pytest.param(w, n, id=f"{n}-{w}ranks") for w, lst in sorted(P.NAMES_BY_WORLD.items()) for n in lst
            if n in names]


def values(scenario_results, world, name):
    """Per-rank return values of a scenario (it asserted inside); raises with every rank's error."""
    return check_all_ranks(scenario_results(MODULE, world, P.NAMES_BY_WORLD[world]), name)


@pytest.mark.parametrize("world,name", cases(P.RANK_UNUSED_WARM + P.RANK_UNUSED))
def test_rank_dependent_unused_parameters(scenario_results, world, name):
    vs = values(scenario_results, world, name)
    assert len(vs) == world
    for v in vs:
        assert v["ranks_agree"], v
        assert v["rel_err"] <= Z.FP32_TOL, v
        assert v["norm_err"] <= P.NORM_TOL_FP32, v
        assert v["global_steps"] == 10, v
        assert v["sometimes_steps"] == 10, v              # some rank had its gradient at every step
        assert v["lonely_steps"] == P.lonely_steps(10) == 4, v   # skipped on the steps no rank used it
        assert v["never_steps"] == 0 and v["never_unchanged"], v
        assert v["lonely_trained"], v
        assert v["moved"] > 100 * Z.FP32_TOL, v            # training moved the parameters: the check is not vacuous
    assert len({v["rel_err"] for v in vs}) == 1            # the same parameters everywhere


@pytest.mark.parametrize("world,name", cases(P.BF16))
def test_bf16_matches_a_reference_that_rounds_like_the_engine(scenario_results, world, name):
    for v in values(scenario_results, world, name):
        assert v["global_steps"] == 10, v
        assert v["rel_err"] <= P.ROUNDED_TOL, v
        assert v["master_rel_err"] <= P.ROUNDED_MASTER_TOL, v
        assert v["norm_err"] <= P.ROUNDED_NORM_TOL, v
        # The tolerances reject a 10% lr error and a dropped step (same reference, same data).
        assert v["lr_x1.1_rel_err"] > P.ROUNDED_TOL and v["dropped_step_rel_err"] > P.ROUNDED_TOL, v
        assert v["lr_x1.1_master_rel_err"] > P.ROUNDED_MASTER_TOL, v
        assert v["dropped_step_master_rel_err"] > P.ROUNDED_MASTER_TOL, v
        assert v["engine_vs_lr_x1.1"] > P.ROUNDED_TOL and v["engine_vs_dropped_step"] > P.ROUNDED_TOL, v
        assert v["fp32_rel_err"] <= Z.LOW_PRECISION_TOL, v


S = 2.0 ** 16


@pytest.mark.parametrize("world,name", cases(P.FP16))
def test_fp16_dynamic_loss_scaling(scenario_results, world, name):
    for v in values(scenario_results, world, name):
        assert v["skipped"] == v["expected_skipped"] == v["ref_skipped"], v
        assert v["skipped_steps"] == len(v["expected_skipped"]), v
        assert v["scales"] == v["expected_scales"], v
        assert v["changed_on_skip"] == [], v
        assert v["global_steps"] == len(v["scales"]) - len(v["skipped"]), v
        assert v["rel_err"] <= P.ROUNDED_TOL and v["master_rel_err"] <= P.ROUNDED_MASTER_TOL, v
        assert v["norm_err"] <= P.ROUNDED_NORM_TOL, v
        assert v["fp32_rel_err"] <= Z.LOW_PRECISION_TOL and v["fp32_rel_err"] <= 0.25 * v["moved"], v
        sc = v["scales"]
        if "hysteresis" in name:           # hysteresis 2: the first overflow (step 2) keeps the scale
            assert v["skipped"] == [2, 3] and sc[2] == S and sc[3] == S / 2, v
        elif "growth" in name:             # window 3: back up after 3 clean steps, twice; then hysteresis again
            assert sc[2] == S / 2 and sc[4] == S / 2 and sc[5] == S and sc[8] == 2 * S and sc[9] == 2 * S, v
        elif "ga" in name:                 # overflow in either micro-step skips the step
            assert v["skipped"] == [2, 5] and sc[4] == 2.0 ** 12 and sc[5] == 2.0 ** 11, v
        elif "offload" in name:
            assert v["skipped"] == [3, 4] and sc[3] == S and sc[4] == S / 2, v


@pytest.mark.parametrize("world,name", cases(P.OFFLOAD_GA))
def test_offload_with_accumulation_fp32(scenario_results, world, name):
    for v in values(scenario_results, world, name):
        assert v["global_steps"] == 8, v
        assert v["rel_err"] <= Z.FP32_TOL, v
        assert v["norm_err"] <= P.NORM_TOL_FP32, v
        assert v["moved"] > 100 * Z.FP32_TOL, v
