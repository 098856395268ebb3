"""scripts/profile_costs.py and the random-weights GGUF it times, on tiny shapes."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from verifier.costs import VerifyCosts
from verifier.gguf_convert import write_random_llama
from verifier.target import Target, TargetConfig

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "profile_costs.py"
TINY = {"vocab": 512, "hidden": 128, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 256}


def test_a_random_llama_gguf_loads_and_decodes(tmp_path):
    path = write_random_llama(tmp_path / "tiny.gguf", **TINY)
    target = Target(TargetConfig(model_path=path, num_slots=1, ctx_size=128, max_tree_nodes=4,
                                 max_tree_branches=1, num_threads=1, features=False))
    try:
        assert target.vocab_size == 512 and target.hidden_size == 128
        slot = target.acquire_slot()
        assert np.isfinite(target.prefill(slot, list(range(3, 30))).last_logits).all()
        assert target.verify_tree(slot, [5, 6, 7], [-1, 0, 1]).logits.shape == (3, 512)
    finally:
        target.close()


def test_costs_interpolate_and_extrapolate():
    costs = VerifyCosts({1: 0.010, 2: 0.014, 4: 0.020})
    assert costs.of(3) == pytest.approx(0.017)
    assert costs.of(6) == pytest.approx(0.026)  # the last slope, 3 ms per token
    assert VerifyCosts.from_json(costs.as_json()) == costs


def test_profile_script_reports_and_projects(tmp_path):
    small = write_random_llama(tmp_path / "small.gguf", **TINY)
    bigger = write_random_llama(tmp_path / "bigger.gguf", **{**TINY, "layers": 4})
    out = tmp_path / "profile"
    argv = sys.argv
    sys.argv = [str(SCRIPT), "--model", str(small), "--max-k", "8", "--repeats", "1",
                "--context", "16", "--threads", "1", "--random-7b", str(bigger),
                "--out", str(out)]
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        sys.argv = argv
    report = json.loads(out.with_suffix(".json").read_text())
    profiles = list(report["profiles"].values())
    assert [int(k) for k in profiles[0]] == list(range(1, 9))
    assert [int(k) for k in profiles[1]] == [1, 2, 4, 8]
    assert all(v > 0 for profile in profiles for v in profile.values())
    assert report["prefill_seconds"]["small.gguf"] > 0 and report["kernels"] == "exact"
    table = out.with_suffix(".md").read_text()
    assert "| small.gguf |" in table and "Prompt of 16 tokens in one decode" in table
    for suffix in ("_verify.png", "_projection_7b.png"):
        assert (tmp_path / ("profile" + suffix)).stat().st_size > 1000


def test_profile_script_times_the_draft_and_traces_a_tree(tmp_path, capsys, default_model):
    out = tmp_path / "profile"
    argv = sys.argv
    sys.argv = [str(SCRIPT), "--model", str(default_model), "--max-k", "2", "--repeats", "1",
                "--context", "16", "--threads", "1", "--draft", "shipped", "--draft-top-k", "2",
                "--trace", "--out", str(out)]
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        sys.argv = argv
    draft = json.loads(out.with_suffix(".json").read_text())["draft"]
    assert draft["level_seconds"] > 0 and draft["tree_seconds"]["device"] > 0
    printed = capsys.readouterr().out
    assert "one tree, grown on the device:" in printed
    assert "aten::" in printed  # operations by time

