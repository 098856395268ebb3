"""Where llama.cpp keeps the target's weights: its extra buffer types, or plain CPU memory.

llama.cpp moves weights into an "extra" buffer type where the CPU has kernels for one: AMX
tiles (Intel Sapphire Rapids and later) or repacked layouts (Q4_0 and others on AVX2/NEON).
Its AMX matrix kernel can crash the first decode (a segfault in `ggml_backend_amx_mul_mat`,
in llama-cpp-python's own `Llama` too; llama.cpp issue 20824, machine-dependent, closed
without a fix; seen here: docs/results.md). So where the build uses AMX the extra buffer
types are off unless asked for (`--extra-buffers on`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import llama_cpp
import llama_cpp.llama_cpp as llama_cpp_api

SETTINGS = ("auto", "on", "off")


def amx_in_build() -> bool:
    """Whether this llama.cpp build puts weights in AMX buffers on this CPU."""
    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


def use_extra_buffers(setting: str = "auto") -> bool:
    if setting not in SETTINGS:
        raise ValueError(f"extra buffers: {setting!r} is not one of {', '.join(SETTINGS)}")
    return not amx_in_build() if setting == "auto" else setting == "on"


@contextlib.contextmanager
def llama_weight_buffers(setting: str = "auto") -> Iterator[None]:
    """llama-cpp-python's `Llama` built inside this block places its weights as `Target`
    does with the same setting (`Llama` takes no argument for it)."""
    extra = use_extra_buffers(setting)
    default_params = llama_cpp_api.llama_model_default_params

    def params():
        model_params = default_params()
        model_params.use_extra_bufts = extra
        return model_params

    llama_cpp_api.llama_model_default_params = params
    try:
        yield
    finally:
        llama_cpp_api.llama_model_default_params = default_params
