"""scripts/humaneval_throughput.py on a tiny run: all four systems, the report's numbers
consistent with each other, the files written."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import llama_cpp
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "humaneval_throughput.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput") / "he"
    argv = sys.argv
    # the worker system, here on this same build (CI has no other): the plumbing
    library = Path(llama_cpp.__file__).resolve().parent.parent
    sys.argv = [str(SCRIPT), "--count", "2", "--max-tokens", "12", "--check",
                "--threads", "2", "--stock-llama", str(library), "--out", str(out)]
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        sys.argv = argv
    return out, json.loads(out.with_suffix(".json").read_text())


def test_report_covers_every_system_and_problem(report):
    out, data = report
    systems = [s["system"] for s in data["summary"]]
    assert systems == ["dovetail", "dovetail-plain", "llama-cpp", "llama-cpp-lookup",
                       "llama-cpp-stock"]
    assert data["kernels"] == data["stock_kernels"] == "exact"
    for name in systems:
        rows = data["rows"][name]
        assert [row["task_id"] for row in rows] == ["HumanEval/0", "HumanEval/1"]
        assert all(0 < row["tokens"] <= 16 and row["seconds"] > 0 for row in rows)
        assert all(isinstance(row["passed"], bool) for row in rows)
    by_name = {s["system"]: s for s in data["summary"]}
    assert by_name["llama-cpp"]["speedup_total"] == pytest.approx(1.0)
    assert by_name["dovetail-plain"]["tau"] == pytest.approx(1.0)  # one token per pass
    assert by_name["dovetail-plain"]["acceptance_rate"] is None
    # the first token's time, split: the target read every prompt; only a proposer takes
    # the prompt in afterwards
    assert by_name["dovetail"]["median_prompt_s"] > 0
    assert by_name["dovetail-plain"]["median_prompt_s"] > 0
    assert by_name["dovetail"]["median_draft_start_s"] > 0
    assert by_name["dovetail-plain"]["median_draft_start_s"] == 0
    # plain and speculative decoding of the same model say what llama-cpp-python says, and
    # the worker's library (the same build here) too
    assert by_name["dovetail-plain"]["same_text_as_llama_cpp"] == 2
    assert by_name["dovetail"]["same_text_as_llama_cpp"] == 2
    assert by_name["llama-cpp-stock"]["same_text_as_llama_cpp"] == 2
    assert by_name["llama-cpp"]["speedup_total_stock"] > 0
    for s in data["summary"]:
        assert s["q1_tok_s"] <= s["median_tok_s"] <= s["q3_tok_s"]
        assert 0 <= s["pass_at_1"] <= 1
    table = out.with_suffix(".md").read_text()
    assert all(f"| {name} |" in table for name in systems)
    for suffix in ("_throughput.png", "_acceptance.png"):
        assert (out.parent / (out.name + suffix)).stat().st_size > 1000


def test_code_extraction_and_the_execution_check():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import humaneval_throughput as script
    finally:
        sys.path.pop(0)
    problem = {"prompt": "def add(a, b):\n    \"\"\"Add.\"\"\"\n",
               "test": "def check(f):\n    assert f(2, 3) == 5\n", "entry_point": "add"}
    good = "Here:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert script.extract_code(good) == "def add(a, b):\n    return a + b\n"
    assert script.passes(problem, good)
    assert not script.passes(problem, "```python\ndef add(a, b):\n    return a - b\n```")
    assert not script.passes(problem, "```python\nwhile True:\n    pass\n```", timeout=1)


def test_variants_are_named_server_flags_and_every_name_is_new():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import humaneval_throughput as script
    finally:
        sys.path.pop(0)
    args = script.parse_args(["--variant", "own=--no-lookup-shared --draft ngram"])
    assert args.variant == [("own", ["--no-lookup-shared", "--draft", "ngram"])]
    for bad in (["--variant", "own"], ["--variant", "=--draft ngram"],
                ["--variant", "dovetail=--draft none"],
                ["--variant", "a=--draft none", "--variant", "a=--draft ngram"]):
        with pytest.raises(SystemExit):
            script.parse_args(bad)


def test_f16_flag_runs_the_systems_on_an_unquantized_copy(tmp_path):
    out = tmp_path / "he16"
    argv = sys.argv
    sys.argv = [str(SCRIPT), "--f16", "--count", "1", "--max-tokens", "8", "--threads", "2",
                "--systems", "dovetail-plain", "llama-cpp", "--variant",
                "chains=--draft ngram --no-adaptive-budget --no-lookup-shared",
                "--out", str(out)]
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        sys.argv = argv
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["model"].endswith("-f16.gguf")
    assert [s["system"] for s in data["summary"]] == ["dovetail-plain", "llama-cpp", "chains"]
    # the F16 copy decodes greedily to the same text in the server and in llama-cpp-python
    assert data["summary"][0]["same_text_as_llama_cpp"] == 1
    # a variant is the server with its flags: here it drafts a lookup chain every step
    assert data["variants"] == {"chains": "--draft ngram --no-adaptive-budget --no-lookup-shared"}
    assert data["rows"]["chains"][0]["drafted"] > 0
    assert data["rows"]["llama-cpp"][0]["tokens"] > 0
