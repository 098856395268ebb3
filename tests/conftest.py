"""Shared fixtures: the real default model, its F16 copy, and targets over both."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from server.local_server import LocalServer
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


def start_server(*extra_args: str, api_key: str = API_KEY,
                 log_path: Path | None = None) -> LocalServer:
    """`dovetail serve` on a free loopback port, with the tests' thread count and API key."""
    return LocalServer.start("--threads", str(NUM_THREADS), *extra_args, api_key=api_key,
                             log_path=log_path)


def stop_server(server: LocalServer) -> None:
    server.stop()


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


NEAR_TIE = 0.05  # top-1 minus top-2 logit of the plain decoding


def prompt_tokens(target, text):
    return target.tokenizer.encode(target.chat_template.render([{"role": "user", "content": text}]))


@dataclass(frozen=True)
class Reference:
    tokens: list[int]
    gaps: list[float]  # top-1 minus top-2 logit where each output token was chosen


def plain_greedy(target, text: str | list[int], max_new) -> Reference:
    """One token per decode, recording the top-two logit gap of every choice (text: a user
    message, or a whole prompt's tokens)."""
    slot = target.acquire_slot()
    tokens = prompt_tokens(target, text) if isinstance(text, str) else text
    logits = target.prefill(slot, tokens).last_logits
    tokens, gaps = [], []
    while True:
        top2 = np.sort(logits)[-2:]
        gaps.append(float(top2[1] - top2[0]))
        token = int(np.argmax(logits))
        if target.tokenizer.is_end_of_generation(token):
            break
        tokens.append(token)
        if len(tokens) == max_new:
            break
        logits = target.decode(slot, token).logits[0]
        target.commit(slot, [0])
    target.release_slot(slot)
    return Reference(tokens, gaps)
