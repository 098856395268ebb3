"""The verifier's operations on the real default model (Q4_1) and its F16 copy."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from tests.conftest import make_target
from verifier.decode_batch import PromptChunk

CHAT = "<|im_start|>user\nWrite a short story about a robot who learns to paint.<|im_end|>\n" \
       "<|im_start|>assistant\n"


def prompt_tokens(target):
    return target.tokenizer.encode(CHAT)


def greedy_reference(target, prompt, num_tokens):
    """Plain one-token-at-a-time greedy decoding; returns the tokens after the prompt."""
    slot = target.acquire_slot()
    try:
        token = int(np.argmax(target.prefill(slot, prompt).last_logits))
        tokens = [token]
        for _ in range(num_tokens - 1):
            output = target.decode(slot, token)
            target.commit(slot, [0])
            token = int(np.argmax(output.logits[0]))
            tokens.append(token)
        return tokens
    finally:
        target.release_slot(slot)


def sequential_logits(target, prompt, path_tokens):
    """Logits after each token of `path_tokens`, decoded one at a time after the prompt."""
    slot = target.acquire_slot()
    try:
        target.prefill(slot, prompt)
        rows = []
        for token in path_tokens:
            rows.append(target.decode(slot, token).logits[0])
            target.commit(slot, [0])
        return np.stack(rows)
    finally:
        target.release_slot(slot)


def path_to(parents, node):
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def sample_tree(reference):
    """A tree rooted at reference[0]: the true continuation down one branch, other branches
    of plausible-but-wrong tokens, including a wrong branch that is the tree's first leaf."""
    r = reference
    tokens = [r[0], 1000, r[1], 2000, r[2], 3000, r[3], r[4], 4000, 5000]
    parents = [-1, 0, 0, 1, 2, 2, 4, 6, 6, 3]
    return tokens, parents


@pytest.mark.parametrize("model", ["f16", "q4"])
def test_tree_argmax_equals_sequential_decoding(model, f16_target, q4_target):
    target = f16_target if model == "f16" else q4_target
    prompt = prompt_tokens(target)
    reference = greedy_reference(target, prompt, 6)
    tokens, parents = sample_tree(reference)

    slot = target.acquire_slot()
    target.prefill(slot, prompt)
    tree = target.verify_tree(slot, tokens, parents)
    target.commit(slot, [0])
    target.release_slot(slot)
    assert tree.logits.shape == (len(tokens), target.vocab_size)
    assert tree.features.shape == (len(tokens), target.hidden_size)

    for node in range(len(tokens)):
        path_tokens = [tokens[i] for i in path_to(parents, node)]
        expected = sequential_logits(target, prompt, path_tokens)[-1]
        if model == "f16":
            assert int(np.argmax(tree.logits[node])) == int(np.argmax(expected)), node
            np.testing.assert_allclose(tree.logits[node], expected, atol=0.1)
        else:
            # Q4_1: batched and one-token kernels round differently (docs/how-it-works.md);
            # the argmax must agree wherever the top two are not a near-tie.
            top2 = np.sort(expected)[-2:]
            if top2[1] - top2[0] > 1.0:
                assert int(np.argmax(tree.logits[node])) == int(np.argmax(expected)), node
            assert np.abs(tree.logits[node] - expected).max() < 2.0


def output_weight(path):
    reader = gguf.GGUFReader(path)
    names = {tensor.name: tensor for tensor in reader.tensors}
    tensor = names.get("output.weight", names["token_embd.weight"])  # tied embeddings
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


@pytest.mark.parametrize("model,tolerance", [("f16", 0.05), ("q4", 0.6)])
def test_features_times_output_weight_are_the_logits(model, tolerance, f16_target, q4_target,
                                                     f16_model, default_model):
    target = f16_target if model == "f16" else q4_target
    weight = output_weight(f16_model if model == "f16" else default_model)  # [vocab, hidden]
    assert weight.shape == (target.vocab_size, target.hidden_size)
    slot = target.acquire_slot()
    prompt = prompt_tokens(target)
    prefill = target.prefill(slot, prompt)
    token = int(np.argmax(prefill.last_logits))
    step = target.decode(slot, token)
    target.commit(slot, [0])
    target.release_slot(slot)

    assert prefill.features.shape == (len(prompt), target.hidden_size)
    np.testing.assert_allclose(prefill.features[-1] @ weight.T, prefill.last_logits, atol=tolerance)
    np.testing.assert_allclose(step.features[0] @ weight.T, step.logits[0], atol=tolerance)
    assert int(np.argmax(step.features[0] @ weight.T)) == int(np.argmax(step.logits[0]))


def test_verify_commit_continue_equals_never_drafting(f16_target):
    """Draft trees around the true continuation, accept the longest greedy path, commit,
    continue: the tokens equal plain greedy decoding (F16: exactly)."""
    target = f16_target
    prompt = prompt_tokens(target)
    reference = greedy_reference(target, prompt, 60)

    slot = target.acquire_slot()
    root = int(np.argmax(target.prefill(slot, prompt).last_logits))
    produced = [root]
    rng = np.random.default_rng(0)
    step = 0
    while len(produced) < len(reference):
        step += 1
        # Up to 3 correct tokens on a branch that is not the first leaf, wrong siblings.
        upcoming = reference[len(produced): len(produced) + int(rng.integers(0, 4))]
        tokens, parents = [root, 17 + step], [-1, 0]
        for i, token in enumerate(upcoming):
            tokens.append(token)
            parents.append(0 if i == 0 else len(tokens) - 2)
            tokens.append(30000 + step)  # a wrong sibling
            parents.append(parents[-1])
        output = target.verify_tree(slot, tokens, parents)

        # greedy acceptance: follow children whose token is the argmax of the parent's row
        path = [0]
        while True:
            choice = int(np.argmax(output.logits[path[-1]]))
            children = [i for i, parent in enumerate(parents) if parent == path[-1]]
            child = next((i for i in children if tokens[i] == choice), None)
            if child is None:
                break
            path.append(child)
        target.commit(slot, path)
        bonus = int(np.argmax(output.logits[path[-1]]))
        produced += [tokens[i] for i in path[1:]] + [bonus]
        root = bonus

        positions = target.sequence_positions(slot)
        assert positions[0] == (0, len(prompt) + len(produced) - 2)
        assert all(pair == (-1, -1) for pair in positions[1:])
    target.release_slot(slot)
    assert produced[: len(reference)] == reference
    assert all(pair == (-1, -1) for pair in target.sequence_positions(slot))


def test_tree_validation_and_slot_bookkeeping(q4_target):
    target = q4_target
    slot = target.acquire_slot()
    with pytest.raises(RuntimeError):
        target.commit(slot, [0])  # nothing verified yet
    target.prefill(slot, prompt_tokens(target))
    with pytest.raises(ValueError):
        target.verify_tree(slot, [1, 2], [-1, 1])  # a node cannot be its own parent
    with pytest.raises(ValueError):
        target.verify_tree(slot, [1, 2], [0, -1])  # node 0 must be the root
    target.verify_tree(slot, [1, 2, 3], [-1, 0, 0])
    with pytest.raises(ValueError):
        target.commit(slot, [0, 2, 1])  # not a root-to-node path
    with pytest.raises(RuntimeError):
        target.verify_tree(slot, [1], [-1])  # commit must come first
    target.commit(slot, [0, 2])
    assert target.num_cached(slot) == len(prompt_tokens(target)) + 2
    free_before = target.num_free_slots
    target.release_slot(slot)
    assert target.num_free_slots == free_before + 1


def test_one_decode_for_several_slots_equals_each_slot_alone(f16_target):
    """`evaluate` verifies two slots' trees and reads a third slot's prompt in one decode;
    each part equals the same work done alone (F16), and the KV each slot keeps is right."""
    from verifier.decode_batch import PromptChunk, TreeRequest

    target = f16_target
    prompts = [target.tokenizer.encode(CHAT.replace("robot", animal))
               for animal in ("cat", "whale", "fox")]
    references = [greedy_reference(target, prompt, 6) for prompt in prompts[:2]]
    trees = [sample_tree(references[0]), ([references[1][0], references[1][1]], [-1, 0])]

    def run(batched: bool):
        slots = [target.acquire_slot() for _ in prompts]
        for slot, prompt in zip(slots[:2], prompts[:2], strict=True):
            target.prefill(slot, prompt)
        requests = [TreeRequest(slot, tokens, parents)
                    for slot, (tokens, parents) in zip(slots[:2], trees, strict=True)]
        chunk = PromptChunk(slots[2], prompts[2])
        if batched:
            tree_outputs, (chunk_output,) = target.evaluate(requests, [chunk])
        else:
            tree_outputs = [target.evaluate([request], [])[0][0] for request in requests]
            chunk_output = target.evaluate([], [chunk])[1][0]
        # accept the true branch of each tree, then one more token on every slot
        target.commit(slots[0], path_to(trees[0][1], 7))
        target.commit(slots[1], [0, 1])
        follow = [target.decode(slot, token).logits[0]
                  for slot, token in zip(slots, (references[0][5], references[1][2],
                                                  int(np.argmax(chunk_output.last_logits))),
                                         strict=True)]
        cached = [target.num_cached(slot) for slot in slots]
        for slot in slots:
            target.release_slot(slot)
        return tree_outputs, chunk_output, follow, cached

    alone, together = run(batched=False), run(batched=True)
    for a, b in zip(alone[0], together[0], strict=True):
        np.testing.assert_array_equal(a.logits.argmax(-1), b.logits.argmax(-1))
        np.testing.assert_allclose(a.logits, b.logits, atol=0.05)
        np.testing.assert_allclose(a.features, b.features, atol=0.01)
    assert alone[1].last_logits.argmax() == together[1].last_logits.argmax()
    np.testing.assert_allclose(alone[1].features, together[1].features, atol=0.01)
    for a, b in zip(alone[2], together[2], strict=True):
        assert a.argmax() == b.argmax()
        np.testing.assert_allclose(a, b, atol=0.05)
    assert alone[3] == together[3] == [len(prompts[0]) + 5, len(prompts[1]) + 2,
                                       len(prompts[2])]


def test_evaluate_refuses_bad_requests_before_touching_the_cache(q4_target):
    from verifier.decode_batch import PromptChunk, TreeRequest

    target = q4_target
    slots = [target.acquire_slot() for _ in range(2)]
    target.prefill(slots[0], prompt_tokens(target))
    before = target.sequence_positions(slots[0])
    with pytest.raises(ValueError, match="one request per slot"):
        target.evaluate([TreeRequest(slots[0], [1], [-1])], [PromptChunk(slots[0], [5])])
    with pytest.raises(ValueError):  # the second tree is malformed: nothing may happen
        target.evaluate([TreeRequest(slots[0], [1, 2, 3], [-1, 0, 0])],
                        [PromptChunk(slots[1], [])])
    assert target.sequence_positions(slots[0]) == before
    assert target.num_cached(slots[1]) == 0
    target.verify_tree(slots[0], [1, 2, 3], [-1, 0, 0])  # still usable: no pending tree
    target.commit(slots[0], [0])
    for slot in slots:
        target.release_slot(slot)


def test_a_target_without_features_decodes_the_same_tokens(f16_model, f16_target):
    """Plain decoding turns features off (prompts then output only their last token's
    logits): the logits and the greedy tokens stay those of the full target (F16)."""
    from tests.conftest import make_target

    plain = make_target(f16_model, num_slots=1, features=False)
    try:
        prompt = prompt_tokens(plain)
        assert greedy_reference(plain, prompt, 24) == greedy_reference(f16_target, prompt, 24)
        slot = plain.acquire_slot()
        output = plain.prefill(slot, prompt)
        assert output.features.size == 0
        tree = plain.verify_tree(slot, [int(np.argmax(output.last_logits)), 42], [-1, 0])
        assert tree.logits.shape == (2, plain.vocab_size) and tree.features.size == 0
        plain.release_slot(slot)
        full_slot = f16_target.acquire_slot()
        np.testing.assert_allclose(output.last_logits,
                                   f16_target.prefill(full_slot, prompt).last_logits, atol=0.05)
        f16_target.release_slot(full_slot)
    finally:
        plain.close()


def test_a_prompt_read_without_features_is_a_plain_targets_read(f16_model, f16_target):
    """A features target reads a prompt chunk that needs no features as a target without
    features does (llama.cpp's embeddings off for that decode: the last token's logits
    only), and the next decode has features again."""
    plain = make_target(f16_model, num_slots=1, features=False)
    try:
        prompt = prompt_tokens(plain)
        reference = plain.prefill(plain.acquire_slot(), prompt)
        slot = f16_target.acquire_slot()
        _, [chunk] = f16_target.evaluate([], [PromptChunk(slot, prompt, features=False)])
        assert chunk.features.shape == (1, 0)
        np.testing.assert_array_equal(chunk.last_logits, reference.last_logits)
        root = int(np.argmax(chunk.last_logits))
        tree = f16_target.verify_tree(slot, [root, 42], [-1, 0])
        assert tree.features.shape == (2, f16_target.hidden_size)
        f16_target.release_slot(slot)
        other = f16_target.acquire_slot()
        _, [full] = f16_target.evaluate([], [PromptChunk(other, prompt)])
        assert full.features.shape == (len(prompt), f16_target.hidden_size)
        f16_target.release_slot(other)
    finally:
        plain.close()


def test_a_kept_prefix_can_be_cut_shorter(f16_model):
    """truncate: keep less of a prefix acquire_slot kept (the engine does when its draft
    has not seen all of it); the cells after it go, and reading on from there gives what a
    fresh read gives."""
    from verifier.decode_batch import PromptChunk

    target = make_target(f16_model, num_slots=1, reuse_prefixes=True)
    try:
        prompt = prompt_tokens(target)
        slot = target.acquire_slot(prompt)
        target.prefill(slot, prompt)
        target.release_slot(slot)
        slot = target.acquire_slot(prompt)
        assert target.num_cached(slot) == len(prompt) - 2
        with pytest.raises(ValueError, match="cannot keep"):
            target.truncate(slot, len(prompt))
        target.truncate(slot, 5)
        assert target.num_cached(slot) == 5
        assert target.sequence_positions(slot)[0] == (0, 4)
        read = target.evaluate([], [PromptChunk(slot, prompt[5:])])[1][0]
        target.release_slot(slot)
        slot = target.acquire_slot()  # no prompt to share a prefix with: an empty slot
        fresh = target.prefill(slot, prompt)
        assert read.last_logits.argmax() == fresh.last_logits.argmax()
        np.testing.assert_allclose(read.last_logits, fresh.last_logits, atol=0.05)
        np.testing.assert_allclose(read.features, fresh.features[5:], atol=0.01)
    finally:
        target.close()

