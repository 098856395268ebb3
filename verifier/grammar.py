"""Constrained decoding with llguidance: a grammar's allowed tokens at each step.

llguidance is the engine llama.cpp itself uses. Measured against xgrammar on this project's
2-core CPU with the default model's 49,152-token vocabulary (docs/results.md): a JSON-schema
mask took 0.065 ms per token (xgrammar: 0.009 ms) and a schema compiled in 3 ms (xgrammar:
14 ms). Both masks are far below one verification step (tens of milliseconds), so the
choice goes to what the engine needs besides the mask: llguidance builds its token set from
llama.cpp's vocabulary object (any GGUF), computes the tokens a grammar forces
(`forced_tokens`, free draft tokens) and checks a drafted path without moving the state
(`valid_prefix`), and it installs as one wheel with no dependencies, where xgrammar pulls
in Transformers.

A `Grammar` belongs to one request and follows its committed tokens: the engine asks for
the mask at the current state, consumes each token the target chooses, and checks drafted
paths against the state without consuming them.
"""

from __future__ import annotations

import threading
import warnings

import llguidance
import llguidance.llamacpp
import numpy as np

from verifier.tokenizer import Tokenizer

# One line of JSON with a space after ':' and ','; no free whitespace, which small models
# otherwise fill by the hundred, and the fewer choices the more tokens the grammar forces.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def with_json_options(schema: dict) -> dict:
    """The schema with the server's JSON layout (JSON_OPTIONS), unless the schema's own
    "x-guidance" options say otherwise: for response_format and tool arguments alike."""
    return {**schema, "x-guidance": {**JSON_OPTIONS, **schema.get("x-guidance", {})}}


class GrammarError(ValueError):
    """A grammar or schema that cannot be compiled; the message says why."""


class GrammarViolation(RuntimeError):
    """A token the grammar does not allow was consumed (an engine bug, not bad input)."""


class GrammarCompiler:
    """Compiles grammars for one model's vocabulary (built once: about half a second)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.vocab_size = tokenizer.vocab_size
        # every end-of-generation token ends a grammar that is complete
        with warnings.catch_warnings():  # it reads token attributes by a deprecated name
            warnings.simplefilter("ignore", DeprecationWarning)
            self._tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(
                tokenizer.vocab, eos_token=sorted(tokenizer.end_of_generation_ids))
        self._lock = threading.Lock()

    def json_schema(self, schema: dict) -> str:
        """A schema → llguidance grammar text (not yet checked)."""
        return llguidance.LLMatcher.grammar_from_json_schema(with_json_options(schema))

    @staticmethod
    def lark(source: str) -> str:
        return llguidance.LLMatcher.grammar_from_lark(source)

    def grammar(self, grammar: str) -> Grammar:
        """A fresh matcher for the grammar; GrammarError with llguidance's message if it
        does not compile or cannot be satisfied."""
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
        if is_error:
            raise GrammarError("; ".join(messages))
        with self._lock:
            matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return Grammar(matcher, self.vocab_size)


class Grammar:
    """One request's grammar state (used on the engine thread only)."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size

    def allowed(self) -> np.ndarray:
        """[vocab] bool: the tokens the grammar allows next (end-of-generation tokens once
        the text so far is complete)."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self._vocab_size].astype(bool)

    def consume(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise GrammarViolation(f"token {token} is not allowed by the grammar: "
                                   f"{self._matcher.get_error()}")

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of the tokens, in order, the grammar allows from here (state unchanged)."""
        return self._matcher.validate_tokens(tokens) if tokens else 0

    def forced_tokens(self) -> list[int]:
        """Tokens that follow from here whatever the model chooses (the grammar's text
        ahead, as llguidance tokenizes it); the target still verifies them."""
        return self._matcher.compute_ff_tokens()
