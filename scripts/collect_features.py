"""Collect the draft's training data: ShareGPT through the target, with its features.

  --source sharegpt      conversations teacher-forced through the target (the paper's data)
  --source self-distill  the target answers each conversation's first prompt (--turns all:
                         every user turn, after the conversation so far) greedily and the
                         draft learns those answers (at T=0 it must predict exactly them)
  --backend llama-cpp    the serving target on the CPU (default)
  --backend torch        the same GGUF in PyTorch (draft_model/training/torch_target.py),
                         e.g. on a GPU
  --tokens-only          write {split}.npz token sets without features (training then
                         computes features on the fly with the PyTorch target);
                         --max-minutes bounds the time, e.g. on a lent GPU
  --prompts-only         write the rendered prompts as {split}.npz, and HumanEval's as
                         humaneval.npz (evaluation only), to carry to another machine;
                         --from-prompts DIR [DIR ...] answers those instead of ShareGPT
                         (several: each prompt once)

Output: {split}-NNNNN.npz feature shards for split = heldout, train (a fixed split by
conversation id). Rerunning resumes: shards that exist are skipped.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from draft_model.training.features import FeatureShard, pending_shards, shard_path
from draft_model.training.humaneval import humaneval_messages, humaneval_problems
from draft_model.training.sequences import SequenceSet, chat_tokens_with_mask
from draft_model.training.sharegpt import (
    asks_for_code,
    default_sharegpt_path,
    fit_prompt,
    iter_conversations,
    prompts_of,
)
from verifier.default_model import default_model_path

SPLITS = ("heldout", "train")
END_OF_TURN = "<|im_end|>"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--source", choices=("sharegpt", "self-distill"), default="sharegpt")
    parser.add_argument("--backend", choices=("llama-cpp", "torch"), default="llama-cpp")
    parser.add_argument("--model", type=Path, default=None, help="target GGUF (default model)")
    parser.add_argument("--sharegpt", type=Path, default=None, help="ShareGPT JSON file")
    parser.add_argument("--from-prompts", type=Path, nargs="+", default=None)
    parser.add_argument("--prompts-only", action="store_true")
    parser.add_argument("--tokens-only", action="store_true")
    parser.add_argument("--sharegpt-limit", type=int, default=0,
                        help="with --prompts-only: also write this many whole ShareGPT "
                             "conversations as sharegpt.npz")
    parser.add_argument("--limit", type=int, default=0, help="conversations per split (0: all)")
    parser.add_argument("--topic", choices=("any", "code"), default="any",
                        help="code: only conversations whose first prompt is about "
                             "programming (sharegpt.asks_for_code)")
    parser.add_argument("--heldout-limit", type=int, default=200)
    parser.add_argument("--heldout-percent", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--max-prompt-tokens", type=int, default=512,
                        help="a longer prompt loses its oldest exchanges, then the middle of "
                             "its last message")
    parser.add_argument("--turns", choices=("first", "all"), default="first",
                        help="self-distill / prompts: answer each conversation's first user "
                             "turn, or every user turn (with the conversation before it)")
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--shard-size", type=int, default=64, help="sequences per shard")
    parser.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0: all)")
    parser.add_argument("--device", default="auto", help="torch backend device")
    parser.add_argument("--batch-tokens", type=int, default=65536, help="torch backend batch")
    parser.add_argument("--max-minutes", type=float, default=0,
                        help="--tokens-only: no new batch of prompts starts after this long; "
                             "the split keeps the prompts answered by then (0: no limit)")
    args = parser.parse_args(argv)
    if args.max_minutes and not args.tokens_only:
        parser.error("--max-minutes bounds --tokens-only generation only")
    return args


def model_path(args) -> Path:
    return args.model or default_model_path()


def load_chat(args):
    """(render, encode, stop token ids) from the target's own chat template and tokenizer."""
    import os

    from verifier.target import Target, TargetConfig

    threads = args.threads or os.cpu_count() or 1
    target = Target(TargetConfig(model_path=model_path(args), num_slots=1,
                                 ctx_size=args.max_length + args.max_new_tokens + 8,
                                 max_tree_nodes=1, max_tree_branches=1, num_threads=threads))
    template, tokenizer = target.chat_template, target.tokenizer
    stops = {token for token in range(tokenizer.vocab_size)
             if tokenizer.is_end_of_generation(token)}
    return target, (lambda m, g: template.render(m, g)), tokenizer.encode, stops


def load_source(args, target):
    if args.backend == "llama-cpp":
        from draft_model.training.llama_features import LlamaFeatureSource

        return LlamaFeatureSource(target)
    from draft_model.device import default_dtype, resolve_device
    from draft_model.training.torch_target import TorchFeatureSource, TorchTarget

    device = resolve_device(args.device)
    dtype = default_dtype(device)
    return TorchFeatureSource(TorchTarget.load(model_path(args), device, dtype),
                              args.batch_tokens)


def conversations(args, split: str) -> list[list[dict]]:
    path = args.sharegpt or default_sharegpt_path()
    limit = args.heldout_limit if split == "heldout" else args.limit
    found = []
    for _, messages in iter_conversations(path, split, args.heldout_percent):
        if args.topic == "code" and not asks_for_code(messages):
            continue
        found.append(messages)
        if limit and len(found) >= limit:
            break
    return found


def prompt_tokens(args, split: str, render, encode) -> list[list[int]]:
    """The rendered prompts of the split's conversations (--turns), each fitted into
    --max-prompt-tokens (sharegpt.fit_prompt); prompts that cannot fit are left out."""
    prompts = [fit_prompt(prompt, render, encode, args.max_prompt_tokens)
               for messages in conversations(args, split)
               for prompt in prompts_of(messages, args.turns)]
    fitted = [tokens for tokens in prompts if tokens is not None]
    if len(fitted) < len(prompts):
        print(f"{split}: {len(prompts) - len(fitted)} of {len(prompts)} prompts do not fit in "
              f"{args.max_prompt_tokens} tokens, left out")
    return fitted


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    prompts_given = args.from_prompts is not None
    if prompts_given:
        args.source = "self-distill"  # prompts alone can only be answered
    needs_chat = not prompts_given or args.backend == "llama-cpp"  # llama.cpp is the target
    target, render, encode, stops = load_chat(args) if needs_chat else (None, None, None, None)
    if prompts_given:
        stops = set(np.load(args.from_prompts[0] / "stop_tokens.npy").tolist())
    if args.prompts_only:
        np.save(args.out / "stop_tokens.npy", np.array(sorted(stops), dtype=np.int64))
        prompts = [encode(render(humaneval_messages(p), True)) for p in humaneval_problems()]
        SequenceSet.from_lists((p, [0] * len(p)) for p in prompts).save(
            args.out / "humaneval.npz")
        print(f"humaneval: {len(prompts)} evaluation prompts → {args.out}/humaneval.npz")
    source = None if args.prompts_only else load_source(args, target)

    for split in SPLITS:
        if prompts_given:
            limit = args.heldout_limit if split == "heldout" else args.limit
            items = given_prompts(args.from_prompts, split)[:limit or None]
        elif args.source == "self-distill" or args.prompts_only:
            items = prompt_tokens(args, split, render, encode)
        else:
            items = [chat_tokens_with_mask(m, render, encode, args.max_length)
                     for m in conversations(args, split)]
        if args.prompts_only:
            SequenceSet.from_lists((p, [0] * len(p)) for p in items).save(args.out / f"{split}.npz")
            print(f"{split}: {len(items)} prompts → {args.out / split}.npz")
            if split == "train" and args.sharegpt_limit:
                # the paper's data, for training on another machine: whole conversations
                conversations_ = conversations(args, split)[:args.sharegpt_limit]
                SequenceSet.from_lists(chat_tokens_with_mask(m, render, encode, args.max_length)
                                       for m in conversations_).save(args.out / "sharegpt.npz")
                print(f"sharegpt: {len(conversations_)} conversations → {args.out}/sharegpt.npz")
            continue
        if args.tokens_only:
            write_token_set(args, source, stops, split, items)
        else:
            write_shards(args, source, stops, split, items)


def given_prompts(directories: list[Path], split: str) -> list[list[int]]:
    """The split's prompts from each --prompts-only directory in turn, each prompt once."""
    prompts = {}
    for directory in directories:
        for tokens, _ in SequenceSet.load(directory / f"{split}.npz"):
            prompts.setdefault(tuple(tokens.tolist()), None)
    return [list(tokens) for tokens in prompts]


def write_token_set(args, source, stops, split: str, prompts: list[list[int]]) -> None:
    path = args.out / f"{split}.npz"
    if path.exists():
        print(f"{split}: {path} exists, skipped")
        return
    start = time.perf_counter()
    answers = source.generate(prompts, args.max_new_tokens, stops,
                              max_seconds=args.max_minutes * 60 or None)
    sequences = SequenceSet.from_lists((p + a, [0] * len(p) + [1] * len(a))
                                       for p, a in zip(prompts, answers, strict=True)
                                       if a is not None)
    sequences.save(path)
    seconds = time.perf_counter() - start
    print(f"{split}: {len(sequences)} of {len(prompts)} prompts answered, "
          f"{sequences.num_trained_tokens} answer tokens in {seconds:.0f} s → {path}")


def write_shards(args, source, stops, split: str, items: list) -> None:
    todo = list(pending_shards(args.out, split, len(items), args.shard_size))
    total = sum(len(r) for _, r in todo)
    progress = tqdm(total=total, desc=f"{split}", unit="seq", dynamic_ncols=True)
    tokens_done, start = 0, time.perf_counter()
    for index, item_range in todo:
        batch = [items[i] for i in item_range]
        if args.source == "self-distill":
            results = source.answer(batch, args.max_new_tokens, stops)
            # the last answer token is decoded too, so every token has its feature
            rows = [(p + a, [0] * len(p) + [1] * len(a), f)
                    for p, (a, f) in zip(batch, results, strict=True)]
        else:
            features = source.features([tokens for tokens, _ in batch])
            rows = [(t, m, f) for (t, m), f in zip(batch, features, strict=True)]
        FeatureShard.from_items(rows).save(shard_path(args.out, split, index))
        tokens_done += sum(len(t) for t, _, _ in rows)
        progress.update(len(batch))
        progress.set_postfix(tok_s=f"{tokens_done / (time.perf_counter() - start):.0f}")
    progress.close()


if __name__ == "__main__":
    main()
