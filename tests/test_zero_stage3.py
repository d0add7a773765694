"""ZeRO stage 3 end to end: parity with single-process AdamW (MLP, tied-embedding transformer, activation
checkpointing, a module called twice, frozen and unused parameters, offload, accumulation, clipping, bf16),
evaluation and gathered(), exact memory accounting, ranks that diverge. Multi-rank bodies live in
tests/zero_stage3_scenarios.py (one spawned gloo group per world size runs them all)."""
import pytest
import torch

import zero_stage3_scenarios as S
from dist_helpers import check_all_ranks
from zerocore.zero import ZeroConfig, ZeroOptimizer
from zerocore.zero.units import build_module_units


def _cases(names):
    return [pytest.param(w, n, id=f"{n}-{w}ranks") for w, lst in sorted(S.SCENARIOS_BY_WORLD.items())
            for n in lst if n in names]


def _values(scenario_results, world, name):
    return check_all_ranks(scenario_results("zero_stage3_scenarios", world, S.SCENARIOS_BY_WORLD[world]), name)


@pytest.mark.parametrize("world,name", _cases(S.PARITY))
def test_stage3_fp32_parity_with_single_process_adamw(scenario_results, world, name):
    for v in _values(scenario_results, world, name):
        # <= 1e-5, or no worse than DDP measured in the same scenario; the gradient norm within 1e-4
        assert v["rel_err"] <= max(S.Z.FP32_TOL, v.get("ddp_rel_err", 0.0)), v
        assert v["steps"] == 6 and v["partitioned_units"] >= 2, v
        assert v["grad_norm"] == pytest.approx(v["ref_grad_norm"], rel=1e-4), v


@pytest.mark.parametrize("world,name", _cases(S.LOW_PRECISION))
def test_stage3_bf16_against_fp32_reference(scenario_results, world, name):
    for v in _values(scenario_results, world, name):
        assert v["rel_err"] <= S.Z.LOW_PRECISION_TOL and v["rel_err"] <= 0.25 * v["moved"], v


@pytest.mark.parametrize("world", [2, 4])
def test_stage3_evaluation_gathered_and_full_state_dict(scenario_results, world):
    for v in _values(scenario_results, world, "eval_and_gathered_s3"):
        assert v["gathers_in_context"] == 3, v     # one per partitioned unit, not one per forward call


@pytest.mark.parametrize("world,name", [(2, "accounting_fp32_s3"), (2, "accounting_bf16_s3"),
                                        (4, "accounting_bf16_s3")])
def test_stage3_memory_is_16_psi_over_n_plus_persistent(scenario_results, world, name):
    for v in _values(scenario_results, world, name):
        assert v["held"] == pytest.approx(v["formula"], abs=2000), v


@pytest.mark.parametrize("name", ["master_weights_s2", "master_weights_s3"])
def test_full_state_dict_of_the_fp32_masters(scenario_results, name):
    rank0, rank1 = _values(scenario_results, 2, name)
    assert rank1 == {"empty": True}
    assert rank0["keys_equal"] and rank0["masters_exact"] and rank0["fp32"] and rank0["low_is_rounded"], rank0
    assert rank0["moved"] > 1e-3, rank0            # training changed the weights (not just the initial values)


def test_stage3_autograd_grad_is_not_a_micro_step(scenario_results):
    for v in _values(scenario_results, 2, "autograd_grad_is_not_a_micro_step_s3"):
        assert v["rel_err"] <= S.Z.FP32_TOL, v


@pytest.mark.parametrize("world,name", _cases(S.MISMATCH))
def test_stage3_ranks_that_diverge_raise_on_every_rank(scenario_results, world, name):
    messages = [v["message"] for v in _values(scenario_results, world, name)]
    assert len(set(messages)) == 1, messages       # the same error on every rank


def test_units_follow_modules_and_tied_parameters_go_to_the_common_ancestor():
    model = S.Z.gpt()
    named = list(model.named_parameters())
    units = build_module_units(model, named, [0] * len(named), bucket_size=10**9, unit_modules=("Block",),
                               persistence_threshold=40, world_size=2, rank=0)
    owners = {u.owner for u in units if not u.persistent}
    assert owners == {"", "blocks.0", "blocks.1"}
    root = next(u for u in units if u.owner == "")
    assert "emb.weight" in [s.name for s in root.slots]        # registered by emb and head: their ancestor
    small = [s.name for u in units if u.persistent for s in u.slots]
    assert "norm.weight" in small and "blocks.0.fc1.bias" not in small       # 32 <= 40 < 128
    # Every trainable parameter is in exactly one unit.
    assert sorted(s.name for u in units for s in u.slots) == sorted(n for n, _ in named)


def test_containers_without_a_forward_never_own_units():
    """A ModuleList is never called, so its hooks would never gather a unit it owned: the parameters its
    children leave go up to the module that calls them (here the model)."""
    class Blocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(40, 40) for _ in range(2))   # 1640 each

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    model = Blocks()
    named = list(model.named_parameters())
    units = build_module_units(model, named, [0] * len(named), bucket_size=3000, unit_modules=None,
                               persistence_threshold=0, world_size=2, rank=0)
    assert {u.owner for u in units} == {""}, [u.owner for u in units]      # not "blocks" (3280 >= 3000)
    with pytest.warns(UserWarning, match=r"unit_modules names \['ModuleList'\], which have no forward"):
        units = build_module_units(model, named, [0] * len(named), bucket_size=10**6,
                                   unit_modules=("ModuleList",), persistence_threshold=0, world_size=2, rank=0)
    assert {u.owner for u in units} == {""}


def test_stage3_options_are_validated():
    with pytest.raises(ValueError, match="needs stage=3"):
        ZeroConfig(stage=2, offload_param="cpu")
    with pytest.raises(ValueError, match="unit_modules holds"):
        ZeroConfig(stage=3, unit_modules=[3])
    with pytest.raises(ValueError, match="param_persistence_threshold"):
        ZeroConfig(stage=3, param_persistence_threshold=-1)
    assert ZeroConfig(stage=3, unit_modules={torch.nn.Linear, "Block"}).unit_modules == ("Block", "Linear")
    ds = ZeroConfig.from_deepspeed({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10,
                                                          "offload_param": {"device": "cpu"}}})
    assert (ds.stage, ds.param_persistence_threshold, ds.offload_param) == (3, 10, "cpu")


def test_stage3_parameters_keep_their_shape_and_are_safe_placeholders_between_uses(single_rank_group):
    import warnings
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))
    want = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))
    want.load_state_dict(model.state_dict())
    opt = ZeroOptimizer(model, stage=3, param_persistence_threshold=0, bucket_size=100)
    try:
        w = model[0].weight
        # Full shape and device; the values are one shared NaN (no memory of its own, nothing out of bounds).
        assert w.shape == (32, 32) and w.device.type == "cpu" and w.untyped_storage().nbytes() == 4
        assert torch.isnan(w).all()
        with opt.gathered():
            torch.testing.assert_close(w, want[0].weight, rtol=0, atol=0)
            inside = model.state_dict()            # copies: still valid after the context frees the unit
        assert torch.isnan(w).all()
        torch.testing.assert_close(inside["0.weight"], want[0].weight, rtol=0, atol=0)
        with pytest.warns(RuntimeWarning, match="full_state_dict"):
            outside = model.state_dict()
        assert torch.isnan(outside["0.weight"]).all()
        x = torch.randn(2, 32)
        torch.testing.assert_close(model(x), want(x))            # the hooks gather for forward
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            full = opt.full_state_dict()
        torch.testing.assert_close(full["1.weight"], want[1].weight, rtol=0, atol=0)
    finally:
        opt.close()


def test_modules_inside_multihead_attention_never_own_units():
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    named = list(layer.named_parameters())
    units = build_module_units(layer, named, [0] * len(named), bucket_size=10**9, unit_modules=("Linear",),
                               persistence_threshold=0, world_size=2, rank=0)
    owners = {u.owner for u in units}
    # The layer itself reads linear1/linear2 in its fast path, and attention reads out_proj: all the root's.
    assert owners == {""}, owners


def test_a_parameter_read_outside_its_module_is_named_at_the_step(single_rank_group):
    class ReadsChild(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.nn.functional.linear(self.a(x), self.b.weight)     # b's weight, b never called

    model = ReadsChild()
    opt = ZeroOptimizer(model, stage=3, unit_modules={"Linear"}, param_persistence_threshold=0)
    try:
        opt.backward(model(torch.randn(2, 8)).square().mean())
        with pytest.raises(RuntimeError, match=r"b\.weight.*never ran.*unit_modules"):
            opt.step()
    finally:
        opt.close()


def test_a_write_to_a_partitioned_parameter_is_refused_not_lost(single_rank_group):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    opt = ZeroOptimizer(model, stage=3, param_persistence_threshold=0, bucket_size=10)
    try:
        with torch.no_grad():
            model[0].weight.zero_()          # outside gathered(): its values live in the shards
        with pytest.raises(RuntimeError, match=r"0\.weight.*written while partitioned.*gathered_parameters"):
            model(torch.randn(2, 8))
    finally:
        opt.close()
