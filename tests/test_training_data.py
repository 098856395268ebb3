"""Training data from the real default target: the PyTorch port, feature collection,
the training and evaluation scripts, and the shipped draft."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import draft_model.training.torch_target as torch_target_module
from draft_model.checkpoint import load_checkpoint, read_checkpoint_config
from draft_model.shipped import SHIPPED_DRAFT
from draft_model.target_weights import read_target_weights
from draft_model.training.features import FeatureShard, load_split, shard_paths
from draft_model.training.sequences import SequenceSet
from draft_model.training.torch_target import TorchFeatureSource, TorchTarget
from server.engine import Engine
from server.engine.sequence import Sequence
from server.speculation.draft_proposer import DraftProposer, TreeShape
from tests.conftest import NUM_THREADS, make_target
from verifier.sampling import SamplingParams

PROMPTS = ["Write a Python function that reverses a string.",
           "What is the capital of France? Answer in one sentence.",
           "List three colours."]


@pytest.fixture(scope="module")
def torch_target(default_model):
    return TorchTarget.load(default_model)


def chat_tokens(target, text):
    return target.tokenizer.encode(target.chat_template.render([{"role": "user",
                                                                  "content": text}]))


def greedy_llama(target, prompt, count):
    slot = target.acquire_slot()
    try:
        logits, tokens = target.prefill(slot, prompt).last_logits, []
        for _ in range(count):
            tokens.append(int(np.argmax(logits)))
            logits = target.decode(slot, tokens[-1]).logits[0]
            target.commit(slot, [0])
    finally:
        target.release_slot(slot)
    return tokens


def test_the_pytorch_port_computes_the_targets_features(q4_target, torch_target):
    prompt = chat_tokens(q4_target, PROMPTS[0])
    slot = q4_target.acquire_slot()
    try:
        expected = q4_target.prefill(slot, prompt).features
    finally:
        q4_target.release_slot(slot)
    features = torch_target.forward(torch.tensor([prompt]))[0].numpy()
    cosine = (features * expected).sum(-1) / np.linalg.norm(features, axis=-1) \
        / np.linalg.norm(expected, axis=-1)
    assert cosine.min() > 0.99 and np.median(cosine) > 0.998
    assert torch_target.generate_greedy([prompt], 24, set())[0] == greedy_llama(q4_target,
                                                                                 prompt, 24)


def test_grouped_cache_attention_equals_sdpa_with_enable_gqa():
    """The port's cached attention (a KV head serves its query heads' rows together) is
    SDPA's own GQA arithmetic, for one new token and for several."""
    from draft_model.training.torch_target import _grouped_attention

    torch.manual_seed(0)
    for length in (1, 5):
        q = torch.randn(3, 9, length, 16)
        keys, values = torch.randn(3, 3, 12, 16), torch.randn(3, 3, 12, 16)
        mask = torch.rand(3, length, 12) > 0.3
        mask[..., 0] = True  # every row sees something
        expected = torch.nn.functional.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask[:, None], enable_gqa=True)
        torch.testing.assert_close(_grouped_attention(q, keys, values, mask, 3), expected)


def test_batched_left_padded_generation_equals_generating_alone(q4_target, torch_target):
    prompts = [chat_tokens(q4_target, text) for text in PROMPTS]
    assert len({len(p) for p in prompts}) > 1  # really padded
    stop = {q4_target.tokenizer.encode("<|im_end|>")[0]}
    together = torch_target.generate_greedy(prompts, 40, stop)
    alone = [torch_target.generate_greedy([p], 40, stop)[0] for p in prompts]
    assert together == alone
    assert any(len(answer) < 40 and answer[-1] in stop for answer in together)


def test_a_time_limit_keeps_the_batches_answered_in_time(q4_target, torch_target, monkeypatch):
    prompts = [chat_tokens(q4_target, text) for text in PROMPTS * 2]
    stop = {q4_target.tokenizer.encode("<|im_end|>")[0]}
    width = max(map(len, prompts)) + 8
    source = TorchFeatureSource(torch_target, batch_tokens=2 * width)  # 2 prompts a batch
    everything = source.generate(prompts, 8, stop)
    assert source.generate(prompts, 8, stop, max_seconds=1e6) == everything
    clock = itertools.count()  # each reading of the clock is one second later
    monkeypatch.setattr(torch_target_module, "perf_counter", lambda: next(clock))
    limited = source.generate(prompts, 8, stop, max_seconds=2.5)
    answered = [i for i, answer in enumerate(limited) if answer is not None]
    assert len(answered) == 4  # batches start at 1 s and 2 s, not at 3 s
    assert all(limited[i] == everything[i] for i in answered)


def test_collection_refuses_a_time_limit_it_cannot_keep(tmp_path):
    result = subprocess.run([sys.executable, "scripts/collect_features.py", "--out",
                             str(tmp_path), "--max-minutes", "1"], capture_output=True, text=True)
    assert result.returncode == 2 and "--tokens-only" in result.stderr


def write_sharegpt(path, count=4):
    records = [{"id": f"conv{i}", "conversations": [
        {"from": "human", "value": PROMPTS[i % len(PROMPTS)]},
        {"from": "gpt", "value": f"Answer number {i}: " + "here it is. " * (i + 1)},
        {"from": "human", "value": "Thanks, and once more?"},
        {"from": "gpt", "value": "Sure."}]} for i in range(count)]
    text = json.dumps(records)
    path.write_text(text[:-40])  # cut off like the packaged file: the last record is lost
    return records[:-1]


def run_script(*args, timeout=900):
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    root = tmp_path_factory.mktemp("collect")
    write_sharegpt(root / "sharegpt.json")
    common = ["--sharegpt", str(root / "sharegpt.json"), "--heldout-percent", "34",
              "--threads", str(NUM_THREADS), "--shard-size", "1"]
    run_script("scripts/collect_features.py", "--out", str(root / "sharegpt"), *common)
    run_script("scripts/collect_features.py", "--out", str(root / "distil"), "--source",
               "self-distill", "--max-new-tokens", "12", *common)
    run_script("scripts/collect_features.py", "--out", str(root / "prompts"), "--prompts-only",
               "--turns", "all", *common)
    return root


def test_shards_hold_tokens_masks_and_the_targets_features(collected, q4_target):
    paths = shard_paths(collected / "sharegpt", "train") + shard_paths(collected / "sharegpt",
                                                                       "heldout")
    assert len(paths) == 3  # three complete conversations, one per shard
    for path in paths:
        shard = FeatureShard.load(path)
        tokens, mask = shard.sequences[0]
        assert shard.features.dtype == np.float16
        assert shard.features.shape == (len(tokens), 576)
        assert tokens.dtype == np.int32 and mask.dtype == np.uint8
        # mask: the two assistant turns, nothing of the prompts
        trained = [int(t) for t, m in zip(tokens, mask, strict=True) if m]
        text = q4_target.tokenizer.decode(trained)
        assert text.startswith("Answer number") and "Sure." in text and "Thanks" not in text
        end_of_turn = q4_target.tokenizer.encode("<|im_end|>")[0]
        assert trained.count(end_of_turn) == 2  # each answer's end is learnt too
        # row t is the feature of token t (llama.cpp, teacher-forced)
        slot = q4_target.acquire_slot()
        try:
            expected = q4_target.prefill(slot, tokens.tolist()).features
        finally:
            q4_target.release_slot(slot)
        np.testing.assert_allclose(shard.features.astype(np.float32), expected, atol=0.02,
                                   rtol=0.01)


def test_self_distilled_shards_hold_the_targets_greedy_answers(collected, q4_target):
    shard = load_split(collected / "distil", "train")
    for tokens, mask in shard.sequences:
        start = int(np.argmax(mask))
        assert mask[start:].all() and not mask[:start].any()
        prompt, answer = tokens[:start].tolist(), tokens[start:].tolist()
        assert len(answer) <= 12
        assert answer == greedy_llama(q4_target, prompt, len(answer))
    assert shard.features.shape[0] == shard.sequences.tokens.shape[0]


def test_prompts_of_every_user_turn_carry_the_conversation_before_them(collected, q4_target):
    records = write_sharegpt(collected / "again.json")
    prompts = ["".join(q4_target.tokenizer.token_text(int(t)) for t in tokens)
               for split in ("train", "heldout")
               for tokens, _ in SequenceSet.load(collected / "prompts" / f"{split}.npz")]
    assert len(prompts) == 2 * len(records)  # two user turns each
    assert all(p.endswith("<|im_start|>assistant\n") for p in prompts)
    later = [p for p in prompts if "Thanks, and once more?" in p]
    assert len(later) == len(records)
    assert all("Answer number" in p and p.index("Answer number") < p.index("Thanks") for p in later)


def test_topic_code_keeps_only_the_conversations_that_ask_for_code(collected, tmp_path):
    def prompt_count(*flags):
        out = tmp_path / "_".join(flags or ("any",))
        run_script("scripts/collect_features.py", "--out", str(out), "--prompts-only",
                   "--sharegpt", str(collected / "sharegpt.json"), "--heldout-percent", "0",
                   "--threads", str(NUM_THREADS), *flags)
        return len(SequenceSet.load(out / "train.npz"))

    # three complete conversations; only the first asks for code (PROMPTS[0])
    assert (prompt_count(), prompt_count("--topic", "code")) == (3, 1)


def test_collection_resumes_by_skipping_written_shards(collected):
    directory = collected / "sharegpt"
    paths = shard_paths(directory, "train")
    stamps = {path: path.stat().st_mtime_ns for path in paths}
    removed = paths[0]
    content = FeatureShard.load(removed)
    removed.unlink()
    run_script("scripts/collect_features.py", "--out", str(directory), "--sharegpt",
               str(collected / "sharegpt.json"), "--heldout-percent", "34", "--threads",
               str(NUM_THREADS), "--shard-size", "1")
    assert all(path.stat().st_mtime_ns == stamps[path] for path in paths[1:])
    again = FeatureShard.load(removed)
    assert np.array_equal(again.sequences.tokens, content.sequences.tokens)
    np.testing.assert_allclose(again.features, content.features, atol=1e-3)


def test_train_and_evaluate_scripts_end_to_end(collected, default_model):
    out = collected / "run"
    run_script("scripts/train_draft.py", "--out", str(out), "--features",
               str(collected / "distil"), "--eval-prompts", str(collected / "prompts"),
               "--eval-heldout", "1", "--eval-humaneval", "1", "--eval-new-tokens", "8",
               "--layers", "1", "--draft-vocab", "256", "--max-steps", "3", "--device", "cpu",
               "--threads", str(NUM_THREADS), "--batch-tokens", "512",
               "--eval-shapes", "chain,tree,tree+lookup")
    config, _, training = read_checkpoint_config(out / "draft")
    assert config.num_layers == 1 and config.draft_vocab_size == 256
    assert training["steps"] == 3
    model = load_checkpoint(out / "draft", read_target_weights(default_model))
    assert model.head_token_ids.shape == (256,)
    results = json.loads((out / "eval.json").read_text())
    assert set(results) == {f"{name}_{shape}" for name in ("heldout", "humaneval")
                            for shape in ("chain", "tree", "tree+lookup")}
    assert all(r["tau"] >= 1.0 and r["tokens"] == 7 for r in results.values())
    # an existing checkpoint evaluated alone, without training
    alone = collected / "evaluated"
    run_script("scripts/train_draft.py", "--out", str(alone), "--evaluate-only",
               str(out / "draft"), "--eval-prompts", str(collected / "prompts"),
               "--eval-heldout", "0", "--eval-humaneval", "1", "--eval-new-tokens", "8",
               "--eval-shapes", "tree,tree+lookup", "--device", "cpu", "--threads",
               str(NUM_THREADS))
    evaluated = json.loads((alone / "eval.json").read_text())
    assert set(evaluated) == {"humaneval_tree", "humaneval_tree+lookup"}
    assert all(r["tau"] >= 1.0 and r["tokens"] == 7 for r in evaluated.values())
    assert not (alone / "draft").exists()
    # the real-engine evaluation runs this checkpoint against plain decoding
    report = collected / "eval_draft.json"
    run_script("scripts/eval_draft.py", "--draft", str(out / "draft"), "--count", "1",
               "--max-tokens", "8", "--shapes", "chain=1,2,3", "tree=2,2,4", "--draft-device",
               "cpu", "--threads", str(NUM_THREADS), "--lookup", "also", "--out", str(report))
    engine_results = json.loads(report.read_text())["results"]
    assert set(engine_results) == {"plain", "chain", "tree", "chain+lookup", "tree+lookup"}
    assert engine_results["plain"]["tau"] == 1.0
    assert all(r["completion_tokens"] == 8 and r["tau"] >= 1.0
               for r in engine_results.values())
    assert report.with_suffix(".md").read_text().startswith("| mode | τ |")
    # resuming a finished run adds nothing
    run_script("scripts/train_draft.py", "--out", str(out), "--features",
               str(collected / "distil"), "--layers", "1", "--draft-vocab", "256",
               "--max-steps", "3", "--device", "cpu", "--batch-tokens", "512")
    assert read_checkpoint_config(out / "draft")[2]["steps"] == 3


def test_the_shipped_draft_fits_the_default_model_and_is_accepted(default_model):
    config, _, training = read_checkpoint_config(SHIPPED_DRAFT)
    assert config.fusion == "dgf" and training["tokens_seen"] > 1_000_000
    size = sum(f.stat().st_size for f in SHIPPED_DRAFT.iterdir())
    assert size <= 40 * 2**20
    draft = load_checkpoint(SHIPPED_DRAFT, read_target_weights(default_model))
    target = make_target(default_model, num_slots=1, max_tree_nodes=16, max_tree_branches=16)
    try:
        engine = Engine(target, DraftProposer(draft, TreeShape(top_k=8, depth=7, total_tokens=16)))
        prompt = chat_tokens(target, "Complete this Python function:\n"
                                     "def add(a: int, b: int) -> int:\n"
                                     '    """Return the sum of a and b."""\n')
        sequence = Sequence(prompt, SamplingParams(temperature=0), 48, [],
                            sink=lambda event: None)
        engine.submit(sequence)
        while not sequence.is_finished:
            engine.step()
    finally:
        target.close()
    tau = len(sequence.output_tokens) / sequence.num_verify_steps
    assert sequence.num_accepted > 0 and tau > 1.5


def test_tokens_only_sets_train_with_features_from_the_port(collected, tmp_path, default_model):
    prompts = SequenceSet.load(collected / "prompts" / "train.npz")
    assert len(prompts) >= 1 and not prompts.mask.any()
    # a second prompt set: one prompt of the first again, and one new
    more = tmp_path / "more"
    more.mkdir()
    for split in ("heldout", "train"):
        first = SequenceSet.load(collected / "prompts" / f"{split}.npz")[0][0].tolist()
        SequenceSet.from_lists([(first, [0] * len(first)), (first[:-1], [0] * (len(first) - 1))]
                               ).save(more / f"{split}.npz")
    run_script("scripts/collect_features.py", "--out", str(tmp_path / "tokens"),
               "--from-prompts", str(collected / "prompts"), str(more), "--backend", "torch",
               "--tokens-only", "--max-new-tokens", "6", "--device", "cpu")
    answers = SequenceSet.load(tmp_path / "tokens" / "train.npz")
    assert len(answers) == len(prompts) + 1  # each prompt once
    assert all(0 < int(m.sum()) <= 6 for _, m in answers)
    run_script("scripts/train_draft.py", "--out", str(tmp_path / "run"), "--tokens",
               str(tmp_path / "tokens" / "train.npz"), "--layers", "1", "--max-steps", "2",
               "--device", "cpu", "--batch-tokens", "256", "--fusion", "concat")
    assert read_checkpoint_config(tmp_path / "run" / "draft")[0].fusion == "concat"
    # fine-tuning that checkpoint keeps its shape whatever --layers says, and trains it
    run_script("scripts/train_draft.py", "--out", str(tmp_path / "tuned"), "--tokens",
               str(tmp_path / "tokens" / "train.npz"), "--init-from",
               str(tmp_path / "run" / "draft"), "--layers", "3", "--max-steps", "1",
               "--device", "cpu", "--batch-tokens", "256", "--lr", "1e-2", "--warmup", "1")
    config, _, training = read_checkpoint_config(tmp_path / "tuned" / "draft")
    assert (config.fusion, config.num_layers, training["steps"]) == ("concat", 1, 1)
    assert training["arguments"]["init_from"] == str(tmp_path / "run" / "draft")
    assert training["arguments"]["tokens"] == str(tmp_path / "tokens" / "train.npz")
    weights = read_target_weights(default_model)
    start, tuned = (load_checkpoint(tmp_path / name / "draft", weights).state_dict()
                    for name in ("run", "tuned"))
    changed = [name for name in start if not torch.equal(start[name], tuned[name])]
    assert changed and "head_token_ids" not in changed
    # the same prompts answered by llama.cpp itself, into feature shards
    run_script("scripts/collect_features.py", "--out", str(tmp_path / "shards"),
               "--from-prompts", str(collected / "prompts"), "--max-new-tokens", "4",
               "--threads", str(NUM_THREADS))
    shard = load_split(tmp_path / "shards", "train")
    assert len(shard.sequences) == len(prompts)
    assert all(0 < int(m.sum()) <= 4 for _, m in shard.sequences)
