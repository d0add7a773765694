"""Fast, checked file I/O between host tensors and files (the NVMe side of ZeRO-Infinity).

- `AsyncIO`: asynchronous reads and writes of CPU tensors at file offsets, through io_uring or a pread/pwrite
  thread pool (chosen at run time, see `backend_info`), with O_DIRECT where the file system takes it and optional
  per-extent crc32c checksums. Failures raise `AIOError` (an OSError) naming path, offset and errno; a data file
  or checksum sidecar that is a symlink is refused (`SymlinkRefusedError`), and files AsyncIO creates are 0600.
- `aligned_empty`: page-aligned CPU tensors, page-locked for fast GPU copies when CUDA is available.
- `BufferPool`: reuses such buffers instead of allocating (and pinning) anew.

>>> import torch, tempfile, os
>>> from zerocore.io import AsyncIO, aligned_empty
>>> src = aligned_empty(1000, dtype=torch.float32, pin=False).uniform_()
>>> path = os.path.join(tempfile.mkdtemp(), "t.bin")
>>> with AsyncIO() as aio:
...     aio.write(src, path).wait()
...     dst = torch.empty_like(src)
...     aio.read(dst, path).wait()
>>> torch.equal(src, dst)
True
"""
from .aligned import aligned_empty
from .async_io import AsyncIO, IOHandle
from .backend import backend_info
from .errors import AIOError, ChecksumError, SymlinkRefusedError, TruncatedFileError
from .pool import BufferPool

__all__ = ["AsyncIO", "IOHandle", "aligned_empty", "BufferPool", "backend_info", "AIOError", "ChecksumError",
           "SymlinkRefusedError", "TruncatedFileError"]
