"""Shared fixtures: the real default model, its F16 copy, and targets over both."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from verifier.default_model import default_model_path
from verifier.gguf_convert import write_f16_copy
from verifier.target import Target, TargetConfig

NUM_THREADS = min(os.cpu_count() or 1, 4)


@pytest.fixture(scope="session")
def default_model() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def f16_model(tmp_path_factory, default_model) -> Path:
    return write_f16_copy(default_model, tmp_path_factory.mktemp("models") / "smollm2-f16.gguf")


def is_valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def make_target(path: Path, **overrides) -> Target:
    config = dict(model_path=path, num_slots=3, ctx_size=1024, max_tree_nodes=32,
                  max_tree_branches=8, num_threads=NUM_THREADS)
    config.update(overrides)
    return Target(TargetConfig(**config))


@pytest.fixture(scope="session")
def q4_target(default_model):
    target = make_target(default_model)
    yield target
    target.close()


@pytest.fixture(scope="session")
def f16_target(f16_model):
    target = make_target(f16_model)
    yield target
    target.close()


API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class LiveServer:
    base_url: str  # http://127.0.0.1:PORT
    api_key: str
    process: subprocess.Popen

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def start_server(*extra_args: str, api_key: str = API_KEY,
                 log_path: Path | None = None) -> LiveServer:
    """`dovetail serve` in a subprocess on a free loopback port; returns once /health is 200."""
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--port", str(port),
               "--api-key", api_key, "--threads", str(NUM_THREADS), *extra_args]
    if log_path is None:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    else:
        with open(log_path, "wb") as log:  # the child keeps its own handle
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {command}")
        try:
            if httpx.get(base_url + "/health", timeout=1).status_code == 200:
                return LiveServer(base_url, api_key, process)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not become ready")


def stop_server(server: LiveServer) -> None:
    server.process.send_signal(signal.SIGINT)
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The default model served with plain decoding (what `--draft auto` picks without a
    GPU; named explicitly so the tests mean the same on a GPU machine), with an API key."""
    live = start_server("--ctx-size", "2048", "--max-concurrency", "2", "--draft", "none",
                        log_path=tmp_path_factory.mktemp("logs") / "server.log")
    yield live
    stop_server(live)


@pytest.fixture(scope="session")
def client(server):
    import openai  # only the API tests need the client

    return openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0, timeout=120)
