"""Process-wide settings for fast CPU inference. Opt-in: importing mmditx changes nothing in the host process;
the command-line scripts call `keep_freed_memory()` at start, library users may call it themselves.

Why it pays: glibc's malloc hands every large block (a tensor of more than a few hundred KiB) to the OS with
mmap and gives it back with munmap when freed. The next forward pass allocates the same activations again,
and the kernel faults every 4 KiB page in anew and zero-fills it: ~170 000 page faults per transformer forward
at 256x256, batch 2 (measured with getrusage), about a tenth of its time on this 2-core machine. Served from
malloc's heap and kept there after `free`, the same memory is reused and a forward pass takes no page faults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Ask glibc's malloc to serve blocks up to `limit_bytes` from its heap (not fresh mmaps) and to keep up to
    `limit_bytes` of freed memory for reuse instead of returning it to the OS.

    The cost: the process holds on to up to `limit_bytes` of memory it has freed (peak RSS is unchanged, since
    that memory was in use at the peak). Blocks above the limit are still mapped and unmapped on their own.
    Returns True if the setting took effect, False where the C library is not glibc (macOS, Windows, musl):
    there nothing changes and everything still works.
    """
    if limit_bytes <= 0:
        raise ValueError(f"limit_bytes must be positive, got {limit_bytes}")
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    limit = min(limit_bytes, 2**31 - 1)  # mallopt takes a C int
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))
