"""Failures of zerocore.io raise an OSError naming path, offset and errno, return no partial data, and leave other
files intact: a file system that fills up (tmpfs and an ext4 loop image, where O_DIRECT meets ENOSPC: the failed
write removes the file it created and drops the checksum records of its range), a read-only file system, a
permission denial, a truncated file, a flipped byte under checksums, a damaged or non-regular sidecar, symlinked
data files and sidecars (refused, their targets untouched), a file system that refuses O_DIRECT (ramfs: falls back
to buffered I/O and says so)."""
import errno
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from zerocore.io import AIOError, AsyncIO, ChecksumError, SymlinkRefusedError, TruncatedFileError, aligned_empty
from zerocore.io._native import lib

MiB = 1 << 20
BACKENDS = ["threads"] + (["io_uring"] if lib().uring_available()[0] else [])


def _random_bytes(n, seed):
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def _mount(what, target, *options):
    """Mounts or skips the test with the reason (not root, no CAP_SYS_ADMIN, tools missing)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a test file system needs root")
    proc = _run(["mount", *options, what, str(target)])
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a test file system here ({proc.stderr.strip()})")


def _umount(target):
    proc = _run(["umount", str(target)])
    if proc.returncode != 0:  # busy: detach lazily so the test run never leaves a mount behind
        _run(["umount", "-l", str(target)])


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    _mount("tmpfs", mnt, "-t", "tmpfs", "-o", "size=8m")
    yield mnt
    _umount(mnt)


@pytest.fixture
def small_ext4(tmp_path):
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 not installed (apt-get install e2fsprogs)")
    image, mnt = tmp_path / "ext4.img", tmp_path / "ext4"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    proc = _run(["mkfs.ext4", "-q", "-F", str(image)])
    if proc.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {proc.stderr.strip()}")
    _mount(str(image), mnt, "-o", "loop")
    yield mnt
    _umount(mnt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fs", ["small_tmpfs", "small_ext4"])
def test_disk_full_raises_enospc_and_keeps_other_files(request, fs, backend):
    mnt = request.getfixturevalue(fs)
    keep = _random_bytes(MiB + 17, seed=1)
    with AsyncIO(backend=backend) as aio:
        aio.write(keep, mnt / "keep.bin", checksum=True).wait()
        too_big = aligned_empty(64 * MiB, pin=True).copy_(_random_bytes(64 * MiB, seed=2))
        with pytest.raises(AIOError) as info:
            aio.write(too_big, mnt / "big.bin").wait()
        e = info.value
        assert e.errno == errno.ENOSPC and isinstance(e, OSError)
        assert e.filename == str(mnt / "big.bin") and str(mnt / "big.bin") in str(e)
        assert 0 <= e.offset < 64 * MiB and f"offset {e.offset}" in str(e)
        # The write created big.bin, so the partial file is gone (and the space it took is free again).
        assert f"removed '{mnt / 'big.bin'}', which this write had created" in str(e)
        assert not os.path.lexists(mnt / "big.bin") and not os.path.lexists(mnt / "big.bin.crc32c")
        back = torch.empty_like(keep)
        aio.read(back, mnt / "keep.bin", verify=True).wait()
        assert torch.equal(back, keep)
        # Reading the failed file fails too: no silently partial tensor.
        with pytest.raises(AIOError) as info:
            aio.read(torch.empty(64 * MiB, dtype=torch.uint8), mnt / "big.bin").wait()
        assert info.value.errno == errno.ENOENT


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fs", ["small_tmpfs", "small_ext4"])
def test_disk_full_drops_checksum_records_of_the_failed_range(request, fs, backend):
    """A failed write into an existing file keeps the file but leaves no record vouching for the range it hit."""
    mnt = request.getfixturevalue(fs)
    path = mnt / "old.bin"
    head = _random_bytes(MiB, seed=8)
    too_big = aligned_empty(64 * MiB, pin=True).copy_(_random_bytes(64 * MiB, seed=9))
    too_big[:MiB] = head  # the recorded bytes stay equal: only a dropped record makes their verified read fail
    with AsyncIO(backend=backend) as aio:
        aio.write(head, path, checksum=True).wait()
        with pytest.raises(AIOError) as info:
            aio.write(too_big, path, checksum=True).wait()
        e = info.value
        assert e.errno == errno.ENOSPC
        assert f"no checksum record vouches for bytes [0, {64 * MiB}) of '{path}'" in str(e)
        assert "removed" not in str(e) and path.exists()  # the failed write did not create it
        for nbytes in (MiB, 64 * MiB):  # neither the old record nor one for the failed write
            with pytest.raises(ChecksumError) as info:
                aio.read(torch.empty(nbytes, dtype=torch.uint8), path, verify=True).wait()
            assert info.value.errno == errno.ENOENT and "holds no record" in str(info.value)


def _fill(mnt):
    """Fills the file system with one file until ENOSPC; returns its path."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return filler


@pytest.mark.parametrize("backend", BACKENDS)
def test_disk_full_while_growing_the_sidecar_restores_it(small_tmpfs, backend):
    """The data fits in pages the file has, but the sidecar's new record crosses into a page the full tmpfs cannot
    give: the write fails, and the sidecar keeps its old bytes instead of a cut-off record that would block every
    later checksummed write."""
    path, sidecar = small_tmpfs / "d.bin", small_tmpfs / "d.bin.crc32c"
    with AsyncIO(backend=backend) as aio:
        for i in range(127):  # 8 + 127 * 32 bytes: one more 32-byte record crosses the first page
            aio.write(_random_bytes(1, seed=i), path, i, checksum=True).wait()
        before = sidecar.read_bytes()
        assert len(before) == 4072
        filler = _fill(small_tmpfs)
        with pytest.raises(AIOError) as info:
            aio.write(_random_bytes(1, seed=500), path, 200, checksum=True).wait()
        e = info.value
        assert sidecar.read_bytes() == before and path.exists()
        assert e.errno == errno.ENOSPC and f"cannot write checksum sidecar '{sidecar}'" in str(e)
        assert "its old bytes are restored" in str(e) and "no checksum record vouches for bytes [200, 201)" in str(e)
        with pytest.raises(ChecksumError, match="holds no record"):
            aio.read(torch.empty(1, dtype=torch.uint8), path, 200, verify=True).wait()
        back = torch.empty(1, dtype=torch.uint8)
        aio.read(back, path, 5, verify=True).wait()  # the other records still verify
        assert torch.equal(back, _random_bytes(1, seed=5))
        filler.unlink()
        aio.write(_random_bytes(1, seed=500), path, 200, checksum=True).wait()
        aio.read(back, path, 200, verify=True).wait()


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_only_file_system_raises_erofs(small_tmpfs, backend):
    data = _random_bytes(100000, seed=3)
    with AsyncIO(backend=backend) as aio:
        aio.write(data, small_tmpfs / "old.bin").wait()
        proc = _run(["mount", "-o", "remount,ro", str(small_tmpfs)])
        if proc.returncode != 0:
            pytest.skip(f"cannot remount read-only: {proc.stderr.strip()}")
        for target in ("old.bin", "new.bin"):
            with pytest.raises(AIOError) as info:
                aio.write(data, small_tmpfs / target, 4096).wait()
            assert info.value.errno == errno.EROFS and target in str(info.value)
        back = torch.empty_like(data)
        aio.read(back, small_tmpfs / "old.bin").wait()
        assert torch.equal(back, data)


def test_permission_denied_raises_eacces(tmp_path):
    """Root ignores file modes, so the write runs in a child that drops to an unprivileged user."""
    if os.geteuid() != 0:
        pytest.skip("the EACCES check switches users, which needs root")
    target = tmp_path / "locked.bin"
    target.write_bytes(b"x" * 10)
    target.chmod(0o444)
    os.chmod(tmp_path, 0o755)
    code = textwrap.dedent(f"""
        import errno, os, torch
        from zerocore.io import AsyncIO, AIOError
        from zerocore.io._native import lib
        lib()  # load the op while still root (the cache lives in root's home)
        aio = AsyncIO(backend="threads")
        os.setgid(65534); os.setuid(65534)
        try:
            aio.write(torch.ones(4), {str(target)!r}).wait()
        except AIOError as e:
            assert e.errno == errno.EACCES and {str(target)!r} in str(e), e
            print("EACCES OK")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "EACCES OK" in proc.stdout, proc.stdout + proc.stderr
    assert target.read_bytes() == b"x" * 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_file_raises_and_names_where_it_ends(tmp_path, backend):
    src = _random_bytes(3 * MiB, seed=4)
    with AsyncIO(backend=backend) as aio:
        aio.write(src, tmp_path / "t.bin", 10).wait()
        os.truncate(tmp_path / "t.bin", 2 * MiB + 5)
        with pytest.raises(TruncatedFileError) as info:
            aio.read(torch.empty_like(src), tmp_path / "t.bin", 10).wait()
        e = info.value
        assert e.errno == errno.ENODATA and e.offset == 2 * MiB + 5
        assert str(tmp_path / "t.bin") in str(e) and f"{2 * MiB + 5} bytes" in str(e)
        # A read wholly past the end fails as well.
        with pytest.raises(TruncatedFileError):
            aio.read(torch.empty(10, dtype=torch.uint8), tmp_path / "t.bin", 4 * MiB).wait()


@pytest.mark.parametrize("backend", BACKENDS)
def test_flipped_byte_fails_checksum_naming_path_and_extent(tmp_path, backend):
    src = _random_bytes(5 * MiB, seed=5)
    other = _random_bytes(MiB, seed=6)
    with AsyncIO(backend=backend) as aio:  # 1 MiB extents
        aio.write(src, tmp_path / "c.bin", checksum=True).wait()
        aio.write(other, tmp_path / "other.bin", checksum=True).wait()
        with open(tmp_path / "c.bin", "r+b") as f:
            f.seek(3 * MiB + 12345)
            byte = f.read(1)
            f.seek(3 * MiB + 12345)
            f.write(bytes([byte[0] ^ 0x01]))
        with pytest.raises(ChecksumError) as info:
            aio.read(torch.empty_like(src), tmp_path / "c.bin", verify=True).wait()
        e = info.value
        assert e.errno == errno.EBADMSG and "extent 3" in str(e) and str(tmp_path / "c.bin") in str(e)
        assert e.offset == 3 * MiB
        # Without verify the bytes come back as they are; the other file still verifies.
        back = torch.empty_like(other)
        aio.read(back, tmp_path / "other.bin", verify=True).wait()
        assert torch.equal(back, other)
        with pytest.raises(ChecksumError) as info:
            aio.read(torch.empty(100, dtype=torch.uint8), tmp_path / "c.bin", 0, verify=True).wait()
        assert info.value.errno == errno.ENOENT and "exactly" in str(info.value)


def test_write_without_checksum_drops_stale_record(tmp_path):
    with AsyncIO() as aio:
        aio.write(_random_bytes(10000, 1), tmp_path / "s.bin", checksum=True).wait()
        aio.write(_random_bytes(10000, 2), tmp_path / "s.bin").wait()
        with pytest.raises(ChecksumError, match="no record"):
            aio.read(torch.empty(10000, dtype=torch.uint8), tmp_path / "s.bin", verify=True).wait()


def _victim(path):
    """A file a planted symlink points at, and its bytes."""
    original = bytes(range(256)) * 40
    path.write_bytes(original)
    return original


def _assert_refused_symlink(e, link, filename):
    assert isinstance(e, SymlinkRefusedError) and isinstance(e, AIOError)
    assert e.errno == errno.ELOOP and e.filename == str(filename)
    assert f"'{link}' is a symlink" in str(e), str(e)
    assert "zerocore refuses symlinks for swap/checkpoint files" in str(e), str(e)


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_symlinked_data_file_is_refused(tmp_path, backend, direct):
    victim, link = tmp_path / "victim.bin", tmp_path / "swap.bin"
    original = _victim(victim)
    link.symlink_to(victim)
    dangling, nowhere = tmp_path / "dangling.bin", tmp_path / "nowhere.bin"
    dangling.symlink_to(nowhere)
    src = _random_bytes(MiB + 5, seed=10)
    with AsyncIO(backend=backend, direct=direct) as aio:
        for checksum in (False, True):
            for target in (link, dangling):
                with pytest.raises(SymlinkRefusedError) as info:
                    aio.write(src, target, 4096, checksum=checksum).wait()
                _assert_refused_symlink(info.value, target, target)
            dst = torch.full((100,), 7, dtype=torch.uint8)
            with pytest.raises(SymlinkRefusedError) as info:
                aio.read(dst, link, verify=checksum).wait()
            _assert_refused_symlink(info.value, link, link)
            assert torch.all(dst == 7)
    assert victim.read_bytes() == original
    assert not os.path.lexists(nowhere)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.bin", "swap.bin", "victim.bin"]  # no sidecars


@pytest.mark.parametrize("backend", BACKENDS)
def test_symlinked_sidecar_is_refused(tmp_path, backend):
    victim, data = tmp_path / "victim.bin", tmp_path / "ckpt.bin"
    sidecar = tmp_path / "ckpt.bin.crc32c"
    original = _victim(victim)
    sidecar.symlink_to(victim)
    src = _random_bytes(100000, seed=11)
    with AsyncIO(backend=backend) as aio:
        # Writes with and without checksums both need the sidecar; each created ckpt.bin, so each removes it.
        for checksum in (True, False):
            with pytest.raises(SymlinkRefusedError) as info:
                aio.write(src, data, checksum=checksum).wait()
            _assert_refused_symlink(info.value, sidecar, data)
            assert f"removed '{data}'" in str(info.value) and not os.path.lexists(data)
        data.write_bytes(src.numpy().tobytes())
        with pytest.raises(SymlinkRefusedError) as info:
            aio.read(torch.empty_like(src), data, verify=True).wait()
        _assert_refused_symlink(info.value, sidecar, data)
        # A dangling sidecar link must not create its target either.
        sidecar.unlink()
        sidecar.symlink_to(tmp_path / "nowhere")
        with pytest.raises(SymlinkRefusedError):
            aio.write(src, data, checksum=True).wait()
        assert data.exists()  # it existed before this write: kept
    assert victim.read_bytes() == original
    assert not os.path.lexists(tmp_path / "nowhere") and os.readlink(sidecar) == str(tmp_path / "nowhere")


@pytest.mark.parametrize("backend", BACKENDS)
def test_damaged_sidecar_is_not_rewritten(tmp_path, backend):
    path, sidecar = tmp_path / "d.bin", tmp_path / "d.bin.crc32c"
    a, b = _random_bytes(MiB + 1, seed=12), _random_bytes(5000, seed=13)
    with AsyncIO(backend=backend) as aio:
        aio.write(a, path, checksum=True).wait()
        aio.write(b, path, 2 * MiB, checksum=True).wait()
        damaged = bytearray(sidecar.read_bytes())
        damaged[20] ^= 0xFF  # inside the first record's length field
        sidecar.write_bytes(bytes(damaged))
        with pytest.raises(ChecksumError) as info:
            aio.write(a, path, checksum=True).wait()
        e = info.value
        assert e.errno == errno.EBADMSG and f"checksum sidecar '{sidecar}' has a damaged record at byte 8" in str(e)
        assert f"delete '{sidecar}'" in str(e) and "does not rewrite a damaged sidecar" in str(e)
        assert sidecar.read_bytes() == damaged
        # A write without checksums has nothing to drop from it: it succeeds and leaves it as it is.
        aio.write(b, path, 2 * MiB).wait()
        assert sidecar.read_bytes() == damaged
        # Verified reads keep failing clearly.
        for offset, t in ((0, a), (2 * MiB, b)):
            with pytest.raises(ChecksumError) as info:
                aio.read(torch.empty_like(t), path, offset, verify=True).wait()
            assert info.value.errno == errno.EBADMSG and "damaged record" in str(info.value)
        # Once the user deletes it, checksummed writes work again.
        sidecar.unlink()
        aio.write(a, path, checksum=True).wait()
        back = torch.empty_like(a)
        aio.read(back, path, verify=True).wait()
        assert torch.equal(back, a)


def test_sidecar_that_is_not_a_regular_file_is_refused(tmp_path):
    """A FIFO planted as the sidecar is refused at once (opening it must not block)."""
    path, sidecar = tmp_path / "f.bin", tmp_path / "f.bin.crc32c"
    src = _random_bytes(10000, seed=14)
    with AsyncIO() as aio:
        aio.write(src, path).wait()
        os.mkfifo(sidecar)
        with pytest.raises(ChecksumError) as info:
            aio.read(torch.empty_like(src), path, verify=True).wait()
        assert info.value.errno == errno.EINVAL and f"'{sidecar}' is not a regular file" in str(info.value)
        with pytest.raises(AIOError) as info:
            aio.write(src, path, checksum=True).wait()
        assert info.value.errno == errno.EINVAL and "not a regular file" in str(info.value)


def test_missing_file_raises_enoent(tmp_path):
    with AsyncIO() as aio, pytest.raises(AIOError) as info:
        aio.read(torch.empty(10), tmp_path / "nope.bin").wait()
    assert info.value.errno == errno.ENOENT and "nope.bin" in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_file_system_refusing_o_direct_falls_back_and_says_so(tmp_path, backend, caplog):
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    _mount("ramfs", mnt, "-t", "ramfs")
    try:
        src = _random_bytes(MiB + 3, seed=7)
        with AsyncIO(backend=backend) as aio, caplog.at_level("DEBUG", logger="zerocore.io"):
            h = aio.write(src, mnt / "r.bin", checksum=True)
            h.wait()
            assert not h.used_direct and "refuses O_DIRECT" in h.notes
            assert any("refuses O_DIRECT" in r.getMessage() for r in caplog.records)
            back = torch.empty_like(src)
            aio.read(back, mnt / "r.bin", verify=True).wait()
            assert torch.equal(back, src)
    finally:
        _umount(mnt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eio_from_the_kernel_raises_with_errno(backend):
    """A real EIO without a failing disk: /proc/self/mem answers reads of unmapped addresses (the first pages,
    below vm.mmap_min_addr) with EIO. Read only: nothing is ever written there."""
    if not os.path.exists("/proc/self/mem"):
        pytest.skip("/proc/self/mem is not available here")
    dst = torch.full((8192,), 7, dtype=torch.uint8)
    with AsyncIO(backend=backend) as aio, pytest.raises(AIOError) as info:
        aio.read(dst, "/proc/self/mem", 4096).wait()
    e = info.value
    assert e.errno == errno.EIO and e.offset == 4096 and e.filename == "/proc/self/mem"
    assert "Input/output error" in str(e) and "offset 4096" in str(e)
