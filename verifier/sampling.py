"""Turning the target's logits into the next token: pure numpy, no model in scope.

Order of processing (as vLLM and the OpenAI API define it):
logit_bias → presence/frequency penalties → temperature → top-k → top-p → min-p.
Temperature 0 means pure argmax over the (biased, penalised) logits: with no bias and no
penalties asked for, the logits are not touched at all.

`target_probs` returns the processed target distribution over the whole vocabulary; sampled
acceptance (verifier/acceptance.py) draws the target's token at each tree node from exactly
this distribution, one uniform per output token (`sample_from`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def needs_adjustment(self) -> bool:
        return bool(self.logit_bias) or self.presence_penalty != 0 or self.frequency_penalty != 0


def adjust_logits(
    logits: np.ndarray, params: SamplingParams, token_counts: Mapping[int, int]
) -> np.ndarray:
    """Apply logit_bias and the OpenAI presence/frequency penalties over generated tokens.

    logits: [vocab]. Returns the input itself when nothing is asked for, else a copy.
    """
    if not params.needs_adjustment:
        return logits
    logits = logits.astype(np.float32, copy=True)
    for token, bias in params.logit_bias.items():
        logits[token] += bias
    if token_counts and (params.presence_penalty or params.frequency_penalty):
        tokens = np.fromiter(token_counts.keys(), dtype=np.int64, count=len(token_counts))
        counts = np.fromiter(token_counts.values(), dtype=np.float32, count=len(token_counts))
        logits[tokens] -= counts * params.frequency_penalty + params.presence_penalty
    return logits


def target_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Processed distribution for T > 0: [vocab] float64 summing to 1 (zeros where cut)."""
    scaled = logits.astype(np.float64)
    with np.errstate(over="ignore"):  # a tiny temperature: the far-off logits go to -inf
        scaled = (scaled - scaled.max()) / params.temperature  # the top one stays at 0
    vocab = scaled.shape[0]
    if 0 < params.top_k < vocab:
        kth = np.argpartition(-scaled, params.top_k - 1)[params.top_k - 1]
        scaled[scaled < scaled[kth]] = -np.inf
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (always at least one token);
        # the epsilon keeps a prefix summing to top_p up to rounding from taking one more
        num_keep = int(np.searchsorted(cumulative, params.top_p - 1e-9, side="left")) + 1
        probs[order[num_keep:]] = 0.0
    if params.min_p > 0.0:
        probs[probs < params.min_p * probs.max()] = 0.0
    return probs / probs.sum()


def mask_logits(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """The logits with every token outside `allowed` at -inf (a copy)."""
    return np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32, copy=False)


def sample_from(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One draw from probs, taking exactly one number from rng."""
    return sample_at(probs, rng.random())


def sample_at(probs: np.ndarray, uniform: float) -> int:
    """Inverse-CDF sampling: the token whose stretch of the cumulative distribution holds
    `uniform` (in [0, 1)); a token of probability 0 has none."""
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, uniform * cdf[-1], side="right"))
    return min(index, probs.shape[0] - 1)


def choose_token(
    logits: np.ndarray,
    params: SamplingParams,
    token_counts: Mapping[int, int],
    rng: np.random.Generator,
    allowed: np.ndarray | None = None,
) -> int:
    """The target's next token: argmax at T=0, else a sample from `target_probs`.
    allowed: [vocab] bool, a grammar's mask, applied after bias and penalties."""
    logits = adjust_logits(logits, params, token_counts)
    if allowed is not None:
        logits = mask_logits(logits, allowed)
    if params.is_greedy:
        return int(np.argmax(logits))
    return sample_from(target_probs(logits, params), rng)
