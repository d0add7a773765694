"""Round trips of random data through zerocore.io.AsyncIO: awkward sizes and offsets, both backends, O_DIRECT and
buffered, aligned/pinned, plain and misaligned tensors, batches, many files, concurrent threads."""
import os
import stat
import threading

import pytest
import torch

from zerocore.io import AsyncIO, aligned_empty, backend_info
from zerocore.io._native import lib

MiB = 1 << 20
SIZES = [0, 1, 511, 4095, 4096, MiB + 1]
OFFSETS = [0, 1, 4096, 3 * MiB + 7]


def _backends():
    names = ["threads"]
    if lib().uring_available()[0]:
        names.append("io_uring")
    return names


@pytest.fixture(scope="module", params=_backends())
def aio(request):
    with AsyncIO(block_size=256 * 1024, queue_depth=8, backend=request.param) as engine:
        assert engine.backend == request.param
        yield engine


def _random_bytes(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


def _tensor(kind, nbytes):
    """A destination/source tensor of nbytes: page-aligned (pinned when CUDA is there), torch's own allocation,
    or a view one byte into an allocation (misaligned for O_DIRECT: bounce path)."""
    if kind == "aligned":
        return aligned_empty(nbytes, pin=True)
    if kind == "plain":
        return torch.empty(nbytes, dtype=torch.uint8)
    return torch.empty(nbytes + 1, dtype=torch.uint8)[1:]


@pytest.mark.parametrize("kind", ["aligned", "plain", "misaligned"])
@pytest.mark.parametrize("nbytes", SIZES)
def test_round_trip_sizes_offsets(aio, tmp_path, kind, nbytes):
    path = tmp_path / "data.bin"
    for i, offset in enumerate(OFFSETS):
        src = _tensor(kind, nbytes)
        src.copy_(_random_bytes(nbytes, seed=nbytes * 31 + i))
        aio.write(src, path, offset).wait()
        dst = _tensor(kind, nbytes)
        dst.fill_(0) if nbytes else None
        aio.read(dst, path, offset).wait()
        assert torch.equal(dst, src), f"{kind} tensor of {nbytes} bytes at offset {offset} differs"
    assert os.path.getsize(path) == (OFFSETS[-1] + nbytes if nbytes else 0)  # a 0-byte write creates, no more


@pytest.mark.parametrize("offset", [0, 12345, 64 * MiB])
def test_64_mib_round_trip(aio, tmp_path, offset):
    src = aligned_empty(64 * MiB, pin=True).copy_(_random_bytes(64 * MiB, seed=offset))
    path = tmp_path / "big.bin"
    h = aio.write(src, path, offset)
    h.wait()
    if not h.used_direct:  # e.g. tmpfs before Linux 6.6; the fallback itself is tested in test_io_faults.py
        assert "O_DIRECT" in h.notes
    dst = torch.empty(16 * MiB, dtype=torch.float32)  # other dtype, torch's allocator
    aio.read(dst, path, offset).wait()
    assert torch.equal(dst.view(torch.uint8), src)
    assert os.path.getsize(path) == offset + 64 * MiB


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_dtypes_and_shapes(aio, tmp_path, dtype):
    src = torch.randn(37, 129).to(dtype) if dtype.is_floating_point else torch.randint(-2**40, 2**40, (37, 129))
    aio.write(src, tmp_path / "t.bin", 100).wait()
    dst = torch.empty_like(src)
    aio.read(dst, tmp_path / "t.bin", 100).wait()
    assert torch.equal(dst, src)


def test_buffered_mode_round_trip(tmp_path):
    with AsyncIO(block_size=64 * 1024, direct=False) as engine:
        src = _random_bytes(300001, seed=3)
        h = engine.write(src, tmp_path / "b.bin", 5)
        h.wait()
        assert not h.used_direct and "direct=False" in h.notes
        dst = torch.empty_like(src)
        engine.read(dst, tmp_path / "b.bin", 5).wait()
        assert torch.equal(dst, src)


def test_created_files_are_owner_only_and_existing_files_keep_their_mode(aio, tmp_path):
    new, old = tmp_path / "new.bin", tmp_path / "old.bin"
    old.write_bytes(b"x" * 10)
    (tmp_path / "old.bin.crc32c").write_bytes(b"")  # an empty sidecar holds no records
    os.chmod(old, 0o644)
    os.chmod(tmp_path / "old.bin.crc32c", 0o640)
    src = _random_bytes(300000, seed=4)
    previous = os.umask(0o022)  # looser than 0600: created files must still be owner-only
    try:
        aio.write(src, new, checksum=True).wait()
        aio.write(src, old, 7, checksum=True).wait()
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in tmp_path.iterdir()}
    assert modes == {"new.bin": 0o600, "new.bin.crc32c": 0o600, "old.bin": 0o644, "old.bin.crc32c": 0o640}
    dst = torch.empty_like(src)
    aio.read(dst, old, 7, verify=True).wait()
    assert torch.equal(dst, src)


def test_one_file_at_offsets_and_many_files_in_one_batch(aio, tmp_path):
    chunks = [_random_bytes(200000 + k, seed=k) for k in range(6)]
    big, offsets, requests = tmp_path / "big.bin", [], []
    pos = 0
    for k, c in enumerate(chunks):
        if k < 3:  # three tensors packed back to back in one file
            requests.append(("write", c, big, pos, True))  # three checksum records in one sidecar
            offsets.append((big, pos))
            pos += c.numel()
        else:  # three files of their own
            requests.append(("write", c, tmp_path / f"f{k}.bin", 0, True))
            offsets.append((tmp_path / f"f{k}.bin", 0))
    aio.submit(requests).wait()
    outs = [torch.empty_like(c) for c in chunks]
    aio.submit([("read", o, p, off, True) for o, (p, off) in zip(outs, offsets)]).wait()
    for c, o in zip(chunks, outs):
        assert torch.equal(c, o)


def test_checksummed_round_trip_and_rewrite(aio, tmp_path):
    src = _random_bytes(MiB + 123, seed=9)
    aio.write(src, tmp_path / "c.bin", 4096, checksum=True).wait()
    dst = torch.empty_like(src)
    aio.read(dst, tmp_path / "c.bin", 4096, verify=True).wait()
    assert torch.equal(dst, src)
    # A rewrite with new data replaces the record, so verification follows the newest bytes.
    src2 = _random_bytes(MiB + 123, seed=10)
    aio.write(src2, tmp_path / "c.bin", 4096, checksum=True).wait()
    aio.read(dst, tmp_path / "c.bin", 4096, verify=True).wait()
    assert torch.equal(dst, src2)
    # The record keeps its extent size, so an engine with another block size verifies it too.
    with AsyncIO(block_size=64 * 1024, backend=aio.backend) as other:
        dst.zero_()
        other.read(dst, tmp_path / "c.bin", 4096, verify=True).wait()
    assert torch.equal(dst, src2)


def test_concurrent_handles_from_two_threads(aio, tmp_path):
    errors, results = [], {}

    def worker(t):
        try:
            src = _random_bytes(3 * MiB + t, seed=100 + t)
            ok = True
            for r in range(4):
                path = tmp_path / f"thread{t}.bin"
                h = aio.write(src, path, r * 4099)
                h.wait()
                dst = torch.empty_like(src)
                aio.read(dst, path, r * 4099).wait()
                ok = ok and torch.equal(dst, src)
            results[t] = ok
        except Exception as e:  # surfaced below with its thread
            errors.append((t, e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert results == {0: True, 1: True}


def test_wait_all_and_unwaited_handles(aio, tmp_path):
    srcs = [_random_bytes(500000, seed=s) for s in range(4)]
    for k, s in enumerate(srcs):
        aio.write(s, tmp_path / f"w{k}.bin")  # handles dropped: AsyncIO keeps the tensors alive
    aio.wait_all()
    for k, s in enumerate(srcs):
        assert torch.equal(torch.from_file(str(tmp_path / f"w{k}.bin"), size=500000, dtype=torch.uint8), s)


def test_wait_releases_the_gil(tmp_path):
    """While one thread waits on a large read, another Python thread makes progress."""
    with AsyncIO(queue_depth=1, block_size=4096, backend="threads") as engine:
        src = _random_bytes(32 * MiB, seed=1)
        engine.write(src, tmp_path / "g.bin").wait()
        ticks, stop = [0], threading.Event()

        def spin():
            while not stop.is_set():
                ticks[0] += 1

        t = threading.Thread(target=spin)
        t.start()
        dst = torch.empty_like(src)
        handle = engine.read(dst, tmp_path / "g.bin")
        before = ticks[0]
        handle.wait()  # if this held the GIL, the spinner could not run until it returned
        during = ticks[0] - before
        stop.set()
        t.join()
        assert during > 0 and torch.equal(dst, src)


def test_bad_arguments_say_how_to_fix(tmp_path):
    with AsyncIO() as engine:
        with pytest.raises(ValueError, match="contiguous"):
            engine.write(torch.randn(4, 4).t(), tmp_path / "x")
        with pytest.raises(ValueError, match="offset"):
            engine.write(torch.randn(4), tmp_path / "x", offset=-1)
        with pytest.raises(TypeError, match="torch.Tensor"):
            engine.write([1, 2], tmp_path / "x")
    with pytest.raises(ValueError, match="multiple of 4096"):
        AsyncIO(block_size=1000)
    with pytest.raises(RuntimeError, match="closed"):
        engine.write(torch.randn(4), tmp_path / "x")


def test_backend_property_matches_backend_info():
    with AsyncIO() as engine:
        assert engine.backend == backend_info()[0]
