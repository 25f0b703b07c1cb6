"""glibc's malloc told to keep the memory one training step frees for the next.

A step allocates its intermediates afresh and frees them at its end. glibc gives memory
back to the kernel in two ways: a buffer above its mmap threshold (128 KiB at start,
raised as large buffers are freed, to at most 32 MiB) is mapped for itself and unmapped
when freed, and free memory at the top of the heap beyond the trim threshold is returned.
The next step then takes a page fault on every page it touches again: on the project's
CPU, in ``torch.profiler``, the traced step's (1024, 784) elementwise operations took about
1 ms each instead of 0.15 ms, and ``python -m scripts.allocator_effect`` (section
"Allocator (cpu)" of docs/benchmarks.md) measured an epoch at batch 1024 at 1.33 s with
glibc's defaults and 1.01 s with this setting (4,798 page faults per step against 3).
PyTorch's CPU tuning guide has users preload jemalloc or tcmalloc for the same reason;
this needs no library.

:func:`keep_freed_memory` sets the mmap threshold to glibc's maximum and the trim
threshold to 1 GiB, so a step's buffers come back from the heap without faults. It acts
on the whole process, from then on: the process keeps up to that much freed memory
instead of returning it. It does nothing where the user set ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` (their choice stands) or where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from ..errors import get_logger

log = get_logger(__name__)

# mallopt's parameters (malloc.h) and the values set
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**30
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _mallopt():
    """glibc's ``mallopt``, or None where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
    except (OSError, AttributeError):
        return None
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def keep_freed_memory() -> bool:
    """Keep freed memory in the heap for reuse (see the module docstring); True if set."""
    given = [name for name in USER_SETTINGS if name in os.environ]
    if given:
        log.debug("malloc: %s set by the user; left as it is", ", ".join(given))
        return False
    mallopt = _mallopt()
    if mallopt is None:
        log.debug("malloc: not glibc; left as it is")
        return False
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) \
        and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("malloc: freed memory kept for reuse: %s", done)
    return done
