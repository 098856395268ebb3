"""scripts/structured_throughput.py on a tiny run: every system, valid replies equal to
constrained plain decoding's, forced tokens counted, the files written."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "structured_throughput.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("structured") / "st"
    argv = sys.argv
    sys.argv = [str(SCRIPT), "--count", "2", "--threads", "2", "--out", str(out)]
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        sys.argv = argv
    return out, json.loads(out.with_suffix(".json").read_text())


def test_every_system_answers_every_case_validly_and_exactly(report):
    _, data = report
    summary = {s["system"]: s for s in data["summary"]}
    assert list(summary) == ["constrained-plain", "constrained-lookup", "constrained-draft"]
    for name, s in summary.items():
        assert s["valid"] == "2/2" and s["same_text_as_plain"] == "2/2", name
        assert [row["name"] for row in data["rows"][name]] == ["person", "company"]
    plain = summary["constrained-plain"]
    assert plain["speedup_total"] == pytest.approx(1.0) and plain["tau"] == pytest.approx(1.0)
    assert plain["forced_share"] == 0.0
    for name in ("constrained-lookup", "constrained-draft"):
        rows = data["rows"][name]
        assert summary[name]["forced_share"] == pytest.approx(
            sum(r["forced"] for r in rows) / sum(r["tokens"] for r in rows))
        assert summary[name]["forced_share"] > 0.1 and summary[name]["tau"] > 1.0


def test_the_table_and_plot_are_written(report):
    out, data = report
    table = out.with_suffix(".md").read_text()
    assert all(f"| {s['system']} |" in table for s in data["summary"])
    assert out.with_suffix(".png").stat().st_size > 0
