"""τ of a draft with the real serving path: llama.cpp target, engine, greedy, HumanEval.

Each of the first --count HumanEval problems is sent as the user message "Complete this
Python function:\\n" + prompt (T=0, --max-tokens new tokens) through the engine, once per
tree shape and once without a draft. Reports τ (completion tokens per target verification
step, the prefill counted as one), per-position acceptance, tokens/s, and whether each
speculative output equals the plain one. Writes JSON and a Markdown table.

Shapes: NAME=TOP_K,DEPTH,TOKENS, e.g. chain=1,7,8 tree=8,7,16 (TOKENS counts the root).
--lookup also (or only) runs each shape with prompt lookup merged into the draft's tree
(server/speculation/hybrid.py), as NAME+lookup. No adaptive budget here: every step drafts.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from tqdm import tqdm

from draft_model.checkpoint import load_checkpoint
from draft_model.device import default_dtype, resolve_device
from draft_model.shipped import SHIPPED_DRAFT
from draft_model.target_weights import read_target_weights
from draft_model.training.evaluate import AcceptanceStats
from draft_model.training.humaneval import humaneval_messages, humaneval_problems
from server.engine import Engine
from server.engine.sequence import Sequence
from server.speculation.draft_proposer import DraftProposer, TreeShape
from server.speculation.hybrid import HybridProposer
from server.speculation.ngram import NgramProposer
from verifier.default_model import default_model_path
from verifier.sampling import SamplingParams
from verifier.target import Target, TargetConfig


def parse_shape(text: str) -> tuple[str, TreeShape]:
    name, _, numbers = text.partition("=")
    top_k, depth, tokens = (int(n) for n in numbers.split(","))
    return name, TreeShape(top_k=top_k, depth=depth, total_tokens=tokens)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", type=Path, default=SHIPPED_DRAFT)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--shapes", nargs="+", default=["chain=1,7,8", "tree=8,7,16"])
    parser.add_argument("--lookup", choices=("no", "also", "only"), default="no",
                        help="each shape with prompt lookup merged in: as well, or only")
    parser.add_argument("--draft-device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    parser.add_argument("--out", type=Path, default=Path("eval_draft.json"))
    return parser.parse_args(argv)


def run(engine: Engine, prompts: list[list[int]], max_tokens: int, label: str) -> dict:
    stats = AcceptanceStats()
    outputs, tokens, chosen, steps, seconds = [], 0, 0, 0, 0.0
    for prompt in tqdm(prompts, desc=label, unit="problem", dynamic_ncols=True):
        sequence = Sequence(prompt, SamplingParams(temperature=0), max_tokens, [],
                            sink=lambda event: None)
        start = time.perf_counter()
        engine.submit(sequence)
        while not sequence.is_finished:
            engine.step()
        seconds += time.perf_counter() - start
        outputs.append(sequence.output_tokens)
        tokens += len(sequence.output_tokens)
        chosen += sequence.num_chosen  # an ending EOS too: its step chose it
        steps += sequence.num_verify_steps
        for accepted in sequence.accepted_lengths:
            stats.add(accepted)
    return {"tau": round(chosen / steps, 4), "completion_tokens": tokens, "verify_steps": steps,
            "tokens_per_second": round(tokens / seconds, 2),
            "per_position_acceptance": [round(r, 4) for r in stats.per_position()],
            "outputs": outputs}


def _shown(path: Path) -> str:
    """A path as a reader can use it: relative to the working folder when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv=None) -> None:
    args = parse_args(argv)
    model_path = args.model or default_model_path()
    shapes = [parse_shape(text) for text in args.shapes]
    widest = max(shape.total_tokens for _, shape in shapes)
    target = Target(TargetConfig(model_path=model_path, num_slots=1, ctx_size=2048,
                                 max_tree_nodes=widest, max_tree_branches=widest,
                                 num_threads=args.threads or os.cpu_count() or 1))
    device = resolve_device(args.draft_device)
    draft = load_checkpoint(args.draft, read_target_weights(model_path), device,
                            default_dtype(device))
    problems = humaneval_problems(args.count, args.offset)
    prompts = [target.tokenizer.encode(target.chat_template.render(humaneval_messages(p)))
               for p in problems]

    results = {"plain": run(Engine(target), prompts, args.max_tokens, "plain")}
    runs = [] if args.lookup == "only" else [(name, shape, False) for name, shape in shapes]
    if args.lookup != "no":
        runs += [(f"{name}+lookup", shape, True) for name, shape in shapes]
    for name, shape, lookup in runs:
        proposer = DraftProposer(draft, shape)
        if lookup:
            proposer = HybridProposer(proposer, NgramProposer(max_tokens=shape.total_tokens - 1))
        result = run(Engine(target, proposer), prompts, args.max_tokens, name)
        result["shape"] = vars(shape)
        result["identical_to_plain"] = sum(
            a == b for a, b in zip(result["outputs"], results["plain"]["outputs"], strict=True))
        results[name] = result
    report = {"draft": _shown(args.draft), "model": model_path.name, "problems": len(problems),
              "max_tokens": args.max_tokens, "draft_device": str(device),
              "threads": target.config.num_threads, "results": results}
    args.out.write_text(json.dumps(report, indent=1) + "\n")

    lines = ["| mode | τ | tokens/s | identical to plain | acceptance at positions 1–5 |",
             "|---|---|---|---|---|"]
    for name, result in results.items():
        rates = ", ".join(f"{r:.2f}" for r in result["per_position_acceptance"][:5])
        same = result.get("identical_to_plain", len(problems))
        lines.append(f"| {name} | {result['tau']:.3f} | {result['tokens_per_second']:.1f} | "
                     f"{same}/{len(problems)} | {rates} |")
    table = "\n".join(lines)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
