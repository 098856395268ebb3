"""Log-probabilities of the generated tokens (and of an echoed prompt's), in OpenAI's two shapes.

A token's logprob is from the target's own distribution at the pass that chose it: the raw
logits' log-softmax, before logit_bias, penalties, temperature and truncation (as vLLM
reports by default). With speculation that pass is the tree's verification: the numbers
differ from a one-token decode's as its logits do (hundredths for F16, tenths for Q4_1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from verifier.tokenizer import Tokenizer


@dataclass(frozen=True)
class TokenLogprob:
    token: bytes
    logprob: float | None  # None: a prompt's first token, which nothing predicts
    top: tuple[tuple[bytes, float], ...] | None  # the most likely tokens, most likely first
    offset: int  # where the token's text starts in the generated text (characters)


def token_logprob(logits: np.ndarray, token: int, num_top: int, offset: int,
                  tokenizer: Tokenizer) -> TokenLogprob:
    shifted = logits.astype(np.float64) - float(np.max(logits))
    logprobs = shifted - np.log(np.sum(np.exp(shifted)))
    top: tuple[tuple[bytes, float], ...] = ()
    if num_top:
        best = np.argpartition(-logprobs, num_top - 1)[:num_top]
        best = best[np.argsort(-logprobs[best], kind="stable")]
        top = tuple((tokenizer.token_bytes(int(t)), float(logprobs[t])) for t in best)
    return TokenLogprob(tokenizer.token_bytes(token), float(logprobs[token]), top, offset)


def _text(token: bytes) -> str:
    """A token's text; part of a UTF-8 character as `bytes:\\xe2\\x80`, as OpenAI writes it."""
    try:
        return token.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in token)


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict:
    """`choices[].logprobs` of chat.completion (and of a chunk, for its tokens)."""
    return {"content": [
        {"token": _text(entry.token), "logprob": entry.logprob, "bytes": list(entry.token),
         "top_logprobs": [{"token": _text(token), "logprob": logprob, "bytes": list(token)}
                          for token, logprob in entry.top]}
        for entry in entries]}


def completion_logprobs(entries: Sequence[TokenLogprob], prefix_length: int,
                        prompt_entries: Sequence[TokenLogprob] = ()) -> dict:
    """`choices[].logprobs` of text_completion (and of a chunk, for its tokens): an echoed
    prompt's tokens (offsets from 0), then the generated ones (after prefix_length)."""
    every = [*prompt_entries, *entries]
    return {"tokens": [_text(entry.token) for entry in every],
            "token_logprobs": [entry.logprob for entry in every],
            "top_logprobs": [None if entry.top is None else
                             {_text(token): logprob for token, logprob in entry.top}
                             for entry in every],
            "text_offset": [entry.offset for entry in prompt_entries]
            + [prefix_length + entry.offset for entry in entries]}
