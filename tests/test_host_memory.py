"""keep_large_blocks: after it, a large tensor comes from the heap rather than a fresh mmap, and
other threads allocate from the same heap; release_free_memory gives the kept free heap back."""

import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from irg_engine.host_memory import heap_info, keep_large_blocks, upload


def mmapped_bytes() -> int:
    info = heap_info()
    assert info is not None
    return info.hblkhd


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_large_tensors_come_from_the_heap():
    assert keep_large_blocks()
    before = mmapped_bytes()
    big = torch.ones(48 * 1024 * 1024 // 4)  # 48 MiB: above glibc's largest default threshold
    assert mmapped_bytes() - before < 1024 * 1024
    assert float(big.sum()) == big.numel()


THREAD_HEAPS = textwrap.dedent(
    """
    import ctypes, ctypes.util, os, re, tempfile, threading
    import torch
    from irg_engine.host_memory import keep_large_blocks, upload

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]

    def heaps():
        fd, path = tempfile.mkstemp()
        os.close(fd)
        fp = libc.fopen(path.encode(), b"w")
        libc.malloc_info(0, fp)
        libc.fclose(fp)
        with open(path) as f:
            text = f.read()
        os.unlink(path)
        return len(re.findall("<heap nr=", text))

    assert keep_large_blocks()
    seen = []

    def work():
        big = torch.ones(40 * 2**18)  # 40 MiB, touched
        seen.append(heaps())
        del big

    t = threading.Thread(target=work)
    t.start()
    t.join()
    print(seen[0])
    """
)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_other_threads_allocate_from_the_main_heap():
    # A fresh interpreter: arenas made by earlier tests' threads would stay whatever we set now.
    out = subprocess.run(
        [sys.executable, "-c", THREAD_HEAPS], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == 1


def test_upload_off_the_gpu_is_a_plain_copy():
    t = torch.arange(6).view(2, 3)
    assert torch.equal(upload(t, torch.device("cpu")), t)


@pytest.mark.gpu
def test_upload_to_the_gpu_is_queued_and_exact():
    dev = torch.device("cuda")
    busy = torch.randn(4096, 4096, device=dev)
    for _ in range(20):  # a queue of kernels the upload must not wait for, nor overtake
        busy = (busy @ busy).tanh_()
    t = torch.randint(0, 1 << 40, (1000,))
    expected = t.clone()
    up = upload(t, dev)
    t.zero_()  # the host tensor may change once upload returns
    assert up.device.type == "cuda" and torch.equal(up.cpu(), expected)
    assert torch.isfinite(busy).all()
    assert upload(up, dev) is up  # already there: no copy


FREE_HEAP = textwrap.dedent(
    """
    import torch
    from irg_engine.host_memory import free_heap_bytes, keep_large_blocks, release_free_memory

    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024

    assert keep_large_blocks()
    before = free_heap_bytes()
    big = torch.ones(256 * 2**18)  # 256 MiB, touched
    del big
    kept = rss_mb()  # the free block stays in the heap, and counts as free there
    assert free_heap_bytes() - before >= 250 * 2**20  # (a little of it came from free space)
    assert release_free_memory()
    print(kept - rss_mb())
    """
)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_the_kept_free_heap_goes_back_on_request():
    out = subprocess.run(
        [sys.executable, "-c", FREE_HEAP], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 200  # MiB given back
