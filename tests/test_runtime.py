"""mmditx.runtime.keep_freed_memory: after it, re-allocating freed activations takes no fresh page faults.
Checked in a child process, since the setting is process-wide."""

import platform
import subprocess
import sys

import pytest

from mmditx.runtime import keep_freed_memory, tune_for_memory_mode

CHILD = r"""
import resource, sys, torch
from mmditx.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(10):  # a forward pass in miniature: the same activations (64 + 16 MiB) allocated, used, freed
    before = faults()
    a = torch.empty(16 << 20).fill_(1.0)  # above glibc's own largest mmap threshold (32 MiB)
    h = torch.empty(4 << 20).fill_(2.0)
    a.add_(1.0)
    del a, h
    counts.append(faults() - before)
print(sum(counts[5:]))  # the steady state
"""


def child_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's; elsewhere the call does nothing")
def test_freed_memory_is_reused_without_page_faults():
    default, keep = child_faults("default"), child_faults("keep")
    assert default > 5 * 16000   # 64 MiB of fresh 4 KiB pages every time, as glibc comes
    assert keep < default / 20   # the same memory back from the heap, already faulted in


def test_limit_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        keep_freed_memory(0)


def test_frugal_mode_leaves_malloc_alone():
    assert tune_for_memory_mode("frugal") is False
