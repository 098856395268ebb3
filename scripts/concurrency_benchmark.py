"""Aggregate throughput of N concurrent clients against the same N requests one after another.

One live `dovetail serve` per model (loopback). Each round sends the same N HumanEval chat
requests (T=0, --max-tokens new tokens) first sequentially, then all at once; rounds repeat
(--rounds) so the two modes interleave on the same warm server. Reports completion tokens/s
of both modes (median over rounds), the ratio, and whether the concurrent outputs equal
the sequential ones. Writes JSON, a Markdown table and a PNG bar chart.

  python scripts/concurrency_benchmark.py --clients 4 --rounds 5 --f16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from tqdm import tqdm

from draft_model.training.humaneval import humaneval_messages, humaneval_problems
from server.local_server import LocalServer
from verifier.default_model import default_model_path
from verifier.gguf_convert import temporary_f16_copy
from verifier.machine import describe_cpu, physical_cores


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="default: the packaged model")
    parser.add_argument("--f16", action="store_true",
                        help="also run an F16 copy of the model (made in a temporary folder)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--offset", type=int, default=0, help="first HumanEval problem")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="0: one per physical core")
    parser.add_argument("--serve-args", default="--draft none --no-prefix-reuse",
                        help="extra `dovetail serve` flags (default: plain decoding, every "
                        "prompt read in full — the rounds repeat the same prompts)")
    parser.add_argument("--out", type=Path, default=Path("concurrency_benchmark"),
                        help="output path without suffix: .json, .md and .png are written")
    return parser.parse_args(argv)


def complete(client: httpx.Client, messages: list[dict], max_tokens: int) -> dict:
    body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    response = client.post("/chat/completions", json=body)
    response.raise_for_status()
    reply = response.json()
    return {"text": reply["choices"][0]["message"]["content"],
            "tokens": reply["usage"]["completion_tokens"]}


def measure(client: httpx.Client, requests: list[list[dict]], max_tokens: int,
            concurrent: bool) -> tuple[float, list[dict]]:
    started = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(len(requests)) as pool:
            replies = list(pool.map(lambda m: complete(client, m, max_tokens), requests))
    else:
        replies = [complete(client, messages, max_tokens) for messages in requests]
    seconds = time.perf_counter() - started
    return sum(reply["tokens"] for reply in replies) / seconds, replies


def bench_model(model: Path, args: argparse.Namespace, requests: list[list[dict]]) -> dict:
    threads = args.threads or physical_cores()
    server = LocalServer.start("--model", str(model), "--threads", str(threads),
                               "--max-concurrency", str(args.clients), *args.serve_args.split())
    # one client, shared by the threads, as an application keeps one: a new httpx client
    # per request loads the CA certificates (~60 ms of CPU on 2 cores) inside the timing
    client = httpx.Client(base_url=server.v1, timeout=600)
    try:
        complete(client, requests[0], 8)  # warm up
        rates = {"sequential": [], "concurrent": []}
        outputs, equal = {}, True
        for _ in tqdm(range(args.rounds), desc=model.name, unit="round", dynamic_ncols=True):
            for mode in ("sequential", "concurrent"):
                rate, replies = measure(client, requests, args.max_tokens, mode == "concurrent")
                rates[mode].append(rate)
                texts = [reply["text"] for reply in replies]
                equal &= outputs.setdefault(mode, texts) == texts
            equal &= outputs["sequential"] == outputs["concurrent"]
    finally:
        client.close()
        server.stop()
    sequential, concurrent = (statistics.median(rates[m]) for m in ("sequential", "concurrent"))
    return {"model": model.name, "threads": threads,
            "sequential_tok_s": rates["sequential"], "concurrent_tok_s": rates["concurrent"],
            "sequential_median": sequential, "concurrent_median": concurrent,
            "ratio": concurrent / sequential, "outputs_equal": equal}


def write_report(results: list[dict], args: argparse.Namespace, machine: str) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "clients": args.clients, "rounds": args.rounds,
              "max_tokens": args.max_tokens, "offset": args.offset,
              "serve_args": args.serve_args, "results": results}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"{args.clients} clients, HumanEval problems {args.offset}–"
             f"{args.offset + args.clients - 1}, {args.max_tokens} tokens, T=0, "
             f"`{args.serve_args}`, median of {args.rounds} rounds; {machine}", "",
             "| model | threads | one after another (tok/s) | all at once (tok/s) | ratio "
             "| same outputs |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['threads']} | {r['sequential_median']:.1f} | "
                     f"{r['concurrent_median']:.1f} | {r['ratio']:.2f}x | "
                     f"{'yes' if r['outputs_equal'] else 'no'} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(1.8 + 1.6 * len(results), 3.6))
    width = 0.38
    for offset, mode, colour in ((-width / 2, "sequential", "#9aa5b1"),
                                 (width / 2, "concurrent", "#2f6fb0")):
        heights = [r[f"{mode}_median"] for r in results]
        bars = axis.bar([i + offset for i in range(len(results))], heights, width,
                        label={"sequential": "one after another",
                               "concurrent": f"{args.clients} at once"}[mode], color=colour)
        axis.bar_label(bars, fmt="%.0f", fontsize=8)
    axis.set_xticks(range(len(results)), [r["model"] for r in results], fontsize=8)
    axis.set_ylabel("completion tokens/s (all clients)")
    axis.set_title(f"{args.clients} clients: {machine}", fontsize=8)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out.with_suffix(".png"), dpi=120)


def main(argv=None) -> None:
    args = parse_args(argv)
    problems = humaneval_problems(args.clients, args.offset)
    requests = [humaneval_messages(problem) for problem in problems]
    model = args.model or default_model_path()
    machine = describe_cpu()
    results = [bench_model(model, args, requests)]
    if args.f16:
        with temporary_f16_copy(model) as f16:
            results.append(bench_model(f16, args, requests))
    write_report(results, args, machine)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
