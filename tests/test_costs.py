"""T_V(k) measurement: interleaved rounds keep a burst of other load from inflating one size,
noise never makes more tokens look cheaper than fewer, and the cache is measured once; the
served decodes correct the profile (LiveCosts)."""

from __future__ import annotations

import itertools
import json
import threading
from types import SimpleNamespace

import pytest

from verifier import costs as costs_module
from verifier.costs import (
    LiveCosts,
    VerifyCosts,
    cached_verify_costs,
    measure_verify_costs,
    non_decreasing,
)
from verifier.machine import describe_cpu, physical_cores

TRUE_MS = {1: 15.0, 2: 25.0, 3: 34.0, 4: 35.0, 6: 45.0, 8: 58.0}


class TimedTarget:
    """A target whose k-token decode takes TRUE_MS[k] on a fake clock, plus `burst_ms` for
    the calls numbered in `burst` (another program busy on the same cores)."""

    def __init__(self, clock, burst=range(0), burst_ms=0.0):
        self.clock, self.burst, self.burst_ms = clock, burst, burst_ms
        self.config = SimpleNamespace(max_tree_nodes=8)
        self.vocab_size = 1000
        self.calls, self.free, self.pending = 0, True, False

    def acquire_slot(self):
        assert self.free
        self.free = False
        return 0

    def release_slot(self, slot):
        self.free = True

    def prefill(self, slot, tokens):
        pass

    def verify_tree(self, slot, tokens, parents):
        assert parents == list(range(-1, len(tokens) - 1)) and not self.pending
        extra = self.burst_ms if self.calls in self.burst else 0.0
        self.clock.now += (TRUE_MS[len(tokens)] + extra) / 1000
        self.calls += 1
        self.pending = True

    def commit(self, slot, path):
        assert path == []
        self.pending = False


@pytest.fixture
def clock(monkeypatch):
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(costs_module.time, "perf_counter", lambda: clock.now)
    return clock


def test_a_burst_of_load_lands_on_every_size_alike(clock):
    # 10 slow calls in a row: measured one size after another, they would be 10 of one
    # size's 15 repeats and move its median; in rounds each size gets at most 2 of them
    target = TimedTarget(clock, burst=range(20, 30), burst_ms=100.0)
    measured = measure_verify_costs(target, sizes=TRUE_MS, repeats=15, max_seconds=None)
    assert {k: round(v * 1000, 6) for k, v in measured.seconds.items()} == TRUE_MS
    assert target.calls == 16 * len(TRUE_MS) and target.free and not target.pending


def test_measurement_stops_after_its_time_budget_but_not_before_three_rounds(clock):
    target = TimedTarget(clock)
    measure_verify_costs(target, sizes=TRUE_MS, repeats=15, max_seconds=0.0)
    assert target.calls == 4 * len(TRUE_MS)  # the warm-up and three rounds
    target = TimedTarget(clock)
    measure_verify_costs(target, sizes=TRUE_MS, repeats=15, max_seconds=1.0)
    assert target.calls == 5 * len(TRUE_MS)  # 212 ms a round: past 1 s after the 4th
    target = TimedTarget(clock)
    measured = measure_verify_costs(target, sizes=(1, 2, 16), repeats=2, max_seconds=None)
    assert set(measured.seconds) == {1, 2}  # sizes over the target's tree limit are skipped


def test_the_measurement_runs_on_a_thread_of_its_own_that_ends_with_it(clock):
    target, seen = TimedTarget(clock), set()
    verify = target.verify_tree

    def recording_verify(*args):
        seen.add(threading.current_thread())
        verify(*args)

    target.verify_tree = recording_verify
    measure_verify_costs(target, sizes=(1, 2), repeats=2, max_seconds=None)
    assert len(seen) == 1 and threading.current_thread() not in seen
    assert not seen.pop().is_alive()
    target.verify_tree = lambda *args: 1 / 0  # a failure reaches the caller
    with pytest.raises(ZeroDivisionError):
        measure_verify_costs(target, sizes=(1,), repeats=1, max_seconds=None)


def test_more_tokens_never_cost_less():
    assert non_decreasing({1: 1.0, 2: 3.0, 3: 2.5, 4: 2.4, 6: 4.0}) == \
        {1: 1.0, 2: 2.4, 3: 2.4, 4: 2.4, 6: 4.0}
    steady = {1: 1.0, 2: 1.7, 4: 2.5}
    assert non_decreasing(steady) == steady


def test_costs_are_measured_once_and_entries_of_an_older_measurement_are_ignored(
        tmp_path, monkeypatch):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"gguf")
    target = SimpleNamespace(config=SimpleNamespace(model_path=model, num_threads=2,
                                                    max_tree_nodes=8, extra_buffers="on"))
    calls = []

    def measure(target, progress=None):
        calls.append(progress)
        return VerifyCosts({1: 0.015, 2: 0.026})

    monkeypatch.setattr(costs_module, "measure_verify_costs", measure)
    stat = model.stat()
    old_key = f"model.gguf|{stat.st_size}|{int(stat.st_mtime)}|2|8|{describe_cpu()}"
    cache = tmp_path / "verify_costs.json"
    cache.write_text(json.dumps({old_key: {"1": 0.015, "2": 0.030}}))
    assert cached_verify_costs(target, cache) == VerifyCosts({1: 0.015, 2: 0.026})
    assert cached_verify_costs(target, cache) == VerifyCosts({1: 0.015, 2: 0.026})
    assert len(calls) == 1 and calls[0]  # measured once, with a progress bar
    entries = json.loads(cache.read_text())
    assert old_key in entries and len(entries) == 2
    # weights in plain buffers run other kernels: measured apart
    target.config.extra_buffers = "off"
    cached_verify_costs(target, cache)
    assert len(calls) == 2 and len(json.loads(cache.read_text())) == 3


PROFILE = VerifyCosts({1: 1.0, 2: 1.7, 4: 2.5, 8: 4.0})


def observe(costs, tokens, seconds, times):
    for _ in range(times):
        costs.observe(tokens, seconds)


def test_live_costs_keep_the_profile_until_a_size_has_enough_decodes():
    costs = LiveCosts(PROFILE, min_count=8, refresh=1)
    observe(costs, 8, 6.0, 7)
    assert costs.current == PROFILE and costs.of(8) == 4.0
    costs.observe(8, 6.0)
    assert costs.of(8) == pytest.approx(6.0)


def test_live_costs_learn_what_the_sizes_the_budget_picks_really_cost():
    costs = LiveCosts(PROFILE, min_count=8, refresh=1)
    observe(costs, 1, 1.0, 8)
    observe(costs, 8, 5.0, 8)  # 8 tokens cost 1.25x the profile
    assert costs.of(1) == pytest.approx(1.0) and costs.of(8) == pytest.approx(5.0)
    # in between: the profile's shape, scaled by the ratio interpolated over k
    assert costs.of(4) == pytest.approx(2.5 * (1 + 0.25 * 3 / 7))
    assert costs.of(2) == pytest.approx(1.7 * (1 + 0.25 / 7))
    sizes = sorted(costs.seconds)
    assert all(costs.of(a) <= costs.of(b) for a, b in itertools.pairwise(sizes))


def test_one_observed_size_scales_the_whole_curve():
    costs = LiveCosts(PROFILE, min_count=4, refresh=4)
    observe(costs, 1, 1.2, 4)  # only plain decoding so far: one token costs 1.2x
    for k in (1, 2, 3, 4, 8, 16):
        assert costs.of(k) == pytest.approx(1.2 * PROFILE.of(k))
    assert costs.of(4) / costs.of(1) == pytest.approx(2.5)  # the ratios the budget uses stay


def test_a_stray_slow_decode_moves_nothing_and_old_decodes_are_forgotten():
    costs = LiveCosts(PROFILE, window=32, min_count=8, refresh=1)
    observe(costs, 1, 1.0, 20)
    costs.observe(1, 50.0)  # a pause: garbage collection, another program
    observe(costs, 1, 1.0, 11)
    assert costs.of(1) == pytest.approx(1.0)
    observe(costs, 1, 2.0, 32)  # the machine got slower: the window holds only the new times
    assert costs.of(1) == pytest.approx(2.0) and costs.num_observed == 32


def test_live_costs_refresh_their_table_only_every_few_decodes():
    costs = LiveCosts(PROFILE, min_count=1, refresh=16)
    observe(costs, 1, 3.0, 15)
    assert costs.of(1) == 1.0
    costs.observe(1, 3.0)
    assert costs.of(1) == pytest.approx(3.0)
    costs.observe(2, 0.0)  # nothing measured: ignored
    assert costs.num_observed == 16


@pytest.mark.parametrize(("flags", "shown"), [("fpu avx avx2 fma", " (AVX2)"),
                                              ("fpu avx2 avx512f avx512bw", " (AVX-512)"),
                                              ("fpu sse2", "")])
def test_the_machine_name_tells_the_vector_extension(tmp_path, flags, shown):
    """Cached costs and reports are keyed by it: two 'AMD EPYC' machines, one with AVX-512,
    decode one Q4_1 token in 6.4 and 15-17 ms."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n")
    assert describe_cpu(str(cpuinfo)) == f"AMD EPYC{shown}, {physical_cores()} cores"
