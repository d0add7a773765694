"""ZeroTrainer (zerocore.integrations.transformers) against plain transformers.Trainer.

The runs (tests/hf_trainer_scenarios.py) happen once per module: one spawned group of 2 gloo ranks (ZeroTrainer at
stage 2 with keyword options, at stage 3 through TrainingArguments(deepspeed=<json with "auto"s>) on a model loaded
partitioned, and with transformers' stock ZeRO-3 config), then one process (plain Trainer, the reference; the
stage-3 checkpoint resumed at world size 1; fp16 overflow; a refused accumulation window). The tests compare them.

Parity metric: relative error |a - b| / |b| per logged value (loss, grad_norm, learning_rate of each of the 12
optimizer steps, eval loss), and ||p - p_ref|| / ||p_ref|| per saved tensor of the final model; TOL = 1e-4 (fp32;
the runs differ only in summation order and in zerocore's fused Adam vs torch's AdamW: measured <= 1.1e-6 on
parameters, <= 1e-6 on grad norms).
Clipping is active on every step (max_grad_norm 0.5 < every logged norm) and the schedule warms up and decays, so
the GA scaling, the clipping and the scheduler stepping all show in the compared numbers.
"""
import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from dist_helpers import check_all_ranks, run_scenarios  # noqa: E402

MODULE = "hf_trainer_scenarios"
TWO_RANKS = ["setup", "from_pretrained_partitioned", "stage2_keyword_config", "stage3_deepspeed_argument",
             "stock_auto_config"]
ONE_RANK = ["reference", "resume_at_one_rank", "fp16_overflow_skips_scheduler", "short_window_refused"]
TOL = 1e-4
STEPS, SAVE_STEPS, MAX_GRAD_NORM = 12, 6, 0.5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("hf_trainer")
    old = os.environ.get("ZEROCORE_HF_TESTDIR")
    os.environ["ZEROCORE_HF_TESTDIR"] = str(work)          # read by the spawned ranks
    try:
        two = run_scenarios(2, MODULE, TWO_RANKS, timeout_s=400)
        one = run_scenarios(1, MODULE, ONE_RANK, timeout_s=300)
    finally:
        if old is None:
            os.environ.pop("ZEROCORE_HF_TESTDIR", None)
        else:
            os.environ["ZEROCORE_HF_TESTDIR"] = old
    return {"work": work, **{n: two for n in TWO_RANKS}, **{n: one for n in ONE_RANK}}


def values(runs, name):
    return check_all_ranks(runs[name], name)


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def assert_steps_match(steps, ref, first_step=1):
    """Same steps, and per step loss / grad_norm / lr within TOL of the reference's."""
    steps = [s for s in steps if s[0] >= first_step]
    ref = [s for s in ref if s[0] >= first_step]
    assert [s[0] for s in steps] == [s[0] for s in ref] == list(range(first_step, STEPS + 1))
    for (step, loss, norm, lr), (_, rloss, rnorm, rlr) in zip(steps, ref):
        assert rel(loss, rloss) <= TOL, f"step {step}: loss {loss} vs reference {rloss}"
        assert rel(norm, rnorm) <= TOL, f"step {step}: grad_norm {norm} vs reference {rnorm}"
        assert abs(lr - rlr) <= TOL * max(abs(rlr), 1e-3), f"step {step}: learning_rate {lr} vs reference {rlr}"


def load_model_files(folder):
    from safetensors.torch import load_file
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def assert_params_match(folder, ref_folder, base_folder):
    got, ref, base = load_model_files(folder), load_model_files(ref_folder), load_model_files(base_folder)
    assert sorted(got) == sorted(ref), (sorted(set(got) ^ set(ref)))
    moved = max(float((ref[k] - base[k]).norm() / base[k].norm().clamp_min(1e-12)) for k in ref)
    assert moved > 1e-2, f"the reference barely trained (max relative change {moved}): the comparison says nothing"
    for k in ref:
        a, b = got[k].float(), ref[k]
        if k.endswith("attn.c_attn.bias"):
            # GPT-2's fused [query | key | value] bias: the key bias's gradient is analytically zero (softmax is
            # shift-invariant), so AdamW turns float noise into lr-sized steps there, different for any two
            # summation orders (DDP's too) and without effect on the model's outputs. Compare query and value.
            d = b.numel() // 3
            a, b = torch.cat([a[:d], a[2 * d:]]), torch.cat([b[:d], b[2 * d:]])
        err = float((a - b).norm() / b.norm().clamp_min(1e-12))
        assert err <= TOL, f"{k}: relative error {err} against plain Trainer"


def test_reference_trains_with_clipping_and_schedule(runs):
    ref = values(runs, "reference")[0]
    assert ref["optimizer"] == "AdamW"                       # torch's AdamW (optim="adamw_torch")
    norms = [s[2] for s in ref["steps"]]
    lrs = [s[3] for s in ref["steps"]]
    assert min(norms) > MAX_GRAD_NORM, f"clipping would not act: grad norms {norms}"
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(1e-2) and lrs[-1] < lrs[4] < max(lrs), lrs
    assert ref["steps"][-1][1] < ref["steps"][0][1] - 0.5      # it learns


@pytest.mark.parametrize("name", ["stage2_keyword_config", "stage3_deepspeed_argument"])
def test_zero_trainer_equals_plain_trainer(runs, name):
    """2 ranks x micro-batch 2 x GA 2 with ZeroTrainer == 1 process x micro-batch 4 x GA 2 with plain Trainer:
    per-step loss, grad norm and lr, eval loss and the final parameters."""
    ranks, ref = values(runs, name), values(runs, "reference")[0]
    assert [r["steps"] for r in ranks[1:]] == [ranks[0]["steps"]] * (len(ranks) - 1)   # every rank logs the same
    run = ranks[0]
    assert run["world_size"] == 2 and run["wrapped"] == "GPT2LMHeadModel"    # no DDP around the model
    assert run["config"]["stage"] == (2 if "stage2" in name else 3)
    assert run["config"]["gradient_clipping"] == MAX_GRAD_NORM and run["config"]["gradient_accumulation_steps"] == 2
    assert run["scheduler"] == "LambdaLR"                        # no scheduler section: Trainer's linear one
    assert_steps_match(run["steps"], ref["steps"])
    assert rel(run["eval_loss"], ref["eval_loss"]) <= TOL
    work = runs["work"]
    folder = "s2" if "stage2" in name else "s3"
    assert_params_match(work / folder / "final", work / "ref" / "final", work / "base")


@pytest.mark.parametrize("folder", ["s2", "s3"])
def test_checkpoint_folders(runs, folder):
    """checkpoint-N holds Trainer's files and a zerocore checkpoint instead of optimizer.pt / scheduler.pt."""
    values(runs, "stage3_deepspeed_argument")
    for step in (SAVE_STEPS, STEPS):
        ckpt = runs["work"] / folder / f"checkpoint-{step}"
        names = set(os.listdir(ckpt))
        assert {"latest", f"global_step{step}", "trainer_state.json", "rng_state_0.pth", "rng_state_1.pth",
                "config.json", "model.safetensors", "training_args.bin"} <= names, names
        assert not {"optimizer.pt", "scheduler.pt"} & names, names
        assert (ckpt / "latest").read_text().strip() == f"global_step{step}"
        assert (ckpt / f"global_step{step}" / "manifest.json").is_file()


def test_resume_at_another_world_size(runs):
    """checkpoint-6 written by 2 ranks (stage 3), resumed by 1 process (micro-batch 4, same global batch), goes
    on exactly as the uninterrupted run: steps 7-12 and the final parameters equal plain Trainer's."""
    resumed, ref = values(runs, "resume_at_one_rank")[0], values(runs, "reference")[0]
    assert resumed["world_size"] == 1
    assert_steps_match(resumed["steps"], ref["steps"], first_step=SAVE_STEPS + 1)
    assert rel(resumed["eval_loss"], ref["eval_loss"]) <= TOL
    work = runs["work"]
    assert_params_match(work / "resumed" / "final", work / "ref" / "final", work / "base")


@pytest.mark.parametrize("name", ["stage2_keyword_config", "stage3_deepspeed_argument", "stock_auto_config"])
def test_save_model_loads_with_from_pretrained(runs, name):
    """save_model's folder loads with AutoModelForCausalLM.from_pretrained and gives the trained model's logits."""
    run = values(runs, name)[0]
    assert run["logits_max_abs_diff"] <= 1e-5 * run["logits_scale"], run["logits_max_abs_diff"]


def test_stock_auto_config(runs):
    """transformers' stock ZeRO-3 config, unchanged, through TrainingArguments(deepspeed=dict): every "auto" is
    HF's value, its WarmupLR is the schedule (stepped once per update), offload is on, and the model learns."""
    run = values(runs, "stock_auto_config")[0]
    h = 64
    assert run["ds_argument_kept"]                  # args.deepspeed is the user's dict; no DeepSpeed plugin
    assert run["config"] == {"stage": 3, "lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1,
                             "gradient_clipping": MAX_GRAD_NORM, "gradient_accumulation_steps": 2,
                             "bucket_size": h * h, "prefetch_bucket_size": int(0.9 * h * h),
                             "param_persistence_threshold": 10 * h, "offload_optimizer": "cpu", "offload_param": "cpu"}
    assert run["scheduler"] == "WarmupLR"
    lrs = [s[3] for s in run["steps"]]
    assert lrs == pytest.approx(run["expected_lrs"], rel=1e-12, abs=1e-15), (lrs, run["expected_lrs"])
    losses = [s[1] for s in run["steps"]]
    assert losses[-1] < losses[0] - 0.5, losses


def test_from_pretrained_partitioned(runs):
    """from_pretrained(AutoModelForCausalLM, sharded folder) on 2 ranks: each rank holds half of the weights
    before the optimizer, buffers are real, and the assembled model equals a plain from_pretrained exactly."""
    assert values(runs, "setup")[0]["shards"] > 1                 # the folder has an index and several files
    ranks = values(runs, "from_pretrained_partitioned")
    for r in ranks:
        assert r["held_fraction"] <= 0.5 + 0.01 and r["buffers_ok"] and not r["training"], r
    assert ranks[0]["keys_equal"] and ranks[0]["max_abs_diff"] == 0.0, ranks[0]


def test_fp16_overflow_skipped_steps_do_not_step_the_scheduler(runs):
    run = values(runs, "fp16_overflow_skips_scheduler")[0]
    assert run["skipped"] >= 1 and run["updated"] >= 1, run
    assert run["global_step"] == run["skipped"] + run["updated"] == 8
    assert run["scheduler_steps"] == run["updated"], run          # once per real update, never for a skipped one
    skipped = [s for s in run["steps"] if math.isinf(s[2])]
    assert len(skipped) == run["skipped"]                          # the logged grad_norm of a skipped step: inf
    lrs = [s[3] for s in run["steps"]]
    for i, s in enumerate(run["steps"][:-1]):
        if math.isinf(s[2]):
            assert lrs[i + 1] == lrs[i], lrs                       # the lr did not move past a skipped step


def test_short_accumulation_window_is_refused(runs):
    err = values(runs, "short_window_refused")[0]["error"]
    assert err is not None and "not a multiple of gradient_accumulation_steps=2" in err
