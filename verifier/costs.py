"""T_V(k): what verifying k tokens in one decode costs on this machine, measured on the
target itself, cached per model file, thread count and CPU."""

from __future__ import annotations

import json
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from verifier.machine import describe_cpu, run_on_fresh_thread
from verifier.target import Target
from verifier.weight_buffers import use_extra_buffers

DEFAULT_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16)
CACHE_VERSION = 3  # bump when the measurement changes: older entries are measured again


@dataclass(frozen=True)
class VerifyCosts:
    seconds: dict[int, float]  # tokens in one decode → seconds (median)

    def of(self, tokens: int) -> float:
        """Piecewise-linear in the measured sizes; beyond them, the last slope."""
        sizes = sorted(self.seconds)
        times = [self.seconds[k] for k in sizes]
        if tokens <= sizes[-1] or len(sizes) == 1:
            return float(np.interp(tokens, sizes, times))
        slope = (times[-1] - times[-2]) / (sizes[-1] - sizes[-2])
        return times[-1] + slope * (tokens - sizes[-1])

    def observe(self, tokens: int, seconds: float) -> None:
        """A fixed profile (tests, offline tools) learns nothing from the decodes."""

    def as_json(self) -> dict[str, float]:
        return {str(k): v for k, v in sorted(self.seconds.items())}

    @classmethod
    def from_json(cls, data: dict[str, float]) -> VerifyCosts:
        return cls({int(k): float(v) for k, v in data.items()})


class LiveCosts:
    """T_V(k) as this process sees it: the start-up profile, corrected by the decodes the
    engine actually times.

    The profile is measured once (and cached) on a quiet target at one context length; what
    the served decodes cost can differ — longer contexts, the server's own threads on the
    same cores, a profile taken during a burst of other load. Per size verified, the last
    `window` decode times are kept; a size with at least `min_count` of them costs their
    median (robust to a stray slow decode). Between such sizes the profile's shape is kept,
    scaled by the observed/profiled ratio interpolated between the nearest observed sizes
    (beyond them, the nearest one's), then made non-decreasing. So a server that mostly
    decodes plainly (size 1) scales the whole curve by what one token really costs, and
    one that drafts 7 tokens learns what 8 really cost: a profile that was too optimistic
    about the sizes the budget picks corrects itself within a few dozen steps.
    """

    def __init__(self, profile: VerifyCosts, window: int = 32, min_count: int = 8,
                 refresh: int = 16) -> None:
        self.profile = profile
        self.window, self.min_count, self.refresh = window, min_count, refresh
        self._observed: dict[int, deque[float]] = {}
        self._since_refresh = 0
        self.current = profile  # the corrected table, rebuilt every `refresh` observations

    def of(self, tokens: int) -> float:
        return self.current.of(tokens)

    @property
    def seconds(self) -> dict[int, float]:
        return self.current.seconds

    @property
    def num_observed(self) -> int:
        """Decode times held (at most `window` per size)."""
        return sum(len(times) for times in self._observed.values())

    def observe(self, tokens: int, seconds: float) -> None:
        """One decode of `tokens` tokens (all drafted trees of a step, no prompt chunk)."""
        if tokens < 1 or not seconds > 0:
            return
        self._observed.setdefault(tokens, deque(maxlen=self.window)).append(seconds)
        self._since_refresh += 1
        if self._since_refresh >= self.refresh:
            self._since_refresh = 0
            self.current = self.corrected()

    def corrected(self) -> VerifyCosts:
        ratios = {k: float(np.median(times)) / self.profile.of(k)
                  for k, times in self._observed.items() if len(times) >= self.min_count}
        if not ratios:
            return self.profile
        known = sorted(ratios)
        sizes = sorted({*self.profile.seconds, *known})
        scale = np.interp(sizes, known, [ratios[k] for k in known])  # flat beyond the ends
        return VerifyCosts(non_decreasing({k: self.profile.of(k) * float(r)
                                           for k, r in zip(sizes, scale, strict=True)}))


def measure_verify_costs(target: Target, sizes=DEFAULT_SIZES, context: int = 200,
                         repeats: int = 15, max_seconds: float | None = 10.0,
                         progress: str | None = None) -> VerifyCosts:
    """Median time of a k-token chain verified after `context` cached tokens, for each k.

    The sizes are timed in rounds, each size once per round in a shuffled order (after a
    warm-up round), so a burst of other work on the machine lands on every size alike
    instead of inflating one (and making the budget shy of drafting). At most `repeats`
    rounds; after 3, stop once `max_seconds` have passed (a 7B target on few cores).
    Needs one free slot; leaves the target as it was. `progress`: a progress bar's label.

    The decodes run on a thread of their own that ends with the measurement
    (`machine.run_on_fresh_thread`: a pool of llama.cpp worker threads left on the caller's
    thread would slow every later decode on the engine's thread).
    """
    return run_on_fresh_thread(_measure, target, sizes, context, repeats, max_seconds,
                               progress)


def _measure(target: Target, sizes, context: int, repeats: int, max_seconds: float | None,
             progress: str | None) -> VerifyCosts:
    sizes = sorted(k for k in sizes if k <= target.config.max_tree_nodes)
    slot = target.acquire_slot()
    try:
        rng = np.random.default_rng(0)
        prompt = rng.integers(100, target.vocab_size - 100, size=context).tolist()
        target.prefill(slot, prompt)
        times: dict[int, list[float]] = {k: [] for k in sizes}
        started = time.perf_counter()
        rounds = range(repeats + 1)  # the first is a warm-up
        for round_index in rounds if progress is None else tqdm(rounds, desc=progress,
                                                                unit="round", dynamic_ncols=True):
            for k in rng.permutation(sizes).tolist():
                tokens = rng.integers(100, target.vocab_size - 100, size=k).tolist()
                begun = time.perf_counter()
                target.verify_tree(slot, tokens, list(range(-1, k - 1)))
                elapsed = time.perf_counter() - begun
                target.commit(slot, [])  # keep nothing: back to the prompt
                if round_index:
                    times[k].append(elapsed)
            if (max_seconds is not None and round_index >= 3
                    and time.perf_counter() - started > max_seconds):
                break
        return VerifyCosts(non_decreasing({k: float(np.median(v)) for k, v in times.items()}))
    finally:
        target.release_slot(slot)


def non_decreasing(seconds: dict[int, float]) -> dict[int, float]:
    """Verifying more tokens never costs less: where a size measured slower than a larger
    one, noise added the difference (it only ever adds time), so take the larger size's."""
    result, lowest = {}, float("inf")
    for k in sorted(seconds, reverse=True):
        lowest = min(lowest, seconds[k])
        result[k] = lowest
    return dict(sorted(result.items()))


def cached_verify_costs(target: Target, cache_file: Path | None = None) -> VerifyCosts:
    """Measured once per model file (name, size, mtime), thread count, CPU and weight
    buffers, then read from the cache (~/.cache/dovetail/verify_costs.json unless given)."""
    cache_file = cache_file or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) \
        / "dovetail" / "verify_costs.json"
    model = Path(target.config.model_path)
    stat = model.stat()
    key = f"v{CACHE_VERSION}|{model.name}|{stat.st_size}|{int(stat.st_mtime)}|" \
          f"{target.config.num_threads}|{target.config.max_tree_nodes}|{describe_cpu()}|" \
          f"extra-buffers-{use_extra_buffers(target.config.extra_buffers)}"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return VerifyCosts.from_json(cache[key])
    costs = measure_verify_costs(target, progress="measuring verification costs (once)")
    cache[key] = costs.as_json()
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cache, indent=1))
    except OSError:
        pass  # a read-only home: measure again next time
    return costs
