"""Exact byte accounting: what a rank holds equals the ZeRO formula for its stage and precision.

Stated resolution for mixed-precision stage 2: the reduced gradient shard is kept in the reduce dtype (2 bytes,
matching 2Ψ+14Ψ/N) when gradient_accumulation_steps == 1, and in fp32 when micro-steps accumulate into it
(then 2Ψ+16Ψ/N) - the accounting_bf16_s2_ga scenario checks that figure.
"""
import pytest
import torch

import zero_scenarios as Z
from zero_cases import cases, values
from zerocore.zero.memory import formula_bytes, storage_bytes


@pytest.mark.parametrize("world,name", cases(Z.ACCOUNTING))
def test_held_bytes_equal_formula(scenario_results, world, name):
    for v in values(scenario_results, world, name):
        assert abs(v["held"] - v["formula"]) <= 0.01 * v["formula"], v
        assert v["after_step"] == v["held"]


def test_formulas():
    psi, n = 1000, 4
    assert formula_bytes(1, False, psi, n) == 8 * psi + 8 * psi / n
    assert formula_bytes(2, False, psi, n) == 4 * psi + 12 * psi / n
    assert formula_bytes(1, True, psi, n) == 4 * psi + 12 * psi / n
    assert formula_bytes(2, True, psi, n) == 2 * psi + 14 * psi / n


def test_storage_bytes_counts_shared_storage_once():
    flat = torch.zeros(100)
    assert storage_bytes([flat[:10], flat[10:], None]) == 400
    assert storage_bytes([flat, torch.zeros(3, dtype=torch.bfloat16)]) == 406


def test_cpu_offload_of_fp32_cpu_model_keeps_no_second_master(single_rank_group):
    """On a CPU-only model the fp32 params are host memory already: offload holds exactly the stage-2 formula."""
    from zerocore.zero import ZeroOptimizer
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 6))
    ref = [p.detach().clone() for p in model.parameters()]
    opt = ZeroOptimizer(model, stage=2, offload_optimizer="cpu", lr=1e-2)
    opt.backward(model(torch.randn(5, 24)).square().mean())
    opt.step()
    rep = opt.memory_report()
    assert rep["master"] == 0
    pad = rep["padding_elements"] * 16                 # params 4 + grad shard 4 + m 4 + v 4 bytes per element
    assert abs(rep["model_states"] - rep["formula"]) <= pad, rep
    assert all(not torch.equal(p, r) for p, r in zip(model.parameters(), ref))   # the update reached the params
