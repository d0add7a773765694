"""Which I/O backend zerocore uses on this machine, and why."""
from __future__ import annotations

from typing import Optional, Tuple


def backend_info(requested: Optional[str] = None) -> Tuple[str, str]:
    """(backend name, reason) that `AsyncIO(backend=requested)` would use here.

    The name is "io_uring" when zerocore was built with liburing and the kernel lets this process create a ring
    (container seccomp profiles often forbid it), else "threads" (a pread/pwrite thread pool). Env
    ZEROCORE_AIO_BACKEND=io_uring|threads forces one when `requested` is None. If the aio op library cannot be
    built here, the name is "unavailable" and the reason says what is missing. Forcing io_uring where it does
    not work raises RuntimeError naming why.

    >>> from zerocore.io import backend_info
    >>> name, why = backend_info()
    >>> name in ("io_uring", "threads", "unavailable")
    True
    """
    from zerocore.ops import OpBuildError
    from ._native import lib
    try:
        native = lib()
    except OpBuildError as e:
        return "unavailable", f"the aio op library cannot be built or loaded: {e}"
    name, reason = native.backend_info(requested or "")
    return name, reason
