"""T_V(k): what verifying k tokens in one decode costs on this machine, measured on the
target itself, cached per model file, thread count and CPU."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from verifier.machine import describe_cpu
from verifier.target import Target

DEFAULT_SIZES = (1, 2, 3, 4, 6, 8, 12, 16)


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

    def as_json(self) -> dict[str, float]:
        return {str(k): v for k, v in sorted(self.seconds.items())}

    @classmethod
    def from_json(cls, data: dict[str, float]) -> VerifyCosts:
        return cls({int(k): float(v) for k, v in data.items()})


def measure_verify_costs(target: Target, sizes=DEFAULT_SIZES, context: int = 200,
                         repeats: int = 5, progress: str | None = None) -> VerifyCosts:
    """Median time of a k-token chain verified after `context` cached tokens, for each k.
    Needs one free slot; leaves the target as it was. `progress`: a progress bar's label."""
    sizes = [k for k in sizes if k <= target.config.max_tree_nodes]
    slot = target.acquire_slot()
    try:
        rng = np.random.default_rng(0)
        prompt = rng.integers(100, target.vocab_size - 100, size=context).tolist()
        target.prefill(slot, prompt)
        seconds = {}
        for k in sizes if progress is None else tqdm(sizes, desc=progress, unit="size",
                                                       dynamic_ncols=True):
            tokens = rng.integers(100, target.vocab_size - 100, size=k).tolist()
            parents = list(range(-1, k - 1))
            times = []
            for _ in range(repeats + 1):  # the first is a warm-up
                started = time.perf_counter()
                target.verify_tree(slot, tokens, parents)
                times.append(time.perf_counter() - started)
                target.commit(slot, [])  # keep nothing: back to the prompt
            seconds[k] = float(np.median(times[1:]))
        return VerifyCosts(seconds)
    finally:
        target.release_slot(slot)


def cached_verify_costs(target: Target, cache_file: Path | None = None) -> VerifyCosts:
    """Measured once per model file (name, size, mtime), thread count and CPU, then read
    from the cache (~/.cache/dovetail/verify_costs.json unless given)."""
    cache_file = cache_file or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) \
        / "dovetail" / "verify_costs.json"
    model = Path(target.config.model_path)
    stat = model.stat()
    key = f"{model.name}|{stat.st_size}|{int(stat.st_mtime)}|{target.config.num_threads}|" \
          f"{target.config.max_tree_nodes}|{describe_cpu()}"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return VerifyCosts.from_json(cache[key])
    costs = measure_verify_costs(target)
    cache[key] = costs.as_json()
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cache, indent=1))
    except OSError:
        pass  # a read-only home: measure again next time
    return costs
