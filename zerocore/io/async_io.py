"""AsyncIO: asynchronous, checked reads and writes of CPU tensors at file offsets."""
from __future__ import annotations

import logging
import os
import threading
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

from ._native import lib
from .errors import AIOError, raise_status

log = logging.getLogger("zerocore.io")
PathLike = Union[str, os.PathLike]


class IOHandle:
    """One submitted batch. wait() blocks (other Python threads keep running) until every transfer finished and
    raises AIOError / TruncatedFileError / ChecksumError on failure; it may be called again and re-raises."""

    def __init__(self, native, tensors: List[torch.Tensor], description: str):
        self._native = native
        self._tensors = tensors  # kept alive until the transfer ended
        self._description = description
        self._status = None

    def wait(self) -> None:
        if self._status is None:
            self._status = self._native.wait()
            self._tensors = []
            if self._status[0] == 0 and not self._native.used_direct():
                log.debug("zerocore.io: %s used buffered I/O: %s", self._description, self._native.notes().strip())
        raise_status(self._status)

    def done(self) -> bool:
        """True once every transfer of this handle ended (wait() then returns at once)."""
        return self._native.done()

    @property
    def used_direct(self) -> bool:
        """After wait(): False when some file took buffered I/O instead of O_DIRECT (see `notes`)."""
        return self._native.used_direct()

    @property
    def notes(self) -> str:
        """After wait(): why buffered I/O was used, one line per file ("" when O_DIRECT was used throughout)."""
        return self._native.notes()


class AsyncIO:
    """Asynchronous file I/O of CPU tensors.

    block_size: requests are split into blocks of this many bytes (a multiple of 4096); checksums are kept per
        block-sized extent. queue_depth: blocks in flight. threads: workers of the thread-pool backend (default
        min(queue_depth, 8)). backend: None/"auto" (io_uring when usable, else threads; env
        ZEROCORE_AIO_BACKEND overrides auto), "io_uring" or "threads". direct: use O_DIRECT where the file
        system accepts it (False: always the page cache).

    Any contiguous CPU tensor works: page-aligned ones (see `aligned_empty`) go straight to the disk, others
    through aligned bounce blocks. One file at many offsets and many files both work, and one AsyncIO may be
    used from several threads at once. Writes do not truncate the file: bytes past the written range stay.
    The tensor must stay untouched until wait() returns (AsyncIO keeps it alive meanwhile).

    >>> import torch, tempfile, os
    >>> from zerocore.io import AsyncIO
    >>> path = os.path.join(tempfile.mkdtemp(), "x.bin")
    >>> aio = AsyncIO(block_size=1 << 20, queue_depth=32)
    >>> x = torch.randn(1000)
    >>> aio.write(x, path, offset=4096, checksum=True).wait()
    >>> y = torch.empty(1000)
    >>> h = aio.read(y, path, offset=4096, verify=True)
    >>> h.wait(); torch.equal(x, y)
    True
    >>> aio.close()
    """

    def __init__(self, block_size: int = 1 << 20, queue_depth: int = 32, threads: Optional[int] = None,
                 backend: Optional[str] = None, direct: bool = True):
        for name, value in (("block_size", block_size), ("queue_depth", queue_depth)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"AsyncIO: {name} must be a positive int, got {value!r}")
        if block_size % 4096:
            raise ValueError(f"AsyncIO: block_size must be a multiple of 4096 (O_DIRECT alignment), got {block_size}")
        if threads is not None and (not isinstance(threads, int) or threads <= 0):
            raise ValueError(f"AsyncIO: threads must be a positive int or None, got {threads!r}")
        self._engine = lib().Engine(block_size, queue_depth, threads or 0, backend or "", direct)
        self.block_size = block_size
        self.queue_depth = queue_depth
        self._lock = threading.Lock()
        self._pending: List[IOHandle] = []

    @property
    def backend(self) -> str:
        """"io_uring" or "threads"."""
        return self._engine.backend

    @property
    def backend_reason(self) -> str:
        return self._engine.backend_reason

    def write(self, tensor: torch.Tensor, path: PathLike, offset: int = 0, checksum: bool = False) -> IOHandle:
        """Starts writing the tensor's bytes to path at offset (the file is created, mode 0600, if missing).
        checksum=True records a crc32c per extent in "<path>.crc32c" for `read(..., verify=True)`. A path or
        sidecar that is a symlink raises SymlinkRefusedError. A write that fails drops the checksum records of its
        range and removes the file if it created it; a damaged sidecar fails checksummed writes (delete it)."""
        return self.submit([("write", tensor, path, offset, checksum)])

    def read(self, tensor: torch.Tensor, path: PathLike, offset: int = 0, verify: bool = False) -> IOHandle:
        """Starts filling the tensor with the file's bytes at offset. verify=True checks them against the
        checksums of a write of exactly this offset and length made with checksum=True."""
        return self.submit([("read", tensor, path, offset, verify)])

    def submit(self, requests: Iterable[Sequence]) -> IOHandle:
        """Starts many transfers as one handle: each request is (op, tensor, path, offset[, checksum]) with op
        "read" or "write". The handle fails if any of them fails."""
        native_requests: List[Tuple] = []
        tensors = []
        for request in requests:
            if len(request) not in (4, 5):
                raise ValueError(f"AsyncIO.submit: a request is (op, tensor, path, offset[, checksum]), got "
                                 f"{len(request)} items")
            op, tensor, path, offset = request[:4]
            checksum = bool(request[4]) if len(request) == 5 else False
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"AsyncIO: expected a torch.Tensor, got {type(tensor).__name__}")
            if tensor.device.type != "cpu":
                raise ValueError(f"AsyncIO: the tensor for {os.fspath(path)!r} is on {tensor.device}; file I/O needs "
                                 "a CPU tensor (copy it into an aligned_empty(..., pin=True) buffer first)")
            if not tensor.is_contiguous():
                raise ValueError(f"AsyncIO: the tensor for {os.fspath(path)!r} is not contiguous; call "
                                 ".contiguous() first")
            if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
                raise ValueError(f"AsyncIO: offset must be a non-negative int, got {offset!r}")
            if op == "write" and tensor.requires_grad:
                tensor = tensor.detach()
            native_requests.append((op, tensor, os.fspath(path), offset, checksum))
            tensors.append(tensor)
        description = ", ".join(f"{r[0]} of {r[2]!r}" for r in native_requests[:3])
        handle = IOHandle(self._engine.submit(native_requests), tensors, description)
        with self._lock:
            self._pending = [h for h in self._pending if not h.done()]
            self._pending.append(handle)
        return handle

    def wait_all(self) -> None:
        """Waits for every handle submitted so far; raises the first failure after all of them ended."""
        with self._lock:
            pending, self._pending = self._pending, []
        first: Optional[AIOError] = None
        for handle in pending:
            try:
                handle.wait()
            except AIOError as e:
                first = first or e
        if first is not None:
            raise first

    def close(self) -> None:
        """Waits for everything in flight (errors are left to the handles) and stops the backend."""
        with self._lock:
            pending, self._pending = self._pending, []
        for handle in pending:
            try:
                handle.wait()
            except AIOError:
                pass
        self._engine = _Closed()

    def __del__(self):
        # Buffers of unwaited handles must outlive the transfers: drain before the engine and _pending go.
        try:
            if "_engine" in self.__dict__ and not isinstance(self._engine, _Closed):
                self.close()
        except Exception:  # interpreter shutdown: the engine's own destructor still drains the transfers
            pass

    def __enter__(self) -> "AsyncIO":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Closed:
    def __getattr__(self, name):
        raise RuntimeError("AsyncIO is closed: create a new one")
