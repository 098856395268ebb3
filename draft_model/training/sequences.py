"""Token sequences with loss masks: what the draft trains and is evaluated on.

A `SequenceSet` holds many variable-length sequences flat (tokens, mask, offsets) and saves
to one `.npz`. The mask marks the tokens the draft learns to predict: the assistant's text
and its end-of-turn token, never the prompt or the chat template's headers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Messages = list[dict[str, str]]
RenderFn = Callable[[Messages, bool], str]  # (messages, add_generation_prompt) → text
EncodeFn = Callable[[str], list[int]]


def chat_tokens_with_mask(messages: Messages, render: RenderFn, encode: EncodeFn,
                          max_tokens: int) -> tuple[list[int], list[int]]:
    """Render a conversation with the chat template turn by turn; mask = 1 on assistant
    content (what follows each generation prompt up to the next turn), 0 elsewhere."""
    tokens: list[int] = []
    mask: list[int] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            header = render(messages[:index], True)
            pieces = [(header[len(rendered):], 0)]
        else:
            header = rendered
            pieces = []
        full = render(messages[:index + 1], False)
        if not full.startswith(header):
            raise ValueError("the chat template does not render conversations incrementally")
        pieces.append((full[len(header):], int(message["role"] == "assistant")))
        for text, trained in pieces:
            ids = encode(text) if text else []
            tokens.extend(ids)
            mask.extend([trained] * len(ids))
        rendered = full
        if len(tokens) >= max_tokens:
            break
    return tokens[:max_tokens], mask[:max_tokens]


@dataclass
class SequenceSet:
    tokens: np.ndarray  # [N] int32, all sequences back to back
    mask: np.ndarray  # [N] uint8
    offsets: np.ndarray  # [num_sequences + 1] int64

    @classmethod
    def from_lists(cls, sequences: Iterable[tuple[list[int], list[int]]]) -> SequenceSet:
        tokens, masks, offsets = [], [], [0]
        for ids, mask in sequences:
            if len(ids) != len(mask):
                raise ValueError("tokens and mask differ in length")
            tokens.append(np.asarray(ids, dtype=np.int32))
            masks.append(np.asarray(mask, dtype=np.uint8))
            offsets.append(offsets[-1] + len(ids))
        return cls(np.concatenate(tokens) if tokens else np.zeros(0, np.int32),
                   np.concatenate(masks) if masks else np.zeros(0, np.uint8),
                   np.asarray(offsets, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.tokens[start:end], self.mask[start:end]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_trained_tokens(self) -> int:
        return int(self.mask.sum())

    def token_counts(self, vocab_size: int) -> np.ndarray:
        """How often each token occurs where the mask is on (for a reduced draft head)."""
        return np.bincount(self.tokens[self.mask.astype(bool)], minlength=vocab_size)

    @classmethod
    def concatenate(cls, sets: Iterable[SequenceSet]) -> SequenceSet:
        """The sequences of several sets, one after another."""
        sets = list(sets)
        lengths = np.concatenate([s.lengths for s in sets] + [np.zeros(0, np.int64)])
        return cls(np.concatenate([s.tokens for s in sets] + [np.zeros(0, np.int32)]),
                   np.concatenate([s.mask for s in sets] + [np.zeros(0, np.uint8)]),
                   np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    def subset(self, indices: Iterable[int]) -> SequenceSet:
        return SequenceSet.from_lists((list(t), list(m)) for t, m in (self[i] for i in indices))

    def save(self, path: Path | str) -> None:
        tokens = self.tokens.astype(np.uint16) if self.tokens.size == 0 or \
            self.tokens.max() < 2**16 else self.tokens
        np.savez_compressed(path, tokens=tokens, mask=self.mask, offsets=self.offsets)

    @classmethod
    def load(cls, path: Path | str) -> SequenceSet:
        with np.load(path) as data:
            return cls(data["tokens"].astype(np.int32), data["mask"].astype(np.uint8),
                       data["offsets"].astype(np.int64))


def padded_batches(sequences: SequenceSet, max_tokens: int, max_length: int,
                   rng: np.random.Generator | None
                   ) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
    """(sequence indices, right-padded [B, T] tokens and mask) of about max_tokens each,
    grouping sequences
    of similar length; shuffled batch order when rng is given. Sequences are cut to
    max_length; ones with nothing to learn are skipped."""
    lengths = np.minimum(sequences.lengths, max_length)
    order = np.argsort(lengths, kind="stable")
    order = [i for i in order if lengths[i] > 1 and sequences[i][1][1:lengths[i]].any()]
    groups, current = [], []
    for index in order:
        if current and (len(current) + 1) * lengths[index] > max_tokens:
            groups.append(current)
            current = []
        current.append(index)
    if current:
        groups.append(current)
    if rng is not None:
        rng.shuffle(groups)
    for group in groups:
        width = int(lengths[group[-1]])
        tokens = np.zeros((len(group), width), dtype=np.int64)
        mask = np.zeros((len(group), width), dtype=np.uint8)
        for row, index in enumerate(group):
            ids, trained = sequences[index]
            count = int(lengths[index])
            tokens[row, :count] = ids[:count]
            mask[row, :count] = trained[:count]
        yield group, tokens, mask
