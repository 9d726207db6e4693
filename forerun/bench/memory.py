"""Peak memory of one generation.

tracemalloc does not see torch's allocations, so on CPU this reads the process's peak resident set
(Linux VmHWM), reset before each call by writing 5 to /proc/self/clear_refs. Where that reset is not
allowed, the peak is the process's lifetime peak (ru_maxrss) and is labelled so. On CUDA it is
torch.cuda.max_memory_allocated, which covers torch's allocator only (not llama.cpp's).
"""
from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class MemoryReading:
    peak_mb: float  # highest memory in use during the call
    extra_mb: float  # peak minus what was in use when the call began


class PeakMemory:
    """with PeakMemory(device) as m: ...; then m.reading."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.kind = "cuda allocated" if self.cuda else ("rss" if _can_reset_rss() else "rss (process lifetime peak)")
        self.reading: MemoryReading | None = None

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            if self.kind == "rss":
                _CLEAR_REFS.write_text("5")
            self._start = _current_rss()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _peak_rss()
        self.reading = MemoryReading(peak_mb=peak / MB, extra_mb=max(peak - self._start, 0) / MB)


def _can_reset_rss() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def _status_kb(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _current_rss() -> int:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    try:
        import psutil
    except ImportError:
        return 0
    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux
