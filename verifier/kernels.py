"""Which matrix kernels the installed llama.cpp uses, and so whether the target's logits
depend on how many tokens a decode evaluates.

llama.cpp's llamafile kernels (its `sgemm`) multiply a batch of tokens with other code than
one token, so batched, chunked and one-token evaluation round differently: by up to ~1 logit
on a quantized model, enough to change a greedy choice. Built without them
(`CMAKE_ARGS=-DGGML_LLAMAFILE=OFF`, as the project's install does) every row of a product
is the same dot product however many rows there are, and the logits are bit-identical.
"""

from __future__ import annotations

import llama_cpp

EXACT, FAST = "exact", "fast"


def system_info() -> str:
    """llama.cpp's feature line: "CPU : SSE3 = 1 | … | LLAMAFILE = 1 | …"."""
    return llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")


def kernels(info: str | None = None) -> str:
    """EXACT where the library has no llamafile kernels, else FAST."""
    info = system_info() if info is None else info
    return FAST if "LLAMAFILE = 1" in info else EXACT


def exactness(chains_only: bool, flash_attn: bool = False, info: str | None = None) -> dict:
    """What /health and the startup log say of the output. identical_to_plain: the kernels
    are exact, the target verifies chains, each request in cells of its own, so that a
    token's attention adds up its request's cells in the order plain decoding does, and
    flash attention is off (its CPU kernel switches to a split-KV sum for one query over
    512 cells or more, and to a tiled one from 64 queries)."""
    library = kernels(info)
    verifies = "chains" if chains_only else "trees"
    return {"kernels": library, "verifies": verifies, "flash_attn": flash_attn,
            "identical_to_plain": library == EXACT and chains_only and not flash_attn}
