"""Speculative decoding is exact: at T=0 it emits the target's own greedy tokens.

The target is an F16 copy of the default model. Drafts: a randomly initialised one
(acceptance near zero: every step rejects) and one briefly trained here on the target's own
greedy answers (most steps accept several tokens), each in chain and in tree mode, on the
CPU and, where present, CUDA.

Floating point: these targets verify whole trees, whose branches share one pool of KV
cells, so a token's attention adds up its cells in another order than plain decoding does
(docs/how-it-works.md, "Exactness"); F16 logits then differ from one-token decoding by up to
~0.03. Where the target's top two logits are closer than that, either token may win (seen in
these prompts: a gap of 0.007). So outputs must be token-identical, except that an output
may part from the plain one at a position where the plain decoding's top two logits were
within NEAR_TIE; and at least 20 outputs must be identical throughout. Sampled (T > 0,
seeded) outputs likewise: they may part only where the plain run's draw fell within
SAMPLED_NEAR_TIE of the edge of its token's stretch of the cumulative distribution. The
server's default (`--exact`: chains, a stream of cells per request) is bit-exact:
tests/test_exactness.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from draft_model.config import DraftConfig
from draft_model.device import default_dtype
from draft_model.model import DraftModel
from draft_model.target_weights import read_target_weights
from draft_model.training.train import Batch, TrainConfig, train_steps
from draft_model.training.vocab import most_frequent_tokens
from server.engine import Engine
from server.engine.sequence import Sequence
from server.speculation.budget import LookupBudget, TreeBudget
from server.speculation.choice import Mode, ProposerChoice
from server.speculation.draft_proposer import DraftProposer, TreeShape
from server.speculation.hybrid import HybridProposer
from server.speculation.ngram import NgramProposer
from server.speculation.shared_ngrams import SharedNgrams
from tests.conftest import NEAR_TIE, Reference, make_target, plain_greedy, prompt_tokens
from verifier import acceptance, sampling
from verifier.costs import VerifyCosts
from verifier.sampling import SamplingParams

PROMPTS = [
    ("Write a short story about a lighthouse keeper.", 256),
    ("Explain how a hash table works, step by step.", 256),
    ("def merge_sort(items):\n    \"\"\"Sort a list with merge sort.\"\"\"", 256),
    ("List ten animals that live in the ocean.", 256),
    ("What is the capital of Japan?", 64),
    ("Give me three tips for better sleep.", 64),
    ("Translate 'good morning' into French, Spanish and German.", 64),
    ("Écris un court poème sur la pluie.", 64),
    ("¿Cuál es el río más largo del mundo?", 64),
    ("写一句关于春天的话。", 64),
    ("Write a Python function that checks whether a number is prime.", 64),
    ("What are the planets of the solar system?", 64),
    ("Summarize the plot of Romeo and Juliet in two sentences.", 64),
    ("Write a SQL query that counts users per country.", 64),
    ("Name five programming languages and one use of each.", 64),
    ("How do I make a cup of tea?", 64),
    ("What is 15 multiplied by 7?", 64),
    ("Write a haiku about winter.", 64),
    ("Describe the color blue to someone who cannot see.", 64),
    ("class Stack:\n    def __init__(self):", 64),
    ("Why is the sky blue?", 64),
    ("Write a limerick about a cat.", 64),
    ("What does HTTP stand for?", 64),
    ("Give an example of a JSON object describing a book.", 64),
]

SAMPLED_NEAR_TIE = 0.002
CHAIN = TreeShape(top_k=1, depth=4, total_tokens=5)
TREE = TreeShape(top_k=3, depth=4, total_tokens=8)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def generate(engine, prompts, params=None):
    """Run each prompt alone through the engine (stepping it directly, no thread).

    Alone: sequences decoded side by side share the KV cache's cells, which changes the
    summation order inside attention and so the rounding (see the module docstring).
    """
    params = params or SamplingParams(temperature=0)
    sequences = []
    for text, max_new in prompts:
        sequence = Sequence(prompt_tokens(engine.target, text), params, max_new, [],
                            sink=lambda event: None)
        engine.submit(sequence)
        while not sequence.is_finished:
            engine.step()
        sequences.append(sequence)
    return sequences


@pytest.fixture(scope="module")
def target(f16_model):
    spec_target = make_target(f16_model, num_slots=2, max_tree_nodes=16, max_tree_branches=16)
    yield spec_target
    spec_target.close()


@pytest.fixture(scope="module")
def weights(f16_model):
    return read_target_weights(f16_model)


def matches(output: list[int], reference: Reference, text: str) -> bool:
    """True if identical; a divergence is only allowed at a near-tie of the plain decoding."""
    if output == reference.tokens:
        return True
    cut = next((i for i, (a, b) in enumerate(zip(output, reference.tokens, strict=False))
                if a != b), min(len(output), len(reference.tokens)))
    assert reference.gaps[cut] < NEAR_TIE, (
        f"{text!r}: diverged at token {cut} where the target's top-2 gap was "
        f"{reference.gaps[cut]:.4f}")
    return False


@pytest.fixture(scope="module")
def references(target):
    found = [plain_greedy(target, text, max_new) for text, max_new in PROMPTS]
    # the engine's plain mode is this same loop, token for token
    plain = generate(Engine(target), PROMPTS)
    assert [sequence.output_tokens for sequence in plain] == [r.tokens for r in found]
    return found


@pytest.fixture(scope="module")
def random_draft(weights):
    """Untrained, with a head over the first 8192 token ids (BPE ids run roughly from
    frequent to rare): on a CPU a full 49k-token head costs ~40 ms a level."""
    torch.manual_seed(0)
    head_ids = torch.arange(8192)
    config = DraftConfig.for_target(weights.info, num_layers=1, draft_vocab_size=len(head_ids))
    return DraftModel(config, torch.from_numpy(weights.embedding),
                      torch.from_numpy(weights.lm_head), head_token_ids=head_ids).eval()


@pytest.fixture(scope="module")
def trained_draft(weights, target, references):
    """A 1-layer draft with a reduced head, fitted for a few seconds to the target's greedy
    answers to PROMPTS (an overfit on purpose: the point is many accepted tokens)."""
    sequences = []
    counts = np.zeros(weights.info.vocab_size)
    for (text, _), reference in zip(PROMPTS, references, strict=True):
        prompt = prompt_tokens(target, text)
        tokens = prompt + reference.tokens
        slot = target.acquire_slot()
        features = target.prefill(slot, tokens).features
        target.release_slot(slot)
        mask = np.zeros(len(tokens), dtype=np.float32)
        mask[len(prompt):] = 1.0
        sequences.append(Batch(torch.from_numpy(features)[None], torch.tensor([tokens]),
                               torch.from_numpy(mask)[None]))
        np.add.at(counts, tokens, 1)
    head_ids = most_frequent_tokens(counts, int((counts > 0).sum()),
                                    always=tuple(target.tokenizer.end_of_generation_ids))
    torch.manual_seed(0)
    config = DraftConfig.for_target(weights.info, num_layers=1, draft_vocab_size=len(head_ids))
    model = DraftModel(config, torch.from_numpy(weights.embedding),
                       torch.from_numpy(weights.lm_head), head_token_ids=head_ids)

    def cycle():
        while True:
            yield from sequences

    losses = train_steps(model, cycle(), num_steps=400,
                         config=TrainConfig(learning_rate=1e-3, warmup_steps=20, noise=0.0,
                                            ce_weight=1.0))
    assert np.mean(losses[-20:]) < np.mean(losses[:20]) / 2
    return model.requires_grad_(False)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [CHAIN, TREE], ids=["chain", "tree"])
@pytest.mark.parametrize("draft_kind", ["random", "trained"])
def test_greedy_speculative_output_equals_plain_decoding(draft_kind, shape, device, target,
                                                         references, random_draft, trained_draft):
    draft = random_draft if draft_kind == "random" else trained_draft
    device = torch.device(device)
    proposer = DraftProposer(draft.to(device, default_dtype(device)), shape)
    sequences = generate(Engine(target, proposer), PROMPTS)
    draft.to("cpu", torch.float32)
    assert proposer.num_states == 1  # each request ran in the state the one before left

    identical = [matches(sequence.output_tokens, reference, text)
                 for (text, _), sequence, reference in zip(PROMPTS, sequences, references,
                                                           strict=True)]
    assert sum(identical) >= 20, f"only {sum(identical)} of {len(PROMPTS)} outputs identical"
    drafted = sum(sequence.num_drafted for sequence in sequences)
    accepted = sum(sequence.num_accepted for sequence in sequences)
    steps = sum(sequence.num_verify_steps for sequence in sequences)
    tau = sum(len(sequence.output_tokens) for sequence in sequences) / steps
    assert drafted > 0
    if draft_kind == "random":
        assert accepted / drafted < 0.05 and tau < 1.2
    else:
        # a chain of 4 keeps fewer of the overfit draft's tokens than the tree of 8
        floor = 1.8 if shape is TREE else 1.6
        assert tau > floor, f"trained draft accepted too little: tau {tau:.2f}"


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [CHAIN, TREE], ids=["chain", "tree"])
@pytest.mark.parametrize("draft_kind", ["random", "trained"])
def test_drafting_ahead_keeps_the_output_and_overlaps_verification(
        draft_kind, shape, device, target, references, random_draft, trained_draft):
    """The next trees grow on the draft's worker thread while the target verifies this one
    (server/speculation/draft_ahead.py). The output is still the target's; the engine's
    own timestamps put draft work inside verifications; a tree drafted below a guess that
    came true is used."""
    draft = random_draft if draft_kind == "random" else trained_draft
    device = torch.device(device)
    proposer = DraftProposer(draft.to(device, default_dtype(device)), shape, pipeline=True)
    engine = Engine(target, proposer)
    prompts = PROMPTS[4:16]
    sequences = generate(engine, prompts)
    draft.to("cpu", torch.float32)
    identical = [matches(sequence.output_tokens, reference, text)
                 for (text, _), sequence, reference in zip(prompts, sequences, references[4:16],
                                                           strict=True)]
    assert sum(identical) >= 10, f"only {sum(identical)} of {len(prompts)} outputs identical"
    counters = engine.counters
    assert counters.predrafts > 0
    assert 0 < counters.draft_hidden_seconds <= counters.verify_seconds
    assert counters.draft_hidden_seconds < counters.draft_seconds
    if draft_kind == "trained":
        assert counters.predrafts_used > 0
        tau = sum(len(s.output_tokens) for s in sequences) / sum(s.num_verify_steps
                                                                  for s in sequences)
        assert tau > (1.8 if shape is TREE else 1.6)


@pytest.mark.slow
def test_the_next_chat_turn_reuses_the_kept_prefix_with_a_draft(f16_model, target,
                                                                trained_draft):
    """With a draft model too, a chat's next turn reads only what is new: the target keeps
    the earlier turn's cells and the draft state its pairs and features. The answer is
    still the target's own."""
    reusing = make_target(f16_model, num_slots=2, max_tree_nodes=16, max_tree_branches=16,
                          reuse_prefixes=True)
    try:
        proposer = DraftProposer(trained_draft, TREE)
        engine = Engine(reusing, proposer)
        after_begin = []  # (pairs in the draft's cache, pairs pending) as begin leaves them
        begin = proposer.begin  # (the engine then launches a tree, which takes the pending)

        def recording_begin(state, *args):
            begin(state, *args)
            after_begin.append((state.num_committed, len(state.pending_tokens)))

        proposer.begin = recording_begin
        question = "Why is the sky blue?"
        [first] = generate(engine, [(question, 48)])
        messages = [{"role": "user", "content": question},
                    {"role": "assistant", "content": reusing.tokenizer.decode(
                        first.output_tokens)},
                    {"role": "user", "content": "And why is it red at sunset?"}]
        prompt = reusing.tokenizer.encode(reusing.chat_template.render(messages))
        second = Sequence(prompt, SamplingParams(temperature=0), 48, [],
                          sink=lambda event: None)
        engine.submit(second)
        engine.step()  # reads the prompt: all but the kept prefix
        kept_pairs, pending = after_begin[-1]
        assert kept_pairs >= len(first.prompt_tokens)  # the first turn's pairs stay
        assert pending == len(prompt) - kept_pairs
        while not second.is_finished:
            engine.step()
        proposer.by_key.clear()  # the draft forgot the slot: the target must read it all again
        third = Sequence(prompt, SamplingParams(temperature=0), 48, [],
                         sink=lambda event: None)
        engine.submit(third)
        engine.step()
        assert after_begin[-1] == (0, len(prompt))
        while not third.is_finished:
            engine.step()
    finally:
        reusing.close()
    assert proposer.num_states == 2
    reference = plain_greedy(target, prompt, 48)
    matches(second.output_tokens, reference, "the second turn")
    matches(third.output_tokens, reference, "the second turn, read again")


def sampled_plain(engine, prompts, params, monkeypatch):
    """Plain sampling, and for each output token how far its draw fell from the nearest
    edge of the token's stretch of the cumulative distribution."""
    margins, sample_at = [], sampling.sample_at

    def recording(probs, rng):
        uniform = rng.random()
        token = sample_at(probs, uniform)
        cdf = np.cumsum(probs) / probs.sum()
        margins[-1].append(min(uniform - (cdf[token - 1] if token else 0.0),
                               cdf[token] - uniform))
        return token

    monkeypatch.setattr(sampling, "sample_from", recording)
    monkeypatch.setattr(acceptance, "sample_from", recording)
    outputs = []
    for prompt in prompts:
        margins.append([])
        outputs.append(generate(engine, [prompt], params)[0].output_tokens)
    monkeypatch.undo()
    return outputs, margins


@pytest.mark.slow
def test_a_seed_gives_the_same_sampled_text_with_or_without_speculation(target, trained_draft,
                                                                        monkeypatch):
    """T > 0 with a seed: one draw per output token, whatever was drafted, so the draft's
    tree, prompt lookup under the adaptive budget (whose choices change as it learns) and
    plain decoding emit the same text — except where the target's batched logits (see the
    module docstring) move a token's edge across the draw: an output may part from the
    plain one only where the plain draw fell within SAMPLED_NEAR_TIE of an edge."""
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1234)
    prompts = PROMPTS[4:10]
    plain, margins = sampled_plain(Engine(target), prompts, params, monkeypatch)
    tree = Engine(target, DraftProposer(trained_draft, TREE))
    lookup = NgramProposer(max_tokens=7, shared=SharedNgrams())
    budgeted = Engine(target, lookup, budget=LookupBudget(FLAT_COSTS, 7))
    ahead = Engine(target, DraftProposer(trained_draft, TREE, pipeline=True))
    for engine in (tree, budgeted, tree, ahead):
        sequences = generate(engine, prompts, params)
        assert sum(sequence.num_accepted for sequence in sequences) > 10
        identical = 0
        for sequence, reference, margin in zip(sequences, plain, margins, strict=True):
            output = sequence.output_tokens
            if output == reference:
                identical += 1
                continue
            cut = next((i for i, (a, b) in enumerate(zip(output, reference, strict=False))
                        if a != b), min(len(output), len(reference)))
            assert margin[cut] < SAMPLED_NEAR_TIE, f"parted at token {cut}, draw {margin[cut]}"
        assert identical >= 2
    assert ahead.counters.predrafts > 0
    other = generate(tree, prompts, SamplingParams(temperature=0.8, top_p=0.95, seed=99))
    assert [sequence.output_tokens for sequence in other] != plain


@pytest.mark.slow
def test_quantized_target_diverges_only_at_near_ties(q4_target, trained_draft):
    """Q4_1: batched verification rounds differently from one-token decoding, so speculative
    and plain output may part where the target's top two logits nearly tie — nowhere else."""
    prompts = PROMPTS[4:14]
    plain = generate(Engine(q4_target), prompts)
    spec = generate(Engine(q4_target, DraftProposer(trained_draft, TREE)), prompts)
    num_identical = 0
    for (text, _), a, b in zip(prompts, plain, spec, strict=True):
        if a.output_tokens == b.output_tokens:
            num_identical += 1
            continue
        cut = next(i for i, (x, y) in enumerate(zip(a.output_tokens, b.output_tokens,
                                                      strict=False)) if x != y)
        slot = q4_target.acquire_slot()
        logits = q4_target.prefill(slot, prompt_tokens(q4_target, text)
                                   + a.output_tokens[:cut]).last_logits
        q4_target.release_slot(slot)
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] < 1.0, f"{text}: diverged at {cut} without a near-tie"
    assert num_identical >= len(prompts) // 2


class RecordingProposer(DraftProposer):
    """Keeps every tree it proposes, so a test can replay the same batches."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.trees = []

    def propose(self, state, root_token):
        tree = super().propose(state, root_token)
        self.trees.append(tree)
        return tree


def replay_greedy(target, prompt, trees, max_new):
    """An independent reference: evaluate exactly the recorded trees on a fresh slot and
    accept with a plain argmax walk; return the tokens that yields."""
    slot = target.acquire_slot()
    tokens = [int(np.argmax(target.prefill(slot, prompt).last_logits))]
    for tree in trees:
        assert tree.tokens[0] == tokens[-1]
        logits = target.verify_tree(slot, tree.tokens, tree.parents).logits
        path = [0]
        while True:
            choice = int(np.argmax(logits[path[-1]]))
            child = next((i for i, parent in enumerate(tree.parents)
                          if parent == path[-1] and tree.tokens[i] == choice), None)
            if child is None:
                break
            path.append(child)
        target.commit(slot, path)
        tokens += [tree.tokens[i] for i in path[1:]] + [choice]
    target.release_slot(slot)
    ends = [i for i, t in enumerate(tokens) if target.tokenizer.is_end_of_generation(t)]
    return tokens[: ends[0]] if ends else tokens[:max_new]


@pytest.mark.slow
def test_quantized_target_equals_a_reference_evaluating_the_same_batches(q4_target,
                                                                         trained_draft):
    """Q4_1: speculative output is exactly what the target's batched evaluation of the same
    trees says — the property llama.cpp's own speculative decoding has."""
    for text, max_new in PROMPTS[4:12]:
        proposer = RecordingProposer(trained_draft, TREE)
        sequence = generate(Engine(q4_target, proposer), [(text, max_new)])[0]
        assert sum(tree.num_drafted for tree in proposer.trees) > 0
        reference = replay_greedy(q4_target, prompt_tokens(q4_target, text), proposer.trees,
                                  max_new)
        assert sequence.output_tokens == reference, text


FLAT_COSTS = VerifyCosts({1: 1.0, 16: 1.1})  # a slow target: trees pay whatever drafting costs
COPY = ("Add type hints to this function:\ndef add_numbers(first_number, second_number):\n"
        "    total = first_number + second_number\n    return total", 64)


@pytest.mark.slow
@pytest.mark.parametrize("budgeted", [False, True], ids=["full-tree", "budget"])
def test_draft_tree_with_prompt_lookup_equals_plain_decoding(budgeted, target, references,
                                                             trained_draft, random_draft):
    def hybrid(draft):  # trees grown on the device (eagerly on a CPU), started as soon as a
        # step's tokens are committed
        return HybridProposer(DraftProposer(draft, TREE),
                              NgramProposer(max_tokens=TREE.total_tokens - 1))

    proposer = hybrid(trained_draft)
    budget = TreeBudget(FLAT_COSTS) if budgeted else None
    sequences = generate(Engine(target, proposer, budget=budget), PROMPTS)
    identical = [matches(sequence.output_tokens, reference, text)
                 for (text, _), sequence, reference in zip(PROMPTS, sequences, references,
                                                           strict=True)]
    assert sum(identical) >= 20, f"only {sum(identical)} of {len(PROMPTS)} outputs identical"
    steps = sum(sequence.num_verify_steps for sequence in sequences)
    assert sum(len(sequence.output_tokens) for sequence in sequences) / steps > 1.8
    assert any(rate != 0.5 for e in proposer.estimates.by_match.values() for rate in e.rates)

    # lookup finds what an untrained draft cannot: the code it is asked to copy
    reference = plain_greedy(target, *COPY)
    alone = generate(Engine(target, DraftProposer(random_draft, TREE)), [COPY])[0]
    helped = generate(Engine(target, hybrid(random_draft),
                             budget=TreeBudget(FLAT_COSTS) if budgeted else None), [COPY])[0]
    assert matches(helped.output_tokens, reference, COPY[0])
    assert helped.num_accepted > alone.num_accepted + 8


def test_requests_go_to_the_draft_or_to_lookup_alone_and_both_equal_plain_decoding(
        target, references, random_draft, monkeypatch):
    """Per request, the draft (prompt read with features) or lookup alone (prompt read
    without them, as plain decoding reads it): every output is the target's own."""
    lookup = NgramProposer(max_tokens=TREE.total_tokens - 1, shared=SharedNgrams())
    hybrid = HybridProposer(DraftProposer(random_draft, TREE), lookup)
    draft_mode = Mode("draft", hybrid, TreeBudget(FLAT_COSTS))
    lookup_mode = Mode("lookup", lookup, LookupBudget(FLAT_COSTS, TREE.total_tokens - 1))
    engine = Engine(target, hybrid, budget=draft_mode.budget,
                    choice=ProposerChoice([draft_mode, lookup_mode], explore=2))
    chunks_read = []
    evaluate = target.evaluate

    def recording(trees, chunks):
        chunks_read.extend(chunk.features for chunk in chunks)
        return evaluate(trees, chunks)

    monkeypatch.setattr(target, "evaluate", recording)
    # every 2nd request to the slower mode, however much slower: both modes take turns
    monkeypatch.setattr("server.speculation.choice.FAR", float("inf"))
    prompts = PROMPTS[4:10]
    sequences = generate(engine, prompts)
    modes = [sequence.mode.name for sequence in sequences]
    assert modes[:2] == ["draft", "lookup"] and len(set(modes[2:])) == 2
    assert chunks_read.count(False) == modes.count("lookup")  # one chunk per prompt here
    assert draft_mode.requests + lookup_mode.requests == len(prompts)
    for sequence, reference, (text, _) in zip(sequences, references[4:10], prompts,
                                              strict=True):
        assert matches(sequence.output_tokens, reference, text)
        assert sequence.num_accepted > 0 or sequence.mode is draft_mode


def test_logprobs_through_trees_are_the_plain_decodings(target, trained_draft):
    """Each token's logprob comes from the logits row of the tree node that chose it: the
    same numbers as plain decoding's, up to the batched kernels' rounding (a row off by one
    node would be off by whole units)."""
    def logprobs(engine):
        found = []
        for text, _ in PROMPTS[:6]:
            entries = []
            sequence = Sequence(prompt_tokens(target, text), SamplingParams(temperature=0), 64,
                                [], sink=lambda event, into=entries: into.extend(event.logprobs),
                                logprobs=2)
            engine.submit(sequence)
            while not sequence.is_finished:
                engine.step()
            assert len(entries) == len(sequence.output_tokens)
            found.append((sequence, entries))
        return found

    plain = logprobs(Engine(target))
    speculative = logprobs(Engine(target, DraftProposer(trained_draft, TREE)))
    assert sum(sequence.num_accepted for sequence, _ in speculative) > 50
    compared = 0
    for (spec, spec_entries), (base, base_entries) in zip(speculative, plain, strict=True):
        for token, base_token, entry, base_entry in zip(
                spec.output_tokens, base.output_tokens, spec_entries, base_entries, strict=False):
            if token != base_token:  # parted at a near-tie: the rest is another text
                break
            assert entry.token == target.tokenizer.token_bytes(token)
            assert entry.top[0] == (entry.token, entry.logprob)  # greedy: the most likely
            assert abs(entry.logprob - base_entry.logprob) < 0.05
            compared += 1
    assert compared > 200


def test_a_long_lookup_prompt_read_partly_beside_a_decoding_request_is_served(
        target, random_draft, monkeypatch):
    """A lookup-mode prompt longer than one batch: its chunks read beside another request's
    trees come back with features, those read alone without. The lookup needs none, so the
    mix must not fail the request, and its output is plain decoding's."""
    lookup = NgramProposer(max_tokens=TREE.total_tokens - 1)
    hybrid = HybridProposer(DraftProposer(random_draft, TREE), lookup)
    draft_mode = Mode("draft", hybrid, TreeBudget(FLAT_COSTS))
    lookup_mode = Mode("lookup", lookup, LookupBudget(FLAT_COSTS, TREE.total_tokens - 1))
    engine = Engine(target, hybrid, budget=draft_mode.budget,
                    choice=ProposerChoice([draft_mode, lookup_mode]))
    text = " ".join(f"item {n}: {n * n}," for n in range(70)) + " and the next one is"
    long_prompt = prompt_tokens(target, text)
    batch = target.config.batch_size
    assert batch < len(long_prompt) <= 2 * batch
    reference = plain_greedy(target, text, 16)
    read = []  # (beside trees, features' shape) of each of the long prompt's chunks
    evaluate = target.evaluate

    def recording(trees, chunks):
        tree_outputs, chunk_outputs = evaluate(trees, chunks)
        read.extend((bool(trees), output.features.shape)
                    for chunk, output in zip(chunks, chunk_outputs, strict=True)
                    if chunk.tokens in (long_prompt[:batch], long_prompt[batch:]))
        return tree_outputs, chunk_outputs

    monkeypatch.setattr(target, "evaluate", recording)
    picks = iter([draft_mode, lookup_mode])
    monkeypatch.setattr(engine.choice, "pick", lambda: next(picks))
    params = SamplingParams(temperature=0)
    short = Sequence(prompt_tokens(target, PROMPTS[4][0]), params, 2, [], sink=lambda e: None)
    long = Sequence(long_prompt, params, 16, [], sink=lambda e: None)
    engine.submit(short)  # to the draft
    engine.step()  # its prompt: it decodes from now on, for one step
    engine.submit(long)  # to lookup alone
    while not long.is_finished:
        engine.step()
    assert (short.mode, long.mode) == (draft_mode, lookup_mode)
    assert [beside for beside, _ in read] == [True, False]  # first chunk beside short's tree
    assert long.finish_reason == "length", long.take_event()
    assert long.output_tokens == reference.tokens
