"""Structured-output throughput: constrained decoding, plain and speculative, on this machine.

Each case of scripts/data/extraction_prompts.json (20 extraction prompts, each with its JSON
schema) is one chat request with `response_format: json_schema` (T=0, --max-tokens), sent
to every system in turn (A B C A B C …), all on the same target file and thread count:

  constrained-plain   `dovetail serve --draft none`: the grammar masks each token
  constrained-lookup  `dovetail serve --draft ngram`: prompt lookup, plus the grammar's
                      forced tokens proposed for free and forbidden branches cut
  constrained-draft   `dovetail serve --draft shipped`: the draft model's trees with lookup

Reported per system: tokens/s (median, quartiles, total tokens / total time), τ (tokens per
verification step), the share of output tokens that the grammar forced (accepted forced
tokens / completion tokens), how many replies validate under their schema (`jsonschema`),
and how many equal the constrained-plain reply (the same tokens: exactness). The benchmark's
target is constrained speculation at ≥ 1.3x constrained plain decoding (total tok/s).

  python scripts/structured_throughput.py --out docs/structured_throughput
  python scripts/structured_throughput.py --f16 --out docs/structured_throughput_f16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx
import jsonschema
from tqdm import tqdm

from server.local_server import LocalServer
from verifier.default_model import default_model_path
from verifier.gguf_convert import temporary_f16_copy
from verifier.machine import describe_cpu, physical_cores

CASES = Path(__file__).resolve().parent / "data" / "extraction_prompts.json"
SYSTEMS = {"constrained-plain": ["--draft", "none"],
           "constrained-lookup": ["--draft", "ngram"],
           "constrained-draft": ["--draft", "shipped"]}
BASELINE = "constrained-plain"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="GGUF (default: the packaged "
                        "SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--f16", action="store_true",
                        help="serve an F16 copy of the model (written to a temporary folder)")
    parser.add_argument("--count", type=int, default=20, help="cases (of 20)")
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--out", type=Path, default=Path("structured_throughput"),
                        help="report path without suffix (.json, .md, .png are written)")
    return parser.parse_args(argv)


class ServerSystem:
    def __init__(self, name: str, model: Path, threads: int) -> None:
        self.name = name
        self.server = LocalServer.start("--model", str(model), "--threads", str(threads),
                                        "--max-concurrency", "1", "--ctx-size", "2048",
                                        *SYSTEMS[name])
        self.client = httpx.Client(base_url=self.server.base_url, timeout=600)

    def run(self, case: dict, max_tokens: int) -> dict:
        body = {"model": "m", "messages": [{"role": "user", "content": case["prompt"]}],
                "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True},
                "response_format": {"type": "json_schema", "json_schema": {
                    "name": case["name"], "schema": case["schema"], "strict": True}}}
        started = time.perf_counter()
        pieces, usage, speculative = [], {}, {}
        with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                usage = chunk.get("usage") or usage
                speculative = chunk.get("speculative") or speculative
                for choice in chunk.get("choices", []):
                    pieces.append(choice["delta"].get("content") or "")
        seconds = time.perf_counter() - started
        text = "".join(pieces)
        return {"name": case["name"], "text": text, "seconds": seconds,
                "tokens": usage["completion_tokens"], "valid": is_valid(text, case["schema"]),
                "verify_steps": speculative["verify_steps"],
                "chosen": speculative["mean_accepted_length"] * speculative["verify_steps"],
                "forced": speculative["forced_tokens"],
                "drafted": speculative["drafted_tokens"],
                "accepted": speculative["accepted_tokens"]}

    def close(self) -> None:
        self.client.close()
        self.server.stop()


def is_valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def summarise(name: str, rows: list[dict], baseline: list[dict]) -> dict:
    rates = [row["tokens"] / row["seconds"] for row in rows]
    tokens, seconds = sum(row["tokens"] for row in rows), sum(row["seconds"] for row in rows)
    steps = sum(row["verify_steps"] for row in rows)
    base_rate = sum(row["tokens"] for row in baseline) / sum(row["seconds"] for row in baseline)
    same = sum(row["text"] == base["text"] for row, base in zip(rows, baseline, strict=True))
    q1, _, q3 = statistics.quantiles(rates, n=4) if len(rates) > 1 else (rates[0],) * 3
    return {"system": name, "median_tok_s": statistics.median(rates), "q1_tok_s": q1,
            "q3_tok_s": q3, "total_tok_s": tokens / seconds,
            "speedup_total": tokens / seconds / base_rate,
            "tau": sum(row["chosen"] for row in rows) / steps if steps else None,
            "forced_share": sum(row["forced"] for row in rows) / tokens if tokens else 0.0,
            "valid": f"{sum(row['valid'] for row in rows)}/{len(rows)}",
            "same_text_as_plain": f"{same}/{len(rows)}"}


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"{report['count']} JSON-schema extraction prompts, up to {report['max_tokens']} "
             f"tokens, T=0, {report['threads']} threads, {report['model']}; "
             f"{report['machine']}", "",
             "| system | tok/s median (q1–q3) | total tok/s | vs constrained-plain | τ "
             "| forced share | valid | same text |", "|---|---|---|---|---|---|---|---|"]
    for s in report["summary"]:
        tau = "–" if s["tau"] is None else f"{s['tau']:.2f}"
        lines.append(f"| {s['system']} | {s['median_tok_s']:.1f} ({s['q1_tok_s']:.1f}–"
                     f"{s['q3_tok_s']:.1f}) | {s['total_tok_s']:.1f} | "
                     f"{s['speedup_total']:.2f}x | {tau} | {s['forced_share']:.2f} | "
                     f"{s['valid']} | {s['same_text_as_plain']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = report["summary"]
    figure, axis = plt.subplots(figsize=(6.4, 3.6))
    names = [s["system"] for s in summaries]
    totals = [s["total_tok_s"] for s in summaries]
    bars = axis.bar(names, totals, color="#2f6fb0")
    axis.bar_label(bars, labels=[f"{s['speedup_total']:.2f}x, {s['forced_share']:.0%} forced"
                                 for s in summaries], fontsize=8)
    axis.set_ylabel("total tokens/s")
    axis.set_title(f"JSON-schema extraction; {report['machine']}", fontsize=8)
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=120)


def main(argv=None) -> None:
    args = parse_args(argv)
    model = args.model or default_model_path()
    if not args.f16:
        run(args, model)
        return
    with temporary_f16_copy(model) as f16:
        run(args, f16)


def run(args: argparse.Namespace, model: Path) -> None:
    cases = json.loads(CASES.read_text())[: args.count]
    systems = [ServerSystem(name, model, args.threads) for name in args.systems]
    rows: dict[str, list[dict]] = {system.name: [] for system in systems}
    try:
        for system in systems:  # untimed: the first request reads the vocabulary for grammars
            system.run(cases[0], 8)
        for case in tqdm(cases, desc="cases", unit="case"):
            for system in systems:  # interleaved: drift in the machine hits all alike
                rows[system.name].append(system.run(case, args.max_tokens))
    finally:
        for system in systems:
            system.close()
    baseline = rows.get(BASELINE) or next(iter(rows.values()))
    report = {"model": model.name, "machine": describe_cpu(), "threads": args.threads,
              "count": len(cases), "max_tokens": args.max_tokens,
              "summary": [summarise(name, found, baseline) for name, found in rows.items()],
              "rows": rows}
    write_report(report, args.out)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
