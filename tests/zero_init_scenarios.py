"""Multi-rank scenarios for ZeroInit (tests/test_zero_init.py runs them in one gloo group per world size)."""
from __future__ import annotations

import weakref

import torch
from torch.nn.modules import module as nn_module

import zero_scenarios as Z
from zerocore.zero import ZeroInit, ZeroOptimizer
from zerocore.zero import init as zinit


def gpt6(seed=1):
    torch.manual_seed(seed)
    return Z.TinyGPT(layers=6)


Z.MODELS["gpt6"] = gpt6


def _full_bytes(params) -> int:
    """Bytes of the parameters that still hold their own full values (not placeholders)."""
    return sum(p.untyped_storage().nbytes() for p in params
               if p is not None and p.untyped_storage().nbytes() > p.element_size())


def zero_init_equals_plain_build(rank, world):
    """Built inside ZeroInit with a different seed on every rank, the model equals rank 0's plain build (the
    values are broadcast from rank 0 before partitioning), a rank holds exactly its pieces afterwards and at
    most its pieces plus the module being built during construction; trained under stage 3 it matches
    single-process AdamW."""
    plain = gpt6()                                   # seed 1: what rank 0 builds below
    created = []                                     # every parameter made during construction (weakly)
    peak = [0]

    def on_param(module, name, p):
        if p is not None:
            created.append(weakref.ref(p))

    def on_child(parent, name, child):
        # Runs before ZeroInit's hook (registered first): the child is still whole here.
        live = [r() for r in created]
        peak[0] = max(peak[0], _full_bytes(live) + zinit.held_bytes())

    hooks = [nn_module.register_module_parameter_registration_hook(on_param),
             nn_module.register_module_module_registration_hook(on_child)]
    try:
        with ZeroInit():
            torch.manual_seed(1 if rank == 0 else 100 + rank)
            model = Z.TinyGPT(layers=6)
    finally:
        for h in hooks:
            h.remove()
    params = list(model.parameters())
    if _full_bytes(params):
        raise AssertionError("a parameter still holds its full values after ZeroInit")
    want = sum(-(-p.numel() // world) * p.element_size() for p in params)
    held = zinit.held_bytes()
    if held != want:
        raise AssertionError(f"ZeroInit holds {held} B on this rank, expected its pieces: {want} B")
    # Each module is partitioned when its parent takes it, so besides the pieces at most one block is whole at
    # a time (Block() builds fc1 and fc2 in one statement, so both are whole until Block takes them), plus the
    # root's own parameter (pos), which no parent takes before the context exits.
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    bound = want + nbytes(plain.parameters(recurse=False)) + nbytes(plain.blocks[0].parameters())
    if peak[0] > bound or bound >= nbytes(plain.parameters()):
        raise AssertionError(f"peak during ZeroInit {peak[0]} B > pieces {want} B + the root's own + one block "
                             f"({bound} B; the whole model: {nbytes(plain.parameters())} B)")
    err = _equal_then_trains(model, plain, rank, world)
    return {"rel_err": err, "held": held, "peak": peak[0], "pieces": want}


def _equal_then_trains(model, plain, rank, world) -> float:
    """Stage 3 over the pieces: the full parameters equal `plain`'s, no piece is left behind, and three steps
    match single-process AdamW from the same start. Returns the relative error."""
    opt = ZeroOptimizer(model, unit_modules={"Block"}, param_persistence_threshold=40, stage=3, lr=1e-3,
                        weight_decay=0.01, comm_timeout_s=60)
    if zinit.held_bytes():
        raise AssertionError("the optimizer left pieces behind")
    full = opt.full_state_dict(rank0_only=False)
    for k, v in plain.state_dict().items():
        if not torch.equal(full[k], v):
            raise AssertionError(f"{k} differs from the model it should equal")
    data = Z.batches("gpt6", world, 3)
    Z.train_zero("gpt6", data, rank, model=model, opt=opt)
    ref = Z.train_reference("gpt6", data)
    with opt.gathered():
        err = Z.rel_err(model, ref)
    if err > Z.FP32_TOL:
        raise AssertionError(f"trained from the pieces: rel err {err:.3g}")
    opt.close()
    return err


def meta_model_from_safetensors(rank, world):
    """A model built on the meta device gets its weights from a safetensors file, each rank reading its 1/N of
    every parameter: equal to the saved model (tied head included), and it trains like the reference."""
    import tempfile
    from safetensors.torch import save_file
    from zerocore.zero import load_partitioned
    plain = gpt6()
    with torch.device("meta"):
        model = Z.TinyGPT(layers=6)
    with tempfile.TemporaryDirectory(prefix=f"zerocore-meta-{rank}-") as folder:
        save_file({k: v.clone().contiguous() for k, v in plain.state_dict().items()}, f"{folder}/model.safetensors")
        load_partitioned(model, folder)
    if model.head.weight is not model.emb.weight:
        raise AssertionError("the tied head lost its tie")
    params = list(model.parameters())
    if any(p.device.type != "cpu" for p in params) or _full_bytes(params):
        raise AssertionError("parameters are not placeholders on the CPU after load_partitioned")
    want = sum(-(-p.numel() // world) * p.element_size() for p in params)
    if zinit.held_bytes() != want:
        raise AssertionError(f"holds {zinit.held_bytes()} B of pieces, expected {want} B")
    return {"rel_err": _equal_then_trains(model, plain, rank, world)}


SCENARIOS_BY_WORLD = {2: ["zero_init_equals_plain_build", "meta_model_from_safetensors"],
                      4: ["zero_init_equals_plain_build", "meta_model_from_safetensors"]}
