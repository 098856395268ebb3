"""The engine's scheduling on the real target, stepped directly (no thread, no HTTP):
prompts read in chunks beside running streams, deadlines, shutdown drain, cancellation."""

from __future__ import annotations

import time

import pytest

from server.engine import Engine
from server.engine.sequence import Sequence
from server.speculation.ngram import NgramProposer
from tests.conftest import make_target
from verifier.sampling import SamplingParams

CHUNK = 16


@pytest.fixture(scope="module")
def target(f16_model):
    small_chunks = make_target(f16_model, num_slots=2, batch_size=CHUNK, max_tree_nodes=1,
                               max_tree_branches=1)
    yield small_chunks
    small_chunks.close()


def sequence(target, text, max_new=12, deadline=None):
    events = []
    tokens = target.tokenizer.encode(
        target.chat_template.render([{"role": "user", "content": text}]))
    made = Sequence(tokens, SamplingParams(temperature=0), max_new, [], sink=events.append,
                    deadline=deadline)
    made.events = events
    return made


def run_alone(target, text, max_new=12):
    engine = Engine(target)
    alone = sequence(target, text, max_new)
    engine.submit(alone)
    while not alone.is_finished:
        engine.step()
    return alone.output_tokens


LONG = "Summarise this: " + "The river rose after three days of rain, and the town " * 4


def test_a_long_prompt_is_read_in_chunks_while_a_stream_keeps_decoding(target):
    engine = Engine(target)
    short = sequence(target, "Write a long poem about colours.", max_new=40)
    engine.submit(short)
    while not short.output_tokens:
        engine.step()
    long = sequence(target, LONG)
    assert len(long.prompt_tokens) > 3 * CHUNK
    engine.submit(long)
    reads = []
    while not long.output_tokens:
        produced = len(short.output_tokens)
        engine.step()
        assert len(short.output_tokens) == produced + 1 or short.is_finished  # never stalled
        reads.append(long.num_prompt_read)
    assert reads == [min(CHUNK * (i + 1), len(long.prompt_tokens)) for i in range(len(reads))]
    while not (long.is_finished and short.is_finished):
        engine.step()
    assert long.output_tokens == run_alone(target, LONG)
    assert short.output_tokens == run_alone(target, "Write a long poem about colours.", max_new=40)
    assert target.num_free_slots == 2


def test_prompts_are_read_oldest_first_within_one_chunk_per_step(target):
    engine = Engine(target)
    first, second = sequence(target, LONG), sequence(target, "Hi")
    engine.submit(first)
    engine.submit(second)
    engine.step()
    assert first.num_prompt_read == CHUNK and second.num_prompt_read == 0
    while first.num_prompt_read < len(first.prompt_tokens):
        engine.step()
    engine.step()
    assert second.num_prompt_read > 0
    for item in (first, second):
        engine.cancel(item)
    engine.step()
    assert target.num_free_slots == 2


def test_deadlines_refuse_the_waiting_and_end_the_running(target):
    engine = Engine(target)
    running = [sequence(target, "Tell me a story.", max_new=200) for _ in range(2)]
    for item in running:
        engine.submit(item)
    late = sequence(target, "Hello", deadline=time.monotonic() - 1)
    engine.submit(late)
    engine.step()
    assert late.finish_reason == "rejected" and late.slot is None
    assert late.events[-1].finish_reason == "rejected"
    assert late.events[-1].usage.completion_tokens == 0
    while len(running[0].output_tokens) < 3:
        engine.step()
    running[0].deadline = time.monotonic() - 1
    engine.step()
    assert running[0].finish_reason == "timeout"
    assert running[0].events[-1].usage.completion_tokens == len(running[0].output_tokens) >= 3
    assert not running[1].is_finished
    engine.cancel(running[1])
    engine.step()
    assert running[1].finish_reason == "cancelled"
    assert target.num_free_slots == 2 and target.kv_cells()[0] == 0


def test_drain_refuses_the_queue_and_gives_running_requests_their_grace(target):
    engine = Engine(target)
    items = [sequence(target, f"Story {i}:", max_new=200) for i in range(3)]
    for item in items:
        engine.submit(item)
    engine.step()
    assert engine.num_active == 2 and engine.num_waiting == 1
    engine.drain(grace_seconds=60)
    engine.step()
    assert items[2].finish_reason == "rejected"
    assert engine.is_draining and not items[0].is_finished and not items[1].is_finished
    engine._drain_deadline = time.monotonic() - 1  # the grace is over
    engine.step()
    assert [item.finish_reason for item in items[:2]] == ["timeout", "timeout"]
    assert target.num_free_slots == 2 and engine.num_active == 0


def test_a_kept_prompt_prefix_is_reused_and_changes_nothing(f16_model, target):
    reusing = make_target(f16_model, num_slots=2, max_tree_nodes=1, max_tree_branches=1,
                          features=False, reuse_prefixes=True)
    try:
        engine = Engine(reusing)
        first = sequence(reusing, "Write a haiku about the sea.")
        engine.submit(first)
        while not first.is_finished:
            engine.step()
        used, kept = reusing.kv_cells()  # the last token emitted never entered the KV
        assert used == 0
        assert kept == len(first.prompt_tokens) + len(first.output_tokens) - \
            (first.finish_reason == "length")
        second = sequence(reusing, "Write a haiku about the moon.")
        shared = next(i for i, (a, b) in enumerate(zip(first.prompt_tokens,
                                                       second.prompt_tokens, strict=False))
                      if a != b)
        engine.submit(second)
        engine.step()
        assert reusing.num_cached(second.slot) >= shared  # only the rest was read
        while not second.is_finished:
            engine.step()
        same = sequence(reusing, "Write a haiku about the sea.")  # all but two tokens kept
        engine.submit(same)
        engine.step()
        assert same.num_verify_steps == 1 and reusing.num_cached(same.slot) == \
            len(same.prompt_tokens)
        assert reusing.kv_cells()[0] == len(same.prompt_tokens)
        while not same.is_finished:
            engine.step()
    finally:
        reusing.close()
    assert second.output_tokens == run_alone(target, "Write a haiku about the moon.")
    assert same.output_tokens == first.output_tokens == \
        run_alone(target, "Write a haiku about the sea.")


class StartWatch(NgramProposer):
    """Prompt lookup (proposing nothing) that notes what its sequence had streamed when the
    proposer took the prompt in."""

    def __init__(self) -> None:
        super().__init__(max_tokens=0)
        self.events: list = []
        self.streamed_at_begin: list[list] = []

    def begin(self, state, prompt_tokens, prompt_features, root_token) -> None:
        self.streamed_at_begin.append(list(self.events))
        super().begin(state, prompt_tokens, prompt_features, root_token)


def test_the_first_token_is_streamed_before_the_proposer_takes_the_prompt_in(target):
    """A draft's start on the prompt (its catch-up on every prompt feature) must not hold
    the first token back; a request that ends with it gets its last event once."""
    proposer = StartWatch()
    engine = Engine(target, proposer)
    item = sequence(target, "Name a colour.", max_new=4)
    proposer.events = item.events
    engine.submit(item)
    while not item.output_tokens:  # the prompt is read CHUNK tokens per step
        engine.step()
    [streamed] = proposer.streamed_at_begin
    assert [event.text for event in streamed] == [item.events[0].text] and streamed[0].text
    assert streamed[0].finish_reason is None
    while not item.is_finished:
        engine.step()
    assert item.output_tokens == run_alone(target, "Name a colour.", max_new=4)

    one = sequence(target, "Name a colour.", max_new=1)
    proposer.events = one.events
    engine.submit(one)
    while not one.output_tokens:
        engine.step()
    assert one.is_finished and [event.finish_reason for event in one.events] == ["length"]
    assert proposer.streamed_at_begin[-1] == []
    assert target.num_free_slots == 2


def test_tau_counts_the_step_that_chose_the_ending_eos(target):
    """Plain decoding is one token per target pass, also for a reply that ends on EOS."""
    engine = Engine(target)
    for first_choice in (False, True):
        tokens = sequence(target, "Name a colour.").prompt_tokens
        bias = {target.tokenizer.eos_id: 100.0} if first_choice else {}
        item = Sequence(tokens, SamplingParams(temperature=0, logit_bias=bias), 64, [],
                        sink=lambda event: None)
        engine.submit(item)
        while not item.is_finished:
            engine.step()
        usage = item.take_event().usage
        assert item.finish_reason == "stop" and usage.completion_tokens == (
            0 if first_choice else len(item.output_tokens))
        assert usage.speculative_dict()["mean_accepted_length"] == 1.0
