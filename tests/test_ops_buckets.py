"""zerocore.ops.buckets pack / unpack against torch references, on CPU (every SIMD level) and on CUDA.

The reference for every element is torch's own composed cast: pack writes (src.float() * scale).to(dst.dtype),
or with accumulate (dst.float() + src.float() * scale).to(dst.dtype); unpack the mirror image. CPU results must be
bit-identical to it (NaNs compared as NaN); CUDA results too, plus a float64 bound of half an ulp of the output
dtype. Outputs are poisoned before each run so a skipped element cannot pass by accident, and the inputs are
random (normal values over many binades, fp16 overflow, subnormals, exact rounding ties, inf and nan).
"""
import itertools

import pytest
import torch

import zerocore.ops
from zerocore.ops import buckets as B
from zerocore.ops.toolchain import cpu_simd_level

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PAIRS = list(itertools.product(DTYPES, DTYPES))
SIZES = [0, 1, 7, 15, 16, 17, 33, 1000]  # empty, below / at / above one AVX-512 and AVX2 vector, odd
LEVELS = [lvl for lvl in ("scalar", "avx2", "avx512")
          if ("scalar", "avx2", "avx512").index(lvl) <= ("scalar", "avx2", "avx512").index(cpu_simd_level())]

cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module", autouse=True)
def ops():
    zerocore.ops.load("buckets")
    if torch.cuda.is_available():
        zerocore.ops.load("cuda_buckets")


def dname(dtype):
    return str(dtype).replace("torch.", "")


def random_values(n, generator, device="cpu"):
    """fp32 values that exercise every cast: normal numbers over ~16 binades, plus specials sprinkled in."""
    x = torch.randn(n, generator=generator) * torch.exp2(torch.randint(-8, 8, (n,), generator=generator).float())
    if n >= 12:
        picks = torch.randperm(n, generator=generator)[:12]
        specials = torch.tensor([float("inf"), float("-inf"), float("nan"), 70000.0, -65520.0, 1e-6, -3e-8,
                                 1e-40, 0.0, -0.0, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8])  # the last two: bf16 ties
        x[picks] = specials
    return x.to(device)


def assert_same(actual, expected, what):
    """Bit-identical except that any NaN matches any NaN (payloads differ between implementations)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"{what}: NaN positions differ"
    a = actual[~nan_a].cpu()
    e = expected[~nan_e].cpu()
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    diff = (a.view(bits) != e.view(bits)).nonzero()
    assert diff.numel() == 0, (f"{what}: {diff.numel()} of {a.numel()} elements differ, first at {diff[0].item()}: "
                               f"{a[diff[0]].item()!r} vs expected {e[diff[0]].item()!r}")


def poison(t):
    """Fill with a finite sentinel no kernel produces from these inputs, so untouched elements are caught."""
    return t.fill_(-1234.5)


def pack_reference(srcs, dst_before, offsets, scale, accumulate):
    expected = dst_before.clone()
    for src, at in zip(srcs, offsets):
        piece = src.reshape(-1).float() * scale
        if accumulate:
            piece = expected[at:at + src.numel()].float() + piece
        expected[at:at + src.numel()] = piece.to(dst_before.dtype)
    return expected


def unpack_reference(src, dsts, offsets, scale):
    return [(src[at:at + d.numel()].float() * scale).to(d.dtype).view(d.shape) for d, at in zip(dsts, offsets)]


def make_sources(dtype, sizes, generator, device="cpu"):
    shapes = [(n,) if n % 2 else (2, n // 2) for n in sizes]  # some 2-D: pack flattens
    return [random_values(n, generator, device).to(dtype).view(shape) for n, shape in zip(sizes, shapes)]


def gapped_offsets(sizes, gap=3, align=1):
    """Offsets with a gap before each tensor, so writes outside the ranges would show in the gaps; with align,
    each offset is rounded up to a multiple of it (64-byte aligned slots take the kernels' vector paths)."""
    offsets, at = [], 0
    for n in sizes:
        at = -(-(at + gap) // align) * align
        offsets.append(at)
        at += n
    return offsets, at + gap


# ------------------------------------------------------------------------------------------------- CPU: values
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("src_dtype,dst_dtype", PAIRS, ids=[f"{dname(a)}-{dname(b)}" for a, b in PAIRS])
def test_pack_matches_torch(monkeypatch, level, src_dtype, dst_dtype):
    monkeypatch.setenv("ZEROCORE_SIMD", level)
    g = torch.Generator().manual_seed(100 * LEVELS.index(level) + PAIRS.index((src_dtype, dst_dtype)))
    srcs = make_sources(src_dtype, SIZES, g)
    offsets, total = gapped_offsets(SIZES)
    for scale, accumulate in itertools.product((1.0, 0.37), (False, True)):
        dst = random_values(total, g).to(dst_dtype) if accumulate else poison(torch.empty(total, dtype=dst_dtype))
        expected = pack_reference(srcs, dst, offsets, scale, accumulate)
        B.pack(srcs, dst, offsets, scale=scale, accumulate=accumulate)
        assert_same(dst, expected, f"pack scale={scale} accumulate={accumulate}")


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("src_dtype,dst_dtype", PAIRS, ids=[f"{dname(a)}-{dname(b)}" for a, b in PAIRS])
def test_unpack_matches_torch(monkeypatch, level, src_dtype, dst_dtype):
    monkeypatch.setenv("ZEROCORE_SIMD", level)
    g = torch.Generator().manual_seed(1000 + 100 * LEVELS.index(level) + PAIRS.index((src_dtype, dst_dtype)))
    offsets, total = gapped_offsets(SIZES)
    flat = random_values(total, g).to(src_dtype)
    for scale in (1.0, -2.5):
        dsts = [poison(torch.empty((n,) if n % 2 else (2, n // 2), dtype=dst_dtype)) for n in SIZES]
        B.unpack(flat, dsts, offsets, scale=scale)
        for i, (d, e) in enumerate(zip(dsts, unpack_reference(flat, dsts, offsets, scale))):
            assert_same(d, e, f"unpack dsts[{i}] scale={scale}")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dst_dtype", DTYPES, ids=dname)
def test_pack_large_split_over_threads(threads, dst_dtype):
    """Above the single-thread cutoff the elements are split over threads mid-tensor; each split must be exact."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(7)
        sizes = [3, 300_001, 17, 200_000]
        srcs = make_sources(torch.float32, sizes, g)
        offsets, total = gapped_offsets(sizes, gap=5)
        dst = random_values(total, g).to(dst_dtype)
        expected = pack_reference(srcs, dst, offsets, 0.125, True)
        B.pack(srcs, dst, offsets, scale=0.125, accumulate=True)
        assert_same(dst, expected, f"threads={threads}")
        outs = [poison(torch.empty_like(s)) for s in srcs]
        B.unpack(dst, outs, offsets)
        for i, (o, e) in enumerate(zip(outs, unpack_reference(dst, outs, offsets, 1.0))):
            assert_same(o, e, f"unpack dsts[{i}]")
    finally:
        torch.set_num_threads(saved)


def test_pack_default_offsets_round_trip():
    g = torch.Generator().manual_seed(3)
    srcs = [torch.randn(5, 3, generator=g), torch.randn(4, generator=g), torch.randn(1, 1, 2, generator=g)]
    flat = B.pack(srcs, poison(torch.empty(21)))
    assert torch.equal(flat, torch.cat([s.reshape(-1) for s in srcs]))
    outs = [poison(torch.empty_like(s)) for s in srcs]
    B.unpack(flat, outs, scale=1.0)
    for o, s in zip(outs, srcs):
        assert torch.equal(o, s)


def test_empty_lists_and_tensors_change_nothing():
    g = torch.Generator().manual_seed(4)
    dst = torch.randn(8, generator=g)
    before = dst.clone()
    B.pack([], dst, [])
    B.pack([torch.empty(0), torch.empty(0, dtype=torch.bfloat16)], dst, [8, 0], scale=3.0, accumulate=True)
    B.unpack(dst, [], [])
    B.unpack(dst, [torch.empty(0, dtype=torch.float16)], [8])
    B.pack([], torch.empty(0), [])
    assert torch.equal(dst, before)


def test_in_place_alias_is_allowed():
    """A gradient that already is a view of its bucket slot may be scaled in place."""
    g = torch.Generator().manual_seed(5)
    flat = torch.randn(40, generator=g)
    expected = flat * 0.5
    views = [flat[0:10], flat[10:40].view(5, 6)]
    B.pack(views, flat, [0, 10], scale=0.5)
    assert torch.equal(flat, expected)


def test_float64_bound_for_scaled_casts():
    """Independent of torch's casts: every output is within half an ulp of the exact product (float64)."""
    g = torch.Generator().manual_seed(6)
    src = torch.randn(4099, generator=g) * 100
    for dtype, ulp_bits in ((torch.float32, 23), (torch.bfloat16, 7), (torch.float16, 10)):
        dst = poison(torch.empty(4099, dtype=dtype))
        B.pack([src], dst, [0], scale=0.3)
        exact = src.double() * torch.tensor(0.3, dtype=torch.float32).double()
        half_ulp = torch.exp2(torch.floor(torch.log2(exact.abs())) - ulp_bits - 1)
        # one product rounding in fp32 (at most 2^-24 relative) before the cast: allow it on top
        assert ((dst.double() - exact).abs() <= half_ulp + exact.abs() * 2.0 ** -24).all(), dtype


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_schemas_declare_their_mutations(device):
    """torch.library.opcheck: the schema's (a!) annotations match what the kernels write, and the fake
    (meta) kernels accept what the real ones do."""
    srcs = [torch.randn(5, device=device), torch.randn(3, device=device).bfloat16()]
    flat = torch.randn(8, device=device)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    for op, args in ((torch.ops.zerocore.pack.default, (srcs, flat, [0, 5], 0.5, True)),
                     (torch.ops.zerocore.unpack.default, (flat, srcs, [0, 5], 0.5))):
        result = torch.library.opcheck(op, args, test_utils=checks)
        assert all(v == "SUCCESS" for v in result.values()), result


# ------------------------------------------------------------------------------------------------- CPU: errors
@pytest.mark.parametrize("call,message", [
    (lambda: B.pack([torch.randn(3, dtype=torch.float64)], torch.empty(3), [0]), "dtype"),
    (lambda: B.pack([torch.ones(3, dtype=torch.int32)], torch.empty(3), [0]), "dtype"),
    (lambda: B.pack([torch.randn(3)], torch.empty(3, dtype=torch.float64), [0]), "dtype"),
    (lambda: B.pack([torch.randn(4, 3).t()], torch.empty(12), [0]), "not contiguous"),
    (lambda: B.pack([torch.randn(3)], torch.empty(2, 3), [0]), "1-D"),
    (lambda: B.pack([torch.randn(3)], torch.empty(12)[::2], [0]), "contiguous"),
    (lambda: B.pack([torch.randn(3), torch.randn(2)], torch.empty(12), [0]), "offsets"),
    (lambda: B.pack([torch.randn(3)], torch.empty(12), [10]), "[10, 13)"),
    (lambda: B.pack([torch.randn(3)], torch.empty(12), [-1]), "offsets[0]"),
    (lambda: B.pack([torch.randn(3), torch.randn(3)], torch.empty(12), [0, 2]), "overlap"),
    (lambda: B.pack([torch.randn(3)], torch.empty(3), [2**62]), "flat tensor"),
    (lambda: B.unpack(torch.randn(5), [torch.empty(3)], [3]), "[3, 6)"),
    (lambda: B.unpack(torch.randn(5), [torch.empty(3, dtype=torch.float64)], [0]), "dtype"),
    (lambda: B.unpack(torch.randn(5, 1), [torch.empty(3)], [0]), "1-D"),
    (lambda: B.unpack(torch.randn(6), [torch.empty(3, 2).t()], [0]), "not contiguous"),
    (lambda: B.unpack(torch.randn(9), [torch.empty(3), torch.empty(3)], [0]), "offsets"),
])
def test_bad_arguments_raise_clear_errors(call, message):
    with pytest.raises(RuntimeError) as info:
        call()
    assert message in str(info.value)


def test_overlapping_destinations_rejected():
    shared = torch.empty(10)
    with pytest.raises(RuntimeError, match="overlap in memory"):
        B.unpack(torch.randn(20), [shared[0:6], shared[4:10]], [0, 10])


def test_partial_alias_with_flat_tensor_rejected():
    flat = torch.randn(20)
    with pytest.raises(RuntimeError, match="shares memory with the flat tensor"):
        B.pack([flat[1:5]], flat, [10])       # reads elements another thread may be writing
    with pytest.raises(RuntimeError, match="shares memory with the flat tensor"):
        B.unpack(flat, [flat[0:4]], [4])
    half_view = flat.view(torch.bfloat16)[0:4]
    with pytest.raises(RuntimeError, match="same dtype"):
        B.pack([half_view], flat.view(torch.bfloat16), [1])


# ------------------------------------------------------------------------------------ opcheck and torch.compile
OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _random_case(src_dtype, dst_dtype, seed, device="cpu"):
    """Three tensors of random sizes (one 2-D), gapped offsets into a random flat tensor, a random scale."""
    g = torch.Generator().manual_seed(seed)
    sizes = [int(n) for n in torch.randint(1, 80, (3,), generator=g)]
    tensors = make_sources(src_dtype, sizes, g, device)
    offsets, total = gapped_offsets(sizes)
    flat = random_values(total, g, device).to(dst_dtype)
    return tensors, flat, offsets, 0.25 + torch.rand(1, generator=g).item()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("src_dtype,dst_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                 (torch.float32, torch.float16)])
def test_opcheck_passes_every_test(device, src_dtype, dst_dtype):
    """torch.library.opcheck's four tests on random inputs, accumulating and not. The tensors the ops only read
    require grad, so test_autograd_registration checks that these ops without an autograd formula give nothing
    that requires grad; test_aot_dispatch_dynamic traces them through AOTAutograd with dynamic shapes."""
    for seed, accumulate in ((0, False), (1, True)):
        srcs, flat, offsets, scale = _random_case(src_dtype, dst_dtype, seed, device)
        srcs = [t.requires_grad_() for t in srcs]
        result = torch.library.opcheck(torch.ops.zerocore.pack.default, (srcs, flat, offsets, scale, accumulate),
                                       test_utils=OPCHECKS)
        assert result == {k: "SUCCESS" for k in OPCHECKS}
        dsts, flat, offsets, scale = _random_case(dst_dtype, src_dtype, seed, device)
        result = torch.library.opcheck(torch.ops.zerocore.unpack.default,
                                       (flat.requires_grad_(), dsts, offsets, scale), test_utils=OPCHECKS)
        assert result == {k: "SUCCESS" for k in OPCHECKS}


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_calls_write_what_eager_calls_write(backend, tmp_path, monkeypatch):
    """Inside torch.compile (fullgraph: the ops are in the graph, not run eagerly at a break) AOTAutograd makes
    the in-place ops functional and copies their results back, and inductor re-inplaces them: the flat tensor
    and the unpacked tensors must end bit for bit as after eager calls."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))       # no warm cache from another run
    srcs, flat, offsets, scale = _random_case(torch.bfloat16, torch.float32, seed=2)
    dsts = [poison(torch.empty_like(t)) for t in srcs]

    def round_trip(srcs, flat, dsts):
        B.pack(srcs, flat, offsets, scale=scale, accumulate=True)
        B.unpack(flat, dsts, offsets, scale=1.0 / scale)

    compiled_flat, compiled_dsts = flat.clone(), [d.clone() for d in dsts]
    torch.compile(round_trip, backend=backend, fullgraph=True)(srcs, compiled_flat, compiled_dsts)
    round_trip(srcs, flat, dsts)
    assert not torch.equal(compiled_flat, _random_case(torch.bfloat16, torch.float32, seed=2)[1])   # it packed
    assert_same(compiled_flat, flat, "flat")
    for k, (c, e) in enumerate(zip(compiled_dsts, dsts)):
        assert_same(c, e, f"dsts[{k}]")


def test_ownership_is_not_claimed_while_compiling():
    """zerocore::ownership reads reference counts, which FakeTensors traced by torch.compile do not have: traced,
    is_sole_owner must answer the safe "no" (callers then copy), not a count baked into the graph."""
    def sole(t):
        return t * 1, B.is_sole_owner(t)

    fresh = torch.randn(8)
    assert sole(fresh)[1] is True
    assert torch.compile(sole, backend="aot_eager", fullgraph=True)(fresh)[1] is False


# ------------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.slow
def test_cuda_library_compiles_and_registers_kernels():
    """Runs without a GPU too: nvcc builds cuda_pack.cu (sm_90 unless a GPU says otherwise), the library loads and
    adds CUDA kernels to both ops. About 1-3 minutes on a cold cache."""
    ok, reason = zerocore.ops.compatibility("cuda_buckets")
    if not ok:
        pytest.skip(reason)
    zerocore.ops.load("cuda_buckets")
    for op in ("zerocore::pack", "zerocore::unpack"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op


def float64_bound(out, exact):
    """Half an ulp of out's dtype around the float64 value (plus one fp32 rounding of the product)."""
    bits = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[out.dtype]
    finite = torch.isfinite(exact) & (exact.abs() < {torch.float32: 3e38, torch.bfloat16: 3e38,
                                                     torch.float16: 65504.0}[out.dtype])
    tiny = {torch.float32: 2.0 ** -149, torch.bfloat16: 2.0 ** -133, torch.float16: 2.0 ** -24}[out.dtype]
    e = exact[finite]
    half_ulp = torch.exp2(torch.floor(torch.log2(e.abs().clamp_min(tiny))) - bits - 1).clamp_min(tiny / 2)
    err = (out[finite].double() - e).abs()
    return bool((err <= half_ulp * 1.0001 + e.abs() * 2.0 ** -23).all())


@pytest.mark.parametrize("src_dtype,dst_dtype", PAIRS, ids=[f"{dname(a)}-{dname(b)}" for a, b in PAIRS])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize("align", [1, 32], ids=["unaligned", "aligned"])
def test_cuda_pack_matches_torch(src_dtype, dst_dtype, accumulate, scale, align):
    g = torch.Generator().manual_seed(11)
    sizes = SIZES + [4097, 131_073]  # odd sizes across vector widths and chunk boundaries
    srcs = [s.cuda() for s in make_sources(src_dtype, sizes, g)]
    offsets, total = gapped_offsets(sizes, gap=1, align=align)
    dst = (random_values(total, g).to(dst_dtype).cuda() if accumulate
           else poison(torch.empty(total, dtype=dst_dtype, device="cuda")))
    before = dst.clone()
    expected = pack_reference(srcs, before, offsets, scale, accumulate)
    B.pack(srcs, dst, offsets, scale=scale, accumulate=accumulate)
    torch.cuda.synchronize()
    assert_same(dst, expected, "cuda pack")
    exact = before.double() if accumulate else torch.zeros(total, dtype=torch.float64, device="cuda")
    for s, at in zip(srcs, offsets):
        prod = s.reshape(-1).double() * float(torch.tensor(scale, dtype=torch.float32))
        exact[at:at + s.numel()] = (exact[at:at + s.numel()] if accumulate else 0) + prod
    written = torch.zeros(total, dtype=torch.bool, device="cuda")
    for s, at in zip(srcs, offsets):
        written[at:at + s.numel()] = True
    if not accumulate:  # accumulate rounds twice (product, then sum): covered by the bit-exact check above
        assert float64_bound(dst[written], exact[written])
    assert_same(dst[~written], before[~written], "cuda pack gaps")


@pytest.mark.parametrize("src_dtype,dst_dtype", PAIRS, ids=[f"{dname(a)}-{dname(b)}" for a, b in PAIRS])
@pytest.mark.parametrize("align", [1, 32], ids=["unaligned", "aligned"])
def test_cuda_unpack_matches_torch(src_dtype, dst_dtype, align):
    g = torch.Generator().manual_seed(12)
    sizes = SIZES + [4097, 131_073]
    offsets, total = gapped_offsets(sizes, gap=1, align=align)
    flat = random_values(total, g).to(src_dtype).cuda()
    for scale in (1.0, -2.5):
        dsts = [poison(torch.empty(n, dtype=dst_dtype, device="cuda")) for n in sizes]
        B.unpack(flat, dsts, offsets, scale=scale)
        torch.cuda.synchronize()
        for i, (d, e) in enumerate(zip(dsts, unpack_reference(flat, dsts, offsets, scale))):
            assert_same(d, e, f"cuda unpack dsts[{i}]")
            at = offsets[i]
            assert float64_bound(d, flat[at:at + d.numel()].double() * scale), f"dsts[{i}] float64"


def test_cuda_many_tensors_one_call():
    """More tensors than fit in one launch's argument block: the op must split into several launches."""
    g = torch.Generator().manual_seed(13)
    sizes = [int(n) for n in torch.randint(0, 300, (3000,), generator=g)]
    srcs = [random_values(n, g).cuda() for n in sizes]
    offsets, total = gapped_offsets(sizes, gap=2)
    dst = poison(torch.empty(total, dtype=torch.bfloat16, device="cuda"))
    expected = pack_reference(srcs, dst.clone(), offsets, 0.5, False)
    B.pack(srcs, dst, offsets, scale=0.5)
    assert_same(dst, expected, "3000 tensors")
    outs = [poison(torch.empty(n, device="cuda")) for n in sizes]
    B.unpack(dst, outs, offsets, scale=2.0)
    for i, (o, e) in enumerate(zip(outs, unpack_reference(dst, outs, offsets, 2.0))):
        assert_same(o, e, f"outs[{i}]")


def test_cuda_tensor_over_2_31_elements():
    """Index math in 64 bits: a tensor of more than 2^31 elements packed at an odd offset (the unaligned path),
    then unpacked from a 16-byte aligned offset (the vector path); 32-bit offsets would wrap around."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with at least 40 GiB (the tensors take about 22 GB)")
    n = 2**31 + 1037  # odd, and past 2^31 by more than a slice
    torch.manual_seed(15)
    src = torch.randn(n, device="cuda")
    bucket = poison(torch.empty(n + 2, dtype=torch.bfloat16, device="cuda"))
    B.pack([src], bucket, [1], scale=0.5)
    slices = [(0, 1000), (2**31 - 500, 2**31 + 500), (n - 1000, n)]
    for lo, hi in slices:
        assert_same(bucket[1 + lo:1 + hi], (src[lo:hi] * 0.5).to(torch.bfloat16), f"pack [{lo}, {hi})")
    sentinel = poison(torch.empty(2, dtype=torch.bfloat16, device="cuda"))
    assert_same(bucket[[0, n + 1]], sentinel, "pack wrote outside its range")
    m = n - 7
    out = poison(src)[:m]  # src's memory, 8.6 GB, reused; bucket element 8 is 16 bytes in: aligned
    B.unpack(bucket, [out], [8], scale=2.0)
    for lo, hi in [(0, 1000), (2**31 - 500, 2**31 + 500), (m - 1000, m)]:
        assert_same(out[lo:hi], bucket[8 + lo:8 + hi].float() * 2.0, f"unpack [{lo}, {hi})")


def test_cuda_runs_on_current_stream():
    """The kernel must queue behind earlier work on the caller's stream: its input is modified there, after a
    long sleep, so a kernel launched on any other stream would read the old values."""
    g = torch.Generator().manual_seed(14)
    src = random_values(1 << 20, g).cuda()
    dst = poison(torch.empty(1 << 20, dtype=torch.float16, device="cuda"))
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        src.mul_(3.0)
        B.pack([src], dst, [0], scale=2.0)
        expected = (src * 2.0).half()
    torch.cuda.synchronize()
    assert_same(dst, expected, "on side stream")


def test_cuda_errors():
    with pytest.raises(RuntimeError, match="every tensor must be on one device"):
        B.pack([torch.randn(3)], torch.empty(3, device="cuda"), [0])
    with pytest.raises(RuntimeError, match="dtype"):
        B.pack([torch.randn(3, device="cuda", dtype=torch.float64)], torch.empty(3, device="cuda"), [0])
    with pytest.raises(RuntimeError, match=r"\[2, 5\)"):
        B.unpack(torch.randn(4, device="cuda"), [torch.empty(3, device="cuda")], [2])
    if torch.cuda.device_count() > 1:
        with pytest.raises(RuntimeError, match="one device"):
            B.pack([torch.randn(3, device="cuda:1")], torch.empty(3, device="cuda:0"), [0])


for _name in [n for n in list(globals()) if n.startswith("test_cuda_") and "compiles" not in n]:
    for _mark in cuda:
        globals()[_name] = _mark(globals()[_name])
