"""Multi-rank scenarios for ZeroOptimizer with torch.compile (tests/test_zero_compile.py runs them on 2 gloo ranks).

Each parity scenario trains one model three ways on the same global batches: compiled under ZeroOptimizer, eagerly
under ZeroOptimizer, and with single-process torch.optim.AdamW on the whole batch (zero_scenarios.train_reference).
It reports the relative errors (per parameter tensor ||p - q|| / ||q||, the max over tensors), every step's global
gradient norm, and what dynamo made of the model: the graphs it compiled (how many `linear` calls each holds) and
why it broke graphs. The assertions live in the test file.

How the model is compiled (the `form` argument):
    "after"   model trained through `torch.compile(model)`, made after ZeroOptimizer(model)
    "method"  `model.compile()` after ZeroOptimizer(model) (compiles in place: the model itself is called)
    "blocks"  `block.compile()` for each transformer block, after ZeroOptimizer(model)
    "before"  ZeroOptimizer(torch.compile(model)): the optimizer gets the compiled wrapper (names gain `_orig_mod.`)
    "late"    the first step eager, then `model.compile()`
"""
from __future__ import annotations

import sys
import time

import torch

import zero_scenarios as Z
from zerocore.zero import ZeroOptimizer

STEPS = 3
S3 = dict(unit_modules={"Block"}, param_persistence_threshold=40)   # TinyGPT: one unit per block + the model's


class Recorder:
    """A torch.compile backend that keeps every graph dynamo hands it, then compiles it with `backend`."""

    def __init__(self, backend: str):
        self.backend, self.graphs = backend, []

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend
        self.graphs.append(gm)
        return lookup_backend(self.backend)(gm, example_inputs)

    def linears_per_graph(self):
        return [sum(1 for n in g.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear)
                for g in self.graphs]


def _dynamo_report() -> dict:
    from torch._dynamo.utils import counters
    return {"graph_breaks": sorted({k.splitlines()[0] for k in counters["graph_break"]}),
            "ops_captured": counters["stats"]["calls_captured"]}


def train(kind, stage, rank, data, form=None, backend="aot_eager", **options):
    """ZeroOptimizer(stage) over `data`, the model compiled by `form` (None: eager). Returns the full parameters
    (names as the plain model's), each step's global gradient norm, and (compiled) what dynamo did."""
    model = Z.MODELS[kind]()
    recorder = Recorder(backend) if form else None
    if form == "before":
        run = torch.compile(model, backend=recorder)
        opt = ZeroOptimizer(run, stage=stage, lr=1e-3, weight_decay=0.01, comm_timeout_s=60, **options)
    else:
        opt = ZeroOptimizer(model, stage=stage, lr=1e-3, weight_decay=0.01, comm_timeout_s=60, **options)
        run = model
        if form == "after":
            run = torch.compile(model, backend=recorder)
        elif form == "method":
            model.compile(backend=recorder)
        elif form == "blocks":
            for block in model.blocks:
                block.compile(backend=recorder)
        elif form not in (None, "late"):
            raise ValueError(form)
    if form:
        import torch._dynamo as dynamo    # (only here: eager_training_does_not_import_dynamo checks that)
        dynamo.reset()                    # this model's graphs and counters only
        dynamo.utils.counters.clear()
    norms = []
    started = time.perf_counter()
    for t, row in enumerate(data):
        if form == "late" and t == 1:
            model.compile(backend=recorder)
        for x, y in row:
            opt.backward(Z.loss_of(kind, run(Z.local(x, rank)), Z.local(y, rank)))
        opt.step()
        norms.append(opt.global_grad_norm)
        opt.zero_grad()
    seconds = time.perf_counter() - started
    with opt.gathered():                  # (stage 3: full values; stages 1 and 2 hold them anyway)
        params = {n.replace("_orig_mod.", ""): p.detach().clone() for n, p in model.named_parameters()}
    opt.close()
    out = {"params": params, "norms": norms, "seconds": seconds}
    if form:
        out.update(_dynamo_report(), linears_per_graph=recorder.linears_per_graph())
    return out


def _rel_errs(params, ref_model):
    ref = dict(ref_model.named_parameters())
    return max(((p.float() - ref[n].detach()).norm() / ref[n].detach().norm().clamp_min(1e-30)).item()
               for n, p in params.items())


def compare(kind, stage, form, backend="aot_eager", steps=STEPS, **options):
    def scenario(rank, world):
        data = Z.batches(kind, world, steps)
        compiled = train(kind, stage, rank, data, form, backend, **options)
        eager = train(kind, stage, rank, data, **options)
        ref_norms = []
        ref = Z.train_reference(kind, data, norms=ref_norms)
        names = sorted(eager["params"])
        if sorted(compiled["params"]) != names:
            raise AssertionError(f"compiled and eager models name their parameters differently: "
                                 f"{sorted(compiled['params'])} vs {names}")
        return {
            "form": form, "backend": backend, "stage": stage,
            "bit_equal": all(torch.equal(compiled["params"][n], eager["params"][n]) for n in names),
            "rel_err_vs_eager": max(((compiled["params"][n] - eager["params"][n]).norm()
                                     / eager["params"][n].norm().clamp_min(1e-30)).item() for n in names),
            "rel_err_vs_adamw": _rel_errs(compiled["params"], ref),
            "eager_rel_err_vs_adamw": _rel_errs(eager["params"], ref),
            "norms": compiled["norms"], "eager_norms": eager["norms"], "ref_norms": ref_norms,
            "graph_breaks": compiled["graph_breaks"], "linears_per_graph": compiled["linears_per_graph"],
            "ops_captured": compiled["ops_captured"],
            "seconds": compiled["seconds"], "eager_seconds": eager["seconds"],
        }
    return scenario


def eager_training_does_not_import_dynamo(rank, world):
    """The hooks' compile support must cost eager training nothing: torch.compiler.disable imports torch._dynamo
    (~150 MB per rank), so it may only run under torch.compile. Runs first, in a fresh worker."""
    before = "torch._dynamo" in sys.modules
    data = Z.batches("gpt", world, 2)
    for stage in (1, 2, 3):
        train("gpt", stage, rank, data, **(S3 if stage == 3 else dict(bucket_size=3000)))
    return {"imported_before": before, "imported_after": "torch._dynamo" in sys.modules}


mlp_s1_after = compare("mlp", 1, "after", bucket_size=200)
mlp_s2_before = compare("mlp", 2, "before", bucket_size=200)
gpt_s2_method = compare("gpt", 2, "method", bucket_size=3000)
gpt_s3_method = compare("gpt", 3, "method", **S3)
gpt_s3_blocks = compare("gpt", 3, "blocks", **S3)
mlp_s2_late_inductor = compare("mlp", 2, "late", backend="inductor", bucket_size=200)


def fullgraph_is_refused(rank, world):
    """torch.compile(model, fullgraph=True) cannot hold the hooks: it must fail at the first forward, on every
    rank, with zerocore's message, before any collective."""
    messages = {}
    for stage in (2, 3):
        model = Z.gpt()
        opt = ZeroOptimizer(model, stage=stage, comm_timeout_s=60, **(S3 if stage == 3 else {}))
        run = torch.compile(model, backend="aot_eager", fullgraph=True)
        try:
            run(torch.randint(0, 40, (2, 8)))
            messages[stage] = None
        except Exception as e:  # noqa: BLE001 - the type is dynamo's (torch._dynamo.exc.Unsupported)
            messages[stage] = f"{type(e).__name__}: {e}"
        finally:
            opt.close()
    return messages


# The order matters: the first scenario checks that nothing imported torch._dynamo before it.
SCENARIOS = ["eager_training_does_not_import_dynamo", "mlp_s1_after", "mlp_s2_before", "gpt_s2_method",
             "gpt_s3_method", "gpt_s3_blocks", "mlp_s2_late_inductor", "fullgraph_is_refused"]
