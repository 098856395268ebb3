"""Feature shards: sequences with the target's post-norm features, written in pieces.

A shard `{split}-{index:05d}.npz` holds a `SequenceSet` (tokens, mask, offsets) and
`features` [num_tokens, H] float16: row i is the target's feature of token i, so the pair
(features[t], tokens[t+1]) predicts features[t+1] and mask[t+1] says whether it is trained.
Shards are written whole (temporary name, then rename), so a collection that stops can
resume by skipping the shards that exist.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from draft_model.training.sequences import SequenceSet


@dataclass
class FeatureShard:
    sequences: SequenceSet
    features: np.ndarray  # [num_tokens, H] float16

    def __post_init__(self) -> None:
        if self.features.shape[0] != self.sequences.tokens.shape[0]:
            raise ValueError(f"{self.features.shape[0]} feature rows for "
                             f"{self.sequences.tokens.shape[0]} tokens")

    @classmethod
    def from_items(cls, items: list[tuple[list[int], list[int], np.ndarray]]) -> FeatureShard:
        sequences = SequenceSet.from_lists((tokens, mask) for tokens, mask, _ in items)
        features = np.concatenate([f.astype(np.float16) for _, _, f in items])
        return cls(sequences, features)

    def save(self, path: Path | str) -> None:
        path = Path(path)
        temporary = path.with_name(path.name + ".tmp.npz")
        np.savez(temporary, tokens=self.sequences.tokens.astype(np.uint16),
                 mask=self.sequences.mask, offsets=self.sequences.offsets,
                 features=self.features)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: Path | str) -> FeatureShard:
        with np.load(path) as data:
            sequences = SequenceSet(data["tokens"].astype(np.int32), data["mask"],
                                    data["offsets"])
            return cls(sequences, data["features"])


def shard_path(directory: Path | str, split: str, index: int) -> Path:
    return Path(directory) / f"{split}-{index:05d}.npz"


def shard_paths(directory: Path | str, split: str) -> list[Path]:
    return sorted(Path(directory).glob(f"{split}-[0-9][0-9][0-9][0-9][0-9].npz"))


def load_split(directory: Path | str, split: str) -> FeatureShard:
    """All shards of a split as one (sequences concatenated in shard order)."""
    shards = [FeatureShard.load(path) for path in shard_paths(directory, split)]
    if not shards:
        raise FileNotFoundError(f"no '{split}' feature shards in {directory}")
    offsets = [np.zeros(1, np.int64)]
    base = 0
    for shard in shards:
        offsets.append(shard.sequences.offsets[1:] + base)
        base += shard.sequences.tokens.shape[0]
    sequences = SequenceSet(np.concatenate([s.sequences.tokens for s in shards]),
                            np.concatenate([s.sequences.mask for s in shards]),
                            np.concatenate(offsets))
    return FeatureShard(sequences, np.concatenate([s.features for s in shards]))


def pending_shards(directory: Path | str, split: str, num_items: int,
                   shard_size: int) -> Iterator[tuple[int, range]]:
    """(shard index, item range) for every shard not written yet."""
    for index, start in enumerate(range(0, num_items, shard_size)):
        if not shard_path(directory, split, index).exists():
            yield index, range(start, min(start + shard_size, num_items))
