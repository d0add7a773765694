"""ZeroOptimizer with torch.compile: a compiled model trains under stages 1, 2 and 3 exactly as it does eagerly.

Multi-rank bodies live in tests/zero_compile_scenarios.py, run once on 2 gloo ranks. Every scenario trains the
compiled model, the same model eagerly under ZeroOptimizer and single-process torch.optim.AdamW on the same data
(3 steps), and these tests check:
  - with backend="aot_eager" (dynamo + AOTAutograd running the same aten kernels as eager) the compiled run is
    bit-equal to the eager ZeroOptimizer run, parameters and every step's global gradient norm;
  - with backend="inductor" (fused C++ kernels, so float rounding differs) it is within 1e-5 relative, and so
    is every run against AdamW (the repository's fp32 parity bound; gradient norms within 1e-4 as in
    test_zero_stage3.py);
  - the graphs are where README "torch.compile" says: stages 1 and 2 compile the whole forward as one graph
    (every `linear` of the model in one graph); stage 3 compiles each unit module's forward (the blocks' bodies);
    every graph break is one of zerocore's hooks; fullgraph=True fails with zerocore's message.

Backends, for time: inductor's C++ codegen costs ~17 s per forward + backward graph on this 2-core machine even
for the MLP, so one scenario (stage 2, MLP, compiled after the first step so its graphs are compiled once) uses
inductor and the others aot_eager; stage 3 with inductor was checked by hand (TinyGPT, 4 steps: 1.7e-7 relative
to eager). The whole file takes 45-60 s here. Inductor's caches go to a fresh temporary folder, so a warm cache
from an earlier run cannot hide a compile failure.
"""
import pytest

import zero_compile_scenarios as S
from dist_helpers import check_all_ranks, run_scenarios

FP32_TOL = S.Z.FP32_TOL
# What dynamo reports for zerocore's hooks (schedule.run_eagerly): the explicit break with zerocore's message, the
# torch.compiler.disable wrapper made at that point, and the call of that wrapper.
ZEROCORE_BREAKS = {"Call to `torch._dynamo.graph_break()`", "Call to `torch.compiler.disable()`",
                   "Skip calling `torch.compiler.disable()`d function"}
TINYGPT_LINEARS = 9          # 2 blocks x (qkv, proj, fc1, fc2) + the head
BLOCK_LINEARS = 4
MLP_LINEARS = 3


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    mp = pytest.MonkeyPatch()             # the spawned ranks inherit these
    mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor_cache")))
    mp.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")     # no pool of compile workers on 2 cores
    try:
        yield run_scenarios(2, "zero_compile_scenarios", S.SCENARIOS, timeout_s=600)
    finally:
        mp.undo()


def test_eager_training_does_not_import_dynamo(results):
    for v in check_all_ranks(results, "eager_training_does_not_import_dynamo"):
        assert v == {"imported_before": False, "imported_after": False}, v


def _check_parity(v):
    exact = v["backend"] == "aot_eager"
    if exact:
        assert v["bit_equal"] and v["norms"] == v["eager_norms"], v
    else:
        assert v["rel_err_vs_eager"] <= FP32_TOL, v
        assert v["norms"] == pytest.approx(v["eager_norms"], rel=FP32_TOL), v
    assert v["rel_err_vs_adamw"] <= FP32_TOL, v
    assert v["norms"] == pytest.approx(v["ref_norms"], rel=1e-4), v
    assert v["graph_breaks"] and set(v["graph_breaks"]) <= ZEROCORE_BREAKS, v["graph_breaks"]


@pytest.mark.parametrize("name,linears", [("mlp_s1_after", MLP_LINEARS), ("mlp_s2_before", MLP_LINEARS),
                                          ("gpt_s2_method", TINYGPT_LINEARS),
                                          ("mlp_s2_late_inductor", MLP_LINEARS)])
def test_stages_1_2_compile_the_whole_forward_and_train_as_eager(results, name, linears):
    for v in check_all_ranks(results, name):
        _check_parity(v)
        # One graph holds every linear of the model: the only break is at the forward's start.
        assert max(v["linears_per_graph"]) == linears, v["linears_per_graph"]


@pytest.mark.parametrize("name", ["gpt_s3_method", "gpt_s3_blocks"])
def test_stage_3_compiles_each_unit_module_and_trains_as_eager(results, name):
    """TinyGPT (head tied to the embedding, one unit per block): its blocks' bodies are the graphs, whether the
    whole model or each block is compiled (dynamo cannot resume inside the model's loop over blocks, whose
    hooks break the graph, so it runs that frame eagerly and compiles each block's forward by itself)."""
    for v in check_all_ranks(results, name):
        _check_parity(v)
        assert {n for n in v["linears_per_graph"] if n} == {BLOCK_LINEARS}, v["linears_per_graph"]


def test_fullgraph_fails_with_zerocore_message(results):
    for v in check_all_ranks(results, "fullgraph_is_refused"):
        for stage, message in v.items():
            assert message is not None, f"stage {stage}: fullgraph=True compiled the hooks"
            assert "Unsupported" in message and "zerocore: ZeroOptimizer's module hooks" in message, message
            assert "compile without fullgraph=True" in message, message
