"""save_checkpoint / load_checkpoint: resume at 1-4 ranks and across stages 1/2, crash safety (a save killed
midway), checksums, truncation, refused pickles, tags and mismatched models. Multi-rank bodies in
tests/zero_checkpoint_scenarios.py."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import zero_checkpoint_scenarios as C
from dist_helpers import check_all_ranks, run_scenarios
from zerocore.zero import ZeroOptimizer
from zerocore.zero.checkpoint import check_tag, rank_file


@pytest.fixture(scope="module")
def saved_at_2_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    saved = os.environ.get("ZEROCORE_CKPT_TEST_DIR")
    os.environ["ZEROCORE_CKPT_TEST_DIR"] = str(folder)      # read by the spawned ranks
    try:
        yield folder, run_scenarios(2, "zero_checkpoint_scenarios", C.SAVE)
    finally:
        if saved is None:
            os.environ.pop("ZEROCORE_CKPT_TEST_DIR", None)
        else:
            os.environ["ZEROCORE_CKPT_TEST_DIR"] = saved


def test_resume_at_the_same_world_size_is_bit_identical(saved_at_2_ranks):
    _, res = saved_at_2_ranks
    assert check_all_ranks(res, C.SAVE[0]) == [{"bit_identical": True}] * 2


def test_async_save_commits_at_the_next_call_and_reports_background_failures(saved_at_2_ranks):
    _, res = saved_at_2_ranks
    vals = check_all_ranks(res, "async_save_commits_at_next_call")
    assert all(v["committed"] for v in vals) and len({v["message"] for v in vals}) == 1


@pytest.mark.parametrize("world", [1, 3, 4])
def test_resume_at_another_world_size_and_stage(saved_at_2_ranks, world):
    folder, res = saved_at_2_ranks
    check_all_ranks(res, C.SAVE[0])
    check_all_ranks(res, "save_stage3_at_2")
    os.environ["ZEROCORE_CKPT_TEST_DIR"] = str(folder)
    got = run_scenarios(world, "zero_checkpoint_scenarios", C.RESUME)
    for name in C.RESUME:
        assert all(v["rel_err"] <= C.RESUME_TOL for v in check_all_ranks(got, name))


def test_checkpoint_layout(saved_at_2_ranks):
    folder, res = saved_at_2_ranks
    check_all_ranks(res, C.SAVE[0])
    ckpt = folder / f"global_step{C.SAVED_AT}"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        ["manifest.json", "client_state.pt", rank_file(0, 2), rank_file(1, 2)])

def test_consolidate_gives_the_model_state_dict(saved_at_2_ranks, tmp_path):
    import zerocore
    from safetensors.torch import load_file
    from zero_scenarios import mlp
    folder, res = saved_at_2_ranks
    check_all_ranks(res, C.SAVE[0])
    want = torch.load(folder / "at_save.pt")
    state = zerocore.consolidate(folder)
    assert list(state) == list(want)
    plain = mlp(seed=3)
    plain.load_state_dict(state)                           # strict: the same keys and shapes as the model's
    for k in want:
        assert torch.equal(state[k], want[k]), k
    # Written as safetensors, sharded with Hugging Face's index; bf16 on request.
    files = zerocore.consolidate(folder, out=tmp_path / "hf", max_shard_bytes=1500)
    index = __import__("json").loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(files) > 1 and set(index["weight_map"]) == set(want)
    merged = {}
    for f in files:
        merged.update(load_file(str(f)))
    assert all(torch.equal(merged[k], want[k]) for k in want)
    one = zerocore.consolidate(folder, out=tmp_path / "bf16", dtype=torch.bfloat16)
    assert [f.name for f in one] == ["model.safetensors"]
    assert all(torch.equal(t, want[k].to(torch.bfloat16)) for k, t in load_file(str(one[0])).items())


def test_consolidate_from_the_command_line(saved_at_2_ranks, tmp_path):
    from safetensors.torch import load_file
    folder, res = saved_at_2_ranks
    check_all_ranks(res, C.SAVE[0])
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "zerocore", "consolidate", str(folder), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    want = torch.load(folder / "at_save.pt")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert not [p for p in folder.iterdir() if ".partial-" in p.name]          # staging folders are gone


# ------------------------------------------------------------------------------------ single-rank failure cases
def _train_and_save(tmp_path, tag=None, steps=2, client_state=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    opt = ZeroOptimizer(model, lr=1e-2, comm_timeout_s=30)
    for _ in range(steps):
        opt.backward(model(torch.randn(4, 8)).square().mean())
        opt.step()
        opt.zero_grad()
    opt.save_checkpoint(tmp_path / "ckpt", tag=tag, client_state=client_state)
    return model, opt


def test_tied_weights_and_buffers_consolidate_under_every_key(single_rank_group, tmp_path):
    import zerocore
    from zero_scenarios import gpt
    model = gpt()
    model.register_buffer("seen", torch.arange(3.0))
    opt = ZeroOptimizer(model, lr=1e-2, comm_timeout_s=30)
    opt.backward(model(torch.randint(0, 40, (2, 8))).square().mean())
    opt.step()
    opt.save_checkpoint(tmp_path / "ckpt")
    state = zerocore.consolidate(tmp_path / "ckpt")
    want = model.state_dict()
    assert list(state) == list(want)                        # head.weight (tied to emb.weight) and the buffer too
    assert all(torch.equal(state[k], want[k]) for k in want)


CONSOLIDATE_RSS = textwrap.dedent('''
    import json, sys, torch
    from zerocore.zero.consolidate import consolidate
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    before = rss("VmRSS:")
    files = consolidate(sys.argv[1], out=sys.argv[2], max_shard_bytes=int(sys.argv[3]))
    print(json.dumps({"peak_above_start": rss("VmHWM:") - before, "files": len(files)}))
''')


def test_consolidation_memory_is_bounded_by_one_parameter(single_rank_group, tmp_path):
    """Peak RSS of a streaming consolidation stays under 2x the largest parameter plus a fixed 32 MiB, far below
    the checkpoint's size (8 parameters of 16 MiB: 128 MiB of masters, 384 MiB of files)."""
    import json
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048, bias=False) for _ in range(8)])
    opt = ZeroOptimizer(model, lr=1e-3, comm_timeout_s=60, host_block_cache=False)
    opt.save_checkpoint(tmp_path / "ckpt")
    opt.close()
    del model, opt
    script = tmp_path / "consolidate.py"
    script.write_text(CONSOLIDATE_RSS)
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt"), str(tmp_path / "out"),
                           str(3 * 2048 * 2048 * 4)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    largest = 2048 * 2048 * 4
    assert got["files"] == 3
    print("consolidation peak above start:", got)
    assert got["peak_above_start"] < 2 * largest + 32 * 2 ** 20, got


def test_corrupt_byte_is_named_and_nothing_loads(single_rank_group, tmp_path):
    model, opt = _train_and_save(tmp_path)
    before = [p.detach().clone() for p in model.parameters()]
    path = tmp_path / "ckpt" / "global_step2" / rank_file(0, 1)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40                                        # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    opt.backward(model(torch.randn(4, 8)).square().mean())
    opt.step()
    after_step = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"crc32 check: the file is corrupt") as e:
        opt.load_checkpoint(tmp_path / "ckpt")
    assert str(path) in str(e.value)
    assert all(torch.equal(a, p) for a, p in zip(after_step, model.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(before, after_step))


def test_truncated_file_is_named(single_rank_group, tmp_path):
    _, opt = _train_and_save(tmp_path)
    path = tmp_path / "ckpt" / "global_step2" / rank_file(0, 1)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        opt.load_checkpoint(tmp_path / "ckpt")


def test_a_pickle_with_code_is_refused(single_rank_group, tmp_path):
    """A crafted client_state.pt (its manifest entry made to match) is refused by weights_only=True: the code in
    it never runs."""
    import json
    from zerocore.zero.checkpoint import _file_crc
    model, opt = _train_and_save(tmp_path, client_state={"epoch": 1})
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    folder = tmp_path / "ckpt" / "global_step2"
    torch.save({"client_state": Evil(), "lr_scheduler": None}, folder / "client_state.pt")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["extras"]["client_state.pt"] = {"size": (folder / "client_state.pt").stat().st_size,
                                             "crc32": _file_crc(folder / "client_state.pt")}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        opt.load_checkpoint(tmp_path / "ckpt")
    assert not marker.exists()


class Custom:
    """Picklable, but not a type torch.load(weights_only=True) accepts."""


def test_a_client_state_that_could_not_be_loaded_is_refused_at_save(single_rank_group, tmp_path):
    _, opt = _train_and_save(tmp_path, tag="first")
    with pytest.raises(RuntimeError, match="weights_only=True"):
        opt.save_checkpoint(tmp_path / "ckpt", tag="second", client_state={"obj": Custom()})
    assert (tmp_path / "ckpt" / "latest").read_text() == "first" and not (tmp_path / "ckpt" / "second").exists()


def test_a_replaced_client_state_fails_its_checksum(single_rank_group, tmp_path):
    _, opt = _train_and_save(tmp_path, client_state={"epoch": 1})
    torch.save({"client_state": {"epoch": 99}, "lr_scheduler": None},
               tmp_path / "ckpt" / "global_step2" / "client_state.pt")
    with pytest.raises(ValueError, match="client_state.pt is missing, truncated or corrupt"):
        opt.load_checkpoint(tmp_path / "ckpt")


def test_other_model_lists_the_differences(single_rank_group, tmp_path):
    _train_and_save(tmp_path)
    other = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 5))
    opt = ZeroOptimizer(other, comm_timeout_s=30)
    with pytest.raises(ValueError, match=r"parameter '2.weight': checkpoint shape \(4, 16\) != model shape \(5, 16\)"):
        opt.load_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("tag", ["../escape", "/abs", "a/b", "..", ".hidden", "", "latest", "manifest.json"])
def test_tags_are_plain_folder_names(tag):
    with pytest.raises(ValueError, match="plain folder name|reserved"):
        check_tag(tag)


def test_frozen_parameters_buffers_and_bf16_masters_round_trip(single_rank_group, tmp_path):
    """bf16 model (fp32 masters), a frozen layer and a BatchNorm's buffers: a resumed run equals the original."""
    def build(seed):
        torch.manual_seed(seed)
        m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))
        m[2].requires_grad_(False)
        return m.to(torch.bfloat16)          # BatchNorm's running stats in bf16 too

    def train(model, opt, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            opt.backward(model(torch.randn(6, 8, generator=g).to(torch.bfloat16)).float().square().mean())
            opt.step()
            opt.zero_grad()
        opt.wait_for_params()

    model = build(0)
    opt = ZeroOptimizer(model, lr=1e-2, comm_timeout_s=30)
    assert opt.master is not None                       # bf16 parameters: fp32 masters
    train(model, opt, 2, seed=1)
    opt.save_checkpoint(tmp_path / "ckpt")
    masters = opt.master.clone()
    train(model, opt, 2, seed=2)
    other = build(5)
    opt2 = ZeroOptimizer(other, lr=1e-2, comm_timeout_s=30)
    opt2.load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(opt2.master, masters)
    assert torch.equal(other[1].running_mean, opt2.model[1].running_mean)
    train(other, opt2, 2, seed=2)
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n


def test_a_damaged_manifest_is_named(single_rank_group, tmp_path):
    _, opt = _train_and_save(tmp_path)
    path = tmp_path / "ckpt" / "global_step2" / "manifest.json"
    path.write_text(path.read_text()[:50])
    with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
        opt.load_checkpoint(tmp_path / "ckpt")


def test_existing_tag_is_not_overwritten(single_rank_group, tmp_path):
    _, opt = _train_and_save(tmp_path, tag="t")
    with pytest.raises(RuntimeError, match="already exists"):
        opt.save_checkpoint(tmp_path / "ckpt", tag="t")
    assert (tmp_path / "ckpt" / "t" / "manifest.json").exists()


def test_an_existing_tag_fails_an_async_save_at_once_on_every_rank(single_rank_group, tmp_path):
    _, opt = _train_and_save(tmp_path, tag="t")
    with pytest.raises(RuntimeError, match="already exists"):
        opt.save_checkpoint(tmp_path / "ckpt", tag="t", async_save=True)     # now, not at the next call
    opt.wait_for_checkpoint()                                               # nothing pending


def test_a_checkpoint_newer_than_latest_is_set_aside_when_its_tag_is_saved_again(single_rank_group, tmp_path):
    """A job killed between renaming global_step3 into place and updating `latest` restarts from global_step2,
    redoes step 3 and saves global_step3 again: the orphan is moved aside, with a warning, not a failure."""
    model, opt = _train_and_save(tmp_path)                              # global_step2
    root = tmp_path / "ckpt"
    first = (root / "latest").read_text()
    opt.backward(model(torch.randn(4, 8)).square().mean()); opt.step(); opt.zero_grad()
    second = opt.save_checkpoint(root).name                             # global_step3
    (root / "latest").write_text(first)                                 # as if the job died before `latest`
    with pytest.warns(RuntimeWarning, match="newer than the one `latest` names"):
        opt.save_checkpoint(root)                                       # global_step3 again
    assert (root / "latest").read_text() == second and (root / second / "manifest.json").exists()
    assert len([p for p in root.iterdir() if p.name.startswith(f".{second}.orphaned-")]) == 1
    with pytest.raises(RuntimeError, match="already exists"):            # the tag `latest` names is still kept
        opt.save_checkpoint(root)


KILLED_SAVE = textwrap.dedent('''
    import os, signal, sys, torch, torch.distributed as dist
    from zerocore.zero import ZeroOptimizer, checkpoint
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    opt = ZeroOptimizer(model, lr=1e-2)
    def train():
        opt.backward(model(torch.randn(4, 8)).square().mean()); opt.step(); opt.zero_grad()
    train()
    opt.save_checkpoint(sys.argv[1], tag="good")
    torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, sys.argv[1] + "/good_params.pt")
    train()
    write = checkpoint._write_safetensors
    def write_then_die(path, tensors):
        write(path, tensors)
        os.kill(os.getpid(), signal.SIGKILL)      # the machine dies halfway through the save
    checkpoint._write_safetensors = write_then_die
    opt.save_checkpoint(sys.argv[1], tag="interrupted")
''')


def test_a_save_killed_midway_leaves_the_previous_checkpoint(single_rank_group, tmp_path):
    script = tmp_path / "save.py"
    script.write_text(KILLED_SAVE)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    repo = Path(__file__).resolve().parent.parent          # this checkout's zerocore, whatever pip installed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(script), str(ckpt), str(tmp_path / "pg")], capture_output=True,
                          text=True, timeout=120, cwd=str(repo / "tests"), env=env)
    assert done.returncode == -9, done.stderr[-2000:]
    assert (ckpt / "latest").read_text() == "good"
    assert not (ckpt / "interrupted").exists() and any(".interrupted.partial-" in p.name for p in ckpt.iterdir())
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    opt = ZeroOptimizer(model, comm_timeout_s=30)
    opt.load_checkpoint(ckpt)
    good = torch.load(ckpt / "good_params.pt")
    for n, p in model.named_parameters():
        assert torch.equal(p, good[n]), n
    assert opt.global_steps == 1
