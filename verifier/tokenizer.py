"""The target's tokenizer, straight from the GGUF vocabulary through llama.cpp."""

from __future__ import annotations

import codecs
import ctypes
import re

import llama_cpp

# Tokens that special parsing reads as one token wherever their text appears. (llama.cpp
# also splits out user-defined tokens, but it does that with special parsing off too.)
_SPECIAL = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN


class Tokenizer:
    def __init__(self, model: llama_cpp.llama_model_p) -> None:
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.vocab_size: int = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.bos_id: int = llama_cpp.llama_vocab_bos(self._vocab)
        self.eos_id: int = llama_cpp.llama_vocab_eos(self._vocab)
        self.adds_bos: bool = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.end_of_generation_ids: frozenset[int] = frozenset(
            token for token in range(self.vocab_size)
            if llama_cpp.llama_vocab_is_eog(self._vocab, token)
        )
        self._piece_cache: dict[int, bytes] = {}
        self._special_ids: dict[str, int] = {}
        for token in range(self.vocab_size):
            if llama_cpp.llama_vocab_get_attr(self._vocab, token) & _SPECIAL:
                text = llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8", "replace")
                self._special_ids.setdefault(text, token)
        self._special_ids.pop("", None)
        # Longest first, as llama.cpp tries them; the group keeps matches in re.split's output.
        longest_first = sorted(self._special_ids, key=len, reverse=True)
        self.special_text: re.Pattern[str] | None = re.compile(
            "(" + "|".join(map(re.escape, longest_first)) + ")") if longest_first else None

    @property
    def vocab(self) -> llama_cpp.llama_vocab_p:
        """llama.cpp's vocabulary object (for libraries that read it, e.g. llguidance)."""
        return self._vocab

    def encode(self, text: str, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        """Text → token ids. `parse_special` turns e.g. '<|im_start|>' into its control token."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buffer = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(
            self._vocab, data, len(data), buffer, capacity, add_bos, parse_special
        )
        if count < 0:  # buffer too small: -count is the size needed
            capacity = -count
            buffer = (llama_cpp.llama_token * capacity)()
            count = llama_cpp.llama_tokenize(
                self._vocab, data, len(data), buffer, capacity, add_bos, parse_special
            )
        return list(buffer[:count])

    def encode_with_literals(self, text: str, literals: dict[str, str],
                             add_bos: bool = False) -> list[int]:
        """encode(text, parse_special=True), except that each placeholder character (a key of
        `literals`) stands for special-token text to read as plain text.

        Splits the text at its special tokens and reads the pieces between them without
        special parsing, as llama.cpp does, with the placeholders put back first.
        """
        tokens = [self.bos_id] if add_bos else []
        pieces = self.special_text.split(text) if self.special_text else [text]
        for index, piece in enumerate(pieces):
            if index % 2:
                tokens.append(self._special_ids[piece])
            elif piece:
                for mark, literal in literals.items():
                    piece = piece.replace(mark, literal)
                tokens.extend(self.encode(piece, parse_special=False))
        return tokens

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes a generated token stands for; control tokens render as nothing.

        A byte-level token may hold part of a multi-byte UTF-8 character, so this is bytes.
        """
        piece = self._piece_cache.get(token)
        if piece is None:
            piece = self._piece(token, special=False)
            self._piece_cache[token] = piece
        return piece

    def token_text(self, token: int) -> str:
        """A token's text with control tokens rendered (e.g. '<|im_end|>'), for templates."""
        return self._piece(token, special=True).decode("utf-8", errors="replace")

    def decode(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(token) for token in tokens).decode("utf-8", "replace")

    def is_end_of_generation(self, token: int) -> bool:
        return token in self.end_of_generation_ids

    def _piece(self, token: int, special: bool) -> bytes:
        size = 64
        while True:
            buffer = ctypes.create_string_buffer(size)
            count = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, size, 0, special)
            if count >= 0:
                return buffer.raw[:count]
            size = -count


class IncrementalDetokenizer:
    """Token ids in, text out; never emits part of a multi-byte UTF-8 character.

    Bytes of a character split across tokens are held until the character is complete;
    bytes that can never form valid UTF-8 become U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(self._tokenizer.token_bytes(token), final=False)

    def flush(self) -> str:
        """End of generation: whatever incomplete bytes remain become U+FFFD."""
        return self._decoder.decode(b"", final=True)
