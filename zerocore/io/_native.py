"""The compiled aio op library, loaded (and built on first use) once per process."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def lib():
    from zerocore import ops
    return ops.load("aio")
