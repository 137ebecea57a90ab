"""Process settings for the CPU-heavy work (labeling, training, evaluation, balancing).

glibc's malloc hands memory freed by one batch back to the kernel (it trims the heap top and
unmaps large chunks), so the next batch's activations fault every page in again: on 2 cores,
a small CNN at batch 256 spent 40-55 us per image in the kernel and ran ~25% slower (see
bench/results/label.md). Raising the mmap and trim thresholds keeps up to 64 MiB of freed
memory per malloc arena for reuse, which is what tcmalloc or jemalloc users get by default.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt(3) parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2), and the free memory
# an arena may keep at its top before trimming.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20
# Set to 0 to leave malloc as it is (e.g. to compare, or under another allocator's settings).
ENV = "NSD_MALLOC_TUNE"

_tuned: bool | None = None


def tune_malloc() -> bool:
    """Keep freed batch memory for reuse instead of returning it to the kernel (glibc only).

    Called by label, train, eval and balance (the first call decides); a no-op elsewhere, when
    $NSD_MALLOC_TUNE is 0, or when the user set glibc's own malloc variables (theirs win).
    Returns whether the thresholds are now nsd's.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    own = any(k in os.environ for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")) \
        or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
    if os.environ.get(ENV, "1") == "0" or own or platform.system() != "Linux" \
            or platform.libc_ver()[0] != "glibc":
        return _tuned
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return _tuned
    # mallopt returns 1 on success; setting the mmap threshold also stops glibc adjusting it.
    _tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) \
        and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _tuned
