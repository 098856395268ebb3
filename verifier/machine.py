"""The machine the target runs on: usable cores, a name for reports, and where heavy
numeric work may run without slowing the engine's decodes."""

from __future__ import annotations

import os
import platform
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_on_fresh_thread(work: Callable[..., T], *args) -> T:
    """work(*args) on a new thread that ends with it; its result, or its exception raised.

    For numeric work (llama.cpp decodes, PyTorch CPU ops) done off the engine's thread.
    llama-cpp-python's llama.cpp and PyTorch share one OpenMP runtime (libgomp.so.1), which
    keeps a pool of worker threads for every thread that ever started a parallel region. A
    pool left idle on a thread that lives on (the server's loading worker, say) makes libgomp
    count more threads than cores, and it then lets every barrier of the engine thread's
    decodes sleep instead of spin, slowing every decode for the life of the process (see
    docs/results.md). A thread that ends takes its pool with it.
    """
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, work(*args)))
        except BaseException as error:  # handed to the caller
            outcome.append((False, error))

    thread = threading.Thread(target=run, name=f"dovetail-{getattr(work, '__name__', 'work')}")
    thread.start()
    thread.join()
    succeeded, value = outcome[0]
    if not succeeded:
        raise value
    return value


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


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not there)."""
    try:
        with open(cpuinfo) as lines:
            return set(next((line.partition(":")[2].split() for line in lines
                             if line.startswith("flags")), []))
    except OSError:
        return set()


def vector_extension(flags: set[str]) -> str | None:
    """The widest x86 vector extension: llama.cpp's kernels and so T_V(k) differ by it."""
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None


def describe_cpu(cpuinfo: str = "/proc/cpuinfo") -> str:
    """'<model name> (<vector extension>), N cores' for reports of measured speed."""
    name = platform.machine()
    try:
        with open(cpuinfo) as lines:
            name = next((line.partition(":")[2].strip() for line in lines
                         if line.startswith("model name")), name)
    except OSError:
        pass
    extension = vector_extension(cpu_flags(cpuinfo))
    return f"{name}{f' ({extension})' if extension else ''}, {physical_cores()} cores"


def has_native_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware (AVX512-BF16 or AMX). Without it PyTorch
    emulates bf16 matrix products, far slower than fp32 (seen here: ~20×, AVX2 only)."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags
