"""What the run holds in memory, read at each epoch's end: cheap host-side reads, no device sync.

    cpu_rss_mb            resident memory of this process (every run)
    gpu_mem_allocated_mb  tensors allocated on the GPU now (CUDA)
    gpu_mem_reserved_mb   what PyTorch's caching allocator holds from the driver (CUDA)
    peak_mem_mb           the most ever allocated on the GPU by this process (CUDA)

The trainer reduces them by max over the processes (in the epoch's one gather), so the record shows the
process closest to running out.
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Any

import torch

_MB = 2**20


def readings(device: Any) -> dict[str, float]:
    values = {"cpu_rss_mb": _rss_bytes() / _MB}
    if getattr(device, "type", None) == "cuda":
        values["gpu_mem_allocated_mb"] = torch.cuda.memory_allocated(device) / _MB
        values["gpu_mem_reserved_mb"] = torch.cuda.memory_reserved(device) / _MB
        values["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / _MB
    return values


def _rss_bytes() -> float:
    """The resident set now (Linux: /proc/self/statm); elsewhere the peak, which is what the OS reports."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux and BSD


def capacity_and_peak(device: Any) -> str:
    """What is known of the device's memory, in words, for an out-of-memory message: CUDA's total memory and the
    most this process allocated on it; on the CPU the machine's RAM and this process's peak resident set."""
    if getattr(device, "type", None) == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        peak = torch.cuda.max_memory_allocated(device)
        return f"{device} has {_gib(total)} in total, this process peaked at {_gib(peak)} allocated"
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_rss = peak_rss if sys.platform == "darwin" else peak_rss * 1024
    try:
        ram = f"has {_gib(os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE'))} of RAM, "
    except (OSError, ValueError):
        ram = ""
    return f"the {getattr(device, 'type', device)} machine {ram}this process peaked at {_gib(peak_rss)} resident"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
