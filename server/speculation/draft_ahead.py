"""Drafting the next trees while the target verifies this one.

A step's tree goes to the target (on the CPU) and, at the same time, the draft grows trees
for the step's likeliest outcomes. An outcome is where acceptance stops (a verified node
v) and the bonus token the target then picks. A tree drafted ahead for v runs the guessed
path through the draft, with the draft's own outputs at those nodes (its predictions of
the target's features, not known yet) standing in, and grows below v. Its first level
holds the candidates for the bonus.

When verification returns and the accepted path is a guessed one whose first level holds
the bonus, the subtree below the bonus is the next tree. Otherwise the pre-drafts are
dropped. Either way the true features then replace the stand-ins, because the next
catch-up writes the same cache slots. Output stays the target's: a tree only proposes.

All of a pipelined draft's device work runs on one thread (`DraftWorker`), so that it
overlaps the target's decode on any device. A CUDA draft's thread waits for the device
there. A CPU draft computes there, and competes with the target for the cores: the
budget judges whether that pays (server/speculation/budget.py). Each run records when
it started and ended, so the engine can tell the draft time hidden behind verification
from the time it waited. `Pacing` drafts as many guesses per step as the draft grows in
one verification's time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.speculation.tree import DraftTree, TreeBuilder

Path = tuple[int, ...]  # the tokens from the root (excluded) down to a node


@dataclass
class Grown:
    """What the last grown tree knows beyond its candidates: the draft's output (predicted
    feature) at each node it expanded, and that node's children best first, by path."""

    outputs: dict[Path, np.ndarray]
    children: dict[Path, list[tuple[int, float]]]

    @classmethod
    def of(cls, builder: TreeBuilder, outputs: dict[int, np.ndarray]) -> Grown:
        """From the builder the growth filled and its outputs by candidate id."""
        paths: list[Path] = [()]
        for node in range(1, len(builder.tokens)):
            paths.append((*paths[builder.parents[node]], builder.tokens[node]))
        children: dict[Path, list[tuple[int, float]]] = {}
        for node in range(1, len(builder.tokens)):
            parent = builder.parents[node]
            if parent in outputs and builder.origins[node] == "draft":
                children.setdefault(paths[parent], []).append(
                    (builder.tokens[node], builder.log_probs[node]))
        for ranked in children.values():
            ranked.sort(key=lambda child: -child[1])
        return cls({paths[node]: output for node, output in outputs.items()}, children)


@dataclass
class Guess:
    """Where the draft guesses a step's accepted path ends: its tokens, with the draft's
    outputs standing in for the target's features at the root and each accepted node but
    the last ([len(tokens), H]). The next tree is drafted below the last one, its first
    level being the candidates for the target's bonus token."""

    tokens: list[int]
    stand_ins: np.ndarray
    chance: float  # the draft's chance that the path ends there and the bonus is drafted


def likely_outcomes(grown: Grown, tree: DraftTree, top_k: int, count: int = 1) -> list[Guess]:
    """The `count` verified nodes v whose paths the target most likely accepts with a bonus
    token among the top_k children the draft gives v, likeliest first: P(path to v) × the
    draft's mass on v's unverified top children (a verified child would be accepted, not
    the bonus) — for a leaf, whose children are not drafted yet, the mass a drafted node's
    top children have on average. The nodes above v must be ones the draft expanded
    (their outputs are the stand-ins). Nodes without a chance are left out."""
    paths: list[Path] = [()]
    for node in range(1, len(tree.tokens)):
        paths.append((*paths[tree.parents[node]], tree.tokens[node]))
    verified_children: dict[int, set[int]] = {}
    for node in range(1, len(tree.tokens)):
        verified_children.setdefault(tree.parents[node], set()).add(tree.tokens[node])
    masses = [sum(math.exp(log_prob) for _, log_prob in ranked[:top_k])
              for ranked in grown.children.values()]
    leaf_mass = sum(masses) / len(masses) if masses else 0.0
    path_probs = tree.path_probs()
    chances = []
    for node, path in enumerate(paths):
        if any(path[:depth] not in grown.outputs for depth in range(len(path))):
            continue  # (below a node the draft did not expand: a grafted chain's)
        taken = verified_children.get(node, set())
        ranked = grown.children.get(path)
        if ranked is None:
            mass = 0.0 if taken or not path else leaf_mass
        else:
            mass = sum(math.exp(log_prob) for token, log_prob in ranked[:top_k]
                       if token not in taken)
        if path_probs[node] * mass > 0:
            chances.append((path_probs[node] * mass, node))
    chances.sort(key=lambda chance: -chance[0])
    hidden_size = next(iter(grown.outputs.values())).shape[0] if grown.outputs else 0
    guesses = []
    for chance, node in chances[:count]:
        path = paths[node]
        stand_ins = np.stack([grown.outputs[path[:depth]] for depth in range(len(path))]) \
            if path else np.zeros((0, hidden_size), np.float32)
        guesses.append(Guess(list(path), stand_ins, chance))
    return guesses


@dataclass
class Predraft:
    """One tree drafted ahead, below one guessed path, run on the worker: when it ran, and
    its growth's outputs (host copies: the next run overwrites the growth's buffers)."""

    path: list[int]
    levels: int  # the levels it grows, the bonus's included
    future: Future
    started: float = 0.0  # perf_counter seconds, on the worker
    ended: float = 0.0
    outputs: tuple | None = None  # None: dropped before it ran

    def first_level(self) -> list[int]:
        """The candidates for the bonus token: the pre-drafted tree's first level."""
        return self.outputs[0][0, 0].tolist()


@dataclass
class AheadReport:
    """What one step's drafting ahead came to."""

    trees: int = 0  # trees drafted ahead (run; those dropped unrun not counted)
    hidden: float = 0.0  # seconds of their runs inside the verification
    exposed: float = 0.0  # the rest of their runs, which the step waited for
    used: bool = False  # one guess came true: the next tree is in it


def settle_predrafts(predrafts: list[Predraft], next_tokens: list[int],
           verified: tuple[float, float] | None) -> tuple[Predraft | None, AheadReport]:
    """The step's outcome is known (`next_tokens`: accepted tokens, then the bonus): drop
    the runs not started whose guess did not come true, wait for the others, and find the
    one whose path was accepted with the bonus among its first level. `verified`: when
    the verification ran (perf_counter seconds), for the hidden share."""
    *accepted, bonus = next_tokens
    hit, report = None, AheadReport()
    for predraft in predrafts:
        if predraft.path != accepted and predraft.future.cancel():
            continue
        predraft.started, predraft.ended, predraft.outputs = predraft.future.result()
        seconds = predraft.ended - predraft.started
        hidden = 0.0 if verified is None else \
            max(0.0, min(predraft.ended, verified[1]) - max(predraft.started, verified[0]))
        report.trees += 1
        report.hidden += hidden
        report.exposed += seconds - hidden
        if hit is None and predraft.path == accepted and bonus in predraft.first_level():
            hit = predraft
    report.used = hit is not None
    return hit, report


def tree_below_bonus(predraft: Predraft, growth: Any, bonus: int, top_k: int,
                     total_tokens: int) -> tuple[TreeBuilder, dict[int, np.ndarray]]:
    """The next tree from a pre-draft whose guess came true: the subtree below the bonus
    token among its first level, and the draft's outputs at its expanded candidates."""
    grown = TreeBuilder(predraft.path[-1] if predraft.path else -1, top_k, total_tokens)
    outputs = growth.replay_into(grown, *(output.numpy() for output in predraft.outputs),
                                 levels=predraft.levels)
    node = next(i for i in range(1, len(grown.tokens))
                if grown.parents[i] == 0 and grown.tokens[i] == bonus)
    builder, ids = grown.subtree(node, total_tokens)
    return builder, {ids[i]: output for i, output in outputs.items() if i in ids}


class Pacing:
    """How many trees to draft ahead per step: as many as the draft grows in the time of
    one verification (moving averages of both), 1 to max_guesses; 1 until timed."""

    def __init__(self, max_guesses: int, weight: float = 0.2) -> None:
        self.max_guesses, self.weight = max_guesses, weight
        self.tree_seconds: float | None = None
        self.verify_seconds: float | None = None

    @property
    def guesses(self) -> int:
        if self.tree_seconds is None or self.verify_seconds is None:
            return 1
        fit = int(self.verify_seconds / max(self.tree_seconds, 1e-6))
        return max(1, min(fit, self.max_guesses))

    def observe(self, report: AheadReport, verified: tuple[float, float] | None) -> None:
        if report.trees:
            self.tree_seconds = self._average(self.tree_seconds,
                                              (report.hidden + report.exposed) / report.trees)
        if verified is not None:
            self.verify_seconds = self._average(self.verify_seconds, verified[1] - verified[0])

    def _average(self, value: float | None, observed: float) -> float:
        return observed if value is None else value + self.weight * (observed - value)


class DraftWorker:
    """The one thread that does a pipelined draft's device work, in order."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dovetail-draft")

    def submit(self, work: Callable[[], Any]) -> Future:
        """Run work there; the future gives (started, ended, what work returned)."""
        def timed() -> tuple[float, float, Any]:
            started = time.perf_counter()
            result = work()
            return started, time.perf_counter(), result
        return self._pool.submit(timed)

    def run(self, work: Callable[[], Any]) -> Any:
        """Run work there and wait for it."""
        return self.submit(work).result()[2]
