"""meshlet.io.tune_malloc: a buffer of 128 KiB to 1 MiB comes from malloc's heap, not from a
mapping of its own (mapped and unmapped at each allocation, a page fault a page: what made an
HTTP/2 stream through the mesh ~15 % slower). Checked in a fresh interpreter, from the
process's own memory map."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
from meshlet.io import tune_malloc

tuned = sys.argv[1] == "tuned" and tune_malloc()
buffer = bytearray(600_000)
address = ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))
heap = next(line.split()[0] for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]"))
start, end = (int(x, 16) for x in heap.split("-"))
print(tuned, "heap" if start <= address < end else "own mapping")
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's mmap threshold is glibc's")
@pytest.mark.parametrize(("mode", "expected"), [("default", "False own mapping"), ("tuned", "True heap")])
def test_a_600_kib_buffer_gets_its_own_mapping_only_untuned(mode: str, expected: str) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=30, check=True)
    assert done.stdout.strip() == expected
