"""zerocore.optim.FusedAdam and the CUDA kernel of zerocore::adam_step.

References: torch.optim.AdamW / Adam (fp32, tolerance a few fp32 ulps per step), a float64 re-implementation of
the mixed-precision path (fp32 master, low-precision param = rounded master), and, on CUDA, the CPU kernel of the
same op (the two devices share adam_math.h, so they must agree bit for bit). The optimizer logic (mixed dtype
lists, state dicts, skipped steps, GradScaler protocol) is device-independent and also runs on CPU tensors through
the CPU kernel, so most of it is tested here without a GPU; the cuda-marked tests repeat the numerics on the GPU.
"""
import copy
import io
import math

import pytest
import torch

import zerocore.ops
from zerocore.ops import adam as A
from zerocore.optim import FusedAdam
from zerocore.optim import fused_adam as fused_adam_module

cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]
LR, WD = 1e-2, 0.05


@pytest.fixture(scope="module", autouse=True)
def ops():
    zerocore.ops.load("cpu_adam")
    if torch.cuda.is_available():
        zerocore.ops.load("cuda_adam")


def make_params(device, dtypes, seed=0, sizes=(37, 300, 1025)):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(n, generator=g) * 0.5).to(device=device, dtype=dt))
            for n, dt in zip(sizes, dtypes)]


def grads_for(params, step, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype) for p in params]


def reference_mixed_f64(initial, grads_per_step, lr, betas, eps, wd, adamw=True):
    """float64 re-implementation of FusedAdam's mixed path: master starts at float(param), the grad is read as
    float(grad), the param is the master rounded to its dtype after every step."""
    b1, b2 = betas
    master = [p.detach().double().clone() for p in initial]
    m = [torch.zeros_like(x) for x in master]
    v = [torch.zeros_like(x) for x in master]
    for step, grads in enumerate(grads_per_step, start=1):
        for x, mi, vi, g in zip(master, m, v, grads):
            g = g.double()
            if adamw:
                x.mul_(1 - lr * wd)
            else:
                g = g + wd * x
            mi.mul_(b1).add_(g, alpha=1 - b1)
            vi.mul_(b2).addcmul_(g, g, value=1 - b2)
            x.sub_(lr / (1 - b1 ** step) * mi / (vi.sqrt() / math.sqrt(1 - b2 ** step) + eps))
    return master


# ------------------------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-1.0), "learning rate"),
    (dict(eps=-1e-8), "epsilon"),
    (dict(betas=(1.0, 0.999)), "betas"),
    (dict(betas=(0.9, -0.1)), "betas"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(amsgrad=True), "amsgrad"),
    (dict(maximize=True), "maximize"),
    (dict(state_dtype=torch.float16), "state_dtype"),
])
def test_bad_hyperparameters_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FusedAdam([torch.nn.Parameter(torch.randn(3))], **kwargs)


def test_bad_params_rejected_at_step():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    p.grad = torch.randn(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        FusedAdam([p]).step()
    q = torch.nn.Parameter(torch.randn(4, 3).t())
    q.grad = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="contiguous"):
        FusedAdam([q]).step()
    r = torch.nn.Parameter(torch.randn(3))
    r.grad = torch.randn(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        FusedAdam([r]).step()


def test_loaded_amsgrad_group_rejected():
    p = torch.nn.Parameter(torch.randn(3))
    theirs = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))], amsgrad=True)
    opt = FusedAdam([p])
    opt.load_state_dict(theirs.state_dict())
    p.grad = torch.randn(3)
    with pytest.raises(RuntimeError, match="amsgrad"):
        opt.step()


# ------------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("adamw", [True, False])
def test_fp32_matches_torch(device, adamw):
    ours = make_params(device, [torch.float32] * 3)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = FusedAdam(ours, lr=LR, weight_decay=WD, adamw_mode=adamw)
    torch_cls = torch.optim.AdamW if adamw else torch.optim.Adam
    ref = torch_cls(theirs, lr=LR, weight_decay=WD, **({"fused": True} if device == "cuda" else {}))
    for step in range(1, 6):
        for p, q, g in zip(ours, theirs, grads_for(ours, step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # fused kernels differ in fma placement only
    assert opt.state[ours[0]]["step"].item() == 5.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_mixed_dtypes_match_float64_reference(device, state_dtype):
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    params = make_params(device, dtypes, seed=2)
    initial = [p.detach().clone() for p in params]
    opt = FusedAdam(params, lr=LR, weight_decay=WD, state_dtype=state_dtype)
    grads_per_step = []
    for step in range(1, 6):
        grads = grads_for(params, step, seed=3)
        grads_per_step.append(grads)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    expected = reference_mixed_f64(initial, grads_per_step, LR, (0.9, 0.999), 1e-8, WD)
    # bf16 moments add a relative error of ~2^-9 to each update (lr-sized); fp32 moments only fp32 rounding
    atol = 5 * LR * (2e-2 if state_dtype == torch.bfloat16 else 1e-5)
    for p, e in zip(params, expected):
        state = opt.state[p]
        master = state["master_param"] if p.dtype != torch.float32 else p.detach()
        assert master.dtype == torch.float32 and state["exp_avg"].dtype == state_dtype
        torch.testing.assert_close(master.double(), e, rtol=2e-6, atol=atol)
        if p.dtype != torch.float32:
            assert torch.equal(p.detach(), master.to(p.dtype)), "the param must be its master, rounded"


def test_one_kernel_call_per_group_and_precision(monkeypatch):
    calls = []
    real = A.adam_step

    def counting(*args, **kwargs):
        calls.append((len(args[0]), len(kwargs.get("params_out", ()))))
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_adam_module._adam_ops, "adam_step", counting)
    params = make_params("cpu", [torch.float32, torch.bfloat16, torch.float32, torch.float16],
                         sizes=(5, 6, 7, 8))
    opt = FusedAdam(params)
    for p, g in zip(params, grads_for(params, 1)):
        p.grad = g
    opt.step()
    assert sorted(calls) == [(2, 0), (2, 2)]


# ---------------------------------------------------------------------------------------------- skipped steps
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_gradient_skips_whole_step(device, bad):
    params = make_params(device, [torch.bfloat16, torch.float32, torch.float32], seed=4)
    opt = FusedAdam([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}], lr=LR)
    for p, g in zip(params, grads_for(params, 1)):
        p.grad = g
    opt.step()  # one good step so there is state to protect
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy({i: opt.state[p] for i, p in enumerate(params)})
    grads = grads_for(params, 2)
    grads[2][7] = bad  # in the last group: the first groups' calls must not run either
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    assert opt.skipped_steps == 1
    for i, p in enumerate(params):
        assert torch.equal(p.detach(), before[i])
        for key, value in state_before[i].items():
            assert torch.equal(opt.state[p][key], value), key  # includes step: the skipped step did not count
    assert opt.state[params[0]]["step"].item() == 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_skipped_step_does_not_count_for_bias_correction(device):
    ours = make_params(device, [torch.float32], sizes=(64,))
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt, ref = FusedAdam(ours, lr=LR, weight_decay=WD), torch.optim.AdamW(theirs, lr=LR, weight_decay=WD)
    ours[0].grad = torch.full_like(ours[0], float("nan"))
    opt.step()
    for step in range(1, 4):
        g = grads_for(ours, step)[0]
        ours[0].grad, theirs[0].grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    assert opt.state[ours[0]]["step"].item() == 3.0 and opt.skipped_steps == 1


def test_check_finite_off_lets_inf_through():
    p = torch.nn.Parameter(torch.randn(8))
    p.grad = torch.randn(8)
    p.grad[3] = float("inf")
    FusedAdam([p], check_finite=False).step()
    assert not torch.isfinite(p).all()


def test_grad_scaler_protocol():
    """What torch.amp.GradScaler does for an optimizer with _step_supports_amp_scaling: it sets grad_scale (the
    loss scale) and found_inf; the step must unscale by it, and skip when found_inf is set."""
    ours = make_params("cpu", [torch.float32, torch.bfloat16], seed=5)
    plain = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt, ref = FusedAdam(ours, lr=LR), FusedAdam(plain, lr=LR)
    loss_scale = 1024.0
    for step in range(1, 3):
        grads = grads_for(ours, step)
        for p, q, g in zip(ours, plain, grads):
            p.grad, q.grad = (g.float() * loss_scale).to(g.dtype), g.clone()
        opt.grad_scale = torch.tensor(loss_scale)
        opt.found_inf = torch.tensor(0.0)
        opt.step()
        ref.step()
    for p, q in zip(ours, plain):
        assert torch.equal(p, q)  # power-of-two scale: exact
    before = [p.detach().clone() for p in ours]
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ours, before)) and opt.skipped_steps == 1


def test_real_grad_scaler_on_cpu():
    torch.manual_seed(6)
    model = torch.nn.Linear(16, 4)
    opt = FusedAdam(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x = torch.randn(8, 16)
    w0 = model.weight.detach().clone()
    scaler.scale(model(x).square().sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(model.weight, w0) and opt.state[model.weight]["step"].item() == 1.0
    model.weight.grad.fill_(float("inf"))  # overflow: the scaler and the optimizer must both skip
    w1 = model.weight.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(model.weight, w1) and opt.skipped_steps == 1 and scaler.get_scale() == 2.0 ** 9


# ------------------------------------------------------------------------------------------------ state dicts
def run_steps(opt, params, steps, seed):
    for step in steps:
        for p, g in zip(params, grads_for(params, step, seed)):
            p.grad = g
        opt.step()


def roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_round_trip_is_exact(device):
    dtypes = [torch.bfloat16, torch.float32, torch.float16]
    a = make_params(device, dtypes, seed=7)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a = FusedAdam(a, lr=LR, weight_decay=WD)
    run_steps(opt_a, a, range(1, 4), seed=8)
    saved = roundtrip(opt_a.state_dict())
    for p, q in zip(a, b):
        q.data.copy_(p.data)
    opt_b = FusedAdam(b, lr=0.5)  # hyperparameters come from the state dict
    opt_b.load_state_dict(saved)
    assert opt_b.param_groups[0]["lr"] == LR
    for p in b:
        if p.dtype != torch.float32:
            assert opt_b.state[p]["master_param"].dtype == torch.float32  # not cast to the param dtype
        assert opt_b.state[p]["exp_avg"].dtype == torch.float32 and opt_b.state[p]["step"].device.type == "cpu"
    run_steps(opt_a, a, range(4, 6), seed=8)
    run_steps(opt_b, b, range(4, 6), seed=8)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for key in opt_a.state[p]:
            assert torch.equal(opt_a.state[p][key], opt_b.state[q][key]), key


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_moves_between_torch_adamw_and_fused_adam(device):
    ours = make_params(device, [torch.float32] * 3, seed=9)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    torch_opt = torch.optim.AdamW(theirs, lr=LR, weight_decay=WD)
    run_steps(torch_opt, theirs, range(1, 3), seed=10)
    for p, q in zip(ours, theirs):
        p.data.copy_(q.data)
    opt = FusedAdam(ours)
    opt.load_state_dict(roundtrip(torch_opt.state_dict()))
    run_steps(opt, ours, range(3, 5), seed=10)
    run_steps(torch_opt, theirs, range(3, 5), seed=10)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    back = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in ours])
    back.load_state_dict(roundtrip(opt.state_dict()))
    assert back.param_groups[0]["weight_decay"] == WD and back.param_groups[0]["decoupled_weight_decay"]
    first = back.param_groups[0]["params"][0]
    assert torch.equal(back.state[first]["exp_avg"], opt.state[ours[0]]["exp_avg"])
    assert back.state[first]["step"].item() == 4.0


# -------------------------------------------------------------------------------------- CUDA kernel directly
@pytest.mark.slow
def test_cuda_library_compiles_and_registers_kernel():
    """Runs without a GPU too: nvcc builds cuda_adam.cu, the library loads and adds the CUDA kernel of
    zerocore::adam_step beside the CPU one. About 1-3 minutes on a cold cache."""
    ok, reason = zerocore.ops.compatibility("cuda_adam")
    if not ok:
        pytest.skip(reason)
    zerocore.ops.load("cuda_adam")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("zerocore::adam_step", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("zerocore::adam_step", "CPU")


def to_cuda_keeping_offset(t):
    """A CUDA copy of CPU tensor t at the same element offset into a fresh buffer (t.cuda() would allocate an
    aligned tensor and lose the misalignment the case asks for)."""
    shift = t.storage_offset()
    out = torch.empty(t.numel() + shift, dtype=t.dtype, device="cuda")[shift:]
    return out.copy_(t)


def cuda_case(sizes, grad_dtype, state_dtype, out_dtype, seed, misalign="none"):
    """Random inputs for adam_step on CUDA and identical copies on CPU. misalign "all": every tensor is a view one
    element into a larger buffer, so the kernel must take its unaligned path; "grads": only the gradients are, so
    one misaligned list among aligned ones must be enough to leave the vector path."""
    g = torch.Generator().manual_seed(seed)

    def make(n, dtype, scale=1.0, list_name=""):
        shift = 1 if misalign == "all" or (misalign == "grads" and list_name == "grads") else 0
        return (torch.randn(n + shift, generator=g) * scale).to(dtype)[shift:]

    case = {
        "params": [make(n, torch.float32) for n in sizes],
        "exp_avgs": [make(n, state_dtype, 0.1) for n in sizes],
        "exp_avg_sqs": [make(n, state_dtype, 0.1).abs_() for n in sizes],  # in place: keeps the offset
        "grads": [make(n, grad_dtype, list_name="grads") for n in sizes],
        "params_out": [make(n, out_dtype).fill_(-7.0) for n in sizes] if out_dtype else [],
    }
    on_cuda = {k: [to_cuda_keeping_offset(t) for t in v] for k, v in case.items()}
    return case, on_cuda


def identical(a, b):
    """Bit-for-bit equality (NaN included, unlike torch.equal)."""
    bits = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(bits), b.view(bits))


def run_adam(case, grad_scale, found_inf, check_finite=True, step=3, adamw=True):
    A.adam_step(case["params"], case["exp_avgs"], case["exp_avg_sqs"], case["grads"], lr=LR, beta1=0.9,
                beta2=0.999, eps=1e-8, weight_decay=WD, step=step, adamw=adamw, params_out=case["params_out"],
                grad_scale=grad_scale, found_inf=found_inf, check_finite=check_finite)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("state_dtype,out_dtype", [(torch.float32, None), (torch.float32, torch.bfloat16),
                                                   (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("misalign", ["none", "all", "grads"])
@pytest.mark.parametrize("adamw", [True, False])
def test_cuda_kernel_matches_cpu_kernel_bitwise(grad_dtype, state_dtype, out_dtype, misalign, adamw):
    sizes = [0, 1, 3, 4, 5, 1000, 32768, 32769, 100_003]  # empty, below / at / above a vector, chunk edges
    cpu, gpu = cuda_case(sizes, grad_dtype, state_dtype, out_dtype, seed=20, misalign=misalign)
    for key, tensors in gpu.items():  # the case really is (mis)aligned on the GPU, as asked
        misaligned = misalign == "all" or (misalign == "grads" and key == "grads")
        assert all((t.data_ptr() % 8 != 0) == misaligned for t in tensors if t.numel()), key
    run_adam(cpu, torch.tensor([0.25]), torch.zeros(1), adamw=adamw)
    run_adam(gpu, torch.tensor([0.25], device="cuda"), torch.zeros(1, device="cuda"), adamw=adamw)
    for key in cpu:
        for i, (c, d) in enumerate(zip(cpu[key], gpu[key])):
            assert torch.equal(c, d.cpu()), f"{key}[{i}] differs between the CPU and CUDA kernels"


def test_cuda_kernel_matches_float64_reference():
    sizes = [7, 4096, 65_537]
    cpu, gpu = cuda_case(sizes, torch.bfloat16, torch.float32, torch.bfloat16, seed=21)
    start = {k: [t.double() for t in v] for k, v in cpu.items()}
    run_adam(gpu, torch.tensor([0.5], device="cuda"), torch.zeros(1, device="cuda"), step=3)
    b1, b2, eps, step = 0.9, 0.999, 1e-8, 3
    for i in range(len(sizes)):
        p, m, v, g = (start[k][i].clone() for k in ("params", "exp_avgs", "exp_avg_sqs", "grads"))
        g = g * 0.5
        p *= 1 - LR * WD
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p -= LR / (1 - b1 ** step) * m / (v.sqrt() / math.sqrt(1 - b2 ** step) + eps)
        torch.testing.assert_close(gpu["params"][i].cpu().double(), p, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gpu["exp_avgs"][i].cpu().double(), m, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(gpu["exp_avg_sqs"][i].cpu().double(), v, rtol=1e-6, atol=1e-10)
        assert torch.equal(gpu["params_out"][i], gpu["params"][i].to(torch.bfloat16))


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("where", ["first", "last"])
def test_cuda_inf_anywhere_in_many_tensors_changes_nothing(where, grad_dtype):
    """More tensors than one launch's argument block holds (several launches): an inf in the last launch's
    tensors must stop the first launch's updates too. Each gradient dtype has its own scan."""
    sizes = [int(n) for n in torch.randint(1, 2000, (1500,), generator=torch.Generator().manual_seed(22))]
    _, gpu = cuda_case(sizes, grad_dtype, torch.float32, torch.bfloat16, seed=23)
    bad = gpu["grads"][0 if where == "first" else -1]
    bad[bad.numel() // 2] = float("-inf") if where == "first" else float("nan")
    before = {k: [t.clone() for t in v] for k, v in gpu.items()}
    flag = torch.zeros(1, device="cuda")
    run_adam(gpu, None, flag)
    assert flag.item() == 1.0
    for key in gpu:
        assert all(identical(a, b) for a, b in zip(gpu[key], before[key])), key


def test_cuda_flag_set_on_entry_or_bad_scale_changes_nothing():
    _, gpu = cuda_case([100, 5000], torch.float16, torch.float32, torch.float16, seed=24)
    before = {k: [t.clone() for t in v] for k, v in gpu.items()}
    entry_flag = torch.full((1,), 2.0, device="cuda")
    run_adam(gpu, None, entry_flag, check_finite=False)  # set on entry: no-op even unchecked
    assert entry_flag.item() == 2.0  # left as it was
    for bad_scale in (float("inf"), float("nan")):
        for check_finite in (True, False):  # unchecked: the CPU kernel raises; CUDA cannot without a host sync
            flag = torch.zeros(1, device="cuda")
            run_adam(gpu, torch.tensor([bad_scale], device="cuda"), flag, check_finite=check_finite)
            assert flag.item() == 1.0, (bad_scale, check_finite)
    for key in gpu:
        assert all(identical(a, b) for a, b in zip(gpu[key], before[key])), key
    _, empty = cuda_case([0, 0], torch.float32, torch.float32, None, seed=24)  # no elements: the scale decides
    flag = torch.zeros(1, device="cuda")
    run_adam(empty, torch.tensor([float("inf")], device="cuda"), flag)
    assert flag.item() == 1.0
    run_adam(empty, torch.tensor([0.5], device="cuda"), flag.zero_())
    assert flag.item() == 0.0


def test_cuda_many_tensors_match_cpu():
    sizes = [int(n) for n in torch.randint(0, 3000, (1300,), generator=torch.Generator().manual_seed(25))]
    cpu, gpu = cuda_case(sizes, torch.float32, torch.float32, None, seed=26)
    run_adam(cpu, None, torch.zeros(1))
    run_adam(gpu, None, torch.zeros(1, device="cuda"))
    assert all(torch.equal(c, d.cpu()) for c, d in zip(cpu["params"], gpu["params"]))


def test_cuda_tensor_over_2_31_elements():
    """Index math in 64 bits: one tensor of more than 2^31 elements (32-bit offsets would wrap around and write
    near its start). The update is elementwise, so slices at the start, across 2^31 and at the end are checked
    bit for bit against the CPU kernel; then an inf in the last chunk must be found and change nothing."""
    if torch.cuda.get_device_properties(0).total_memory < 48 * 2**30:
        pytest.skip("needs a GPU with at least 48 GiB (the tensors take about 26 GB)")
    n = 2**31 + 1037  # odd, and past 2^31 by more than a slice
    torch.manual_seed(29)
    gpu = {"params": [torch.randn(n, device="cuda")],
           "exp_avgs": [torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1],
           "exp_avg_sqs": [torch.rand(n, device="cuda", dtype=torch.bfloat16) * 0.1],
           "grads": [torch.randn(n, device="cuda", dtype=torch.bfloat16)],
           "params_out": [torch.empty(n, device="cuda", dtype=torch.bfloat16)]}
    slices = [(0, 1000), (2**31 - 500, 2**31 + 500), (n - 1000, n)]
    cpu = [{k: [v[0][lo:hi].cpu()] for k, v in gpu.items()} for lo, hi in slices]
    run_adam(gpu, torch.tensor([0.5], device="cuda"), torch.zeros(1, device="cuda"))
    for (lo, hi), case in zip(slices, cpu):
        run_adam(case, torch.tensor([0.5]), torch.zeros(1))
        for key in gpu:
            assert torch.equal(gpu[key][0][lo:hi].cpu(), case[key][0]), (key, lo)
    gpu["grads"][0][n - 2] = float("inf")
    before = [gpu["params"][0][lo:hi].clone() for lo, hi in slices]
    flag = torch.zeros(1, device="cuda")
    run_adam(gpu, None, flag, step=4)
    assert flag.item() == 1.0
    assert all(torch.equal(gpu["params"][0][lo:hi], b) for (lo, hi), b in zip(slices, before))


def test_cuda_runs_on_current_stream():
    """Gradients written on a side stream after a long sleep: the kernel must run after them, on that stream."""
    cpu, gpu = cuda_case([4096, 77], torch.bfloat16, torch.float32, torch.bfloat16, seed=28)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        for g in gpu["grads"]:
            g.mul_(-2.0)
        run_adam(gpu, None, torch.zeros(1, device="cuda"))
    torch.cuda.synchronize()
    for g in cpu["grads"]:
        g.mul_(-2.0)
    run_adam(cpu, None, torch.zeros(1))
    assert all(torch.equal(c, d.cpu()) for c, d in zip(cpu["params"], gpu["params"]))


def test_cuda_step_never_syncs_with_host():
    params = make_params("cuda", [torch.bfloat16, torch.float32], seed=27)
    opt = FusedAdam(params, lr=LR)
    for step in range(1, 4):
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()  # resolving the previous step's flag waits on an event, not on the stream
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert opt.skipped_steps == 0


def test_cuda_errors_name_the_problem():
    p = torch.randn(4, device="cuda")
    flag = torch.zeros(1, device="cuda")
    lists = ([p], [torch.zeros(4)], [torch.zeros(4, device="cuda")], [torch.randn(4, device="cuda")])
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] is on cpu"):  # the wrapper names the culprit
        A.adam_step(*lists, lr=LR, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, found_inf=flag)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] is on cpu but found_inf is on"):  # so does the kernel
        torch.ops.zerocore.adam_step(*lists, [], None, flag, LR, 0.9, 0.999, 1e-8, 0.0, 1, True, True)
    with pytest.raises(RuntimeError, match="not contiguous"):
        q = torch.randn(4, 4, device="cuda").t()
        A.adam_step([q], [torch.zeros_like(q)], [torch.zeros_like(q)], [torch.randn_like(q)], lr=LR, beta1=0.9,
                    beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, found_inf=flag)
    with pytest.raises(RuntimeError, match="params_out"):
        A.adam_step([p], [torch.zeros_like(p)], [torch.zeros_like(p)], [torch.randn_like(p)], lr=LR, beta1=0.9,
                    beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, found_inf=flag,
                    params_out=[torch.empty(4, device="cuda")])


for _name in [n for n in list(globals()) if n.startswith("test_cuda_") and "compiles" not in n]:
    for _mark in cuda:
        globals()[_name] = _mark(globals()[_name])
