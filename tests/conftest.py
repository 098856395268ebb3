"""Shared fixtures: the real default model, its F16 copy, and targets over both."""

from __future__ import annotations

import os
from pathlib import Path

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
