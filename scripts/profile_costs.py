"""Cost profile: what verification and drafting cost on this machine, and what that means.

Measures T_V(k) — k tokens verified in one llama.cpp decode after --context cached tokens —
for k = 1…--max-k on the target, and optionally the draft's time per tree level on its
device (--draft). With --random-7b PATH it also times a GGUF of LLaMA-2-7B shape with
meaningless Q4_0 weights (written there if missing; ~3.8 GB — speed does not depend on the
values) and projects the speedup a 7B-class target would see:

    speedup(τ, k) = τ · T_V(1) / (T_V(k) + depth · T_level)

as a function of τ for several numbers of verified tokens k, with the paper's operating
point (16 tokens, τ 5.9) marked. The projection is arithmetic on measured costs, labelled
as such. Writes JSON, a Markdown table and PNG plots.

  python scripts/profile_costs.py --draft shipped --random-7b /tmp/llama2-7b-random.gguf
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from verifier.costs import VerifyCosts, measure_verify_costs
from verifier.default_model import default_model_path
from verifier.gguf_convert import LLAMA2_7B, write_random_llama
from verifier.kernels import kernels
from verifier.machine import describe_cpu, physical_cores, run_on_fresh_thread
from verifier.target import Target, TargetConfig

PAPER_POINT = (16, 5.9)  # verified tokens, τ of the paper's 7B draft


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="default: the packaged model")
    parser.add_argument("--max-k", type=int, default=32)
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="0: one per physical core")
    parser.add_argument("--draft", default=None, help="a draft checkpoint folder or 'shipped'")
    parser.add_argument("--draft-device", default="auto")
    parser.add_argument("--draft-top-k", type=int, default=10, help="nodes per tree level")
    parser.add_argument("--trace", action="store_true",
                        help="with --draft: print where one tree's time goes, by operation "
                        "(torch.profiler), host-driven and grown on the device")
    parser.add_argument("--random-7b", type=Path, default=None,
                        help="LLaMA-2-7B-shaped random GGUF to time (written if missing)")
    parser.add_argument("--out", type=Path, default=Path("cost_profile"),
                        help="output path without suffix: .json, .md and .png files")
    return parser.parse_args(argv)


def verify_profile(model: Path, sizes: list[int], threads: int, context: int,
                   repeats: int) -> VerifyCosts:
    target = Target(TargetConfig(model_path=model, num_slots=1, ctx_size=context + 64,
                                 max_tree_nodes=max(sizes), max_tree_branches=1,
                                 num_threads=threads, features=False))
    try:
        return measure_verify_costs(target, sizes, context, repeats, max_seconds=None,
                                    progress=f"T_V(k) {model.name}")
    finally:
        target.close()


def prefill_seconds(model: Path, threads: int, context: int, repeats: int) -> float:
    """Median time to read a `context`-token prompt in one decode (after a warm-up)."""
    target = Target(TargetConfig(model_path=model, num_slots=1, ctx_size=context + 64,
                                 max_tree_nodes=1, max_tree_branches=1, batch_size=context,
                                 num_threads=threads, features=False))

    def measure() -> float:
        prompt = np.random.default_rng(1).integers(100, target.vocab_size - 100,
                                                   size=context).tolist()
        times = []
        for _ in range(repeats + 1):
            slot = target.acquire_slot()
            started = time.perf_counter()
            target.prefill(slot, prompt)
            times.append(time.perf_counter() - started)
            target.release_slot(slot)
        return float(np.median(times[1:]))

    try:
        return run_on_fresh_thread(measure)
    finally:
        target.close()


def load_draft(draft: str, model: Path, device_name: str):
    from draft_model.checkpoint import load_checkpoint
    from draft_model.device import default_dtype, resolve_device
    from draft_model.shipped import SHIPPED_DRAFT
    from draft_model.target_weights import read_target_weights

    device = resolve_device(device_name)
    path = SHIPPED_DRAFT if draft == "shipped" else Path(draft)
    return load_checkpoint(path, read_target_weights(model), device, default_dtype(device))


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def draft_level_seconds(net, top_k: int, context: int, repeats: int) -> float:
    """Median time of one draft forward over a tree level of top_k nodes after `context`
    cached positions (what each level of a tree costs), on the draft's device."""
    import torch

    from draft_model.model import KVCache

    config, device, dtype = net.config, net.embedding.device, net.embedding.dtype
    cache = KVCache.allocate(config, context + top_k, device, dtype)
    features = torch.randn(1, top_k, config.hidden_size, device=device)
    tokens = torch.randint(0, config.vocab_size, (1, top_k), device=device)
    positions = torch.full((1, top_k), context, device=device)
    slots = torch.arange(context, context + top_k, device=device)
    mask = torch.ones(top_k, context + top_k, dtype=torch.bool, device=device)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 2):
            synchronize(device)
            started = time.perf_counter()
            hidden = net(features, tokens, positions, cache, slots, mask)[0]
            torch.topk(net.head_logits(hidden).float(), top_k, dim=-1).indices.cpu()
            times.append(time.perf_counter() - started)
    return float(np.median(times[2:]))


def draft_tree_seconds(net, top_k: int, context: int, repeats: int,
                       trace: bool = False) -> float:
    """Median time of a whole tree (depth 7, 16 tokens: catch-up of one accepted token, all
    levels, the tree back on the host), grown on the device
    (server/speculation/device_growth.py: a CUDA graph on CUDA)."""
    from server.speculation.draft_proposer import DraftProposer, TreeShape

    hidden = net.config.hidden_size
    proposer = DraftProposer(net, TreeShape(top_k=top_k, depth=7, total_tokens=16))
    rng = np.random.default_rng(0)
    state = proposer.new_state(context + repeats + 16)  # rounds, and one to trace
    proposer.begin(state, rng.integers(0, 1000, context).tolist(),
                   rng.standard_normal((context, hidden)).astype(np.float32), 1)
    times = []
    for _ in range(repeats + 2):
        synchronize(net.embedding.device)
        started = time.perf_counter()
        proposer.propose(state, 1)
        times.append(time.perf_counter() - started)
        proposer.commit(state, rng.standard_normal((1, hidden)).astype(np.float32), [1])
    if trace:
        print_trace(lambda: proposer.propose(state, 1), net.embedding.device,
                    "grown on the device")
    return float(np.median(times[2:]))


def print_trace(work, device, title: str) -> None:
    """The operations that took the time of one call of work, by host and device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as run:
        work()
        synchronize(device)
    print(f"one tree, {title}:")
    print(run.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def projection(costs: VerifyCosts, level_seconds: float, taus: np.ndarray, k: int,
               depth: int) -> np.ndarray:
    return taus * costs.of(1) / (costs.of(k) + depth * level_seconds)


def main(argv=None) -> None:
    args = parse_args(argv)
    threads = args.threads or physical_cores()
    model = args.model or default_model_path()
    report = {"machine": describe_cpu(), "threads": threads, "context": args.context,
              "kernels": kernels(), "profiles": {}, "prefill_seconds": {}}
    sizes = list(range(1, args.max_k + 1))
    report["profiles"][model.name] = verify_profile(model, sizes, threads, args.context,
                                                    args.repeats).as_json()
    report["prefill_seconds"][model.name] = prefill_seconds(model, threads, args.context,
                                                            args.repeats)
    level = 0.0
    if args.draft:
        net = load_draft(args.draft, model, args.draft_device)
        level = draft_level_seconds(net, args.draft_top_k, args.context, args.repeats)
        trees = {"device": draft_tree_seconds(net, args.draft_top_k, args.context,
                                              args.repeats, trace=args.trace)}
        report["draft"] = {"checkpoint": args.draft, "device": str(net.embedding.device),
                           "nodes_per_level": args.draft_top_k, "level_seconds": level,
                           "tree_seconds": trees}
    big = None
    if args.random_7b:
        if not args.random_7b.exists():
            print(f"writing {args.random_7b} (LLaMA-2-7B shape, random Q4_0 weights)")
            write_random_llama(args.random_7b, **LLAMA2_7B)
        coarse = [k for k in (1, 2, 4, 8, 12, 16, 24, 32) if k <= args.max_k]
        big = verify_profile(args.random_7b, coarse, threads, args.context,
                             max(2, args.repeats // 2))
        report["profiles"]["llama2-7b-shape-q4_0 (random weights)"] = big.as_json()
    write_report(report, big, level, args)
    print(args.out.with_suffix(".md").read_text())


def write_report(report: dict, big: VerifyCosts | None, level: float,
                 args: argparse.Namespace) -> None:
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"T_V(k), {report['context']}-token context, {report['threads']} threads, "
             f"median ms (ratio to k=1); {report['machine']}; llama.cpp kernels: "
             f"{report['kernels']}", ""]
    for name, seconds in report["prefill_seconds"].items():
        lines += [f"Prompt of {report['context']} tokens in one decode, {name}: "
                  f"{seconds * 1000:.1f} ms", ""]
    for name, profile in report["profiles"].items():
        costs = VerifyCosts.from_json(profile)
        shown = [k for k in (1, 2, 4, 8, 16, 32) if k in costs.seconds]
        if name == next(iter(report["profiles"])):
            lines += ["| model | " + " | ".join(f"k={k}" for k in shown) + " |",
                      "|---|" + "---|" * len(shown)]
        cells = [f"{costs.of(k) * 1000:.1f} ({costs.of(k) / costs.of(1):.1f}x)" for k in shown]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "draft" in report:
        d = report["draft"]
        lines += ["", f"Draft {d['checkpoint']} on {d['device']}: "
                  f"{d['level_seconds'] * 1000:.2f} ms per tree level of "
                  f"{d['nodes_per_level']} nodes; a whole tree (depth 7, 16 tokens) "
                  f"{d['tree_seconds']['device'] * 1000:.2f} ms grown on the device."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    for name, profile in report["profiles"].items():
        costs = VerifyCosts.from_json(profile)
        ks = sorted(costs.seconds)
        axis.plot(ks, [costs.of(k) / costs.of(1) for k in ks], marker="o", markersize=3,
                  label=name)
    axis.plot([1, args.max_k], [1, args.max_k], linestyle=":", color="grey",
              label="linear (no batching gain)")
    axis.set_xlabel("tokens verified in one decode (k)")
    axis.set_ylabel("T_V(k) / T_V(1)")
    axis.set_title(f"verification cost, {report['machine']}", fontsize=8)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out.parent / (out.name + "_verify.png"), dpi=120)

    if big is None:
        return
    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    taus = np.linspace(1, 7, 61)
    for k in (4, 8, 16, 32):
        if k <= args.max_k:
            depth = min(k - 1, 7)
            reachable = taus[taus <= depth + 1]  # τ cannot pass the tree's depth + 1
            axis.plot(reachable, projection(big, level, reachable, k, depth), label=f"k = {k}")
    k, tau = PAPER_POINT
    point = projection(big, level, np.array([tau]), k, 7)[0]
    axis.scatter([tau], [point], color="black", zorder=5)
    axis.annotate(f"paper: {k} tokens, τ {tau} → {point:.1f}x", (tau, point),
                  textcoords="offset points", xytext=(-150, 8), fontsize=8)
    axis.axhline(1.0, color="grey", linestyle=":")
    axis.set_xlabel("τ (tokens per verification step)")
    axis.set_ylabel("projected speedup over plain decoding")
    axis.set_title("PROJECTION for a 7B-class target from measured costs "
                   f"(LLaMA-2-7B shape, Q4_0, {report['threads']} threads; draft "
                   f"{level * 1000:.1f} ms/level)", fontsize=7)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out.parent / (out.name + "_projection_7b.png"), dpi=120)


if __name__ == "__main__":
    main()
