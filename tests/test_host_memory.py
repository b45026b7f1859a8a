"""dip_fast.core.host_memory: freed host buffers are reused while a run is active, and given back after."""
from __future__ import annotations

import resource
from typing import List, Tuple

import pytest
import torch

from dip_fast.core import host_memory

needs_glibc = pytest.mark.skipif(host_memory.glibc() is None, reason="needs glibc's mallopt")
ELEMENTS = 64 * 2**20 // 4  # float32 elements in 64 MiB: above any mmap threshold glibc chooses (32 MiB at most)
PAGES = 64 * 2**20 // 4096


def _round_faults() -> int:
    """Minor page faults of allocating, writing and freeing one 64 MiB buffer."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(ELEMENTS).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _faults_per_buffer(rounds: int = 4, settle: int = 40) -> float:
    """Minor page faults per 64 MiB buffer allocated, written and freed, once the heap has settled.

    glibc's heap takes some rounds to settle after the setting changes, more when the process has
    already allocated much (measured alone: faults in rounds 1, 2 and 4, none after), as a run's first
    steps do; settled here means two rounds in a row without a fault, within ``settle`` rounds.
    """
    quiet = 0
    for _ in range(settle):
        quiet = quiet + 1 if _round_faults() == 0 else 0
        if quiet == 2:
            break
    return sum(_round_faults() for _ in range(rounds)) / rounds


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@needs_glibc
def test_buffers_are_reused_inside_and_given_back_after(monkeypatch):
    monkeypatch.delenv("DIP_FAST_HOST_MEMORY", raising=False)
    with host_memory.reuse_freed_memory() as active:
        assert active
        assert _faults_per_buffer() < 0.05 * PAGES  # the heap keeps the buffer: its pages are already there
        held = _resident_bytes()
    assert held - _resident_bytes() > 0.9 * 64 * 2**20  # malloc_trim returned the kept buffer


@needs_glibc
def test_without_it_every_buffer_is_faulted_in_afresh(monkeypatch):
    monkeypatch.setenv("DIP_FAST_HOST_MEMORY", "system")
    with host_memory.reuse_freed_memory() as active:
        assert not active
        assert _faults_per_buffer() > 0.9 * PAGES


class _FakeLibc:
    """Records mallopt and malloc_trim calls."""

    def __init__(self) -> None:
        self.calls: List[Tuple[str, int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad, 0))
        return 1


def test_nested_blocks_share_one_setting_made_by_the_first_and_undone_by_the_last(monkeypatch):
    fake = _FakeLibc()
    monkeypatch.setattr(host_memory, "glibc", lambda: fake)
    monkeypatch.delenv("DIP_FAST_HOST_MEMORY", raising=False)
    set_up = [("mallopt", host_memory._M_MMAP_MAX, 0), ("mallopt", host_memory._M_TRIM_THRESHOLD, 2**31 - 1)]
    with host_memory.reuse_freed_memory():
        assert fake.calls == set_up
        with host_memory.reuse_freed_memory():
            pass
        assert fake.calls == set_up  # the inner block neither set nor undid anything
    assert fake.calls[2:] == [("mallopt", host_memory._M_MMAP_MAX, 65536),
                              ("mallopt", host_memory._M_TRIM_THRESHOLD, 128 * 1024), ("malloc_trim", 0, 0)]
    assert host_memory._active == 0
    with pytest.raises(RuntimeError):  # a run that fails still undoes the setting
        with host_memory.reuse_freed_memory():
            raise RuntimeError("boom")
    assert host_memory._active == 0 and fake.calls[-1] == ("malloc_trim", 0, 0)


def test_only_the_cpu_takes_it(monkeypatch):
    fake = _FakeLibc()
    monkeypatch.setattr(host_memory, "glibc", lambda: fake)
    monkeypatch.delenv("DIP_FAST_HOST_MEMORY", raising=False)
    with host_memory.reuse_on(torch.device("meta")) as active:
        assert not active and fake.calls == []
    with host_memory.reuse_on(torch.device("cpu")) as active:
        assert active and len(fake.calls) == 2
