"""Host memory for torch: large blocks stay in the malloc heap for reuse, and host tensors go
to a GPU through pinned memory without waiting for it.

glibc maps every block at or above its mmap threshold (at most 32 MiB, and a 512x512 VAE
activation of 32 channels is exactly 32 MiB) afresh and unmaps it on free, so each such tensor
pays page faults and the kernel's zeroing on first touch, every time. On the 2-core dev VM that
made a 512x512x32 3x3 conv take 110 ms instead of 51 and a silu over it 28 ms instead of 8.5.
Raising the mmap and trim thresholds keeps those blocks in the heap, as jemalloc or tcmalloc
would. `checkpoint.load` applies it for models on the CPU; the cost is that freed memory up to
the thresholds, and free space below live blocks, stays with the process instead of going back
to the system (a server's RSS grew from 0.85 to a 4.1 GB plateau under a mixed load with ~0.6 GB
in use), so the engine client gives it back with `release_free_memory`: once the engine has been
idle a while, and under constant load at most once a minute while the free heap holds more than
the kept limit (`free_heap_bytes`). A trim costs ~0.14 ms per MB it gives back (2.8 GB: 0.23-0.4
s; with nothing resident to give back, 2 ms), and the steps after it fault their working set in
again.

Every thread also allocates from the one main heap. glibc otherwise gives other threads their own
arenas, whose heaps are at most 64 MiB and are trimmed and unmapped as they empty, so the engine's
image worker paid the same faults: a 512 px VAE encode took 1.17 s there against 0.77 s on the
main thread (one torch thread each); with one arena both take 0.77 s.

`upload` is the other half. A plain host-to-GPU copy (`.to(device)`) synchronises the stream:
the host waits for every kernel already queued. A step that builds its inputs from many small host
tensors (slot indices, positions, marker ids) then stalls the host once per tensor behind the
kernels already queued (a decode step run ahead, the last step's denoising). Staged through
pinned memory, the copies are queued like kernels and the host goes on.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
KEEP_BYTES = 1 << 30


def _libc_function(name: str):
    """glibc's `name`, or None where the C library has no such function."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, AttributeError, TypeError):
        return None


def keep_large_blocks(limit: int = KEEP_BYTES) -> bool:
    """Serve blocks below `limit` from the main heap, for every thread created from now on,
    and keep up to `limit` free bytes there.

    Returns False where the C library is not glibc (nothing changes there).
    """
    if (mallopt := _libc_function("mallopt")) is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(
        mallopt(param, value)
        for param, value in (
            (M_MMAP_THRESHOLD, limit),
            (M_TRIM_THRESHOLD, limit),
            (M_ARENA_MAX, 1),
        )
    )


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def heap_info() -> _MallInfo2 | None:
    """glibc's `mallinfo2()` of the main heap; None where there is no such function (glibc
    before 2.33, other C libraries)."""
    if (info := _libc_function("mallinfo2")) is None:
        return None
    info.restype = _MallInfo2
    return info()


def free_heap_bytes() -> int:
    """Free bytes in the malloc heap, resident or not; 0 where that is not known."""
    info = heap_info()
    return 0 if info is None else int(info.fordblks)


def release_free_memory() -> bool:
    """Give the heap's free pages back to the system (glibc's `malloc_trim`); False where there
    is none."""
    if (trim := _libc_function("malloc_trim")) is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; from the host to a GPU, queued without waiting."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    # The caching host allocator keeps the pinned block until the copy has run.
    return t.pin_memory().to(device, non_blocking=True)
