"""Drafts that ship with Dovetail (see docs/draft-model-card.md)."""

from pathlib import Path

# Trained for SmolLM2-135M-Instruct (the default target): `dovetail serve`'s default draft.
SHIPPED_DRAFT = Path(__file__).parent / "smollm2-135m-instruct"
