"""ZeroInit and load_partitioned: partitioned construction equals a plain build and holds 1/N of the model plus
one module; a meta-device model reads its pieces of a safetensors file; both train under stage 3 like
single-process AdamW (bodies in tests/zero_init_scenarios.py)."""
import pytest
import torch

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


class _ParentInitializes(torch.nn.Module):
    """Initializes its child's weight after taking it (the HF `post_init` pattern), which ZeroInit cannot honour."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        torch.nn.init.zeros_(self.lin.weight)


def test_a_parent_that_initializes_taken_children_is_refused(single_rank_group):
    from zerocore.zero import ZeroInit, ZeroOptimizer
    with ZeroInit():
        model = _ParentInitializes()
    with pytest.raises(RuntimeError, match="written, cast or moved after its parent module took it"):
        ZeroOptimizer(model, stage=3, param_persistence_threshold=0)


class _Scalars(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight
        self.scale = torch.nn.Parameter(torch.tensor(2.5))                 # 0-dim
        self.register_buffer("steps", torch.tensor(7))                     # 0-dim, persistent
        self.register_buffer("cache", torch.ones(3), persistent=False)    # never in a checkpoint

    def forward(self, idx):
        return self.head(self.emb(idx)) * self.scale


def test_load_partitioned_reads_tied_once_scalars_and_skips_non_persistent_buffers(single_rank_group, tmp_path):
    from safetensors.torch import save_model
    from zerocore.zero import ZeroOptimizer, load_partitioned
    torch.manual_seed(0)
    plain = _Scalars()
    save_model(plain, str(tmp_path / "model.safetensors"))      # stores the tied weight under one name only
    with torch.device("meta"):
        model = _Scalars()
    model.cache = torch.ones(3)                                    # the module recreates what is not saved
    load_partitioned(model, tmp_path)
    opt = ZeroOptimizer(model, stage=3, param_persistence_threshold=0)
    try:
        full = opt.full_state_dict()
        for k, v in plain.state_dict().items():
            assert torch.equal(full[k], v), k
        assert model.head.weight is model.emb.weight
    finally:
        opt.close()


def test_load_partitioned_names_what_is_missing_or_misshapen(single_rank_group):
    from zerocore.zero import load_partitioned
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
    with pytest.raises(KeyError, match="bias"):
        load_partitioned(model, {"weight": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"weight has shape \(3, 2\)"):
        load_partitioned(model, {"weight": torch.zeros(3, 2), "bias": torch.zeros(2)})
