"""Tests of the fused Adam op (zerocore.ops.adam.adam_step, CPU kernel) against torch and float64 references.

Every numerical test runs once per SIMD path the CPU has (forced through ZEROCORE_SIMD), on random data.
"""
import os

import pytest
import torch

import zerocore.ops.adam as A

SIMD_LEVELS = ("scalar", "avx2", "avx512")
# Sizes around the vector widths (8 and 16 floats) and the tile size (16384), plus 0 and 1.
SIZES = (0, 1, 7, 8, 15, 17, 33, 1000, 16384 + 5)
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)


@pytest.fixture(params=SIMD_LEVELS)
def simd(request, monkeypatch):
    """Forces one SIMD path for the test; skips the paths this CPU lacks."""
    monkeypatch.setenv("ZEROCORE_SIMD", request.param)
    try:
        level = A.simd_level()
    except RuntimeError as e:
        if "supports only" in str(e):
            pytest.skip(f"CPU lacks {request.param}: {e}")
        raise
    assert level == request.param
    return request.param


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    return ((ours.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _torch_reference(params, grads_per_step, weight_decay, adamw):
    """torch.optim.AdamW / Adam (single-tensor reference implementation) over the same gradients."""
    ref = [p.clone().requires_grad_(True) for p in params]
    cls = torch.optim.AdamW if adamw else torch.optim.Adam
    opt = cls(ref, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
              weight_decay=weight_decay, foreach=False)
    for grads in grads_per_step:
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        opt.step()
    return [r.detach() for r in ref], [opt.state[r] for r in ref]


@pytest.mark.parametrize("adamw", [True, False], ids=["adamw", "adam"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("size", SIZES)
def test_fp32_matches_torch_over_10_steps(simd, size, weight_decay, adamw):
    gen = torch.Generator().manual_seed(size * 7 + int(adamw))
    # Two tensors per call: the one under test and an odd-sized neighbour, so tiles of different tensors mix.
    params = [torch.randn(size, generator=gen), torch.randn(3, 5, generator=gen)]
    grads_per_step = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(10)]
    ref_params, ref_state = _torch_reference(params, grads_per_step, weight_decay, adamw)

    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    for step, grads in enumerate(grads_per_step, start=1):
        flag = A.adam_step(params, exp_avgs, exp_avg_sqs, grads, weight_decay=weight_decay, step=step,
                           adamw=adamw, **HYPER)
        assert flag.item() == 0.0
    for p, m, v, rp, rs in zip(params, exp_avgs, exp_avg_sqs, ref_params, ref_state):
        assert _rel_err(p, rp) <= 1e-6
        assert _rel_err(m, rs["exp_avg"]) <= 1e-6
        assert _rel_err(v, rs["exp_avg_sq"]) <= 1e-6


def _float64_mixed_reference(p, m, v, g, scale, step, weight_decay):
    """unscale -> AdamW -> (caller casts), all in float64.

    Also returns, per element, the sum of |terms| that made each result: fp32 evaluation can be off by a few
    ulps of that (not of the result, which is small where terms cancel, e.g. m = 0.9 m + 0.1 g)."""
    p, m, v = p.double().clone(), m.double().clone(), v.double().clone()
    g = g.double() * scale
    b1, b2, lr = HYPER["beta1"], HYPER["beta2"], HYPER["lr"]
    p *= 1 - lr * weight_decay
    m_mag = (b1 * m).abs() + ((1 - b1) * g).abs()
    v_mag = b2 * v + (1 - b2) * g * g
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    update = lr / (1 - b1 ** step) * m / (v.sqrt() / (1 - b2 ** step) ** 0.5 + HYPER["eps"])
    p_mag = p.abs() + update.abs()
    return (p - update, m, v), (p_mag, m_mag, v_mag)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, None], ids=["out_bf16", "out_fp16", "no_out"])
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("size", [1, 31, 4099])
def test_mixed_step_matches_float64_and_casts_like_torch(simd, size, grad_dtype, out_dtype):
    gen = torch.Generator().manual_seed(size)
    p = torch.randn(size, generator=gen)
    m = torch.randn(size, generator=gen) * 0.01
    v = torch.rand(size, generator=gen) * 1e-4
    scale = 1.0 / (1024.0 * 1.7)  # 1 / (loss_scale * clip_coef)
    out = [torch.empty(size, dtype=out_dtype)] if out_dtype else []
    for step in (1, 2, 3):
        g = (torch.randn(size, generator=gen) * 1024.0).to(grad_dtype)
        (ref_p, ref_m, ref_v), magnitudes = _float64_mixed_reference(p, m, v, g, scale, step, 0.05)
        flag = A.adam_step([p], [m], [v], [g], weight_decay=0.05, step=step, params_out=out,
                           grad_scale=torch.tensor([scale]), **HYPER)
        assert flag.item() == 0.0
        for ours, ref, magnitude in zip((p, m, v), (ref_p, ref_m, ref_v), magnitudes):
            assert ((ours.double() - ref).abs() <= 1e-6 * magnitude).all()  # 1e-6: about 8 fp32 ulps
        if out_dtype is not None:
            # The low-precision copy is bit for bit torch's own cast of the fp32 result ...
            assert torch.equal(out[0].view(torch.int16), p.to(out_dtype).view(torch.int16))
            # ... and within one rounding of the float64 reference.
            ulp = torch.finfo(out_dtype).eps
            torch.testing.assert_close(out[0].double(), ref_p, rtol=ulp, atol=torch.finfo(out_dtype).tiny)


def _special_floats() -> torch.Tensor:
    """Bit patterns where float -> bf16/fp16 rounding is delicate, plus random ones (no NaN)."""
    patterns = [0x00000000, 0x80000000, 0x00000001, 0x807fffff, 0x3f808000, 0x3f818000, 0x3f80ffff,
                0x3f807fff, 0x7f7fffff, 0xff7fffff, 0x7f7f8000, 0x7f800000, 0xff800000, 0x477ff000, 0x477fefff,
                0x387fc000, 0x33000000, 0x33000001, 0x3e2aaaab, 0x00800000]
    gen = torch.Generator().manual_seed(5)
    random_bits = torch.randint(-2 ** 31, 2 ** 31, (4000,), generator=gen, dtype=torch.int64).tolist()
    signed = [b - 2 ** 32 if b >= 2 ** 31 else b for b in patterns] + random_bits
    floats = torch.tensor(signed, dtype=torch.int32).view(torch.float32)
    return floats[~floats.isnan()].contiguous()


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cast_of_edge_values_is_bit_exact(simd, out_dtype):
    # lr = 0 leaves params unchanged, so params_out is exactly the cast of these values.
    p = _special_floats()
    out = torch.empty(p.numel(), dtype=out_dtype)
    A.adam_step([p], [torch.zeros_like(p)], [torch.zeros_like(p)], [torch.zeros_like(p)], lr=0.0, beta1=0.9,
                beta2=0.999, eps=1e-8, weight_decay=0.1, step=1, params_out=[out])
    assert torch.equal(out.view(torch.int16), p.to(out_dtype).view(torch.int16))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_nan_param_stays_nan_in_params_out(simd, out_dtype):
    nan_bits = torch.tensor([0x7fc00000, 0x7f800001, 0xffc00000 - 2 ** 32, 0x7fbfffff], dtype=torch.int32)
    p = torch.cat([nan_bits.view(torch.float32), torch.randn(13)])
    out = torch.empty(p.numel(), dtype=out_dtype)
    A.adam_step([p], [torch.zeros_like(p)], [torch.zeros_like(p)], [torch.zeros_like(p)], lr=0.0, beta1=0.9,
                beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, params_out=[out], check_finite=False)
    assert out[:4].isnan().all()
    assert torch.equal(out[4:].view(torch.int16), p[4:].to(out_dtype).view(torch.int16))


def _mixed_inputs(gen, sizes, grad_dtype):
    params = [torch.randn(n, generator=gen) for n in sizes]
    m = [torch.randn(n, generator=gen) * 0.01 for n in sizes]
    v = [torch.rand(n, generator=gen) * 1e-4 for n in sizes]
    g = [torch.randn(n, generator=gen).to(grad_dtype) for n in sizes]
    out = [torch.randn(n, generator=gen).to(torch.bfloat16) for n in sizes]
    return params, m, v, g, out


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("where", ["first", "tail", "second_tensor"])
def test_nonfinite_grad_sets_flag_and_changes_nothing(simd, grad_dtype, bad, where):
    gen = torch.Generator().manual_seed(3)
    params, m, v, g, out = _mixed_inputs(gen, [16384 * 2 + 19, 45], grad_dtype)
    tensor, index = {"first": (0, 0), "tail": (0, 16384 * 2 + 18), "second_tensor": (1, 40)}[where]
    g[tensor][index] = bad
    before = [t.clone() for t in params + m + v + out]
    flag = A.adam_step(params, m, v, g, weight_decay=0.1, step=3, params_out=out, **HYPER)
    assert flag.item() == 1.0
    for b, a in zip(before, params + m + v + out):
        assert torch.equal(b.view(torch.int16) if b.dtype == torch.bfloat16 else b.view(torch.int32),
                           a.view(torch.int16) if a.dtype == torch.bfloat16 else a.view(torch.int32))


def test_found_inf_set_on_entry_changes_nothing(simd):
    gen = torch.Generator().manual_seed(4)
    params, m, v, g, out = _mixed_inputs(gen, [1000, 7], torch.bfloat16)
    before = [t.clone() for t in params + m + v + out]
    found_inf = torch.ones(1)
    A.adam_step(params, m, v, g, weight_decay=0.1, step=3, params_out=out, found_inf=found_inf, **HYPER)
    assert found_inf.item() == 1.0
    assert all(torch.equal(b, a) for b, a in zip(before, params + m + v + out))


def test_nonfinite_grad_scale_counts_as_overflow(simd):
    p, m, v, g = torch.randn(50), torch.zeros(50), torch.zeros(50), torch.randn(50)
    before = p.clone()
    flag = A.adam_step([p], [m], [v], [g], weight_decay=0.0, step=1, grad_scale=torch.tensor([float("inf")]),
                       **HYPER)
    assert flag.item() == 1.0 and torch.equal(p, before)
    with pytest.raises(RuntimeError, match="grad_scale is inf"):
        A.adam_step([p], [m], [v], [g], weight_decay=0.0, step=1, grad_scale=torch.tensor([float("inf")]),
                    check_finite=False, **HYPER)


def test_check_finite_false_skips_the_scan(simd):
    p, m, v, g = torch.randn(50), torch.zeros(50), torch.zeros(50), torch.randn(50)
    g[10] = float("nan")
    flag = A.adam_step([p], [m], [v], [g], weight_decay=0.0, step=1, check_finite=False, **HYPER)
    assert flag.item() == 0.0
    assert p[10].isnan() and not p[11].isnan()


def test_all_simd_paths_and_thread_counts_agree_bit_for_bit():
    gen = torch.Generator().manual_seed(11)
    inputs = _mixed_inputs(gen, [16384 * 5 + 3, 1, 99], torch.float16)
    results = {}
    saved_threads, saved_env = torch.get_num_threads(), os.environ.get("ZEROCORE_SIMD")
    try:
        for level in SIMD_LEVELS:
            for threads in (1, 2):
                os.environ["ZEROCORE_SIMD"] = level
                try:
                    A.simd_level()
                except RuntimeError:
                    continue  # this CPU lacks the level
                torch.set_num_threads(threads)
                params, m, v, g, out = [[t.clone() for t in lst] for lst in inputs]
                A.adam_step(params, m, v, g, weight_decay=0.1, step=7, params_out=out,
                            grad_scale=torch.tensor([0.5]), **HYPER)
                results[(level, threads)] = torch.cat([t.view(-1).view(torch.int32) for t in params + m + v])
    finally:
        torch.set_num_threads(saved_threads)
        if saved_env is None:
            os.environ.pop("ZEROCORE_SIMD", None)
        else:
            os.environ["ZEROCORE_SIMD"] = saved_env
    reference = results[("scalar", 1)]
    assert len(results) >= 2
    for key, bits in results.items():
        assert torch.equal(bits, reference), key


def _at_offset(t, offset):
    """A copy of t that starts `offset` elements into its own storage (clone() would start at 0)."""
    return torch.empty(t.numel() + offset, dtype=t.dtype)[offset:].copy_(t)


@pytest.mark.parametrize("offset", [0, 1, 5, 16, 17])
def test_groups_and_page_boundaries_match_scalar_bit_for_bit(offset):
    """Sizes around the SIMD paths' groups of 4 vectors and across 4 KiB pages (where the kernels prime the next
    page), on tensors that start `offset` elements into their storage, so page and line offsets vary."""
    sizes = [63, 64, 65, 127, 129, 1024 + 48 + 7, 3 * 4096 + 37]
    gen = torch.Generator().manual_seed(23 + offset)

    def make(dtype, n, scale=1.0, positive=False):
        base = torch.rand(n + offset, generator=gen) if positive else torch.randn(n + offset, generator=gen)
        return (base * scale).to(dtype)[offset:]

    cases = [(torch.float32, torch.float32, None), (torch.bfloat16, torch.float32, torch.bfloat16),
             (torch.float16, torch.bfloat16, torch.float16)]
    saved_env = os.environ.get("ZEROCORE_SIMD")
    try:
        for grad_dtype, state_dtype, out_dtype in cases:
            inputs = ([make(torch.float32, n) for n in sizes], [make(state_dtype, n, 1e-2) for n in sizes],
                      [make(state_dtype, n, 1e-4, positive=True) for n in sizes],
                      [make(grad_dtype, n, 8.0) for n in sizes],
                      [torch.empty(n + offset, dtype=out_dtype)[offset:] for n in sizes] if out_dtype else [])
            results = {}
            for level in SIMD_LEVELS:
                os.environ["ZEROCORE_SIMD"] = level
                try:
                    A.simd_level()
                except RuntimeError:
                    continue  # this CPU lacks the level
                params, m, v, g, out = [[_at_offset(t, offset) for t in lst] for lst in inputs]
                assert all(t.storage_offset() == offset for t in params + m + v + g + out)
                A.adam_step(params, m, v, g, weight_decay=0.1, step=3, params_out=out,
                            grad_scale=torch.tensor([0.5]), **HYPER)
                results[level] = [t.view(-1).view(torch.int32 if t.element_size() == 4 else torch.int16)
                                  for t in params + m + v + out]
            assert len(results) >= 2
            for level, tensors in results.items():
                for i, (a, b) in enumerate(zip(tensors, results["scalar"])):
                    assert torch.equal(a, b), (level, grad_dtype, state_dtype, out_dtype, i)
    finally:
        if saved_env is None:
            os.environ.pop("ZEROCORE_SIMD", None)
        else:
            os.environ["ZEROCORE_SIMD"] = saved_env


def test_bf16_state_is_fp32_math_on_widened_state_and_its_error_is_bounded(simd):
    gen = torch.Generator().manual_seed(9)
    n, steps = 4096, 100
    hyper = dict(HYPER, lr=1e-3, weight_decay=0.01)
    p0 = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen) * 0.1 + 0.02 for _ in range(steps)]
    p32, m32, v32 = p0.clone(), torch.zeros(n), torch.zeros(n)
    p16, m16, v16 = p0.clone(), torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
    p_ref, m_ref, v_ref = p0.clone(), m16.clone(), v16.clone()
    for step, g in enumerate(grads, start=1):
        A.adam_step([p32], [m32], [v32], [g], step=step, **hyper)
        A.adam_step([p16], [m16], [v16], [g], step=step, **hyper)
        # Reference: the fp32-state kernel on the widened bf16 state, then torch's float -> bf16 cast.
        m_wide, v_wide = m_ref.float(), v_ref.float()
        A.adam_step([p_ref], [m_wide], [v_wide], [g], step=step, **hyper)
        m_ref, v_ref = m_wide.bfloat16(), v_wide.bfloat16()
    assert torch.equal(p16, p_ref)
    assert torch.equal(m16.view(torch.int16), m_ref.view(torch.int16))
    assert torch.equal(v16.view(torch.int16), v_ref.view(torch.int16))
    # Its cost against fp32 state, measured: the params drift from the fp32-state run by a small fraction of
    # the total update (measured 0.28% after 100 steps here), and m / v differ by 0.38% / 0.85% (bf16 keeps
    # 8 bits of mantissa, and v's small per-step increments are partly rounded away).
    drift = ((p16 - p32).norm() / (p32 - p0).norm()).item()
    assert drift < 0.01, f"bf16 state moved params {drift:.4f} of the update away from the fp32-state run"
    assert _rel_err(m16.float(), m32) < 0.01
    assert _rel_err(v16.float(), v32) < 0.02


def test_one_call_many_dtypes_matches_separate_calls(simd):
    gen = torch.Generator().manual_seed(21)
    grads_dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.bfloat16]
    sizes = [100, 37, 16400, 5]
    params = [torch.randn(n, generator=gen) for n in sizes]
    m = [torch.randn(n, generator=gen).to(torch.bfloat16 if i == 3 else torch.float32) for i, n in enumerate(sizes)]
    v = [torch.rand(n, generator=gen).to(torch.bfloat16 if i == 3 else torch.float32) for i, n in enumerate(sizes)]
    g = [torch.randn(n, generator=gen).to(dt) for n, dt in zip(sizes, grads_dtypes)]
    together = [[t.clone() for t in lst] for lst in (params, m, v)]
    A.adam_step(*together, g, weight_decay=0.1, step=2, **HYPER)
    for i in range(len(sizes)):
        A.adam_step([params[i]], [m[i]], [v[i]], [g[i]], weight_decay=0.1, step=2, **HYPER)
    for a, b in zip(together[0] + together[1] + together[2], params + m + v):
        assert torch.equal(a, b)


def _valid_args(n=8):
    return dict(params=[torch.randn(n)], exp_avgs=[torch.zeros(n)], exp_avg_sqs=[torch.zeros(n)],
                grads=[torch.randn(n)])


def _call(args, **kw):
    hyper = dict(HYPER, weight_decay=0.0, step=1)
    hyper.update(kw)
    return A.adam_step(args["params"], args["exp_avgs"], args["exp_avg_sqs"], args["grads"], **hyper)


@pytest.mark.parametrize("mutate, kw, message", [
    (lambda a: a["grads"].append(torch.randn(8)), {}, "one entry per tensor"),
    (lambda a: a.update(grads=[torch.randn(9)]), {}, "grads\\[0\\] has 9 elements"),
    (lambda a: a.update(exp_avgs=[torch.zeros(16)[::2]]), {}, "not contiguous"),
    (lambda a: a.update(params=[torch.randn(8, dtype=torch.float64)]), {}, "must be float32"),
    (lambda a: a.update(grads=[torch.randn(8, dtype=torch.float64)]), {}, "gradients must be float32, bfloat16"),
    (lambda a: a.update(exp_avgs=[torch.zeros(8, dtype=torch.float16)], exp_avg_sqs=[torch.zeros(8, dtype=torch.float16)]), {},
     "optimizer state must be float32 or bfloat16"),
    (lambda a: a.update(exp_avgs=[torch.zeros(8, dtype=torch.bfloat16)]), {}, "must share a dtype"),
    (lambda a: None, dict(params_out=[torch.empty(8)]), "must be bfloat16 or float16"),
    (lambda a: None, dict(params_out=[torch.empty(8, dtype=torch.bfloat16)] * 2), "params_out must be empty or"),
    (lambda a: None, dict(params_out=[torch.empty(7, dtype=torch.bfloat16)]), "params_out\\[0\\] has 7 elements"),
    (lambda a: None, dict(grad_scale=torch.tensor([1.0, 2.0])), "grad_scale must be a 1-element float32"),
    (lambda a: None, dict(found_inf=torch.zeros(1, dtype=torch.int32)), "found_inf must be a 1-element float32"),
    (lambda a: None, dict(beta1=1.0), "beta1 must be in"),
    (lambda a: None, dict(lr=-1.0), "lr must be"),
    (lambda a: None, dict(step=0), "step must be >= 1"),
    (lambda a: a.update(grads=[torch.randn(8).to_sparse()]), {}, "sparse"),
    (lambda a: a.update(grads=[torch.randn(8, device="meta")]), {}, "grads\\[0\\] is on meta"),
], ids=["list_length", "numel", "non_contiguous", "param_dtype", "grad_dtype", "state_dtype", "state_mismatch",
        "out_dtype", "out_length", "out_numel", "grad_scale_shape", "found_inf_dtype", "beta1", "lr", "step",
        "sparse", "other_device"])
def test_bad_input_raises_a_clear_error_and_writes_nothing(mutate, kw, message):
    args = _valid_args()
    mutate(args)
    before = [t.clone() for t in args["params"] if t.device.type == "cpu" and t.dtype == torch.float32]
    with pytest.raises((RuntimeError, ValueError), match=message):
        _call(args, **kw)
    after = [t for t in args["params"] if t.device.type == "cpu" and t.dtype == torch.float32]
    assert all(torch.equal(b, a) for b, a in zip(before, after))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_params_with_cuda_grads_raise():
    args = _valid_args()
    args["grads"] = [torch.randn(8, device="cuda")]
    with pytest.raises(ValueError, match="grads\\[0\\] is on cuda"):
        _call(args)


def test_bad_simd_env_is_an_error(monkeypatch):
    monkeypatch.setenv("ZEROCORE_SIMD", "sse9")
    with pytest.raises(RuntimeError, match="ZEROCORE_SIMD=sse9 is not one of"):
        _call(_valid_args())


def test_schema_declares_exactly_what_the_kernel_mutates():
    # opcheck's test_schema runs the op and checks every mutated input is annotated (a!) and nothing else changes.
    n = 40
    args = ([torch.randn(n)], [torch.zeros(n)], [torch.zeros(n)], [torch.randn(n).bfloat16()],
            [torch.empty(n, dtype=torch.bfloat16)], torch.tensor([0.5]), torch.zeros(1), 1e-3, 0.9, 0.999, 1e-8,
            0.01, 1, True, True)
    A.simd_level()  # loads the op library
    result = torch.library.opcheck(torch.ops.zerocore.adam_step.default, args,
                                   test_utils=("test_schema", "test_faketensor"))
    assert result == {"test_schema": "SUCCESS", "test_faketensor": "SUCCESS"}


def test_meta_tensors_go_through_the_fake_kernel():
    A.simd_level()
    n = 8
    meta = lambda dt=torch.float32: torch.empty(n, device="meta", dtype=dt)  # noqa: E731
    torch.ops.zerocore.adam_step([meta()], [meta()], [meta()], [meta(torch.bfloat16)], [], None,
                                 torch.empty(1, device="meta"), 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, True, False)


# ---------------------------------------------------------------------------------- opcheck and torch.compile
OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
# (grad dtype, params_out dtype or None, with a grad_scale, AdamW)
OP_CASES = [(torch.float32, None, False, True), (torch.bfloat16, torch.bfloat16, True, True),
            (torch.float16, torch.float16, True, False), (torch.bfloat16, None, False, False)]


def _random_op_args(grad_dtype, out_dtype, scaled, adamw, seed=0, grads_require_grad=False):
    """adam_step's positional arguments on random data: two tensors of random odd sizes (around the vector
    widths and past them), random moments, learning rate and step."""
    g = torch.Generator().manual_seed(seed)
    sizes = [int(n) * 2 + 1 for n in torch.randint(1, 100, (2,), generator=g)]
    params = [torch.randn(n, generator=g) for n in sizes]
    exp_avgs = [torch.randn(n, generator=g) * 0.1 for n in sizes]
    exp_avg_sqs = [torch.rand(n, generator=g) * 0.01 for n in sizes]
    grads = [torch.randn(n, generator=g).to(grad_dtype).requires_grad_(grads_require_grad) for n in sizes]
    params_out = [torch.empty(n, dtype=out_dtype) for n in sizes] if out_dtype is not None else []
    grad_scale = torch.rand(1, generator=g) + 0.5 if scaled else None
    lr = 1e-3 * (1 + torch.rand(1, generator=g).item())
    step = int(torch.randint(1, 100, (1,), generator=g))
    return (params, exp_avgs, exp_avg_sqs, grads, params_out, grad_scale, torch.zeros(1), lr, 0.9, 0.999, 1e-8,
            0.01, step, adamw, True)


@pytest.mark.parametrize("grad_dtype,out_dtype,scaled,adamw", OP_CASES)
def test_opcheck_passes_every_test(grad_dtype, out_dtype, scaled, adamw):
    """torch.library.opcheck's four tests on random inputs. The gradients (read, never written) require grad, so
    test_autograd_registration checks that the op, which has no autograd formula, gives nothing that requires
    grad; test_aot_dispatch_dynamic traces it through AOTAutograd with dynamic shapes, as torch.compile does."""
    A.simd_level()  # loads the op library
    args = _random_op_args(grad_dtype, out_dtype, scaled, adamw, grads_require_grad=True)
    result = torch.library.opcheck(torch.ops.zerocore.adam_step.default, args, test_utils=OPCHECKS)
    assert result == {k: "SUCCESS" for k in OPCHECKS}


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("grad_dtype,out_dtype,scaled,adamw", OP_CASES[:2])
def test_compiled_call_writes_what_the_eager_call_writes(grad_dtype, out_dtype, scaled, adamw, backend, tmp_path,
                                                         monkeypatch):
    """Inside torch.compile (fullgraph: the op is in the graph, not run eagerly at a break) AOTAutograd turns the
    in-place op into a functional one and copies its results back, and inductor re-inplaces it: params, moments,
    params_out and found_inf must end bit for bit as after the eager call."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))       # no warm cache from another run
    A.simd_level()
    args = _random_op_args(grad_dtype, out_dtype, scaled, adamw, seed=1)
    tensors, hyper = args[:7], args[7:]
    copy = [[t.clone() for t in x] if isinstance(x, list) else (None if x is None else x.clone()) for x in tensors]
    before = [p.clone() for p in tensors[0]]

    def step(params, exp_avgs, exp_avg_sqs, grads, params_out, grad_scale, found_inf):
        lr, beta1, beta2, eps, weight_decay, step, adamw, _ = hyper
        A.adam_step(params, exp_avgs, exp_avg_sqs, grads, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                    weight_decay=weight_decay, step=step, adamw=adamw, params_out=params_out,
                    grad_scale=grad_scale, found_inf=found_inf)

    torch.compile(step, backend=backend, fullgraph=True)(*tensors)
    step(*copy)
    assert not any(torch.equal(p, b) for p, b in zip(tensors[0], before))     # the compiled call updated
    for compiled, eager in zip(tensors, copy):
        for c, e in zip(*((compiled, eager) if isinstance(compiled, list) else ([compiled], [eager]))):
            assert c is None or torch.equal(c, e)
