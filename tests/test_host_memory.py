"""keep_large_blocks: after it, a large tensor comes from the heap rather than a fresh mmap."""

import ctypes
import ctypes.util
import platform

import pytest
import torch

from irg_engine.host_memory import keep_large_blocks


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def mmapped_bytes() -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2().hblkhd


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_large_tensors_come_from_the_heap():
    assert keep_large_blocks()
    before = mmapped_bytes()
    big = torch.ones(48 * 1024 * 1024 // 4)  # 48 MiB: above glibc's largest default threshold
    assert mmapped_bytes() - before < 1024 * 1024
    assert float(big.sum()) == big.numel()
