"""`logprobs`: the numbers, and which tokens' entries go out with which text."""

from __future__ import annotations

import numpy as np
import pytest

from server.engine.logprobs import chat_logprobs, completion_logprobs, token_logprob
from server.engine.sequence import Sequence
from verifier.sampling import SamplingParams


def test_token_logprob_is_the_log_softmax_with_the_most_likely_first(q4_target):
    tokenizer = q4_target.tokenizer
    logits = np.random.default_rng(0).normal(0, 3, tokenizer.vocab_size).astype(np.float32)
    logits[7] = 1000.0  # a large logit: the shift keeps exp finite
    expected = logits.astype(np.float64) - 1000.0
    expected -= np.log(np.exp(expected).sum())
    entry = token_logprob(logits, 42, 5, offset=3, tokenizer=tokenizer)
    assert entry.logprob == pytest.approx(expected[42])
    assert entry.token == tokenizer.token_bytes(42) and entry.offset == 3
    best = np.argsort(-expected)[:5]
    assert entry.top == tuple((tokenizer.token_bytes(int(t)), pytest.approx(expected[t]))
                              for t in best)
    assert token_logprob(logits, 42, 0, 0, tokenizer).top == ()


def feed(tokenizer, text, stop=(), max_new=100, stream=None):
    """A sequence fed the tokens of `text` with made-up logits; returns it and its events."""
    sequence = Sequence([1], SamplingParams(), max_new, list(stop), sink=None, logprobs=1)
    events = stream if stream is not None else []
    logits = np.zeros(tokenizer.vocab_size, dtype=np.float32)
    for token in tokenizer.encode(text):
        sequence.add_token(token, tokenizer, logits)
        event = sequence.take_event()
        if event is not None:
            events.append(event)
        if sequence.is_finished:
            break
    sequence.finish("length")
    event = sequence.take_event()
    events.append(event)
    return sequence, events


def test_every_emitted_token_has_one_entry_in_order(q4_target):
    tokenizer = q4_target.tokenizer
    sequence, events = feed(tokenizer, "Llamas 🦙 and the moon 月 — naïve café")
    entries = [entry for event in events for entry in event.logprobs]
    assert [entry.token for entry in entries] == \
        [tokenizer.token_bytes(t) for t in sequence.output_tokens]
    text = "".join(event.text for event in events)
    # where each token's text starts: after the whole characters of the tokens before it
    assert [entry.offset for entry in entries] == \
        [len(b"".join(entry.token for entry in entries[:i]).decode("utf-8", "ignore"))
         for i in range(len(entries))]
    assert b"".join(entry.token for entry in entries).decode() == text
    # an entry goes out with the first text of its token, never before it
    sent = 0
    for event in events:
        sent += len(event.text)
        assert all(entry.offset < sent for entry in event.logprobs)


def test_tokens_of_a_stop_string_have_no_entries(q4_target):
    """' three' was held back as the start of the stop string, and then it was the stop."""
    tokenizer = q4_target.tokenizer
    _, events = feed(tokenizer, "One two three. Four five", stop=[" three."])
    assert "".join(event.text for event in events) == "One two"
    entries = [entry for event in events for entry in event.logprobs]
    assert [entry.token for entry in entries] == \
        [tokenizer.token_bytes(t) for t in tokenizer.encode("One two")]
    # a token that wrote text before the stop keeps its entry
    _, events = feed(tokenizer, "One two three. Four five", stop=["three."])
    assert "".join(event.text for event in events) == "One two "
    entries = [entry for event in events for entry in event.logprobs]
    assert entries[-1].token == b" three"


def test_response_shapes(q4_target):
    tokenizer = q4_target.tokenizer
    logits = np.zeros(tokenizer.vocab_size, dtype=np.float32)
    space, half = tokenizer.encode(" a")[0], tokenizer.encode("🦙")[0]
    entries = [token_logprob(logits, space, 1, 0, tokenizer),
               token_logprob(logits, half, 1, 2, tokenizer)]
    chat = chat_logprobs(entries)["content"]
    assert chat[0]["token"] == " a" and chat[0]["bytes"] == list(b" a")
    assert chat[1]["token"].startswith("bytes:\\x") and bytes(chat[1]["bytes"]) != b""
    assert chat[0]["logprob"] == pytest.approx(-np.log(tokenizer.vocab_size))
    assert len(chat[0]["top_logprobs"]) == 1
    text = completion_logprobs(entries, prefix_length=10)
    assert text["tokens"][0] == " a" and text["text_offset"] == [10, 12]
    assert len(text["top_logprobs"][0]) == 1


def test_prompt_logprobs_take_each_tokens_predicting_row_across_chunks(q4_target):
    tokenizer = q4_target.tokenizer
    prompt = tokenizer.encode("Scoring a continuation, as evaluation harnesses do. 🦙!")
    logits = np.zeros((len(prompt), tokenizer.vocab_size), dtype=np.float32)
    logits[np.arange(len(prompt) - 1), prompt[1:]] = 30.0  # row i predicts token i + 1
    sequence = Sequence(prompt, SamplingParams(), 4, [], sink=None, logprobs=2,
                        prompt_logprobs=True)
    cut = len(prompt) // 2
    sequence.add_prompt_logprobs(prompt[:cut], logits[:cut], tokenizer)
    sequence.add_prompt_logprobs(prompt[cut:], logits[cut:], tokenizer)
    sequence.add_token(prompt[0], tokenizer, logits[-1])
    entries = sequence.take_event().prompt_logprobs
    assert [entry.token for entry in entries] == [tokenizer.token_bytes(t) for t in prompt]
    assert entries[0].logprob is None and entries[0].top is None
    assert all(entry.logprob > -1e-6 and len(entry.top) == 2 for entry in entries[1:])
    text = completion_logprobs([], prefix_length=0, prompt_entries=entries)
    assert text["token_logprobs"][0] is None and text["top_logprobs"][0] is None
    assert text["text_offset"] == [entry.offset for entry in entries]
    assert text["text_offset"][-1] == len(tokenizer.decode(prompt)) - 1  # before the "!"
