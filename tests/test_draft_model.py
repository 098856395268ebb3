"""The DGF draft: fusion, cache equivalence, reduced vocabulary, strict checkpoints."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from draft_model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from draft_model.config import DraftConfig, TargetInfo
from draft_model.device import resolve_device
from draft_model.model import DraftModel, DynamicGatingFusion, KVCache
from draft_model.target_weights import TargetWeights
from draft_model.training.vocab import most_frequent_tokens, to_head_index
from server.speculation.device_growth import DeviceGrowth
from server.speculation.draft_proposer import DraftProposer, TreeShape
from tests.reference_growth import HostGrowthProposer

HIDDEN, VOCAB = 32, 50


def tiny_target(seed=0) -> TargetWeights:
    rng = np.random.default_rng(seed)
    info = TargetInfo("llama", HIDDEN, VOCAB, "abc123", 1e-5, 4, 2, 10000.0)
    embedding = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    return TargetWeights(info, embedding, embedding)


def tiny_model(num_layers=2, draft_vocab=0, seed=0, head_ids=None) -> DraftModel:
    torch.manual_seed(seed)
    target = tiny_target()
    config = DraftConfig.for_target(target.info, num_layers=num_layers, intermediate_size=64,
                                    draft_vocab_size=draft_vocab)
    return DraftModel(config, torch.from_numpy(target.embedding),
                      torch.from_numpy(target.lm_head), head_token_ids=head_ids).eval()


def test_dgf_is_a_per_dimension_gate_between_feature_and_embedding():
    torch.manual_seed(0)
    fusion = DynamicGatingFusion(HIDDEN, 1e-5)
    bound = math.sqrt(6 / (HIDDEN + HIDDEN))
    assert fusion.w1.weight.abs().max() <= bound and fusion.w1.weight.abs().max() > bound / 2
    assert fusion.w1.bias is None and fusion.wz.weight.shape == (HIDDEN, 2 * HIDDEN)
    feature, embedding = torch.randn(2, 3, HIDDEN), torch.randn(2, 3, HIDDEN)
    h1 = fusion.w1(feature)
    h2 = torch.nn.functional.silu(fusion.w2(fusion.embed_norm(embedding)))
    gate = torch.sigmoid(fusion.wz(torch.cat((h1, h2), -1)))
    torch.testing.assert_close(fusion(feature, embedding), gate * h1 + (1 - gate) * h2)
    assert gate.std(dim=-1).min() > 0  # a vector gate, not a scalar
    other = torch.sigmoid(fusion.wz(torch.cat((fusion.w1(feature * 2), h2), -1)))
    assert not torch.allclose(gate, other)  # input-dependent


def test_layer_zero_has_no_input_norm():
    model = tiny_model(num_layers=3)
    assert isinstance(model.layers[0].input_norm, torch.nn.Identity)
    assert all(not isinstance(layer.input_norm, torch.nn.Identity) for layer in model.layers[1:])
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fusion", "layers"}


@torch.no_grad()
def test_incremental_decoding_equals_a_full_forward():
    model = tiny_model()
    length = 12
    features = torch.randn(1, length, HIDDEN)
    tokens = torch.randint(0, VOCAB, (1, length))
    positions = torch.arange(length)[None]
    full = model(features, tokens, positions)

    cache = KVCache.allocate(model.config, 32, torch.device("cpu"), torch.float32)
    pieces, start = [], 0
    for size in (5, 1, 1, 5):
        slots = torch.arange(start, start + size)
        mask = torch.ones(size, start + size, dtype=torch.bool)
        mask[:, start:] = torch.tril(mask[:, start:])
        pieces.append(model(features[:, start:start + size], tokens[:, start:start + size],
                            slots[None], cache, slots, mask))
        start += size
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_tree_masked_branches_equal_their_own_full_forwards():
    """Two sibling branches written to the cache side by side, each masked to its own path,
    give the same outputs as running each path alone."""
    model = tiny_model()
    prefix = 6
    features = torch.randn(1, prefix + 2, HIDDEN)
    tokens = torch.randint(0, VOCAB, (1, prefix + 2))
    cache = KVCache.allocate(model.config, 32, torch.device("cpu"), torch.float32)
    slots = torch.arange(prefix)
    model(features[:, :prefix], tokens[:, :prefix], slots[None], cache, slots,
          torch.tril(torch.ones(prefix, prefix, dtype=torch.bool)))
    # branch A: pair at position `prefix` in slot 6; branch B: a different token in slot 7
    branch_tokens = torch.tensor([[tokens[0, prefix], (tokens[0, prefix] + 1) % VOCAB]])
    branch_features = features[:, prefix:prefix + 1].expand(1, 2, HIDDEN)
    mask = torch.zeros(2, prefix + 2, dtype=torch.bool)
    mask[:, :prefix] = True
    mask[0, prefix] = mask[1, prefix + 1] = True
    out = model(branch_features, branch_tokens, torch.tensor([[prefix, prefix]]), cache,
                torch.tensor([prefix, prefix + 1]), mask)
    for branch in range(2):
        alone_tokens = torch.cat((tokens[:, :prefix], branch_tokens[:, branch:branch + 1]), 1)
        alone = model(features[:, :prefix + 1], alone_tokens, torch.arange(prefix + 1)[None])
        torch.testing.assert_close(out[0, branch], alone[0, -1], atol=1e-5, rtol=1e-5)


def test_reduced_vocabulary_maps_head_indices_to_target_ids():
    counts = np.zeros(VOCAB)
    counts[[3, 7, 11, 20, 42]] = [50, 40, 30, 20, 10]
    head_ids = most_frequent_tokens(counts, 4, always=(49,))
    assert head_ids.tolist() == [3, 7, 11, 49]
    index = to_head_index(head_ids, VOCAB)
    assert index[7] == 1 and index[42] == -1
    full, reduced = tiny_model(), tiny_model(draft_vocab=4, head_ids=head_ids)
    hidden = torch.randn(5, HIDDEN)
    torch.testing.assert_close(reduced.head_logits(hidden), full.head_logits(hidden)[:, head_ids])
    proposer = DraftProposer(reduced, TreeShape(top_k=3, depth=2, total_tokens=5))
    state = proposer.new_state(capacity=32)
    proposer.begin(state, [1, 2, 3], np.random.default_rng(0).standard_normal((3, HIDDEN))
                   .astype(np.float32), root_token=4)
    tree = proposer.propose(state, root_token=4)
    assert set(tree.tokens[1:]) <= set(head_ids.tolist())
    with pytest.raises(ValueError):
        tiny_model(draft_vocab=4)  # a reduced head needs its ids


def proposer_for(device_growth: bool, model: DraftModel, shape: TreeShape) -> DraftProposer:
    """The serving proposer, or the host-driven reference growth (tests/reference_growth.py)."""
    return DraftProposer(model, shape) if device_growth else HostGrowthProposer(model, shape)


def assert_same_trees(expected: list, actual: list) -> None:
    for a, b in zip(expected, actual, strict=True):
        assert (a.tokens, a.parents) == (b.tokens, b.parents)


def grow_trees(proposer: DraftProposer, steps: int, seed: int = 0, launch: bool = False,
               skip: tuple[int, ...] = (), depths: tuple[int, ...] = ()) -> list:
    """Trees of `steps` draft → commit rounds over random features, accepting each tree's
    first path down to depth 2 (so the catch-up and the scratch slots move every round).
    launch: start each tree right after the commit before it, as the engine does; steps in
    skip commit a plain step (just the bonus token) without asking for a tree, as when the
    budget chooses plain decoding; depths: the budget's growth depth for step i is
    depths[i % len(depths)]."""
    rng = np.random.default_rng(seed)
    state = proposer.new_state(capacity=80)
    proposer.begin(state, [1, 2, 3, 4], rng.standard_normal((4, HIDDEN)).astype(np.float32), 5)
    trees, _ = run_steps(proposer, state, 5, steps, rng, launch, skip, depths)
    proposer.release(state)  # as the engine does when the sequence ends
    return trees


def run_steps(proposer: DraftProposer, state, root: int, steps: int, rng, launch: bool = False,
              skip: tuple[int, ...] = (), depths: tuple[int, ...] = ()) -> tuple[list, int]:
    """grow_trees' rounds on a begun state: (the trees, the last bonus token)."""
    trees = []
    for step in range(steps):
        levels = depths[step % len(depths)] if depths else None
        if launch:
            proposer.launch(state, levels)
        path = [0]
        if step not in skip:
            tree = proposer.propose(state, root, levels=levels)
            trees.append(tree)
            while len(path) < 3 and (children := [i for i, p in enumerate(tree.parents)
                                                  if p == path[-1]]):
                path.append(children[0])
        accepted = [tree.tokens[i] for i in path[1:]]
        root = int(rng.integers(VOCAB))  # the bonus token
        proposer.commit(state, rng.standard_normal((len(path), HIDDEN)).astype(np.float32),
                        [*accepted, root])
    if launch:  # the engine starts a tree after every commit, the last one too
        proposer.launch(state)
    return trees, root


@pytest.mark.parametrize("shape", [TreeShape(top_k=4, depth=5, total_tokens=12),
                                   TreeShape(top_k=1, depth=6, total_tokens=7),
                                   TreeShape(top_k=3, depth=1, total_tokens=4)],
                         ids=["tree", "chain", "one-level"])
def test_device_growth_grows_the_same_trees_as_host_growth(shape):
    """The fixed-shape growth (a CUDA graph on a GPU) must propose exactly what the
    host-driven level loop proposes: same candidates, same frontier, same cache slots —
    also when each tree is started early (right after the commit) and when started trees
    go unused on plain steps."""
    model = tiny_model(num_layers=2)
    host = grow_trees(HostGrowthProposer(model, shape), steps=6)
    device = grow_trees(DraftProposer(model, shape), steps=6)
    early = grow_trees(DraftProposer(model, shape), steps=6, launch=True)
    assert len({tuple(t.tokens) for t in host}) > 1  # the trees do change step to step
    for a, b, c in zip(host, device, early, strict=True):
        assert (a.tokens, a.parents, a.depths) == (b.tokens, b.parents, b.depths) \
            == (c.tokens, c.parents, c.depths)
        np.testing.assert_allclose(a.draft_probs, b.draft_probs, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(a.draft_probs, c.draft_probs, rtol=1e-4, atol=1e-6)
    skip = (1, 2, 4)
    host = grow_trees(HostGrowthProposer(model, shape), steps=8, skip=skip)
    early = grow_trees(DraftProposer(model, shape), steps=8, launch=True,
                       skip=skip)
    assert_same_trees(host, early)


def test_a_growth_depth_from_the_budget_grows_fewer_levels_alike_on_host_and_device():
    """The budget may ask for fewer levels than the shape's (it verifies no deeper nodes
    lately): both growths then stop there, with the same trees, also when the depth
    changes from step to step and trees are started early."""
    shape = TreeShape(top_k=3, depth=5, total_tokens=10)
    model = tiny_model(num_layers=2)
    depths = (2, 1, 5, 3, 9)  # 9: more than the shape's, which stays the limit
    host = grow_trees(HostGrowthProposer(model, shape), steps=10, depths=depths)
    device = grow_trees(DraftProposer(model, shape), steps=10, launch=True,
                        skip=(4,), depths=depths)
    host_skipping = grow_trees(HostGrowthProposer(model, shape), steps=10,
                               skip=(4,), depths=depths)
    reached = [max(tree.depths) for tree in host]
    assert reached[:2] == [2, 1] and reached[3] == 3
    assert all(depth <= min(limit, 5) for depth, limit in zip(reached, depths * 2, strict=True))
    assert max(reached) > 3  # deeper where allowed
    assert_same_trees(host_skipping, device)


def test_device_growth_takes_a_backlog_eagerly_but_its_last_pairs():
    """The device growth's own catch-up takes at most total_tokens pairs (padded to that
    many rows); a longer backlog — a prompt, or pairs left by steps without a tree — goes
    in eagerly first. Same trees as the host loop either way, and the padding rows'
    scratch writes must not leak into later trees."""
    shape = TreeShape(top_k=2, depth=3, total_tokens=4)
    model = tiny_model(num_layers=2)

    def trees(device_growth: bool) -> list:
        proposer = proposer_for(device_growth, model, shape)
        rng = np.random.default_rng(3)
        state = proposer.new_state(capacity=80)
        prompt = [int(token) for token in rng.integers(VOCAB, size=11)]
        proposer.begin(state, prompt, rng.standard_normal((11, HIDDEN)).astype(np.float32), 5)
        assert len(state.pending_tokens) > proposer._max_pending == 4
        grown, _ = run_steps(proposer, state, 5, steps=9, rng=rng, launch=device_growth,
                             skip=(2, 3, 4, 6))  # three plain steps: a backlog of 5 pairs
        return grown

    host, device = trees(device_growth=False), trees(device_growth=True)
    assert len({tuple(tree.tokens) for tree in host}) > 1
    assert_same_trees(host, device)


def test_near_the_end_of_its_cache_the_draft_stops_growing_trees_alike_on_host_and_device():
    """Without room for a tree's scratch slots (and, on the device, the padded catch-up)
    the accepted pairs still go in and the tree is the root alone — at the same steps."""
    shape = TreeShape(top_k=2, depth=3, total_tokens=5)
    model = tiny_model(num_layers=2)

    def trees(device_growth: bool) -> tuple[list, int]:
        proposer = proposer_for(device_growth, model, shape)
        rng = np.random.default_rng(5)
        state = proposer.new_state(capacity=24)
        proposer.begin(state, [1, 2, 3, 4], rng.standard_normal((4, HIDDEN)).astype(np.float32),
                       5)
        grown, _ = run_steps(proposer, state, 5, steps=12, rng=rng, launch=device_growth)
        proposer.propose(state, 5)  # the last pairs go in too
        return grown, state.num_committed

    (host, host_committed), (device, device_committed) = trees(False), trees(True)
    sizes = [len(tree.tokens) for tree in host]
    assert sizes[0] > 1 and sizes[-1] == 1  # trees, then none once the cache is nearly full
    assert_same_trees(host, device)
    assert host_committed == device_committed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_growth_equals_eager_growth():
    shape = TreeShape(top_k=4, depth=5, total_tokens=12)
    model = tiny_model(num_layers=2).cuda()
    graphed = grow_trees(DraftProposer(model, shape), steps=8, launch=True,
                         skip=(2, 3))
    host = grow_trees(HostGrowthProposer(model, shape), steps=8, skip=(2, 3))
    assert_same_trees(host, graphed)


@pytest.mark.parametrize("device_growth", [False, True], ids=["host", "device"])
def test_a_released_state_serves_the_next_sequence_like_a_new_one(device_growth):
    """Engines reuse a finished sequence's state (its cache, its growth's buffers and CUDA
    graph): what the last sequence left in the cache must not change the next one's trees."""
    shape = TreeShape(top_k=4, depth=5, total_tokens=12)
    model = tiny_model(num_layers=2)
    proposer = proposer_for(device_growth, model, shape)
    grow_trees(proposer, steps=8, seed=0, launch=device_growth, skip=(3,))
    used = proposer.released[-1]
    again = grow_trees(proposer, steps=8, seed=1, launch=device_growth, skip=(3,))
    assert proposer.released == [used]  # the second sequence ran in the first one's state
    assert proposer.new_state(capacity=80) is used
    assert proposer.new_state(capacity=81) is not used  # too small for this one
    fresh = grow_trees(proposer_for(device_growth, model, shape), steps=8, seed=1,
                       launch=device_growth, skip=(3,))
    assert_same_trees(fresh, again)


@pytest.mark.parametrize("device_growth", [False, True], ids=["host", "device"])
def test_a_prompt_prefix_the_slot_has_seen_is_not_given_again(device_growth):
    """A chat's next turn lands in the slot of the turn before, whose tokens start its
    prompt; the target keeps that prefix and reads the rest. The draft then gets only the
    read tokens' features: its state knows the prefix's, and its trees are those a new state
    grows from the whole prompt."""
    shape = TreeShape(top_k=4, depth=5, total_tokens=12)
    model = tiny_model(num_layers=2)
    proposer = proposer_for(device_growth, model, shape)
    rng = np.random.default_rng(0)
    first = proposer.new_state(capacity=80, key=3)
    proposer.begin(first, [1, 2, 3, 4, 5, 6], rng.standard_normal((6, HIDDEN)).astype(np.float32),
                   7)
    run_steps(proposer, first, 7, 4, rng, launch=device_growth)
    proposer.release(first, key=3)
    seen = list(first.seen_tokens)
    assert len(seen) > 6 and first.seen_features.shape[1] == HIDDEN
    prompt = [*seen[:-1], 9, 10, 11]  # the last verified token differs: 3 new ones
    kept = len(seen) - 1
    assert proposer.reusable(3, prompt, kept=len(prompt) - 2) == kept  # what it has seen
    assert proposer.reusable(3, prompt, kept=4) == 4
    assert proposer.reusable(2, prompt, kept=4) == 0  # another slot's
    read = rng.standard_normal((len(prompt) - kept, HIDDEN)).astype(np.float32)
    every = np.concatenate((first.seen_features[:kept], read))

    again = proposer.new_state(capacity=80, key=3)
    assert again is first and proposer.num_states == 1
    proposer.begin(again, prompt, read, 12)
    trees, _ = run_steps(proposer, again, 12, 6, np.random.default_rng(1), launch=device_growth)
    fresh = proposer_for(device_growth, model, shape)
    state = fresh.new_state(capacity=80)
    fresh.begin(state, prompt, every, 12)
    expected, _ = run_steps(fresh, state, 12, 6, np.random.default_rng(1), launch=device_growth)
    assert_same_trees(expected, trees)

    other = proposer.new_state(capacity=80, key=5)  # a slot it has not seen
    with pytest.raises(ValueError, match="has not seen"):
        proposer.begin(other, prompt, read, 12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_warm_up_captures_the_graphs_that_sequences_then_replay():
    shape = TreeShape(top_k=4, depth=5, total_tokens=12)
    model = tiny_model(num_layers=2).cuda()
    proposer = DraftProposer(model, shape)
    proposer.warm_up(2, capacity=80)
    graphs = [dict(state.growth.graphs) for state in proposer.released]
    assert [sorted(captured) for captured in graphs] == [[1, 2, 3, 4, 5]] * 2  # every depth
    graphed = grow_trees(proposer, steps=8, launch=True, skip=(2, 3))
    assert [state.growth.graphs for state in proposer.released] == graphs[::-1]  # replayed
    host = grow_trees(HostGrowthProposer(model, shape), steps=8, skip=(2, 3))
    assert_same_trees(host, graphed)
    hinted = grow_trees(proposer, steps=8, launch=True, skip=(2, 3), depths=(2, 5, 1, 3))
    host = grow_trees(HostGrowthProposer(model, shape), steps=8, skip=(2, 3),
                      depths=(2, 5, 1, 3))
    assert_same_trees(host, hinted)
    assert [state.growth.graphs for state in proposer.released] == graphs  # no new captures


def test_a_failed_graph_capture_falls_back_to_eager_growth_once(monkeypatch, caplog):
    """A capture this PyTorch or driver refuses costs launches, not the server: the tree is
    grown eagerly, and later sequences do not try again (simulated on the CPU: the growth
    is told to capture and the capture raises, as CUDA's does)."""
    captures = []

    def refuse(growth, levels):
        captures.append(growth)
        raise RuntimeError("operation not permitted when stream is capturing")

    make_growth = DeviceGrowth.__init__

    def wants_graph(growth, *args, use_graph, **kwargs):
        make_growth(growth, *args, use_graph=use_graph, **kwargs)
        growth.use_graph = use_graph

    monkeypatch.setattr(DeviceGrowth, "_capture", refuse)
    monkeypatch.setattr(DeviceGrowth, "__init__", wants_graph)
    shape = TreeShape(top_k=4, depth=5, total_tokens=12)
    model = tiny_model(num_layers=2)
    proposer = DraftProposer(model, shape)
    with caplog.at_level(logging.WARNING, logger="dovetail.draft"):
        first = grow_trees(proposer, steps=4, launch=True, skip=(2,))
        second = grow_trees(proposer, steps=4, launch=True, skip=(2,))  # a new sequence
    assert len(captures) == 1 and not proposer.use_graph
    assert "growing trees eagerly" in caplog.text
    host = grow_trees(HostGrowthProposer(model, shape), steps=4, skip=(2,))
    for a, b, c in zip(host, first, second, strict=True):
        assert (a.tokens, a.parents) == (b.tokens, b.parents) == (c.tokens, c.parents)


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model(draft_vocab=4, head_ids=torch.tensor([1, 2, 3, 4]))
    save_checkpoint(model, tiny_target().info, tmp_path / "draft", training={"steps": 3})
    loaded = load_checkpoint(tmp_path / "draft", tiny_target())
    for name, tensor in model.state_dict().items():  # stored in half precision
        expected = tensor.half().float() if tensor.is_floating_point() else tensor
        torch.testing.assert_close(loaded.state_dict()[name], expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_loading_refuses_a_different_target(tmp_path):
    save_checkpoint(tiny_model(), tiny_target().info, tmp_path / "draft")
    other = tiny_target()
    other = TargetWeights(TargetInfo("llama", HIDDEN, VOCAB, "different", 1e-5, 4, 2, 1e4),
                          other.embedding, other.lm_head)
    with pytest.raises(CheckpointError, match="tokenizer_fingerprint"):
        load_checkpoint(tmp_path / "draft", other)


def test_loading_refuses_missing_unexpected_and_misshaped_weights(tmp_path):
    directory = save_checkpoint(tiny_model(), tiny_target().info, tmp_path / "draft")
    weights = directory / "model.safetensors"
    original = load_file(str(weights))

    state = dict(original)
    del state["fusion.wz.weight"]
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"missing \['fusion.wz.weight'\]"):
        load_checkpoint(directory, tiny_target())

    state = dict(original, extra=torch.zeros(1))
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"unexpected \['extra'\]"):
        load_checkpoint(directory, tiny_target())

    state = dict(original)
    state["fusion.w1.weight"] = torch.zeros(HIDDEN, HIDDEN + 1)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_checkpoint(directory, tiny_target())

    config = json.loads((directory / "config.json").read_text())
    config["draft"]["num_layerz"] = 2
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="num_layerz"):
        load_checkpoint(directory, tiny_target())
    with pytest.raises(CheckpointError, match="not a draft checkpoint"):
        load_checkpoint(tmp_path, tiny_target())


def test_device_selection():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")
