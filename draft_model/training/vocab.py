"""A reduced draft vocabulary: the head scores only the K most frequent target tokens.

The LM head dominates a small draft's cost (49k × 576 for SmolLM2); scoring the tokens
that actually occur costs a fraction and loses little acceptance. Head index i stands for
target token `head_token_ids[i]`.
"""

from __future__ import annotations

import numpy as np
import torch


def most_frequent_tokens(token_counts: np.ndarray, size: int,
                         always: tuple[int, ...] = ()) -> torch.Tensor:
    """The `size` most frequent target token ids (plus `always`, e.g. end-of-turn),
    sorted ascending. token_counts: [vocab] occurrences in the training data."""
    if not 0 < size <= token_counts.shape[0]:
        raise ValueError(f"draft vocabulary size must be in 1..{token_counts.shape[0]}")
    order = np.argsort(-token_counts, kind="stable")
    chosen = list(dict.fromkeys([*always, *order.tolist()]))[:size]
    return torch.tensor(sorted(chosen), dtype=torch.long)


def to_head_index(head_token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[vocab] map target id → head index, −1 for tokens the draft cannot propose."""
    index = torch.full((vocab_size,), -1, dtype=torch.long)
    index[head_token_ids] = torch.arange(head_token_ids.shape[0])
    return index
