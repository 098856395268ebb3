"""The machine the target runs on: usable cores, and a name for reports."""

from __future__ import annotations

import os
import platform


def physical_cores() -> int:
    """Physical cores this process may use: llama.cpp gains nothing from SMT siblings."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores: set[tuple[str, str]] = set()
    physical_id = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    physical_id = value.strip()
                elif key == "core id":
                    cores.add((physical_id, value.strip()))
    except OSError:
        pass
    return max(1, min(len(cores), logical or 1) if cores else (logical or 1))


def describe_cpu() -> str:
    """'<model name>, N cores (M threads usable)' for reports of measured speed."""
    name = platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next((line.partition(":")[2].strip() for line in cpuinfo
                         if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {physical_cores()} cores"


def has_native_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware (AVX512-BF16 or AMX). Without it PyTorch
    emulates bf16 matrix products, far slower than fp32 (seen here: ~20×, AVX2 only)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.partition(":")[2].split() for line in cpuinfo
                          if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
