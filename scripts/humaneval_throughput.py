"""HumanEval throughput: this server against plain llama.cpp, on this machine.

Each problem is one chat request ("Complete this Python function:\\n" + prompt, T=0,
--max-tokens new tokens), sent to every system in turn (A B C D A B C D …), all on the same
target file and thread count, in one process tree:

  dovetail         `dovetail serve` as configured by default (--draft auto), streamed HTTP
  dovetail-plain   `dovetail serve --draft none`
  llama-cpp        llama-cpp-python's create_chat_completion (greedy), in this process
  llama-cpp-lookup the same with LlamaPromptLookupDecoding (prompt-lookup speculation)

  llama-cpp-stock  with --stock-llama DIR: llama-cpp (no lookup) from a llama-cpp-python
                   installed in DIR (`pip install --target DIR`), in a worker process —
                   e.g. the stock build, with llama.cpp's llamafile kernels, beside the
                   project's exact build (README, "Identical output")

and any number of --variant NAME="FLAGS" systems: `dovetail serve FLAGS`, interleaved with
the rest (an A/B of a setting in one run, e.g. --variant own-lookup="--no-lookup-shared").

Tokens/s counts the output re-tokenized by the target's tokenizer over the request's wall
time (arrival to last token), so every system is measured the same way. Reported per
system: tokens/s (median, quartiles, and total tokens / total time), time to first token,
and for the servers τ, acceptance, accepted per draft position and draft/verify seconds
(from /metrics). Speedups and "same text" are against llama-cpp (the same llama.cpp build as
the server's); with --stock-llama, speedups against the other build too. --check runs
HumanEval's tests on the outputs (code from the reply's first ```python block, in a
subprocess) for pass@1.

  python scripts/humaneval_throughput.py --count 40 --out docs/humaneval_throughput
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from draft_model.training.humaneval import humaneval_messages, humaneval_problems
from server.local_server import LocalServer
from verifier.default_model import default_model_path
from verifier.gguf_convert import temporary_f16_copy
from verifier.kernels import kernels
from verifier.machine import describe_cpu, physical_cores
from verifier.weight_buffers import SETTINGS, llama_weight_buffers, use_extra_buffers

SERVER_SYSTEMS = {"dovetail": [], "dovetail-plain": ["--draft", "none"]}
LLAMA_SYSTEMS = ("llama-cpp", "llama-cpp-lookup")
ALL_SYSTEMS = (*SERVER_SYSTEMS, *LLAMA_SYSTEMS)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="default: the packaged model")
    parser.add_argument("--f16", action="store_true",
                        help="run on an unquantized (F16) copy of the model, written to a "
                        "temporary folder for the run")
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="0: one per physical core")
    parser.add_argument("--systems", nargs="+", default=list(ALL_SYSTEMS), choices=ALL_SYSTEMS)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        type=variant, help="one more server system: `dovetail serve FLAGS` "
                        "reported as NAME (repeatable)")
    parser.add_argument("--serve-args", default="",
                        help="extra flags for the `dovetail` system, e.g. '--draft shipped'")
    parser.add_argument("--extra-buffers", choices=SETTINGS, default="auto",
                        help="llama.cpp's extra weight buffer types, for every system alike "
                        "(verifier/weight_buffers.py; auto: off where the build uses AMX)")
    parser.add_argument("--lookup-tokens", type=int, default=10,
                        help="LlamaPromptLookupDecoding num_pred_tokens (its default: 10)")
    parser.add_argument("--stock-llama", type=Path, default=None, metavar="DIR",
                        help="also run llama-cpp from the llama-cpp-python installed in DIR")
    parser.add_argument("--check", action="store_true", help="run the tests: pass@1")
    parser.add_argument("--out", type=Path, default=Path("humaneval_throughput"),
                        help="output path without suffix: .json, .md and .png files")
    args = parser.parse_args(argv)
    names = [*args.systems, *(name for name, _ in args.variant)]
    if len(set(names)) < len(names):
        parser.error(f"each system once: {' '.join(names)}")
    return args


def variant(text: str) -> tuple[str, list[str]]:
    name, separator, flags = text.partition("=")
    if not separator or not name or name in ALL_SYSTEMS:
        raise argparse.ArgumentTypeError(
            f"expected NAME=FLAGS with a new NAME (not one of {', '.join(ALL_SYSTEMS)})")
    return name, flags.split()


class ServerSystem:
    def __init__(self, name: str, model: Path, threads: int, extra_buffers: str,
                 flags: list[str]) -> None:
        self.name = name
        self.server = LocalServer.start("--model", str(model), "--threads", str(threads),
                                        "--max-concurrency", "1", "--ctx-size", "2048",
                                        "--extra-buffers", extra_buffers, *flags)
        # One client for all requests, as an application keeps one (the `openai` client
        # does): a new httpx client loads the CA certificates, ~60 ms on 2 cores, which
        # timed per request made the server look 2% slower than it is.
        self.client = httpx.Client(base_url=self.server.base_url, timeout=600)

    def run(self, messages: list[dict], max_tokens: int) -> dict:
        before = scrape(self.client)
        body = {"model": "m", "messages": messages, "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        started = time.perf_counter()
        first, pieces, speculative = None, [], {}
        with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if chunk.get("speculative"):
                    speculative = chunk["speculative"]
                for choice in chunk.get("choices", []):
                    text = choice["delta"].get("content") or ""
                    if text and first is None:
                        first = time.perf_counter() - started
                    pieces.append(text)
        seconds = time.perf_counter() - started
        after = scrape(self.client)
        grew = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
        per_position, proposer = {}, None
        for name, value in grew.items():
            match = re.match(r'dovetail:spec_decode_num_accepted_tokens_per_pos_total'
                             r'\{position="(\d+)"\}', name)
            if match:
                per_position[int(match.group(1))] = value
            match = re.match(r'dovetail:spec_decode_requests_by_proposer_total'
                             r'\{proposer="(\w+)"\}', name)
            if match and value > 0:
                proposer = match.group(1)  # the server chose per request: this one
        return {"text": "".join(pieces), "seconds": seconds, "ttft": first,
                "tau": speculative.get("mean_accepted_length"),
                "verify_steps": speculative.get("verify_steps", 0),
                "drafted": speculative.get("drafted_tokens", 0),
                "accepted": speculative.get("accepted_tokens", 0),
                "drafts": grew.get("dovetail:spec_decode_num_drafts_total", 0.0),
                "accepted_per_position": per_position, "proposer": proposer,
                "draft_seconds": grew.get("dovetail:spec_decode_draft_seconds_total", 0.0),
                "draft_hidden_seconds": grew.get(
                    "dovetail:spec_decode_draft_hidden_seconds_total", 0.0),
                "predrafts": grew.get("dovetail:spec_decode_num_predrafts_total", 0.0),
                "predrafts_used": grew.get("dovetail:spec_decode_num_predrafts_used_total", 0.0),
                "verify_seconds": grew.get("dovetail:spec_decode_verify_seconds_total", 0.0),
                "prompt_seconds": grew.get("dovetail:prompt_seconds_total", 0.0),
                "draft_start_seconds": grew.get(
                    "dovetail:spec_decode_draft_start_seconds_total", 0.0)}

    def close(self) -> None:
        self.client.close()
        self.server.stop()


class LlamaSystem:
    def __init__(self, name: str, model: Path, threads: int, extra_buffers: str,
                 lookup_tokens: int) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        self.name = name
        draft = LlamaPromptLookupDecoding(num_pred_tokens=lookup_tokens) \
            if name == "llama-cpp-lookup" else None
        with llama_weight_buffers(extra_buffers):
            self.llm = Llama(str(model), n_ctx=2048, n_threads=threads,
                             n_threads_batch=threads, draft_model=draft, verbose=False)

    def run(self, messages: list[dict], max_tokens: int) -> dict:
        started = time.perf_counter()
        first, pieces = None, []
        for chunk in self.llm.create_chat_completion(messages=messages, temperature=0, top_k=1,
                                                     repeat_penalty=1.0, max_tokens=max_tokens,
                                                     stream=True):
            text = chunk["choices"][0]["delta"].get("content") or ""
            if text and first is None:
                first = time.perf_counter() - started
            pieces.append(text)
        return {"text": "".join(pieces), "seconds": time.perf_counter() - started,
                "ttft": first, "tau": None}

    def close(self) -> None:
        self.llm.close()


class WorkerLlamaSystem:
    """LlamaSystem in a subprocess whose llama_cpp comes from another folder (another build
    of the library cannot be loaded beside this one in one process)."""

    def __init__(self, name: str, model: Path, threads: int, extra_buffers: str,
                 library: Path) -> None:
        self.name = name
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(library), str(Path(__file__).resolve().parents[1])])}
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--llama-worker", str(model), str(threads),
             extra_buffers], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.kernels = self._call({"kernels": True})["kernels"]

    def _call(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith(WORKER_PREFIX):
                return json.loads(line.removeprefix(WORKER_PREFIX))
        raise RuntimeError(f"the {self.name} worker ended")

    def run(self, messages: list[dict], max_tokens: int) -> dict:
        return self._call({"messages": messages, "max_tokens": max_tokens})

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


WORKER_PREFIX = "WORKER "


def llama_worker(model: str, threads: str, extra_buffers: str) -> None:
    """Serve WorkerLlamaSystem's requests on stdin/stdout."""
    from verifier.kernels import kernels

    system = LlamaSystem("llama-cpp", Path(model), int(threads), extra_buffers, 0)
    for line in sys.stdin:
        request = json.loads(line)
        result = ({"kernels": kernels()} if request.get("kernels")
                  else system.run(request["messages"], request["max_tokens"]))
        print(WORKER_PREFIX + json.dumps(result), flush=True)
    system.close()


def scrape(client: httpx.Client) -> dict[str, float]:
    values = {}
    for line in client.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def extract_code(text: str) -> str:
    match = re.search(r"```(?:python)?\n(.*?)(?:```|$)", text, re.DOTALL)
    return match.group(1) if match else text


def passes(problem: dict, reply: str, timeout: float = 10.0) -> bool:
    program = "\n".join([problem["prompt"], extract_code(reply), problem["test"],
                         f"check({problem['entry_point']})"])
    try:
        result = subprocess.run([sys.executable, "-c", program], capture_output=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def summarise(name: str, rows: list[dict], baseline: list[dict] | None,
              stock: list[dict] | None = None) -> dict:
    rates = [row["tokens"] / row["seconds"] for row in rows]
    quartiles = statistics.quantiles(rates, n=4) if len(rates) > 1 else [rates[0]] * 3
    summary = {"system": name, "median_tok_s": statistics.median(rates),
               "q1_tok_s": quartiles[0], "q3_tok_s": quartiles[2],
               "total_tok_s": sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows),
               "median_ttft_s": statistics.median(r["ttft"] for r in rows
                                                  if r["ttft"] is not None)}
    if baseline is not None:
        base_total = sum(r["tokens"] for r in baseline) / sum(r["seconds"] for r in baseline)
        summary["speedup_total"] = summary["total_tok_s"] / base_total
        summary["speedup_median"] = statistics.median(
            (row["tokens"] / row["seconds"]) / (ref["tokens"] / ref["seconds"])
            for row, ref in zip(rows, baseline, strict=True))
        summary["same_text_as_llama_cpp"] = sum(row["text"] == ref["text"]
                                                for row, ref in zip(rows, baseline, strict=True))
    if stock is not None:
        stock_total = sum(r["tokens"] for r in stock) / sum(r["seconds"] for r in stock)
        summary["speedup_total_stock"] = summary["total_tok_s"] / stock_total
    if rows[0].get("tau") is not None:
        drafted = sum(r["drafted"] for r in rows)
        drafts = sum(r["drafts"] for r in rows)
        steps = sum(r["verify_steps"] for r in rows)
        summary["tau"] = sum(r["tau"] * r["verify_steps"] for r in rows) / steps
        summary["acceptance_rate"] = sum(r["accepted"] for r in rows) / drafted if drafted else None
        positions = sorted({p for r in rows for p in r["accepted_per_position"]})
        summary["accepted_per_position"] = {
            p: sum(r["accepted_per_position"].get(p, 0) for r in rows) / drafts
            for p in positions} if drafts else {}
        summary["draft_seconds"] = sum(r["draft_seconds"] for r in rows)
        # drafting ahead: the draft time hidden behind verification, the rest exposed
        hidden = sum(r.get("draft_hidden_seconds", 0.0) for r in rows)
        summary["draft_hidden_seconds"] = hidden
        summary["draft_exposed_seconds"] = summary["draft_seconds"] - hidden
        summary["draft_exposed_seconds_per_step"] = \
            summary["draft_exposed_seconds"] / steps if steps else None
        predrafts = sum(r.get("predrafts", 0.0) for r in rows)
        summary["predrafts"] = predrafts
        summary["predrafts_used_share"] = \
            sum(r.get("predrafts_used", 0.0) for r in rows) / predrafts if predrafts else None
        summary["verify_seconds"] = sum(r["verify_seconds"] for r in rows)
        # the server's share of the time to first token: the target reading the prompt,
        # then the draft taking it in (medians per request)
        summary["median_prompt_s"] = statistics.median(r["prompt_seconds"] for r in rows)
        summary["median_draft_start_s"] = statistics.median(r["draft_start_seconds"]
                                                            for r in rows)
        chosen = [r["proposer"] for r in rows if r.get("proposer")]
        if chosen:  # the server chose per request between the draft and lookup alone
            summary["requests_by_proposer"] = {name: chosen.count(name)
                                               for name in sorted(set(chosen))}
    if "passed" in rows[0]:
        summary["pass_at_1"] = sum(r["passed"] for r in rows) / len(rows)
    return summary


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    summaries = report["summary"]
    lines = [f"HumanEval problems {report['offset']}–{report['offset'] + report['count'] - 1}, "
             f"{report['max_tokens']} tokens, T=0, {report['threads']} threads, "
             f"{report['model']}; {report['machine']}"
             + ("" if report.get("extra_buffers", True) else
                "; weights in plain buffers (no AMX/repacking) for every system")
             + (f"; llama.cpp kernels: {report['kernels']}" if "kernels" in report else "")
             + (f" (llama-cpp-stock: {report['stock_kernels']})"
                if "stock_kernels" in report else ""), "",
             "| system | tok/s median (q1–q3) | total tok/s | vs llama-cpp | vs llama-cpp-stock "
             "| TTFT s | τ | acceptance | same text | pass@1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        def fmt(key, pattern, s=s):
            return pattern.format(s[key]) if s.get(key) is not None else "–"
        lines.append(
            f"| {s['system']} | {s['median_tok_s']:.1f} ({s['q1_tok_s']:.1f}–"
            f"{s['q3_tok_s']:.1f}) | {s['total_tok_s']:.1f} | {fmt('speedup_total', '{:.2f}x')} "
            f"| {fmt('speedup_total_stock', '{:.2f}x')} | {s['median_ttft_s']:.3f} "
            f"| {fmt('tau', '{:.2f}')} "
            f"| {fmt('acceptance_rate', '{:.2f}')} | {fmt('same_text_as_llama_cpp', '{}')} "
            f"| {fmt('pass_at_1', '{:.2f}')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 3.6))
    names = [s["system"] for s in summaries]
    medians = [s["median_tok_s"] for s in summaries]
    errors = [[m - s["q1_tok_s"] for m, s in zip(medians, summaries, strict=True)],
              [s["q3_tok_s"] - m for m, s in zip(medians, summaries, strict=True)]]
    bars = axis.bar(names, medians, yerr=errors, capsize=4, color="#2f6fb0")
    axis.bar_label(bars, fmt="%.1f", fontsize=8, label_type="center", color="white")
    axis.set_ylabel("tokens/s per request (median, quartiles)")
    plt.setp(axis.get_xticklabels(), rotation=20, ha="right", fontsize=8)
    axis.set_title(report["machine"], fontsize=8)
    figure.tight_layout()
    figure.savefig(out.parent / (out.name + "_throughput.png"), dpi=120)

    figure, axis = plt.subplots(figsize=(6.4, 3.6))
    for s in summaries:
        per_position = s.get("accepted_per_position") or {}
        if per_position:
            axis.plot(list(per_position), list(per_position.values()), marker="o",
                      label=s["system"])
    axis.set_xlabel("draft position")
    axis.set_ylabel("accepted per drafting step")
    axis.set_title("acceptance per draft position", fontsize=9)
    if axis.lines:
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out.parent / (out.name + "_acceptance.png"), dpi=120)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--llama-worker"]:
        llama_worker(*argv[1:])
        return
    args = parse_args(argv)
    model = args.model or default_model_path()
    if not args.f16:
        run(args, model)
        return
    with temporary_f16_copy(model) as f16:
        run(args, f16)


def run(args: argparse.Namespace, model: Path) -> None:
    threads = args.threads or physical_cores()
    problems = humaneval_problems(args.count, args.offset)
    systems = []
    try:
        for name in args.systems:
            if name in SERVER_SYSTEMS:
                flags = SERVER_SYSTEMS[name] + (args.serve_args.split() if name == "dovetail"
                                                else [])
                systems.append(ServerSystem(name, model, threads, args.extra_buffers, flags))
            else:
                systems.append(LlamaSystem(name, model, threads, args.extra_buffers,
                                           args.lookup_tokens))
        if args.stock_llama is not None:
            systems.append(WorkerLlamaSystem("llama-cpp-stock", model, threads,
                                             args.extra_buffers, args.stock_llama))
        for name, flags in args.variant:
            systems.append(ServerSystem(name, model, threads, args.extra_buffers, flags))
        tokenizer = _tokenizer(model)
        rows = {system.name: [] for system in systems}
        for problem in tqdm(problems, desc="HumanEval", unit="problem", dynamic_ncols=True):
            messages = humaneval_messages(problem)
            for system in systems:  # interleaved: A B C D per problem
                row = system.run(messages, args.max_tokens)
                row["task_id"] = problem["task_id"]
                row["tokens"] = len(tokenizer.encode(row["text"])) if row["text"] else 0
                if args.check:
                    row["passed"] = passes(problem, row["text"])
                rows[system.name].append(row)
    finally:
        for system in systems:
            system.close()
    baseline = rows.get("llama-cpp")
    report = {"machine": describe_cpu(), "model": model.name, "threads": threads,
              "kernels": kernels(),
              **{f"{system.name.removeprefix('llama-cpp-')}_kernels": system.kernels
                 for system in systems if isinstance(system, WorkerLlamaSystem)},
              "extra_buffers": use_extra_buffers(args.extra_buffers),
              "count": args.count, "offset": args.offset, "max_tokens": args.max_tokens,
              "serve_args": args.serve_args, "lookup_tokens": args.lookup_tokens,
              "variants": {name: " ".join(flags) for name, flags in args.variant},
              "summary": [summarise(name, system_rows, baseline, rows.get("llama-cpp-stock"))
                          for name, system_rows in rows.items()],
              "rows": rows}
    write_report(report, args.out)
    print(args.out.with_suffix(".md").read_text())


def _tokenizer(model: Path):
    from llama_cpp import Llama

    vocab = Llama(str(model), vocab_only=True, verbose=False)

    class _Encode:
        @staticmethod
        def encode(text: str) -> list[int]:
            return vocab.tokenize(text.encode(), add_bos=False, special=False)

    return _Encode()


if __name__ == "__main__":
    main()
