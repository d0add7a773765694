"""Hierarchical sharding: shard_group_size=2 on 4 gloo ranks (bodies in tests/zero_hierarchy_scenarios.py)."""
import pytest

import zero_hierarchy_scenarios as H
import zero_scenarios as Z
from dist_helpers import check_all_ranks

WORLD = 4


def _values(scenario_results, name):
    return check_all_ranks(scenario_results("zero_hierarchy_scenarios", WORLD, H.SCENARIOS), name)


@pytest.mark.parametrize("name", ["mlp_k2_s1", "mlp_k2_s2", "gpt_ga_clip_k2_s2", "mlp_scatter_gather_k2_s2",
                                  "mlp_k2_s3", "gpt_k2_s3"])
def test_shard_groups_train_like_single_process_adamw(scenario_results, name):
    for v in _values(scenario_results, name):
        assert v["rel_err"] <= max(Z.FP32_TOL, v.get("ddp_rel_err", 0.0)), v
        assert (v["shard_size"], v["replicas"]) == (2, 2), v
        assert v["unit_padded"] == 2 * v["unit_shard"], v        # units are cut in 2, not 4
        assert v.get("replicas_agree", True), v                    # replicas hold bit-identical state
        if "grad_norm" in v:
            assert v["grad_norm"] == pytest.approx(v["ref_grad_norm"], rel=1e-4), v


@pytest.mark.parametrize("name", ["accounting_k2_s2", "accounting_k2_s3"])
def test_memory_follows_the_formula_with_k(scenario_results, name):
    for v in _values(scenario_results, name):
        assert v["rep_formula"] == v["k_formula"] != v["n_formula"], v
        assert abs(v["held"] - v["formula"]) <= v["slack"], v


def test_checkpoints_are_written_once_per_shard_and_load_at_another_layout(scenario_results):
    for v in _values(scenario_results, "checkpoint_k2_loads_without_shard_groups"):
        assert v["files"] == ["rank00000-of-00002.safetensors", "rank00001-of-00002.safetensors"], v
        assert v["steps"] == 8 and v["rel_err_vs_uninterrupted"] <= 1e-6 and v["rel_err_vs_ref"] <= Z.FP32_TOL, v


def test_a_group_size_that_does_not_divide_the_ranks_is_named(scenario_results):
    for v in _values(scenario_results, "bad_group_size_is_named"):
        assert "shard_group_size=3 must divide the number of ranks (4)" in v["message"], v


def test_ranks_asking_for_different_group_sizes_are_refused_on_every_rank(scenario_results):
    for v in _values(scenario_results, "mismatched_group_size_is_named"):
        assert "different shard_group_size values" in v["message"] and "[2, 2, None, None]" in v["message"], v


def test_a_failed_construction_destroys_its_groups(scenario_results):
    for v in _values(scenario_results, "failed_construction_leaves_no_group"):
        assert v["after"] == v["before"], v
