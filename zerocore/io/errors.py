"""Exceptions of zerocore.io: OSErrors whose errno, filename and offset say exactly what failed where."""
from __future__ import annotations

import errno as _errno


class AIOError(OSError):
    """A read or write failed. `errno` is the system error (ENOSPC, EIO, EACCES, ...), `filename` the file and
    `offset` the file offset where it failed; str() is a full sentence naming all three."""

    def __init__(self, err: int, message: str, path: str, offset: int):
        super().__init__(err, message, path)
        self.offset = offset

    def __str__(self) -> str:
        return self.strerror


class TruncatedFileError(AIOError):
    """A read reached the end of the file before its last byte (errno ENODATA): nothing was returned."""


class ChecksumError(AIOError):
    """Checksum verification failed (errno EBADMSG: the data changed since it was written) or could not run
    (errno ENOENT: no checksum was recorded for that range)."""


class SymlinkRefusedError(AIOError):
    """The data file or its "<path>.crc32c" checksum sidecar is a symbolic link (errno ELOOP). zerocore opens both
    with O_NOFOLLOW and refuses links, since one planted at a predictable swap/checkpoint path could redirect a
    write to any file the process may write: pass the real path."""


# Kinds reported by the engine (aio_engine.h ErrorKind).
_KIND_CLASSES = {1: AIOError, 2: TruncatedFileError, 3: ChecksumError, 4: SymlinkRefusedError}


def raise_status(status) -> None:
    """Raises the exception for an engine status tuple (kind, errno, path, offset, message); returns if ok."""
    kind, err, path, offset, message = status
    if kind == 0:
        return
    cls = _KIND_CLASSES.get(kind, AIOError)
    raise cls(err or _errno.EIO, message, path, offset)
