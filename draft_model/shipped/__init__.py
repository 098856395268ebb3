"""Drafts that ship with Dovetail (see docs/draft-model-card.md)."""

from pathlib import Path

import gguf

from draft_model.checkpoint import read_checkpoint_config
from draft_model.target_weights import read_target_info

# Trained for SmolLM2-135M-Instruct (the default target): `dovetail serve`'s default draft.
SHIPPED_DRAFT = Path(__file__).parent / "smollm2-135m-instruct"


def fits_shipped_draft(model_path: Path) -> bool:
    """Whether the shipped draft was trained for this GGUF's model: the same architecture,
    sizes and tokenizer (the packaged file, a copy of it, or its F16 copy). Reading a
    file's metadata takes a few seconds (the tokenizer's 49k tokens and merges)."""
    _, trained_for, _ = read_checkpoint_config(SHIPPED_DRAFT)
    try:
        info = read_target_info(gguf.GGUFReader(model_path))
    except (OSError, ValueError, KeyError, AttributeError, StopIteration):
        return False  # not a GGUF this check can read: llama.cpp will say why
    return not trained_for.differences(info)
