"""One request's generation state, owned by the engine thread.

Vocabulary: the *root* of a step is the last token the target chose (already emitted, not
yet in the KV cache); *drafted* tokens are proposed on top of it; *accepted* drafted tokens
are those the target agreed with; the *bonus* token is the target's own choice after the
last accepted one. Each step emits accepted + bonus, and the bonus becomes the next root.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.engine.logprobs import TokenLogprob, token_logprob
from server.engine.stops import StopMatcher
from server.speculation.choice import Mode
from verifier.grammar import Grammar
from verifier.sampling import SamplingParams
from verifier.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    verify_steps: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0  # drafted tokens the target accepted (bonus tokens excluded)
    chosen_tokens: int = 0  # tokens the target chose: the completion and an ending EOS
    forced_tokens: int = 0  # accepted tokens that a grammar forced (not drafted by a model)

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def speculative_dict(self) -> dict:
        """τ = tokens the target chose per verification step (1.0 for plain decoding): an
        ending EOS counts, as its step was spent choosing it."""
        tau = self.chosen_tokens / self.verify_steps if self.verify_steps else 0.0
        return {"verify_steps": self.verify_steps, "drafted_tokens": self.drafted_tokens,
                "accepted_tokens": self.accepted_tokens, "forced_tokens": self.forced_tokens,
                "mean_accepted_length": round(tau, 4)}


@dataclass(frozen=True)
class SequenceEvent:
    """What the engine hands to the HTTP side: new text, and on the last event the end."""

    text: str = ""
    # "stop" | "length" | "cancelled" | "error" | "timeout" (ended at its deadline)
    # | "rejected" (never given a slot: deadline or shutdown)
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # for the tokens whose text begins in this event
    # with `track_sources`: (text, source) of those tokens, and tokens per verification step
    # of the steps since the last event
    sources: tuple[tuple[str, str], ...] = ()
    steps: tuple[int, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # the prompt's, if asked (first event)


@dataclass
class Sequence:
    prompt_tokens: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop: list[str]
    sink: Callable[[SequenceEvent], None]  # called on the engine thread; must not block
    request_id: str = ""
    logprobs: int | None = None  # with `logprobs`: how many top alternatives per token
    prompt_logprobs: bool = False  # the prompt tokens' logprobs too (needs `logprobs`)
    grammar: Grammar | None = None  # structured output: the state after the emitted tokens
    track_sources: bool = False  # events say where each token came from (the chat page)

    slot: int | None = None
    root_token: int | None = None  # chosen and emitted, not yet in the target's KV
    output_tokens: list[int] = field(default_factory=list)
    token_counts: Counter = field(default_factory=Counter)
    finish_reason: str | None = None
    draft_state: Any = None  # the proposer's per-sequence state, when drafting
    num_verify_steps: int = 0  # target passes that chose tokens (the prefill included)
    num_drafted: int = 0
    num_accepted: int = 0
    num_chosen: int = 0  # tokens the target chose and the sequence took in (EOS included)
    num_forced: int = 0  # of the accepted drafted tokens, those a grammar forced
    forced_in_tree: int = 0  # this step's tree: nodes 1..forced_in_tree are forced tokens
    accepted_lengths: list[int] = field(default_factory=list)  # per step that drafted
    cancelled: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None  # time.monotonic() after which the engine ends it
    num_prompt_read: int = 0  # prompt tokens the target has evaluated
    prompt_features: list[np.ndarray] = field(default_factory=list)  # per chunk, for the draft
    draft_seconds: float = 0.0  # the last step's drafting time
    launch_seconds: float = 0.0  # starting the next tree early (DraftProposer.launch), host time
    drafting_ahead: bool = False  # the next tree grows while this step's is verified
    verify_seconds: float = 0.0  # the last target decode that verified this sequence's tree
    budget_step: tuple | None = None  # the adaptive budget's note on this step's tree
    mode: Mode | None = None  # with a per-request choice: its proposer and budget
    admitted_at: float = 0.0  # time.monotonic() when it got a slot

    def __post_init__(self) -> None:
        seed = self.params.seed
        # any integer is a seed (OpenAI's are signed 64-bit); numpy wants one ≥ 0
        self.rng = np.random.default_rng(None if seed is None else seed % 2**64)
        self._detokenizer: IncrementalDetokenizer | None = None
        self._stops = StopMatcher(self.stop)
        self._pending_text: list[str] = []
        self._error: str | None = None
        # With logprobs, a token's entry waits for the first character of its text to be
        # emitted (text is held back for UTF-8 and stop strings); a stop string drops the
        # entries of tokens that wrote only its text.
        self._text_length = 0  # characters the detokenizer has given out
        self._emitted_length = 0  # of which emitted
        self._held_logprobs: deque[TokenLogprob] = deque()
        self._pending_logprobs: list[TokenLogprob] = []
        self._held_sources: deque[tuple[int, str, str]] = deque()  # (offset, text, source)
        self._pending_sources: list[tuple[str, str]] = []
        self._pending_steps: list[int] = []
        self._prompt_logprobs: list[TokenLogprob] = []
        self._prompt_text: IncrementalDetokenizer | None = None
        self._prompt_text_length = 0
        self._prompt_row: np.ndarray | None = None  # the logits after the last prompt chunk

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def record_step(self, num_drafted: int, num_accepted: int) -> None:
        self.num_verify_steps += 1
        self.num_drafted += num_drafted
        self.num_accepted += num_accepted
        if self.track_sources:
            self._pending_steps.append(num_accepted + 1)
        if num_drafted:
            self.accepted_lengths.append(num_accepted)

    def add_prompt_logprobs(self, tokens: list[int], logits: np.ndarray,
                            tokenizer: Tokenizer) -> None:
        """A prompt chunk's logprobs from its logits; the first prompt token has none
        (nothing predicts it). Offsets count characters of the prompt's text."""
        if self._prompt_text is None:
            self._prompt_text = IncrementalDetokenizer(tokenizer)
        for index, token in enumerate(tokens):
            row = self._prompt_row if index == 0 else logits[index - 1]
            offset = self._prompt_text_length
            self._prompt_logprobs.append(
                TokenLogprob(tokenizer.token_bytes(token), None, None, offset) if row is None
                else token_logprob(row, token, self.logprobs or 0, offset, tokenizer))
            self._prompt_text_length += len(self._prompt_text.push(token))
        self._prompt_row = logits[-1]

    def add_token(self, token: int, tokenizer: Tokenizer, logits: np.ndarray,
                  source: str = "target") -> None:
        """Record one token chosen by the target (from these raw logits); decides whether
        the sequence ends. source: where it came from — "target" (its own choice), "draft",
        "lookup" or "forced" (drafted or forced, and accepted)."""
        self.num_chosen += 1
        if tokenizer.is_end_of_generation(token):
            self.finish("stop")
            return
        if self._detokenizer is None:
            self._detokenizer = IncrementalDetokenizer(tokenizer)
        self.output_tokens.append(token)
        self.token_counts[token] += 1
        piece = self._detokenizer.push(token)
        if self.logprobs is not None:
            self._held_logprobs.append(
                token_logprob(logits, token, self.logprobs, self._text_length, tokenizer))
        if self.track_sources:
            self._held_sources.append((self._text_length, piece, source))
        self._text_length += len(piece)
        text, hit_stop = self._stops.push(piece)
        self._emit(text)
        if hit_stop:
            self.finish_reason = "stop"
        elif len(self.output_tokens) >= self.max_new_tokens:
            self.finish("length")

    def fail(self, message: str) -> None:
        self._error = message
        self.finish("error")

    def finish(self, reason: str) -> None:
        """End the sequence: emit the text held back for UTF-8 or stop strings."""
        if self.is_finished:
            return
        if self._detokenizer is not None:
            text, hit_stop = self._stops.push(self._detokenizer.flush())
            self._emit(text if hit_stop else text + self._stops.flush())
            if not hit_stop:  # what is left wrote nothing (e.g. a control token): it goes too
                self._pending_logprobs.extend(self._held_logprobs)
                self._held_logprobs.clear()
                self._pending_sources.extend((t, s) for _, t, s in self._held_sources)
                self._held_sources.clear()
        self.finish_reason = reason

    def _emit(self, text: str) -> None:
        self._pending_text.append(text)
        self._emitted_length += len(text)
        held = self._held_logprobs
        while held and held[0].offset < self._emitted_length:
            self._pending_logprobs.append(held.popleft())
        sources = self._held_sources
        while sources and sources[0][0] < self._emitted_length:
            _, piece, source = sources.popleft()
            self._pending_sources.append((piece, source))

    def send_event(self) -> None:
        """Hand the text produced since the last event (if any) to the sink."""
        event = self.take_event()
        if event is None:
            return
        try:
            self.sink(event)
        except RuntimeError:  # the receiving event loop is gone (server shutting down)
            self.cancelled.set()

    def take_event(self) -> SequenceEvent | None:
        """The text produced since the last event (and the end, if reached), or None."""
        text = "".join(self._pending_text)
        self._pending_text.clear()
        if not self.is_finished and not text:
            return None
        logprobs, prompt_logprobs = tuple(self._pending_logprobs), tuple(self._prompt_logprobs)
        sources, steps = tuple(self._pending_sources), tuple(self._pending_steps)
        self._pending_logprobs.clear()
        self._prompt_logprobs.clear()
        self._pending_sources.clear()
        self._pending_steps.clear()
        if not self.is_finished:
            return SequenceEvent(text=text, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                 sources=sources, steps=steps)
        usage = Usage(len(self.prompt_tokens), len(self.output_tokens), self.num_verify_steps,
                      self.num_drafted, self.num_accepted, self.num_chosen, self.num_forced)
        return SequenceEvent(text=text, finish_reason=self.finish_reason, usage=usage,
                             error=self._error, logprobs=logprobs,
                             prompt_logprobs=prompt_logprobs, sources=sources, steps=steps)
