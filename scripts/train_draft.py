"""Train a DGF draft for a target (docs/training.md); resumable and seeded.

Data (one of):
  --features DIR   feature shards from collect_features.py (train-NNNNN.npz)
  --tokens FILE..  token sets (train.npz) from collect_features.py --tokens-only, trained
                   as one; the target's features are computed on the fly by the PyTorch
                   port of the GGUF
Evaluation: --eval-prompts DIR (heldout.npz, humaneval.npz from --prompts-only): the target
answers them greedily once; τ and per-position acceptance are measured by replaying the
proposer (chain and tree) against those answers, periodically and at the end.

Writes OUT/draft/ (the checkpoint `dovetail serve --draft` loads), OUT/train_log.jsonl,
OUT/trainer_state.pt (resume: run the same command again).

--evaluate-only DRAFT: no training; replay the evaluation for an existing checkpoint (e.g.
the shipped one) and write OUT/eval.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from draft_model.checkpoint import load_checkpoint, save_checkpoint
from draft_model.config import DraftConfig
from draft_model.device import resolve_device
from draft_model.model import DraftModel
from draft_model.target_weights import read_target_weights
from draft_model.training.evaluate import AcceptanceStats, replay
from draft_model.training.features import load_split
from draft_model.training.sequences import SequenceSet
from draft_model.training.train import TrainConfig
from draft_model.training.trainer import RunLimits, Trainer, online_batches, shard_batches
from draft_model.training.vocab import most_frequent_tokens
from server.speculation.draft_proposer import DraftProposer, TreeShape
from server.speculation.hybrid import HybridProposer
from server.speculation.ngram import NgramProposer
from verifier.default_model import default_model_path
from verifier.machine import has_native_bf16

CHAIN = TreeShape(top_k=1, depth=7, total_tokens=8)
TREE = TreeShape(top_k=8, depth=7, total_tokens=16)
SHAPES = {"chain": CHAIN, "tree": TREE}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--features", type=Path)
    data.add_argument("--tokens", type=Path, nargs="+")
    data.add_argument("--evaluate-only", type=Path, default=None, metavar="DRAFT")
    parser.add_argument("--eval-prompts", type=Path, default=None)
    parser.add_argument("--eval-backend", choices=("auto", "llama-cpp", "torch"), default="auto",
                        help="who answers the evaluation prompts (auto: the PyTorch port "
                             "with --tokens or on CUDA, else llama.cpp)")
    parser.add_argument("--eval-heldout", type=int, default=24, help="held-out prompts")
    parser.add_argument("--eval-humaneval", type=int, default=40, help="HumanEval prompts")
    parser.add_argument("--eval-new-tokens", type=int, default=128)
    parser.add_argument("--eval-shapes", default="chain,tree",
                        help="comma-separated: chain, tree, chain+lookup, tree+lookup "
                             "(+lookup: prompt lookup merged into the draft's tree)")
    parser.add_argument("--eval-every", type=int, default=0, help="steps (0: at the end)")
    parser.add_argument("--eval-every-minutes", type=float, default=0.0,
                        help="training minutes between evaluations (instead of steps)")
    parser.add_argument("--eval-every-limit", type=int, default=10,
                        help="prompts per set in the periodic evaluations")
    parser.add_argument("--model", type=Path, default=None, help="target GGUF (default model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cpu-bf16", action="store_true",
                        help="bf16 autocast on the CPU (only where it has native bf16)")
    parser.add_argument("--init-from", type=Path, default=None, metavar="DRAFT",
                        help="fine-tune this checkpoint (its shape; --layers, --fusion and "
                             "--draft-vocab are then ignored)")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--fusion", choices=("dgf", "concat"), default="dgf")
    parser.add_argument("--draft-vocab", type=int, default=0,
                        help="reduced head: the K most frequent answer tokens (0: full)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--ce-weight", type=float, default=0.1)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--max-steps", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=0, help="trained tokens seen")
    parser.add_argument("--max-minutes", type=float, default=0.0)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0: all)")
    return parser.parse_args(argv)


def model_path(args) -> Path:
    return args.model or default_model_path()


class FeatureBackend:
    """The target for this run: a PyTorch port when features are computed on the fly,
    else llama.cpp (only needed to answer the evaluation prompts)."""

    def __init__(self, args, device: torch.device) -> None:
        self.args, self.device = args, device
        self._torch, self._llama = None, None

    def torch_target(self):
        if self._torch is None:
            from draft_model.training.torch_target import TorchTarget

            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self._torch = TorchTarget.load(model_path(self.args), self.device, dtype)
        return self._torch

    def source(self):
        backend = self.args.eval_backend
        if backend == "auto":
            on_the_fly = self.args.tokens is not None or self.device.type == "cuda"
            backend = "torch" if on_the_fly else "llama-cpp"
        if backend == "torch":
            from draft_model.training.torch_target import TorchFeatureSource

            return TorchFeatureSource(self.torch_target())
        if self._llama is None:
            import os

            from draft_model.training.llama_features import LlamaFeatureSource
            from verifier.target import Target, TargetConfig

            target = Target(TargetConfig(model_path=model_path(self.args), num_slots=1,
                                         ctx_size=4096, max_tree_nodes=1, max_tree_branches=1,
                                         num_threads=self.args.threads or os.cpu_count() or 1))
            self._llama = LlamaFeatureSource(target)
        return self._llama


def eval_sets(args, backend: FeatureBackend, out: Path) -> dict[str, list]:
    """name → [(tokens, features, answer_start)]: the target's greedy answers, cached."""
    if args.eval_prompts is None:
        return {}
    cache = out / "eval_sets.npz"
    stops = set(np.load(args.eval_prompts / "stop_tokens.npy").tolist())
    sets: dict[str, list] = {}
    stored = dict(np.load(cache)) if cache.exists() else {}
    for name, count in (("heldout", args.eval_heldout), ("humaneval", args.eval_humaneval)):
        path = args.eval_prompts / f"{name}.npz"
        if not count or not path.exists():
            continue
        prompts = [list(map(int, t)) for t, _ in SequenceSet.load(path)][:count]
        if f"{name}_tokens" not in stored:
            started = time.perf_counter()
            answers = backend.source().answer(prompts, args.eval_new_tokens, stops)
            rows = [(np.array(p + a), f) for p, (a, f) in zip(prompts, answers, strict=True)]
            stored[f"{name}_tokens"] = np.concatenate([t for t, _ in rows])
            stored[f"{name}_features"] = np.concatenate([f for _, f in rows]).astype(np.float16)
            stored[f"{name}_offsets"] = np.cumsum([0] + [len(t) for t, _ in rows])
            stored[f"{name}_starts"] = np.array([len(p) for p in prompts])
            print(f"eval set {name}: {len(prompts)} greedy answers in "
                  f"{time.perf_counter() - started:.0f} s")
        offsets = stored[f"{name}_offsets"]
        sets[name] = [(stored[f"{name}_tokens"][a:b], stored[f"{name}_features"][a:b]
                       .astype(np.float32), int(s))
                      for a, b, s in zip(offsets[:-1], offsets[1:], stored[f"{name}_starts"],
                                         strict=True)]
    np.savez(cache, **stored)
    return sets


def evaluate(model: DraftModel, sets: dict[str, list], max_new_tokens: int,
             limit: int | None = None, shapes: tuple[str, ...] = ("chain", "tree")) -> dict:
    results = {}
    for name, rows in sets.items():
        for shape_name in shapes:
            base, lookup = shape_name.removesuffix("+lookup"), shape_name.endswith("+lookup")
            shape = SHAPES[base]
            proposer = DraftProposer(model, shape)
            if lookup:
                proposer = HybridProposer(proposer,
                                          NgramProposer(max_tokens=shape.total_tokens - 1))
            stats = AcceptanceStats()
            for tokens, features, start in tqdm(rows[:limit], desc=f"replay {name} {shape_name}",
                                                unit="answer", leave=False):
                stats.merge(replay(proposer, tokens, features, start, max_new_tokens))
            results[f"{name}_{shape_name}"] = stats.to_dict()
    return results


def evaluate_checkpoint(args, backend: FeatureBackend, weights, device) -> None:
    model = load_checkpoint(args.evaluate_only, weights, device, torch.float32)
    sets = eval_sets(args, backend, args.out)
    if not sets:
        raise SystemExit("--evaluate-only needs --eval-prompts")
    results = evaluate(model, sets, args.eval_new_tokens,
                       shapes=tuple(args.eval_shapes.split(",")))
    (args.out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    print_results(results)


def print_results(results: dict) -> None:
    for name, stats in results.items():
        print(f"{name}: τ {stats['tau']:.3f}, per position "
              f"{stats['per_position_acceptance'][:6]}")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    weights = read_target_weights(model_path(args))
    backend = FeatureBackend(args, device)
    if args.evaluate_only is not None:
        evaluate_checkpoint(args, backend, weights, device)
        return
    if args.features is None and args.tokens is None:
        raise SystemExit("give --features, --tokens or --evaluate-only")

    if args.features is not None:
        shard = load_split(args.features, "train")
        sequences = shard.sequences
    else:
        sequences = SequenceSet.concatenate(SequenceSet.load(path) for path in args.tokens)
    print(f"training data: {len(sequences)} sequences, {sequences.num_trained_tokens} "
          f"trained tokens")

    if args.init_from is not None:
        model = load_checkpoint(args.init_from, weights, device, torch.float32)
        model.requires_grad_(True)  # the frozen embedding and head are buffers
        config = model.config
        print(f"fine-tuning {args.init_from}")
    else:
        head_ids = None
        if args.draft_vocab:
            counts = sequences.token_counts(weights.info.vocab_size)
            head_ids = most_frequent_tokens(counts, args.draft_vocab)
        config = DraftConfig.for_target(weights.info, num_layers=args.layers,
                                        fusion=args.fusion, draft_vocab_size=args.draft_vocab)
        model = DraftModel(config, torch.from_numpy(weights.embedding),
                           torch.from_numpy(weights.lm_head), head_token_ids=head_ids).to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"draft: {config.num_layers} layers, {config.fusion}, {trainable / 1e6:.1f} M "
          f"trainable parameters, head {config.draft_vocab_size or config.vocab_size} tokens")

    train_config = TrainConfig(learning_rate=args.lr, warmup_steps=args.warmup,
                               noise=args.noise, ce_weight=args.ce_weight)
    if args.cpu_bf16 and device.type == "cpu" and not has_native_bf16():
        print("warning: this CPU has no native bf16 (AVX512-BF16 or AMX); bf16 autocast is "
              "emulated and much slower than fp32 — leave out --cpu-bf16")
    autocast = torch.bfloat16 if device.type == "cuda" or args.cpu_bf16 else None
    trainer = Trainer(model, train_config, out, seed=args.seed, autocast_dtype=autocast)
    if trainer.resume():
        print(f"resumed at step {trainer.step} ({trainer.tokens_seen} tokens)")
    data_seed = args.seed + trainer.step  # a resumed run continues with a fresh shuffle
    if args.features is not None:
        batches = shard_batches(shard, args.batch_tokens, args.max_length, device, data_seed)
    else:
        target = backend.torch_target()

        def features(tokens: torch.Tensor) -> torch.Tensor:
            return target.forward(tokens).clone()  # out of inference mode, for autograd

        batches = online_batches(sequences, features, args.batch_tokens, args.max_length,
                                 device, data_seed)
    sets = eval_sets(args, backend, out)

    def on_checkpoint() -> None:
        save_checkpoint(model, weights.info, out / "draft", training={
            "steps": trainer.step, "tokens_seen": trainer.tokens_seen,
            "train_seconds": round(trainer.seconds, 1), "device": str(device),
            "data": str(args.features or " ".join(map(str, args.tokens))),
            "arguments": {k: " ".join(map(str, v)) if isinstance(v, list) else str(v)
                          for k, v in vars(args).items()}})

    shapes = tuple(args.eval_shapes.split(","))
    limits = RunLimits(max_steps=args.max_steps, max_tokens=args.max_tokens,
                       max_seconds=args.max_minutes * 60, eval_every=args.eval_every,
                       eval_every_seconds=args.eval_every_minutes * 60,
                       checkpoint_every=args.checkpoint_every)
    trainer.run(batches, limits, on_checkpoint=on_checkpoint,
                evaluate=(lambda: evaluate(model, sets, args.eval_new_tokens,
                                           args.eval_every_limit, shapes)) if sets else None,
                final_evaluate=(lambda: evaluate(model, sets, args.eval_new_tokens,
                                                 shapes=shapes)) if sets else None)
    if sets:
        final = json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])["eval"]
        (out / "eval.json").write_text(json.dumps(final, indent=2) + "\n")
        print_results(final)


if __name__ == "__main__":
    main()
