"""Numeric work off the engine's thread runs on a thread that ends with it, so the OpenMP
worker pools it starts (llama.cpp and PyTorch share one libgomp) do not stay behind and
slow every decode of the engine thread (verifier/machine.run_on_fresh_thread)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from verifier.costs import measure_verify_costs
from verifier.machine import run_on_fresh_thread

needs_proc = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")


def os_threads() -> set[int]:
    return {int(entry.name) for entry in Path("/proc/self/task").iterdir()}


def left_behind(before: set[int], allowed: set[int], seconds: float = 5.0) -> set[int]:
    """Threads started since `before`, other than `allowed`, once the ending ones are gone."""
    deadline = time.monotonic() + seconds
    while (new := os_threads() - before - allowed) and time.monotonic() < deadline:
        time.sleep(0.05)
    return new


def parallel_copy() -> float:
    """A PyTorch CPU op big enough to run as an OpenMP parallel region."""
    return float(torch.ones(4_000_000).clone().sum())


def on_a_long_lived_thread(work) -> set[int]:
    """Run work on a thread that stays alive afterwards (like the server's loading worker);
    return the threads left behind while it is still alive."""
    before = os_threads()
    done, release = threading.Event(), threading.Event()
    caller: list[int] = []

    def live() -> None:
        caller.append(threading.get_native_id())
        work()
        done.set()
        release.wait()

    thread = threading.Thread(target=live)
    thread.start()
    try:
        assert done.wait(60)
        return left_behind(before, set(caller))
    finally:
        release.set()
        thread.join()


def test_the_fresh_thread_returns_the_result_or_raises_the_error():
    assert run_on_fresh_thread(lambda a, b: a + b, 2, 3) == 5
    seen = []
    run_on_fresh_thread(lambda: seen.append(threading.current_thread()))
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()
    with pytest.raises(KeyError, match="missing"):
        run_on_fresh_thread(lambda: {}["missing"])


@needs_proc
@pytest.mark.skipif(torch.get_num_threads() < 2, reason="PyTorch runs single-threaded here")
def test_a_pytorch_parallel_op_on_a_fresh_thread_leaves_no_workers_behind():
    assert not on_a_long_lived_thread(lambda: run_on_fresh_thread(parallel_copy))


@needs_proc
def test_measuring_the_costs_leaves_no_llama_cpp_workers_on_the_callers_thread(q4_target):
    """The server used to measure on its loading thread, which lives on: llama.cpp's pool
    for that thread stayed, and the engine thread's decodes took 21 ms instead of 7.7."""
    assert not on_a_long_lived_thread(lambda: measure_verify_costs(
        q4_target, sizes=(1, 2), context=16, repeats=1, max_seconds=None))


def test_the_server_builds_its_engine_on_a_thread_that_has_ended_when_it_is_ready():
    builders: list[threading.Thread] = []
    started = threading.Event()
    engine = SimpleNamespace(metrics=None, start=started.set, stop=lambda: None,
                             target=SimpleNamespace(close=lambda: None))

    def factory(settings):
        builders.append(threading.current_thread())
        parallel_copy()  # as loading a draft does
        return engine

    app = create_app(Settings(draft="none"), engine_factory=factory)
    with TestClient(app):
        assert started.wait(30) and len(builders) == 1
        assert builders[0] is not threading.current_thread() and not builders[0].is_alive()
