"""NVMe optimizer offload (zerocore/zero/swapper.py) end to end on 2 gloo ranks: parity with AdamW and with CPU
offload for stages 1-3 (fp32 and bf16), exact host-buffer accounting, checkpoints, a disk that fails mid-run,
construction-time path checks agreed by every rank, and a model twice the memory limit trained inside a memory
cgroup (examples/train_beyond_memory.py under torchrun). Bodies in tests/zero_swapper_scenarios.py."""
import json
import os
import subprocess
import sys
import time

import pytest

import zero_swapper_scenarios as S
from dist_helpers import check_all_ranks, free_port


def _values(scenario_results, name):
    return check_all_ranks(scenario_results("zero_swapper_scenarios", 2, S.SCENARIOS_BY_WORLD[2]), name)


@pytest.mark.parametrize("name", S.PARITY)
def test_nvme_offload_trains_like_adamw_and_like_cpu_offload(scenario_results, name):
    for v in _values(scenario_results, name):
        assert v["rel_err"] <= S.Z.FP32_TOL, v
        assert v["grad_norm"] == pytest.approx(v["ref_grad_norm"], rel=1e-4), v
        assert v["same_as_cpu"], v            # bit for bit the offload_optimizer="cpu" run
        assert v["sub_groups"] >= 5, v        # the pipeline really walked several sub-groups
        assert v["removed_at_close"], v


@pytest.mark.parametrize("name", S.PARAMS)
def test_stage3_nvme_parameters_train_like_adamw_and_like_cpu_offload(scenario_results, name):
    for v in _values(scenario_results, name):
        assert v["rel_err"] <= S.Z.FP32_TOL, v
        assert v["grad_norm"] == pytest.approx(v["ref_grad_norm"], rel=1e-4), v
        assert v["same_as_cpu"], v
        # every partitioned unit reads its shard from NVMe, none keeps one in memory
        assert v["param_units_on_nvme"] >= 2 and v["shards_in_memory"] == 0, v
        assert v["param_buffer_bytes"] > 0, v
    if name == "nvme_params_wide_s3":        # prefetch_bucket_size=1: the shards after the next unit read ahead
        assert all(v["param_reads"]["ahead"] > 0 for v in _values(scenario_results, name))


def test_stage3_nvme_parameters_bf16_match_cpu_offload(scenario_results):
    for v in _values(scenario_results, "nvme_params_bf16_s3"):
        assert v["same_as_cpu"], v


def test_nvme_offload_bf16_matches_cpu_offload(scenario_results):
    for v in _values(scenario_results, "nvme_bf16_s2"):
        assert v["same_as_cpu"] and v["moved"] > 1e-3, v


def test_nvme_host_memory_is_the_buffers_exactly(scenario_results):
    for per_stage in _values(scenario_results, "nvme_accounting"):
        for stage, v in per_stage.items():
            assert v["buffer_bytes"] == v["expected_buffer_bytes"], (stage, v)
            assert v["nvme_bytes"] == v["expected_nvme_bytes"] == v["file_size"], (stage, v)
            assert v["host_state"] == 0 and v["windows"] >= 5, (stage, v)
            assert v["file_mode"] == "0o600" and v["dir_mode"] == "0o700", (stage, v)
            assert v["by_location"] == {"device": 0, "host": v["expected_host"], "pinned": 0,
                                        "nvme": v["nvme_bytes"]}, (stage, v)


def test_nvme_checkpoint_resumes_under_nvme_and_in_memory(scenario_results):
    for v in _values(scenario_results, "nvme_checkpoint_resume"):
        assert v == {"nvme": True, "memory": True}, v


def test_nvme_disk_that_fails_mid_run_rolls_back_on_every_rank_and_resumes(scenario_results):
    values = _values(scenario_results, "nvme_disk_fails_mid_run")
    if "skipped" in values[0]:
        pytest.skip(values[0]["skipped"])
    for rank, v in enumerate(values):
        assert v["raised"] and v["ranks"] == [1], v
        assert "rank(s) [1]" in v["raised"] and "step() again" in v["raised"], v
        assert v["unchanged"] and v["finite"] and v["steps_after_failure"] == 3, v
        assert v["steps"] == 6 and v["same_as_uninterrupted"], v
    assert values[1]["free_after_fill"] == 0               # the disk really was full before step 1
    assert values[0]["raised"] == values[1]["raised"]       # the same error on every rank ...
    assert "rank 1: " in values[1]["raised"] and "Read-only file system" in values[1]["raised"]   # ... naming it


def test_nvme_path_problem_on_one_rank_raises_on_every_rank(scenario_results):
    messages = [v["message"] for v in _values(scenario_results, "nvme_path_checked_on_every_rank")]
    assert messages[0] == messages[1] and "rank 1" in messages[0], messages
    assert "/nonexistent/zerocore-nvme" in messages[0] and "does not exist" in messages[0], messages


# ------------------------------------------------------------------------------------------ beyond memory
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                       "train_beyond_memory.py")
LIMIT = 3 << 30             # the memory cgroup's limit for the whole job (torchrun's agent and both ranks)
PARAMS = 4.1e8              # 13 blocks, 409M parameters: 16 bytes of model state each, 6.5 GB, twice the limit


def _memory_cgroup():
    """A fresh cgroup v1 memory controller folder (the test skips, saying why, where there is none)."""
    if os.geteuid() != 0:
        pytest.skip("a memory cgroup needs root")
    root = "/sys/fs/cgroup/memory"
    if not os.path.isdir(root):
        pytest.skip(f"no cgroup v1 memory controller at {root}")
    path = os.path.join(root, f"zerocore-test-{os.getpid()}")
    try:
        os.mkdir(path)
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
            f.write(str(LIMIT))
        if os.path.exists(os.path.join(path, "memory.memsw.limit_in_bytes")):
            with open(os.path.join(path, "memory.memsw.limit_in_bytes"), "w") as f:
                f.write(str(LIMIT))
    except OSError as e:
        pytest.skip(f"cannot set up a memory cgroup here ({e})")
    return path


def _run_limited(cgroup, *args, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), EXAMPLE, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # The shell joins the cgroup, then becomes torchrun: every process of the job is limited.
    return subprocess.run(["bash", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "bash", *cmd],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _max_usage(cgroup):
    with open(os.path.join(cgroup, "memory.max_usage_in_bytes")) as f:
        return int(f.read())


@pytest.mark.slow
def test_stage3_nvme_trains_a_model_twice_the_memory_limit(tmp_path):
    cgroup = _memory_cgroup()
    try:
        done = _run_limited(cgroup, "--params", str(PARAMS), "--steps", "3", "--nvme-path", str(tmp_path))
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        result = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
        assert result["model_state_bytes"] >= 2 * LIMIT, result
        losses = result["losses"]
        assert all(b < a for a, b in zip(losses, losses[1:])), losses        # it trains
        assert _max_usage(cgroup) <= LIMIT, _max_usage(cgroup)
        assert result["swapped_bytes_per_step_rank0"] > 0.5 * 12 * result["params"] / 2, result
        print("offloaded:", json.dumps(dict(result, max_usage=_max_usage(cgroup))))
        # The same model without offload does not fit: the kernel kills it inside the same limit.
        with open(os.path.join(cgroup, "memory.max_usage_in_bytes"), "w") as f:
            f.write("0")
        killed = _run_limited(cgroup, "--params", str(PARAMS), "--steps", "3", "--no-offload")
        assert killed.returncode != 0 and "RESULT" not in killed.stdout, killed.stdout[-2000:]
        assert "Signals.SIGKILL" in killed.stderr or "exitcode  : -9" in killed.stderr, killed.stderr[-3000:]
        assert not os.listdir(tmp_path / "zerocore" / "rank0"), "the NVMe files were not removed"
    finally:
        subprocess.run(["bash", "-c", f"cat {cgroup}/cgroup.procs | xargs -r kill -9"], capture_output=True)
        time.sleep(1)
        os.rmdir(cgroup)
