"""Training pipeline, fast parts: data reading, masks, batching, loss, trainer, replay."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from draft_model.config import DraftConfig
from draft_model.model import DraftModel
from draft_model.training.evaluate import AcceptanceStats, accepted_length, replay
from draft_model.training.sequences import SequenceSet, chat_tokens_with_mask, padded_batches
from draft_model.training.sharegpt import (
    asks_for_code,
    default_sharegpt_path,
    fit_prompt,
    is_held_out,
    iter_conversations,
    iter_records,
    prompts_of,
    to_messages,
)
from draft_model.training.train import Batch, TrainConfig, draft_loss
from draft_model.training.trainer import RunLimits, Trainer
from server.speculation.tree import DraftTree
from tests.test_draft_model import tiny_model, tiny_target


def test_the_packaged_truncated_sharegpt_file_is_read_to_its_last_complete_record():
    path = default_sharegpt_path()
    with pytest.raises(json.JSONDecodeError):
        json.loads(path.read_text())  # really cut off
    records = list(iter_records(path))
    assert len(records) == 17671  # the whole records before the cut
    assert all("conversations" in record for record in records)
    held_out = sum(1 for _ in iter_conversations(path, "heldout"))
    train = sum(1 for _ in iter_conversations(path, "train"))
    assert 0 < held_out < train and held_out / (held_out + train) < 0.04


def test_reading_stops_quietly_inside_a_cut_off_object(tmp_path):
    whole = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"q{i}"},
                                                {"from": "gpt", "value": f"a{i}"}]}
             for i in range(3)]
    text = json.dumps(whole, indent=2)
    cut = text[:text.index('"c2"') + 10]  # inside the third record
    (tmp_path / "cut.json").write_text(cut)
    assert [r["id"] for r in iter_records(tmp_path / "cut.json")] == ["c0", "c1"]


def test_messages_start_with_a_prompt_and_end_with_an_answer():
    record = {"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "q"},
                                {"from": "gpt", "value": "a"}, {"from": "human", "value": "q2"}]}
    assert to_messages(record) == [{"role": "user", "content": "q"},
                                   {"role": "assistant", "content": "a"}]
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": "???", "value": "x"}]}
    assert to_messages(record) == []


def test_the_held_out_split_is_fixed():
    assert [is_held_out(f"id{i}", 2) for i in range(200)] == \
        [is_held_out(f"id{i}", 2) for i in range(200)]
    assert 0 < sum(is_held_out(f"id{i}", 10) for i in range(1000)) < 200


def render(messages, add_generation_prompt):
    """A tiny chat template (one character per token with `encode`)."""
    text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
    return text + ("<assistant>" if add_generation_prompt else "")


def encode(text):
    return [ord(c) for c in text]


def decode(tokens):
    return "".join(map(chr, tokens))


CONVERSATION = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]


def test_prompts_are_the_first_user_turn_or_every_user_turn_with_its_history():
    assert prompts_of(CONVERSATION) == [CONVERSATION[:1]]
    assert prompts_of(CONVERSATION, "all") == [CONVERSATION[:1], CONVERSATION[:3]]
    system = [{"role": "system", "content": "s"}, *CONVERSATION]
    assert prompts_of(system, "all") == [system[:2], system[:4]]
    with pytest.raises(ValueError):
        prompts_of(CONVERSATION, "last")


def test_code_prompts_are_told_from_other_prompts_by_their_first_user_turn():
    def user(text):
        return [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]

    for text in ("Write a Python function that reverses a string.",
                 "why does this fail?\n```\nx = [1, 2\n```", "fix: def add(a, b) return a",
                 "how to check if var is string in javascript", "What does foo() return?"):
        assert asks_for_code(user(text)), text
    for text in ("Write a haiku about the sea.", "a comedy script about a cat",
                 "There are 30 buses in the first class.", "List three colours."):
        assert not asks_for_code(user(text)), text
    # the first user turn decides, not a later one
    assert not asks_for_code([*user("Hello!"), *user("Now in Python, please.")])
    assert asks_for_code([{"role": "system", "content": "Be brief."},
                          *user("Sort a list in Rust.")])


def test_a_long_prompt_still_ends_asking_for_the_answer():
    question = "START " + "x" * 500 + " END?"
    tokens = fit_prompt([{"role": "user", "content": question}], render, encode, 100)
    text = decode(tokens)
    assert 90 <= len(tokens) <= 100
    assert text.startswith("<user>START ") and text.endswith(" END?</><assistant>")
    assert "\n…\n" in text
    # short prompts are left as they are
    short = [{"role": "user", "content": "hi"}]
    assert fit_prompt(short, render, encode, 100) == encode(render(short, True))


def test_a_long_conversation_loses_its_oldest_exchanges_first():
    system = {"role": "system", "content": "sys"}
    turns = [system, *CONVERSATION, {"role": "user", "content": "q3 " + "y" * 40}]
    whole = len(encode(render(turns, True)))
    text = decode(fit_prompt(turns, render, encode, whole - 1))
    assert text == render([system, *CONVERSATION[2:], turns[-1]], True)  # q1/a1 went
    text = decode(fit_prompt(turns, render, encode, len(render([system, turns[-1]], True))))
    assert text == render([system, turns[-1]], True)  # everything but system and last turn
    # then the last message is shortened; a system message alone over the limit cannot fit
    limit = len(render([system, {"role": "user", "content": ""}], True)) + 20
    text = decode(fit_prompt(turns, render, encode, limit))
    assert len(text) <= limit and text.startswith("<system>sys</><user>q3 ")
    assert text.endswith("y</><assistant>")
    assert fit_prompt([{"role": "system", "content": "s" * 50}, turns[-1]], render, encode,
                      30) is None


def test_a_long_conversation_keeps_as_many_recent_exchanges_as_fit():
    turns = []
    for i in range(9):
        turns += [{"role": "user", "content": f"q{i}" * (i + 1)},
                  {"role": "assistant", "content": f"a{i}" * (9 - i)}]
    turns.append({"role": "user", "content": "last"})
    for limit in range(len(render(turns[-1:], True)), len(render(turns, True)) + 1):
        kept = next(turns[start:] for start in range(0, len(turns), 2)
                    if len(render(turns[start:], True)) <= limit)  # the longest tail that fits
        assert decode(fit_prompt(turns, render, encode, limit)) == render(kept, True)


def test_mask_covers_exactly_the_assistant_turns():
    messages = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "xyz"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "uv"}]
    tokens, mask = chat_tokens_with_mask(messages, render, encode, 1000)
    assert "".join(map(chr, tokens)) == render(messages, False)
    trained = "".join(chr(t) for t, m in zip(tokens, mask, strict=True) if m)
    assert trained == "xyz</>uv</>"
    short, short_mask = chat_tokens_with_mask(messages, render, encode, 12)
    assert short == tokens[:12] and short_mask == mask[:12]


def test_sequence_sets_round_trip_and_batch_every_trained_sequence_once(tmp_path):
    rng = np.random.default_rng(0)
    lists = []
    for _ in range(40):
        length = int(rng.integers(2, 60))
        lists.append((rng.integers(0, 49152, length).tolist(),
                      (rng.random(length) < 0.6).astype(int).tolist()))
    sequences = SequenceSet.from_lists(lists)
    sequences.save(tmp_path / "s.npz")
    loaded = SequenceSet.load(tmp_path / "s.npz")
    assert len(loaded) == 40 and all(
        a.tolist() == b[0] and m.tolist() == b[1] for (a, m), b in zip(loaded, lists, strict=True))
    seen = []
    for group, tokens, mask in padded_batches(loaded, 256, 50, np.random.default_rng(1)):
        assert tokens.shape == mask.shape and tokens.shape[1] <= 50
        assert tokens.size <= 256 or len(group) == 1
        for row, index in enumerate(group):
            length = min(len(lists[index][0]), 50)
            assert tokens[row, :length].tolist() == lists[index][0][:length]
            assert not mask[row, length:].any()  # padding is never trained
        seen.extend(group)
    learnable = [i for i, (t, m) in enumerate(lists) if any(m[1:50])]
    assert sorted(seen) == learnable
    # several sets train as one: every sequence of each, in order
    halves = SequenceSet.concatenate([SequenceSet.from_lists(lists[:15]),
                                      SequenceSet.from_lists(lists[15:])])
    assert [(t.tolist(), m.tolist()) for t, m in halves] == [tuple(x) for x in lists]
    assert halves.num_trained_tokens == loaded.num_trained_tokens


def synthetic_batch(batch=2, length=9, seed=0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, length, 32, generator=generator)
    tokens = torch.randint(0, 50, (batch, length), generator=generator)
    return Batch(features, tokens, torch.ones(batch, length, dtype=torch.uint8))


def test_the_loss_pairs_feature_t_and_token_t_plus_1_with_the_mask_of_t_plus_1():
    model = tiny_model(num_layers=1)
    batch = synthetic_batch()
    config = TrainConfig(noise=0.0)
    k = 5
    mask = torch.zeros_like(batch.loss_mask)
    mask[:, k] = 1
    loss = draft_loss(model, Batch(batch.features, batch.tokens, mask), config).loss
    positions = torch.arange(8).expand(2, -1)
    predicted = model(batch.features[:, :-1], batch.tokens[:, 1:], positions)
    pair = k - 1  # input (f_{k-1}, x_k) predicts f_k, which scores x_{k+1}
    feature = torch.nn.functional.smooth_l1_loss(predicted[:, pair], batch.features[:, k],
                                                 reduction="none").mean(-1)
    target_probs = torch.softmax(model.head_logits(batch.features[:, k]), -1)
    ce = -(target_probs * torch.log_softmax(model.head_logits(predicted[:, pair]), -1)).sum(-1)
    torch.testing.assert_close(loss, (feature + 0.1 * ce).mean())
    # the prediction at the masked pair may not look at later positions
    later = batch.features.clone()
    later[:, k + 1:] += 5.0
    again = draft_loss(model, Batch(later, batch.tokens, mask), config).loss
    torch.testing.assert_close(loss, again)


def test_the_loss_falls_on_a_tiny_synthetic_batch(tmp_path):
    model = tiny_model(num_layers=1).train()
    batch = synthetic_batch(batch=4, length=12)
    trainer = Trainer(model, TrainConfig(learning_rate=3e-3, warmup_steps=5, noise=0.0),
                      tmp_path, seed=0)
    first = float(draft_loss(model, batch, trainer.config).loss.detach())
    trainer.run(iter(lambda: batch, None), RunLimits(max_steps=60))
    last = float(draft_loss(model, batch, trainer.config).loss.detach())
    assert last < 0.5 * first
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 60 and log[0]["step"] == 10


def test_the_trainer_resumes_where_it_stopped(tmp_path):
    batch = synthetic_batch()
    model = tiny_model(num_layers=1).train()
    trainer = Trainer(model, TrainConfig(noise=0.1), tmp_path, seed=3)
    trainer.run(iter(lambda: batch, None), RunLimits(max_steps=4))
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    fresh = tiny_model(num_layers=1, seed=9).train()
    resumed = Trainer(fresh, TrainConfig(noise=0.1), tmp_path, seed=3)
    assert resumed.resume() and resumed.step == 4 and resumed.tokens_seen == trainer.tokens_seen
    for name, tensor in fresh.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)
    # both continue identically: same optimiser moments, same noise generator
    trainer.run(iter(lambda: batch, None), RunLimits(max_steps=6))
    resumed.run(iter(lambda: batch, None), RunLimits(max_steps=6))
    for name, tensor in fresh.state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[name])


def test_the_learning_rate_warms_up_then_decays_to_a_tenth(tmp_path):
    trainer = Trainer(tiny_model(num_layers=1), TrainConfig(learning_rate=1.0, warmup_steps=10),
                      tmp_path, seed=0)
    assert trainer.learning_rate(0.0) == pytest.approx(0.1)
    trainer.step = 50
    assert trainer.learning_rate(0.0) == pytest.approx(1.0)
    assert trainer.learning_rate(1.0) == pytest.approx(0.1)


def test_accepted_length_follows_the_known_continuation():
    # root → 5 → 6 → 7 and root → 8
    tree = DraftTree(tokens=[1, 5, 8, 6, 7], parents=[-1, 0, 0, 1, 3], depths=[0, 1, 1, 2, 3],
                     draft_probs=[1.0] * 5)
    assert accepted_length(tree, np.array([5, 6, 7, 9])) == (3, [1, 3, 4])
    assert accepted_length(tree, np.array([5, 6, 2])) == (2, [1, 3])
    assert accepted_length(tree, np.array([8, 6])) == (1, [2])
    assert accepted_length(tree, np.array([3])) == (0, [])


def test_acceptance_stats_per_position():
    stats = AcceptanceStats()
    for accepted in (0, 2, 3, 1):
        stats.add(accepted)
    assert stats.tau == pytest.approx((1 + 3 + 4 + 2) / 4)
    assert stats.per_position() == pytest.approx([3 / 4, 2 / 3, 1 / 2])


class OracleProposer:
    """Proposes the true continuation as a chain of `depth` tokens (to test the replay)."""

    def __init__(self, tokens, depth):
        self.tokens, self.depth = list(tokens), depth

    def new_state(self, capacity):
        return {"committed": 0}

    def begin(self, state, prompt_tokens, prompt_features, root_token):
        state["committed"] = len(prompt_tokens) + 1

    def commit(self, state, path_features, next_tokens):
        assert len(path_features) == len(next_tokens)
        state["committed"] += len(next_tokens)

    def propose(self, state, root_token):
        root = state["committed"] - 1
        assert self.tokens[root] == root_token
        chain = self.tokens[root + 1:root + 1 + self.depth]
        count = len(chain)
        return DraftTree([root_token, *chain], list(range(-1, count)), list(range(count + 1)),
                         [1.0] * (count + 1))


def test_replay_counts_every_answer_token_once():
    tokens = np.arange(100, 140)
    features = np.zeros((40, 4), np.float32)
    stats = replay(OracleProposer(tokens, depth=3), tokens, features, answer_start=10)
    assert stats.tokens == 40 - 1 - 10  # every answer token after the first root
    assert stats.tau == pytest.approx(stats.tokens / stats.steps) and stats.tau > 3.5
    capped = replay(OracleProposer(tokens, depth=3), tokens, features, 10, max_new_tokens=9)
    assert capped.tokens == 8


def test_replay_with_a_real_draft_commits_consistently():
    from server.speculation.draft_proposer import DraftProposer, TreeShape

    model = tiny_model(num_layers=1)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, 30)
    features = rng.standard_normal((30, 32)).astype(np.float32)
    for shape in (TreeShape(1, 4, 5), TreeShape(3, 3, 8)):
        stats = replay(DraftProposer(model, shape), tokens, features, answer_start=12)
        assert stats.tokens == 30 - 1 - 12 and stats.steps >= stats.tokens / shape.total_tokens


def test_fusion_choice_is_part_of_the_config():
    info = tiny_target().info
    concat = DraftConfig.for_target(info, num_layers=1, intermediate_size=64, fusion="concat")
    model = DraftModel(concat, torch.from_numpy(tiny_target().embedding),
                       torch.from_numpy(tiny_target().lm_head))
    assert model.fusion.fc.weight.shape == (32, 64)
    assert DraftConfig.from_dict(concat.to_dict()) == concat
    with pytest.raises(ValueError):
        DraftConfig.for_target(info, fusion="sum")


def test_the_training_plot_is_written(tmp_path):
    import subprocess
    import sys

    log = tmp_path / "run" / "train_log.jsonl"
    log.parent.mkdir()
    records = [{"step": s, "tokens": 1000 * s, "loss": 2.0 / s, "top1": s / 40}
               for s in range(10, 40, 10)]
    records.append({"step": 30, "tokens": 30000, "eval": {"humaneval_chain": {"tau": 1.4}}})
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "curve.png"
    subprocess.run([sys.executable, "scripts/plot_training.py", str(log), "--out", str(out)],
                   check=True, capture_output=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
