"""The NVMe swap folder (zerocore/zero/swap_files.py) and damaged swap files (swapper.py), in one process:
path checks with the fix named, room checked against statvfs, files reserved, owner-only, removed at close,
runs sharing one nvme_path apart, files of a dead run removed and never read, a corrupt or truncated swap file
caught by its checksums with the parameters left as they were."""
import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from zerocore.zero import ZeroOptimizer
from zerocore.zero.swap_files import SwapFolder, SwapFolderError
from zerocore.zero.swapper import NVMeStateError


def _mount_tmpfs(target, *options):
    if os.geteuid() != 0:
        pytest.skip("mounting a test file system needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(target)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _mount_tmpfs(mnt, "size=1m")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_missing_path_names_it_and_the_fix(tmp_path):
    with pytest.raises(SwapFolderError, match="does not exist.*mkdir -p") as e:
        SwapFolder(tmp_path / "nope", 0, "u1", 4096)
    assert e.value.errno == errno.ENOENT and str(tmp_path / "nope") in str(e.value)


def test_read_only_path_is_refused(tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    _mount_tmpfs(mnt, "size=1m", "ro")
    try:
        with pytest.raises(SwapFolderError, match="not writable") as e:
            SwapFolder(mnt, 0, "u1", 4096)
        assert e.value.errno == errno.EACCES
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_too_small_says_needed_and_free_bytes_and_leaves_nothing(small_tmpfs):
    with pytest.raises(SwapFolderError) as e:
        SwapFolder(small_tmpfs, 3, "u1", 8 << 20)
    msg = str(e.value)
    assert e.value.errno == errno.ENOSPC and "rank 3" in msg and f"needs {8 << 20} bytes" in msg, msg
    assert "free" in msg and "larger disk" in msg, msg
    assert os.listdir(small_tmpfs / "zerocore" / "rank3") == []


def test_file_is_reserved_owner_only_and_removed(tmp_path):
    folder = SwapFolder(tmp_path, 0, "u1", 3 << 20)
    st = os.stat(folder.path)
    assert st.st_size == 3 << 20 and st.st_blocks * 512 >= 3 << 20        # allocated, not sparse
    assert oct(st.st_mode & 0o777) == "0o600" and oct(os.stat(folder.dir).st_mode & 0o777) == "0o700"
    other = SwapFolder(tmp_path, 0, "u2", 4096)                           # a second run in the same path
    assert other.dir != folder.dir and os.path.exists(folder.path)
    made = folder.dir
    folder.remove()
    assert not os.path.exists(made) and os.path.exists(other.path)
    other.remove()
    assert os.listdir(tmp_path / "zerocore" / "rank0") == []


def test_dead_runs_are_removed_live_ones_kept(tmp_path, caplog):
    rank_dir = tmp_path / "zerocore" / "rank0"
    dead, lockless, live = rank_dir / "run-dead", rank_dir / "run-nolock", rank_dir / "run-live"
    for d in (dead, lockless, live):
        d.mkdir(parents=True)
        (d / "state.bin").write_bytes(b"x" * 100)
    (dead / "lock").touch()
    (live / "lock").touch()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(live / 'lock')!r}, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        folder = SwapFolder(tmp_path, 0, "new", 4096)
        assert folder.removed_stale == 2
        assert not dead.exists() and not lockless.exists() and live.exists()
        assert "never read" in caplog.text
        folder.remove()
    finally:
        holder.kill()
        holder.wait()


def test_dead_runs_of_other_ranks_and_old_tmp_folders_are_removed(tmp_path):
    # A run at 4 ranks died; a 1-rank run cleans up rank1..3 too. A tmp- folder is only removed once old.
    base = tmp_path / "zerocore"
    for r in range(4):
        (base / f"rank{r}" / "run-old").mkdir(parents=True)
        (base / f"rank{r}" / "run-old" / "lock").touch()
    fresh_tmp, old_tmp = base / "rank2" / "tmp-new-1", base / "rank2" / "tmp-old-2"
    fresh_tmp.mkdir()
    old_tmp.mkdir()
    os.utime(old_tmp, (0, 0))
    folder = SwapFolder(tmp_path, 0, "new", 4096)
    assert folder.removed_stale == 5
    assert all(not (base / f"rank{r}" / "run-old").exists() for r in range(4))
    assert fresh_tmp.exists() and not old_tmp.exists()
    folder.remove()


def test_a_folder_others_can_write_is_refused(tmp_path):
    (tmp_path / "zerocore").mkdir(mode=0o777)
    os.chmod(tmp_path / "zerocore", 0o777)
    with pytest.raises(SwapFolderError, match="writable by it alone") as e:
        SwapFolder(tmp_path, 0, "u1", 4096)
    assert "0o777" in str(e.value)


def test_a_forked_child_does_not_remove_the_parents_folder(tmp_path):
    folder = SwapFolder(tmp_path, 0, "u1", 4096)
    pid = os.fork()
    if pid == 0:                       # the child exits through the same cleanup the exit hook runs
        folder.remove()
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.path.exists(folder.path)
    folder.remove()
    assert not os.path.exists(tmp_path / "zerocore" / "rank0" / "run-u1")


# ------------------------------------------------------------------------- whole optimizer, one rank
def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 96), torch.nn.GELU(), torch.nn.Linear(96, 16))


def _train(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.backward(model(torch.randn(8, 32, generator=g)).square().mean())
        opt.step()
        opt.zero_grad()


def _opt(model, path, **kw):
    return ZeroOptimizer(model, stage=2, lr=1e-2, offload_optimizer="nvme", nvme_path=str(path), buffer_count=2,
                         sub_group_size=1024, **kw)


STALE_RUN = textwrap.dedent('''
    import os, signal, sys, torch, torch.distributed as dist
    sys.path.insert(0, os.path.dirname(sys.argv[2]))
    from test_zero_swap_files import _model, _opt, _train
    dist.init_process_group("gloo", init_method="file://" + sys.argv[3], rank=0, world_size=1)
    model = _model()
    opt = _opt(model, sys.argv[1])
    _train(model, opt, 2, seed=7)
    os.kill(os.getpid(), signal.SIGKILL)     # dies without cleaning up
''')


def test_files_of_a_killed_run_are_replaced_not_read(tmp_path, single_rank_group):
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    script = tmp_path / "stale.py"
    script.write_text(STALE_RUN)
    done = subprocess.run([sys.executable, str(script), str(nvme), __file__, str(tmp_path / "pg2")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    left = os.listdir(nvme / "zerocore" / "rank0")
    assert len(left) == 1 and left[0].startswith("run-"), left
    model = _model()
    opt = _opt(model, nvme)
    assert opt.store.folder.removed_stale == 1
    _train(model, opt, 3)
    fresh = _model()
    fresh_opt = _opt(fresh, tmp_path)               # the same run in an empty folder
    _train(fresh, fresh_opt, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    opt.close()
    fresh_opt.close()
    assert os.listdir(nvme / "zerocore" / "rank0") == []


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_swap_file_raises_and_changes_nothing(tmp_path, single_rank_group, damage):
    model = _model()
    opt = _opt(model, tmp_path)
    _train(model, opt, 2)
    before = [p.detach().clone() for p in model.parameters()]
    path = opt.store.folder.path
    if damage == "flip":
        offset = opt.store._offset(1, opt.store.slot[1]) + 4 * 1024 + 8     # inside sub-group 1's exp_avg
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0x40]))
    else:
        os.truncate(path, opt.store._offset(1, 0))
    g = torch.Generator().manual_seed(9)
    opt.backward(model(torch.randn(8, 32, generator=g)).square().mean())
    with pytest.raises(NVMeStateError) as e:
        opt.step()
    msg = str(e.value)
    assert e.value.ranks == [0] and path in msg, msg
    assert ("checksum" in msg.lower()) if damage == "flip" else ("end" in msg.lower() or "trunc" in msg.lower()), msg
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.global_steps == 2
    opt.close()


def test_damaged_state_fails_state_dict_on_this_rank_without_changes(tmp_path, single_rank_group):
    model = _model()
    opt = _opt(model, tmp_path)
    _train(model, opt, 1)
    with open(opt.store.folder.path, "r+b") as f:          # damage sub-group 0's committed master
        f.seek(opt.store._offset(0, opt.store.slot[0]) + 16)
        f.write(b"\xff\xff\xff\xff")
    with pytest.raises(NVMeStateError, match="could not read its NVMe optimizer state.*checksum"):
        opt.state_dict()
    opt.close()


def test_stage3_parameter_read_failure_raises_and_leaves_the_unit_sharded(tmp_path, single_rank_group):
    from zerocore.zero.residency import ParamState
    model = _model()
    opt = ZeroOptimizer(model, stage=3, lr=1e-2, param_persistence_threshold=16, offload_optimizer="nvme",
                        offload_param="nvme", nvme_path=str(tmp_path), buffer_count=2, sub_group_size=1024)
    _train(model, opt, 1)
    opt.wait_for_params()
    opt.schedule.free_all()                 # the step prefetched the next forward's units: free them again
    opt.store.param_reader.drop_all()
    unit = next(u for u in opt.units if not u.persistent)
    w = opt.store.param_reader.windows_of[unit.index][0]
    with open(opt.store.folder.path, "r+b") as f:           # that unit's master on disk
        f.seek(opt.store._offset(w, opt.store.slot[w]) + 8)
        f.write(b"\x01\x02\x03\x04")
    live = opt.residency.live_numel
    with pytest.raises(NVMeStateError, match=f"parameters of unit {unit.index}.*checksum"):
        with opt.gathered():
            pass
    assert opt.residency.state[unit.index] is ParamState.SHARDED and opt.residency.live_numel == live
    assert unit.flat.untyped_storage().nbytes() == 0
    opt.close()
